"""Tests of intent_jax.router against the independent statement of the rules in tests/spec.py."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax.layout import BlockLayout, BlockPolicy, SemanticBlock
from intent_jax.precision import Precision
from intent_jax.page_table import page_mask, token_mask
from intent_jax import router
from intent_jax.router import Decision, Reason, RouterConfig, explain
from intent_jax.router import precision_for_score, route
from tests import spec

# (name, config, num_tokens): page sizes, windows, budgets, default policies and formats.
PROPERTY_CASES = (
    ("plain", RouterConfig(page_size=16, recent_tokens=0), 250),
    ("budget_skip_default", RouterConfig(page_size=32, recent_tokens=20, max_pages=4,
                                         default_policy=BlockPolicy.SKIP), 400),
    ("budget_fp8_pressure", RouterConfig(page_size=16, recent_tokens=40, max_pages=7,
                                         memory_pressure=0.3,
                                         eight_bit_format=Precision.FP8), 333),
    ("big_pages_tight", RouterConfig(page_size=64, recent_tokens=5, max_pages=2,
                                     score_threshold=0.7), 600),
    ("window_covers_all", RouterConfig(page_size=16, recent_tokens=1000), 300),
    ("one_page", RouterConfig(page_size=128, recent_tokens=3, max_pages=1,
                              default_policy=BlockPolicy.SKIP), 500),
)
BATCH, MAX_BLOCKS, ROUNDS = 8, 8, 25


def _layout(rows, num_tokens):
  return BlockLayout.stack(
      [BlockLayout.from_blocks(b, num_tokens, max_blocks=MAX_BLOCKS) for b in rows])


class RouteMatchesSpecTest(parameterized.TestCase):

  @parameterized.named_parameters(*PROPERTY_CASES)
  def test_route_matches_spec(self, config, num_tokens):
    rng = np.random.default_rng(num_tokens)
    for round_ in range(ROUNDS):
      rows = [spec.random_blocks(rng, num_tokens, MAX_BLOCKS, grid_scores=round_ % 2 == 0)
              for _ in range(BATCH)]
      layout = _layout(rows, num_tokens)
      seq_lens = rng.integers(1, num_tokens + 1, size=BATCH)
      seq_lens[0] = num_tokens
      override = round_ % 3 == 0
      scores = rng.choice(spec.SCORE_GRID, size=(BATCH, MAX_BLOCKS)) if override else None
      pressure = rng.choice([0.0, 0.25, 0.5, 0.9], size=BATCH) if override else None
      table = route(layout, jnp.asarray(seq_lens), config,
                    scores=None if scores is None else jnp.asarray(scores, jnp.float32),
                    memory_pressure=pressure)
      mask = np.asarray(token_mask(table, num_tokens))
      for b, blocks in enumerate(rows):
        expected = spec.expected_routing(
            blocks, num_tokens, int(seq_lens[b]), config,
            scores=None if scores is None else scores[b, :len(blocks)],
            pressure=None if pressure is None else pressure[b])
        where = f"round {round_} row {b}: blocks={blocks} seq_len={seq_lens[b]}"
        self._assert_row(table, mask, b, len(blocks), expected, where)

  @parameterized.named_parameters(*PROPERTY_CASES)
  def test_query_mode_matches_spec(self, config, num_tokens):
    rng = np.random.default_rng(num_tokens + 1)
    num_pages = -(-num_tokens // config.page_size)
    for round_ in range(ROUNDS // 2):
      rows = [spec.random_blocks(rng, num_tokens, MAX_BLOCKS) for _ in range(BATCH)]
      layout = _layout(rows, num_tokens)
      seq_lens = rng.integers(1, num_tokens + 1, size=BATCH)
      # Ties (a grid; -0 ties with 0), unmapped pages (-inf) and NaN among the scores.
      page_scores = rng.choice([-np.inf, np.nan, -3.0, -1.0, -1.0, -0.0, 0.0, 0.5, 2.0],
                               size=(BATCH, num_pages)).astype(np.float32)
      budgets = rng.integers(0, config.table_capacity(num_tokens) + 3, size=BATCH)
      table = route(layout, jnp.asarray(seq_lens), config, page_scores=jnp.asarray(page_scores),
                    budget=jnp.asarray(budgets))
      mask = np.asarray(token_mask(table, num_tokens))
      for b, blocks in enumerate(rows):
        expected = spec.expected_query_routing(blocks, num_tokens, int(seq_lens[b]), config,
                                               page_scores[b], int(budgets[b]))
        where = (f"round {round_} row {b}: blocks={blocks} seq_len={seq_lens[b]}"
                 f" budget={budgets[b]} scores={page_scores[b]}")
        self._assert_row(table, mask, b, len(blocks), expected, where)

  def _assert_row(self, table, mask, b, n, expected, where):
    np.testing.assert_array_equal(mask[b], expected.selected, err_msg=where)
    count = int(table.num_pages[b])
    self.assertEqual(list(np.asarray(table.page_ids[b, :count])), expected.page_ids, where)
    self.assertEqual(list(np.asarray(table.precisions[b, :count])),
                     expected.page_precisions, where)
    self.assertEqual(bool(table.overflow[b]), expected.overflow, where)
    self.assertEqual(bool(table.truncated[b]), expected.truncated, where)
    self.assertEqual([Decision(int(x)).name for x in table.block_decisions[b, :n]],
                     expected.decisions, where)
    self.assertEqual([Reason(int(x)).name for x in table.block_reasons[b, :n]],
                     expected.reasons, where)
    self.assertEqual(list(np.asarray(table.block_precisions[b, :n])),
                     expected.block_precisions, where)
    self.assertTrue(np.all(np.asarray(table.block_reasons[b, n:]) == Reason.PADDING), where)
    np.testing.assert_array_equal(table.page_ids[b, count:], 0, err_msg=where)
    np.testing.assert_array_equal(table.token_bits[b, count:], 0, err_msg=where)


class RouteTest(parameterized.TestCase):

  def _example(self):
    blocks = [
        SemanticBlock("system", 0, 20, BlockPolicy.ALWAYS),
        SemanticBlock("doc", 20, 70, BlockPolicy.ATTEND, 0.9),
        SemanticBlock("stale", 75, 130, BlockPolicy.ATTEND, 0.3),
        SemanticBlock("scratch", 130, 170, BlockPolicy.SKIP),
        SemanticBlock("turn", 170, 200, BlockPolicy.RECENT),
    ]
    return BlockLayout.from_blocks(blocks, 200)

  def test_worked_example(self):
    table = route(self._example(), jnp.asarray([190]), RouterConfig(recent_tokens=40))
    mask = np.asarray(token_mask(table, 200)[0])
    # Attended: system, doc, the uncovered gap 70..75 (default ALWAYS), window 150..190.
    expected = np.zeros(200, bool)
    expected[:75] = True
    expected[150:190] = True
    np.testing.assert_array_equal(mask, expected)
    self.assertEqual(list(np.asarray(table.page_ids[0, :table.num_pages[0]])),
                     [0, 1, 2, 3, 4, 9, 10, 11])
    rows = {r["name"]: r for r in explain(table, self._example())}
    self.assertEqual(rows["stale"]["reason"], "BELOW_THRESHOLD")
    self.assertEqual(rows["scratch"]["decision"], "WINDOW_ONLY")
    self.assertEqual(rows["turn"]["decision"], "ATTENDED")
    self.assertEqual(rows["doc"]["pages"], (1, 5))

  def test_over_budget_drops_lowest_score_first(self):
    blocks = [
        SemanticBlock("a", 0, 32, BlockPolicy.ATTEND, 0.6),
        SemanticBlock("b", 32, 64, BlockPolicy.ATTEND, 0.9),
        SemanticBlock("c", 64, 96, BlockPolicy.ATTEND, 0.7),
        SemanticBlock("turn", 96, 112, BlockPolicy.RECENT),
    ]
    layout = BlockLayout.from_blocks(blocks, 112)
    table = route(layout, jnp.asarray([112]), RouterConfig(recent_tokens=0, max_pages=5))
    reasons = [r["reason"] for r in explain(table, layout)]
    self.assertEqual(reasons, ["OVER_BUDGET", "ABOVE_THRESHOLD", "ABOVE_THRESHOLD", "POLICY"])
    self.assertTrue(bool(table.overflow[0]))
    self.assertFalse(bool(table.truncated[0]))
    self.assertEqual(int(table.num_pages[0]), 5)

  def test_forced_pages_over_capacity_are_truncated_not_dropped_silently(self):
    layout = BlockLayout.from_blocks([SemanticBlock("system", 0, 100, BlockPolicy.ALWAYS)], 100)
    table = route(layout, jnp.asarray([100]), RouterConfig(max_pages=3))
    self.assertTrue(bool(table.truncated[0]))
    self.assertEqual(int(table.num_pages[0]), 3)

  def test_sequence_longer_than_layout_is_truncated(self):
    table = route(self._example(), jnp.asarray([250]), RouterConfig())
    self.assertTrue(bool(table.truncated[0]))
    self.assertFalse(bool(np.asarray(token_mask(table, 256))[0, 200:].any()))

  def test_page_mask_marks_exactly_the_table_pages(self):
    table = route(self._example(), jnp.asarray([190]), RouterConfig(recent_tokens=40))
    expected = np.zeros(13, bool)
    expected[[0, 1, 2, 3, 4, 9, 10, 11]] = True
    np.testing.assert_array_equal(page_mask(table, 13)[0], expected)

  def test_traces_once_across_steps(self):
    layout = self._example()
    config = RouterConfig(recent_tokens=40)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(layout, seq_lens, scores, pressure):
      return route(layout, seq_lens, config, scores=scores, memory_pressure=pressure)

    for seq_len in (120, 150, 190, 200):
      scores = jnp.full((1, layout.max_blocks), seq_len / 200, jnp.float32)
      step(layout, jnp.asarray([seq_len]), scores, jnp.float32(seq_len / 400))

  def test_one_plan_serves_every_layer_of_a_step(self):
    # plan_query once, select_pages per layer (its own scores and budget) is route each time;
    # the jitted per-layer selection traces once.
    config = RouterConfig(page_size=16, recent_tokens=24, max_pages=9)
    rng = np.random.default_rng(11)
    layout = _layout([spec.random_blocks(rng, 300, MAX_BLOCKS) for _ in range(3)], 300)
    seq_lens = jnp.asarray([300, 170, 41])
    plan = router.plan_query(layout, seq_lens, config, memory_pressure=0.3)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def select(plan, page_scores, budget):
      return router.select_pages(plan, page_scores=page_scores, budget=budget)

    for layer in range(3):
      page_scores = jnp.asarray(rng.normal(size=(3, 19)), jnp.float32)
      budget = jnp.asarray([4 + layer, 9, 2], jnp.int32)
      chex.assert_trees_all_equal(
          select(plan, page_scores, budget),
          route(layout, seq_lens, config, memory_pressure=0.3, page_scores=page_scores,
                budget=budget))

  def test_vmaps_over_an_extra_axis(self):
    config = RouterConfig(recent_tokens=30, max_pages=6)
    rng = np.random.default_rng(7)
    groups = [_layout([spec.random_blocks(rng, 300, MAX_BLOCKS) for _ in range(2)], 300)
              for _ in range(3)]
    # Names are static metadata; stacking layouts along a new axis needs equal metadata.
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *(g.unnamed() for g in groups))
    seq_lens = jnp.asarray(rng.integers(1, 301, size=(3, 2)), jnp.int32)
    batched = jax.vmap(lambda l, s: route(l, s, config))(stacked, seq_lens)
    for i, layout in enumerate(groups):
      single = route(layout, seq_lens[i], config)
      chex.assert_trees_all_equal(jax.tree.map(lambda x: x[i], batched), single)

  @parameterized.product(
      eight_bit=(Precision.INT8, Precision.FP8),
      pressure=(0.0, 0.2, 0.5, 1.0),
  )
  def test_precision_rule_is_monotone(self, eight_bit, pressure):
    config = RouterConfig(eight_bit_format=eight_bit)
    tier = {Precision.BF16: 0, eight_bit: 1, Precision.INT4: 2}
    scores = jnp.linspace(0.0, 1.0, 101)
    tiers = [tier[Precision(int(p))] for p in precision_for_score(scores, pressure, config)]
    self.assertEqual(tiers, sorted(tiers, reverse=True))  # Higher score: never lower precision.
    more = precision_for_score(scores, min(pressure + 0.3, 1.0), config)
    more_tiers = [tier[Precision(int(p))] for p in more]
    self.assertTrue(all(m >= t for m, t in zip(more_tiers, tiers)))  # More pressure: never higher.

  @parameterized.parameters(
      (1.0, 0.0, Precision.BF16),
      (0.75, 0.0, Precision.BF16),
      (0.74, 0.0, Precision.INT8),
      (0.5, 0.0, Precision.INT8),
      (0.49, 0.0, Precision.INT4),
      (1.0, 0.3, Precision.INT8),
      (1.0, 0.6, Precision.INT4),
  )
  def test_precision_table(self, score, pressure, expected):
    got = precision_for_score(jnp.float32(score), jnp.float32(pressure), RouterConfig())
    self.assertEqual(Precision(int(got)), expected)


class RouterErrorsTest(parameterized.TestCase):

  @parameterized.parameters(
      (dict(page_size=8), "page_size=8 must be a power of two in \\[16, 256\\]"),
      (dict(page_size=48), "page_size=48"),
      (dict(page_size=512), "page_size=512"),
      (dict(score_threshold=1.5), "score_threshold=1.5 must be a number in \\[0, 1\\]"),
      (dict(memory_pressure=-0.1), "memory_pressure=-0.1"),
      (dict(recent_tokens=-1), "recent_tokens=-1 must be an int >= 0"),
      (dict(max_pages=0), "max_pages=0 must be None or an int >= 1"),
      (dict(default_policy=BlockPolicy.ATTEND), "default_policy=ATTEND is not allowed"),
      (dict(default_policy=9), "default_policy=9 is not a BlockPolicy"),
      (dict(eight_bit_format=Precision.INT4), "eight_bit_format=INT4 must be INT8 or FP8"),
      (dict(bf16_min_score=0.4, eight_bit_min_score=0.6), "eight_bit_min_score=0.6 must be <="),
  )
  def test_bad_config(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      RouterConfig(**kwargs)

  def test_bad_route_arguments(self):
    layout = BlockLayout.from_blocks([SemanticBlock("a", 0, 10, BlockPolicy.ALWAYS)], 32)
    config = RouterConfig()
    with self.assertRaisesRegex(TypeError, "layout must be a BlockLayout"):
      route([SemanticBlock("a", 0, 10, BlockPolicy.ALWAYS)], jnp.asarray([10]), config)
    with self.assertRaisesRegex(TypeError, "config must be a RouterConfig"):
      route(layout, jnp.asarray([10]), {"page_size": 16})
    with self.assertRaisesRegex(ValueError, "seq_lens must be an integer array of shape \\(1,\\)"):
      route(layout, jnp.asarray([10, 12]), config)
    with self.assertRaisesRegex(ValueError, "seq_lens must be an integer array"):
      route(layout, jnp.asarray([10.0]), config)
    with self.assertRaisesRegex(ValueError, "scores must be a float array of shape \\(1, 1\\)"):
      route(layout, jnp.asarray([10]), config, scores=jnp.ones((1, 3)))
    with self.assertRaisesRegex(ValueError, "memory_pressure must be a scalar or shape \\(1,\\)"):
      route(layout, jnp.asarray([10]), config, memory_pressure=jnp.ones((2,)))

  def test_bad_select_pages_arguments(self):
    layout = BlockLayout.from_blocks([SemanticBlock("a", 0, 10, BlockPolicy.ATTEND)], 32)
    plan = router.plan_query(layout, jnp.asarray([20]), RouterConfig())
    with self.assertRaisesRegex(TypeError, "plan must be a QueryPlan"):
      router.select_pages(layout, page_scores=jnp.ones((1, 2)))
    with self.assertRaisesRegex(ValueError, "needs query and cache, or page_scores"):
      router.select_pages(plan, budget=1)
    with self.assertRaisesRegex(ValueError, "page_scores must be a float array of shape \\(1, 2"):
      router.select_pages(plan, page_scores=jnp.ones((1, 3)))


if __name__ == "__main__":
  absltest.main()
