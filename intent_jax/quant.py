"""Number formats of KV storage, in one place: quantize, dequantize, fake_quant.

Symmetric round-to-nearest absmax. A float32 scale per slice along `axis` (the axes reduced to
find the slice's largest |x|) maps that largest value to the format's largest value `QMAX`:
  INT8: q = round(x / s) in [-127, 127], s = absmax / 127; |x - q s| <= s / 2.
  INT4: q = round(x / s) in [-7, 7], s = absmax / 7; |x - q s| <= s / 2. Packed two per byte
        along the last axis of size n: byte j holds element j in its low nibble and element
        j + n/2 in its high nibble, each a 4-bit two's complement number (so [1, -2, -8, 7]
        packs to [0x81, 0x7E]). Low nibbles are the first half of the axis and high nibbles the
        second, so a kernel unpacks with two whole-half operations and no interleaving.
  FP8:  float8_e4m3fn(x / s), s = absmax / 448 (3 mantissa bits: relative error <= 2^-4).
  BF16: no scale; values are stored as bfloat16.
A slice of zeros gets scale 0 and dequantizes to zeros (never NaN or inf).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from intent_jax.precision import Precision

QMAX = {Precision.FP8: 448.0, Precision.INT8: 127.0, Precision.INT4: 7.0}
STORAGE_DTYPE = {
    Precision.BF16: jnp.bfloat16,
    Precision.FP8: jnp.float8_e4m3fn,
    Precision.INT8: jnp.int8,
    Precision.INT4: jnp.uint8,
}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["data", "scale"],
                   meta_fields=["precision"])
@dataclasses.dataclass(frozen=True, eq=False)
class Quantized:
  """Stored values and their scales.

  Attributes:
    data: STORAGE_DTYPE[precision]; INT4 has half the last axis (two values per byte).
    scale: f32, broadcastable to the unpacked shape (reduced axes kept with size 1); None for BF16.
    precision: static Precision.
  """

  data: jax.Array
  scale: jax.Array | None
  precision: Precision


def pack_int4(q: jax.Array) -> jax.Array:
  """int8[..., 2n] with values in [-8, 7] -> uint8[..., n]: element j low, j + n high."""
  if q.shape[-1] % 2:
    raise ValueError(f"INT4 packs pairs along the last axis; got odd size {q.shape[-1]}")
  half = q.shape[-1] // 2
  nibbles = q.astype(jnp.uint8) & 0xF
  return nibbles[..., :half] | (nibbles[..., half:] << 4)


def int4_nibbles(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """uint8[..., n] -> the signed low and high nibbles, int32[..., n] each (first, second half)."""
  sign_extend = lambda nibble: (nibble.astype(jnp.int32) ^ 8) - 8
  return sign_extend(packed & 0xF), sign_extend(packed >> 4)


# float32 2**23 with bit 3 set: for a nibble m in [0, 16), the bits (m ^ this) are the float
# 2**23 + (m ^ 8), and (m ^ 8) - 8 is m read as a signed nibble.
_NIBBLE_FLOAT_BITS = 0x4B000008
_NIBBLE_FLOAT_OFFSET = 2.0**23 + 8


def int4_nibble_floats(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`int4_nibbles` as exact float32[..., n] values, made from exponent bits (one XOR and one
  add each, no integer-to-float conversion: on a GPU those run on a slower pipe)."""
  as_float = lambda nibble: (jax.lax.bitcast_convert_type(nibble ^ _NIBBLE_FLOAT_BITS,
                                                          jnp.float32) - _NIBBLE_FLOAT_OFFSET)
  packed = packed.astype(jnp.int32)
  return as_float(packed & 0xF), as_float(packed >> 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
  """uint8[..., n] -> int8[..., 2n]; inverse of pack_int4."""
  low, high = int4_nibbles(packed)
  return jnp.concatenate([low, high], axis=-1).astype(jnp.int8)


def quantize(x: jax.Array, precision: Precision, axis) -> Quantized:
  """Quantizes `x` with one scale per slice reduced over `axis` (an int or tuple of ints)."""
  precision = Precision(precision)
  if precision == Precision.BF16:
    return Quantized(x.astype(jnp.bfloat16), None, precision)
  x = x.astype(jnp.float32)
  qmax = QMAX[precision]
  scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / qmax
  scaled = x / jnp.where(scale > 0, scale, 1.0)
  if precision == Precision.FP8:
    data = jnp.clip(scaled, -qmax, qmax).astype(jnp.float8_e4m3fn)
  else:
    data = jnp.clip(jnp.round(scaled), -qmax, qmax).astype(jnp.int8)
    if precision == Precision.INT4:
      data = pack_int4(data)
  return Quantized(data, scale, precision)


def dequantize(quantized: Quantized) -> jax.Array:
  """float32 values of `quantized`."""
  data = quantized.data
  if quantized.precision == Precision.BF16:
    return data.astype(jnp.float32)
  if quantized.precision == Precision.INT4:
    data = unpack_int4(data)
  return data.astype(jnp.float32) * quantized.scale


def fake_quant(x: jax.Array, precision: Precision, axis) -> jax.Array:
  """x rounded through `precision` and back, in x's dtype."""
  return dequantize(quantize(x, precision, axis)).astype(x.dtype)
