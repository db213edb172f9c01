"""What routing and KV precision cost in answers: the recall model, its loss, and evaluation.

The recall model is the small decoder trained on `tasks` contexts (benchmarks/train_recall.py);
its checkpoint ships in intent_jax/data. `dense_accuracy` scores it with plain causal attention
over the whole context; `evaluate` (below) scores one routing/precision setting against that.
"""

import collections
import dataclasses
import functools
import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import cache as cache_lib
from intent_jax import cost
from intent_jax import page_table
from intent_jax import quant
from intent_jax import reference
from intent_jax import router as router_lib
from intent_jax import scoring
from intent_jax import tasks
from intent_jax.layout import BlockPolicy
from intent_jax.models import checkpoint
from intent_jax.models import generation
from intent_jax.models.decoder import Decoder, DecoderConfig, create_caches
from intent_jax.precision import Precision, page_bytes
from intent_jax.validation import is_int

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
RECALL_CHECKPOINT = os.path.join(DATA_DIR, "recall_tiny.npz")


def answer_logits(logits: jax.Array, positions: jax.Array) -> jax.Array:
  """f32[batch, queries, vocab]: logits f32[batch, tokens, vocab] at positions
  i32[batch, queries]."""
  return jnp.take_along_axis(logits, positions[..., None], axis=1)


def answer_nll(logits: jax.Array, answers: jax.Array) -> jax.Array:
  """f32[...]: cross-entropy of answer logits f32[..., vocab] against i32[...] answers."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_probs, answers[..., None], axis=-1)[..., 0]


def answer_loss(logits: jax.Array, answers: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy, accuracy) of answer logits f32[..., vocab] against i32[...] answers."""
  correct = jnp.argmax(logits, axis=-1) == answers
  return answer_nll(logits, answers).mean(), correct.mean()


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _dense_answer_logits(graphdef, params, tokens, positions):
  logits, _ = nnx.merge(graphdef, params)(tokens, None)
  return answer_logits(logits, positions)


def dense_answer_logits(model: Decoder, examples: tasks.RecallExamples, *,
                        batch: int = 64) -> np.ndarray:
  """f32[n, num_queries, vocab]: the model's answer logits with dense causal attention."""
  graphdef, params = nnx.split(model)
  pieces = []
  for start in range(0, len(examples), batch):
    part = examples.take(slice(start, start + batch))
    pieces.append(np.asarray(_dense_answer_logits(graphdef, params, jnp.asarray(part.tokens),
                                                  jnp.asarray(part.answer_positions))))
  return np.concatenate(pieces)


def dense_accuracy(model: Decoder, examples: tasks.RecallExamples, *, batch: int = 64) -> float:
  """Fraction of questions answered right (argmax) with dense causal attention."""
  logits = dense_answer_logits(model, examples, batch=batch)
  return float(np.mean(np.argmax(logits, axis=-1) == examples.answers))


def save_recall_model(model: Decoder, task: tasks.RecallTask, path: str, **provenance) -> None:
  """Writes the parameters to `path` (.npz) and the configs and `provenance` beside it (.json)."""
  checkpoint.save(model, path)
  meta = dict(model_config=dataclasses.asdict(model.config), task=dataclasses.asdict(task),
              **provenance)
  with open(os.path.splitext(path)[0] + ".json", "w") as f:
    json.dump(meta, f, indent=2)


def load_recall_model(path: str = RECALL_CHECKPOINT) -> tuple[Decoder, tasks.RecallTask, dict]:
  """(model, the task it was trained on with num_queries=1, the provenance record)."""
  meta_path = os.path.splitext(path)[0] + ".json"
  if not os.path.exists(path) or not os.path.exists(meta_path):
    raise FileNotFoundError(f"no recall checkpoint at {path} (with {meta_path}); train one with"
                            " python -m benchmarks.train_recall")
  with open(meta_path) as f:
    meta = json.load(f)
  model = Decoder(DecoderConfig(**meta["model_config"]), rngs=nnx.Rngs(0))
  checkpoint.load(model, path)
  task = dataclasses.replace(tasks.RecallTask(**meta["task"]), num_queries=1)
  return model, task, meta


# ---------------------------------------------------------------------------------------------
# Evaluating a routing / storage setting.

SCORE_SOURCES = ("runtime", "noisy", "cosine", "query")
KEY_SCALES = ("channel", "token")


@dataclasses.dataclass(frozen=True)
class Setting:
  """One configuration of the quality sweep (hashable).

  Attributes:
    name: row label.
    router: RouterConfig of the step; None reads every page (the layout is ignored).
    scores: "runtime" (the layout's intent), "noisy" (`tasks.noisy_scores` with `noise_p`) or
      "cosine" (each layer routes by the cosine of its query to the blocks' mean keys, inside the
      step; pages stay BF16 since their precision would have to be known before the query) or
      "query" (no intent scores: each layer's query picks the ATTEND pages by their key bounds,
      `route(..., query=)`, under `page_budget`; pages stay BF16).
    noise_p: probability that the answer document tops the noisy scores.
    page_budget: for scores="query", the fraction of the context's pages a table may hold
      (forced pages included; rounded up).
    exact_page_scores: for scores="query", rank pages by their exact largest logit
      (`scoring.page_max_logits`, which reads every key: the ceiling a bound could reach)
      instead of the key-bound scores.
    score_channels: for scores="query", rank pages by their largest logit over this many
      channels (`scoring.top_channel_page_logits`) instead of the key-bound scores.
    score_sketch: with score_channels, the estimate reads the cache's INT4 key sketch
      (`scoring.sketch_page_logits`: only the chosen channels) instead of K as stored.
    skip_answer: the answer's document is SKIPped (the negative control).
    skip_as_attend: SKIP blocks are ATTEND blocks with score 0 (with score_threshold 0: every page
      is read, each in the precision its score gives: the policy's mixed precision).
    storage: every full page read is stored in this Precision; None: the router's precisions.
    key_scales: "channel" (the cache's KIVI split) or "token" (one scale per token of a key;
      the cache does not store that: needs `emulated`).
    emulated: store the fake-quantized values (`storage`, `key_scales`, V per token) in the BF16
      pool instead of real quantized pages; bytes are counted as `storage` pages.
  """

  name: str
  router: object = None
  scores: str = "runtime"
  noise_p: float = 0.8
  page_budget: float = 0.25
  exact_page_scores: bool = False
  score_channels: int | None = None
  score_sketch: bool = False
  skip_answer: bool = False
  skip_as_attend: bool = False
  storage: Precision | None = None
  key_scales: str = "channel"
  emulated: bool = False

  def __post_init__(self):
    if self.scores not in SCORE_SOURCES:
      raise ValueError(f"scores={self.scores!r} must be one of {SCORE_SOURCES}")
    if not 0 < self.page_budget <= 1:
      raise ValueError(f"page_budget={self.page_budget!r} must be in (0, 1]")
    if self.key_scales not in KEY_SCALES:
      raise ValueError(f"key_scales={self.key_scales!r} must be one of {KEY_SCALES}")
    if self.key_scales == "token" and not self.emulated:
      raise ValueError("key_scales='token' is not a cache format: it needs emulated=True")
    if self.emulated and self.storage in (None, Precision.BF16):
      raise ValueError("emulated storage needs a quantized storage Precision")
    if self.score_channels is not None:
      if self.scores != "query" or self.exact_page_scores:
        raise ValueError("score_channels is for scores='query' without exact_page_scores")
      if not is_int(self.score_channels) or self.score_channels < 1:
        raise ValueError(f"score_channels={self.score_channels!r} must be None or an int >= 1")
    if self.score_sketch and self.score_channels is None:
      raise ValueError("score_sketch needs score_channels")
    if self.router is not None and not isinstance(self.router, router_lib.RouterConfig):
      raise TypeError(f"router must be a RouterConfig or None, got {type(self.router).__name__}")


def router_presets(task: tasks.RecallTask, page_size: int = 16) -> dict[str, object]:
  """RouterConfigs from reading much to reading little, for contexts of `task`."""
  pages = -(-task.seq_len // page_size)
  config = functools.partial(router_lib.RouterConfig, page_size=page_size)
  return {
      "conservative": config(score_threshold=0.3, recent_tokens=128),
      "balanced": config(score_threshold=0.5, recent_tokens=64, max_pages=pages * 3 // 8),
      "aggressive": config(score_threshold=0.8, recent_tokens=32, max_pages=pages // 5),
  }


def _setting_layout(examples: tasks.RecallExamples, setting: Setting, seed: int):
  """The unnamed BlockLayout a setting routes (host side)."""
  scores = examples.scores
  if setting.scores == "noisy":
    scores = tasks.noisy_scores(examples, setting.noise_p, seed=seed)
  if setting.scores == "query":
    scores = np.ones_like(scores)  # No intent scores; full precision.
  policies = examples.policies.copy()
  if setting.router is None:
    policies[:] = BlockPolicy.ALWAYS
  if setting.skip_as_attend:
    policies[policies == BlockPolicy.SKIP] = BlockPolicy.ATTEND
  if setting.skip_answer:
    policies[np.arange(len(examples)), examples.answer_blocks[:, 0]] = BlockPolicy.SKIP
  return dataclasses.replace(examples, policies=policies).layout(scores).unnamed()


def _emulated_storage(config: cache_lib.CacheConfig, k, v, lengths, precision: Precision,
                      key_scales: str):
  """A BF16-pool cache holding the contiguous k, v [batch, pages * page_size, heads, dim]
  fake-quantized in `precision`, full pages only, K with one scale per channel of a page or per
  token, V per token."""
  ps = config.page_size
  by_page = lambda x: x.reshape(x.shape[0], -1, ps, *x.shape[2:])  # [b, pages, ps, h, d]
  k_axis = -3 if key_scales == "channel" else -1  # Over the page's tokens, or the channels.
  k_q = quant.fake_quant(by_page(k), precision, k_axis).reshape(k.shape)
  v_q = quant.fake_quant(by_page(v), precision, -1).reshape(v.shape)
  full = (jnp.arange(k.shape[1]) < (lengths // ps * ps)[:, None])[..., None, None]
  k, v = jnp.where(full, k_q, k), jnp.where(full, v_q, v)
  return cache_lib.prefill(cache_lib.create(config), k, v, lengths)


def _read_bytes(table, kv, stored_precision, num_prompt_pages):
  """f32[batch]: bytes a layer's step reads (stored formats; `stored_precision` overrides the
  full prompt pages' format for emulated storage)."""
  precisions = cache_lib.lookup(kv, table)[0]
  if stored_precision is not None:
    full = table.page_ids < num_prompt_pages[:, None]
    precisions = jnp.where(full & (precisions >= 0), int(stored_precision), precisions)
  return cost.routed_kv_bytes(table, kv.config.num_kv_heads, kv.config.head_dim, precisions)


def _route_config(setting: Setting, page_size: int) -> router_lib.RouterConfig:
  return setting.router or router_lib.RouterConfig(page_size=page_size, recent_tokens=0)


def _layer_router(setting: Setting, route_config, layout, lengths, means=None):
  """(route_layer, table): route_layer(layer, q, kv) is the PageTable a layer of `setting` reads
  for sequences of `lengths` (means: per-layer block mean keys, for cosine scores); table is the
  one table of every layer when the setting routes before the query (None otherwise)."""
  ps = route_config.page_size
  table = None if setting.scores in ("cosine", "query") else router_lib.route(
      layout, lengths, route_config)
  plan = router_lib.plan_query(layout, lengths, route_config) if setting.scores == "query" else None
  budget = jnp.ceil(setting.page_budget * -(-lengths // ps)).astype(jnp.int32)
  num_pages = -(-layout.num_tokens // ps)

  def route_layer(layer, q, kv):
    if setting.scores == "cosine":
      scores = scoring.block_cosine_scores(q, means[layer], layout, lengths)
      return router_lib.route(layout, lengths, route_config, scores=scores)
    if setting.scores == "query":
      if setting.score_sketch:
        page_scores = scoring.page_scores(q, kv, channels=setting.score_channels)
      elif setting.score_channels is not None:
        page_scores = scoring.head_relative_scores(
            scoring.top_channel_page_logits(q, kv, channels=setting.score_channels))
      else:
        page_scores = scoring.page_scores(q, kv, exact=setting.exact_page_scores)
      return router_lib.select_pages(plan, budget=budget, page_scores=page_scores[:, :num_pages])
    return table

  return route_layer, table


@functools.partial(jax.jit, static_argnames=("graphdef", "setting"))
def _evaluate_step(graphdef, params, base_caches, base_kv, layout, tokens, answer_positions,
                   answers, fact_positions, answer_blocks, *, setting: Setting):
  """Per-example metrics of one setting's decode step over prefilled BF16 caches (base_kv: their
  contiguous K and V per layer)."""
  model = nnx.merge(graphdef, params)
  config = base_caches[0].config
  ps = config.page_size
  batch = tokens.shape[0]
  rows = jnp.arange(batch)
  position = answer_positions[:, 0]  # The question's key: prefilled before it, fed at the step.
  lengths = position + 1
  route_config = _route_config(setting, ps)
  means = [scoring.block_mean_keys(k, layout, position)
           for k, _ in base_kv] if setting.scores == "cosine" else None
  route_layer, table = _layer_router(setting, route_config, layout, lengths, means)
  if setting.scores in ("cosine", "query"):
    caches = base_caches
  elif setting.emulated:
    caches = tuple(_emulated_storage(config, k, v, position, setting.storage, setting.key_scales)
                   for k, v in base_kv)
  else:
    store = table if setting.storage is None else dataclasses.replace(
        table, precisions=jnp.full_like(table.precisions, int(setting.storage)))
    caches = tuple(cache_lib.apply_precision(c, store) for c in base_caches)
  records = []

  def layer_table(layer, q, kv):
    layer_routed = route_layer(layer, q, kv)
    records.append((q, kv, layer_routed))
    return layer_routed

  logits, _ = model(tokens[rows, position][:, None], caches, lengths=jnp.ones(batch, jnp.int32),
                    table=layer_table, decode=True, implementation="reference")
  example_nll = answer_nll(logits[:, 0], answers[:, 0])
  correct = jnp.argmax(logits[:, 0], axis=-1) == answers[:, 0]

  positions = jnp.arange(config.max_pages_per_seq * ps)
  dense_bytes = (-(-lengths // ps)) * config.num_kv_heads * page_bytes(Precision.BF16, ps,
                                                                      config.head_dim)
  stored = setting.storage if setting.emulated else None
  answer_pages = _block_pages(layout, answer_blocks, ps, config.max_pages_per_seq)
  read_bytes, errors, answer_read, answer_recall = [], [], [], []
  for (q, kv, layer_routed), (k_base, v_base) in zip(records, base_kv):
    read_bytes.append(_read_bytes(layer_routed, kv, stored, position // ps))
    routed_out = reference.paged_attention(q, kv, layer_routed)
    k_now, v_now = cache_lib.dequantized_kv(kv)
    new = (positions == position[:, None])[..., None, None]
    k_full, v_full = jnp.where(new, k_now, k_base), jnp.where(new, v_now, v_base)
    visible = (positions <= position[:, None])[:, None]
    full_out = reference.attention(q, k_full, v_full, mask=visible)
    difference = jnp.linalg.norm((routed_out - full_out).reshape(batch, -1), axis=-1)
    errors.append(difference / jnp.linalg.norm(full_out.reshape(batch, -1), axis=-1))
    mask = page_table.token_mask(layer_routed, positions.size)
    answer_read.append(mask[rows, fact_positions[:, 0]] & mask[rows, fact_positions[:, 0] + 1])
    read_pages = page_table.page_mask(layer_routed, config.max_pages_per_seq)
    answer_recall.append(jnp.sum(read_pages & answer_pages, axis=1) / jnp.sum(answer_pages, 1))
  return dict(correct=correct, nll=example_nll,
              kv_read_fraction=jnp.mean(jnp.stack(read_bytes), axis=0) / dense_bytes,
              attention_error=jnp.mean(jnp.stack(errors), axis=0),
              answer_read=jnp.all(jnp.stack(answer_read), axis=0),
              answer_page_recall=jnp.mean(jnp.stack(answer_recall), axis=0))


def _block_pages(layout, blocks, page_size: int, num_pages: int) -> jax.Array:
  """bool[batch, num_pages]: the pages holding any token of block blocks[b] of row b."""
  rows = jnp.arange(layout.batch_size)
  first = layout.starts[rows, blocks] // page_size
  last = (layout.ends[rows, blocks] - 1) // page_size
  pages = jnp.arange(num_pages)
  return (pages >= first[:, None]) & (pages <= last[:, None])


@jax.jit
def _contiguous_kv(caches):
  return tuple(cache_lib.dequantized_kv(c) for c in caches)


def _base_caches(model: Decoder, examples: tasks.RecallExamples, page_size: int, back: int = 0):
  """BF16 paged caches per layer (with key sketches) holding each context up to (not including)
  the token `back` tokens before its question key, and their contiguous f32 (K, V) per layer."""
  c = model.config
  seq_len = examples.task.seq_len
  all_pages = len(examples) * -(-seq_len // page_size)
  caches = create_caches(c, max_seqs=len(examples), max_seq_len=seq_len, page_size=page_size,
                         pool_pages={p: all_pages for p in Precision}, key_sketch=True)
  graphdef, params = nnx.split(model)
  lengths = examples.answer_positions[:, 0] - back
  prompts = jnp.asarray(examples.tokens[:, :int(lengths.max())])
  _, caches = generation.prefill(graphdef, params, caches, prompts, jnp.asarray(lengths))
  return caches, _contiguous_kv(caches)


def evaluate(model: Decoder, examples: tasks.RecallExamples, settings, *, batch: int = 64,
             page_size: int = 16) -> list[dict]:
  """One row per setting: answer accuracy and NLL, the fraction of KV bytes a step reads (vs
  every page in BF16), the attention output's relative error vs dense attention over BF16 K/V
  (the setting's own queries, mean over layers), how often every layer reads the answer's
  fact, and the share of the answer block's pages a layer reads (mean over layers). Examples ask
  one question each; contexts are prefilled densely once per batch."""
  if examples.task.num_queries != 1:
    raise ValueError(f"examples ask {examples.task.num_queries} questions each; evaluate scores"
                     " contexts that ask one (RecallTask(num_queries=1))")
  graphdef, params = nnx.split(model)
  sums = {s.name: collections.defaultdict(list) for s in settings}
  for index, start in enumerate(range(0, len(examples), batch)):
    part = examples.take(slice(start, start + batch))
    base, base_kv = _base_caches(model, part, page_size)
    arrays = [jnp.asarray(x) for x in (part.tokens, part.answer_positions, part.answers,
                                       part.fact_positions, part.answer_blocks[:, 0])]
    for setting in settings:
      layout = _setting_layout(part, setting, seed=index)
      metrics = _evaluate_step(graphdef, params, base, base_kv, layout, *arrays, setting=setting)
      for key, value in metrics.items():
        sums[setting.name][key].append(np.asarray(value, np.float64))
  rows = []
  for setting in settings:
    values = {key: np.concatenate(parts) for key, parts in sums[setting.name].items()}
    rows.append(dict(name=setting.name, examples=len(examples),
                     accuracy=float(values["correct"].mean()),
                     nll=float(values["nll"].mean()),
                     kv_read_fraction=float(values["kv_read_fraction"].mean()),
                     attention_error=float(values["attention_error"].mean()),
                     answer_read=float(values["answer_read"].mean()),
                     answer_page_recall=float(values["answer_page_recall"].mean())))
  return rows


@functools.partial(jax.jit, static_argnames=("graphdef", "setting", "steps"))
def _trace_steps(graphdef, params, caches, layout, tokens, first, *, setting: Setting, steps: int):
  config = caches[0].config
  route_config = _route_config(setting, config.page_size)
  rows = jnp.arange(tokens.shape[0])

  def step(caches, i):
    position = first + i
    route_layer, _ = _layer_router(setting, route_config, layout, position + 1)
    pages = []

    def layer_table(layer, q, kv):
      table = route_layer(layer, q, kv)
      pages.append(page_table.page_mask(table, config.max_pages_per_seq))
      return table

    _, caches = nnx.merge(graphdef, params)(
        tokens[rows, position][:, None], caches, lengths=jnp.ones_like(position),
        table=layer_table, decode=True, implementation="reference")
    return caches, jnp.stack(pages)

  return jax.lax.scan(step, caches, jnp.arange(steps))[1]


def decode_page_selections(model: Decoder, examples: tasks.RecallExamples, setting: Setting, *,
                           steps: int, batch: int = 64, page_size: int = 16) -> np.ndarray:
  """bool[steps, layers, n, pages]: the pages each layer reads at each of the `steps` decode
  steps that end with the question's key (teacher-forced: the context's own tokens are fed),
  routed as `setting` (its pages stay BF16). Decode traces for prefetch studies."""
  if setting.scores not in ("runtime", "noisy", "query") or setting.storage is not None:
    raise ValueError(f"setting {setting.name!r}: traces route by runtime, noisy or query scores"
                     " over BF16 pages")
  if not 1 <= steps <= int(examples.answer_positions[:, 0].min()):
    raise ValueError(f"steps={steps} must be in [1, the shortest prompt]")
  graphdef, params = nnx.split(model)
  pieces = []
  for index, start in enumerate(range(0, len(examples), batch)):
    part = examples.take(slice(start, start + batch))
    caches, _ = _base_caches(model, part, page_size, back=steps - 1)
    first = jnp.asarray(part.answer_positions[:, 0] - (steps - 1))
    pieces.append(np.asarray(_trace_steps(graphdef, params, caches,
                                          _setting_layout(part, setting, seed=index),
                                          jnp.asarray(part.tokens), first, setting=setting,
                                          steps=steps)))
  return np.concatenate(pieces, axis=2)
