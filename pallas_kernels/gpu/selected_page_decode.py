"""Selected-page decode attention on GPU, in Pallas (Triton backend): implementation "pallas_gpu".

Reference: `intent_jax.reference.paged_attention`, the answer this must match.

Work: one program per (sequence, kv head, split). The wrapper packs each sequence's table entries
(pool slot, page id, token bits) into one array, grouped by the precision their page is stored in
(a counting sort; none when the cache stores one format), and with a single query token clears
the bits past its position, so keys are masked by bits alone. A program takes its split's share
of the entries and runs one loop per precision, each over blocks of `pages_per_block` pages:
gather the pages' K and V from that precision's pool, dequantize in registers (INT4 nibbles,
FP8/INT8 codes times their scales), and attend every query row of the kv head at once (GQA
packing: a page is read once per kv head) with an online softmax. INT4 pages are unpacked as the
two halves of the channels (their storage layout) into two half-width accumulators, added to the
full-width one after the kernel, so no path slices registers. Splits (flash-decoding) are
combined by log-sum-exp after the kernel (`combine_splits`, one launch), where the sink logits
join the denominator.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from intent_jax import cache as cache_lib
from intent_jax import quant
from intent_jax.precision import NUM_PRECISIONS, Precision
from intent_jax.page_table import BITS_PER_WORD, PageTable
from pallas_kernels import splits
from pallas_kernels import tuned_block_sizes
from pallas_kernels.gpu import combine_splits
from pallas_kernels.splits import MASK_VALUE

MIN_ROWS = 16  # Triton's smallest matmul tile.
_BOUNDS = 8  # bounds[b] holds NUM_PRECISIONS + 1 = 5 offsets, padded to a power of two.
_SLOT, _PAGE, _BITS = 0, 1, 2  # Columns of the entries array: pool slot, page id, token bits.


def static_validate_inputs(q, cache, table) -> None:
  """Raises NotImplementedError for inputs this kernel does not handle (the dispatcher then tries
  the next implementation). Shapes were checked by `decode_attention`."""
  if not isinstance(cache, cache_lib.KVCache):
    raise NotImplementedError("pallas_gpu reads a paged KVCache, not contiguous K/V")
  head_dim = cache.config.head_dim
  if head_dim < 32 or head_dim & (head_dim - 1):
    raise NotImplementedError(f"pallas_gpu needs head_dim a power of two >= 32, got {head_dim}")
  if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise NotImplementedError(f"pallas_gpu computes in bfloat16, float16 or float32, not {q.dtype}")
  if table.page_size not in tuned_block_sizes.GPU_DECODE_PAGE_SIZES:
    raise NotImplementedError(f"no block sizes for page_size {table.page_size}")


def _token_mask(words, page_size: int):
  """i32[pages, words] of token bits -> bool[pages, page_size]."""
  if page_size <= BITS_PER_WORD:
    return ((words >> jnp.arange(page_size, dtype=jnp.int32)[None, :]) & 1) == 1
  bits = (words[:, :, None] >> jnp.arange(BITS_PER_WORD, dtype=jnp.int32)[None, None, :]) & 1
  return bits.reshape(words.shape[0], page_size) == 1


def _kernel(*refs, precisions, num_pool_refs, pages_per_block, page_size, num_splits, scale,
            softcap, compute_dtype, row_positions):
  bounds_ref, entries_ref, q_ref = refs[:3]
  q_pos_ref = refs[3] if row_positions else None
  refs = refs[4 if row_positions else 3:]
  pool_refs = refs[:num_pool_refs]  # Then, when poisoned, the aliased output buffers.
  with_int4 = Precision.INT4 in precisions
  out_refs = refs[-5:] if with_int4 else refs[-3:]
  rows, head_dim = q_ref.shape
  capacity, columns = entries_ref.shape
  half = head_dim // 2
  keys = pages_per_block * page_size
  exact = compute_dtype == jnp.float32
  dot = functools.partial(plgpu.dot, allow_tf32=False if exact else None)

  total = bounds_ref[NUM_PRECISIONS]
  share = (total + num_splits - 1) // num_splits
  start = pl.program_id(2) * share
  stop = jnp.minimum(start + share, total)
  q = q_ref[...]

  def block(first, last, pool, it, carry):
    m_prev, l_prev, acc, halves = carry
    precision = pool["precision"]
    # The block's table entries are contiguous: plain vector loads. The last block of the table
    # is loaded from capacity - pages_per_block on; entries before block_start are not its own.
    block_start = first + it * pages_per_block
    at = jnp.minimum(block_start, capacity - pages_per_block)
    entries = pl.ds(at, pages_per_block)
    index = at + jnp.arange(pages_per_block)
    live = (index >= block_start) & (index < last)
    slot = jnp.where(live, entries_ref[entries, _SLOT], 0)
    bits = entries_ref[entries, pl.ds(_BITS, columns - _BITS)]
    visible = (_token_mask(bits, page_size) & live[:, None]).reshape(1, keys)
    if row_positions:  # Several query tokens: each row sees the keys up to its own position.
      positions = (entries_ref[entries, _PAGE][:, None] * page_size +
                   jnp.arange(page_size, dtype=jnp.int32)[None, :]).reshape(keys)
      visible = visible & (positions[None, :] <= q_pos_ref[...][:, None])

    if precision == Precision.INT4:  # Low nibbles are channels [0, half), high the rest.
      k_low, k_high = (x.astype(jnp.float32) for x in quant.int4_nibbles(pool["k"][slot]))
      k_low = k_low * pool["k_scale"][slot, pl.ds(0, half)][:, None, :]
      k_high = k_high * pool["k_scale"][slot, pl.ds(half, half)][:, None, :]
      as_keys = lambda x: x.reshape(keys, half).astype(compute_dtype)
      logits = (dot(q_ref[:, pl.ds(0, half)], as_keys(k_low), trans_b=True) +
                dot(q_ref[:, pl.ds(half, half)], as_keys(k_high), trans_b=True))
    else:
      k = pool["k"][slot]
      if precision != Precision.BF16:
        k = k.astype(jnp.float32) * pool["k_scale"][slot][:, None, :]
      logits = dot(q, k.reshape(keys, head_dim).astype(compute_dtype), trans_b=True)
    logits = logits.astype(jnp.float32) * scale
    if softcap is not None:
      logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(visible, logits, MASK_VALUE)

    m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1))
    correction = jnp.exp(m_prev - m_next)
    # Masked logits underflow to weight 0 against any visible maximum; a row that has seen
    # nothing yet subtracts 0 instead, so its masked keys weigh exp(MASK_VALUE) = 0 too.
    seen = jnp.where(m_next == MASK_VALUE, 0.0, m_next)
    weights = jnp.exp(logits - seen[:, None])
    l_next = l_prev * correction + jnp.sum(weights, axis=1)
    if precision != Precision.BF16:
      weights = weights * pool["v_scale"][slot].reshape(keys)[None, :]  # V's scale per token.
    weights = weights.astype(compute_dtype)
    acc = acc * correction[:, None]
    halves = tuple(h * correction[:, None] for h in halves)
    if precision == Precision.INT4:
      v_low, v_high = (x.astype(compute_dtype).reshape(keys, half)
                       for x in quant.int4_nibbles(pool["v"][slot]))
      halves = (halves[0] + dot(weights, v_low), halves[1] + dot(weights, v_high))
    else:
      acc = acc + dot(weights, pool["v"][slot].reshape(keys, head_dim).astype(compute_dtype))
    return m_next, l_next, acc.astype(jnp.float32), tuple(h.astype(jnp.float32) for h in halves)

  carry = (jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32),
           jnp.zeros((rows, head_dim), jnp.float32),
           tuple(jnp.zeros((rows, half), jnp.float32) for _ in range(2 if with_int4 else 0)))
  position = 0
  for precision in precisions:
    pool = dict(precision=precision, k=pool_refs[position], v=pool_refs[position + 1])
    position += 2
    if precision != Precision.BF16:
      pool.update(k_scale=pool_refs[position], v_scale=pool_refs[position + 1])
      position += 2
    first = jnp.maximum(start, bounds_ref[int(precision)])
    last = jnp.minimum(stop, bounds_ref[int(precision) + 1])
    steps = (jnp.maximum(last - first, 0) + pages_per_block - 1) // pages_per_block
    carry = jax.lax.fori_loop(0, steps, functools.partial(block, first, last, pool), carry)
  m, l, acc, halves = carry
  for ref, value in zip(out_refs, (m, l, acc) + halves):
    ref[...] = value


def _visible_bits(table, mapped, q_positions):
  """i32[batch, max_pages, words]: the table's token bits, cleared on unmapped entries and, for a
  single query token, past its position (so the kernel masks keys by these bits alone)."""
  bits = jnp.where(mapped[:, :, None], table.token_bits, 0)
  if q_positions.shape[1] == 1:
    first_token = (table.page_ids[:, :, None] * table.page_size +
                   BITS_PER_WORD * jnp.arange(bits.shape[2], dtype=jnp.int32))
    count = jnp.clip(q_positions[:, :, None] + 1 - first_token, 0, BITS_PER_WORD)
    low_bits = jnp.where(count >= BITS_PER_WORD, jnp.uint32(0xFFFFFFFF),
                         (jnp.uint32(1) << count.astype(jnp.uint32)) - 1)
    bits = bits & low_bits
  return jax.lax.bitcast_convert_type(bits, jnp.int32)


def _by_precision(key, entries):
  """Entries grouped by key (stable), by counting: (grouped entries, bounds i32[batch, 8]) where
  group p is entries bounds[p] .. bounds[p+1]. key: i32[batch, n] in 0..NUM_PRECISIONS."""
  groups = jnp.arange(NUM_PRECISIONS + 1)
  below = jnp.sum(key[:, :, None] < groups, axis=1, dtype=jnp.int32)  # Where each group starts.
  rank = jnp.cumsum(key[:, :, None] == groups, axis=1, dtype=jnp.int32) - 1
  order = (jnp.take_along_axis(below, key, axis=1) +
           jnp.take_along_axis(rank, key[:, :, None], axis=2)[:, :, 0])
  rows = jnp.arange(key.shape[0])[:, None]
  grouped = jnp.zeros_like(entries).at[rows, order].set(entries, unique_indices=True)
  return grouped, jnp.pad(below, ((0, 0), (0, _BOUNDS - NUM_PRECISIONS - 1)))


def _entries(cache, table, q_positions, min_entries: int):
  """The table's entries for the kernel: (bounds i32[batch, 8], entries i32[batch, n, 2 + words])
  with columns (slot, page id, token bits (`_visible_bits`)...), grouped by stored precision
  when the cache holds more than one: entries bounds[p] .. bounds[p+1] are stored in Precision p.
  n is the table's width, padded to at least `min_entries`.
  """
  pools, slots = cache_lib.lookup(cache, table)
  mapped = pools != cache_lib.UNMAPPED
  entries = jnp.concatenate([jnp.maximum(slots, 0)[:, :, None], table.page_ids[:, :, None],
                             _visible_bits(table, mapped, q_positions)], axis=2)
  stored = cache_lib.stored_precisions(cache)
  if len(stored) == 1:  # Nothing to group; unmapped entries are masked by their bits.
    in_table = jnp.minimum(table.num_pages, table.max_pages)[:, None]
    groups = jnp.arange(_BOUNDS)
    bounds = jnp.where((groups > int(stored[0])) & (groups <= NUM_PRECISIONS), in_table, 0)
  else:
    entries, bounds = _by_precision(jnp.where(mapped, pools, NUM_PRECISIONS), entries)
  pad = max(0, min_entries - table.max_pages)
  return bounds, jnp.pad(entries, ((0, 0), (0, pad), (0, 0)))


def selected_page_decode(q, cache: cache_lib.KVCache, table: PageTable, *, q_positions=None,
                         sinks=None, scale=None, softcap=None, return_lse: bool = False,
                         interpret: bool = False,
                         num_splits: int | None = None, poison: bool = False,
                         blocks: tuned_block_sizes.GpuDecodeBlocks | None = None):
  """Decode attention of q over the table's tokens, read from the paged cache.

  Args:
    q: [batch, q_len, num_q_heads, head_dim], batch = cache max_seqs, q_len 1..8.
    cache: KVCache; pages are read in the precision they are stored in.
    table: PageTable routed for the cache's lengths.
    q_positions: i32[batch, q_len]; default the last q_len positions of each sequence.
    sinks: optional f32[num_q_heads]; scale: default 1/sqrt(head_dim); softcap: optional.
    return_lse: also return the rows' log-sum-exp f32[batch, q_len, num_q_heads] (see
      `reference.attention`).
    interpret: run the kernel in Pallas interpret mode (CPU tests).
    num_splits: splits per sequence; default from the shape (tuned_block_sizes).
    poison: start the kernel's outputs as NaN (aliased buffers), so a block it fails to write
      shows in the result; for checks on the GPU.
    blocks: tiling; default from tuned_block_sizes for the page size.

  Returns:
    [batch, q_len, num_q_heads, head_dim] in q.dtype; zeros where nothing is visible. With
    return_lse, the output in float32 and its log-sum-exp (as `reference.attention`).
  """
  static_validate_inputs(q, cache, table)
  blocks = blocks or tuned_block_sizes.gpu_decode_blocks(
      table.page_size, quantized=cache_lib.stored_precisions(cache) != (Precision.BF16,))
  if num_splits is None:
    cores = getattr(jax.devices()[0], "core_count", None) or tuned_block_sizes.GPU_DEFAULT_CORES
    num_splits = tuned_block_sizes.gpu_num_splits(q.shape[0], cache.config.num_kv_heads,
                                                  table.max_pages, blocks.pages_per_block, cores)
  if q_positions is None:
    q_positions = table.query_positions(q.shape[1])
  inputs = prepare(q, cache, table, q_positions, blocks.pages_per_block)
  partials = run_kernel(inputs, cache, num_splits=num_splits, blocks=blocks, poison=poison,
                        interpret=interpret, compute_dtype=q.dtype,
                        scale=q.shape[-1]**-0.5 if scale is None else scale, softcap=softcap)
  return combine_splits.combine_splits(partials, q.shape, sinks=sinks, return_lse=return_lse,
                                       out_dtype=q.dtype, interpret=interpret)


def padded_rows(used_rows: int) -> int:
  """Query rows of a kv head padded to a matmul tile."""
  return max(MIN_ROWS, splits.next_power_of_two(used_rows))


def query_rows(q, num_kv_heads: int):
  """`splits.query_rows` padded to a matmul tile: (q rows, rows used)."""
  used_rows = q.shape[1] * q.shape[2] // num_kv_heads
  return splits.query_rows(q, num_kv_heads, padded_rows(used_rows)), used_rows


def prepare(q, cache, table, q_positions, pages_per_block):
  """The kernel's inputs besides the pools: (bounds, entries, q rows[, row positions]).

  Query rows of a kv head are (query token, query head in the group), padded for the matmul;
  row positions (i32[batch, rows], row t * group + g -> token t) only for several query tokens.
  """
  group = q.shape[2] // cache.config.num_kv_heads
  q_rows, _ = query_rows(q, cache.config.num_kv_heads)
  inputs = _entries(cache, table, q_positions, pages_per_block) + (q_rows,)
  if q.shape[1] == 1:
    return inputs
  return inputs + (splits.row_positions(q_positions, group, q_rows.shape[2]),)


def run_kernel(inputs, cache, *, num_splits, blocks, poison, interpret, compute_dtype, scale,
               softcap):
  """The pallas_call: per (sequence, kv head, split), f32 (m, l, acc[, acc_low, acc_high])."""
  bounds, entries, q_rows = inputs[:3]
  row_positions = len(inputs) == 4
  batch, num_kv_heads, rows, head_dim = q_rows.shape
  half = head_dim // 2
  present = [pool for pool in cache.pools if pool.num_pages > 0]
  with_int4 = any(pool.precision == Precision.INT4 for pool in present)

  per_seq = lambda *tail: pl.BlockSpec((None,) + tail, lambda b, h, s: (b,) + (0,) * len(tail))
  per_pool = lambda x: pl.BlockSpec((None,) + x.shape[1:],
                                    lambda b, h, s: (h,) + (0,) * (x.ndim - 1))
  in_specs = [per_seq(_BOUNDS), per_seq(*entries.shape[1:]),
              pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0))]
  in_specs += [per_seq(rows)] if row_positions else []
  arrays = list(inputs)
  for pool in present:
    pool_arrays = [pool.k, pool.v]
    if pool.precision != Precision.BF16:
      pool_arrays += [pool.k_scale, pool.v_scale]
    arrays += pool_arrays
    in_specs += [per_pool(x) for x in pool_arrays]
  num_pool_refs = len(arrays) - len(inputs)
  out_block = lambda *tail: pl.BlockSpec((None, None, None) + tail,
                                         lambda b, h, s: (b, h, s) + (0,) * len(tail))
  tails = [(rows,), (rows,), (rows, head_dim)] + [(rows, half)] * (2 if with_int4 else 0)
  out_specs = [out_block(*t) for t in tails]
  outputs = [jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits) + t, jnp.float32)
             for t in tails]
  aliases = {}
  if poison:
    aliases = {len(arrays) + i: i for i in range(len(outputs))}
    arrays += [jnp.full(o.shape, jnp.nan, o.dtype) for o in outputs]
    in_specs += out_specs
  kernel = functools.partial(
      _kernel, precisions=tuple(pool.precision for pool in present), num_pool_refs=num_pool_refs,
      pages_per_block=blocks.pages_per_block, page_size=cache.config.page_size,
      num_splits=num_splits, scale=float(scale),
      softcap=None if softcap is None else float(softcap), compute_dtype=compute_dtype,
      row_positions=row_positions)
  return pl.pallas_call(
      kernel,
      grid=(batch, num_kv_heads, num_splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=outputs,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                           num_stages=blocks.num_stages),
      interpret=interpret,
      name="selected_page_decode",
  )(*arrays)
