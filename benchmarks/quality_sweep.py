r"""What routing and KV precision cost the trained recall model: one row per setting.

Loads the committed recall checkpoint, draws --examples held-out contexts (one question each) and
evaluates every setting of `settings()` with `quality.evaluate`: answer accuracy and NLL, the
fraction of KV bytes a step reads (vs every page in BF16), the attention output's error vs dense,
how often every layer reads the answer's fact and the share of the answer block's pages read. Then
decodes the last --trace_steps tokens before each question (teacher-forced) to record which pages
each layer reads, and replays those traces through `prefetch.simulate`. Prints tables, writes JSON
and a PNG of accuracy vs bytes read with the Pareto front.

  python -m benchmarks.quality_sweep --examples=512 --json_out=docs/quality_sweep.json \
      --plot_out=docs/quality_sweep.png
"""

import time

from absl import app
from absl import flags
import jax

from benchmarks import report
from intent_jax import prefetch
from intent_jax import quality
from intent_jax import router
from intent_jax import tasks
from intent_jax.precision import Precision, page_bytes

_EXAMPLES = flags.DEFINE_integer("examples", 512, "Held-out contexts.")
_SEED = flags.DEFINE_integer("seed", 1, "Seed of the held-out contexts (the training run "
                             "evaluated seed 0's).")
_BATCH = flags.DEFINE_integer("batch", 64, "Contexts per evaluation call.")
_NOISE_P = flags.DEFINE_float("noise_p", 0.8, "Probability that noisy scores rank the answer "
                              "document first.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", quality.RECALL_CHECKPOINT, "Recall checkpoint.")
_TRACE_STEPS = flags.DEFINE_integer("trace_steps", 16, "Decode steps per context of the prefetch "
                                    "traces (0: none).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the rows to this JSON file.")
_PLOT_OUT = flags.DEFINE_string("plot_out", None, "Write the accuracy-vs-bytes PNG here.")


def settings(task: tasks.RecallTask, noise_p: float) -> list[quality.Setting]:
  """The sweep's rows: baseline, negative control, routing, storage precision."""
  S = quality.Setting
  presets = quality.router_presets(task)
  rows = [S("dense BF16"), S("answer block SKIPped", skip_answer=True)]
  for name, config in presets.items():
    rows += [S(f"{name}, runtime intent", config),
             S(f"{name}, noisy intent p={noise_p}", config, scores="noisy", noise_p=noise_p),
             S(f"{name}, cosine scores", config, scores="cosine")]
  rows += query_settings()
  rows.append(S("balanced, runtime intent, BF16 pages", presets["balanced"],
                storage=Precision.BF16))
  for precision in (Precision.FP8, Precision.INT8, Precision.INT4):
    rows.append(S(f"all {precision.name}", storage=precision))
  every_page = router.RouterConfig(score_threshold=0.0, recent_tokens=64)
  rows += [S("mixed precision (policy), every page", every_page, skip_as_attend=True),
           S("all INT4, K per token (emulated)", storage=Precision.INT4, key_scales="token",
             emulated=True),
           S("all INT4, K per channel (emulated)", storage=Precision.INT4, emulated=True)]
  return rows


def query_settings() -> list[quality.Setting]:
  """No intent scores: each layer's query picks the ATTEND pages, 25% of the pages in all."""
  by_query = router.RouterConfig(recent_tokens=32)
  return [quality.Setting("no intent scores, query key bounds, 25% pages", by_query,
                          scores="query"),
          quality.Setting("no intent scores, exact page max logit (oracle), 25% pages", by_query,
                          scores="query", exact_page_scores=True),
          quality.Setting("no intent scores, query logits on 4 of 32 channels, 25% pages",
                          by_query, scores="query", score_channels=4),
          quality.Setting("no intent scores, 4 of 32 channels of the INT4 key sketch, 25% pages",
                          by_query, scores="query", score_channels=4, score_sketch=True)]


def prefetch_rows(model, examples, task, steps: int) -> list[dict]:
  """Hit rate and bytes of the vote predictor on decode traces of the query and balanced rows
  (bytes per context and decode step, all layers)."""
  c = model.config
  layer_page_bytes = c.num_kv_heads * page_bytes(Precision.BF16, 16, c.head_dim)  # K and V.
  traced = [query_settings()[0],
            quality.Setting("balanced, runtime intent", quality.router_presets(task)["balanced"])]
  rows = []
  for setting in traced:
    pages = quality.decode_page_selections(model, examples, setting, steps=steps)
    pages = pages.reshape(steps, -1, pages.shape[-1])  # [steps, layers * contexts, pages]
    for window, votes in ((1, 1), (4, 1), (4, 2)):
      r = prefetch.simulate(pages, window=window, min_votes=votes, page_bytes=layer_page_bytes)
      steps_counted = (steps - 1) * len(examples)
      rows.append(dict(setting=setting.name, window=window, min_votes=votes,
                       hit_rate=r.hit_rate, precision=r.precision,
                       early_kib_per_step=r.early_bytes / steps_counted / 1024,
                       wasted_kib_per_step=r.wasted_bytes / steps_counted / 1024))
  return rows


def pareto_front(rows) -> list[dict]:
  """Rows no other row dominates (as accurate or more, reading as few bytes or fewer, and
  strictly better in one of the two)."""

  def dominates(o, r):
    at_least = (o["accuracy"] >= r["accuracy"] and
                o["kv_read_fraction"] <= r["kv_read_fraction"])
    return at_least and (o["accuracy"] > r["accuracy"] or
                         o["kv_read_fraction"] < r["kv_read_fraction"])

  return [r for r in rows if not any(dominates(o, r) for o in rows)]


def plot(rows, path: str) -> None:
  import matplotlib  # A dev dependency; only the plot needs it.
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  front = sorted(pareto_front(rows), key=lambda r: r["kv_read_fraction"])
  fig, ax = plt.subplots(figsize=(9, 6))
  ax.scatter([r["kv_read_fraction"] for r in rows], [r["accuracy"] for r in rows], s=18)
  for r in rows:
    ax.annotate(r["name"], (r["kv_read_fraction"], r["accuracy"]), fontsize=6,
                xytext=(3, 2), textcoords="offset points")
  ax.plot([r["kv_read_fraction"] for r in front], [r["accuracy"] for r in front], "r--",
          label="Pareto front")
  ax.set_xlabel("KV bytes read per step (fraction of every page in BF16)")
  ax.set_ylabel("answer accuracy")
  ax.set_title("Agentic recall: accuracy vs KV bytes read")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=130)


def main(argv):
  del argv
  model, task, meta = quality.load_recall_model(_CHECKPOINT.value)
  examples = tasks.recall_examples(task, _EXAMPLES.value, seed=_SEED.value, split="eval")
  start = time.time()
  rows = quality.evaluate(model, examples, settings(task, _NOISE_P.value), batch=_BATCH.value)
  seconds = time.time() - start
  print(f"{'setting':<60} {'acc':>6} {'nll':>7} {'KV read':>8} {'attn err':>9}"
        f" {'answer read':>12} {'answer pages':>13}")
  for r in rows:
    print(f"{r['name']:<60} {r['accuracy']:>6.3f} {r['nll']:>7.3f} {r['kv_read_fraction']:>8.3f}"
          f" {r['attention_error']:>9.4f} {r['answer_read']:>12.3f}"
          f" {r['answer_page_recall']:>13.3f}")
  traces = prefetch_rows(model, examples, task, _TRACE_STEPS.value) if _TRACE_STEPS.value else []
  for r in traces:
    print(f"prefetch {r['setting']:<48} window={r['window']} votes={r['min_votes']}"
          f" hit={r['hit_rate']:.3f} precision={r['precision']:.3f}"
          f" early={r['early_kib_per_step']:.1f} KiB/step wasted={r['wasted_kib_per_step']:.1f}")
  print(f"{len(examples)} held-out contexts (seed {_SEED.value}), {seconds:.0f} s on"
        f" {jax.devices()[0].device_kind}")
  report.write_json(_JSON_OUT.value, dict(
      command="python -m benchmarks.quality_sweep", examples=len(examples), seed=_SEED.value,
      device=jax.devices()[0].device_kind, jax_version=jax.__version__,
      date=time.strftime("%Y-%m-%d"), checkpoint_steps=meta["steps"], rows=rows,
      prefetch=dict(trace_steps=_TRACE_STEPS.value, rows=traces),
      pareto_front=[r["name"] for r in pareto_front(rows)]))
  if _PLOT_OUT.value:
    plot(rows, _PLOT_OUT.value)


if __name__ == "__main__":
  app.run(main)
