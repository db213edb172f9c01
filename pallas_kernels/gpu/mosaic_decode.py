"""Selected-page decode attention on Hopper in Pallas Mosaic GPU ("pallas_mosaic_gpu").

Reference: `intent_jax.reference.paged_attention`, the answer this must match.

Work: one CUDA block per (sequence, kv head, split), three warpgroups (warp specialization).
Each split reads a window of the program's entries (`program_entries`: each entry's pool slot,
its page's first position and its token bits). With one pool (BF16, which every cache has) the
entries are the table's, in table order, and each split finds its window from the table's page
count (`table_split`), so the wrapper does no per-split work; with several, the wrapper groups
each split's entries by the pool their page is stored in, each group in whole blocks, so a
block is of one format and each warpgroup runs one branch-free loop per pool.
Two memory warpgroups, one for K and one for V (the V warpgroup also copies K's page scales of
quantized blocks and, with quantized pools, V's scales of every block), copy the window into
shared memory and fill a ring of `stages` BF16 buffers of `pages_per_block` pages each,
refilling a buffer as soon as the compute warpgroup releases it: BF16 pages by TMA, one copy per
page, straight into the ring; quantized pages (FP8, INT8, INT4) by TMA into `code_stages` code
buffers with K's scales, then converted in registers (K times its scale per channel of the
page; V's codes as they are) and stored into the ring as bfloat16.
The compute warpgroup copies the kv head's query rows from q (GQA packing, token-major) and
multiplies each buffer with the operands swapped: the block's keys are wgmma's 64 (or 128)
rows and the query rows its columns (`query_columns`, 8 to 64), so each thread holds a few
logits however few the query rows are. It masks each key by position (a key's position from
its entry, or NEVER where the table does not attend it, against the row's query position),
keeps an online softmax in registers (the maximum over a block's keys across the four warps, l
as a per-key share summed at the end), multiplies the weights by V's per-token scales (V's
codes went into the ring unscaled), stores them to shared memory as the B operand of the second
product (V transposed times the weights), and writes (m, l, acc) per split; `combine_splits`
merges the splits in one launch (sinks join there), as for the Triton kernel
(`selected_page_decode`).

Scope: caches whose BF16 pool holds bfloat16, bfloat16 queries (1..8 tokens, at most 64 query
rows a kv head), head_dim 64 or 128 (128 where the cache has an INT4 pool), compute capability
9.0. Other inputs raise NotImplementedError, and the dispatcher takes the next implementation
(the Triton kernel). Pallas's GPU interpret mode cannot run this kernel (jax 0.10: no rules for
layout casts or transposed shared-memory operands), so off a GPU its inputs are checked through
a NumPy model of its arithmetic, and the kernel by its lowering.
"""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from intent_jax import cache as cache_lib
from intent_jax import quant
from intent_jax.page_table import BITS_PER_WORD, PageTable
from intent_jax.precision import Precision
from pallas_kernels import splits
from pallas_kernels import tuned_block_sizes
from pallas_kernels.gpu import combine_splits
from pallas_kernels.splits import MASK_VALUE

ROWS = 64  # The most query rows of a kv head: q's buffers (loaded in wgmma's 64-row layout).
NEVER = 2**30  # The position of a key the table does not attend: after every query row.
# Registers a thread: the compute warpgroup takes what the two memory warpgroups give up (three
# warpgroups share 64K registers; the kernel launches with 168 a thread). setmaxnreg waits until
# the registers it asks for are free: 224 / 144 hung on the H100, 232 / 136 runs.
COMPUTE_REGISTERS = 232
MEMORY_REGISTERS = 136
# A program entry's fields, the rows of `program_entries`' array: its pool slot, the position of
# its page's first token, then its page's token bits (32 a word, `PageTable.token_bits`).
SLOT, FIRST_POSITION, WORDS = 0, 1, 2
# Entries a TMA copy of a split's window takes at most (<= 256 a box side; a power of two, which
# `_entry` relies on).
ENTRY_CHUNK = 256
# A window's copy starts at a multiple of 4 entries (16 bytes): the H100 raised an illegal
# instruction for copies from other starts (compute-sanitizer, at the window's copy).
ENTRY_ALIGN = 4
# An INT4 nibble n becomes the bfloat16 128 + (n ^ 8) from exponent bits; minus 136 it is n read
# as a signed nibble (the trick of `quant.int4_nibble_floats`, in 16 bits).
_NIBBLE_BF16_BITS = 0x4308
_NIBBLE_BF16_OFFSET = 136
LOG2E = math.log2(math.e)
# plgpu.load's index argument: required in jax 0.10, deprecated (the ref indexed instead) in 0.11.
_LOAD_INDEX = (((),) if inspect.signature(plgpu.load).parameters["idx"].default is
               inspect.Parameter.empty else ())


def _load(ref, layout, optimized: bool = True):
  """Registers of the whole (indexed) ref in `layout` (`optimized=False`: from a ref without the
  layout's tiling)."""
  return plgpu.load(ref, *_LOAD_INDEX, layout=layout, optimized=optimized)


def _swizzled(width_bytes: int, bits: int):
  """Shared-memory transforms of rows of `width_bytes` (<= 128) of `bits`-bit values: tiles of 8
  rows, swizzled, as TMA writes and wgmma reads them."""
  swizzle = min(128, width_bytes)
  return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def _code_width(precision: Precision, head_dim: int) -> int:
  """Bytes of one token's codes (K or V) of a quantized page."""
  return head_dim // 2 if precision == Precision.INT4 else head_dim


def _split_share(max_pages: int, num_splits: int, pages_per_block: int, num_groups: int) -> int:
  """The most entries a split's window holds: its share of the table in whole blocks, a block
  more for each further pool group, and ENTRY_ALIGN - 1 entries before its first (a window
  starts at a multiple of ENTRY_ALIGN); rounded up to 32 entries, or to whole copies
  (ENTRY_CHUNK) above one copy."""
  blocks = -(-max_pages // (num_splits * pages_per_block)) + num_groups - 1
  entries = blocks * pages_per_block + ENTRY_ALIGN - 1
  unit = 32 if entries <= ENTRY_CHUNK else ENTRY_CHUNK
  return -(-entries // unit) * unit


def _fields(page_size: int) -> int:
  """Fields of a program entry: slot, first position and the page's words of token bits."""
  return WORDS + -(-page_size // BITS_PER_WORD)


def query_columns(rows: int) -> int:
  """wgmma's columns for `rows` query rows of a kv head (query heads per kv head x tokens): a
  power of two >= 8, as many rows as the partials hold for `combine_splits`."""
  return max(8, splits.next_power_of_two(rows))


def _smem_bytes(share: int, pages_per_block: int, page_size: int, head_dim: int, stages: int,
                code_stages: int, quantized, cols: int) -> int:
  """Shared memory of the kernel: q; the query rows as copied, then acc; the weights of a block;
  m, l; the split's entries; the BF16 ring; with quantized pools, V's scales per buffer, a
  block's K scales in bfloat16 and per pool its ring of K and V codes with K's scales. Each
  buffer rounded up to 1 KiB, with the reduction scratch and barriers (the allocator's measured
  use, within 1 KiB)."""
  keys = pages_per_block * page_size
  buffers = [ROWS * head_dim * 2, max(ROWS * head_dim * 2, cols * head_dim * 4), cols * keys * 2,
             cols * 4, cols * 4, _fields(page_size) * share * 4, stages * keys * head_dim * 2,
             stages * keys * head_dim * 2]
  if quantized:
    buffers += [stages * keys * 4, pages_per_block * head_dim * 2]
  for precision in quantized:
    width = _code_width(precision, head_dim)
    buffers += [code_stages * keys * width] * 2 + [code_stages * pages_per_block * head_dim * 4]
  return sum(-(-n // 1024) * 1024 for n in buffers) + 7 * 1024


def table_split(count, split, num_splits: int, pages_per_block: int):
  """(first entry, entries) of split `split` of a sequence whose table has `count` entries, read
  in table order: split s takes entries s * d .. (s + 1) * d, d = ceil(count / (splits *
  pages_per_block)) * pages_per_block. Plain integer arithmetic: the kernel runs it on scalars,
  tests on arrays."""
  per_split = num_splits * pages_per_block
  share = lax.div(count + per_split - 1, per_split) * pages_per_block
  first = jnp.minimum(split * share, count)
  return first, jnp.minimum(count - first, share)


def static_validate_inputs(q, cache, table) -> None:
  """Raises NotImplementedError for inputs this kernel does not handle."""
  if not isinstance(cache, cache_lib.KVCache):
    raise NotImplementedError("pallas_mosaic_gpu reads a paged KVCache")
  if jnp.dtype(cache.config.dtype) != jnp.bfloat16:
    raise NotImplementedError("pallas_mosaic_gpu reads caches whose BF16 pool holds bfloat16")
  if q.dtype != jnp.bfloat16:
    raise NotImplementedError(f"pallas_mosaic_gpu multiplies bfloat16 queries, not {q.dtype}")
  if q.shape[1] * q.shape[2] // cache.config.num_kv_heads > ROWS:
    raise NotImplementedError(
        f"pallas_mosaic_gpu packs at most {ROWS} query rows (query heads per kv head x tokens)")
  if cache.config.max_seq_len >= NEVER:
    raise NotImplementedError(f"pallas_mosaic_gpu holds positions below {NEVER}")
  if cache.config.head_dim not in (64, 128):
    raise NotImplementedError("pallas_mosaic_gpu needs head_dim 64 or 128")
  if Precision.INT4 in cache_lib.stored_precisions(cache) and cache.config.head_dim != 128:
    raise NotImplementedError("pallas_mosaic_gpu reads INT4 pages of head_dim 128 only")
  if table.page_size % 8 or table.page_size > 128:
    raise NotImplementedError("pallas_mosaic_gpu needs a page_size that is a multiple of 8, <= 128")


def _codes_as_bf16(codes, precision: Precision):
  """Registers of FP8 or INT8 codes -> their bfloat16 values (exact: 8-bit codes fit)."""
  if precision == Precision.FP8:  # Hopper converts FP8 to f16 only.
    return codes.astype(jnp.float16).astype(jnp.float32).astype(jnp.bfloat16)
  return codes.astype(jnp.bfloat16)


def _int4_halves_as_bf16(packed):
  """Registers of packed INT4 bytes -> bfloat16 values of (low nibbles, high nibbles): channels
  [0, head_dim / 2) and [head_dim / 2, head_dim) (the storage layout of `quant.pack_int4`)."""
  packed = packed.astype(jnp.int16)

  def as_bf16(nibble):
    biased = lax.bitcast_convert_type(nibble ^ jnp.int16(_NIBBLE_BF16_BITS), jnp.bfloat16)
    return biased - jnp.bfloat16(_NIBBLE_BF16_OFFSET)

  return as_bf16(packed & jnp.int16(0xF)), as_bf16(lax.shift_right_logical(packed, jnp.int16(4)))


def _tanh(x):
  """tanh from one base-2 exponential, exact to about 1e-7 (the kernel's approximate math would
  make jnp.tanh `tanh.approx.f32`, 5e-4 off, which a soft-cap of 30 turns into 1.5% weights)."""
  return 2.0 / (1.0 + jnp.exp2(x * (-2.0 * LOG2E))) - 1.0


def _tile_rows(width: int) -> int:
  """Keys a warpgroup dequantizes at once: 16 bytes of bfloat16 results a thread (1024 values
  over 128 threads), 8 or 16 keys; a cache's pages (powers of two >= 16 tokens) hold whole
  tiles, so a tile never spans two pages."""
  return 1024 // width


def _tile_layout(rows: int, width: int):
  """Registers of a [rows, width] tile of codes or values, rows 8 or 16: warp w holds rows w *
  rows / 4 to (w + 1) * rows / 4, each thread a run of rows * width / 128 values of one row, so
  a vector along the rows or the columns broadcasts to it without a select."""
  return plgpu.Layout.TILED(plgpu.Tiling(((rows, width), (rows // 4, width),
                                          (rows * width // 128,))),
                            warp_dims=(-5,), lane_dims=(-3, -2), vector_dim=-1)


def _store_converted(codes_ref, out_ref, precision: Precision, page_scale_ref=None,
                     page_size: int = 0):
  """Codes [keys, code width] -> out_ref bf16[keys, head_dim], tile by tile (`_tile_rows`):
  the codes' exact bfloat16 values, times their page's channel scales from page_scale_ref
  bf16[pages, head_dim] where given (K; products in bfloat16: the ring holds bfloat16 either
  way); INT4 as its two halves of the channels (low nibbles, then high). Every tile's codes and
  scales are loaded before the first store: the compiler cannot tell the stores from the loads
  apart, so a load after a store would wait for it."""
  keys, width = codes_ref.shape
  head_dim = out_ref.shape[1]
  rows = _tile_rows(width)
  layout = _tile_layout(rows, width)
  halves = 2 if precision == Precision.INT4 else 1
  channels = [pl.ds(c * head_dim // halves, head_dim // halves) for c in range(halves)]
  tiles = [pl.ds(first, rows) for first in range(0, keys, rows)]

  def page_scale(tile, part):
    """The tile's page's scales of `part`, broadcast along the tile's rows."""
    scale = _load(page_scale_ref.at[tile.start // page_size, part], layout.reduce(0))
    return plgpu.layout_cast(lax.broadcast_in_dim(scale, (rows, head_dim // halves), [1]),
                             layout)

  codes = [_load(codes_ref.at[tile], layout) for tile in tiles]
  scales = [[None if page_scale_ref is None else page_scale(tile, part) for part in channels]
            for tile in tiles]
  for tile, tile_codes, tile_scales in zip(tiles, codes, scales):
    values = (_int4_halves_as_bf16(tile_codes) if precision == Precision.INT4 else
              (_codes_as_bf16(tile_codes, precision),))
    for part_values, part, scale in zip(values, channels, tile_scales):
      out_ref[tile, part] = part_values if scale is None else part_values * scale


def _round_k_scales(scale_ref, bf16_scale_ref):
  """K's page scales f32[pages, head_dim] -> bf16_scale_ref, each rounded once by one thread
  rather than in every thread that multiplies by it."""
  bf16_scale_ref[...] = scale_ref[...].astype(jnp.bfloat16)
  plgpu.commit_smem()  # Its warpgroup barrier: every thread's rounded scales stored.


def _entry(entries_smem, field: int, entry):
  """Field `field` of the window's entry `entry` (>= 0), counted from the window's copied start
  (entries_smem: i32[copies, fields, chunk]; chunk ENTRY_CHUNK, a power of two, when copies > 1).
  A shift and a mask split the index: signed // and % took 6 more instructions a read, and the
  warpgroups read 8 to 12 entries a block."""
  chunk = entries_smem.shape[2]
  if entries_smem.shape[0] == 1:
    return entries_smem[0, field, entry]
  return entries_smem[lax.shift_right_logical(entry, chunk.bit_length() - 1), field,
                      entry & (chunk - 1)]


def _key_positions(entries_smem, lag, block, valid, pages_per_block: int, page_size: int):
  """i32[keys] in the layout of the logits' rows: the position of each key of the split's block
  `block` (its entries `lag` after the window's copied start), or NEVER where the table does
  not attend it (its bit is clear, or its entry is at or past `valid`, None: every entry is
  the split's)."""
  keys = pages_per_block * page_size
  key = plgpu.broadcasted_iota(jnp.int32, (keys,), 0, layout=plgpu.Layout.WGMMA.reduce(1))
  page = lax.shift_right_logical(key, page_size.bit_length() - 1)
  offset = key & (page_size - 1)
  first_position = jnp.zeros_like(key)
  word = jnp.zeros_like(key)
  words = _fields(page_size) - WORDS  # Of a page's token bits, 32 a word.
  for p in range(pages_per_block):
    entry = block * pages_per_block + p
    on_page = page == p
    first_position = jnp.where(on_page, _entry(entries_smem, FIRST_POSITION, lag + entry),
                               first_position)
    for w in range(words):
      bits = _entry(entries_smem, WORDS + w, lag + entry)
      if valid is not None:
        bits = jnp.where(entry < valid, bits, 0)
      on_word = on_page if words == 1 else on_page & (lax.shift_right_logical(offset, 5) == w)
      word = jnp.where(on_word, bits, word)
  attended = (lax.shift_right_logical(word, offset & 31) & 1) != 0
  return jnp.where(attended, first_position + offset, NEVER)


def _kernel(q_ref, positions_ref, counts_ref, entries_ref, *refs, q_smem, q_or_acc_smem,
            entries_smem, k_smem, v_smem, p_smem, m_smem, l_smem, codes_smem, q_barrier,
            entries_barrier, k_ready, v_ready, k_free, v_free, k_codes_ready, v_codes_ready,
            k_scales_free, precisions, group, num_splits, max_pages, pages_per_block, page_size,
            stages, code_stages, scale, softcap, k_scale_bf16=None, v_scale_smem=None):
  quantized = [p for p in precisions if p != Precision.BF16]
  v_scale_ref = refs[0] if quantized else None
  pool_refs, (m_out, l_out, acc_out) = refs[1 if quantized else 0:-3], refs[-3:]
  q_stage, acc_smem = q_or_acc_smem
  b, h, s = lax.axis_index("seq"), lax.axis_index("head"), lax.axis_index("split")
  keys = pages_per_block * page_size
  cols = acc_smem.shape[0]  # The query rows, as wgmma's columns.
  copies, _, chunk = entries_smem.shape
  if len(counts_ref.shape) == 1:  # Table order: the split's window from the table's page count.
    first, valid = table_split(jnp.minimum(counts_ref[b], max_pages), s, num_splits,
                               pages_per_block)
    group_blocks = [lax.div(valid + pages_per_block - 1, pages_per_block)]
  else:  # Each split's grouped entries, `copies * chunk` of them.
    first, valid = s * (copies * chunk), None
    group_blocks = [counts_ref[b, s, g] for g in range(len(precisions))]
  lag = first & (ENTRY_ALIGN - 1)  # The window is copied from first - lag.
  steps = functools.reduce(lax.add, group_blocks)

  @pl.when(lax.axis_index("wg") == 0)
  def _compute():
    plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
    q_len = q_ref.shape[1]
    for t in range(q_len):  # Token t's query heads of kv head h: rows t * group onwards.
      plgpu.copy_gmem_to_smem(q_ref.at[b, t, pl.ds(h * group, group)],
                              q_stage.at[pl.ds(t * group, group)], q_barrier)
    row = plgpu.broadcasted_iota(jnp.int32, (cols,), 0, layout=plgpu.Layout.WGMMA.reduce(0))
    row_pos = jnp.full_like(row, -1)  # Padding rows see no key.
    for t in range(q_len):
      position = (positions_ref[b, t] if len(positions_ref.shape) == 2 else
                  positions_ref[b] - (q_len - t))  # `PageTable.query_positions`, one token.
      row_pos = jnp.where((row >= t * group) & (row < (t + 1) * group), position, row_pos)
    plgpu.barrier_wait(q_barrier)
    # Padding rows hold what the staging buffer held: they are masked out of every logit.
    q_smem[...] = _load(q_stage, plgpu.Layout.WGMMA, optimized=False)
    plgpu.commit_smem()
    q_columns = plgpu.transpose_ref(q_smem.at[pl.ds(0, cols)], (1, 0))
    p_columns = plgpu.transpose_ref(p_smem, (1, 0))
    m = plgpu.layout_cast(jnp.full((cols,), MASK_VALUE, jnp.float32),
                          plgpu.Layout.WGMMA.reduce(0))
    # Each key row's share of l (an elementwise sum, no reduction a block), summed at the end.
    l = plgpu.layout_cast(jnp.zeros((keys, cols), jnp.float32), plgpu.Layout.WGMMA)
    acc = plgpu.layout_cast(jnp.zeros((q_smem.shape[1], cols), jnp.float32),
                            plgpu.Layout.WGMMA)
    plgpu.barrier_wait(entries_barrier)

    # Logits and maxima stay unscaled (soft-capped where asked); base2 makes them base-2
    # exponents in the multiply-add that subtracts the row's maximum.
    base2 = LOG2E * (scale if softcap is None else 1.0)
    by_row = lambda x, shape: lax.broadcast_in_dim(x, shape, [0])
    by_column = lambda x, shape: lax.broadcast_in_dim(x, shape, [1])

    def step(i, carry):
      """Block i with the operands swapped: keys are wgmma's rows, query rows its columns."""
      m_prev, l_prev, acc = carry
      buf = lax.rem(i, stages)
      key_pos = _key_positions(entries_smem, lag, i, valid, pages_per_block, page_size)
      plgpu.barrier_wait(k_ready.at[buf])

      def logits_of(acc_ref):
        plgpu.wgmma(acc_ref, k_smem.at[buf], q_columns)
        return acc_ref[...]

      logits = pl.run_scoped(logits_of, plgpu.ACC((keys, cols), jnp.float32))
      plgpu.barrier_arrive(k_free.at[buf])
      if softcap is not None:
        logits = softcap * _tanh(logits * (scale / softcap))
      visible = by_row(key_pos, logits.shape) <= by_column(row_pos, logits.shape)
      logits = jnp.where(visible, logits, MASK_VALUE)
      m_next = jnp.maximum(m_prev, logits.max(axis=0))
      correction = jnp.exp2((m_prev - m_next) * base2)
      # As in the Triton kernel: a row that has seen nothing subtracts 0, so masked keys weigh 0.
      seen = jnp.where(m_next == MASK_VALUE, 0.0, m_next)
      weights = jnp.exp2(logits * base2 - by_column(seen * base2, logits.shape))
      l_next = l_prev * by_column(correction, logits.shape) + weights
      plgpu.barrier_wait(v_ready.at[buf])
      if v_scale_smem is not None:  # V's scale per token joins the weights, not every value.
        weights = weights * by_row(_load(v_scale_smem.at[buf], plgpu.Layout.WGMMA.reduce(1),
                                         optimized=False), logits.shape)
      p_columns[...] = plgpu.layout_cast(weights.astype(jnp.bfloat16),
                                         plgpu.Layout.WGMMA_TRANSPOSED)
      plgpu.commit_smem()

      def attend(acc_ref):
        plgpu.wgmma(acc_ref, plgpu.transpose_ref(v_smem.at[buf], (1, 0)), p_columns)
        return acc_ref[...]

      update = pl.run_scoped(attend, plgpu.ACC(acc.shape, jnp.float32))
      plgpu.barrier_arrive(v_free.at[buf])
      acc = acc * by_column(correction, acc.shape) + update
      return m_next, l_next, acc

    m, l, acc = lax.fori_loop(0, steps, step, (m, l, acc))
    m_smem[...] = m * (base2 / LOG2E)  # Scaled, as `combine_splits` reads it.
    l_smem[...] = l.sum(axis=0)
    plgpu.transpose_ref(acc_smem, (1, 0))[...] = plgpu.layout_cast(
        acc, plgpu.Layout.WGMMA_TRANSPOSED)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(m_smem, m_out.at[b, h, s])
    plgpu.copy_smem_to_gmem(l_smem, l_out.at[b, h, s])
    plgpu.copy_smem_to_gmem(acc_smem, acc_out.at[b, h, s])
    plgpu.wait_smem_to_gmem(0)

  def memory(half):
    """The K warpgroup (half 0: K pages; it copies the split's entries) or the V warpgroup
    (half 1: V pages and, with quantized pools, V's scales of every block; K's page scales of
    quantized blocks)."""
    plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
    ready, free = (k_ready, k_free) if half == 0 else (v_ready, v_free)
    codes_ready = k_codes_ready if half == 0 else v_codes_ready
    ring = k_smem if half == 0 else v_smem
    if half == 0:
      for c in range(copies):
        plgpu.copy_gmem_to_smem(entries_ref.at[b, :, pl.ds(first - lag + c * chunk, chunk)],
                                entries_smem.at[c], entries_barrier)
    plgpu.barrier_wait(entries_barrier)

    def block_slots(i):
      """The pool slots of block i's pages."""
      return [_entry(entries_smem, SLOT, lag + i * pages_per_block + p)
              for p in range(pages_per_block)]

    def gather(pool_ref, buffer, barrier, slots, rows=page_size):
      """One TMA per page: pool_ref[h, slots[p]] -> rows p * rows .. of buffer."""
      for p, slot in enumerate(slots):
        plgpu.copy_gmem_to_smem(pool_ref.at[h, slot], buffer.at[pl.ds(p * rows, rows)], barrier)

    def wait_free(i, buf):
      pl.when(i >= stages)(lambda: plgpu.barrier_wait(free.at[buf]))

    def copy_v_scales(i, buf):
      """V's scales of block i's keys (1 for BF16 pages) into buffer buf of v_scale_smem, beside
      the ring, onto the ring's barrier, for the compute warpgroup."""
      if half == 1 and v_scale_smem is not None:
        plgpu.copy_gmem_to_smem(
            v_scale_ref.at[b, h, pl.ds((first + i * pages_per_block) * page_size, keys)],
            v_scale_smem.at[buf], ready.at[buf])

    def bf16_blocks(first_block, count, pool):
      @pl.loop(0, count)
      def _fetch(j):
        i = first_block + j
        buf = lax.rem(i, stages)
        wait_free(i, buf)
        gather(pool, ring.at[buf], ready.at[buf], block_slots(i))
        copy_v_scales(i, buf)

    def quantized_blocks(first_block, count, precision, pool, k_scale_pool):
      pool_codes = codes_smem[quantized.index(precision)]
      codes, k_scales = pool_codes[half], pool_codes[2]
      barrier_at = lambda barriers, c: barriers.at[quantized.index(precision) * code_stages + c]

      def fetch_codes(j):
        """Block j's codes; the V warpgroup copies K's page scales too (the K warpgroup has more
        to do), once the K warpgroup has rounded the last ones in buffer c (slots read once)."""
        i, c = first_block + j, lax.rem(j, code_stages)
        slots = block_slots(i)
        gather(pool, codes.at[c], barrier_at(codes_ready, c), slots)
        if half == 1:
          pl.when(j >= code_stages)(lambda: plgpu.barrier_wait(barrier_at(k_scales_free, c)))
          gather(k_scale_pool, k_scales.at[c], barrier_at(k_codes_ready, c), slots, rows=1)

      for j in range(code_stages):
        pl.when(j < count)(functools.partial(fetch_codes, j))

      @pl.loop(0, count)
      def _convert(j):
        i, c = first_block + j, lax.rem(j, code_stages)
        buf = lax.rem(i, stages)
        plgpu.barrier_wait(barrier_at(codes_ready, c))
        wait_free(i, buf)
        if half == 0:
          _round_k_scales(k_scales.at[c], k_scale_bf16)
          plgpu.barrier_arrive(barrier_at(k_scales_free, c))
          _store_converted(codes.at[c], ring.at[buf], precision, k_scale_bf16, page_size)
        else:
          copy_v_scales(i, buf)
          _store_converted(codes.at[c], ring.at[buf], precision)  # V's scales: in the weights.
        plgpu.commit_smem()
        for _ in range(pages_per_block):  # As many arrivals as a BF16 block's page copies.
          plgpu.barrier_arrive(ready.at[buf])
        pl.when(j + code_stages < count)(lambda: fetch_codes(j + code_stages))

    first_block = 0
    refs_left = list(pool_refs)
    for g, precision in enumerate(precisions):
      if precision == Precision.BF16:
        bf16_blocks(first_block, group_blocks[g], refs_left[half])
        refs_left = refs_left[2:]
      else:
        quantized_blocks(first_block, group_blocks[g], precision, refs_left[half], refs_left[2])
        refs_left = refs_left[3:]
      first_block = first_block + group_blocks[g]

  pl.when(lax.axis_index("wg") == 1)(lambda: memory(0))
  pl.when(lax.axis_index("wg") == 2)(lambda: memory(1))


def program_entries(cache, table, num_splits: int, pages_per_block: int):
  """The kernel's entries: each table entry's pool slot, first position and token bits.

  With one pool, the table's entries in table order (`table_split` gives each split its window,
  in the kernel). With several, each split's share of the table (split s of a sequence takes
  the entries `table_split` gives it), grouped by the pool (`cache.stored_precisions`) their
  page is stored in, table order within a pool, each group padded to whole blocks of
  `pages_per_block` entries, and split s's at s * share (`_split_share`).

  Returns (entries i32[batch, fields, n] (`_fields`: SLOT, FIRST_POSITION, WORDS...; n = the
  table's entries and one split's share more (one pool) or splits * share), blocks: None (one
  pool) or i32[batch, splits, pools] (each group's block count), groups: None or
  i32[batch, n] (each entry's group)). An entry the table does not attend (past the table,
  unmapped, padding) has slot 0 and no token bits.
  """
  precisions = cache_lib.stored_precisions(cache)
  num_groups = len(precisions)
  pools, slots = cache_lib.lookup(cache, table)
  batch, max_pages = slots.shape
  mapped = pools != cache_lib.UNMAPPED
  words = jnp.where(mapped[:, :, None], lax.bitcast_convert_type(table.token_bits, jnp.int32), 0)
  fields = jnp.concatenate([jnp.maximum(slots, 0)[:, :, None],
                            (table.page_ids * table.page_size)[:, :, None], words], axis=2)
  share = _split_share(max_pages, num_splits, pages_per_block, num_groups)
  if num_groups == 1:
    # Every split's window (copied from a multiple of ENTRY_ALIGN), in rows of 16-byte multiples.
    end = -(-max_pages // ENTRY_ALIGN) * ENTRY_ALIGN + share
    entries = jnp.pad(fields, ((0, 0), (0, end - max_pages), (0, 0)))
    return jnp.moveaxis(entries, 1, 2), None, None
  count = jnp.minimum(table.num_pages, max_pages)
  split_start, split_size = table_split(count[:, None], jnp.arange(num_splits), num_splits,
                                        pages_per_block)
  # Each entry's split (entries past the table in none) and group; unmapped entries are never
  # attended: any group holds them. Split 0's size is every split's share where more than one
  # split holds entries.
  entry = jnp.arange(max_pages)[None, :]
  in_table = entry < count[:, None]
  split = entry // jnp.maximum(split_size[:, :1], 1)
  group = sum(jnp.where(pools == p, g, 0) for g, p in enumerate(precisions))
  # Entries of each group before each entry, [batch, max_pages + 1, groups] (row e: before e):
  # an entry's rank in its (split, group) and the groups' sizes, in table order, no sort.
  one_hot = (group[:, :, None] == jnp.arange(num_groups)) & in_table[:, :, None]
  before = jnp.pad(jnp.cumsum(one_hot, axis=1, dtype=jnp.int32), ((0, 0), (1, 0), (0, 0)))
  at = lambda rows: jnp.take_along_axis(before, rows[:, :, None], axis=1)
  split_before = at(split_start)  # [batch, splits, groups]
  sizes = at(split_start + split_size) - split_before
  blocks = (sizes + pages_per_block - 1) // pages_per_block
  blocks_end = jnp.cumsum(blocks, axis=2)
  of_entry = lambda x: jnp.take_along_axis(  # x[batch, split, group] of each entry.
      x.reshape(batch, -1), jnp.minimum(split, num_splits - 1) * num_groups + group, axis=1)
  rank = jnp.take_along_axis(before[:, :-1], group[:, :, None], axis=2)[:, :, 0] - of_entry(
      split_before)
  target = split * share + of_entry(blocks_end - blocks) * pages_per_block + rank
  target = jnp.where(in_table, target, num_splits * share)  # Past the end: dropped.
  rows = jnp.arange(batch)[:, None, None]
  entries = jnp.zeros((batch, fields.shape[2], num_splits * share), jnp.int32).at[
      rows, jnp.arange(fields.shape[2])[None, :, None], target[:, None, :]].set(
          jnp.moveaxis(fields, 1, 2), mode="drop")
  # Each position's group: the first whose blocks end after it (padding past the last: the last).
  position = jnp.arange(share)
  at_group = jnp.sum(position[None, None, :, None] // pages_per_block >= blocks_end[:, :, None, :],
                     axis=3)  # [batch, splits, share]
  own_group = jnp.minimum(at_group, num_groups - 1)
  return entries, blocks.astype(jnp.int32), own_group.reshape(batch, -1).astype(jnp.int32)


def program_v_scales(cache, entries, groups):
  """V's scale of each program entry's tokens, f32[batch, kv heads, n * page_size], read from
  the entry's pool (1 for BF16 entries); None when the cache holds no quantized page (its one
  pool is BF16: every cache has one). Per-page rows of 4 * page_size bytes are too short for the
  kernel's copies, so the wrapper lays them out in the entries' order."""
  precisions = cache_lib.stored_precisions(cache)
  if all(p == Precision.BF16 for p in precisions):
    return None
  slots = entries[:, SLOT]
  out = 1.0
  for g, precision in enumerate(precisions):
    if precision != Precision.BF16:
      scale = cache.pools[precision].v_scale[:, slots]  # [kv heads, batch, n, page]
      out = jnp.where((groups == g)[None, :, :, None], scale, out)
  out = jnp.moveaxis(jnp.broadcast_to(out, scale.shape), 0, 1)
  return out.reshape(out.shape[:2] + (-1,))


def prepare(q, cache, table, q_positions, num_splits: int, pages_per_block: int):
  """The kernel's inputs besides q and the pools: (positions: q_positions i32[batch, q_len], or
  without them the table's seq_lens i32[batch] (the last q_len positions); counts: the table's
  num_pages i32[batch] (one pool) or each split's group blocks; entries, V scales
  (`program_entries`, `program_v_scales`))."""
  entries, blocks, groups = program_entries(cache, table, num_splits, pages_per_block)
  positions = table.seq_lens if q_positions is None else q_positions.astype(jnp.int32)
  counts = table.num_pages if blocks is None else blocks
  return positions, counts, entries, program_v_scales(cache, entries, groups)


def run_kernel(q, positions, counts, entries, v_scales, cache, *, max_pages: int,
               num_splits: int, pages_per_block: int, stages: int, code_stages: int,
               scale: float, softcap):
  """The Mosaic GPU kernel on q and `prepare`'s inputs for a table of `max_pages` entries: per
  (sequence, kv head, split), f32 (m, l, acc) of the first query rows (`splits.query_rows`),
  `query_columns` of them."""
  batch, q_len, num_q_heads, head_dim = q.shape
  num_kv_heads = cache.config.num_kv_heads
  page_size = cache.config.page_size
  keys = pages_per_block * page_size
  precisions = cache_lib.stored_precisions(cache)
  share = _split_share(max_pages, num_splits, pages_per_block, len(precisions))
  chunk = min(share, ENTRY_CHUNK)
  bf16_tile = _swizzled(head_dim * 2, 16)
  pool_arrays, codes_smem = [], []
  for precision in precisions:
    pool = cache.pools[precision]
    if precision == Precision.BF16:
      pool_arrays += [pool.k, pool.v]
      continue
    pool_arrays += [pool.k, pool.v, pool.k_scale[:, :, None, :]]
    width = _code_width(precision, head_dim)
    codes = lambda: plgpu.SMEM((code_stages, keys, width), quant.STORAGE_DTYPE[precision],
                               transforms=_swizzled(width, 8))
    codes_smem.append((codes(), codes(),
                       plgpu.SMEM((code_stages, pages_per_block, head_dim), jnp.float32)))
  kernel = functools.partial(
      _kernel, precisions=precisions, group=num_q_heads // num_kv_heads, num_splits=num_splits,
      max_pages=max_pages, pages_per_block=pages_per_block, page_size=page_size, stages=stages,
      code_stages=code_stages, scale=float(scale),
      softcap=None if softcap is None else float(softcap))
  cols = query_columns(q_len * num_q_heads // num_kv_heads)
  partial = lambda *tail: jax.ShapeDtypeStruct(
      (batch, num_kv_heads, num_splits, cols) + tail, jnp.float32)
  code_barriers = max(1, len(codes_smem)) * code_stages
  scratch = dict(
      q_smem=plgpu.SMEM((ROWS, head_dim), jnp.bfloat16, transforms=bf16_tile),
      # The query rows as copied (no swizzle), then the partial acc.
      q_or_acc_smem=plgpu.RefUnion(plgpu.SMEM((ROWS, head_dim), jnp.bfloat16),
                                   plgpu.SMEM((cols, head_dim), jnp.float32,
                                              transforms=_swizzled(head_dim * 4, 32))),
      entries_smem=plgpu.SMEM((share // chunk, entries.shape[1], chunk), jnp.int32),
      k_smem=plgpu.SMEM((stages, keys, head_dim), jnp.bfloat16, transforms=bf16_tile),
      v_smem=plgpu.SMEM((stages, keys, head_dim), jnp.bfloat16, transforms=bf16_tile),
      # A block's weights, V's operand: query rows by keys.
      p_smem=plgpu.SMEM((cols, keys), jnp.bfloat16, transforms=_swizzled(keys * 2, 16)),
      m_smem=plgpu.SMEM((cols,), jnp.float32),
      l_smem=plgpu.SMEM((cols,), jnp.float32),
      codes_smem=tuple(codes_smem),
      q_barrier=plgpu.Barrier(num_arrivals=q_len),  # A copy per query token.
      entries_barrier=plgpu.Barrier(num_arrivals=share // chunk),
      # A block's K or V: its page copies (or as many arrivals); V's with its scales' copy.
      k_ready=plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=stages),
      v_ready=plgpu.Barrier(num_arrivals=pages_per_block + bool(codes_smem),
                            num_barriers=stages),
      k_free=plgpu.Barrier(num_barriers=stages),
      v_free=plgpu.Barrier(num_barriers=stages),
      # Per quantized pool and code buffer: K codes with their scales, V codes.
      k_codes_ready=plgpu.Barrier(num_arrivals=2 * pages_per_block, num_barriers=code_barriers),
      v_codes_ready=plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=code_barriers),
      # Per quantized pool and code buffer: the K warpgroup has rounded the K scales in it.
      k_scales_free=plgpu.Barrier(num_barriers=code_barriers),
  )
  if codes_smem:  # A block's K scales, rounded once (`_round_k_scales`); V's, per buffer.
    scratch["k_scale_bf16"] = plgpu.SMEM((pages_per_block, head_dim), jnp.bfloat16)
    scratch["v_scale_smem"] = plgpu.SMEM((stages, keys), jnp.float32)
  call = plgpu.kernel(
      kernel, out_type=(partial(), partial(), partial(head_dim)),
      scratch_types=scratch, grid=(batch, num_kv_heads, num_splits),
      grid_names=("seq", "head", "split"), num_threads=3, thread_name="wg",
      # Without Pallas's barrier before each copy and store (5% at 8 x 128K): no warpgroup writes
      # shared memory it has read, and each reuse of memory read by a warpgroup's threads (a code
      # buffer refilled, the partials copied out) follows a commit_smem, whose warpgroup barrier
      # orders it after every thread's reads; K's scale buffers, refilled by the V warpgroup,
      # after that barrier and the K warpgroup's arrival on k_scales_free. Approximate math: each
      # exponential one ex2.approx (relative error 2**-22; the weights are rounded to bfloat16
      # anyway) instead of a precise expansion of about 8 instructions, a third of the compute
      # warpgroup's. Warpgroup lowering semantics, jax 0.11's default, named so that jax 0.10
      # (whose default is Lane) lowers the same program: the lowering tests on a CPU host then
      # check what the GPU compiles.
      compiler_params=plgpu.CompilerParams(
          unsafe_no_auto_barriers=True, approx_math=True,
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  inputs = (q, positions, counts, entries) + (() if v_scales is None else (v_scales,)) + tuple(
      pool_arrays)
  return call(*inputs)


def mosaic_decode(q, cache: cache_lib.KVCache, table: PageTable, *, q_positions=None,
                  sinks=None, scale=None, softcap=None, return_lse: bool = False,
                  num_splits: int | None = None, pages_per_block: int | None = None,
                  stages: int = tuned_block_sizes.MOSAIC_DECODE_STAGES,
                  code_stages: int = tuned_block_sizes.MOSAIC_DECODE_CODE_STAGES):
  """Decode attention of 1..8 query tokens over the table's tokens, from pages of any format.

  Args and returns as `selected_page_decode.selected_page_decode`; num_splits
  default from the shape (`tuned_block_sizes.mosaic_num_splits`), pages_per_block, stages (BF16
  buffers) and code_stages (code buffers per quantized pool) from tuned_block_sizes.
  """
  for name, buffers in (("stages", stages), ("code_stages", code_stages)):
    if not isinstance(buffers, int) or buffers < 1:
      raise ValueError(f"{name} must be an int >= 1 (buffers in the ring), got {buffers!r}")
  static_validate_inputs(q, cache, table)
  page_size, head_dim = table.page_size, cache.config.head_dim
  pages_per_block = pages_per_block or tuned_block_sizes.mosaic_decode_pages_per_block(page_size)
  if pages_per_block * page_size % 64:
    raise NotImplementedError(f"pallas_mosaic_gpu: {pages_per_block} pages of {page_size} tokens"
                              " a block; wgmma needs a multiple of 64 keys")
  if num_splits is None:
    cores = getattr(jax.devices()[0], "core_count", None) or tuned_block_sizes.GPU_DEFAULT_CORES
    num_splits = tuned_block_sizes.mosaic_num_splits(
        q.shape[0], cache.config.num_kv_heads, table.max_pages, pages_per_block, cores)
  precisions = cache_lib.stored_precisions(cache)
  share = _split_share(table.max_pages, num_splits, pages_per_block, len(precisions))
  quantized = [p for p in precisions if p != Precision.BF16]
  cols = query_columns(q.shape[1] * q.shape[2] // cache.config.num_kv_heads)
  if _smem_bytes(share, pages_per_block, page_size, head_dim, stages, code_stages, quantized,
                 cols) > tuned_block_sizes.MOSAIC_DECODE_MAX_SMEM:
    raise NotImplementedError(f"pallas_mosaic_gpu: {share} entries a split, {stages} buffers of"
                              f" {pages_per_block} pages and {code_stages} code buffers for"
                              f" {len(quantized)} quantized pools do not fit in shared memory")
  inputs = prepare(q, cache, table, q_positions, num_splits, pages_per_block)
  partials = run_kernel(q, *inputs, cache, max_pages=table.max_pages, num_splits=num_splits,
                        pages_per_block=pages_per_block, stages=stages, code_stages=code_stages,
                        scale=head_dim**-0.5 if scale is None else scale, softcap=softcap)
  return combine_splits.combine_splits(partials, q.shape, sinks=sinks, return_lse=return_lse,
                                       out_dtype=q.dtype)
