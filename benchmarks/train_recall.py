r"""Trains the small decoder on agentic recall until dense attention answers held-out questions.

Training contexts ask --num_queries questions each (loss on every answer), from short contexts
with few facts to the full task (--curriculum: from scratch, induction over look-alike facts is not
found: the loss stays at ln(facts), copying any value in the context; a copy stage teaches it);
evaluation asks one question per held-out context of the last stage (the "eval" split), with
dense causal attention. Batches are drawn by worker processes (seeded by step), so a run is
reproducible. Stops at --steps, or at the first evaluation reaching --stop_accuracy, and writes
the checkpoint (.npz) with its provenance (.json).

  python -m benchmarks.train_recall --checkpoint=intent_jax/data/recall_tiny.npz
"""

import collections
import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os
import sys
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from intent_jax import quality
from intent_jax import tasks
from intent_jax.models.decoder import Decoder, DecoderConfig

_STEPS = flags.DEFINE_integer("steps", 32000, "Most optimizer steps.")
_BATCH = flags.DEFINE_integer("batch", 32, "Contexts per step.")
_CURRICULUM = flags.DEFINE_list(
    "curriculum",
    ["copy:256:96", "copy:512:192", "copy:1024:384|1024:6:24", "copy:1024:384|1024:6:24"],
    "Stages, an equal share of --steps each: copy:seq_len:span (tasks.copy_examples), recall"
    " seq_len:facts_per_document:questions (tool outputs have as many facts, the scratchpad"
    " twice as many), or stages joined by | (alternating batches). The model is evaluated on"
    " the last recall task's contexts, one question each.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Peak AdamW learning rate.")
_WARMUP = flags.DEFINE_integer("warmup", 300, "Linear warm-up steps.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the parameters and the data.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 2000, "Steps between held-out evaluations.")
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 512, "Held-out contexts per evaluation.")
_STOP_ACCURACY = flags.DEFINE_float("stop_accuracy", 0.99, "Stop once held-out accuracy >= this.")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", None, "Stop at the first evaluation after this.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", quality.RECALL_CHECKPOINT, "Where to write it.")
_WORKERS = flags.DEFINE_integer("workers", max(1, min(8, (os.cpu_count() or 2) - 1)),
                                "Processes drawing training batches.")
_MODEL_DIM = flags.DEFINE_integer("model_dim", 128, "Decoder width.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 2, "Decoder layers.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Query heads.")
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 2, "KV heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 32, "Head dimension.")
_MLP_DIM = flags.DEFINE_integer("mlp_dim", 256, "SwiGLU hidden width.")


@dataclasses.dataclass(frozen=True)
class CopyStage:
  """Pretraining on tasks.copy_examples."""

  seq_len: int
  span: int


def curriculum_stage(stage: str):
  """A RecallTask for "seq_len:facts_per_document:questions", a CopyStage for
  "copy:seq_len:span", a tuple of them for stages joined by "|" (alternating batches)."""
  if "|" in stage:
    return tuple(curriculum_stage(part) for part in stage.split("|"))
  parts = stage.split(":")
  try:
    if parts[0] == "copy":
      seq_len, span = (int(part) for part in parts[1:])
      return CopyStage(seq_len, span)
    seq_len, facts, num_queries = (int(part) for part in parts)
  except ValueError:
    raise ValueError(f"curriculum stage {stage!r} must be seq_len:facts_per_document:questions"
                     " or copy:seq_len:span") from None
  return tasks.RecallTask(seq_len=seq_len, facts_per_document=facts, facts_per_tool_output=facts,
                          scratchpad_facts=2 * facts, num_queries=num_queries)


def training_batch(stage, batch: int, seed: int):
  """(tokens, positions, targets): the loss is on predicting targets at positions."""
  if isinstance(stage, CopyStage):
    return tasks.copy_examples(stage.seq_len, stage.span, batch, seed=seed)
  examples = tasks.recall_examples(stage, batch, seed=seed, split="train")
  return examples.tokens, examples.answer_positions, examples.answers


def batches(stages, batch: int, first_seed: int, count: int, workers: int):
  """Yields `count` training batches (seeds first_seed, first_seed + 1, ...), an equal share of
  them from each stage in turn."""
  context = multiprocessing.get_context("spawn")  # The parent has started jax: no fork.
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    pending = collections.deque()
    for index, seed in enumerate(range(first_seed, first_seed + count)):
      task = stages[index * len(stages) // count]
      task = task[seed % len(task)] if isinstance(task, tuple) else task
      pending.append(pool.submit(training_batch, task, batch, seed))
      if len(pending) > 4 * workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def optimizer(steps: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, _LEARNING_RATE.value, _WARMUP.value, max(steps, _WARMUP.value + 1),
      end_value=0.1 * _LEARNING_RATE.value)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=_WEIGHT_DECAY.value))


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"), donate_argnames=("params",
                                                                               "opt_state"))
def train_step(graphdef, tx, params, opt_state, tokens, positions, answers):
  """One AdamW step on the cross-entropy of predicting answers at positions.

  Returns (params, opt_state, loss, accuracy)."""

  def loss_fn(params):
    logits, _ = nnx.merge(graphdef, params)(tokens, None)
    return quality.answer_loss(quality.answer_logits(logits, positions), answers)

  (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, accuracy


def _progress(step: int, total: int, loss: float, accuracy: float, seconds: float) -> None:
  width = 30
  filled = width * step // total
  sys.stderr.write(f"\rtrain [{'#' * filled}{'.' * (width - filled)}] {step}/{total}"
                   f" loss {loss:.3f} acc {accuracy:.3f} {seconds:.0f}s")
  sys.stderr.flush()


def main(argv):
  del argv
  config = DecoderConfig(vocab_size=tasks.VOCAB_SIZE, model_dim=_MODEL_DIM.value,
                         num_layers=_NUM_LAYERS.value, num_heads=_NUM_HEADS.value,
                         num_kv_heads=_NUM_KV_HEADS.value, head_dim=_HEAD_DIM.value,
                         mlp_dim=_MLP_DIM.value)
  stages = [curriculum_stage(stage) for stage in _CURRICULUM.value]
  task = [t for stage in stages for t in (stage if isinstance(stage, tuple) else (stage,))
          if isinstance(t, tasks.RecallTask)][-1]
  eval_task = dataclasses.replace(task, num_queries=1)
  held_out = tasks.recall_examples(eval_task, _EVAL_EXAMPLES.value, seed=_SEED.value,
                                   split="eval")
  model = Decoder(config, rngs=nnx.Rngs(_SEED.value))
  graphdef, params = nnx.split(model)
  tx = optimizer(_STEPS.value)
  opt_state = tx.init(params)
  print(f"model {config.num_params()} parameters; task {task}; device {jax.devices()[0]}")

  start, step, accuracy, history = time.time(), 0, 0.0, []
  stream = batches(stages, _BATCH.value, _SEED.value * 1_000_003, _STEPS.value, _WORKERS.value)
  for step, (tokens, positions, targets) in enumerate(stream, start=1):
    params, opt_state, loss, train_accuracy = train_step(
        graphdef, tx, params, opt_state, jnp.asarray(tokens), jnp.asarray(positions),
        jnp.asarray(targets))
    if step % 50 == 0:
      _progress(step, _STEPS.value, float(loss), float(train_accuracy), time.time() - start)
    if step % _EVAL_EVERY.value == 0 or step == _STEPS.value:
      nnx.update(model, params)
      accuracy = quality.dense_accuracy(model, held_out)
      history.append(dict(step=step, loss=float(loss), train_accuracy=float(train_accuracy),
                          held_out_accuracy=accuracy,
                          seconds=time.time() - start))
      print(f"\nstep {step}: held-out dense accuracy {accuracy:.4f} ({len(held_out)} contexts)")
      seconds = time.time() - start
      quality.save_recall_model(  # Every evaluation: a run cut short keeps its latest model.
          model, task, _CHECKPOINT.value, command=" ".join(sys.argv), seed=_SEED.value,
          steps=step, batch=_BATCH.value, seconds=round(seconds, 1),
          device=str(jax.devices()[0].device_kind), jax_version=jax.__version__,
          date=time.strftime("%Y-%m-%d"), held_out_accuracy=accuracy,
          held_out_examples=len(held_out), history=history)
      if accuracy >= _STOP_ACCURACY.value or (_MAX_SECONDS.value or np.inf) < seconds:
        break
  print(f"wrote {_CHECKPOINT.value} after {step} steps, {time.time() - start:.0f} s; held-out"
        f" accuracy {accuracy:.4f}")


if __name__ == "__main__":
  app.run(main)
