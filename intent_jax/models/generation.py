"""Prefill, decode steps and generation over routed KV caches, jit-compiled, caches donated.

A generation prefills a batch of prompts of different lengths, routes their layouts (stores the
pages in the precision the router gives them), then decodes in chunks: each chunk is one jitted
`lax.scan` of decode steps on the device (route, append, attend, sample; no host round trip), and
the host looks once per chunk to stop when every sequence has produced EOS and to draw progress.
"""

import dataclasses
import functools
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import sharded
from intent_jax import layout as layout_lib
from intent_jax import router
from intent_jax.models.decoder import Decoder


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are drawn: greedy at temperature 0, else softmax(logits / temperature) over the
  top_k most likely tokens (all when None). After eos_id a sequence emits pad_id."""

  temperature: float = 0.0
  top_k: int | None = None
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k={self.top_k} must be None or >= 1")


def sample(logits, key, sampling: SamplingConfig):
  """i32[batch] drawn from logits f32[batch, vocab]."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  return jax.random.categorical(key, logits).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Generated:
  """tokens i32[batch, max_new_tokens] (pad after EOS); num_generated i32[batch] (EOS included);
  kvs: the per-layer KV stores after the last step."""

  tokens: jax.Array
  num_generated: jax.Array
  kvs: tuple


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("kvs",))
def prefill(graphdef, params, kvs, prompts, lengths):
  """Runs the prompts (i32[batch, tokens], real lengths i32[batch]) into empty KV stores.

  Returns (logits f32[batch, vocab] at each prompt's last token, kvs).
  """
  logits, kvs = nnx.merge(graphdef, params)(prompts, kvs, lengths=lengths)
  return logits[jnp.arange(prompts.shape[0]), lengths - 1], kvs


def _decode(model, tokens, kvs, counts, table, implementation):
  return model(tokens, kvs, lengths=counts, table=table, decode=True,
               implementation=implementation)


@functools.partial(jax.jit, static_argnames=("graphdef", "implementation"),
                   donate_argnames=("kvs",))
def decode_step(graphdef, params, kvs, tokens, counts, table=None, implementation=None):
  """One decode step: appends counts[b] of tokens i32[batch, 1..8] and attends.

  `table` is routed for the lengths after the step (KVCaches; None for DenseKVs). Returns
  (logits f32[batch, tokens, vocab], kvs).
  """
  return _decode(nnx.merge(graphdef, params), tokens, kvs, counts, table, implementation)


def _route(layout, lengths, kvs, router_config):
  return router.route(layout, lengths, router_config,
                      memory_pressure=sharded.cache_functions(kvs[0]).memory_pressure(kvs[0]))


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "router_config", "sampling",
                                             "open_block", "implementation"),
                   donate_argnames=("kvs",))
def decode_chunk(graphdef, params, kvs, last, done, limits, layout, key, *, steps, router_config,
                 sampling, open_block, implementation):
  """`steps` decode steps on the device, each feeding the last token of every running sequence.

  Args:
    graphdef, params: the model, split (nnx.split).
    kvs: per-layer KV stores (KVCaches: routed; DenseKVs: dense).
    last: i32[batch], the token each sequence feeds next; done: bool[batch] (EOS seen).
    limits: i32[batch], lengths at which a sequence stops appending (emits pad).
    layout: BlockLayout of the batch (routed mode), or None.
    key: PRNG key of the chunk.
    steps, router_config, sampling, open_block, implementation: static.

  Returns:
    (kvs, last, done, layout, tokens i32[batch, steps]).
  """
  model = nnx.merge(graphdef, params)
  routed = isinstance(kvs[0], sharded.PAGED_CACHES)

  def step(carry, step_key):
    kvs, last, done, layout = carry
    running = ~done & (kvs[0].lengths < limits)
    counts = running.astype(jnp.int32)
    table = None
    if routed:
      lengths = kvs[0].lengths + counts
      if open_block is not None:
        layout = layout_lib.grow_block(layout, open_block, lengths)
      table = _route(layout, lengths, kvs, router_config)
    logits, kvs = _decode(model, last[:, None], kvs, counts, table, implementation)
    token = jnp.where(running, sample(logits[:, 0], step_key, sampling), sampling.pad_id)
    if sampling.eos_id is not None:
      done = done | (token == sampling.eos_id)
    return (kvs, token, done, layout), token

  (kvs, last, done, layout), tokens = jax.lax.scan(step, (kvs, last, done, layout),
                                                   jax.random.split(key, steps))
  return kvs, last, done, layout, tokens.T


def _progress(done_tokens: int, total: int) -> None:
  width = 30
  filled = width * done_tokens // max(total, 1)
  sys.stderr.write(f"\rgenerate [{'#' * filled}{'.' * (width - filled)}] {done_tokens}/{total}")
  if done_tokens >= total:
    sys.stderr.write("\n")
  sys.stderr.flush()


def generate(model: Decoder, prompts, prompt_lengths, kvs: tuple, *, max_new_tokens: int,
             layout: layout_lib.BlockLayout | None = None,
             router_config: router.RouterConfig | None = None, open_block: int | None = None,
             sampling: SamplingConfig = SamplingConfig(), key=None, chunk: int = 16,
             progress: bool = False, implementation=None) -> Generated:
  """Generates up to `max_new_tokens` tokens for a batch of prompts of different lengths.

  Args:
    model: the decoder.
    prompts: i32[batch, tokens], padded; prompt_lengths: i32[batch].
    kvs: empty per-layer stores (the caches are donated): KVCaches (or ShardedKVCaches, split
      over a mesh) route every decode step;
      DenseKVs attend every token (the dense baseline).
    max_new_tokens: tokens to generate per sequence (prompt length + this <= the stores' capacity).
    layout: the batch's BlockLayout (routed mode; default: no blocks, every token attended).
    router_config: routed mode's RouterConfig (default RouterConfig()).
    open_block: index of a layout block that grows with the generated tokens (the current turn).
    sampling: greedy or temperature/top-k, EOS; key: PRNG key (needed when temperature > 0).
    chunk: decode steps per jitted chunk; the host looks once per chunk.
    progress: draw a progress bar on stderr.
    implementation: decode_attention's implementation.
  """
  batch = prompts.shape[0]
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  capacity = (kvs[0].config.max_seq_len if isinstance(kvs[0], sharded.PAGED_CACHES) else
              kvs[0].k.shape[1])
  longest = int(jnp.max(prompt_lengths))
  if longest + max_new_tokens > capacity:
    raise ValueError(
        f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the KV"
        f" stores' capacity of {capacity} tokens")
  if sampling.temperature > 0 and key is None:
    raise ValueError("sampling with temperature > 0 needs a PRNG key")
  key = jax.random.key(0) if key is None else key
  routed = isinstance(kvs[0], sharded.PAGED_CACHES)
  if routed:
    router_config = router_config or router.RouterConfig(page_size=kvs[0].config.page_size)
    if layout is None:
      layout = layout_lib.BlockLayout.stack(
          [layout_lib.BlockLayout.from_blocks([], capacity)] * batch)
    layout = layout.unnamed()
  graphdef, params = nnx.split(model)

  logits, kvs = prefill(graphdef, params, kvs, prompts, prompt_lengths)
  if routed:  # Store the prompt's pages in the precisions the router gives them.
    table = _route(layout, prompt_lengths, kvs, router_config)
    kvs = tuple(sharded.cache_functions(cache).apply_precision(cache, table) for cache in kvs)
  key, first_key = jax.random.split(key)
  last = sample(logits, first_key, sampling)
  done = jnp.zeros(batch, bool) if sampling.eos_id is None else last == sampling.eos_id
  limits = prompt_lengths + max_new_tokens - 1  # The last token drawn is never fed back.
  pieces, produced = [last[:, None]], 1
  while produced < max_new_tokens and not bool(jnp.all(done)):
    if progress:
      _progress(produced, max_new_tokens)
    key, chunk_key = jax.random.split(key)
    kvs, last, done, layout, tokens = decode_chunk(
        graphdef, params, kvs, last, done, limits, layout, chunk_key, steps=chunk,
        router_config=router_config, sampling=sampling, open_block=open_block,
        implementation=implementation)
    pieces.append(tokens)
    produced += chunk
  if progress:
    _progress(max_new_tokens, max_new_tokens)
  tokens = jnp.concatenate(pieces, axis=1)[:, :max_new_tokens]
  if tokens.shape[1] < max_new_tokens:  # Every sequence ended early.
    tokens = jnp.pad(tokens, ((0, 0), (0, max_new_tokens - tokens.shape[1])),
                     constant_values=sampling.pad_id)
  if sampling.eos_id is None:
    num_generated = jnp.full(batch, max_new_tokens, jnp.int32)
  else:
    is_eos = np.asarray(tokens) == sampling.eos_id
    first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, max_new_tokens)
    num_generated = jnp.asarray(first, jnp.int32)
  return Generated(tokens=tokens, num_generated=num_generated, kvs=kvs)
