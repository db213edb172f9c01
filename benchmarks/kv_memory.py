r"""KV memory as a context grows, and the error of each storage format.

Part 1, memory growth (analytical, from routed tables; nothing is allocated): for each model shape
and context length, the bytes of
  * dense BF16: a plain BF16 KV cache,
  * this cache, all pages BF16 (its per-page key bounds included),
  * this cache, routed: each page stored in the precision the router gives it. The table is routed
    with score_threshold 0, so every ATTEND page is in it and gets its score's precision under
    --memory_pressure; SKIP pages are in no table and stay BF16.
Part 2, error of each format and scale granularity on normal and on heavy-tailed keys (a few
outlier channels 30x larger, as real keys have): relative error of K, and of the logits q.k.

  python -m benchmarks.kv_memory --memory_pressure=0.3 --json_out=/tmp/kv_memory.json
"""


from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from intent_jax import cache as cache_lib
from intent_jax import cost
from intent_jax import quant
from intent_jax import router
from intent_jax import traces
from intent_jax.precision import Precision

_MODELS = flags.DEFINE_list("models", sorted(cost.MODEL_SHAPES), "Model shapes, keys of "
                            "intent_jax.cost.MODEL_SHAPES.")
_LENGTHS = flags.DEFINE_list("lengths", ["8k", "32k", "128k", "1m"], "Context lengths, keys of "
                             "intent_jax.traces.TRACE_LENGTHS.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per page.")
_PRESSURE = flags.DEFINE_float("memory_pressure", 0.3, "Memory pressure for the router.")
_ERROR_PAGES = flags.DEFINE_integer("error_pages", 256, "Pages of random keys in part 2.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the results to this JSON file.")

# Scale granularities of K pages [pages, page_size, head_dim]: the axes one scale spans.
GRANULARITIES = {"per channel (KIVI)": cache_lib.K_SCALE_AXIS, "per token": -1,
                 "per page": (-2, -1)}


def stored_fractions(num_tokens: int, page_size: int, pressure: float) -> dict[Precision, float]:
  """Fraction of a routed synthetic context's pages stored in each precision."""
  layout = traces.agentic_batch([num_tokens], seed=0).unnamed()
  config = router.RouterConfig(page_size=page_size, score_threshold=0.0, recent_tokens=1024)
  table = router.route(layout, jnp.asarray([num_tokens]), config, memory_pressure=pressure)
  counts = np.array(cost.pages_by_precision(table)[0])
  total = -(-num_tokens // page_size)
  counts[Precision.BF16] += total - int(table.num_pages[0])  # Pages in no table stay BF16.
  return {p: counts[p] / total for p in Precision}


def memory_rows(page_size: int, pressure: float):
  rows = []
  for name in _LENGTHS.value:
    num_tokens = traces.TRACE_LENGTHS[name]
    mix = stored_fractions(num_tokens, page_size, pressure)
    for model in _MODELS.value:
      shape = cost.MODEL_SHAPES[model]
      config = cache_lib.CacheConfig(num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                                     max_seqs=1, max_seq_len=num_tokens, page_size=page_size)
      pages = -(-num_tokens // page_size) * shape.num_layers
      dense = cost.memory_growth(shape, context_lengths=(num_tokens,), page_size=page_size)
      rows.append(dict(
          model=model, tokens=num_tokens,
          dense_bf16_bytes=dense[0]["total_bytes"],
          cache_bf16_bytes=pages * config.stored_page_bytes(Precision.BF16),
          routed_bytes_by_pool={p.name: mix[p] * pages * config.stored_page_bytes(p)
                                for p in Precision},
          routed_page_fractions={p.name: mix[p] for p in Precision}))
  return rows


def error_rows(num_pages: int, page_size: int, head_dim: int = 128):
  kk, kq = jax.random.split(jax.random.key(0))
  normal = jax.random.normal(kk, (num_pages, page_size, head_dim))
  outliers = jnp.where(jnp.arange(head_dim) % 16 == 3, 30.0, 1.0)
  queries = jax.random.normal(kq, (num_pages, head_dim))
  rows = []
  for data, keys in (("normal", normal), ("heavy-tailed", normal * outliers)):
    logits = jnp.einsum("pd,ptd->pt", queries, keys)
    for precision in (Precision.FP8, Precision.INT8, Precision.INT4):
      for granularity, axis in GRANULARITIES.items():
        approx = quant.fake_quant(keys, precision, axis)
        approx_logits = jnp.einsum("pd,ptd->pt", queries, approx)
        relative = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        rows.append(dict(keys=data, precision=precision.name, scale=granularity,
                         k_rel_error=relative(approx, keys),
                         logit_rel_error=relative(approx_logits, logits)))
  return rows


def main(argv):
  del argv
  gib = lambda b: f"{b / 2**30:9.2f}"
  memory = memory_rows(_PAGE_SIZE.value, _PRESSURE.value)
  print(f"KV memory (GiB), page {_PAGE_SIZE.value}, memory pressure {_PRESSURE.value}")
  print(f"{'model':<11} {'tokens':>8} {'dense bf16':>10} {'cache bf16':>10} {'routed':>9}"
        f"  {'routed by pool: BF16 / FP8 / INT8 / INT4':<44} pages by precision")
  for r in memory:
    pools = r["routed_bytes_by_pool"]
    fractions = " / ".join(f"{f:.2f}" for f in r["routed_page_fractions"].values())
    print(f"{r['model']:<11} {r['tokens']:>8} {gib(r['dense_bf16_bytes']):>10}"
          f" {gib(r['cache_bf16_bytes']):>10} {gib(sum(pools.values()))}"
          f"  {' /'.join(gib(b) for b in pools.values()):<44} {fractions}")
  errors = error_rows(_ERROR_PAGES.value, _PAGE_SIZE.value)
  print()
  print(f"{'keys':<13} {'format':<6} {'scale':<19} {'K rel. error':>12} {'logit rel. error':>16}")
  for r in errors:
    print(f"{r['keys']:<13} {r['precision']:<6} {r['scale']:<19} {r['k_rel_error']:>12.2e}"
          f" {r['logit_rel_error']:>16.2e}")
  report.write_json(_JSON_OUT.value, dict(memory=memory, errors=errors,
                                          memory_pressure=_PRESSURE.value,
                                          page_size=_PAGE_SIZE.value))


if __name__ == "__main__":
  app.run(main)
