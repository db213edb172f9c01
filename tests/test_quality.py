"""Tests of intent_jax.quality on the committed recall checkpoint."""

import dataclasses

from absl.testing import absltest
import jax.numpy as jnp
import numpy as np

from intent_jax import quality
from intent_jax import tasks
from intent_jax.precision import Precision, page_bytes
from intent_jax.page_table import page_mask
from intent_jax.router import RouterConfig, route

S = quality.Setting


class CheckpointTest(absltest.TestCase):

  def test_the_committed_model_answers_held_out_questions(self):
    model, task, meta = quality.load_recall_model()
    self.assertEqual(task.num_queries, 1)
    self.assertGreaterEqual(meta["held_out_accuracy"], 0.95)
    for field in ("command", "seed", "steps", "device", "date", "seconds"):
      self.assertIn(field, meta)
    examples = tasks.recall_examples(task, 128, seed=2, split="eval")  # Not seen in training.
    self.assertGreaterEqual(quality.dense_accuracy(model, examples), 0.95)

  def test_a_missing_checkpoint_says_how_to_make_one(self):
    with self.assertRaisesRegex(FileNotFoundError, "train one with"):
      quality.load_recall_model("/nonexistent/recall.npz")


class EvaluateTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    model, task, _ = quality.load_recall_model()
    examples = tasks.recall_examples(task, 16, seed=3, split="eval")
    cls.task = task
    cls.balanced = quality.router_presets(task)["balanced"]
    settings = [S("dense"), S("skip", skip_answer=True), S("int8", storage=Precision.INT8),
                S("int4", storage=Precision.INT4),
                S("int4 emulated", storage=Precision.INT4, emulated=True),
                S("cosine", cls.balanced, scores="cosine"),
                S("query", RouterConfig(recent_tokens=32), scores="query"),
                S("query exact", RouterConfig(recent_tokens=32), scores="query",
                  exact_page_scores=True)]
    cls.rows = {r["name"]: r for r in quality.evaluate(model, examples, settings, batch=8)}

  def test_every_setting_row(self):
    """One evaluation (the costly part, so one test: xdist would run setUpClass per worker),
    each property a subtest."""
    for check in (
        self._dense_is_exact_and_reads_everything,
        self._skipping_the_answer_block_loses_the_answer,
        self._storage_bytes_count_every_full_page_in_its_format,
        self._emulated_storage_matches_the_real_int4_cache,
        self._in_step_cosine_routing_keeps_the_page_budget,
        self._query_routing_reads_its_page_budget,
        self._answer_page_recall,
    ):
      with self.subTest(check.__name__):
        check()

  def _dense_is_exact_and_reads_everything(self):
    dense = self.rows["dense"]
    self.assertGreaterEqual(dense["accuracy"], 0.9)
    self.assertEqual(dense["kv_read_fraction"], 1.0)
    self.assertLess(dense["attention_error"], 1e-5)
    self.assertEqual(dense["answer_read"], 1.0)

  def _skipping_the_answer_block_loses_the_answer(self):
    skip = self.rows["skip"]
    self.assertEqual(skip["answer_read"], 0.0)
    self.assertLessEqual(skip["accuracy"], 0.25)
    self.assertGreater(skip["attention_error"], 0.05)

  def _storage_bytes_count_every_full_page_in_its_format(self):
    ps, dim = 16, 32
    length = self.task.seq_len - 1  # Up to the question's key.
    full_pages, pages = (length - 1) // ps, -(-length // ps)  # The last page stays BF16.
    bf16 = page_bytes(Precision.BF16, ps, dim)
    for name, precision in (("int8", Precision.INT8), ("int4", Precision.INT4),
                            ("int4 emulated", Precision.INT4)):
      expected = (full_pages * page_bytes(precision, ps, dim) + bf16) / (pages * bf16)
      self.assertAlmostEqual(self.rows[name]["kv_read_fraction"], expected, places=6)
    self.assertLess(self.rows["int8"]["attention_error"], self.rows["int4"]["attention_error"])

  def _emulated_storage_matches_the_real_int4_cache(self):
    real, emulated = self.rows["int4"], self.rows["int4 emulated"]
    self.assertEqual(real["accuracy"], emulated["accuracy"])
    self.assertAlmostEqual(real["attention_error"], emulated["attention_error"],
                           delta=0.1 * real["attention_error"])

  def _in_step_cosine_routing_keeps_the_page_budget(self):
    budget = self.balanced.max_pages / -(-(self.task.seq_len - 1) // 16)
    self.assertLessEqual(self.rows["cosine"]["kv_read_fraction"], budget)

  def _query_routing_reads_its_page_budget(self):
    pages = -(-self.task.seq_len // 16)
    for name in ("query", "query exact"):  # BF16 pages: bytes are pages.
      self.assertAlmostEqual(self.rows[name]["kv_read_fraction"], np.ceil(0.25 * pages) / pages,
                             delta=0.02)
    # Exact page logits find the answer's page; the bound-based scores are a relaxation of them.
    self.assertGreaterEqual(self.rows["query exact"]["accuracy"], 0.9)
    self.assertGreaterEqual(self.rows["query exact"]["accuracy"], self.rows["query"]["accuracy"])

  def _answer_page_recall(self):
    self.assertEqual(self.rows["dense"]["answer_page_recall"], 1.0)
    self.assertLess(self.rows["skip"]["answer_page_recall"], 1.0)
    for row in self.rows.values():
      self.assertBetween(row["answer_page_recall"], 0.0, 1.0)


class SettingTest(absltest.TestCase):

  def test_bad_settings(self):
    with self.assertRaisesRegex(ValueError, "scores='oracle'"):
      S("x", scores="oracle")
    with self.assertRaisesRegex(ValueError, "needs emulated=True"):
      S("x", storage=Precision.INT4, key_scales="token")
    with self.assertRaisesRegex(ValueError, "needs a quantized storage"):
      S("x", emulated=True)
    with self.assertRaisesRegex(TypeError, "router must be a RouterConfig"):
      S("x", router={"page_size": 16})
    with self.assertRaisesRegex(ValueError, "page_budget=0 must be in"):
      S("x", scores="query", page_budget=0)
    with self.assertRaisesRegex(ValueError, "score_channels is for scores='query'"):
      S("x", scores="cosine", score_channels=4)
    with self.assertRaisesRegex(ValueError, "score_channels=0 must be None or an int >= 1"):
      S("x", scores="query", score_channels=0)
    with self.assertRaisesRegex(ValueError, "score_sketch needs score_channels"):
      S("x", scores="query", score_sketch=True)


class EvaluateInputsTest(absltest.TestCase):

  def test_examples_must_ask_one_question(self):
    model, task, _ = quality.load_recall_model()
    many = tasks.recall_examples(dataclasses.replace(task, num_queries=3), 2)
    with self.assertRaisesRegex(ValueError, "ask 3 questions each"):
      quality.evaluate(model, many, [S("dense")])

  def test_presets_read_less_and_less(self):
    _, task, _ = quality.load_recall_model()
    presets = quality.router_presets(task)
    self.assertIsNone(presets["conservative"].max_pages)
    self.assertGreater(presets["balanced"].max_pages, presets["aggressive"].max_pages)
    self.assertIsInstance(presets["balanced"], RouterConfig)


class DecodeTraceTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model, cls.task, _ = quality.load_recall_model()
    cls.examples = tasks.recall_examples(cls.task, 4, seed=5, split="eval")

  def test_runtime_traces_are_the_routers_tables_step_by_step(self):
    setting = S("balanced", quality.router_presets(self.task)["balanced"])
    pages = quality.decode_page_selections(self.model, self.examples, setting, steps=3, batch=2)
    self.assertEqual(pages.shape, (3, 2, 4, 64))
    layout = self.examples.layout(self.examples.scores)
    for step in range(3):
      lengths = jnp.asarray(self.examples.answer_positions[:, 0] - 2 + step + 1)
      expected = page_mask(route(layout, lengths, setting.router), 64)
      for layer in range(2):
        np.testing.assert_array_equal(pages[step, layer], expected)

  def test_query_traces_keep_the_budget_and_the_forced_pages(self):
    setting = S("query", RouterConfig(recent_tokens=32), scores="query")
    pages = quality.decode_page_selections(self.model, self.examples, setting, steps=2)
    lengths = self.examples.answer_positions[:, 0] - 1 + np.arange(2)[:, None] + 1  # [step, n]
    np.testing.assert_array_equal(pages.sum(-1), np.ceil(0.25 * -(-lengths[:, None] // 16)) *
                                  np.ones((2, 2, 4)))
    self.assertTrue(np.all(pages[..., 0]))  # The system prompt's page.
    last = (lengths - 1) // 16  # The page of the step's own token (recent window).
    self.assertTrue(np.all(np.take_along_axis(pages, last[:, None, :, None], axis=-1)))

  def test_bad_traces(self):
    with self.assertRaisesRegex(ValueError, "traces route by runtime, noisy or query"):
      quality.decode_page_selections(self.model, self.examples, S("x", storage=Precision.INT8),
                                     steps=2)
    with self.assertRaisesRegex(ValueError, "steps=0 must be in"):
      quality.decode_page_selections(self.model, self.examples, S("x"), steps=0)


if __name__ == "__main__":
  absltest.main()
