"""Seeded synthetic agentic contexts laid out as SemanticBlocks.

A context is, in order: a system prompt (ALWAYS), a memory summary (GLOBAL), retrieved documents
(ATTEND; one relevant, the rest less so), tool outputs (ATTEND; the oldest SKIPped as stale), a
scratchpad (SKIP), older turns (ATTEND) and recent turns (RECENT). Segments are separated by a few
tokens no block covers (chat-template tokens), so block edges do not line up with pages.
"""

import numpy as np

import jax.numpy as jnp

from intent_jax.layout import BlockLayout, BlockPolicy, SemanticBlock

TRACE_LENGTHS = {"8k": 8192, "32k": 32768, "128k": 131072, "1m": 1048576}

# Share of the context per segment kind, before jitter.
_SHARES = dict(system=0.02, memory=0.03, documents=0.45, tools=0.20, scratchpad=0.12,
               old_turns=0.12, recent_turns=0.06)


def agentic_blocks(num_tokens: int, *, seed: int = 0, num_documents: int = 8,
                   num_tool_outputs: int = 4, num_turns: int = 6) -> list[SemanticBlock]:
  """The blocks of one synthetic agentic context of exactly `num_tokens` tokens."""
  segments = 4 + num_documents + num_tool_outputs + num_turns
  if num_tokens < 16 * segments:
    raise ValueError(f"num_tokens={num_tokens} is too small for {segments} segments")
  if num_turns < 3:
    raise ValueError(f"num_turns={num_turns} must be >= 3 (older and recent turns)")
  rng = np.random.default_rng(seed)
  relevant = int(rng.integers(num_documents))
  plan = [("system", BlockPolicy.ALWAYS, 1.0, _SHARES["system"]),
          ("memory", BlockPolicy.GLOBAL, 1.0, _SHARES["memory"])]
  doc_shares = rng.dirichlet(np.full(num_documents, 4.0)) * _SHARES["documents"]
  for i, share in enumerate(doc_shares):
    score = rng.uniform(0.85, 1.0) if i == relevant else rng.uniform(0.05, 0.7)
    plan.append((f"doc_{i}", BlockPolicy.ATTEND, score, share))
  tool_shares = rng.dirichlet(np.full(num_tool_outputs, 4.0)) * _SHARES["tools"]
  for i, share in enumerate(tool_shares):
    policy = BlockPolicy.SKIP if i == 0 else BlockPolicy.ATTEND
    plan.append((f"tool_{i}", policy, rng.uniform(0.2, 0.8), share))
  plan.append(("scratchpad", BlockPolicy.SKIP, 0.0, _SHARES["scratchpad"]))
  num_old = num_turns - 2
  for i in range(num_old):
    plan.append((f"turn_{i}", BlockPolicy.ATTEND, rng.uniform(0.4, 0.9),
                 _SHARES["old_turns"] / num_old))
  for i in range(num_old, num_turns):
    plan.append((f"turn_{i}", BlockPolicy.RECENT, 1.0, _SHARES["recent_turns"] / 2))

  separators = rng.integers(1, 8, size=len(plan))
  shares = np.array([share for *_, share in plan]) * rng.uniform(0.8, 1.2, size=len(plan))
  budget = num_tokens - int(separators.sum())
  lengths = np.maximum(np.floor(shares / shares.sum() * budget).astype(int), 1)
  lengths[-1] += budget - lengths.sum()  # The last turn ends the context.
  blocks, position = [], 0
  for (name, policy, score, _), gap, length in zip(plan, separators, lengths):
    position += int(gap)
    score = float(np.float32(score))  # Layouts store float32: keep blocks round-tripping.
    blocks.append(SemanticBlock(name, position, position + int(length), policy, score))
    position += int(length)
  return blocks


def agentic_batch(seq_lens, *, seed: int = 0, max_blocks: int | None = None,
                  capacity: int | None = None, **kwargs) -> BlockLayout:
  """A BlockLayout of one synthetic context per length in `seq_lens` (seeds seed, seed+1...),
  with room for `capacity` tokens (default the longest length) so that sequences can grow."""
  seq_lens = [int(n) for n in seq_lens]
  capacity = max(seq_lens) if capacity is None else capacity
  layouts = [
      BlockLayout.from_blocks(agentic_blocks(n, seed=seed + i, **kwargs), capacity,
                              max_blocks=max_blocks) for i, n in enumerate(seq_lens)
  ]
  return BlockLayout.stack(layouts)


def drifting_scores(layout: BlockLayout, num_steps: int, *, seed: int = 0,
                    step_size: float = 0.05):
  """f32[num_steps, batch, max_blocks]: the layout's scores on a clipped random walk.

  Stands in for intent scores a runtime revises from one decode step to the next.
  """
  rng = np.random.default_rng(seed)
  steps = rng.normal(0.0, step_size, size=(num_steps,) + layout.scores.shape)
  steps[0] = 0.0
  walk = np.asarray(layout.scores)[None] + np.cumsum(steps, axis=0)
  return jnp.asarray(np.clip(walk, 0.0, 1.0), jnp.float32)
