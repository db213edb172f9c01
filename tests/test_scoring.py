"""Tests of intent_jax.scoring: cosine scores against a numpy computation."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import scoring
from intent_jax.layout import BlockLayout, BlockPolicy, SemanticBlock


class CosineScoresTest(absltest.TestCase):

  def test_matches_numpy(self):
    blocks = [SemanticBlock("a", 2, 10, BlockPolicy.ATTEND, 0.5),
              SemanticBlock("b", 12, 30, BlockPolicy.ATTEND, 0.5),
              SemanticBlock("late", 35, 40, BlockPolicy.ATTEND, 0.5)]
    layout = BlockLayout.stack([BlockLayout.from_blocks(blocks, 40, max_blocks=4)] * 2)
    seq_lens = jnp.asarray([40, 20])
    kq, kk = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (2, 2, 6, 8))
    k = jax.random.normal(kk, (2, 40, 3, 8))
    scores = np.asarray(scoring.cosine_scores(q, k, layout, seq_lens))
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    for b in range(2):
      for j, block in enumerate(blocks):
        end = min(block.end, int(seq_lens[b]))
        if block.start >= end:
          self.assertEqual(scores[b, j], 0.0)  # Not reached yet.
          continue
        cosines = []
        for h in range(3):
          query = qn[b, :, 2 * h:2 * h + 2].mean(axis=(0, 1))
          key = kn[b, block.start:end, h].mean(axis=0)
          cosines.append(query @ key / np.linalg.norm(query) / np.linalg.norm(key))
        self.assertAlmostEqual(scores[b, j], (1 + np.mean(cosines)) / 2, places=5)
      self.assertEqual(scores[b, 3], 0.0)  # Padding.

  def test_aligned_block_scores_one_and_opposite_zero(self):
    layout = BlockLayout.from_blocks([SemanticBlock("same", 0, 4, BlockPolicy.ATTEND),
                                      SemanticBlock("opposite", 4, 8, BlockPolicy.ATTEND)], 8)
    q = jax.random.normal(jax.random.key(1), (1, 1, 2, 16))
    direction = q[0, 0]  # [kv head, head_dim]: one query head per kv head.
    k = jnp.concatenate([jnp.tile(direction, (1, 4, 1, 1)), jnp.tile(-direction, (1, 4, 1, 1))],
                        axis=1)
    scores = scoring.cosine_scores(q, k, layout, jnp.asarray([8]))
    np.testing.assert_allclose(scores, [[1.0, 0.0]], atol=1e-6)


if __name__ == "__main__":
  absltest.main()
