"""Tests of intent_jax.tasks: the agentic recall contexts and the copy pretraining task."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from intent_jax import tasks
from intent_jax.layout import BlockPolicy

SMALL = tasks.RecallTask(seq_len=256, facts_per_document=2, facts_per_tool_output=2,
                         scratchpad_facts=4, num_queries=5)


class RecallTest(parameterized.TestCase):

  @parameterized.parameters(tasks.RecallTask(), SMALL)
  def test_every_answer_follows_its_key_once_inside_its_block(self, task):
    examples = tasks.recall_examples(task, 20, seed=3, split="eval")
    self.assertEqual(examples.tokens.shape, (20, task.seq_len))
    for i in range(20):
      tokens = examples.tokens[i]
      keys = tokens[(tokens >= tasks.KEY_BASE) & (tokens < tasks.VALUE_BASE)]
      asked = tokens[examples.answer_positions[i]]
      self.assertEqual(len(keys), task.num_facts + task.num_queries)  # Stated, then asked.
      self.assertLen(np.unique(asked), task.num_queries)
      for q in range(task.num_queries):
        position, key = examples.answer_positions[i, q], asked[q]
        self.assertEqual(tokens[position - 1], tasks.ASK)
        earlier = np.flatnonzero(tokens[:position] == key)
        self.assertLen(earlier, 1)  # The key is stated once before it is asked.
        fact = earlier[0]
        self.assertEqual(examples.fact_positions[i, q], fact)
        self.assertEqual(tokens[fact + 1], examples.answers[i, q])
        self.assertEqual(tokens[position + 1], examples.answers[i, q])
        block = examples.answer_blocks[i, q]
        self.assertBetween(fact, examples.starts[i, block], examples.ends[i, block] - 2)
      first_block = examples.answer_blocks[i, 0]
      self.assertBetween(first_block, 1, task.num_documents)  # The first asks a document.
      self.assertEqual(examples.scores[i, first_block], examples.scores[i, 1:9].max())

  def test_layout_covers_the_context_with_the_documented_policies(self):
    examples = tasks.recall_examples(SMALL, 4, seed=0)
    layout = examples.layout()
    blocks = layout.blocks(2)
    self.assertEqual([b.name for b in blocks], list(SMALL.block_names()))
    self.assertEqual(blocks[0].start, 0)
    self.assertEqual(blocks[-1].end, SMALL.seq_len)
    for before, after in zip(blocks, blocks[1:]):
      self.assertEqual(before.end, after.start)
    policies = {b.name: b.policy for b in blocks}
    self.assertEqual(policies["system"], BlockPolicy.ALWAYS)
    self.assertEqual(policies["tool_0"], BlockPolicy.SKIP)
    self.assertEqual(policies["tool_1"], BlockPolicy.ATTEND)
    self.assertEqual(policies["scratchpad"], BlockPolicy.SKIP)
    self.assertEqual(policies["recent_turn"], BlockPolicy.RECENT)
    system = examples.tokens[:, :SMALL.system_tokens]
    np.testing.assert_array_equal(system, np.broadcast_to(system[0], system.shape))

  def test_seeds_and_splits(self):
    a = tasks.recall_examples(SMALL, 3, seed=5)
    np.testing.assert_array_equal(a.tokens, tasks.recall_examples(SMALL, 3, seed=5).tokens)
    self.assertFalse(np.array_equal(a.tokens, tasks.recall_examples(SMALL, 3, seed=6).tokens))
    self.assertFalse(np.array_equal(
        a.tokens, tasks.recall_examples(SMALL, 3, seed=5, split="eval").tokens))

  def test_noisy_scores(self):
    examples = tasks.recall_examples(SMALL, 400, seed=1)
    answer = examples.answer_blocks[:, 0]
    rows = np.arange(400)
    for p in (0.0, 0.6, 1.0):
      scores = tasks.noisy_scores(examples, p, seed=2)
      tops = scores[rows, answer] == scores[:, 1:1 + SMALL.num_documents].max(axis=1)
      self.assertAlmostEqual(tops.mean(), p, delta=0.07)
      others = np.r_[0, 1 + SMALL.num_documents:SMALL.num_blocks]
      np.testing.assert_array_equal(scores[:, others], examples.scores[:, others])

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "seq_len=100 leaves"):
      tasks.RecallTask(seq_len=100)
    with self.assertRaisesRegex(ValueError, "facts need more than the 128 keys"):
      tasks.RecallTask(seq_len=4096, facts_per_document=20)
    with self.assertRaisesRegex(ValueError, "num_queries=0 must be a positive int"):
      dataclasses.replace(SMALL, num_queries=0)
    with self.assertRaisesRegex(ValueError, "split='test'"):
      tasks.recall_examples(SMALL, 2, split="test")
    with self.assertRaisesRegex(ValueError, "p=1.5"):
      tasks.noisy_scores(tasks.recall_examples(SMALL, 2), 1.5)


class CopyTest(absltest.TestCase):

  def test_the_targets_repeat_an_earlier_span(self):
    tokens, positions, targets = tasks.copy_examples(128, 16, 50, seed=4)
    rows = np.arange(50)[:, None]
    np.testing.assert_array_equal(tokens[rows, positions + 1], targets)
    span_start = positions[:, 0]
    for i in range(50):
      repeat = tokens[i, span_start[i]:span_start[i] + 16]
      windows = np.lib.stride_tricks.sliding_window_view(tokens[i, :span_start[i]], 16)
      self.assertTrue((windows == repeat).all(axis=1).any())
    with self.assertRaisesRegex(ValueError, "span=100"):
      tasks.copy_examples(128, 100, 1)


if __name__ == "__main__":
  absltest.main()
