"""Tests of intent_jax.prefetch: the vote predictor and the replay simulator."""

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np

from intent_jax import prefetch


class PrefetchTest(parameterized.TestCase):

  @parameterized.parameters((1, 1), (3, 1), (3, 2), (4, 4))
  def test_predictions_match_a_loop(self, window, min_votes):
    rng = np.random.default_rng(window)
    selections = rng.random((12, 2, 30)) < 0.3
    got = np.asarray(prefetch.predictions(jnp.asarray(selections), window=window,
                                          min_votes=min_votes))
    for s in range(12):
      votes = selections[max(s - window, 0):s].sum(axis=0)
      np.testing.assert_array_equal(got[s], votes >= min_votes, err_msg=f"step {s}")

  def test_static_selection_is_all_hits(self):
    selections = jnp.tile(jnp.asarray([True, False, True, True])[None], (5, 1))
    report = prefetch.simulate(selections, window=2, page_bytes=100.0)
    self.assertEqual((report.hit_rate, report.precision), (1.0, 1.0))
    self.assertEqual((report.needed_pages, report.early_bytes, report.wasted_bytes),
                     (12, 1200.0, 0.0))

  def test_counts_misses_and_waste(self):
    selections = jnp.asarray([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], bool)
    report = prefetch.simulate(selections, window=1, page_bytes=10.0)
    # Step 1 predicts {0, 1}, needs {1, 2}; step 2 predicts {1, 2}, needs {2, 3}.
    self.assertEqual((report.needed_pages, report.predicted_pages), (4, 4))
    self.assertEqual((report.hit_rate, report.precision), (0.5, 0.5))
    self.assertEqual((report.early_bytes, report.wasted_bytes), (20.0, 20.0))

  def test_bad_window(self):
    with self.assertRaisesRegex(ValueError, "need window >= 1 and 1 <= min_votes <= window"):
      prefetch.predictions(jnp.zeros((2, 3), bool), window=1, min_votes=2)


if __name__ == "__main__":
  absltest.main()
