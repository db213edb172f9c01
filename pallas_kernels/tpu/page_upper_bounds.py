"""Query page bounds on TPU, in Pallas (Mosaic): the scoring kernel of query-aware routing.

Reference: `intent_jax.scoring.reference_page_upper_bounds` (jax.numpy), the answer this must
match.

Work: one program per (sequence, kv head); both grid dimensions are parallel (megacore). The
cache's page map (pool and slot of every logical page) is scalar-prefetched into SMEM. A program
walks the sequence's logical pages in blocks of `pages_per_block` (a lane row of bounds): it
starts the copies of the next block's key bounds (HBM -> VMEM, one DMA per page and bound, from
the pool that stores the page; unmapped pages move nothing) before bounding the current block
from the other buffer (bfloat16, upcast in VMEM), for every query row of the kv head at once:
q+ . key_max + q- . key_min as two float32 matmuls at HIGHEST precision (a bound must not round
below the logit it bounds), maximum over the rows used. Unmapped pages (no copy: their buffer
rows are stale) are set to -inf after the kernel, from the page map.

Tiling: head_dim a multiple of 128 (lanes); other inputs raise NotImplementedError. The bounds
are read where the pools store them, so a block is 2 x `pages_per_block` DMAs of head_dim
bfloat16 values each; docs/tpu.md weighs that against a per-sequence layout (not built).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from intent_jax import cache as cache_lib
from intent_jax.precision import Precision
from pallas_kernels import splits
from pallas_kernels import tuned_block_sizes
from pallas_kernels.tpu import double_buffer

LANES = 128
SUBLANES = 8  # float32 rows.


def static_validate_inputs(q, cache) -> None:
  """Raises NotImplementedError for inputs this kernel does not tile (the caller then uses the
  jax.numpy version)."""
  if not isinstance(cache, cache_lib.KVCache):
    raise NotImplementedError("the pallas_tpu page bounds read a paged KVCache")
  if cache.config.head_dim % LANES:
    raise NotImplementedError(
        f"the pallas_tpu page bounds need head_dim a multiple of {LANES}, got"
        f" {cache.config.head_dim}")


def _kernel(pool_ref, slot_ref, q_pos_ref, q_neg_ref, *refs, precisions, pages_per_block,
            used_rows, scale):
  num_bound_refs = 2 * len(precisions)
  bound_refs, out_ref = refs[:num_bound_refs], refs[num_bound_refs]
  lower_buf, upper_buf, sem = refs[num_bound_refs + 1:]
  b, h = pl.program_id(0), pl.program_id(1)
  num_blocks = out_ref.shape[-1] // pages_per_block
  q_pos, q_neg = q_pos_ref[...], q_neg_ref[...]
  nt_dot = lambda x, y: jax.lax.dot_general(x, y, (((1,), (1,)), ((), ())),
                                            precision=jax.lax.Precision.HIGHEST,
                                            preferred_element_type=jnp.float32)

  def copies(block, buffer, action):
    """Starts or waits for the copies of block `block`'s bounds into `buffer`."""

    def one_page(i, carry):
      page = block * pages_per_block + i
      for p, precision in enumerate(precisions):
        @pl.when(pool_ref[b, page] == int(precision))
        def _(p=p):
          slot = slot_ref[b, page]
          for source, target in ((bound_refs[2 * p], lower_buf), (bound_refs[2 * p + 1],
                                                                   upper_buf)):
            dma = pltpu.make_async_copy(source.at[h, pl.ds(slot, 1)],
                                        target.at[buffer, pl.ds(i, 1)], sem.at[buffer])
            getattr(dma, action)()
      return carry

    jax.lax.fori_loop(0, pages_per_block, one_page, 0)

  def compute(block, buffer):
    pages = pl.ds(pl.multiple_of(block * pages_per_block, pages_per_block), pages_per_block)
    upper, lower = (buf[buffer].astype(jnp.float32) for buf in (upper_buf, lower_buf))
    per_row = nt_dot(q_pos, upper) + nt_dot(q_neg, lower)
    per_row = jnp.where(jax.lax.broadcasted_iota(jnp.int32, per_row.shape, 0) < used_rows,
                        per_row, -jnp.inf)
    out_ref[:, pages] = jnp.max(per_row, axis=0, keepdims=True) * scale

  double_buffer.walk_blocks(num_blocks, copies, compute)


def page_upper_bounds(q, cache: cache_lib.KVCache, *, scale=None, interpret: bool = False,
                      pages_per_block: int | None = None) -> jax.Array:
  """f32[batch, max_pages_per_seq, num_kv_heads]: `scoring.page_upper_bounds`, in one kernel.

  Args:
    q: [batch, q_len, num_q_heads, head_dim], batch = the cache's max_seqs.
    cache: KVCache; every pool's key bounds are read where they are stored.
    scale: logit scale; default 1 / sqrt(head_dim).
    interpret: run in Pallas's TPU interpret mode (CPU tests).
    pages_per_block: logical pages per DMA block, a multiple of 128; default from
      tuned_block_sizes.
  """
  static_validate_inputs(q, cache)
  c = cache.config
  block = pages_per_block or tuned_block_sizes.TPU_BOUND_PAGES_PER_BLOCK
  batch, q_len, num_q_heads, head_dim = q.shape
  used_rows = num_q_heads // c.num_kv_heads * q_len
  rows = -(-used_rows // SUBLANES) * SUBLANES
  q_rows = splits.query_rows(q.astype(jnp.float32), c.num_kv_heads, rows)
  num_pages = -(-c.max_pages_per_seq // block) * block
  pad = ((0, 0), (0, num_pages - c.max_pages_per_seq))
  page_pool = jnp.pad(cache.page_pool, pad, constant_values=cache_lib.UNMAPPED)
  page_slot = jnp.pad(cache.page_slot, pad, constant_values=cache_lib.UNMAPPED)
  present = [pool for pool in cache.pools if pool.num_pages > 0]
  bound_arrays = [x for pool in present for x in (pool.key_min, pool.key_max)]
  query = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, *_: (b, h, 0, 0))
  kernel = functools.partial(
      _kernel, precisions=tuple(Precision(p.precision) for p in present), pages_per_block=block,
      used_rows=used_rows, scale=float(head_dim**-0.5 if scale is None else scale))
  bounds = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(batch, c.num_kv_heads),
          in_specs=[query, query] + [pl.BlockSpec(memory_space=pl.ANY)] * len(bound_arrays),
          # [1, pages] per program: a block's last two dims must be whole (or (8, 128) tiles).
          out_specs=pl.BlockSpec((None, None, 1, num_pages), lambda b, h, *_: (b, h, 0, 0)),
          scratch_shapes=[pltpu.VMEM((2, block, head_dim), cache_lib.SUMMARY_DTYPE),
                          pltpu.VMEM((2, block, head_dim), cache_lib.SUMMARY_DTYPE),
                          pltpu.SemaphoreType.DMA((2,))],
      ),
      out_shape=jax.ShapeDtypeStruct((batch, c.num_kv_heads, 1, num_pages), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="page_upper_bounds_tpu",
  )(page_pool, page_slot, jnp.maximum(q_rows, 0.0), jnp.minimum(q_rows, 0.0), *bound_arrays)
  bounds = jnp.moveaxis(bounds[:, :, 0, :c.max_pages_per_seq], 1, 2)
  return jnp.where((cache.page_pool != cache_lib.UNMAPPED)[..., None], bounds, -jnp.inf)
