"""Semantic layouts: which token ranges of a context carry which intent.

A `SemanticBlock` is a plain frozen description of one token range `[start, end)`. A
`BlockLayout` holds the blocks of a batch of sequences as padded arrays (a struct of arrays), so
that the router can be jit-compiled and vmapped over it.
"""

from collections.abc import Sequence
import dataclasses
import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np

from intent_jax.validation import as_enum, is_int


class BlockPolicy(enum.IntEnum):
  """What the router does with the tokens of a block."""

  ALWAYS = 0  # Always attended at full precision (system prompt).
  ATTEND = 1  # Attended iff score >= RouterConfig.score_threshold; precision by score.
  SKIP = 2  # Never attended, except tokens inside the recent window.
  RECENT = 3  # Attended at full precision (the current turns).
  GLOBAL = 4  # Always attended at full precision (memory, instructions).


# Policies whose tokens are attended whatever their score and the page budget.
FORCED_POLICIES = (BlockPolicy.ALWAYS, BlockPolicy.RECENT, BlockPolicy.GLOBAL)


@dataclasses.dataclass(frozen=True)
class SemanticBlock:
  """The tokens `[start, end)` of one sequence, with a policy and a score in [0, 1]."""

  name: str
  start: int
  end: int
  policy: BlockPolicy
  score: float = 1.0

  def __post_init__(self):
    if not isinstance(self.name, str):
      raise TypeError(f"block name must be a str, got {self.name!r}")
    where = f"block {self.name!r}"
    for field in ("start", "end"):
      if not is_int(getattr(self, field)):
        raise TypeError(f"{where}: {field} must be an int, got {getattr(self, field)!r}")
    if self.start < 0:
      raise ValueError(f"{where}: start={self.start} is negative")
    if self.start >= self.end:
      raise ValueError(f"{where}: start={self.start} must be < end={self.end}")
    object.__setattr__(self, "policy", as_enum(BlockPolicy, self.policy, f"{where}: policy"))
    if isinstance(self.score, bool) or not isinstance(self.score, (int, float, np.floating)):
      raise TypeError(f"{where}: score must be a float, got {self.score!r}")
    if not 0.0 <= self.score <= 1.0:  # Also rejects NaN.
      raise ValueError(f"{where}: score={self.score} is outside [0, 1]")
    object.__setattr__(self, "start", int(self.start))
    object.__setattr__(self, "end", int(self.end))
    object.__setattr__(self, "score", float(self.score))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["starts", "ends", "policies", "scores", "valid"],
    meta_fields=["names", "num_tokens"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
  """The blocks of a batch of sequences, padded to a common number of blocks.

  Attributes:
    starts: i32[batch, max_blocks], first token of each block.
    ends: i32[batch, max_blocks], one past the last token of each block.
    policies: i32[batch, max_blocks], BlockPolicy values.
    scores: f32[batch, max_blocks], intent scores in [0, 1].
    valid: bool[batch, max_blocks], False for padding entries.
    names: static, one tuple of block names per sequence ("" for padding), or () when the
      layout is `unnamed()`. Being static, names key jit caches: pass `layout.unnamed()` into
      jitted code that sees a new layout every call.
    num_tokens: static, the token capacity every sequence of the batch fits in.
  """

  starts: jax.Array
  ends: jax.Array
  policies: jax.Array
  scores: jax.Array
  valid: jax.Array
  names: tuple[tuple[str, ...], ...]
  num_tokens: int

  @property
  def batch_size(self) -> int:
    return self.starts.shape[0]

  @property
  def max_blocks(self) -> int:
    return self.starts.shape[1]

  @classmethod
  def from_blocks(
      cls,
      blocks: Sequence[SemanticBlock],
      num_tokens: int,
      *,
      max_blocks: int | None = None,
  ) -> "BlockLayout":
    """A batch of one sequence of `num_tokens` tokens, blocks sorted by start.

    Raises:
      ValueError: blocks overlap or end past `num_tokens`, or more than `max_blocks`.
    """
    if not is_int(num_tokens) or num_tokens <= 0:
      raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if isinstance(blocks, SemanticBlock) or not isinstance(blocks, Sequence):
      raise TypeError(f"blocks must be a sequence of SemanticBlock, got {type(blocks).__name__}")
    for i, block in enumerate(blocks):
      if not isinstance(block, SemanticBlock):
        raise TypeError(f"blocks[{i}] must be a SemanticBlock, got {type(block).__name__}")
    ordered = sorted(blocks, key=lambda b: b.start)
    for block in ordered:
      if block.end > num_tokens:
        raise ValueError(
            f"block {block.name!r}: end={block.end} is past num_tokens={num_tokens}")
    for before, after in zip(ordered, ordered[1:]):
      if before.end > after.start:
        raise ValueError(
            f"blocks {before.name!r} [{before.start}, {before.end}) and {after.name!r}"
            f" [{after.start}, {after.end}) overlap")
    width = max(len(ordered), 1) if max_blocks is None else max_blocks
    if not is_int(width) or width < max(len(ordered), 1):
      raise ValueError(
          f"max_blocks={max_blocks!r} must be an int >= the number of blocks ({len(ordered)})"
          " and >= 1")
    pad = width - len(ordered)
    column = lambda values, fill, dtype: jnp.asarray([list(values) + [fill] * pad], dtype)
    return cls(
        starts=column((b.start for b in ordered), 0, jnp.int32),
        ends=column((b.end for b in ordered), 0, jnp.int32),
        policies=column((int(b.policy) for b in ordered), int(BlockPolicy.SKIP), jnp.int32),
        scores=column((b.score for b in ordered), 0.0, jnp.float32),
        valid=column((True for _ in ordered), False, jnp.bool_),
        names=(tuple(b.name for b in ordered) + ("",) * pad,),
        num_tokens=int(num_tokens),
    )

  @classmethod
  def stack(cls, layouts: Sequence["BlockLayout"]) -> "BlockLayout":
    """Concatenates layouts along the batch axis, padding to the widest one."""
    if not layouts or not all(isinstance(l, BlockLayout) for l in layouts):
      raise TypeError("layouts must be a non-empty sequence of BlockLayout")
    width = max(l.max_blocks for l in layouts)

    def pad(layout: BlockLayout) -> BlockLayout:
      extra = width - layout.max_blocks
      grow = lambda x, fill: jnp.pad(x, ((0, 0), (0, extra)), constant_values=fill)
      return cls(
          starts=grow(layout.starts, 0),
          ends=grow(layout.ends, 0),
          policies=grow(layout.policies, int(BlockPolicy.SKIP)),
          scores=grow(layout.scores, 0.0),
          valid=grow(layout.valid, False),
          names=tuple(row + ("",) * extra for row in layout.names),
          num_tokens=layout.num_tokens,
      )

    padded = [pad(l) for l in layouts]
    cat = lambda field: jnp.concatenate([getattr(l, field) for l in padded], axis=0)
    return cls(
        starts=cat("starts"),
        ends=cat("ends"),
        policies=cat("policies"),
        scores=cat("scores"),
        valid=cat("valid"),
        names=sum((l.names for l in padded), ()),
        num_tokens=max(l.num_tokens for l in padded),
    )

  def unnamed(self) -> "BlockLayout":
    """The same layout without names, so that jit traces once per shape, not per name."""
    return dataclasses.replace(self, names=())

  def name(self, row: int, block: int) -> str:
    """The name of a block, or "block_<index>" for an unnamed layout."""
    return self.names[row][block] if self.names else f"block_{block}"

  def blocks(self, row: int = 0) -> tuple[SemanticBlock, ...]:
    """The valid blocks of sequence `row` as SemanticBlocks (host side)."""
    starts, ends, policies, scores, valid = (
        np.asarray(x[row]) for x in (self.starts, self.ends, self.policies, self.scores,
                                     self.valid))
    return tuple(
        SemanticBlock(self.name(row, j), int(starts[j]), int(ends[j]),
                      BlockPolicy(int(policies[j])), float(scores[j]))
        for j in range(self.max_blocks) if valid[j])


def token_block_ids(layout: BlockLayout, num_tokens: int) -> jax.Array:
  """i32[batch, num_tokens]: the block covering each token, or max_blocks if none does.

  Blocks need not be sorted; valid blocks must not overlap. Linear in tokens, with no search
  loop: the running count of block starts up to a token gives the last block starting there.
  """

  def one_sequence(starts, ends, valid):
    n = starts.shape[0]
    order = jnp.argsort(jnp.where(valid, starts, jnp.iinfo(jnp.int32).max))
    marks = jnp.zeros(num_tokens, jnp.int32).at[jnp.where(valid, starts, num_tokens)].add(
        1, mode="drop")
    last = jnp.cumsum(marks) - 1  # Sorted index of the last valid block starting at or before.
    block = order[jnp.maximum(last, 0)]
    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    covered = (last >= 0) & valid[block] & (tokens < ends[block])
    return jnp.where(covered, block, n).astype(jnp.int32)

  return jax.vmap(one_sequence)(layout.starts, layout.ends, layout.valid)


def grow_block(layout: BlockLayout, index, ends) -> BlockLayout:
  """Block `index` of every sequence ends at ends[b] (i32[batch]): an open turn that follows the
  sequence as tokens are appended. Traced values allowed: a jitted decode step does not retrace."""
  return dataclasses.replace(layout, ends=layout.ends.at[:, index].set(ends.astype(jnp.int32)))


def set_block(layout: BlockLayout, row, index, start, end, policy, score) -> BlockLayout:
  """Block `index` of sequence `row` becomes [start, end) with `policy` and `score`, valid: e.g.
  a finished turn closed into a block with a new policy, written into a padding slot. Values may be
  traced; the caller keeps blocks from overlapping (names, being static, are left as they are)."""
  at = lambda field, value, dtype: getattr(layout, field).at[row, index].set(
      jnp.asarray(value, dtype))
  return dataclasses.replace(
      layout, starts=at("starts", start, jnp.int32), ends=at("ends", end, jnp.int32),
      policies=at("policies", policy, jnp.int32), scores=at("scores", score, jnp.float32),
      valid=at("valid", True, jnp.bool_))
