r"""Decode speed of the decoder at a long context: dense vs routed, in one run.

The KV stores are filled with random K/V for `--context` tokens of every sequence (a real prefill
of that length is not needed to time decoding: a step's cost does not depend on the values). Then
each variant runs the generation loop's jitted chunk of `--steps` decode steps (route, append,
attend in every layer, sample) and reports step time and tokens/s:
  * dense: contiguous K/V, dense attention over every token (jax.nn.dot_product_attention);
  * paged, all pages: the paged BF16 cache, every page routed in;
  * routed: the synthetic agentic layout routed under a page budget of --selection of the pages,
    pages stored in the precision the router gives them under --memory_pressure.

  python -m benchmarks.model_decode --config=1b --batch=8 --context=32768
"""

import functools

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp

from benchmarks import report
from benchmarks import timing
from intent_jax import cache as cache_lib
from intent_jax import cost
from intent_jax import layout as layout_lib
from intent_jax import models
from intent_jax import router
from intent_jax import traces
from intent_jax.models import generation
from intent_jax.precision import Precision

_CONFIG = flags.DEFINE_string("config", "1b", "A key of intent_jax.models.CONFIGS.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences decoded together.")
_CONTEXT = flags.DEFINE_integer("context", 32768, "Tokens in each sequence's KV before decoding.")
_STEPS = flags.DEFINE_integer("steps", 16, "Decode steps per timed chunk.")
_SELECTION = flags.DEFINE_float("selection", 0.25, "Routed page budget, a fraction of the pages.")
_PRESSURE = flags.DEFINE_float("memory_pressure", 0.3, "Memory pressure the router sees.")
_IMPLEMENTATION = flags.DEFINE_string("implementation", None, "decode_attention implementation.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds (median).")
_CALLS = flags.DEFINE_integer("calls", 2, "Chunks per round.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the rows to this JSON file.")


def _random_kv(key, config, batch, context):
  k, v = jax.random.split(key)
  shape = (batch, context, config.num_kv_heads, config.head_dim)
  return (jax.random.normal(k, shape, jnp.bfloat16), jax.random.normal(v, shape, jnp.bfloat16))


def main(argv):
  del argv
  config = models.CONFIGS[_CONFIG.value]
  batch, context, steps = _BATCH.value, _CONTEXT.value, _STEPS.value
  capacity = context + _ROUNDS.value * _CALLS.value * steps + 3 * steps + 16
  model = models.Decoder(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  lengths = jnp.full((batch,), context, jnp.int32)
  pages = -(-capacity // 16)
  print(f"{config.num_params() / 1e9:.2f}B parameters, batch {batch}, context {context},"
        f" {jax.devices()[0]}")

  layout = traces.agentic_batch([context] * batch, seed=0, capacity=capacity).unnamed()
  everything = layout_lib.BlockLayout.stack(
      [layout_lib.BlockLayout.from_blocks([], capacity)] * batch).unnamed()
  budget = router.RouterConfig(recent_tokens=1024, max_pages=round(_SELECTION.value * pages))
  all_pages = router.RouterConfig(recent_tokens=0)

  def paged(router_config, layout, quantized_pages):
    pools = {Precision.BF16: batch * pages, Precision.INT8: quantized_pages,
             Precision.INT4: quantized_pages}
    caches = models.create_caches(config, max_seqs=batch, max_seq_len=capacity, pool_pages=pools)
    table = router.route(layout, lengths, router_config, memory_pressure=_PRESSURE.value)
    filled = []
    for i, cache in enumerate(caches):
      cache = cache_lib.prefill(cache, *_random_kv(jax.random.key(i), config, batch, context),
                                lengths)
      filled.append(cache_lib.apply_precision(cache, table))
    stored, _ = cache_lib.lookup(filled[0], table)
    read = float(jnp.sum(cost.routed_kv_bytes(table, config.num_kv_heads, config.head_dim,
                                              precisions=stored))) * config.num_layers
    mix = [int(n) for n in jnp.sum(cost.pages_by_precision(table, stored), axis=0)]
    return tuple(filled), read, dict(zip([p.name for p in Precision], mix))

  def dense():
    stores = []
    for i in range(config.num_layers):
      store = models.create_dense_kvs(config, batch=batch, max_seq_len=capacity)[0]
      stores.append(store.write(*_random_kv(jax.random.key(i), config, batch, context), lengths))
    return tuple(stores), 2.0 * batch * context * config.num_kv_heads * config.head_dim * 2 * \
        config.num_layers, {}

  variants = {
      "dense (contiguous, XLA attention)": (dense, None, None),
      "paged, all pages (BF16)": (functools.partial(paged, all_pages, everything, 0), all_pages,
                                  everything),
      f"routed, {_SELECTION.value:.0%} budget, mixed precision": (
          functools.partial(paged, budget, layout, batch * pages // 2), budget, layout),
  }
  rows = []
  for name, (build, router_config, variant_layout) in variants.items():
    kvs, read_bytes, mix = build()
    last = jnp.zeros(batch, jnp.int32)
    done = jnp.zeros(batch, bool)
    limits = jnp.full((batch,), capacity - 1, jnp.int32)
    held = [kvs]  # The chunk donates the stores; each call continues from the last one's.
    del kvs

    def chunk(last, key):
      held[0], last, _, _, tokens = generation.decode_chunk(
          graphdef, params, held[0], last, done, limits, variant_layout, key, steps=steps,
          router_config=router_config, sampling=generation.SamplingConfig(), open_block=None,
          implementation=_IMPLEMENTATION.value)
      return tokens

    seconds = timing.median_seconds(chunk, last, jax.random.key(1), warmup=1,
                                    rounds=_ROUNDS.value, calls=_CALLS.value)
    step_ms = seconds / steps * 1e3
    row = dict(variant=name, step_ms=step_ms, tokens_per_s=batch / (seconds / steps),
               kv_bytes_read_per_step=read_bytes, pages_read_by_precision=mix, batch=batch,
               context=context, params=config.num_params())
    rows.append(row)
    print(f"{name:<42} step {step_ms:7.2f} ms  {row['tokens_per_s']:9.1f} tokens/s"
          f"  KV read {read_bytes / 2**30:6.2f} GiB/step {mix}", flush=True)
    held.clear()  # Frees this variant's stores before the next one is built.
  report.write_json(_JSON_OUT.value, rows)


if __name__ == "__main__":
  app.run(main)
