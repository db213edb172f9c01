r"""The main job: route a synthetic agentic context and decode over a paged mixed-precision cache.

Builds a seeded agentic context (system prompt, memory, documents, tools, scratchpad, turns),
prefills its K/V into a paged cache, routes it with the cache's fill level as memory pressure,
stores the pages the router marks lower in FP8/INT8/INT4, and runs `decode_attention` with the
best implementation for this platform. Prints each block's decision, the memory of each pool, the
bytes and FLOPs of the routed step against dense, the error against the oracle over the same
stored pages, what quantization changed, and the time per step.

  python -m benchmarks.agentic_decode --num_tokens=32768 --json_out=/tmp/decode.json
"""

import functools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks import report
from benchmarks import timing
from intent_jax import attention
from intent_jax import cache as cache_lib
from intent_jax import cost
from intent_jax import reference
from intent_jax import router
from intent_jax import traces
from intent_jax.precision import Precision

_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 32768, "Tokens in the context.")
_NUM_Q_HEADS = flags.DEFINE_integer("num_q_heads", 32, "Query heads.")
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 8, "KV heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Channels per head.")
_Q_LEN = flags.DEFINE_integer("q_len", 1, "Query tokens per step (1..8).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per page.")
_RECENT = flags.DEFINE_integer("recent_tokens", 1024, "Recent window, in tokens.")
_THRESHOLD = flags.DEFINE_float("score_threshold", 0.5, "ATTEND score threshold.")
_PRESSURE = flags.DEFINE_float(
    "memory_pressure", None, "Memory pressure in [0, 1]; default: the cache's fill level.")
_MAX_PAGES_FRACTION = flags.DEFINE_float(
    "max_pages_fraction", 0.5,
    "Table capacity as a fraction of the context's pages: the static page budget.")
_BF16_POOL_FRACTION = flags.DEFINE_float(
    "bf16_pool_fraction", 2.0,
    "Pages of the BF16 pool as a multiple of the context's pages (headroom to grow).")
_QUANTIZED_POOL_FRACTION = flags.DEFINE_float(
    "quantized_pool_fraction", 0.5,
    "Pages of each of the FP8, INT8 and INT4 pools, as a fraction of the context's pages.")
_IMPLEMENTATION = flags.DEFINE_string(
    "implementation", None, "A registered implementation; default: the platform's best.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per measurement (median).")
_CALLS = flags.DEFINE_integer("calls", 3, "Back-to-back calls per timed round.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the context and the random q, k, v.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the results to this JSON file.")



def main(argv):
  del argv
  num_tokens, q_len = _NUM_TOKENS.value, _Q_LEN.value
  hq, hkv, d, ps = _NUM_Q_HEADS.value, _NUM_KV_HEADS.value, _HEAD_DIM.value, _PAGE_SIZE.value
  total_pages = -(-num_tokens // ps)
  layout = traces.agentic_batch([num_tokens], seed=_SEED.value)
  seq_lens = jnp.asarray([num_tokens], jnp.int32)
  config = router.RouterConfig(
      page_size=ps, score_threshold=_THRESHOLD.value, recent_tokens=_RECENT.value,
      max_pages=max(1, round(_MAX_PAGES_FRACTION.value * total_pages)))
  kq, kk, kv = jax.random.split(jax.random.key(_SEED.value), 3)
  q = jax.random.normal(kq, (1, q_len, hq, d), jnp.bfloat16)
  k = jax.random.normal(kk, (1, num_tokens, hkv, d), jnp.bfloat16)
  v = jax.random.normal(kv, (1, num_tokens, hkv, d), jnp.bfloat16)

  quantized_pages = round(_QUANTIZED_POOL_FRACTION.value * total_pages)
  cache_config = cache_lib.CacheConfig(
      num_kv_heads=hkv, head_dim=d, max_seqs=1, max_seq_len=num_tokens, page_size=ps,
      pool_pages={Precision.BF16: round(_BF16_POOL_FRACTION.value * total_pages),
                  Precision.FP8: quantized_pages,
                  Precision.INT8: quantized_pages, Precision.INT4: quantized_pages})
  cache = cache_lib.prefill(cache_lib.create(cache_config), k, v, seq_lens)
  pressure = (cache_lib.memory_pressure(cache) if _PRESSURE.value is None else
              jnp.float32(_PRESSURE.value))
  table = router.route(layout, seq_lens, config, memory_pressure=pressure)
  cache = cache_lib.apply_precision(cache, table)

  names = (attention.default_implementations()
           if _IMPLEMENTATION.value is None else (_IMPLEMENTATION.value,))
  decode = jax.jit(functools.partial(attention.decode_attention, implementation=names))
  out = decode(q, cache, table)
  oracle = reference.paged_attention(q, cache, table)
  unquantized = reference.selected_attention(q, k, v, table)
  full = reference.attention(q, k, v, causal=True)

  rows = router.explain(table, layout)
  print(f"{'block':<12} {'policy':<7} {'score':>5} {'tokens':>15} {'pages':>11}"
        f" {'decision':<11} {'reason':<15} precision")
  for r in rows:
    print(f"{r['name']:<12} {r['policy']:<7} {r['score']:5.2f}"
          f" {r['start']:>7}-{r['end']:<7} {r['pages'][0]:>5}-{r['pages'][1]:<5}"
          f" {r['decision']:<11} {r['reason']:<15} {r['precision']}")

  stored, _ = cache_lib.lookup(cache, table)
  attended = int(cost.attended_tokens(table)[0])
  read_bytes = float(cost.routed_kv_bytes(table, hkv, d, precisions=stored)[0])
  dense_bytes = cost.dense_kv_bytes(num_tokens, hkv, d, page_size=ps)
  step = jax.jit(lambda layout, lens, q, cache: decode(
      q, cache, router.route(layout, lens, config, memory_pressure=pressure)))
  measure = lambda fn, *args: timing.median_seconds(fn, *args, rounds=_ROUNDS.value,
                                                    calls=_CALLS.value)
  route_s = measure(jax.jit(lambda l, s: router.route(l, s, config)), layout, seq_lens)
  step_s = measure(step, layout, seq_lens, q, cache)
  dense_s = measure(jax.jit(jax.nn.dot_product_attention), q, k, v)
  results = dict(
      platform=jax.default_backend(),
      implementation=list(names),
      num_tokens=num_tokens,
      memory_pressure=float(pressure),
      pages_read=int(table.num_pages[0]),
      pages_total=total_pages,
      table_capacity=config.max_pages,
      pages_read_by_precision={p.name: int(n) for p, n in zip(
          Precision, cost.pages_by_precision(table, stored)[0])},
      pool_bytes_in_use={p.name: float(b) for p, b in zip(
          Precision, cache_lib.bytes_in_use(cache))},
      attended_tokens=attended,
      kv_bytes_dense=dense_bytes,
      kv_bytes_read=read_bytes,
      flops_dense=cost.attention_flops(q_len, hq, d, num_tokens),
      flops_routed=cost.attention_flops(q_len, hq, d, attended),
      rel_error_vs_oracle_same_pages=report.relative_error(out, oracle),
      rel_difference_quantized_vs_bf16_same_tokens=report.relative_error(out, unquantized),
      rel_difference_vs_full_context=report.relative_error(out, full),
      overflow=bool(table.overflow[0]),
      truncated=bool(table.truncated[0]),
      route_us=route_s * 1e6,
      route_and_attend_us=step_s * 1e6,
      dense_attention_us=dense_s * 1e6,
  )
  mib = lambda b: f"{b / 2**20:.1f} MiB"
  print()
  print(f"platform {results['platform']}, implementation tried in order: {names}")
  in_use = ", ".join(f"{p} {mib(b)}" for p, b in results["pool_bytes_in_use"].items())
  print(f"cache             {in_use} in use; memory pressure {results['memory_pressure']:.2f}")
  print(f"pages read        {results['pages_read']} of {total_pages}"
        f" ({results['pages_read'] / total_pages:.1%}; table capacity {config.max_pages}):"
        f" {', '.join(f'{p} {n}' for p, n in results['pages_read_by_precision'].items())};"
        f" tokens attended {attended} of {num_tokens}")
  print(f"KV bytes / layer  dense {mib(dense_bytes)}; routed {mib(read_bytes)}"
        f" ({read_bytes / dense_bytes:.1%}), scales included")
  print(f"FLOPs / layer     dense {results['flops_dense'] / 1e6:.1f} M; routed"
        f" {results['flops_routed'] / 1e6:.1f} M")
  print(f"error             {results['rel_error_vs_oracle_same_pages']:.2e} relative to the"
        " oracle over the same stored pages; quantization changes the output by"
        f" {results['rel_difference_quantized_vs_bf16_same_tokens']:.2e} against BF16 over the"
        " same tokens; routing by"
        f" {results['rel_difference_vs_full_context']:.2e} against full-context attention"
        " (random q, k, v spread attention evenly; the quality harness measures a real model)")
  print(f"time per step     route {results['route_us']:.0f} us; route + attend"
        f" {results['route_and_attend_us']:.0f} us; dense jax.nn.dot_product_attention"
        f" {results['dense_attention_us']:.0f} us")
  report.write_json(_JSON_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
