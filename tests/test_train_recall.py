"""Tests of benchmarks/train_recall.py: curriculum stages, batches, and that a step learns."""

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
from flax import nnx
import jax.numpy as jnp
import numpy as np

from benchmarks import train_recall
from intent_jax import tasks
from intent_jax.models.decoder import Decoder, DecoderConfig


class CurriculumTest(absltest.TestCase):

  def test_stages_parse(self):
    copy = train_recall.curriculum_stage("copy:256:96")
    self.assertEqual(copy, train_recall.CopyStage(256, 96))
    recall = train_recall.curriculum_stage("512:4:16")
    self.assertEqual((recall.seq_len, recall.facts_per_document, recall.facts_per_tool_output,
                      recall.scratchpad_facts, recall.num_queries), (512, 4, 4, 8, 16))
    mixed = train_recall.curriculum_stage("copy:1024:384|1024:6:24")
    self.assertEqual(mixed[0], train_recall.CopyStage(1024, 384))
    self.assertEqual(mixed[1].num_queries, 24)
    for bad in ("256:2", "copy:256", "x:1:2"):
      with self.assertRaisesRegex(ValueError, "must be seq_len:facts_per_document:questions"):
        train_recall.curriculum_stage(bad)

  def test_batches_predict_the_next_token(self):
    for stage in (train_recall.CopyStage(128, 16), train_recall.curriculum_stage("256:2:8")):
      tokens, positions, targets = train_recall.training_batch(stage, 4, seed=1)
      np.testing.assert_array_equal(tokens[np.arange(4)[:, None], positions + 1], targets)


class TrainStepTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    flags.FLAGS.mark_as_parsed()  # The optimizer reads the flags.

  @flagsaver.flagsaver(warmup=5)
  def test_steps_on_one_batch_lower_its_loss(self):
    model = Decoder(DecoderConfig(vocab_size=tasks.VOCAB_SIZE, model_dim=32, num_heads=2,
                                  num_kv_heads=1, head_dim=16, mlp_dim=64), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = train_recall.optimizer(100)
    opt_state = tx.init(params)
    batch = [jnp.asarray(x) for x in tasks.copy_examples(64, 16, 8, seed=0)]
    losses = []
    for _ in range(40):
      params, opt_state, loss, _ = train_recall.train_step(graphdef, tx, params, opt_state, *batch)
      losses.append(float(loss))
    self.assertLess(losses[-1], 0.8 * losses[0])


if __name__ == "__main__":
  absltest.main()
