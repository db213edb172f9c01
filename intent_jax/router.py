"""The router: layouts in, a page table out (which pages, which tokens, which precision, why).

`route` is pure and jit-compiled. It works token by token on arrays (no Python loop over tokens,
blocks or pages) and vmaps over the batch; sequence lengths, scores and memory pressure are
traced values, so a decode loop traces it once.

Semantics (docs/policies.md has the full table):
  * ALWAYS, GLOBAL and RECENT blocks are attended; SKIP blocks are not; an ATTEND block is attended
    iff its score >= `score_threshold` and it fits the page budget.
  * The last `recent_tokens` tokens of a sequence are attended whatever block covers them.
  * Tokens no block covers follow `default_policy`.
  * Over `max_pages`, the lowest-score ATTEND blocks are dropped first (ties: the earlier block
    goes first); a dropped block whose pages are all selected anyway costs nothing and is kept.
    `overflow` says a block was dropped. If the forced pages alone do not fit, or a sequence is
    longer than the layout's capacity, `truncated` says the table misses required tokens.
  * Forced tokens are BF16; an ATTEND block's precision comes from `precision_for_score`. A page
    takes the most precise format any of its selected tokens needs.
"""

import dataclasses
import enum
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from intent_jax.layout import BlockLayout, BlockPolicy, FORCED_POLICIES
from intent_jax import cache as cache_lib
from intent_jax import dispatch
from intent_jax import scoring
from intent_jax import sharded
from intent_jax.layout import token_block_ids
from intent_jax.page_table import PageTable, pack_bits
from intent_jax.precision import NUM_PRECISIONS, Precision
from intent_jax.validation import as_enum, is_int

class Decision(enum.IntEnum):
  """What happened to a block."""

  DROPPED = 0  # None of its tokens are attended.
  ATTENDED = 1  # All of its tokens (up to the sequence length) are attended.
  WINDOW_ONLY = 2  # Dropped, but its tokens inside the recent window are attended.
  PARTIAL = 3  # Query mode: its tokens on the selected pages (and in the window) are attended.


class Reason(enum.IntEnum):
  """Why a block got its decision."""

  PADDING = 0  # Not a block: layout padding.
  POLICY = 1  # ALWAYS, GLOBAL, RECENT (attended) or SKIP (dropped).
  ABOVE_THRESHOLD = 2  # ATTEND, score >= threshold, within the page budget.
  BELOW_THRESHOLD = 3  # ATTEND, score < threshold.
  OVER_BUDGET = 4  # ATTEND, score >= threshold, dropped to fit max_pages.
  NOT_REACHED = 5  # The block starts at or past the sequence length.
  QUERY_SELECTED = 6  # Query mode, ATTEND: read on the pages selected (PARTIAL or ATTENDED).
  QUERY_DROPPED = 7  # Query mode, ATTEND: none of its pages made the budget (window aside).


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """Static routing configuration (hashable; a static argument of `route`).

  Attributes:
    page_size: tokens per page, a power of two in [16, 256].
    score_threshold: an ATTEND block is attended iff its score >= this.
    recent_tokens: the last this many tokens of every sequence are always attended.
    memory_pressure: in [0, 1]; lowers ATTEND precision (see `precision_for_score`). `route`
      takes a traced override.
    max_pages: static capacity of a table in pages; None means every page of the layout.
    default_policy: policy of tokens no block covers: ALWAYS, GLOBAL, RECENT or SKIP.
    bf16_min_score: effective ATTEND score from which a block stays BF16.
    eight_bit_min_score: effective ATTEND score from which a block gets `eight_bit_format`;
      below it, INT4.
    eight_bit_format: Precision.INT8 or Precision.FP8.
    query_channels: query mode ranks ATTEND pages by `scoring.sketch_page_logits` over this
      many channels (an estimate from the cache's key sketch: CacheConfig(key_sketch=True));
      None: by the key bounds (`scoring.page_upper_bounds`).
  """

  page_size: int = 16
  score_threshold: float = 0.5
  recent_tokens: int = 256
  memory_pressure: float = 0.0
  max_pages: int | None = None
  default_policy: BlockPolicy = BlockPolicy.ALWAYS
  bf16_min_score: float = 0.75
  eight_bit_min_score: float = 0.5
  eight_bit_format: Precision = Precision.INT8
  query_channels: int | None = None

  def __post_init__(self):
    ps = self.page_size
    if not is_int(ps) or not 16 <= ps <= 256 or ps & (ps - 1):
      raise ValueError(f"page_size={ps!r} must be a power of two in [16, 256]")
    for name in ("score_threshold", "memory_pressure", "bf16_min_score", "eight_bit_min_score"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name}={value!r} must be a number in [0, 1]")
    if self.eight_bit_min_score > self.bf16_min_score:
      raise ValueError(
          f"eight_bit_min_score={self.eight_bit_min_score} must be <= bf16_min_score="
          f"{self.bf16_min_score} (a higher score never gets a lower precision)")
    rt = self.recent_tokens
    if not is_int(rt) or rt < 0:
      raise ValueError(f"recent_tokens={rt!r} must be an int >= 0")
    mp = self.max_pages
    if mp is not None and (not is_int(mp) or mp < 1):
      raise ValueError(f"max_pages={mp!r} must be None or an int >= 1")
    policy = as_enum(BlockPolicy, self.default_policy, "default_policy")
    if policy == BlockPolicy.ATTEND:
      raise ValueError(
          "default_policy=ATTEND is not allowed: tokens no block covers have no score;"
          " describe them with a block")
    object.__setattr__(self, "default_policy", policy)
    eight = as_enum(Precision, self.eight_bit_format, "eight_bit_format")
    if eight not in (Precision.INT8, Precision.FP8):
      raise ValueError(f"eight_bit_format={eight.name} must be INT8 or FP8")
    object.__setattr__(self, "eight_bit_format", eight)
    qc = self.query_channels
    if qc is not None and (not is_int(qc) or qc < 1):
      raise ValueError(f"query_channels={qc!r} must be None or an int >= 1")

  def table_capacity(self, num_tokens: int) -> int:
    """Pages a table holds for a layout of `num_tokens` tokens."""
    logical = math.ceil(num_tokens / self.page_size)
    return logical if self.max_pages is None else self.max_pages


def precision_for_score(score: jax.Array, memory_pressure: jax.Array,
                        config: RouterConfig) -> jax.Array:
  """i32 Precision of an ATTEND block: by effective score `score * (1 - memory_pressure)`.

  effective >= bf16_min_score -> BF16; >= eight_bit_min_score -> eight_bit_format; else INT4.
  Monotone: a higher score or a lower pressure never gets a less precise format.
  """
  effective = score * (1.0 - memory_pressure)
  return jnp.where(
      effective >= config.bf16_min_score, int(Precision.BF16),
      jnp.where(effective >= config.eight_bit_min_score, int(config.eight_bit_format),
                int(Precision.INT4))).astype(jnp.int32)


def _select_blocks(forced_token, forced_page, in_seq, block_of_token, starts, ends, scores,
                   valid, candidate, *, capacity, ps, with_gap, by_page):
  """Block mode: the top ATTEND candidates by score whose pages fit `capacity`.

  Returns (kept bool[blocks], selected bool[tokens], forced pages fit bool).
  """
  n = starts.shape[0]
  num_logical = forced_page.shape[0]
  # Rank candidates best first: higher score, then later start. Others rank n.
  order = jnp.lexsort((-starts, jnp.where(candidate, -scores, jnp.inf)))
  rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  rank = jnp.where(candidate, rank, n)

  # Keeping the top k candidates selects the forced pages plus every page whose best candidate
  # token has rank < k. Count the pages each rank adds, then take the largest k that fits.
  best_rank = by_page(jnp.where(in_seq, with_gap(rank, n)[block_of_token], n)).min(axis=1)
  first_needed_by = jnp.where(forced_page, n, best_rank)
  pages_added = jnp.sum(first_needed_by[:, None] == jnp.arange(n), axis=0, dtype=jnp.int32)
  pages_for_top = jnp.sum(forced_page) + jnp.concatenate(
      [jnp.zeros(1, jnp.int32), jnp.cumsum(pages_added)])
  keep_top = jnp.sum(pages_for_top <= capacity) - 1  # -1: the forced pages alone do not fit.
  forced_fit = keep_top >= 0
  keep_top = jnp.maximum(keep_top, 0)

  # A candidate outside the top k whose pages are all selected anyway costs nothing: keep it.
  page_selected = forced_page | (best_rank < keep_top)
  off_page = in_seq & ~jnp.repeat(page_selected, ps)
  off_before = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(off_page, dtype=jnp.int32)])
  clip = lambda x: jnp.clip(x, 0, num_logical * ps)
  needs_page = valid & (off_before[clip(ends)] > off_before[clip(starts)])
  kept = candidate & ((rank < keep_top) | ~needs_page)
  selected = forced_token | (in_seq & with_gap(kept, False)[block_of_token])
  return kept, selected, forced_fit


def _select_pages(forced_page, candidate, page_score, budget, *, capacity):
  """Query mode: the forced pages, then the candidate pages of highest `page_score` up to
  `budget` pages in all (ties: the later page first). Works on pages only: one sort of the
  scores finds the cut, a reverse running count of the ties at the cut breaks them.

  Returns selected bool[pages].
  """
  score = jnp.where(candidate & ~jnp.isnan(page_score), page_score, -jnp.inf)
  num_forced = jnp.sum(forced_page, dtype=jnp.int32)
  room = jnp.maximum(jnp.minimum(budget, capacity) - num_forced, 0)
  take = jnp.minimum(room, jnp.sum(candidate, dtype=jnp.int32))
  cut = jnp.sort(score)[::-1][jnp.maximum(take - 1, 0)]  # The take-th best candidate score.
  above = candidate & (score > cut)
  tied = candidate & (score == cut)
  tied_from_here = jnp.cumsum(tied[::-1], dtype=jnp.int32)[::-1]  # Ties at or after each page.
  chosen = (take > 0) & (above | (tied & (tied_from_here <= take - jnp.sum(above))))
  return forced_page | chosen


def _pages_in_range(per_page_before, first_token, end_token, ps):
  """How many pages counted by `per_page_before` (i32[pages + 1], a running count) meet tokens
  [first_token, end_token); 0 for an empty range."""
  num_logical = per_page_before.shape[0] - 1
  first = jnp.clip(first_token // ps, 0, num_logical)
  end = jnp.clip((end_token + ps - 1) // ps, first, num_logical)
  return jnp.where(end_token > first_token, per_page_before[end] - per_page_before[first], 0)


def _token_policy(starts, ends, policies, valid, block_of_token, seq_len, *, config, num_tokens):
  """Per-token and per-block facts of one sequence that do not depend on scores."""
  ps = config.page_size
  num_logical = math.ceil(num_tokens / ps)
  with_gap = lambda per_block, gap: jnp.append(per_block, jnp.asarray(gap, per_block.dtype))
  tokens = jnp.arange(num_logical * ps, dtype=jnp.int32)
  length = jnp.minimum(seq_len, num_tokens)  # Tokens past the layout's capacity do not exist.
  in_seq = tokens < length
  in_window = in_seq & (tokens >= seq_len - config.recent_tokens)
  forced_block = valid & jnp.isin(policies, jnp.asarray([int(p) for p in FORCED_POLICIES]))
  attend_block = valid & (policies == int(BlockPolicy.ATTEND))
  gap_forced = config.default_policy in FORCED_POLICIES
  forced_token = in_window | (in_seq & with_gap(forced_block, gap_forced)[block_of_token])
  window_start = jnp.maximum(seq_len - config.recent_tokens, 0)
  reached = valid & (starts < length)
  return dict(
      with_gap=with_gap, by_page=lambda per_token: per_token.reshape(num_logical, ps),
      length=length, in_seq=in_seq, forced_block=forced_block,
      attend_block=attend_block, forced_token=forced_token, reached=reached,
      touches_window=reached & (ends > window_start) & (config.recent_tokens > 0))


def _page_reads(selected, token_precision, by_page):
  """(used bool[pages], precision i32[pages], token bits u32[pages, words]) of the tokens
  `selected`: a page is read at the most precise format any of its selected tokens needs."""
  page_precision = by_page(jnp.where(selected, token_precision, NUM_PRECISIONS)).min(axis=1)
  return (by_page(selected).any(axis=1), page_precision.astype(jnp.int32),
          pack_bits(by_page(selected)))


def _token_precision(facts, block_precision, block_of_token):
  """i32[tokens]: forced tokens are BF16, others their block's precision (BF16 outside blocks)."""
  return jnp.where(facts["forced_token"], int(Precision.BF16),
                   facts["with_gap"](block_precision, int(Precision.BF16))[block_of_token])


def _block_precision(attend_block, scores, pressure, config):
  """i32[blocks]: an ATTEND block's precision by score (`precision_for_score`), others BF16."""
  return jnp.where(attend_block, precision_for_score(scores, pressure, config),
                   int(Precision.BF16)).astype(jnp.int32)


def _fixed_reasons(valid, reached, forced_block, policies):
  """i32[blocks]: the Reason that policy and length alone give a block, -1 where the selection
  decides."""
  return jnp.select(
      [~valid, ~reached, forced_block | (policies == int(BlockPolicy.SKIP))],
      [int(Reason.PADDING), int(Reason.NOT_REACHED), int(Reason.POLICY)], -1).astype(jnp.int32)


def _compaction(page_used, *, capacity):
  """(used_before i32[pages]: used pages before each page, page_ids i32[capacity]: the used
  pages in ascending order, then 0) of one sequence. Unused pages get an out-of-range slot and
  are dropped, so no two writes share a slot."""
  num_logical = page_used.shape[0]
  running = jnp.cumsum(page_used, dtype=jnp.int32)
  slot = jnp.where(page_used, running - 1, capacity)
  page_ids = jnp.zeros(capacity, jnp.int32).at[slot].set(
      jnp.arange(num_logical, dtype=jnp.int32), mode="drop")
  return running - page_used, page_ids


def _table_row(page_used, page_ids, page_precision, page_bits, *, capacity, attended, partial,
               touches_window, reasons, block_precision, seq_len, overflow, truncated):
  """PageTable fields of one sequence: the used pages as `_compaction` placed them
  (`page_ids`), their precisions and token bits, and the blocks' decisions."""
  num_pages = jnp.minimum(jnp.sum(page_used, dtype=jnp.int32), capacity)
  filled = jnp.arange(capacity) < num_pages
  decisions = jnp.where(attended, int(Decision.ATTENDED),
                        jnp.where(partial, int(Decision.PARTIAL),
                                  jnp.where(touches_window, int(Decision.WINDOW_ONLY),
                                            int(Decision.DROPPED))))
  return dict(
      page_ids=page_ids,
      num_pages=num_pages,
      precisions=jnp.where(filled, page_precision[page_ids], int(Precision.BF16)),
      token_bits=jnp.where(filled[:, None], page_bits[page_ids], 0),
      seq_lens=seq_len.astype(jnp.int32),
      block_decisions=decisions.astype(jnp.int32),
      block_reasons=reasons.astype(jnp.int32),
      block_precisions=block_precision,
      overflow=overflow,
      truncated=truncated,
  )


def _route_sequence(starts, ends, policies, scores, valid, block_of_token, seq_len, pressure, *,
                    config: RouterConfig, num_tokens: int):
  """Block mode, one sequence (one row of the layout's arrays): PageTable fields."""
  facts = _token_policy(starts, ends, policies, valid, block_of_token, seq_len, config=config,
                        num_tokens=num_tokens)
  capacity = config.table_capacity(num_tokens)
  reached, forced_block = facts["reached"], facts["forced_block"]
  candidate = facts["attend_block"] & (scores >= config.score_threshold)
  forced_page = facts["by_page"](facts["forced_token"]).any(axis=1)
  kept, selected, forced_fit = _select_blocks(
      facts["forced_token"], forced_page, facts["in_seq"], block_of_token, starts, ends, scores,
      valid, candidate, capacity=capacity, ps=config.page_size, with_gap=facts["with_gap"],
      by_page=facts["by_page"])
  kept = kept & reached
  attend_reasons = jnp.where(kept, int(Reason.ABOVE_THRESHOLD),
                             jnp.where(candidate, int(Reason.OVER_BUDGET),
                                       int(Reason.BELOW_THRESHOLD)))
  fixed = _fixed_reasons(valid, reached, forced_block, policies)
  block_precision = _block_precision(facts["attend_block"], scores, pressure, config)
  page_used, page_precision, page_bits = _page_reads(
      selected, _token_precision(facts, block_precision, block_of_token), facts["by_page"])
  _, page_ids = _compaction(page_used, capacity=capacity)
  attended = (forced_block | kept) & reached
  return _table_row(
      page_used, page_ids, page_precision, page_bits, capacity=capacity, attended=attended,
      partial=jnp.zeros_like(attended),
      touches_window=facts["touches_window"], reasons=jnp.where(fixed >= 0, fixed, attend_reasons),
      block_precision=block_precision, seq_len=seq_len,
      overflow=jnp.any(candidate & reached & ~kept),
      truncated=~forced_fit | (seq_len > num_tokens))


@functools.partial(jax.jit, static_argnames=("config", "num_tokens"))
def _route(starts, ends, policies, scores, valid, seq_lens, memory_pressure, *,
           config: RouterConfig, num_tokens: int):
  # Takes the layout's arrays, not the layout: block names must not key the jit cache.
  block_of_token = _block_of_token(starts, ends, policies, scores, valid, config, num_tokens)
  route_one = functools.partial(_route_sequence, config=config, num_tokens=num_tokens)
  fields = jax.vmap(route_one)(starts, ends, policies, scores, valid, block_of_token, seq_lens,
                               memory_pressure)
  return PageTable(**fields, page_size=config.page_size)


def _block_of_token(starts, ends, policies, scores, valid, config, num_tokens):
  padded_tokens = math.ceil(num_tokens / config.page_size) * config.page_size
  layout = BlockLayout(starts, ends, policies, scores, valid, names=(), num_tokens=num_tokens)
  return token_block_ids(layout, padded_tokens)


# ---------------------------------------------------------------------------------------------
# Query mode: a plan per step (tokens), a selection per layer (pages).


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["forced_page", "candidate", "page_bits", "page_precision", "block_starts",
                 "block_in_seq_end", "block_out_window_end", "block_forced", "block_attend",
                 "block_touches_window", "block_fixed_reasons", "block_precisions", "seq_lens",
                 "too_long"],
    meta_fields=["config", "num_tokens"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class QueryPlan:
  """What query-mode routing needs besides the page scores, for one step's sequence lengths: made
  once per step by `plan_query` (it works on tokens), shared by every layer's `select_pages`
  (which works on pages only).

  Attributes, per sequence (leading axis batch):
    forced_page: bool[pages], holds a token the policy or the recent window forces: always read.
    candidate: bool[pages], not forced, holds ATTEND tokens: competes for the budget.
    page_bits: u32[pages, words], the tokens a selected page is read for (forced and ATTEND).
    page_precision: i32[pages], the Precision a selected page is read at.
    block_starts, block_in_seq_end, block_out_window_end: i32[blocks], each block's first token,
      its end within the sequence, and its end before the recent window.
    block_forced, block_attend: bool[blocks], reached blocks of a forced policy / of ATTEND.
    block_touches_window: bool[blocks]; block_fixed_reasons: i32[blocks], the Reason that policy
      and length give, -1 where the selection decides; block_precisions: i32[blocks].
    seq_lens: i32; too_long: bool, the sequence is longer than the layout.
    config, num_tokens: static, the RouterConfig and the layout's capacity in tokens.
  """

  forced_page: jax.Array
  candidate: jax.Array
  page_bits: jax.Array
  page_precision: jax.Array
  block_starts: jax.Array
  block_in_seq_end: jax.Array
  block_out_window_end: jax.Array
  block_forced: jax.Array
  block_attend: jax.Array
  block_touches_window: jax.Array
  block_fixed_reasons: jax.Array
  block_precisions: jax.Array
  seq_lens: jax.Array
  too_long: jax.Array
  config: RouterConfig
  num_tokens: int

  @property
  def batch_size(self) -> int:
    return self.forced_page.shape[0]

  @property
  def num_pages(self) -> int:
    return self.forced_page.shape[1]


def _plan_sequence(starts, ends, policies, scores, valid, block_of_token, seq_len, pressure, *,
                   config: RouterConfig, num_tokens: int):
  facts = _token_policy(starts, ends, policies, valid, block_of_token, seq_len, config=config,
                        num_tokens=num_tokens)
  by_page, reached = facts["by_page"], facts["reached"]
  attend_token = facts["in_seq"] & facts["with_gap"](facts["attend_block"], False)[block_of_token]
  forced_page = by_page(facts["forced_token"]).any(axis=1)
  block_precision = _block_precision(facts["attend_block"], scores, pressure, config)
  # A selected page reads its forced and ATTEND tokens; a page is selected or not as a whole.
  _, page_precision, page_bits = _page_reads(
      facts["forced_token"] | attend_token,
      _token_precision(facts, block_precision, block_of_token), by_page)
  in_seq_end = jnp.minimum(ends, facts["length"])
  return dict(
      forced_page=forced_page,
      candidate=by_page(attend_token).any(axis=1) & ~forced_page,
      page_bits=page_bits, page_precision=page_precision,
      block_starts=starts, block_in_seq_end=in_seq_end,
      block_out_window_end=jnp.minimum(in_seq_end, seq_len - config.recent_tokens),
      block_forced=reached & facts["forced_block"], block_attend=reached & facts["attend_block"],
      block_touches_window=facts["touches_window"],
      block_fixed_reasons=_fixed_reasons(valid, reached, facts["forced_block"], policies),
      block_precisions=block_precision, seq_lens=seq_len.astype(jnp.int32),
      too_long=seq_len > num_tokens)


@functools.partial(jax.jit, static_argnames=("config", "num_tokens"))
def _plan(starts, ends, policies, scores, valid, seq_lens, memory_pressure, *,
          config: RouterConfig, num_tokens: int) -> QueryPlan:
  block_of_token = _block_of_token(starts, ends, policies, scores, valid, config, num_tokens)
  plan_one = functools.partial(_plan_sequence, config=config, num_tokens=num_tokens)
  fields = jax.vmap(plan_one)(starts, ends, policies, scores, valid, block_of_token, seq_lens,
                              memory_pressure)
  return QueryPlan(**fields, config=config, num_tokens=num_tokens)


def reference_select_pages(forced_page, candidate, page_score, budget, *, capacity: int):
  """The page-level selection of query mode for a batch, in jax.numpy: the answer the kernels
  (pallas_kernels/*/select_pages.py) must give.

  Args: forced_page, candidate bool[batch, pages]; page_score f32[batch, pages]; budget
  i32[batch]; capacity: static, the table's slots.
  Returns (selected bool[batch, pages], selected_before i32[batch, pages]: selected pages before
  each page, page_ids i32[batch, capacity]: the selected pages in ascending order, then 0).
  """
  def one(forced_page, candidate, page_score, budget):
    selected = _select_pages(forced_page, candidate, page_score, budget, capacity=capacity)
    return (selected, *_compaction(selected, capacity=capacity))
  return jax.vmap(one)(forced_page, candidate, page_score, budget)


def _select_sequence(plan: QueryPlan, page_selected, selected_before, page_ids, *,
                     capacity: int, ps: int):
  """Query mode, one sequence of the plan and its page selection: PageTable fields."""
  # An ATTEND token is read iff its page is, so a block's decision needs pages only.
  selected_before = jnp.append(selected_before, selected_before[-1] + page_selected[-1])
  every_page = jnp.arange(page_selected.shape[0] + 1, dtype=jnp.int32)
  starts, in_seq_end = plan.block_starts, plan.block_in_seq_end
  all_selected = (_pages_in_range(selected_before, starts, in_seq_end, ps) ==
                  _pages_in_range(every_page, starts, in_seq_end, ps))
  attended = plan.block_forced | (plan.block_attend & all_selected)
  outside_window = _pages_in_range(selected_before, starts, plan.block_out_window_end, ps)
  partial = plan.block_attend & ~attended & (outside_window > 0)
  reasons = jnp.where(plan.block_fixed_reasons >= 0, plan.block_fixed_reasons,
                      jnp.where(attended | partial, int(Reason.QUERY_SELECTED),
                                int(Reason.QUERY_DROPPED)))
  forced_fit = jnp.sum(plan.forced_page, dtype=jnp.int32) <= capacity
  return _table_row(
      page_selected, page_ids, plan.page_precision, plan.page_bits, capacity=capacity,
      attended=attended, partial=partial, touches_window=plan.block_touches_window,
      reasons=reasons, block_precision=plan.block_precisions, seq_len=plan.seq_lens,
      overflow=jnp.any(plan.candidate & ~page_selected), truncated=~forced_fit | plan.too_long)


@functools.partial(jax.jit, static_argnames=("implementation",))
def _select(plan: QueryPlan, page_scores, budgets, *, implementation: str) -> PageTable:
  config = plan.config
  capacity = config.table_capacity(plan.num_tokens)
  selection = _selection_function(implementation, plan.num_pages)(
      plan.forced_page, plan.candidate, page_scores, budgets, capacity=capacity)
  select_one = functools.partial(_select_sequence, capacity=capacity, ps=config.page_size)
  fields = jax.vmap(select_one)(plan, *selection)
  return PageTable(**fields, page_size=config.page_size)


# Page-selection implementations tried in order (the first that does not raise
# NotImplementedError) when `implementation` is None; "reference" takes every input.
DEFAULT_SELECTION_ORDER = {"gpu": ("pallas_gpu", "reference")}
SELECTION_IMPLEMENTATIONS = ("reference", "pallas_gpu", "pallas_gpu_interpret")


def _selection_function(implementation: str, num_pages: int):
  """The batched page selection called `implementation` (or the platform's default where it is
  "default"), after checking that it takes tables of `num_pages` pages."""
  if implementation == "default":
    names = dispatch.platform_order(DEFAULT_SELECTION_ORDER)
  else:
    names = (implementation,)
  return dispatch.first_supported(names, lambda name: _selection_kernel(name, num_pages))


def _selection_kernel(name: str, num_pages: int):
  """The selection called `name`; NotImplementedError where it cannot run or take the table."""
  if name == "reference":
    return reference_select_pages
  if name == "pallas_gpu":
    dispatch.require_platform(name)
  # Kernels are imported here: they build on this package.
  from pallas_kernels.gpu import select_pages as kernel  # pylint: disable=g-import-not-at-top
  kernel.static_validate_inputs(num_pages)
  return functools.partial(kernel.select_pages, interpret=name == "pallas_gpu_interpret")


@functools.partial(jax.jit, static_argnames=("num_pages", "channels"))
def _query_page_scores(query, cache, *, num_pages: int, channels: int | None):
  """f32[batch, num_pages]: `scoring.page_scores` (from the key sketch over `channels` channels,
  or from the key bounds), cut or padded (-inf) to the layout's pages."""
  score = sharded.page_scores if isinstance(cache, sharded.ShardedKVCache) else scoring.page_scores
  page_scores = score(query, cache, channels=channels)[:, :num_pages]
  missing = num_pages - page_scores.shape[1]
  return jnp.pad(page_scores, ((0, 0), (0, missing)), constant_values=-jnp.inf)


def route(
    layout: BlockLayout,
    seq_lens: jax.Array,
    config: RouterConfig,
    *,
    scores: jax.Array | None = None,
    memory_pressure: jax.Array | float | None = None,
    query: jax.Array | None = None,
    cache=None,
    budget: jax.Array | int | None = None,
    page_scores: jax.Array | None = None,
) -> PageTable:
  """Routes a batch of layouts into a PageTable.

  Block mode (no `query`, no `page_scores`): ATTEND blocks are kept by score, threshold and
  `max_pages` (module docstring). Query mode: every ATTEND page competes; the forced pages come
  first, then the ATTEND pages whose `scoring.page_scores` (from `query` and the `cache`'s
  per-page key bounds, or its key sketch with `config.query_channels`) is highest, until the
  table holds `budget` pages; ATTEND tokens on any selected page are attended, SKIP tokens
  never. Scores then only set precision.

  Args:
    layout: BlockLayout with `batch` rows.
    seq_lens: i32[batch], current length of each sequence (<= layout.num_tokens).
    config: static RouterConfig.
    scores: optional f32[batch, max_blocks], overrides the layout's scores (dynamic scoring).
    memory_pressure: optional f32 scalar or f32[batch], overrides config.memory_pressure.
    query: [batch, q_len, num_q_heads, head_dim], the step's queries; needs `cache`.
    cache: the cache.KVCache the query attends (same page_size as `config`), or a
      sharded.ShardedKVCache (each device bounds its own pages; one small collective).
    budget: pages per table in query mode, forced pages included: int, i32 scalar or i32[batch]
      (traced: changing it does not retrace). Default: the table's capacity. Forced pages are
      kept even past the budget.
    page_scores: f32[batch, logical pages of the layout] instead of `query` and `cache`: any
      per-page score (higher is read first), e.g. from a scoring kernel.

  Returns:
    PageTable with `config.table_capacity(layout.num_tokens)` entries per sequence.
  """
  if query is None and cache is None and page_scores is None:
    arrays = _layout_arrays(layout, seq_lens, config, scores, memory_pressure)
    if budget is not None:
      raise ValueError("budget is for query mode: pass query and cache, or page_scores")
    return _route(*arrays, config=config, num_tokens=layout.num_tokens)
  plan = plan_query(layout, seq_lens, config, scores=scores, memory_pressure=memory_pressure)
  return select_pages(plan, query=query, cache=cache, budget=budget, page_scores=page_scores)


def plan_query(layout: BlockLayout, seq_lens: jax.Array, config: RouterConfig, *,
               scores: jax.Array | None = None,
               memory_pressure: jax.Array | float | None = None) -> QueryPlan:
  """The token-level half of query-mode `route`, for one step: which pages are forced, which
  compete, and what a selected page reads. Arguments as `route`'s. Every layer of the step then
  calls `select_pages` with its own query: `select_pages(plan_query(layout, ...), query=q,
  cache=c, budget=b)` is `route(layout, ..., query=q, cache=c, budget=b)`."""
  arrays = _layout_arrays(layout, seq_lens, config, scores, memory_pressure)
  return _plan(*arrays, config=config, num_tokens=layout.num_tokens)


def select_pages(plan: QueryPlan, *, query: jax.Array | None = None, cache=None,
                 budget: jax.Array | int | None = None, page_scores: jax.Array | None = None,
                 implementation: str | None = None) -> PageTable:
  """The page-level half of query-mode `route`: the forced pages, then the best-scoring
  candidate pages up to `budget`. Takes `query` and `cache`, or `page_scores`, as `route`.

  `implementation`: one of SELECTION_IMPLEMENTATIONS for the selection itself (the cut, the ties,
  the compaction); default the platform's kernel where it takes the table, else "reference"
  (`reference_select_pages`). "pallas_gpu_interpret" runs the GPU kernel in Pallas interpret
  mode (tests). Every implementation gives the same table.
  """
  if not isinstance(plan, QueryPlan):
    raise TypeError(f"plan must be a QueryPlan (plan_query), got {type(plan).__name__}")
  if query is None and cache is None and page_scores is None:
    raise ValueError("select_pages needs query and cache, or page_scores")
  if implementation is not None and implementation not in SELECTION_IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} must be None or one of"
                     f" {SELECTION_IMPLEMENTATIONS}")
  page_scores, budgets = _query_mode_inputs(plan.batch_size, plan.num_pages, plan.config, query,
                                            cache, budget, page_scores)
  return _select(plan, page_scores, budgets, implementation=implementation or "default")


def _layout_arrays(layout, seq_lens, config, scores, memory_pressure):
  """Checks `route`'s layout arguments; returns the arrays `_route` and `_plan` take."""
  if not isinstance(layout, BlockLayout):
    raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
  if not isinstance(config, RouterConfig):
    raise TypeError(f"config must be a RouterConfig, got {type(config).__name__}")
  batch, max_blocks = layout.batch_size, layout.max_blocks
  seq_lens = jnp.asarray(seq_lens)
  if seq_lens.shape != (batch,) or not jnp.issubdtype(seq_lens.dtype, jnp.integer):
    raise ValueError(
        f"seq_lens must be an integer array of shape ({batch},), got {seq_lens.dtype}"
        f"{list(seq_lens.shape)}")
  if scores is None:
    scores = layout.scores
  scores = jnp.asarray(scores)
  if scores.shape != (batch, max_blocks) or not jnp.issubdtype(scores.dtype, jnp.floating):
    raise ValueError(
        f"scores must be a float array of shape ({batch}, {max_blocks}), got {scores.dtype}"
        f"{list(scores.shape)}")
  if memory_pressure is None:
    memory_pressure = config.memory_pressure
  memory_pressure = jnp.asarray(memory_pressure, jnp.float32)
  if memory_pressure.shape not in ((), (batch,)):
    raise ValueError(
        f"memory_pressure must be a scalar or shape ({batch},), got {list(memory_pressure.shape)}")
  # The layout's arrays, not the layout: block names must not key the jit cache.
  return (layout.starts, layout.ends, layout.policies, scores.astype(jnp.float32), layout.valid,
          seq_lens.astype(jnp.int32), jnp.broadcast_to(memory_pressure, (batch,)))


def _query_mode_inputs(batch, num_pages, config, query, cache, budget, page_scores):
  """Checks the query-mode arguments of `route` and `select_pages`; returns (page_scores,
  budgets)."""
  if page_scores is not None:
    if query is not None or cache is not None:
      raise ValueError("pass either page_scores or query and cache, not both")
    page_scores = jnp.asarray(page_scores)
    if (page_scores.shape != (batch, num_pages) or
        not jnp.issubdtype(page_scores.dtype, jnp.floating)):
      raise ValueError(
          f"page_scores must be a float array of shape ({batch}, {num_pages}) (the layout's"
          f" pages), got {page_scores.dtype}{list(page_scores.shape)}")
  else:
    if query is None or cache is None:
      raise ValueError("query mode needs both query and cache")
    if not isinstance(cache, (cache_lib.KVCache, sharded.ShardedKVCache)):
      raise TypeError(
          f"cache must be a cache.KVCache or sharded.ShardedKVCache, got {type(cache).__name__}")
    if cache.config.page_size != config.page_size or cache.config.max_seqs != batch:
      raise ValueError(
          f"cache must have page_size={config.page_size} and max_seqs={batch} like the router"
          f" and layout, got page_size={cache.config.page_size}, max_seqs={cache.config.max_seqs}")
    query = jnp.asarray(query)
    scoring.check_query(query, cache.config)
    if config.query_channels is not None:
      sketch = (cache.shards if isinstance(cache, sharded.ShardedKVCache) else cache).key_sketch
      scoring.check_sketch_scoring(sketch, config.query_channels, cache.config.head_dim)
    page_scores = _query_page_scores(query, cache, num_pages=num_pages,
                                     channels=config.query_channels)
  if budget is None:
    budget = config.table_capacity(num_pages * config.page_size)
  budget = jnp.asarray(budget)
  if budget.shape not in ((), (batch,)) or not jnp.issubdtype(budget.dtype, jnp.integer):
    raise ValueError(
        f"budget must be an int, an integer scalar or shape ({batch},), got {budget.dtype}"
        f"{list(budget.shape)}")
  return page_scores.astype(jnp.float32), jnp.broadcast_to(budget.astype(jnp.int32), (batch,))


def explain(table: PageTable, layout: BlockLayout, row: int = 0) -> list[dict]:
  """Host-side rows, one per block of sequence `row`: decision, reason, precision, pages."""
  decisions, reasons, precisions = (
      np.asarray(x[row]) for x in (table.block_decisions, table.block_reasons,
                                   table.block_precisions))
  starts, ends, valid = (np.asarray(x[row]) for x in (layout.starts, layout.ends, layout.valid))
  policies, scores = np.asarray(layout.policies[row]), np.asarray(layout.scores[row])
  ps = table.page_size
  return [
      dict(name=layout.name(row, j), start=int(starts[j]), end=int(ends[j]),
           policy=BlockPolicy(int(policies[j])).name, score=float(scores[j]),
           decision=Decision(int(decisions[j])).name, reason=Reason(int(reasons[j])).name,
           precision=Precision(int(precisions[j])).name,
           pages=(int(starts[j]) // ps, (int(ends[j]) - 1) // ps + 1))
      for j in range(layout.max_blocks) if valid[j]
  ]
