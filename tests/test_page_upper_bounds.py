"""The page-bound (scoring) kernels in Pallas interpret mode (CPU) against the jax.numpy bound,
`scoring.reference_page_upper_bounds`; and the dispatch of `scoring.page_upper_bounds`."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import cache as cache_lib
from intent_jax import scoring
from intent_jax.precision import Precision
from pallas_kernels.gpu import page_upper_bounds as gpu_kernel
from pallas_kernels.tpu import page_upper_bounds as tpu_kernel
from tests import spec

B16, FP8, INT8, INT4 = Precision.BF16, Precision.FP8, Precision.INT8, Precision.INT4
KERNELS = {"gpu": gpu_kernel.page_upper_bounds, "tpu": tpu_kernel.page_upper_bounds}

# (name, kernel, q_len, num_q_heads, num_kv_heads, head_dim, formats, pages per block, scale)
CASES = (
    ("gpu_bf16", "gpu", 1, 8, 2, 32, (B16,), 8, None),
    ("gpu_fp8_int4_q3", "gpu", 3, 6, 2, 64, (B16, FP8, INT4), 4, 0.3),
    ("tpu_int8_int4_q2_blocks", "tpu", 2, 4, 2, 128, (B16, INT8, INT4), 8, None),
    ("tpu_bf16_one_block", "tpu", 1, 8, 1, 128, (B16,), None, 0.2),
)


class PageBoundKernelTest(parameterized.TestCase):

  @parameterized.named_parameters(*CASES)
  def test_matches_reference(self, kernel, q_len, num_q_heads, num_kv_heads, head_dim, formats,
                             pages_per_block, scale):
    # Routed pages moved to their formats, some sequences shorter: unmapped pages among them.
    cache, _ = spec.kernel_case(q_len + head_dim, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                page_size=16, dtype="float32", pressure=0.3, eight_bit=FP8
                                if FP8 in formats else INT8, recent=16, formats=formats)
    stored = np.asarray(cache.page_pool)
    self.assertEqual(set(stored[stored >= 0].tolist()), set(int(f) for f in formats))
    self.assertTrue(np.any(stored == cache_lib.UNMAPPED))
    q = jax.random.normal(jax.random.key(q_len), (spec.KERNEL_BATCH, q_len, num_q_heads, head_dim))
    out = KERNELS[kernel](q, cache, scale=scale, interpret=True, pages_per_block=pages_per_block)
    expected = scoring.reference_page_upper_bounds(q, cache, scale=scale)
    np.testing.assert_array_equal(np.isinf(out), np.isinf(expected))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

  @parameterized.named_parameters(("bf16", (B16,), "bfloat16"),
                                  ("every_format", (B16, FP8, INT8, INT4), "float32"))
  def test_tpu_kernel_lowers_to_mosaic(self, formats, dtype):
    config = cache_lib.CacheConfig(num_kv_heads=8, head_dim=128, max_seqs=2,
                                   max_seq_len=32768, pool_pages={f: 1024 for f in formats},
                                   dtype=dtype)
    q = jax.ShapeDtypeStruct((2, 4, 32, 128), jnp.bfloat16)
    module = spec.tpu_module(tpu_kernel.page_upper_bounds, q, spec.cache_shapes(config))
    self.assertIn("page_upper_bounds_tpu", module)

  @parameterized.named_parameters(("gpu", "gpu", 24), ("tpu", "tpu", 64))
  def test_unsupported_head_dim_is_refused(self, kernel, head_dim):
    config = cache_lib.CacheConfig(num_kv_heads=1, head_dim=head_dim, max_seqs=1,
                                   max_seq_len=32)
    q = jnp.ones((1, 1, 1, head_dim))
    with self.assertRaisesRegex(NotImplementedError, "head_dim"):
      KERNELS[kernel](q, cache_lib.create(config), interpret=True)


class DispatchTest(absltest.TestCase):

  def _cache_and_query(self):
    config = cache_lib.CacheConfig(num_kv_heads=2, head_dim=32, max_seqs=2, max_seq_len=64)
    kk, kv, kq = jax.random.split(jax.random.key(3), 3)
    k, v = (jax.random.normal(key, (2, 64, 2, 32)) for key in (kk, kv))
    cache = cache_lib.prefill(cache_lib.create(config), k, v, jnp.asarray([64, 40]))
    return cache, jax.random.normal(kq, (2, 1, 4, 32))

  def test_default_off_accelerators_is_the_reference(self):
    cache, q = self._cache_and_query()
    np.testing.assert_array_equal(scoring.page_upper_bounds(q, cache),
                                  scoring.reference_page_upper_bounds(q, cache))

  def test_a_kernel_named_off_its_platform_raises(self):
    cache, q = self._cache_and_query()
    if jax.default_backend() != "gpu":
      with self.assertRaisesRegex(NotImplementedError, "pallas_gpu runs on GPUs"):
        scoring.page_upper_bounds(q, cache, implementation="pallas_gpu")
    with self.assertRaisesRegex(ValueError, "implementation='triton'"):
      scoring.page_upper_bounds(q, cache, implementation="triton")


if __name__ == "__main__":
  absltest.main()
