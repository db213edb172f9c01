"""The page-selection kernel of query-mode routing against the jax.numpy selection,
`router.reference_select_pages` (in Pallas interpret mode off a GPU, compiled on a GPU); and the
dispatch of `router.select_pages`."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import router
from intent_jax import traces
from pallas_kernels.gpu import select_pages as gpu_kernel

INTERPRET = jax.default_backend() != "gpu"
KERNEL = "pallas_gpu_interpret" if INTERPRET else "pallas_gpu"
# Ties, -0 beside 0, unmapped pages (-inf) and NaN among the scores.
SCORE_CHOICES = (-np.inf, np.nan, -3.0, -1.0, -1.0, -0.0, 0.0, 0.5, 2.0)


def _selection_inputs(seed, batch, num_pages, budgets, forced_rate=0.1, ties=True):
  rng = np.random.default_rng(seed)
  forced = rng.random((batch, num_pages)) < forced_rate
  candidate = (rng.random((batch, num_pages)) < 0.7) & ~forced
  if ties:
    scores = rng.choice(SCORE_CHOICES, size=(batch, num_pages))
  else:
    scores = rng.normal(size=(batch, num_pages))
  return (jnp.asarray(forced), jnp.asarray(candidate), jnp.asarray(scores, jnp.float32),
          jnp.asarray(budgets, jnp.int32))


class SelectPagesKernelTest(parameterized.TestCase):

  # (name, pages, capacity, budgets (one per sequence), forced pages' rate, tied scores)
  @parameterized.named_parameters(
      ("ties_budgets", 100, 40, (0, 1, 20, 35, 60), 0.1, True),
      ("distinct_scores", 77, 77, (5, 30, 77, 200), 0.05, False),
      ("forced_over_capacity", 64, 4, (4, 10, 2, 64), 0.3, True),
      ("capacity_past_pages", 24, 40, (3, 24, 40, 12), 0.1, True),
      ("power_of_two_pages", 256, 128, (128, 17, 60, 255, 0), 0.0, True),
  )
  def test_matches_reference(self, num_pages, capacity, budgets, forced_rate, ties):
    inputs = _selection_inputs(num_pages, len(budgets), num_pages, budgets, forced_rate, ties)
    expected = router.reference_select_pages(*inputs, capacity=capacity)
    got = gpu_kernel.select_pages(*inputs, capacity=capacity, interpret=INTERPRET)
    for name, want, have in zip(("selected", "selected_before", "page_ids"), expected, got):
      self.assertEqual(have.shape, want.shape, name)
      np.testing.assert_array_equal(have, want, err_msg=name)
    # The reference itself: the budget holds, and no left-out candidate beats a chosen one.
    forced, candidate, scores, budgets = (np.asarray(x) for x in inputs)
    selected = np.asarray(expected[0])
    scores = np.where(np.isnan(scores), -np.inf, scores)
    for b in range(len(budgets)):
      chosen, left = candidate[b] & selected[b], candidate[b] & ~selected[b]
      room = max(min(budgets[b], capacity) - forced[b].sum(), 0)
      self.assertEqual(chosen.sum(), min(room, candidate[b].sum()))
      if chosen.any() and left.any():
        self.assertGreaterEqual(scores[b][chosen].min(), scores[b][left].max())

  def test_long_tables_are_refused(self):
    with self.assertRaisesRegex(NotImplementedError, "at most"):
      gpu_kernel.static_validate_inputs(gpu_kernel.MAX_PAGES + 1)


class SelectPagesDispatchTest(parameterized.TestCase):

  def _plan_and_scores(self, num_tokens=2000, batch=3):
    layout = traces.agentic_batch([num_tokens] * batch, seed=4).unnamed()
    lengths = jnp.asarray([num_tokens, num_tokens - 300, 700], jnp.int32)
    config = router.RouterConfig(page_size=16, recent_tokens=64)
    plan = router.plan_query(layout, lengths, config)
    scores = jax.random.normal(jax.random.key(5), (batch, plan.num_pages))
    return plan, scores

  def test_kernel_table_equals_reference_table(self):
    plan, scores = self._plan_and_scores()
    budget = jnp.asarray([10, 40, 3], jnp.int32)
    tables = [router.select_pages(plan, page_scores=scores, budget=budget, implementation=name)
              for name in ("reference", KERNEL)]
    self.assertGreater(int(tables[0].num_pages.min()), 0)
    for want, have in zip(jax.tree.leaves(tables[0]), jax.tree.leaves(tables[1])):
      np.testing.assert_array_equal(have, want)

  def test_default_equals_reference(self):
    plan, scores = self._plan_and_scores()
    default = router.select_pages(plan, page_scores=scores, budget=20)
    reference = router.select_pages(plan, page_scores=scores, budget=20,
                                    implementation="reference")
    np.testing.assert_array_equal(default.page_ids, reference.page_ids)

  def test_bad_implementation(self):
    plan, scores = self._plan_and_scores()
    with self.assertRaisesRegex(ValueError, "implementation='fast' must be None or one of"):
      router.select_pages(plan, page_scores=scores, implementation="fast")
    if jax.default_backend() != "gpu":
      with self.assertRaisesRegex(NotImplementedError, "runs on GPUs"):
        router.select_pages(plan, page_scores=scores, implementation="pallas_gpu")


if __name__ == "__main__":
  absltest.main()
