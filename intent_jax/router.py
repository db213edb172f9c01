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
from intent_jax.layout import token_block_ids
from intent_jax.precision import NUM_PRECISIONS, Precision
from intent_jax.validation import as_enum, is_int

BITS_PER_WORD = 32


class Decision(enum.IntEnum):
  """What happened to a block."""

  DROPPED = 0  # None of its tokens are attended.
  ATTENDED = 1  # All of its tokens (up to the sequence length) are attended.
  WINDOW_ONLY = 2  # Dropped, but its tokens inside the recent window are attended.


class Reason(enum.IntEnum):
  """Why a block got its decision."""

  PADDING = 0  # Not a block: layout padding.
  POLICY = 1  # ALWAYS, GLOBAL, RECENT (attended) or SKIP (dropped).
  ABOVE_THRESHOLD = 2  # ATTEND, score >= threshold, within the page budget.
  BELOW_THRESHOLD = 3  # ATTEND, score < threshold.
  OVER_BUDGET = 4  # ATTEND, score >= threshold, dropped to fit max_pages.
  NOT_REACHED = 5  # The block starts at or past the sequence length.


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


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "page_ids", "num_pages", "precisions", "token_bits", "seq_lens", "block_decisions",
        "block_reasons", "block_precisions", "overflow", "truncated"
    ],
    meta_fields=["page_size"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class PageTable:
  """What attention reads, per sequence. Only the first `num_pages` entries are meaningful.

  Attributes:
    page_ids: i32[batch, max_pages], logical page ids (token t lives in page t // page_size),
      ascending; padding entries are 0 with no token bits.
    num_pages: i32[batch], number of selected pages.
    precisions: i32[batch, max_pages], Precision of each selected page.
    token_bits: u32[batch, max_pages, words], bit i of word w set iff token
      page_id * page_size + 32 * w + i is attended.
    seq_lens: i32[batch], sequence lengths the table was routed for.
    block_decisions: i32[batch, max_blocks], Decision of each layout block.
    block_reasons: i32[batch, max_blocks], Reason of each layout block.
    block_precisions: i32[batch, max_blocks], Precision the rule gives each block.
    overflow: bool[batch], an ATTEND block was dropped to fit max_pages.
    truncated: bool[batch], the table misses tokens the policy requires (forced pages over
      max_pages, or a sequence longer than the layout); attention on such a row is wrong.
    page_size: static, tokens per page.
  """

  page_ids: jax.Array
  num_pages: jax.Array
  precisions: jax.Array
  token_bits: jax.Array
  seq_lens: jax.Array
  block_decisions: jax.Array
  block_reasons: jax.Array
  block_precisions: jax.Array
  overflow: jax.Array
  truncated: jax.Array
  page_size: int

  @property
  def batch_size(self) -> int:
    return self.page_ids.shape[0]

  @property
  def max_pages(self) -> int:
    return self.page_ids.shape[1]

  def page_token_mask(self) -> jax.Array:
    """bool[batch, max_pages, page_size]: the attended tokens of each table entry."""
    offsets = jnp.arange(self.page_size, dtype=jnp.uint32)
    words = self.token_bits[..., offsets // BITS_PER_WORD]
    bits = (words >> (offsets % BITS_PER_WORD)) & 1
    in_table = jnp.arange(self.max_pages) < self.num_pages[:, None]
    return (bits == 1) & in_table[..., None]

  def token_positions(self) -> jax.Array:
    """i32[batch, max_pages, page_size]: the sequence position of each table slot."""
    offsets = jnp.arange(self.page_size, dtype=jnp.int32)
    return self.page_ids[..., None] * self.page_size + offsets

  def query_positions(self, q_len: int) -> jax.Array:
    """i32[batch, q_len]: positions of the last `q_len` tokens of each sequence."""
    return self.seq_lens[:, None] - q_len + jnp.arange(q_len, dtype=jnp.int32)


def token_mask(table: PageTable, num_tokens: int) -> jax.Array:
  """bool[batch, num_tokens]: exactly the tokens `table` attends."""
  positions = table.token_positions()
  positions = jnp.where(table.page_token_mask(), positions, num_tokens)
  rows = jnp.arange(table.batch_size)[:, None, None]
  mask = jnp.zeros((table.batch_size, num_tokens), jnp.bool_)
  return mask.at[rows, positions].set(True, mode="drop")


def page_mask(table: PageTable, num_pages: int) -> jax.Array:
  """bool[batch, num_pages]: the logical pages `table` reads."""
  in_table = jnp.arange(table.max_pages) < table.num_pages[:, None]
  page_ids = jnp.where(in_table, table.page_ids, num_pages)
  rows = jnp.arange(table.batch_size)[:, None]
  mask = jnp.zeros((table.batch_size, num_pages), jnp.bool_)
  return mask.at[rows, page_ids].set(True, mode="drop")


def _pack_bits(selected: jax.Array) -> jax.Array:
  """bool[pages, page_size] -> u32[pages, words]; token i is bit i % 32 of word i // 32."""
  pages, page_size = selected.shape
  width = min(page_size, BITS_PER_WORD)
  lanes = selected.reshape(pages, page_size // width, width).astype(jnp.uint32)
  return jnp.sum(lanes << jnp.arange(width, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _route_sequence(starts, ends, policies, scores, valid, block_of_token, seq_len, pressure, *,
                    config: RouterConfig, num_tokens: int):
  """Routes one sequence; arrays are one row of the layout. Returns PageTable fields."""
  ps = config.page_size
  num_logical = math.ceil(num_tokens / ps)
  capacity = config.table_capacity(num_tokens)
  n = starts.shape[0]  # Index n stands for "no block" in per-token lookups.
  with_gap = lambda per_block, gap: jnp.append(per_block, jnp.asarray(gap, per_block.dtype))
  by_page = lambda per_token: per_token.reshape(num_logical, ps)

  tokens = jnp.arange(num_logical * ps, dtype=jnp.int32)
  length = jnp.minimum(seq_len, num_tokens)  # Tokens past the layout's capacity do not exist.
  in_seq = tokens < length
  in_window = in_seq & (tokens >= seq_len - config.recent_tokens)
  reached = valid & (starts < length)

  forced_block = valid & jnp.isin(policies, jnp.asarray([int(p) for p in FORCED_POLICIES]))
  attend_block = valid & (policies == int(BlockPolicy.ATTEND))
  candidate = attend_block & (scores >= config.score_threshold)
  gap_forced = config.default_policy in FORCED_POLICIES
  forced_token = in_window | (in_seq & with_gap(forced_block, gap_forced)[block_of_token])

  # Rank candidates best first: higher score, then later start. Others rank n.
  order = jnp.lexsort((-starts, jnp.where(candidate, -scores, jnp.inf)))
  rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  rank = jnp.where(candidate, rank, n)

  # Keeping the top k candidates selects the forced pages plus every page whose best candidate
  # token has rank < k. Count the pages each rank adds, then take the largest k that fits.
  forced_page = by_page(forced_token).any(axis=1)
  best_rank = by_page(jnp.where(in_seq, with_gap(rank, n)[block_of_token], n)).min(axis=1)
  first_needed_by = jnp.where(forced_page, n, best_rank)
  pages_added = jnp.sum(first_needed_by[:, None] == jnp.arange(n), axis=0, dtype=jnp.int32)
  pages_for_top = jnp.sum(forced_page) + jnp.concatenate(
      [jnp.zeros(1, jnp.int32), jnp.cumsum(pages_added)])
  keep_top = jnp.sum(pages_for_top <= capacity) - 1  # -1: the forced pages alone do not fit.
  truncated = (keep_top < 0) | (seq_len > num_tokens)
  keep_top = jnp.maximum(keep_top, 0)

  # A candidate outside the top k whose pages are all selected anyway costs nothing: keep it.
  page_selected = forced_page | (best_rank < keep_top)
  off_page = in_seq & ~jnp.repeat(page_selected, ps)
  off_before = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(off_page, dtype=jnp.int32)])
  clip = lambda x: jnp.clip(x, 0, num_logical * ps)
  needs_page = valid & (off_before[clip(ends)] > off_before[clip(starts)])
  kept = candidate & reached & ((rank < keep_top) | ~needs_page)
  overflow = jnp.any(candidate & reached & ~kept)

  block_precision = jnp.where(attend_block, precision_for_score(scores, pressure, config),
                              int(Precision.BF16))
  selected = forced_token | (in_seq & with_gap(kept, False)[block_of_token])
  token_precision = jnp.where(forced_token, int(Precision.BF16),
                              with_gap(block_precision, int(Precision.BF16))[block_of_token])
  token_precision = jnp.where(selected, token_precision, NUM_PRECISIONS)
  page_precision = by_page(token_precision).min(axis=1)
  page_used = by_page(selected).any(axis=1)

  # Compact the used pages, in ascending order, into the table's `capacity` slots; unused pages
  # get an out-of-range slot and are dropped (no two writes share a slot).
  slot = jnp.where(page_used, jnp.cumsum(page_used) - 1, capacity)
  compact = lambda values, fill: jnp.full((capacity,) + values.shape[1:], fill,
                                          values.dtype).at[slot].set(values, mode="drop")
  page_ids = compact(jnp.arange(num_logical, dtype=jnp.int32), 0)
  precisions = compact(page_precision.astype(jnp.int32), int(Precision.BF16))
  token_bits = compact(_pack_bits(by_page(selected)), 0)
  num_pages = jnp.minimum(jnp.sum(page_used), capacity).astype(jnp.int32)

  attended = (forced_block | kept) & reached
  window_start = jnp.maximum(seq_len - config.recent_tokens, 0)
  touches_window = reached & (ends > window_start) & (config.recent_tokens > 0)
  decisions = jnp.where(attended, int(Decision.ATTENDED),
                        jnp.where(touches_window, int(Decision.WINDOW_ONLY),
                                  int(Decision.DROPPED)))
  reasons = jnp.select(
      [~valid, ~reached, forced_block | (policies == int(BlockPolicy.SKIP)), kept, candidate],
      [int(Reason.PADDING), int(Reason.NOT_REACHED), int(Reason.POLICY),
       int(Reason.ABOVE_THRESHOLD), int(Reason.OVER_BUDGET)],
      int(Reason.BELOW_THRESHOLD))
  return dict(
      page_ids=page_ids,
      num_pages=num_pages,
      precisions=precisions,
      token_bits=token_bits,
      seq_lens=seq_len.astype(jnp.int32),
      block_decisions=decisions.astype(jnp.int32),
      block_reasons=reasons.astype(jnp.int32),
      block_precisions=block_precision.astype(jnp.int32),
      overflow=overflow,
      truncated=truncated,
  )


@functools.partial(jax.jit, static_argnames=("config", "num_tokens"))
def _route(starts, ends, policies, scores, valid, seq_lens, memory_pressure, *,
           config: RouterConfig, num_tokens: int):
  # Takes the layout's arrays, not the layout: block names must not key the jit cache.
  padded_tokens = math.ceil(num_tokens / config.page_size) * config.page_size
  layout = BlockLayout(starts, ends, policies, scores, valid, names=(), num_tokens=num_tokens)
  block_of_token = token_block_ids(layout, padded_tokens)
  route_one = functools.partial(_route_sequence, config=config, num_tokens=num_tokens)
  fields = jax.vmap(route_one)(starts, ends, policies, scores, valid, block_of_token, seq_lens,
                               memory_pressure)
  return PageTable(**fields, page_size=config.page_size)


def route(
    layout: BlockLayout,
    seq_lens: jax.Array,
    config: RouterConfig,
    *,
    scores: jax.Array | None = None,
    memory_pressure: jax.Array | float | None = None,
) -> PageTable:
  """Routes a batch of layouts into a PageTable.

  Args:
    layout: BlockLayout with `batch` rows.
    seq_lens: i32[batch], current length of each sequence (<= layout.num_tokens).
    config: static RouterConfig.
    scores: optional f32[batch, max_blocks], overrides the layout's scores (dynamic scoring).
    memory_pressure: optional f32 scalar or f32[batch], overrides config.memory_pressure.

  Returns:
    PageTable with `config.table_capacity(layout.num_tokens)` entries per sequence.
  """
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
  memory_pressure = jnp.broadcast_to(memory_pressure, (batch,))
  return _route(layout.starts, layout.ends, layout.policies, scores.astype(jnp.float32),
                layout.valid, seq_lens.astype(jnp.int32), memory_pressure, config=config,
                num_tokens=layout.num_tokens)


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
