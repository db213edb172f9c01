"""Block sizes of the decode kernels, kept in one table rather than scattered through the code."""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class GpuDecodeBlocks:
  """Per-program tiling of the GPU kernel.

  Attributes:
    pages_per_block: pages gathered per loop iteration (pages_per_block * page_size keys).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining depth of the page loop.
  """

  pages_per_block: int
  num_warps: int
  num_stages: int


# By page size: 128 keys per iteration.
GPU_DECODE_BLOCKS = {
    16: GpuDecodeBlocks(pages_per_block=8, num_warps=4, num_stages=2),
    32: GpuDecodeBlocks(pages_per_block=4, num_warps=4, num_stages=2),
    64: GpuDecodeBlocks(pages_per_block=2, num_warps=4, num_stages=2),
    128: GpuDecodeBlocks(pages_per_block=1, num_warps=4, num_stages=2),
    256: GpuDecodeBlocks(pages_per_block=1, num_warps=8, num_stages=2),
}
# Programs per multiprocessor the split count aims for: enough to hide memory latency.
GPU_PROGRAMS_PER_CORE = 4
GPU_DEFAULT_CORES = 132  # An H100 SXM; used when the device does not say.


def gpu_num_splits(batch: int, num_kv_heads: int, max_pages: int, pages_per_block: int,
                   num_cores: int) -> int:
  """Splits per sequence so that batch * kv heads * splits fills the GPU, a power of two, and
  no more than there are page blocks in a table."""
  wanted = math.ceil(GPU_PROGRAMS_PER_CORE * num_cores / (batch * num_kv_heads))
  most = max(1, math.ceil(max_pages / pages_per_block))
  splits = 1
  while splits < min(wanted, most):
    splits *= 2
  return splits
