"""Query page bounds on GPU, in Pallas (Triton backend): the scoring kernel of query-aware routing.

Reference: `intent_jax.scoring.reference_page_upper_bounds` (jax.numpy), the answer this must
match.

Work: one program per (sequence, kv head, block of `pages_per_block` logical pages). It reads
the block's (pool, slot) entries, gathers each page's key bounds from the pool that stores it
(a masked load per pool, so no page is read twice; bfloat16, upcast in registers) and bounds
them for each query row of the kv head: q+ . key_max + q- . key_min in float32 multiply-adds
(no TF32: a bound must not round below the logit it bounds), maximum over the rows. The bounds
are read where the cache stores them: no per-sequence copy of them is made first. Rows are a
static loop rather than a matmul: with TF32 off, Triton's float32 `dot` ran this kernel at
400-800 GB/s on an H100, the loop at 2500 GB/s (BENCHMARKS.md).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from intent_jax import cache as cache_lib
from intent_jax.precision import Precision
from pallas_kernels import tuned_block_sizes
from pallas_kernels.gpu import selected_page_decode


def static_validate_inputs(q, cache) -> None:
  """Raises NotImplementedError for inputs this kernel does not handle (the caller then uses
  the jax.numpy version). Shapes were checked by the caller."""
  if not isinstance(cache, cache_lib.KVCache):
    raise NotImplementedError("the pallas_gpu page bounds read a paged KVCache")
  head_dim = cache.config.head_dim
  if head_dim < 16 or head_dim & (head_dim - 1):
    raise NotImplementedError(f"the pallas_gpu page bounds need head_dim a power of two >= 16,"
                              f" got {head_dim}")


def _kernel(pool_ref, slot_ref, q_pos_ref, q_neg_ref, *refs, precisions, used_rows, scale):
  bound_refs, out_ref = refs[:-1], refs[-1]
  pool, slot = pool_ref[...], slot_ref[...]
  head_dim = q_pos_ref.shape[1]
  bound = jnp.full(pool.shape, -jnp.inf, jnp.float32)
  for i, precision in enumerate(precisions):
    lower_ref, upper_ref = bound_refs[2 * i], bound_refs[2 * i + 1]
    here = pool == int(precision)
    at = (jnp.where(here, slot, 0)[:, None], jnp.arange(head_dim)[None, :])
    load = lambda ref: plgpu.load(ref.at[at], mask=here[:, None], other=0).astype(jnp.float32)
    upper, lower = load(upper_ref), load(lower_ref)  # [pages, head_dim]
    best = None
    for r in range(used_rows):
      row = jnp.sum(upper * q_pos_ref[r, :][None, :] + lower * q_neg_ref[r, :][None, :], axis=1)
      best = row if best is None else jnp.maximum(best, row)
    bound = jnp.where(here, best * scale, bound)
  out_ref[...] = bound


def page_upper_bounds(q, cache: cache_lib.KVCache, *, scale=None, interpret: bool = False,
                      pages_per_block: int | None = None) -> jax.Array:
  """f32[batch, max_pages_per_seq, num_kv_heads]: `scoring.page_upper_bounds`, in one kernel.

  Args:
    q: [batch, q_len, num_q_heads, head_dim], batch = the cache's max_seqs.
    cache: KVCache; every pool's key bounds are read where they are stored.
    scale: logit scale; default 1 / sqrt(head_dim).
    interpret: run in Pallas interpret mode (CPU tests).
    pages_per_block: logical pages per program; default from tuned_block_sizes.
  """
  static_validate_inputs(q, cache)
  c = cache.config
  block = pages_per_block or tuned_block_sizes.GPU_BOUND_PAGES_PER_BLOCK
  scale = q.shape[-1]**-0.5 if scale is None else scale
  q_rows, used_rows = selected_page_decode.query_rows(q.astype(jnp.float32), c.num_kv_heads)
  batch, num_kv_heads, rows, head_dim = q_rows.shape
  num_blocks = -(-c.max_pages_per_seq // block)
  pad = ((0, 0), (0, num_blocks * block - c.max_pages_per_seq))
  page_pool = jnp.pad(cache.page_pool, pad, constant_values=cache_lib.UNMAPPED)
  page_slot = jnp.pad(cache.page_slot, pad, constant_values=cache_lib.UNMAPPED)
  present = [pool for pool in cache.pools if pool.num_pages > 0]
  arrays = [page_pool, page_slot, jnp.maximum(q_rows, 0.0), jnp.minimum(q_rows, 0.0)]
  entries = pl.BlockSpec((None, block), lambda b, h, j: (b, j))
  query = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, j: (b, h, 0, 0))
  in_specs = [entries, entries, query, query]
  for pool in present:
    arrays += [pool.key_min, pool.key_max]
    in_specs += [pl.BlockSpec((None,) + pool.key_min.shape[1:], lambda b, h, j: (h, 0, 0))] * 2
  kernel = functools.partial(_kernel, precisions=tuple(Precision(p.precision) for p in present),
                             used_rows=used_rows, scale=float(scale))
  bounds = pl.pallas_call(
      kernel,
      grid=(batch, num_kv_heads, num_blocks),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, block), lambda b, h, j: (b, h, j)),
      out_shape=jax.ShapeDtypeStruct((batch, num_kv_heads, num_blocks * block), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=tuned_block_sizes.GPU_BOUND_NUM_WARPS),
      interpret=interpret,
      name="page_upper_bounds",
  )(*arrays)
  return jnp.moveaxis(bounds[:, :, :c.max_pages_per_seq], 1, 2)
