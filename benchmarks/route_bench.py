r"""Time `route` on synthetic agentic traces: the router's cost per decode step.

  python -m benchmarks.route_bench --lengths=8k,32k,128k,1m --batches=1,8 --json_out=route.json
"""


from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks import report
from benchmarks import timing
from intent_jax import router
from intent_jax import traces

_LENGTHS = flags.DEFINE_list("lengths", ["8k", "32k", "128k"], "Trace lengths, keys of "
                             f"{sorted(traces.TRACE_LENGTHS)}.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per page.")
_MAX_PAGES_FRACTION = flags.DEFINE_float("max_pages_fraction", 0.5,
                                         "Table capacity as a fraction of the pages.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds per measurement (median).")
_CALLS = flags.DEFINE_integer("calls", 30, "Back-to-back calls per timed round.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the rows to this JSON file.")


def main(argv):
  del argv
  rows = []
  print(f"{'tokens':>8} {'batch':>5} {'pages':>7} {'route us':>9} {'floor us':>9}"
        f"  platform {jax.default_backend()}")
  for name in _LENGTHS.value:
    num_tokens = traces.TRACE_LENGTHS[name]
    for batch in map(int, _BATCHES.value):
      # Sequences a little shorter than the capacity, each with its own layout.
      seq_lens = [num_tokens - 97 * i for i in range(batch)]
      layout = traces.agentic_batch(seq_lens, seed=batch).unnamed()
      total_pages = -(-num_tokens // _PAGE_SIZE.value)
      config = router.RouterConfig(
          page_size=_PAGE_SIZE.value, recent_tokens=1024,
          max_pages=max(1, round(_MAX_PAGES_FRACTION.value * total_pages)))
      lens = jnp.asarray(seq_lens, jnp.int32)
      step = jax.jit(lambda layout, lens: router.route(layout, lens, config))
      seconds = timing.median_seconds(step, layout, lens, rounds=_ROUNDS.value, calls=_CALLS.value)
      # The dispatch floor: a jitted call with the same arguments and outputs that does no work.
      table = step(layout, lens)
      floor = timing.median_seconds(jax.jit(lambda layout, lens: table), layout, lens,
                                    rounds=_ROUNDS.value, calls=_CALLS.value)
      rows.append(dict(tokens=num_tokens, batch=batch, pages=total_pages, route_us=seconds * 1e6,
                       dispatch_floor_us=floor * 1e6, platform=jax.default_backend()))
      print(f"{num_tokens:>8} {batch:>5} {total_pages:>7} {seconds * 1e6:>9.1f}"
            f" {floor * 1e6:>9.1f}")
  report.write_json(_JSON_OUT.value, rows)


if __name__ == "__main__":
  app.run(main)
