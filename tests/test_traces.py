"""Tests of intent_jax.traces: the synthetic agentic contexts are valid, seeded and realistic."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from intent_jax import traces
from intent_jax.layout import BlockLayout, BlockPolicy


class TracesTest(parameterized.TestCase):

  @parameterized.parameters(*traces.TRACE_LENGTHS.values())
  def test_blocks_form_a_valid_context(self, num_tokens):
    blocks = traces.agentic_blocks(num_tokens, seed=3)
    layout = BlockLayout.from_blocks(blocks, num_tokens)  # Validates: no overlap, in range.
    self.assertEqual(blocks[-1].end, num_tokens)
    self.assertEqual({b.policy for b in blocks}, set(BlockPolicy))
    self.assertGreater(blocks[0].start, 0)  # Separators: some tokens no block covers.
    self.assertTrue(any(b.start % 16 for b in blocks))  # Edges do not line up with pages.
    self.assertEqual(layout.names[0][0], "system")
    relevant = [b for b in blocks if b.name.startswith("doc_") and b.score >= 0.85]
    self.assertLen(relevant, 1)
    covered = sum(b.end - b.start for b in blocks)
    self.assertGreater(covered, 0.95 * num_tokens)

  def test_seeded(self):
    self.assertEqual(traces.agentic_blocks(8192, seed=1), traces.agentic_blocks(8192, seed=1))
    self.assertNotEqual(traces.agentic_blocks(8192, seed=1), traces.agentic_blocks(8192, seed=2))

  def test_batch_of_different_lengths(self):
    layout = traces.agentic_batch([8192, 5000], seed=0)
    self.assertEqual((layout.batch_size, layout.num_tokens), (2, 8192))
    self.assertEqual(int(np.asarray(layout.ends)[1].max()), 5000)
    self.assertEqual(layout.blocks(1), tuple(traces.agentic_blocks(5000, seed=1)))
    self.assertEqual(traces.agentic_batch([100 * 64], capacity=9000).num_tokens, 9000)

  def test_drifting_scores(self):
    layout = traces.agentic_batch([8192], seed=0)
    walk = np.asarray(traces.drifting_scores(layout, 20, seed=0))
    self.assertEqual(walk.shape, (20, 1, layout.max_blocks))
    np.testing.assert_array_equal(walk[0], np.asarray(layout.scores))
    self.assertTrue(((walk >= 0) & (walk <= 1)).all())
    self.assertGreater(np.abs(walk[-1] - walk[0]).max(), 0.0)

  def test_too_small(self):
    with self.assertRaisesRegex(ValueError, "num_tokens=100 is too small"):
      traces.agentic_blocks(100)


if __name__ == "__main__":
  absltest.main()
