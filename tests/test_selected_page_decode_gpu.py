"""The GPU kernel against reference.paged_attention: in Pallas interpret mode off a GPU (make test),
compiled on a GPU (`python -m tests.test_selected_page_decode_gpu` on the GPU machine)."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import cache as cache_lib
from intent_jax import reference
from intent_jax.attention import decode_attention
from intent_jax.layout import BlockLayout, BlockPolicy
from intent_jax.precision import Precision
from intent_jax.router import RouterConfig, route
from pallas_kernels.gpu import selected_page_decode as kernel
from pallas_kernels.tuned_block_sizes import GpuDecodeBlocks
from tests import spec

B16, FP8, INT8, INT4 = Precision.BF16, Precision.FP8, Precision.INT8, Precision.INT4
NUM_TOKENS, BATCH = spec.KERNEL_TOKENS, spec.KERNEL_BATCH
INTERPRET = jax.default_backend() != "gpu"


# (name, q_len, num_q_heads, num_kv_heads, head_dim, page_size, cache dtype, q dtype, pressure,
#  eight-bit format, sinks and softcap, splits)
CASES = (
    ("gqa_mixed_int8", 1, 8, 2, 64, 16, "float32", jnp.float32, 0.4, INT8, False, 3),
    ("causal_q8_sinks_softcap", 8, 4, 2, 64, 16, "float32", jnp.float32, 0.4, INT8, True, 2),
    ("mqa_page32", 3, 4, 1, 32, 32, "float32", jnp.float32, 0.5, FP8, True, None),
    ("page64_two_bit_words", 1, 4, 2, 64, 64, "float32", jnp.float32, 0.4, INT8, False, 2),
    ("bf16_q_mixed", 4, 8, 2, 128, 16, "bfloat16", jnp.bfloat16, 0.4, INT8, True, 3),
)


class SelectedPageDecodeTest(parameterized.TestCase):

  @parameterized.named_parameters(*CASES)
  def test_matches_paged_oracle(self, q_len, num_q_heads, num_kv_heads, head_dim, page_size,
                                cache_dtype, q_dtype, pressure, eight_bit, extras, splits):
    cache, table = spec.kernel_case(q_len + num_q_heads, num_kv_heads=num_kv_heads,
                                    head_dim=head_dim, page_size=page_size, dtype=cache_dtype,
                                    pressure=pressure, eight_bit=eight_bit, recent=24)
    stored = np.asarray(cache_lib.lookup(cache, table)[0])
    if pressure > 0:  # The case really mixes formats in one launch.
      self.assertGreater(len(set(stored[stored >= 0].tolist())), 1)
    kq, ks = jax.random.split(jax.random.key(q_len))
    q = jax.random.normal(kq, (BATCH, q_len, num_q_heads, head_dim), q_dtype)
    options = {}
    if extras:
      options = dict(sinks=jax.random.normal(ks, (num_q_heads,)), softcap=4.0, scale=0.2)
    out = kernel.selected_page_decode(q, cache, table, interpret=INTERPRET, num_splits=splits,
                                      poison=True, **options)
    expected = reference.paged_attention(q, cache, table, **options)
    self.assertEqual(out.dtype, q_dtype)
    if q_dtype == jnp.float32:
      np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    else:
      out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
      self.assertLess(np.linalg.norm(out - expected) / np.linalg.norm(expected), 1e-2)

  @parameterized.parameters((1, 8), (1, 32), (2, 8))
  def test_bf16_only_cache_queries_before_the_end(self, q_len, pages_per_block):
    """One stored format (entries not sorted) and queries placed before the sequences' ends: with
    one query token its position is folded into the token bits, with two each row masks by its
    own. 32 pages per block is wider than the table (19 pages): its entries are padded."""
    cache, table = spec.kernel_case(7, num_kv_heads=2, head_dim=32, page_size=16,
                                    dtype="float32", pressure=0.0, eight_bit=INT8, recent=16,
                                    formats=(B16,))
    q_positions = cache.lengths[:, None] - 45 + jnp.arange(q_len)
    q = jax.random.normal(jax.random.key(3), (BATCH, q_len, 4, 32))
    out = kernel.selected_page_decode(q, cache, table, q_positions=q_positions,
                                      interpret=INTERPRET, num_splits=2, poison=True,
                                      blocks=GpuDecodeBlocks(pages_per_block, 4, 2))
    expected = reference.paged_attention(q, cache, table, q_positions=q_positions)
    everything = reference.paged_attention(q, cache, table)
    self.assertGreater(float(jnp.max(jnp.abs(expected - everything))), 1e-2)  # Positions count.
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

  def test_return_lse_matches_oracle(self):
    """What sharded decode merges: float32 output and log-sum-exp, over 3 splits."""
    cache, table = spec.kernel_case(5, num_kv_heads=2, head_dim=32, page_size=16,
                                    dtype="float32", pressure=0.4, eight_bit=INT8, recent=24)
    q = jax.random.normal(jax.random.key(5), (BATCH, 2, 4, 32), jnp.bfloat16)
    out, lse = kernel.selected_page_decode(q, cache, table, interpret=INTERPRET, num_splits=3,
                                           return_lse=True)
    want_out, want_lse = reference.paged_attention(q, cache, table, return_lse=True)
    self.assertEqual(out.dtype, jnp.float32)
    np.testing.assert_allclose(out, want_out, rtol=2e-2, atol=2e-2)  # bf16 matmul inputs.
    np.testing.assert_allclose(lse, want_lse, rtol=1e-2, atol=1e-2)

  @parameterized.parameters(False, True)
  def test_nothing_selected_gives_zeros(self, with_sinks):
    cache, table = spec.kernel_case(0, num_kv_heads=2, head_dim=32, page_size=16,
                                    dtype="float32", pressure=0.0, eight_bit=INT8, recent=0,
                                    default_policy=BlockPolicy.SKIP)
    empty = BlockLayout.stack([BlockLayout.from_blocks([], NUM_TOKENS)] * BATCH)
    table = route(empty, cache.lengths, RouterConfig(recent_tokens=0,
                                                     default_policy=BlockPolicy.SKIP))
    self.assertEqual(int(table.num_pages.sum()), 0)
    q = jax.random.normal(jax.random.key(0), (BATCH, 2, 4, 32))
    sinks = jnp.ones(4) if with_sinks else None
    out = kernel.selected_page_decode(q, cache, table, sinks=sinks, interpret=INTERPRET)
    np.testing.assert_array_equal(out, 0.0)

  def test_dispatch_steps_aside_off_gpu_and_for_contiguous_kv(self):
    cache, table = spec.kernel_case(1, num_kv_heads=2, head_dim=32, page_size=16,
                                    dtype="float32", pressure=0.0, eight_bit=INT8, recent=16)
    q = jax.random.normal(jax.random.key(1), (BATCH, 1, 4, 32))
    if jax.default_backend() != "gpu":
      with self.assertRaisesRegex(NotImplementedError, "pallas_gpu runs on GPUs"):
        decode_attention(q, cache, table, implementation="pallas_gpu")
      out = decode_attention(q, cache, table, implementation=["pallas_gpu", "reference"])
      np.testing.assert_array_equal(out, reference.paged_attention(q, cache, table))
    k = jnp.zeros((BATCH, NUM_TOKENS, 2, 32))
    with self.assertRaisesRegex(NotImplementedError, "reads a paged KVCache"):
      kernel.selected_page_decode(q, (k, k), table, interpret=INTERPRET)


if __name__ == "__main__":
  absltest.main()
