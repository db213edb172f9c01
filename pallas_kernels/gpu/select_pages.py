"""Query-mode page selection on GPU, in Pallas (Triton backend): one kernel per decode layer.

Reference: `intent_jax.router.reference_select_pages` (jax.numpy: a sort of the scores, running
counts, a scatter), the answer this must match bit for bit.

Work: one program per sequence holds all of its pages in registers. The budget's cut (the
take-th best candidate score) is found by a binary search on the scores' order-preserving int32
keys: 32 steps, each counting the candidates at or above a trial key (no sort). Ties at the cut
are kept from the last page backwards with a running count; a second running count gives every
selected page its slot, and the page numbers are stored into their slots (the compaction). XLA's
version of the same work is a sort and about 15 more kernels: ~90 us a layer on an H100 at
8192 pages (BENCHMARKS.md).
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Pages per sequence the kernel holds in one program (registers: ~6 int32 words per page over
# the program's threads): the largest table run on a GPU (128K tokens at page 16); longer tables
# use the reference.
MAX_PAGES = 8192
# 16 warps: 24 us at 8192 pages on an H100; 8: 28 us, 32: 25 us, 4: 51 us. One program does a
# sequence's work, so warps help; deciding 2-4 bits per step with packed counts (more work, fewer
# steps) took 33-64 us.
NUM_WARPS = 16


def static_validate_inputs(num_pages: int) -> None:
  """Raises NotImplementedError for tables this kernel does not take (the caller then uses the
  reference)."""
  if num_pages > MAX_PAGES:
    raise NotImplementedError(
        f"the pallas_gpu page selection holds at most {MAX_PAGES} pages a sequence, got"
        f" {num_pages}")


def _order_keys(score):
  """i32 keys that order as the f32 `score` does (no NaN; -0 and 0 get one key)."""
  bits = jax.lax.bitcast_convert_type(jnp.where(score == 0, 0.0, score), jnp.int32)
  return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _kernel(score_ref, forced_ref, candidate_ref, budget_ref, selected_ref, before_ref,
            page_ids_ref, *, capacity: int):
  num_pages = score_ref.shape[0]
  forced, candidate = forced_ref[...] != 0, candidate_ref[...] != 0  # bool[pages]
  score = score_ref[...]
  key = _order_keys(jnp.where(candidate & (score == score), score, -jnp.inf))
  num_forced = jnp.sum(forced.astype(jnp.int32))
  room = jnp.maximum(jnp.minimum(budget_ref[0], capacity) - num_forced, 0)
  take = jnp.minimum(room, jnp.sum(candidate.astype(jnp.int32)))

  def widen(i, cut):  # Sets the next bit of the cut (from the top) if take keys stay at or above.
    trial = cut + jnp.left_shift(jnp.int32(1), 31 - i)
    enough = jnp.sum((candidate & (key >= trial)).astype(jnp.int32)) >= take
    return jnp.where(enough, trial, cut)

  cut = jax.lax.fori_loop(0, 32, widen, jnp.int32(-2**31))  # The take-th best key.
  above = candidate & (key > cut)
  tied = (candidate & (key == cut)).astype(jnp.int32)
  # Ties: the later page first, so a tied page is kept if few enough ties come at or after it.
  tied_from_here = jnp.sum(tied) - jnp.cumsum(tied) + tied
  room_for_ties = take - jnp.sum(above.astype(jnp.int32))
  chosen = (take > 0) & (above | ((tied != 0) & (tied_from_here <= room_for_ties)))
  selected = (forced | chosen).astype(jnp.int32)
  running = jnp.cumsum(selected)
  selected_ref[...] = selected
  before_ref[...] = running - selected
  # Selected pages fill the first slots in order with their number; the others the slots after
  # them with 0: one store, every page to its own slot.
  page = jnp.arange(num_pages)
  slot = jnp.where(selected != 0, running - 1, jnp.sum(selected) + page - running)
  page_ids_ref[slot] = jnp.where(selected != 0, page, 0)


def select_pages(forced_page, candidate, page_score, budget, *, capacity: int,
                 interpret: bool = False):
  """The page-level selection of query-mode routing for a batch, in one kernel.

  Args:
    forced_page, candidate: bool[batch, pages] (QueryPlan's); page_score: f32[batch, pages];
    budget: i32[batch]; capacity: static, the table's slots.
    interpret: run in Pallas interpret mode (CPU tests).

  Returns:
    (selected bool[batch, pages], selected_before i32[batch, pages]: selected pages before each
    page, page_ids i32[batch, capacity]: the selected pages in ascending order, then 0).
  """
  batch, num_pages = page_score.shape
  static_validate_inputs(num_pages)
  padded = pl.next_power_of_2(num_pages)
  pad = lambda x, fill: jnp.pad(x, ((0, 0), (0, padded - num_pages)), constant_values=fill)
  row = lambda n: pl.BlockSpec((None, n), lambda b: (b, 0))
  selected, before, page_ids = pl.pallas_call(
      lambda *refs: _kernel(*refs, capacity=capacity),
      grid=(batch,),
      in_specs=[row(padded)] * 3 + [pl.BlockSpec((None, 1), lambda b: (b, 0))],
      out_specs=[row(padded)] * 3,
      out_shape=[jax.ShapeDtypeStruct((batch, padded), jnp.int32)] * 3,
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret,
      name="select_pages",
  )(pad(page_score.astype(jnp.float32), -jnp.inf), pad(forced_page, False), pad(candidate, False),
    budget.astype(jnp.int32)[:, None])
  page_ids = jnp.pad(page_ids[:, :capacity], ((0, 0), (0, max(capacity - padded, 0))))
  return selected[:, :num_pages] != 0, before[:, :num_pages], page_ids
