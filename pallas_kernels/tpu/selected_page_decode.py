"""Selected-page decode attention on TPU, in Pallas (Mosaic): implementation "pallas_tpu".

Reference: `intent_jax.reference.paged_attention`, the answer this must match.

Work: one program per (sequence, kv head, split); every grid dimension is parallel, so a chip with
two TensorCores (megacore) shares them. Before the kernel, `prepare` sorts each sequence's table
entries by the precision their page is stored in and pads each precision's run to whole blocks of
`pages_per_block` pages, so that every block holds pages of one format; it also lays out, per
block, the position of each key it holds (a sentinel where the token is not selected or the entry
is padding), which gives token masks and causality in one comparison. The table's slots are
scalar-prefetched into SMEM. A program walks its share of the blocks, one loop per format: it
starts the copies of the next block's pages (HBM -> VMEM, one DMA per page and array; padding
entries move nothing) before computing the current one from the other buffer, dequantizes in
VMEM, and attends every query row of the kv head at once (GQA packing: a page moves once per kv
head) with an online softmax. Splits are merged by `splits.combine`, where the sink logits join.

Tiling (lane 128; sublanes 8 for 32-bit, 16 for 16-bit, 32 for 8-bit values): head_dim must be a
multiple of 128; the page size a multiple of the sublane tile of every pool present (16 with a
bfloat16 BF16 pool, 32 with any 8-bit pool); INT4 pages store head_dim / 2 bytes per token, so
they need head_dim a multiple of 256. Other inputs raise NotImplementedError.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from intent_jax import cache as cache_lib
from intent_jax import quant
from intent_jax.precision import NUM_PRECISIONS, Precision
from intent_jax.page_table import PageTable
from pallas_kernels import splits
from pallas_kernels import tuned_block_sizes
from pallas_kernels.splits import MASK_VALUE

LANES = 128
NEVER = jnp.iinfo(jnp.int32).max  # Position of a key no query sees.
_BOUNDS = 8  # bounds[b] holds NUM_PRECISIONS + 1 block offsets, padded.


def _sublanes(dtype) -> int:
  return 32 // jnp.dtype(dtype).itemsize  # 8 for 32-bit, 16 for 16-bit, 32 for 8-bit.


def static_validate_inputs(q, cache, table) -> None:
  """Raises NotImplementedError for inputs this kernel does not tile (the dispatcher then tries
  the next implementation), naming what is needed."""
  if not isinstance(cache, cache_lib.KVCache):
    raise NotImplementedError("pallas_tpu reads a paged KVCache, not contiguous K/V")
  cfg = cache.config
  if cfg.head_dim % LANES:
    raise NotImplementedError(
        f"pallas_tpu needs head_dim a multiple of {LANES}, got {cfg.head_dim}")
  for pool in cache.pools:
    if pool.num_pages == 0:
      continue
    tile = _sublanes(pool.k.dtype)
    if cfg.page_size % tile:
      raise NotImplementedError(
          f"pallas_tpu needs page_size a multiple of {tile} for the {pool.precision.name} pool"
          f" ({pool.k.dtype}), got {cfg.page_size}")
    if pool.precision == Precision.INT4 and (cfg.head_dim // 2) % LANES:
      raise NotImplementedError(
          f"pallas_tpu reads INT4 pages ({cfg.head_dim // 2} bytes a token) only when head_dim is"
          f" a multiple of {2 * LANES}, got {cfg.head_dim}")
  if q.dtype not in (jnp.bfloat16, jnp.float32):
    raise NotImplementedError(f"pallas_tpu computes in bfloat16 or float32, not {q.dtype}")


def prepare(q, cache, table: PageTable, q_positions, pages_per_block: int):
  """The kernel's inputs besides the pools.

  Returns:
    bounds i32[batch, 8]: blocks bounds[p] .. bounds[p+1] hold Precision p's pages;
    run_ends i32[batch, 8]: entries of Precision p's run at or past run_ends[p] are padding;
    slots i32[batch, blocks * pages_per_block]: pool slot of each entry (0 for padding);
    positions i32[batch, blocks, pages_per_block * page_size]: each key's position, NEVER where
      the token is not selected or the entry is padding;
    q_rows [batch, kv_heads, rows, head_dim]: query rows (`splits.query_rows`), padded;
    row_positions i32[batch, rows, 1]: each row's query position (-1 for padding rows).
  """
  cfg = cache.config
  batch, q_len, num_q_heads, head_dim = q.shape
  group = num_q_heads // cfg.num_kv_heads
  used_rows = group * q_len
  rows = math.ceil(used_rows / 16) * 16
  q_rows = splits.query_rows(q, cfg.num_kv_heads, rows)
  row_positions = splits.row_positions(q_positions, group, rows)[..., None]

  # Counting sort by stored precision, each precision's run padded to whole blocks.
  pools, slots = cache_lib.lookup(cache, table)
  key = jnp.where(pools == cache_lib.UNMAPPED, NUM_PRECISIONS, pools)
  one_hot = key[..., None] == jnp.arange(NUM_PRECISIONS)
  counts = jnp.sum(one_hot, axis=1, dtype=jnp.int32)  # [batch, precisions]
  padded = (counts + pages_per_block - 1) // pages_per_block * pages_per_block
  starts = jnp.cumsum(padded, axis=1) - padded
  rank = jnp.sum(jnp.where(one_hot, jnp.cumsum(one_hot, axis=1) - 1, 0), axis=2)
  capacity = (math.ceil(table.max_pages / pages_per_block) + NUM_PRECISIONS) * pages_per_block
  start_of = jnp.take_along_axis(starts, jnp.minimum(key, NUM_PRECISIONS - 1), axis=1)
  dest = jnp.where(key < NUM_PRECISIONS, start_of + rank, capacity)  # Out of range: dropped.
  rows_index = jnp.arange(batch)[:, None]
  sorted_slots = jnp.zeros((batch, capacity), jnp.int32).at[rows_index, dest].set(
      jnp.maximum(slots, 0), mode="drop")
  token_positions = jnp.where(table.page_token_mask(), table.token_positions(), NEVER)
  sorted_positions = jnp.full((batch, capacity, cfg.page_size), NEVER, jnp.int32)
  sorted_positions = sorted_positions.at[rows_index, dest].set(token_positions, mode="drop")
  blocks = capacity // pages_per_block
  positions = sorted_positions.reshape(batch, blocks, pages_per_block * cfg.page_size)
  block_bounds = jnp.concatenate([starts, jnp.sum(padded, axis=1, keepdims=True)], axis=1)
  bounds = jnp.pad(block_bounds // pages_per_block, ((0, 0), (0, _BOUNDS - NUM_PRECISIONS - 1)))
  run_ends = jnp.pad(starts + counts, ((0, 0), (0, _BOUNDS - NUM_PRECISIONS)))
  return bounds, run_ends, sorted_slots, positions, q_rows, row_positions


def _kernel(bounds_ref, run_ends_ref, slots_ref, q_ref, q_pos_ref, positions_ref, *refs, precisions,
            num_pool_refs, pages_per_block, num_splits, scale, softcap):
  pool_refs, (m_ref, l_ref, acc_ref), scratch = (refs[:num_pool_refs],
                                                 refs[num_pool_refs:num_pool_refs + 3],
                                                 refs[num_pool_refs + 3:])
  b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows, head_dim = q_ref.shape
  half = head_dim // 2
  keys = positions_ref.shape[-1]
  total = bounds_ref[b, NUM_PRECISIONS]
  share = jax.lax.div(total + num_splits - 1, num_splits)  # Non-negative: no sign fix-up.
  start = split * share
  stop = jnp.minimum(start + share, total)
  q = q_ref[...]
  q_pos = q_pos_ref[...]  # [rows, 1]
  nt_dot = lambda x, y: jax.lax.dot_general(x, y, (((1,), (1,)), ((), ())),
                                            preferred_element_type=jnp.float32)
  nn_dot = lambda x, y: jax.lax.dot_general(x, y, (((1,), (0,)), ((), ())),
                                            preferred_element_type=jnp.float32)

  def copies(pool, buffers, block, slot, run_end):
    """(is the entry real, its DMAs) bringing block `block`'s pages into buffer `slot`; padding
    entries move nothing."""
    out = []
    for i in range(pages_per_block):
      entry = block * pages_per_block + i
      page = slots_ref[b, entry]
      out.append((entry < run_end, [
          pltpu.make_async_copy(pool[name].at[h, page], buffers[name].at[slot, i],
                                buffers["sem"].at[slot]) for name in pool]))
    return out

  def run(dmas, action):
    for real, group in dmas:
      @pl.when(real)
      def _(group=group):
        for dma in group:
          getattr(dma, action)()

  def attend(precision, buffers, slot, block, carry):
    m_prev, l_prev, acc = carry
    k = buffers["k"][slot]  # [pages_per_block, page_size, stored_dim]
    if precision == Precision.INT4:
      k_scale = buffers["k_scale"][slot][:, None, :]
      low, high = (x.astype(jnp.float32) for x in quant.int4_nibbles(k))
      low = (low * k_scale[..., :half]).reshape(keys, half).astype(q.dtype)
      high = (high * k_scale[..., half:]).reshape(keys, half).astype(q.dtype)
      logits = nt_dot(q[:, :half], low) + nt_dot(q[:, half:], high)
    else:
      if precision != Precision.BF16:
        k = k.astype(jnp.float32) * buffers["k_scale"][slot][:, None, :]
      logits = nt_dot(q, k.reshape(keys, head_dim).astype(q.dtype))
    logits = logits * scale
    if softcap is not None:
      logits = softcap * jnp.tanh(logits / softcap)
    visible = positions_ref[pl.ds(block, 1), :] <= q_pos  # [rows, keys]
    logits = jnp.where(visible, logits, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
    correction = jnp.exp(m_prev - m_next)
    weights = jnp.where(visible, jnp.exp(logits - m_next), 0.0)
    l_next = l_prev * correction + jnp.sum(weights, axis=1, keepdims=True)
    weights = weights.astype(q.dtype)
    v = buffers["v"][slot]
    if precision == Precision.BF16:
      update = nn_dot(weights, v.reshape(keys, head_dim).astype(q.dtype))
    else:
      v_scale = buffers["v_scale"][slot][:, :, None]  # One per token.
      if precision == Precision.INT4:
        low, high = (x.astype(jnp.float32) * v_scale for x in quant.int4_nibbles(v))
        update = jnp.concatenate(
            [nn_dot(weights, low.reshape(keys, half).astype(q.dtype)),
             nn_dot(weights, high.reshape(keys, half).astype(q.dtype))], axis=1)
      else:
        v = (v.astype(jnp.float32) * v_scale).reshape(keys, head_dim).astype(q.dtype)
        update = nn_dot(weights, v)
    return m_next, l_next, acc * correction + update

  carry = (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
           jnp.zeros((rows, head_dim), jnp.float32))
  pool_position = scratch_position = 0  # Pools and buffers come flat, in precision order.
  for precision in precisions:
    names = ("k", "v") if precision == Precision.BF16 else ("k", "v", "k_scale", "v_scale")
    pool = dict(zip(names, pool_refs[pool_position:pool_position + len(names)]))
    buffers = dict(zip(names + ("sem",),
                       scratch[scratch_position:scratch_position + len(names) + 1]))
    pool_position += len(names)
    scratch_position += len(names) + 1
    first = jnp.maximum(start, bounds_ref[b, int(precision)])
    last = jnp.minimum(stop, bounds_ref[b, int(precision) + 1])
    run_end = run_ends_ref[b, int(precision)]
    # Padding entries leave their buffer rows as they were: start them at zero, so that a masked
    # key (weight 0) never meets a NaN.
    for name in pool:
      buffers[name][...] = jnp.zeros(buffers[name].shape, buffers[name].dtype)

    @pl.when(first < last)
    def _():
      run(copies(pool, buffers, first, 0, run_end), "start")

    def body(i, carry, pool=pool, buffers=buffers, first=first, last=last, precision=precision,
             run_end=run_end):
      block, slot = first + i, i % 2

      @pl.when(block + 1 < last)
      def _():
        run(copies(pool, buffers, block + 1, 1 - slot, run_end), "start")

      run(copies(pool, buffers, block, slot, run_end), "wait")
      return attend(precision, buffers, slot, block, carry)

    carry = jax.lax.fori_loop(0, jnp.maximum(last - first, 0), body, carry)
  m, l, acc = carry
  m_ref[...] = m
  l_ref[...] = l
  acc_ref[...] = acc


def selected_page_decode(q, cache: cache_lib.KVCache, table: PageTable, *, q_positions=None,
                         sinks=None, scale=None, softcap=None, return_lse: bool = False,
                         interpret: bool = False,
                         num_splits: int | None = None,
                         pages_per_block: int | None = None):
  """Decode attention of q over the table's tokens, read from the paged cache, on TPU.

  Args:
    q: [batch, q_len, num_q_heads, head_dim], batch = cache max_seqs, q_len 1..8.
    cache: KVCache; pages are read in the precision they are stored in.
    table: PageTable routed for the cache's lengths.
    q_positions: i32[batch, q_len]; default the last q_len positions of each sequence.
    sinks: optional f32[num_q_heads]; scale: default 1/sqrt(head_dim); softcap: optional.
    return_lse: also return the rows' log-sum-exp f32[batch, q_len, num_q_heads] (see
      `reference.attention`).
    interpret: run in Pallas's TPU interpret mode (CPU tests).
    num_splits: splits per sequence; default from the shape (tuned_block_sizes).
    pages_per_block: pages per DMA block; default from tuned_block_sizes.

  Returns:
    [batch, q_len, num_q_heads, head_dim] in q.dtype; zeros where nothing is visible. With
    return_lse, the output in float32 and its log-sum-exp (as `reference.attention`).
  """
  static_validate_inputs(q, cache, table)
  cfg = cache.config
  batch, q_len = q.shape[:2]
  pages_per_block = pages_per_block or tuned_block_sizes.tpu_pages_per_block(cfg.page_size)
  num_splits = num_splits or tuned_block_sizes.tpu_num_splits(batch, cfg.num_kv_heads)
  if q_positions is None:
    q_positions = table.query_positions(q_len)
  bounds, run_ends, slots, positions, q_rows, row_positions = prepare(
      q, cache, table, q_positions, pages_per_block)
  rows, head_dim = q_rows.shape[2:]
  blocks, keys = positions.shape[1:]
  present = [pool for pool in cache.pools if pool.num_pages > 0]

  pool_arrays, scratch = [], []
  for pool in present:
    arrays = [pool.k, pool.v]
    page = pool.k.shape[2:]
    buffers = [pltpu.VMEM((2, pages_per_block) + page, pool.k.dtype),
               pltpu.VMEM((2, pages_per_block) + page, pool.v.dtype)]
    if pool.precision != Precision.BF16:
      arrays += [pool.k_scale, pool.v_scale]
      buffers += [pltpu.VMEM((2, pages_per_block, head_dim), jnp.float32),
                  pltpu.VMEM((2, pages_per_block, cfg.page_size), jnp.float32)]
    pool_arrays += arrays
    scratch += buffers + [pltpu.SemaphoreType.DMA((2,))]

  grid = (batch, cfg.num_kv_heads, num_splits)
  out_block = lambda *tail: pl.BlockSpec((None, None, None) + tail,
                                         lambda b, h, s, *_: (b, h, s) + (0,) * len(tail))
  out_shape = lambda *tail: jax.ShapeDtypeStruct(grid + tail, jnp.float32)
  kernel = functools.partial(
      _kernel, precisions=tuple(pool.precision for pool in present),
      num_pool_refs=len(pool_arrays), pages_per_block=pages_per_block, num_splits=num_splits,
      scale=float(head_dim**-0.5 if scale is None else scale),
      softcap=None if softcap is None else float(softcap))
  m, l, acc = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=grid,
          in_specs=[
              pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s, *_: (b, h, 0, 0)),
              pl.BlockSpec((None, rows, 1), lambda b, h, s, *_: (b, 0, 0)),
              pl.BlockSpec((None, blocks, keys), lambda b, h, s, *_: (b, 0, 0)),
          ] + [pl.BlockSpec(memory_space=pl.ANY)] * len(pool_arrays),
          out_specs=[out_block(rows, 1), out_block(rows, 1), out_block(rows, head_dim)],
          scratch_shapes=scratch,
      ),
      out_shape=[out_shape(rows, 1), out_shape(rows, 1), out_shape(rows, head_dim)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="selected_page_decode_tpu",
  )(bounds, run_ends, slots, q_rows, row_positions, positions, *pool_arrays)
  out = splits.combine((m[..., 0], l[..., 0], acc), q.shape,
                       sinks=sinks, return_lse=return_lse)
  return out if return_lse else out.astype(q.dtype)
