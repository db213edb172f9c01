"""Selected-page decode attention on Hopper in Pallas Mosaic GPU ("pallas_mosaic_gpu").

Reference: `intent_jax.reference.paged_attention`, the answer this must match.

Work: one CUDA block per (sequence, kv head, split), two warpgroups (warp specialization). The
memory warpgroup copies the split's pool slots into shared memory, then gathers pages by TMA, one
copy per page of K and of V, into a ring of `stages` buffers of `pages_per_block` pages each,
refilling a buffer as soon as the compute warpgroup releases it. The compute warpgroup
multiplies the kv head's query rows (GQA packing, padded to wgmma's 64 rows) by each buffer with
wgmma, masks each row's keys by position (a key's position, or NEVER where the table does not
attend it, against the row's query position), keeps an online softmax in registers, and writes
(m, l, acc) per split; `splits.combine` merges the splits (sinks join there), as for the Triton
kernel (`selected_page_decode`).

Scope: caches whose pages are all BF16, bfloat16 queries (1..8 tokens, at most 64 query rows a kv
head), head_dim 64 or 128. Other inputs raise NotImplementedError, and the dispatcher takes the
next implementation (the Triton kernel). Pallas's GPU interpret mode cannot run this kernel (jax
0.10: no rules for layout casts or transposed shared-memory operands), so off a GPU its inputs
are checked through a NumPy model of its arithmetic, and the kernel by its lowering.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from intent_jax import cache as cache_lib
from intent_jax.page_table import PageTable
from intent_jax.precision import Precision
from pallas_kernels import splits
from pallas_kernels import tuned_block_sizes
from pallas_kernels.splits import MASK_VALUE

ROWS = 64  # wgmma's row tile: the query rows of a kv head, padded.
NEVER = 2**30  # The position of a key the table does not attend: after every query row.
SLOTS_PER_ROW = 32  # Pool slots are copied as rows of 128 bytes (TMA: <= 256 rows).
_SWIZZLE = 128  # Bytes; shared-memory tiles of 8 rows by 64 bf16 channels.


def _split_share(max_pages: int, num_splits: int, pages_per_block: int) -> int:
  """The most table entries a split can take (whole blocks), rounded up to rows of slots."""
  blocks = -(-max_pages // (num_splits * pages_per_block))
  return -(-blocks * pages_per_block // SLOTS_PER_ROW) * SLOTS_PER_ROW


def _smem_bytes(share: int, keys: int, head_dim: int, stages: int) -> int:
  fixed = ROWS * head_dim * (2 + 4) + 3 * ROWS * 4 + share * 4 + 1024  # q, acc, m, l, slots.
  return fixed + stages * (2 * keys * head_dim * 2 + keys * 4)  # K, V, key positions.


def static_validate_inputs(q, cache, table) -> None:
  """Raises NotImplementedError for inputs this kernel does not handle."""
  if not isinstance(cache, cache_lib.KVCache):
    raise NotImplementedError("pallas_mosaic_gpu reads a paged KVCache")
  stored = [pool.precision for pool in cache.pools if pool.num_pages > 0]
  if stored != [Precision.BF16] or jnp.dtype(cache.config.dtype) != jnp.bfloat16:
    raise NotImplementedError("pallas_mosaic_gpu reads caches of bfloat16 pages only")
  if q.dtype != jnp.bfloat16:
    raise NotImplementedError(f"pallas_mosaic_gpu multiplies bfloat16 queries, not {q.dtype}")
  if q.shape[1] * q.shape[2] // cache.config.num_kv_heads > ROWS:
    raise NotImplementedError(
        f"pallas_mosaic_gpu packs at most {ROWS} query rows (query heads per kv head x tokens)")
  if cache.config.max_seq_len >= NEVER:
    raise NotImplementedError(f"pallas_mosaic_gpu holds positions below {NEVER}")
  if cache.config.head_dim not in (64, 128):
    raise NotImplementedError("pallas_mosaic_gpu needs head_dim 64 or 128")
  if table.page_size % 8 or table.page_size > 128:
    raise NotImplementedError("pallas_mosaic_gpu needs a page_size that is a multiple of 8, <= 128")


def _kernel(q_ref, row_pos_ref, slots_ref, key_pos_ref, steps_ref, k_ref, v_ref, m_out, l_out,
            acc_out, q_smem, row_pos_smem, slots_smem, k_smem, v_smem, key_pos_smem, m_smem,
            l_smem, acc_smem, q_barrier, slots_barrier, k_barriers, v_barriers, k_free, v_free, *,
            pages_per_block, page_size, stages, scale, softcap):
  b, h, s = lax.axis_index("seq"), lax.axis_index("head"), lax.axis_index("split")
  steps = steps_ref[b, s]
  keys = pages_per_block * page_size

  @pl.when(lax.axis_index("wg") == 0)
  def _compute():
    plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_barrier)
    plgpu.copy_gmem_to_smem(row_pos_ref.at[b], row_pos_smem, q_barrier)
    plgpu.barrier_wait(q_barrier)
    row = plgpu.Layout.WGMMA.reduce(1)
    row_pos = plgpu.layout_cast(row_pos_smem[...], row)
    m = plgpu.layout_cast(jnp.full((ROWS,), MASK_VALUE, jnp.float32), row)
    l = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row)
    acc = plgpu.layout_cast(jnp.zeros(acc_smem.shape, jnp.float32), plgpu.Layout.WGMMA)

    def step(i, carry):
      m_prev, l_prev, acc = carry
      buf = lax.rem(i, stages)
      plgpu.barrier_wait(k_barriers.at[buf])

      def logits_of(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[buf], (1, 0)))
        return acc_ref[...]

      logits = pl.run_scoped(logits_of, plgpu.ACC((ROWS, keys), jnp.float32))
      key_pos = plgpu.layout_cast(key_pos_smem[buf], plgpu.Layout.WGMMA.reduce(0))
      plgpu.barrier_arrive(k_free.at[buf])
      logits = logits * scale
      if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
      visible = (lax.broadcast_in_dim(key_pos, logits.shape, [1]) <=
                 lax.broadcast_in_dim(row_pos, logits.shape, [0]))
      logits = jnp.where(visible, logits, MASK_VALUE)
      m_next = jnp.maximum(m_prev, logits.max(axis=1))
      correction = jnp.exp(m_prev - m_next)
      # As in the Triton kernel: a row that has seen nothing subtracts 0, so masked keys weigh 0.
      seen = jnp.where(m_next == MASK_VALUE, 0.0, m_next)
      weights = jnp.exp(logits - lax.broadcast_in_dim(seen, logits.shape, [0]))
      l_next = l_prev * correction + weights.sum(axis=1)
      plgpu.barrier_wait(v_barriers.at[buf])

      def attend(acc_ref):
        plgpu.wgmma(acc_ref, weights.astype(jnp.bfloat16), v_smem.at[buf])
        return acc_ref[...]

      update = pl.run_scoped(attend, plgpu.ACC(acc.shape, jnp.float32))
      plgpu.barrier_arrive(v_free.at[buf])
      acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0]) + update
      return m_next, l_next, acc

    m, l, acc = lax.fori_loop(0, steps, step, (m, l, acc))
    m_smem[...] = m
    l_smem[...] = l
    acc_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(m_smem, m_out.at[b, h, s])
    plgpu.copy_smem_to_gmem(l_smem, l_out.at[b, h, s])
    plgpu.copy_smem_to_gmem(acc_smem, acc_out.at[b, h, s])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(lax.axis_index("wg") == 1)
  def _memory():
    plgpu.copy_gmem_to_smem(slots_ref.at[b, s], slots_smem, slots_barrier)
    plgpu.barrier_wait(slots_barrier)

    def gather(pool_ref, buffer, barrier, i):
      for p in range(pages_per_block):
        entry = i * pages_per_block + p
        slot = slots_smem[entry // SLOTS_PER_ROW, entry % SLOTS_PER_ROW]
        plgpu.copy_gmem_to_smem(pool_ref.at[h, slot], buffer.at[pl.ds(p * page_size, page_size)],
                                barrier)

    @pl.loop(0, steps)
    def _fetch(i):
      buf = lax.rem(i, stages)
      pl.when(i >= stages)(lambda: plgpu.barrier_wait(k_free.at[buf]))
      gather(k_ref, k_smem.at[buf], k_barriers.at[buf], i)
      plgpu.copy_gmem_to_smem(key_pos_ref.at[b, s, pl.ds(i * keys, keys)],
                              key_pos_smem.at[buf], k_barriers.at[buf])
      pl.when(i >= stages)(lambda: plgpu.barrier_wait(v_free.at[buf]))
      gather(v_ref, v_smem.at[buf], v_barriers.at[buf], i)


def program_entries(cache, table, num_splits: int, pages_per_block: int):
  """Each split's share of the table, in whole blocks of `pages_per_block` entries.

  Returns (slots i32[batch, splits, share / 32, 32], key positions i32[batch, splits,
  share * page_size], steps i32[batch, splits]): split s of a sequence holding n entries takes
  entries s * d .. (s + 1) * d, d = ceil(n / (splits * pages_per_block)) * pages_per_block, in
  `steps` blocks; a key's position is its token's, or NEVER where the table does not attend it
  (entries past the split's or the table's end: slot 0, NEVER). `share` is the most entries a
  split can take, rounded up to 32.
  """
  pools, slots = cache_lib.lookup(cache, table)
  batch, max_pages = slots.shape
  attended = table.page_token_mask() & (pools != cache_lib.UNMAPPED)[:, :, None]
  # One more entry past the table, never attended: where entries past a split's end read.
  key_pos = jnp.pad(jnp.where(attended, table.token_positions(), NEVER),
                    ((0, 0), (0, 1), (0, 0)), constant_values=NEVER)
  slots = jnp.pad(jnp.maximum(slots, 0), ((0, 0), (0, 1)))
  count = jnp.minimum(table.num_pages, max_pages)
  per_split = num_splits * pages_per_block
  dyn_share = (count + per_split - 1) // per_split * pages_per_block  # d above, per sequence.
  share = _split_share(max_pages, num_splits, pages_per_block)
  local = jnp.arange(share)[None, None, :]
  index = jnp.arange(num_splits)[None, :, None] * dyn_share[:, None, None] + local
  own = (local < dyn_share[:, None, None]) & (index < count[:, None, None])
  index = jnp.where(own, index, max_pages).reshape(batch, -1)  # [batch, splits * share]
  prog_slots = jnp.take_along_axis(slots, index, axis=1)
  prog_key_pos = jnp.take_along_axis(key_pos, index[:, :, None], axis=1)
  remaining = jnp.clip(count[:, None] - jnp.arange(num_splits) * dyn_share[:, None], 0,
                       dyn_share[:, None])
  return (prog_slots.reshape(batch, num_splits, share // SLOTS_PER_ROW, SLOTS_PER_ROW),
          prog_key_pos.reshape(batch, num_splits, -1).astype(jnp.int32),
          ((remaining + pages_per_block - 1) // pages_per_block).astype(jnp.int32))


def prepare(q, cache, table, q_positions, num_splits: int, pages_per_block: int):
  """The kernel's inputs besides the pools: (q rows [batch, kv heads, ROWS, head_dim], row
  positions i32[batch, ROWS] (`splits.row_positions`), then `program_entries`)."""
  num_kv_heads = cache.config.num_kv_heads
  group = q.shape[2] // num_kv_heads
  return (splits.query_rows(q, num_kv_heads, ROWS),
          splits.row_positions(q_positions, group, ROWS)) + program_entries(
              cache, table, num_splits, pages_per_block)


def run_kernel(q_rows, row_pos, prog_slots, key_pos, steps, cache, *, pages_per_block: int,
               stages: int, scale: float, softcap):
  """The Mosaic GPU kernel on `prepare`'s inputs: per (sequence, kv head, split), f32 (m, l,
  acc)."""
  batch, num_kv_heads, rows, head_dim = q_rows.shape
  num_splits = prog_slots.shape[1]
  pool = cache.pools[Precision.BF16]
  page_size = cache.config.page_size
  keys = pages_per_block * page_size
  swizzled = (plgpu.TilingTransform((8, _SWIZZLE // 2)), plgpu.SwizzleTransform(_SWIZZLE))
  kernel = functools.partial(
      _kernel, pages_per_block=pages_per_block, page_size=page_size, stages=stages,
      scale=float(scale), softcap=None if softcap is None else float(softcap))
  partial = lambda *tail: jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits) + tail,
                                               jnp.float32)
  scratch = [
      plgpu.SMEM((rows, head_dim), jnp.bfloat16, transforms=swizzled),
      plgpu.SMEM((rows,), jnp.int32),
      plgpu.SMEM(prog_slots.shape[2:], jnp.int32),
      plgpu.SMEM((stages, keys, head_dim), jnp.bfloat16, transforms=swizzled),
      plgpu.SMEM((stages, keys, head_dim), jnp.bfloat16, transforms=swizzled),
      plgpu.SMEM((stages, keys), jnp.int32),
      plgpu.SMEM((rows,), jnp.float32),
      plgpu.SMEM((rows,), jnp.float32),
      plgpu.SMEM((rows, head_dim), jnp.float32),
      plgpu.Barrier(num_arrivals=2),  # q rows and their positions.
      plgpu.Barrier(),
      plgpu.Barrier(num_arrivals=pages_per_block + 1, num_barriers=stages),  # K pages, positions.
      plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
  ]
  call = plgpu.kernel(
      kernel, out_type=(partial(rows), partial(rows), partial(rows, head_dim)),
      scratch_types=scratch, grid=(batch, num_kv_heads, num_splits),
      grid_names=("seq", "head", "split"), num_threads=2, thread_name="wg")
  return call(q_rows, row_pos, prog_slots, key_pos, steps, pool.k, pool.v)


def mosaic_decode(q, cache: cache_lib.KVCache, table: PageTable, *, q_positions=None,
                  sinks=None, scale=None, softcap=None, return_lse: bool = False,
                  num_splits: int | None = None, pages_per_block: int | None = None,
                  stages: int = tuned_block_sizes.MOSAIC_DECODE_STAGES):
  """Decode attention of 1..8 query tokens over the table's tokens, read from BF16 pages.

  Args and returns as `selected_page_decode.selected_page_decode`; num_splits
  default from the shape (`tuned_block_sizes.mosaic_num_splits`), pages_per_block and stages
  (TMA buffers) from tuned_block_sizes.
  """
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
  share = _split_share(table.max_pages, num_splits, pages_per_block)
  if _smem_bytes(share, pages_per_block * page_size, head_dim, stages) > (
      tuned_block_sizes.MOSAIC_DECODE_MAX_SMEM) or share > 256 * SLOTS_PER_ROW:
    raise NotImplementedError(f"pallas_mosaic_gpu: {share} entries a split, {stages} buffers of"
                              f" {pages_per_block} pages do not fit in shared memory")
  if q_positions is None:
    q_positions = table.query_positions(q.shape[1])
  inputs = prepare(q, cache, table, q_positions, num_splits, pages_per_block)
  partials = run_kernel(*inputs, cache, pages_per_block=pages_per_block,
                        stages=stages, scale=head_dim**-0.5 if scale is None else scale,
                        softcap=softcap)
  out = splits.combine(partials, q.shape, sinks=sinks, return_lse=return_lse)
  return out if return_lse else out.astype(q.dtype)
