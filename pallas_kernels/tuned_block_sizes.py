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


# 128 keys per iteration whatever the page size. Measured on an H100 at page 16 (8 x 128K and
# 1 x 128K tokens, 25% of the pages; docs in BENCHMARKS.md): BF16 pages are fastest with 8 warps
# and 2 stages; quantized pages, whose dequantization needs registers, with 4 warps and 3 stages
# (8 warps cost INT4 30%).
GPU_DECODE_KEYS_PER_BLOCK = 128
GPU_DECODE_PAGE_SIZES = (16, 32, 64, 128, 256)
GPU_DECODE_WARPS_STAGES = {False: (8, 2), True: (4, 3)}  # By "some pages are quantized".


def gpu_decode_blocks(page_size: int, quantized: bool) -> GpuDecodeBlocks:
  """The GPU decode kernel's tiling for pages of `page_size` tokens (one of GPU_DECODE_PAGE_SIZES,
  which the kernel checks); `quantized`: the cache holds pages in a format other than BF16."""
  warps, stages = GPU_DECODE_WARPS_STAGES[quantized]
  return GpuDecodeBlocks(pages_per_block=max(1, GPU_DECODE_KEYS_PER_BLOCK // page_size),
                         num_warps=warps, num_stages=stages)


# The GPU page-bound (scoring) kernel: logical pages per program and warps (swept on an H100 at
# 8 x 128K tokens over 16-128 pages and 2-8 warps: 214 us here, 215-268 us for the neighbours).
GPU_BOUND_PAGES_PER_BLOCK = 64
GPU_BOUND_NUM_WARPS = 8
# The GPU key-sketch (top-channel scoring) kernel: logical pages per program and warps (swept on
# an H100 at 16 channels over 32-256 pages and 1-8 warps: 92.6 us at 8 x 128K, 21.8 us at
# 1 x 128K; 32 pages with 2 warps 91.7 / 22.0 us, 128 pages with 4 or 8 warps 95.5-96.7 /
# 22.7 us).
GPU_SKETCH_PAGES_PER_BLOCK = 64
GPU_SKETCH_NUM_WARPS = 4
# Programs per multiprocessor the split count aims for. Measured on an H100 (25% and 6.25% of
# the pages at 1 x 128K, 8 x 128K, 8 x 32K, 32 x 32K; BENCHMARKS.md): one program per
# multiprocessor, rounded up to a power of two, was as fast as twice as many (within 0.5%) or up
# to 6% faster for BF16 pages at every shape, within 0.5% for INT8 and INT4 pages, and 2% slower
# for a mixed table at 8 x 128K.
GPU_PROGRAMS_PER_CORE = 1
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


# The Mosaic GPU (Hopper) decode kernel: keys per TMA buffer and buffers in the ring. Measured
# on an H100 (BF16, page 16, 25% and 6.25% of the pages at 1 x 128K, 25% at 8 x 32K; BENCHMARKS.md):
# 64 keys with 3 or 4 buffers and 128 keys with 2 were level (67-70 us at 1 x 128K, 110.6-114.8 us
# at 8 x 32K), but with 6.25% of the pages at 1 x 128K, 128-key buffers took 60 us against 33.
# One CUDA block per multiprocessor (its shared memory allows no second); twice as many splits
# was 6% to 23% slower.
MOSAIC_DECODE_KEYS_PER_BLOCK = 64
MOSAIC_DECODE_STAGES = 3
MOSAIC_DECODE_CODE_STAGES = 2  # Code buffers per quantized pool (dequantized into the ring).
MOSAIC_DECODE_MAX_SMEM = 232448  # Bytes of shared memory a CUDA block may have on an H100.


def mosaic_decode_pages_per_block(page_size: int) -> int:
  return max(1, MOSAIC_DECODE_KEYS_PER_BLOCK // page_size)


def mosaic_num_splits(batch: int, num_kv_heads: int, max_pages: int, pages_per_block: int,
                      num_cores: int) -> int:
  """Splits per sequence for one CUDA block per multiprocessor, at most one per page block."""
  most = max(1, -(-max_pages // pages_per_block))
  return max(1, min(num_cores // (batch * num_kv_heads), most))


# TPU: pages per DMA block by page size: 256 keys a block (two full lane rows of logits), so that
# two blocks in flight are 2 x 256 x head_dim x 2 arrays' worth of DMAs (256 KiB for a bf16 head
# of 128). docs/tpu.md derives this from the chips' bandwidth; it is a plan, not a measurement.
TPU_PAGES_PER_BLOCK = {16: 16, 32: 8, 64: 4, 128: 2, 256: 1}
# TPU page-bound (scoring) kernel: logical pages per DMA block, one lane row of bounds.
TPU_BOUND_PAGES_PER_BLOCK = 128
# TPU key-sketch (top-channel scoring) kernel: lane rows of INT4 codes per DMA block, 128 rows =
# 2048 pages of 16 tokens, 16 KiB of codes and 8 KiB of scales per chosen channel (a plan, like
# the rows above: two blocks of 16 channels in flight are 768 KiB).
TPU_SKETCH_ROWS_PER_BLOCK = 128
TPU_TENSORCORES = 2  # Megacore chips (v4, v5p); single-core chips run the same grid on one core.


def tpu_pages_per_block(page_size: int) -> int:
  return TPU_PAGES_PER_BLOCK[page_size]


def tpu_num_splits(batch: int, num_kv_heads: int) -> int:
  """Split sequences only when there are fewer (sequence, kv head) programs than TensorCores."""
  return 1 if batch * num_kv_heads >= TPU_TENSORCORES else TPU_TENSORCORES
