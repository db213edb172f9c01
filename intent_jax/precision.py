"""Storage formats of KV pages and what one page of each costs in bytes.

One (kv head, page) holds `page_size` tokens of K and of V, `head_dim` channels each. Quantized
formats carry float32 scales with the KIVI split: K has one scale per channel of the page
(`head_dim` scales), V one scale per token (`page_size` scales).
"""

import enum


class Precision(enum.IntEnum):
  """Storage format of a KV page. A smaller value is the more precise format."""

  BF16 = 0
  FP8 = 1  # float8_e4m3fn values with float32 scales.
  INT8 = 2  # symmetric absmax int8 with float32 scales.
  INT4 = 3  # symmetric absmax int4, two values per byte, float32 scales.


BITS_PER_VALUE = {
    Precision.BF16: 16,
    Precision.FP8: 8,
    Precision.INT8: 8,
    Precision.INT4: 4,
}
SCALE_BYTES = 4  # Scales are float32.
NUM_PRECISIONS = len(Precision)


def scales_per_page(precision: Precision, page_size: int, head_dim: int) -> int:
  """Number of scales stored with one (kv head, page) of K and V."""
  if precision == Precision.BF16:
    return 0
  return head_dim + page_size  # K per channel, V per token.


def page_bytes(precision: Precision, page_size: int, head_dim: int, *,
               full_value_bytes: int = 2) -> int:
  """Bytes of K and V of one (kv head, page) in `precision`, scales included.

  `full_value_bytes` is the width of an unquantized (BF16-pool) value: 2, or 4 for float32.
  """
  values = 2 * page_size * head_dim
  if precision == Precision.BF16:
    return values * full_value_bytes
  data_bytes = values * BITS_PER_VALUE[precision] // 8
  return data_bytes + SCALE_BYTES * scales_per_page(precision, page_size, head_dim)
