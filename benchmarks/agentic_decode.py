r"""The main job: route a synthetic agentic context and run decode attention over it.

Builds a seeded agentic context (system prompt, memory, documents, tools, scratchpad, turns),
routes it, runs `decode_attention` with the best implementation for this platform, and prints
each block's decision, the bytes and FLOPs of the routed step against dense, the error against
the oracle over the same tokens, and the time per step.

  python -m benchmarks.agentic_decode --num_tokens=32768 --json_out=/tmp/decode.json
"""

import functools
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from intent_jax import attention
from intent_jax import cost
from intent_jax import precision
from intent_jax import reference
from intent_jax import router
from intent_jax import traces

_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 32768, "Tokens in the context.")
_NUM_Q_HEADS = flags.DEFINE_integer("num_q_heads", 32, "Query heads.")
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 8, "KV heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Channels per head.")
_Q_LEN = flags.DEFINE_integer("q_len", 1, "Query tokens per step (1..8).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per page.")
_RECENT = flags.DEFINE_integer("recent_tokens", 1024, "Recent window, in tokens.")
_THRESHOLD = flags.DEFINE_float("score_threshold", 0.5, "ATTEND score threshold.")
_PRESSURE = flags.DEFINE_float("memory_pressure", 0.0, "Memory pressure in [0, 1].")
_MAX_PAGES_FRACTION = flags.DEFINE_float(
    "max_pages_fraction", 0.5,
    "Table capacity as a fraction of the context's pages: the static page budget.")
_IMPLEMENTATION = flags.DEFINE_string(
    "implementation", None, "A registered implementation; default: the platform's best.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per measurement (median).")
_CALLS = flags.DEFINE_integer("calls", 3, "Back-to-back calls per timed round.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the context and the random q, k, v.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the results to this JSON file.")


def _relative_error(out, expected) -> float:
  out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(out - expected) / max(np.linalg.norm(expected), 1e-30))


def main(argv):
  del argv
  num_tokens, q_len = _NUM_TOKENS.value, _Q_LEN.value
  hq, hkv, d = _NUM_Q_HEADS.value, _NUM_KV_HEADS.value, _HEAD_DIM.value
  layout = traces.agentic_batch([num_tokens], seed=_SEED.value)
  seq_lens = jnp.asarray([num_tokens], jnp.int32)
  total_pages = -(-num_tokens // _PAGE_SIZE.value)
  config = router.RouterConfig(
      page_size=_PAGE_SIZE.value, score_threshold=_THRESHOLD.value, recent_tokens=_RECENT.value,
      memory_pressure=_PRESSURE.value,
      max_pages=max(1, round(_MAX_PAGES_FRACTION.value * total_pages)))
  kq, kk, kv = jax.random.split(jax.random.key(_SEED.value), 3)
  q = jax.random.normal(kq, (1, q_len, hq, d), jnp.bfloat16)
  k = jax.random.normal(kk, (1, num_tokens, hkv, d), jnp.bfloat16)
  v = jax.random.normal(kv, (1, num_tokens, hkv, d), jnp.bfloat16)

  table = router.route(layout, seq_lens, config)
  names = (attention.default_implementations()
           if _IMPLEMENTATION.value is None else (_IMPLEMENTATION.value,))
  decode = jax.jit(functools.partial(attention.decode_attention, implementation=names))
  step = jax.jit(lambda layout, lens, q, k, v: decode(q, k, v, router.route(layout, lens, config)))
  dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))
  out = decode(q, k, v, table)
  oracle = reference.selected_attention(q, k, v, table)
  full = reference.attention(q, k, v, causal=True)

  rows = router.explain(table, layout)
  print(f"{'block':<12} {'policy':<7} {'score':>5} {'tokens':>15} {'pages':>11}"
        f" {'decision':<11} {'reason':<15} precision")
  for r in rows:
    print(f"{r['name']:<12} {r['policy']:<7} {r['score']:5.2f}"
          f" {r['start']:>7}-{r['end']:<7} {r['pages'][0]:>5}-{r['pages'][1]:<5}"
          f" {r['decision']:<11} {r['reason']:<15} {r['precision']}")

  attended = int(cost.attended_tokens(table)[0])
  routed_bytes = float(cost.routed_kv_bytes(table, hkv, d)[0])
  bf16_bytes = int(table.num_pages[0]) * hkv * precision.page_bytes(
      precision.Precision.BF16, config.page_size, d)
  dense_bytes = cost.dense_kv_bytes(num_tokens, hkv, d, page_size=config.page_size)
  measure = lambda fn, *args: timing.median_seconds(fn, *args, rounds=_ROUNDS.value,
                                                    calls=_CALLS.value)
  route_s = measure(jax.jit(lambda l, s: router.route(l, s, config)), layout, seq_lens)
  step_s = measure(step, layout, seq_lens, q, k, v)
  dense_s = measure(dense, q, k, v)
  results = dict(
      platform=jax.default_backend(),
      implementation=[n for n in names],
      num_tokens=num_tokens,
      pages_read=int(table.num_pages[0]),
      pages_total=total_pages,
      table_capacity=config.max_pages,
      attended_tokens=attended,
      kv_bytes_dense=dense_bytes,
      kv_bytes_routed_bf16=bf16_bytes,
      kv_bytes_routed_at_table_precision=routed_bytes,
      flops_dense=cost.attention_flops(q_len, hq, d, num_tokens),
      flops_routed=cost.attention_flops(q_len, hq, d, attended),
      rel_error_vs_oracle_same_tokens=_relative_error(out, oracle),
      rel_difference_vs_full_context=_relative_error(out, full),
      overflow=bool(table.overflow[0]),
      truncated=bool(table.truncated[0]),
      route_us=route_s * 1e6,
      route_and_attend_us=step_s * 1e6,
      dense_attention_us=dense_s * 1e6,
  )
  print()
  print(f"platform {results['platform']}, implementation tried in order: {names}")
  print(f"pages read        {results['pages_read']} of {total_pages}"
        f" ({results['pages_read'] / total_pages:.1%}; table capacity {config.max_pages});"
        f" tokens attended {attended} of {num_tokens}")
  print(f"KV bytes / layer  dense {dense_bytes / 2**20:.1f} MiB; routed {bf16_bytes / 2**20:.1f}"
        f" MiB as BF16 ({bf16_bytes / dense_bytes:.1%}), {routed_bytes / 2**20:.1f} MiB at the"
        " table's precisions (stored that way once the paged cache lands)")
  print(f"FLOPs / layer     dense {results['flops_dense'] / 1e6:.1f} M; routed"
        f" {results['flops_routed'] / 1e6:.1f} M")
  print(f"error             {results['rel_error_vs_oracle_same_tokens']:.2e} relative to the"
        " oracle over the same tokens; routing changes the output by"
        f" {results['rel_difference_vs_full_context']:.2e} relative to full-context attention"
        " (random q, k, v spread attention evenly; the quality harness measures a real model)")
  print(f"time per step     route {results['route_us']:.0f} us; route + attend"
        f" {results['route_and_attend_us']:.0f} us; dense jax.nn.dot_product_attention"
        f" {results['dense_attention_us']:.0f} us")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
