"""Tests of intent_jax.cost: byte and FLOP counts against counts done by hand."""

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np

from intent_jax import cost
from intent_jax.layout import BlockLayout, BlockPolicy, SemanticBlock
from intent_jax.precision import Precision, page_bytes
from intent_jax.page_table import token_mask
from intent_jax.router import RouterConfig, route


class CostTest(parameterized.TestCase):

  @parameterized.parameters(
      (Precision.BF16, 2 * 16 * 128 * 2),
      (Precision.FP8, 2 * 16 * 128 + 4 * (128 + 16)),
      (Precision.INT8, 2 * 16 * 128 + 4 * (128 + 16)),
      (Precision.INT4, 16 * 128 + 4 * (128 + 16)),
  )
  def test_page_bytes(self, precision, expected):
    self.assertEqual(page_bytes(precision, 16, 128), expected)

  def test_dense_bytes_of_a_32k_context(self):
    self.assertEqual(cost.dense_kv_bytes(32768, 8, 128), 128 * 2**20)
    self.assertEqual(cost.dense_kv_bytes(17, 1, 4, page_size=16), 2 * (2 * 16 * 4 * 2))

  def test_flops_count_both_matmuls(self):
    # One query head of 2 channels over 3 keys: q.k and p.v are 6 multiply-adds each.
    self.assertEqual(cost.attention_flops(1, 1, 2, 3), 24)

  def test_routed_bytes_and_tokens(self):
    blocks = [
        SemanticBlock("system", 0, 40, BlockPolicy.ALWAYS),
        SemanticBlock("doc_a", 40, 100, BlockPolicy.ATTEND, 0.6),
        SemanticBlock("scratch", 100, 200, BlockPolicy.SKIP),
        SemanticBlock("doc_b", 200, 260, BlockPolicy.ATTEND, 0.9),
    ]
    layout = BlockLayout.from_blocks(blocks, 260)
    table = route(layout, jnp.asarray([260]), RouterConfig(recent_tokens=0),
                  memory_pressure=0.4)
    # Effective scores: doc_a 0.6 * 0.6 = 0.36 -> INT4, doc_b 0.9 * 0.6 = 0.54 -> INT8.
    # Pages 0-2 hold system tokens (BF16; page 2 shares doc_a), 3-6 only doc_a, 12-16 doc_b.
    precisions = np.asarray(table.precisions[0, :table.num_pages[0]])
    np.testing.assert_array_equal(table.page_ids[0, :table.num_pages[0]],
                                  [0, 1, 2, 3, 4, 5, 6, 12, 13, 14, 15, 16])
    np.testing.assert_array_equal(precisions, [0, 0, 0, 3, 3, 3, 3, 2, 2, 2, 2, 2])
    expected_bytes = 3 * sum(page_bytes(Precision(int(p)), 16, 64) for p in precisions)
    self.assertEqual(float(cost.routed_kv_bytes(table, 3, 64)[0]), expected_bytes)
    np.testing.assert_array_equal(
        cost.pages_by_precision(table)[0], [np.sum(precisions == p) for p in range(4)])
    self.assertEqual(int(cost.attended_tokens(table)[0]),
                     int(token_mask(table, 260).sum()))
    self.assertEqual(int(cost.attended_tokens(table)[0]), 160)

  def test_memory_growth(self):
    rows = cost.memory_growth(cost.MODEL_SHAPES["llama3-8b"])
    self.assertEqual([r["tokens"] for r in rows], list(cost.CONTEXT_LENGTHS))
    self.assertEqual(rows[0]["bytes_per_token_per_layer"], 4096)  # 2 * 8 heads * 128 * 2 B.
    self.assertEqual(rows[0]["total_bytes"], 2**30)  # 8K tokens * 32 layers * 4 KiB.
    mixed = cost.memory_growth(cost.MODEL_SHAPES["llama3-8b"],
                               {Precision.BF16: 0.5, Precision.INT4: 0.5})
    int4 = 8 * page_bytes(Precision.INT4, 16, 128) / 16
    self.assertAlmostEqual(mixed[0]["bytes_per_token_per_layer"], 0.5 * 4096 + 0.5 * int4)
    with self.assertRaisesRegex(ValueError, "mix fractions must sum to 1"):
      cost.memory_growth(cost.MODEL_SHAPES["llama3-70b"], {Precision.INT8: 0.5})


if __name__ == "__main__":
  absltest.main()
