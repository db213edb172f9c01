"""Top-channel page logits from the key sketch on TPU, in Pallas (Mosaic).

Reference: `intent_jax.scoring.reference_sketch_page_logits` (jax.numpy), the answer this must
match.

Layout. The sketch keeps each (kv head, channel, sequence) as one contiguous run of INT4 codes in
page order, page_size / 2 bytes a page (`cache.KeySketch`). Here that run is viewed, for free, as
rows of 128 bytes (a lane row): `128 / (page_size / 2)` pages a row, a page's bytes in adjacent
lanes (low nibbles its first half of tokens, high nibbles its second). Its float32 scales are
viewed as rows of that many pages, so code row i and scale row i hold the same pages.

Work: one program per (sequence, kv head); both grid dimensions are parallel (megacore). The r
chosen channels (`scoring.top_query_channels`, outside) and the lengths are scalar-prefetched into
SMEM; the query's values of those channels are an SMEM block. A program walks its sequence in
blocks of `rows_per_block` code rows: it starts the next block's copies (HBM -> VMEM, one DMA per
chosen channel for the codes and one for the scales) before computing the current block from the
other buffer. A block's last rows are clamped to the sequence's end, so the last block may redo
rows of the one before (same values written twice) instead of reading past it. Per tile of rows:
each scale is spread over its page's lanes by a one-hot matmul, and for each chosen channel the
nibbles are unpacked, scaled and added, weighted by each query row's value, to that row's dot
products (float32, VPU). The maximum over query rows and over stored tokens (below the length) is
then taken within each page's lanes by a butterfly of lane rotations, and the lane that ends each
page is picked out by a second one-hot matmul. Pages with no stored token give -inf.

Tiling: `max_pages_per_seq * page_size / 2` must be a multiple of 128 (whole lane rows; every
page size, a power of two in [16, 256], divides a row); other inputs raise NotImplementedError.
head_dim is free (channels are a leading axis). Never run on a TPU (none was reachable): proven in interpret mode; docs/tpu.md.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from intent_jax import cache as cache_lib
from intent_jax import quant
from pallas_kernels import splits
from pallas_kernels import tuned_block_sizes
from pallas_kernels.tpu import double_buffer

LANES = 128
CODE_SUBLANES = 32  # Rows of a uint8 tile.
EXACT = jax.lax.Precision.HIGHEST  # One-hot matmuls move float32 values unchanged.


def static_validate_inputs(cache) -> None:
  """Raises NotImplementedError for caches this kernel does not tile (the caller then uses the
  jax.numpy version)."""
  if not isinstance(cache, cache_lib.KVCache):
    raise NotImplementedError("the pallas_tpu sketch scoring reads a paged KVCache")
  c = cache.config
  if c.max_pages_per_seq * c.page_size // 2 % LANES:
    raise NotImplementedError(
        f"the pallas_tpu sketch scoring needs max_pages_per_seq * page_size / 2 a multiple of"
        f" {LANES} (whole lane rows), got {c.max_pages_per_seq} pages of {c.page_size}")


def _one_hot(rows: int, cols: int, hot) -> jax.Array:
  """f32[rows, cols], 1 where hot(row index, column index)."""
  row = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
  return hot(row, col).astype(jnp.float32)


def _kernel(lengths_ref, chosen_ref, q_ref, codes_hbm, scale_hbm, out_ref, codes_buf, scale_buf,
            sem, *, channels, used_rows, page_size, rows_per_block, rows_per_tile, scale):
  b, h = pl.program_id(0), pl.program_id(1)
  num_rows, pages_per_row = out_ref.shape
  half = page_size // 2
  half_bits = half.bit_length() - 1  # half is a power of two: shifts, not signed division.
  num_blocks = -(-num_rows // rows_per_block)
  length = lengths_ref[b]
  spread = _one_hot(pages_per_row, LANES, lambda page, lane: lane >> half_bits == page)
  page_end = _one_hot(LANES, pages_per_row, lambda lane, page: lane == page * half + half - 1)

  def first_row(block):
    return jnp.minimum(block * rows_per_block, num_rows - rows_per_block)

  def copies(block, buffer, action):
    """Starts or waits for block `block`'s codes and scales of every chosen channel."""
    rows = pl.ds(first_row(block), rows_per_block)

    def one_channel(i, carry):
      channel = chosen_ref[(b * pl.num_programs(1) + h) * channels + i]
      for source, target in ((codes_hbm, codes_buf), (scale_hbm, scale_buf)):
        dma = pltpu.make_async_copy(source.at[h, channel, b, rows], target.at[buffer, i],
                                    sem.at[buffer])
        getattr(dma, action)()
      return carry

    jax.lax.fori_loop(0, channels, one_channel, 0)

  def tile(buffer, row0, t):
    """Page logits of rows [t * rows_per_tile, +rows_per_tile) of the block in `buffer`."""
    rows = pl.ds(pl.multiple_of(t * rows_per_tile, rows_per_tile), rows_per_tile)

    def add_channel(i, dots):
      weights = jnp.dot(scale_buf[buffer, i, rows], spread, precision=EXACT)  # [tile, lanes]
      low, high = (x.astype(jnp.float32) * weights
                   for x in quant.int4_nibbles(codes_buf[buffer, i, rows]))
      return tuple(d + q_ref[0, (r // 2) * channels + i] * (low if r % 2 == 0 else high)
                   for r, d in enumerate(dots))

    zeros = jnp.zeros((rows_per_tile, LANES), jnp.float32)
    dots = jax.lax.fori_loop(0, channels, add_channel, (zeros,) * (2 * used_rows))
    best_low = functools.reduce(jnp.maximum, dots[0::2])
    best_high = functools.reduce(jnp.maximum, dots[1::2])
    row = row0 + t * rows_per_tile + jax.lax.broadcasted_iota(jnp.int32, zeros.shape, 0)
    lane = jax.lax.broadcasted_iota(jnp.int32, zeros.shape, 1)
    # The token of each lane's low nibble (its high nibble's is `half` later).
    token = (row * pages_per_row + (lane >> half_bits)) * page_size + (lane & (half - 1))
    best = jnp.maximum(jnp.where(token < length, best_low, -jnp.inf),
                       jnp.where(token + half < length, best_high, -jnp.inf))
    shift = 1
    while shift < half:  # Lane p * half + half - 1 ends up with page p's maximum.
      best = jnp.maximum(best, pltpu.roll(best, shift, 1))
      shift *= 2
    # -inf (no stored token) would make the matmul's zeros NaN; those pages are set below.
    best = jnp.dot(jnp.where(best > -jnp.inf, best, 0.0), page_end, precision=EXACT)
    page = (row[:, :pages_per_row] * pages_per_row
            + jax.lax.broadcasted_iota(jnp.int32, best.shape, 1))
    out_ref[pl.ds(row0 + t * rows_per_tile, rows_per_tile)] = jnp.where(
        page * page_size < length, best * scale, -jnp.inf)

  def compute(block, buffer):
    row0 = first_row(block)

    def one_tile(t, carry):
      tile(buffer, row0, t)
      return carry

    jax.lax.fori_loop(0, rows_per_block // rows_per_tile, one_tile, 0)

  double_buffer.walk_blocks(num_blocks, copies, compute)


def sketch_page_logits(q, cache: cache_lib.KVCache, *, channels: int, scale=None,
                       interpret: bool = False, rows_per_block: int | None = None) -> jax.Array:
  """f32[batch, max_pages_per_seq, num_kv_heads]: `scoring.sketch_page_logits`, in one kernel.

  Args:
    q: [batch, q_len, num_q_heads, head_dim], batch = the cache's max_seqs.
    cache: KVCache with a key sketch (checked by the caller).
    channels: channels read per kv head, in [1, head_dim].
    scale: logit scale; default 1 / sqrt(head_dim).
    interpret: run in Pallas's TPU interpret mode (CPU tests).
    rows_per_block: lane rows of codes per DMA block, a multiple of 32; default from
      tuned_block_sizes. Capped at the sequence's rows.
  """
  static_validate_inputs(cache)
  c = cache.config
  batch, q_len, num_q_heads, head_dim = q.shape
  half = c.page_size // 2
  pages_per_row = LANES // half
  num_rows = c.max_pages_per_seq // pages_per_row
  block = min(rows_per_block or tuned_block_sizes.TPU_SKETCH_ROWS_PER_BLOCK, num_rows)
  if block > CODE_SUBLANES:
    block -= block % CODE_SUBLANES
  used_rows = num_q_heads // c.num_kv_heads * q_len
  chosen, q_chosen = splits.chosen_channel_rows(q, c.num_kv_heads, channels, used_rows)
  sketch = cache.key_sketch
  lead = (c.num_kv_heads, head_dim, c.max_seqs, num_rows)
  kernel = functools.partial(
      _kernel, channels=channels, used_rows=used_rows, page_size=c.page_size,
      rows_per_block=block, rows_per_tile=min(CODE_SUBLANES, block),
      scale=float(head_dim**-0.5 if scale is None else scale))
  logits = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(batch, c.num_kv_heads),
          in_specs=[
              pl.BlockSpec((None, 1, used_rows * channels),  # Whole trailing dims.
                           lambda b, h, *_: (b * c.num_kv_heads + h, 0, 0),
                           memory_space=pltpu.SMEM),
              pl.BlockSpec(memory_space=pl.ANY),
              pl.BlockSpec(memory_space=pl.ANY),
          ],
          out_specs=pl.BlockSpec((None, None, num_rows, pages_per_row),
                                 lambda b, h, *_: (b, h, 0, 0)),
          scratch_shapes=[pltpu.VMEM((2, channels, block, LANES), jnp.uint8),
                          pltpu.VMEM((2, channels, block, pages_per_row), jnp.float32),
                          pltpu.SemaphoreType.DMA((2,))],
      ),
      out_shape=jax.ShapeDtypeStruct((batch, c.num_kv_heads, num_rows, pages_per_row),
                                     jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="sketch_page_logits_tpu",
  )(cache.lengths, chosen.reshape(-1), q_chosen.reshape(batch * c.num_kv_heads, 1, -1),
    sketch.codes.reshape(lead + (LANES,)), sketch.scale.reshape(lead + (pages_per_row,)))
  return jnp.moveaxis(logits.reshape(batch, c.num_kv_heads, c.max_pages_per_seq), 1, 2)
