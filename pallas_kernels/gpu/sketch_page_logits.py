"""Top-channel page logits from the key sketch on GPU, in Pallas (Triton backend).

Reference: `intent_jax.scoring.reference_sketch_page_logits` (jax.numpy), the answer this must
match.

Work: one program per (sequence, kv head, block of `pages_per_block` logical pages). The r
channels where the group's query is largest are chosen outside (`scoring.top_query_channels`,
one small top-k). For each chosen channel in turn (a static loop) the program loads the block's
INT4 codes and scales from the sketch, where the cache keeps them: channel-major and ordered by
page, so a channel of the block is one contiguous run of bytes and no other channel is read. It
unpacks the nibbles in registers into floats built from exponent bits (low nibbles are a page's
first half of tokens, high nibbles the second) and adds them to each query row's dot products
weighted by that row's value of the channel times the page's scale (float32 multiply-adds).
The maximum over rows and over the page's stored tokens (below the sequence's length) is the
page's estimate, -inf for a page with none.
The kernel is bound by instruction issue, not memory (Nsight Compute on an H100 at 8 x 128K,
16 channels: issue slots 76% busy, DRAM 33% of peak): hence the float conversion without a
conversion instruction and the scale applied once a page (92.6 us against 102-103 us). Also
measured (BENCHMARKS.md): one 3-D load of every chosen channel reduced over the channel axis
144.0 us; that with each channel's codes loaded as one flat run 181.7 us; 2 to 8 kv heads a
program (more bytes in flight each) 118 to 139 us.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from intent_jax import cache as cache_lib
from intent_jax import quant
from pallas_kernels import splits
from pallas_kernels import tuned_block_sizes
from pallas_kernels.gpu import selected_page_decode


def _kernel(lengths_ref, chosen_ref, q_ref, codes_ref, scale_ref, out_ref, *, channels,
            used_rows, max_pages, scale):
  block = out_ref.shape[0]
  half = codes_ref.shape[-1]
  length = lengths_ref[pl.program_id(0)]
  pages = pl.program_id(2) * block + jnp.arange(block)
  in_range = pages < max_pages
  dots_low, dots_high = [None] * used_rows, [None] * used_rows  # Per query row: [block, half].
  for i in range(channels):
    channel = chosen_ref[i]
    codes = plgpu.load(codes_ref.at[channel, pages[:, None], jnp.arange(half)[None, :]],
                       mask=in_range[:, None], other=0)  # u8[block, half], contiguous.
    scales = plgpu.load(scale_ref.at[channel, pages], mask=in_range, other=0.0)[:, None]
    low, high = quant.int4_nibble_floats(codes)  # A page's first and second half of tokens.
    for r in range(used_rows):
      weight = q_ref[r, i] * scales  # [block, 1]: the scale joins the query, once a page.
      dots_low[r] = low * weight if i == 0 else dots_low[r] + low * weight
      dots_high[r] = high * weight if i == 0 else dots_high[r] + high * weight
  best_low, best_high = dots_low[0], dots_high[0]
  for r in range(1, used_rows):
    best_low = jnp.maximum(best_low, dots_low[r])
    best_high = jnp.maximum(best_high, dots_high[r])
  first = pages[:, None] * (2 * half) + jnp.arange(half)[None, :]  # [block, half]
  best_low = jnp.where(first < length, best_low, -jnp.inf)
  best_high = jnp.where(first + half < length, best_high, -jnp.inf)
  best = jnp.maximum(jnp.max(best_low, axis=1), jnp.max(best_high, axis=1))
  out_ref[...] = jnp.where(in_range, best * scale, -jnp.inf)


def sketch_page_logits(q, cache: cache_lib.KVCache, *, channels: int, scale=None,
                       interpret: bool = False, pages_per_block: int | None = None) -> jax.Array:
  """f32[batch, max_pages_per_seq, num_kv_heads]: `scoring.sketch_page_logits`, in one kernel.

  Args:
    q: [batch, q_len, num_q_heads, head_dim], batch = the cache's max_seqs.
    cache: KVCache with a key sketch (checked by the caller).
    channels: channels read per kv head, in [1, head_dim].
    scale: logit scale; default 1 / sqrt(head_dim).
    interpret: run in Pallas interpret mode (CPU tests).
    pages_per_block: logical pages per program, a power of two; default from tuned_block_sizes.
  """
  c = cache.config
  block = pages_per_block or tuned_block_sizes.GPU_SKETCH_PAGES_PER_BLOCK
  batch, q_len, _, head_dim = q.shape
  scale = head_dim**-0.5 if scale is None else scale
  used_rows = q_len * q.shape[2] // c.num_kv_heads
  rows = selected_page_decode.padded_rows(used_rows)
  chosen, q_chosen = splits.chosen_channel_rows(q, c.num_kv_heads, channels, rows)
  num_blocks = -(-c.max_pages_per_seq // block)
  sketch = cache.key_sketch
  kernel = functools.partial(_kernel, channels=channels, used_rows=used_rows,
                             max_pages=c.max_pages_per_seq, scale=float(scale))
  logits = pl.pallas_call(
      kernel,
      grid=(batch, c.num_kv_heads, num_blocks),
      in_specs=[
          pl.BlockSpec((batch,), lambda b, h, j: (0,)),
          pl.BlockSpec((None, None, channels), lambda b, h, j: (b, h, 0)),
          pl.BlockSpec((None, None, rows, channels), lambda b, h, j: (b, h, 0, 0)),
          pl.BlockSpec((None, head_dim, None) + sketch.codes.shape[3:],
                       lambda b, h, j: (h, 0, b, 0, 0)),
          pl.BlockSpec((None, head_dim, None, c.max_pages_per_seq), lambda b, h, j: (h, 0, b, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, block), lambda b, h, j: (b, h, j)),
      out_shape=jax.ShapeDtypeStruct((batch, c.num_kv_heads, num_blocks * block), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=tuned_block_sizes.GPU_SKETCH_NUM_WARPS),
      interpret=interpret,
      name="sketch_page_logits",
  )(cache.lengths, chosen, q_chosen, sketch.codes, sketch.scale)
  return jnp.moveaxis(logits[:, :, :c.max_pages_per_seq], 1, 2)
