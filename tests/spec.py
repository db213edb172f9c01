"""An independent, plain-numpy statement of the routing and attention rules, for tests only.

Written from the rules in docs/policies.md with simple loops, sharing no code with the library,
so that a test comparing the two fails if either drifts.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import cache as cache_lib
from intent_jax.layout import BlockLayout, BlockPolicy, SemanticBlock
from intent_jax.precision import Precision
from intent_jax.router import RouterConfig, route

FORCED = {BlockPolicy.ALWAYS, BlockPolicy.GLOBAL, BlockPolicy.RECENT}
SCORE_GRID = (0.0, 0.2, 0.5, 0.5, 0.7, 0.75, 0.9, 1.0)  # Repeats make ties.


def random_blocks(rng: np.random.Generator, num_tokens: int, max_blocks: int,
                  *, grid_scores: bool = True) -> list[SemanticBlock]:
  """Up to `max_blocks` random non-overlapping blocks inside [0, num_tokens), with gaps."""
  count = int(rng.integers(0, max_blocks + 1))
  cuts = np.sort(rng.choice(num_tokens + 1, size=min(2 * count, num_tokens + 1), replace=False))
  blocks = []
  for i in range(0, len(cuts) - 1, 2):
    start, end = int(cuts[i]), int(cuts[i + 1])
    if blocks and rng.random() < 0.3:
      start = blocks[-1].end  # Adjacent to the previous block, no gap.
    policy = BlockPolicy(int(rng.integers(len(BlockPolicy))))
    score = float(rng.choice(SCORE_GRID)) if grid_scores else float(rng.random())
    blocks.append(SemanticBlock(f"b{i // 2}", start, end, policy, score))
  return blocks


@dataclasses.dataclass
class Expected:
  selected: np.ndarray  # bool[num_tokens]
  page_ids: list[int]
  page_precisions: list[int]
  overflow: bool
  truncated: bool
  decisions: list[str]  # per block, in start order
  reasons: list[str]
  block_precisions: list[int]


def attend_precision(score: float, pressure: float, config) -> int:
  effective = np.float32(score) * (np.float32(1.0) - np.float32(pressure))
  if effective >= np.float32(config.bf16_min_score):
    return int(Precision.BF16)
  if effective >= np.float32(config.eight_bit_min_score):
    return int(config.eight_bit_format)
  return int(Precision.INT4)


def expected_routing(blocks, num_tokens: int, seq_len: int, config, *, scores=None,
                     pressure=None) -> Expected:
  """What `route` must return for one sequence, by the rules written out token by token."""
  blocks = sorted(blocks, key=lambda b: b.start)
  scores = [np.float32(b.score) for b in blocks] if scores is None else [
      np.float32(s) for s in scores]
  pressure = config.memory_pressure if pressure is None else pressure
  ps = config.page_size
  capacity = config.max_pages or math.ceil(num_tokens / ps)
  length = min(seq_len, num_tokens)
  positions = np.arange(num_tokens)
  in_seq = positions < length

  forced = np.zeros(num_tokens, bool)
  forced[:length] = config.default_policy in FORCED
  for b in blocks:
    forced[b.start:b.end] = b.policy in FORCED
  forced &= in_seq
  window = in_seq & (positions >= seq_len - config.recent_tokens)
  forced |= window

  def tokens_of(j):
    mask = np.zeros(num_tokens, bool)
    mask[blocks[j].start:min(blocks[j].end, length)] = True
    return mask

  def pages_of(mask):
    return set((np.nonzero(mask)[0] // ps).tolist())

  reached = [b.start < length for b in blocks]
  candidates = [
      j for j, b in enumerate(blocks)
      if b.policy == BlockPolicy.ATTEND and scores[j] >= np.float32(config.score_threshold)
      and reached[j]
  ]
  ranked = sorted(candidates, key=lambda j: (-scores[j], -blocks[j].start))
  forced_pages = pages_of(forced)
  forced_fit = len(forced_pages) <= capacity
  truncated = seq_len > num_tokens or not forced_fit
  top = 0
  if forced_fit:
    for k in range(len(ranked), -1, -1):
      pages = set(forced_pages)
      for j in ranked[:k]:
        pages |= pages_of(tokens_of(j))
      if len(pages) <= capacity:
        top = k
        break
  chosen = set(forced_pages)
  for j in ranked[:top]:
    chosen |= pages_of(tokens_of(j))
  kept = set(ranked[:top]) | {j for j in ranked[top:] if pages_of(tokens_of(j)) <= chosen}

  selected = forced.copy()
  precision = np.full(num_tokens, 99)
  precision[forced] = int(Precision.BF16)
  block_precisions = []
  for j, b in enumerate(blocks):
    p = attend_precision(scores[j], pressure, config) if b.policy == BlockPolicy.ATTEND else 0
    block_precisions.append(p)
    if j in kept:
      selected |= tokens_of(j)
      mine = tokens_of(j) & ~forced
      precision[mine] = p

  used_pages = sorted(pages_of(selected))
  page_precisions = [int(precision[p * ps:(p + 1) * ps][selected[p * ps:(p + 1) * ps]].min())
                     for p in used_pages]
  if len(used_pages) > capacity:  # Only when truncated: the table keeps the first pages.
    used_pages, page_precisions = used_pages[:capacity], page_precisions[:capacity]
    kept_mask = np.zeros(num_tokens, bool)
    for p in used_pages:
      kept_mask[p * ps:(p + 1) * ps] = True
    selected &= kept_mask

  decisions, reasons = [], []
  window_start = max(seq_len - config.recent_tokens, 0)
  for j, b in enumerate(blocks):
    attended = reached[j] and (b.policy in FORCED or j in kept)
    touches = reached[j] and config.recent_tokens > 0 and b.end > window_start
    decisions.append("ATTENDED" if attended else "WINDOW_ONLY" if touches else "DROPPED")
    if not reached[j]:
      reasons.append("NOT_REACHED")
    elif b.policy in FORCED or b.policy == BlockPolicy.SKIP:
      reasons.append("POLICY")
    elif j in kept:
      reasons.append("ABOVE_THRESHOLD")
    elif j in candidates:
      reasons.append("OVER_BUDGET")
    else:
      reasons.append("BELOW_THRESHOLD")
  overflow = any(j not in kept for j in candidates)
  return Expected(selected, used_pages, page_precisions, overflow, truncated, decisions, reasons,
                  block_precisions)


def expected_query_routing(blocks, num_tokens: int, seq_len: int, config, page_scores,
                           budget: int, *, pressure=None) -> Expected:
  """What `route(..., page_scores=, budget=)` must return for one sequence (query mode)."""
  blocks = sorted(blocks, key=lambda b: b.start)
  pressure = config.memory_pressure if pressure is None else pressure
  ps = config.page_size
  capacity = config.max_pages or math.ceil(num_tokens / ps)
  length = min(seq_len, num_tokens)
  positions = np.arange(num_tokens)
  in_seq = positions < length
  window = in_seq & (positions >= seq_len - config.recent_tokens)
  forced = np.zeros(num_tokens, bool)
  forced[:length] = config.default_policy in FORCED
  attend = np.zeros(num_tokens, bool)
  for b in blocks:
    forced[b.start:b.end] = b.policy in FORCED
    attend[b.start:b.end] = b.policy == BlockPolicy.ATTEND
  forced = (forced & in_seq) | window
  attend &= in_seq

  pages_of = lambda mask: set((np.nonzero(mask)[0] // ps).tolist())
  forced_pages = pages_of(forced)
  score = lambda p: -np.inf if np.isnan(page_scores[p]) else float(page_scores[p])
  candidates = sorted(pages_of(attend) - forced_pages, key=lambda p: (-score(p), -p))
  room = max(min(budget, capacity) - len(forced_pages), 0)
  pages = forced_pages | set(candidates[:room])
  on_pages = np.isin(positions // ps, sorted(pages))
  selected = forced | (attend & on_pages)

  precision = np.full(num_tokens, 99)
  precision[forced] = int(Precision.BF16)
  block_precisions, decisions, reasons = [], [], []
  window_start = max(seq_len - config.recent_tokens, 0)
  for b in blocks:
    p = attend_precision(b.score, pressure, config) if b.policy == BlockPolicy.ATTEND else 0
    block_precisions.append(p)
    mine = np.zeros(num_tokens, bool)
    mine[b.start:min(b.end, length)] = True
    if b.policy == BlockPolicy.ATTEND:
      precision[mine & selected & ~forced] = p
    reached = b.start < length
    attended = reached and (b.policy in FORCED or
                            (b.policy == BlockPolicy.ATTEND and selected[mine].all()))
    partial = (reached and not attended and b.policy == BlockPolicy.ATTEND and
               (selected & mine & ~window).any())
    touches = reached and config.recent_tokens > 0 and b.end > window_start
    decisions.append("ATTENDED" if attended else "PARTIAL" if partial else
                     "WINDOW_ONLY" if touches else "DROPPED")
    if not reached:
      reasons.append("NOT_REACHED")
    elif b.policy != BlockPolicy.ATTEND:
      reasons.append("POLICY")
    else:
      reasons.append("QUERY_SELECTED" if attended or partial else "QUERY_DROPPED")

  used_pages = sorted(pages_of(selected))
  page_precisions = [int(precision[p * ps:(p + 1) * ps][selected[p * ps:(p + 1) * ps]].min())
                     for p in used_pages]
  truncated = seq_len > num_tokens or len(forced_pages) > capacity
  if len(used_pages) > capacity:  # Only when truncated: the table keeps the first pages.
    used_pages, page_precisions = used_pages[:capacity], page_precisions[:capacity]
    selected &= np.isin(positions // ps, used_pages)
  overflow = len(candidates) > room
  return Expected(selected, used_pages, page_precisions, overflow, truncated, decisions, reasons,
                  block_precisions)


def dense_attention(q, k, v, visible, *, sinks=None, scale=None, softcap=None) -> np.ndarray:
  """float64 attention; visible: bool[batch, q_len, seq]. Rows seeing nothing are zeros."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, q_len, num_q_heads, head_dim = q.shape
  group = num_q_heads // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # kv head of query head h.
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  out = np.zeros_like(q)
  for b in range(batch):
    for i in range(q_len):
      for h in range(num_q_heads):
        keys = np.nonzero(visible[b, i])[0]
        logits = k[b, keys, h] @ q[b, i, h] * scale
        if softcap is not None:
          logits = softcap * np.tanh(logits / softcap)
        extra = [] if sinks is None else [float(sinks[h])]
        if len(keys) == 0 and not extra:
          continue
        top = max(list(logits) + extra)
        weights = np.exp(logits - top)
        denominator = weights.sum() + sum(math.exp(s - top) for s in extra)
        out[b, i, h] = weights @ v[b, keys, h] / denominator
  return out


# Inputs of the kernel tests: small caches holding routed, mixed-precision pages.
KERNEL_TOKENS, KERNEL_BATCH = 300, 3


def kernel_blocks(rng: np.random.Generator, num_tokens: int = KERNEL_TOKENS) -> list:
  """An agentic layout with unaligned, jittered edges: scores 0.9, 0.6 and 0.3 give three
  precisions under pressure; a SKIP block and a gap (the default policy) sit between."""
  edges = np.sort(rng.choice(np.arange(8, num_tokens - 8), size=5, replace=False))
  kinds = [("system", BlockPolicy.ALWAYS, 1.0), ("doc_a", BlockPolicy.ATTEND, 0.9),
           ("doc_b", BlockPolicy.ATTEND, 0.6), ("scratch", BlockPolicy.SKIP, 0.0),
           ("doc_c", BlockPolicy.ATTEND, 0.3), ("turn", BlockPolicy.RECENT, 1.0)]
  bounds = [0] + list(edges[:4]) + [edges[4] + 3, num_tokens]  # A 3-token gap before "turn".
  return [SemanticBlock(name, int(bounds[i]), int(bounds[i + 1]) - (i == 4) * 3, policy, score)
          for i, (name, policy, score) in enumerate(kinds)]


def kernel_case(seed, *, num_kv_heads, head_dim, page_size, dtype, pressure, eight_bit, recent,
                default_policy=BlockPolicy.ALWAYS, formats=tuple(Precision)):
  """A cache holding random K/V for KERNEL_BATCH sequences, with pools for `formats`, and a table
  routed over kernel_blocks layouts; the routed pages are stored in their precisions."""
  rng = np.random.default_rng(seed)
  batch, tokens = KERNEL_BATCH, KERNEL_TOKENS
  pages = -(-tokens // page_size) * batch
  config = cache_lib.CacheConfig(
      num_kv_heads=num_kv_heads, head_dim=head_dim, max_seqs=batch, max_seq_len=tokens,
      page_size=page_size, pool_pages={p: pages for p in formats}, dtype=dtype)
  kk, kv = jax.random.split(jax.random.key(seed))
  k = jax.random.normal(kk, (batch, tokens, num_kv_heads, head_dim))
  v = jax.random.normal(kv, (batch, tokens, num_kv_heads, head_dim))
  lengths = jnp.asarray(rng.integers(tokens // 2, tokens + 1, size=batch), jnp.int32)
  cache = cache_lib.prefill(cache_lib.create(config), k, v, lengths)
  layout = BlockLayout.stack([BlockLayout.from_blocks(kernel_blocks(rng), tokens, max_blocks=6)
                              for _ in range(batch)])
  router_config = RouterConfig(page_size=page_size, recent_tokens=recent, score_threshold=0.2,
                               eight_bit_format=eight_bit, default_policy=default_policy,
                               max_pages=-(-tokens // page_size))
  table = route(layout, lengths, router_config, memory_pressure=pressure)
  return cache_lib.apply_precision(cache, table), table


def tpu_module(fn, *args) -> str:
  """The module of jax.jit(fn)(*args) exported for TPU (args may be ShapeDtypeStructs): runs
  Pallas's Mosaic lowering, which checks block shapes, memory spaces and ops, on any host. The
  compiler inside libtpu, which chooses vector layouts, runs only on a TPU."""
  return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


def cache_shapes(config: cache_lib.CacheConfig):
  """The ShapeDtypeStructs of an empty cache of `config`."""
  return jax.eval_shape(lambda: cache_lib.create(config))
