"""The key-sketch scoring kernels (pallas_kernels/{gpu,tpu}/sketch_page_logits.py) against the
jax.numpy answer, `scoring.reference_sketch_page_logits`: in Pallas interpret mode on CPU, the GPU
kernel also compiled on a GPU (`python -m tests.test_sketch_page_logits` there), the TPU kernel
also lowered to Mosaic for a TPU (`jax.export`, on the CPU)."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import cache as cache_lib
from intent_jax import scoring
from pallas_kernels.gpu import sketch_page_logits as gpu_kernel
from pallas_kernels.tpu import sketch_page_logits as tpu_kernel
from tests import spec

INTERPRET = jax.default_backend() != "gpu"

# (name, q_len, num_q_heads, num_kv_heads, head_dim, page_size, channels, pages per block, scale)
CASES = (
    ("one_token_gqa4", 1, 8, 2, 32, 16, 4, 4, None),
    ("three_tokens_odd_channels", 3, 6, 2, 64, 16, 5, 8, 0.3),
    ("every_channel_page_32", 2, 4, 1, 16, 32, 16, 2, None),
    ("one_channel_wide_block", 1, 4, 4, 128, 16, 1, 64, 0.1),
)
# The TPU kernel's cases: (name, q_len, num_q_heads, num_kv_heads, head_dim, page_size, channels,
# pages per sequence, rows per block, scale). Its lane rows hold 128 / (page_size / 2) pages.
TPU_CASES = (
    ("one_row_block", 1, 8, 2, 32, 16, 4, 32, None, None),
    ("three_tokens_odd_channels", 3, 6, 2, 64, 16, 5, 80, 32, 0.3),
    ("page_32", 2, 4, 1, 16, 32, 16, 64, None, None),
    ("page_256_one_page_a_row", 1, 4, 2, 16, 256, 3, 4, None, None),
    ("last_block_overlaps", 2, 4, 2, 32, 16, 6, 640, None, 0.5),  # 40 rows: blocks of 32.
    ("three_blocks", 1, 4, 1, 32, 16, 2, 1536, 32, None),
)


def _written_cache(num_kv_heads, head_dim, page_size, pages_per_seq, seed, sign=None):
  """A cache with a key sketch, its 4 sequences written by a prefill and two appends, lengths
  ending mid-page, on a page boundary and at zero; keys with outlier channels, or all of `sign`
  and at least 1 in size if a sign is given."""
  max_len = pages_per_seq * page_size
  lengths = [max_len - 3, 4 * page_size, 0, page_size + 1]
  config = cache_lib.CacheConfig(num_kv_heads=num_kv_heads, head_dim=head_dim, max_seqs=4,
                                 max_seq_len=max_len, page_size=page_size, key_sketch=True)
  kk, kv = jax.random.split(jax.random.key(seed))
  k = jax.random.normal(kk, (4, max_len, num_kv_heads, head_dim))
  if sign is None:
    k = k * jnp.where(jnp.arange(head_dim) % 7 == 2, 6.0, 1.0)
  else:  # |k| >= 1: no code rounds to 0.
    k = sign * (1.0 + jnp.abs(k))
  v = jax.random.normal(kv, k.shape)
  first = jnp.maximum(jnp.asarray(lengths) - 2, 0)
  cache = cache_lib.prefill(cache_lib.create(config), k, v, first)
  for step in range(2):
    at = (jnp.arange(4), first + step)
    cache = cache_lib.append(cache, k[at][:, None], v[at][:, None],
                             (jnp.asarray(lengths) > first + step).astype(jnp.int32))
  np.testing.assert_array_equal(cache.lengths, lengths)
  return cache


def _assert_matches_reference(test, out, q, cache, channels, scale):
  expected = scoring.reference_sketch_page_logits(q, cache, channels=channels, scale=scale)
  np.testing.assert_array_equal(np.isneginf(out), np.isneginf(expected))
  c = cache.config
  test.assertEqual(int(np.sum(np.isfinite(expected))),
                   c.num_kv_heads * sum(-(-int(n) // c.page_size) for n in cache.lengths))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


class SketchPageLogitsKernelTest(parameterized.TestCase):

  @parameterized.named_parameters(*CASES)
  def test_matches_reference(self, q_len, num_q_heads, num_kv_heads, head_dim, page_size,
                             channels, pages_per_block, scale):
    # 11 pages per sequence: blocks of 2, 4 or 8 pages leave a partial last block.
    cache = _written_cache(num_kv_heads, head_dim, page_size, 11, head_dim + channels)
    q = jax.random.normal(jax.random.key(q_len), (4, q_len, num_q_heads, head_dim))
    out = gpu_kernel.sketch_page_logits(q, cache, channels=channels, scale=scale,
                                        interpret=INTERPRET, pages_per_block=pages_per_block)
    _assert_matches_reference(self, out, q, cache, channels, scale)

  @parameterized.named_parameters(*TPU_CASES)
  def test_tpu_kernel_matches_reference(self, q_len, num_q_heads, num_kv_heads, head_dim,
                                        page_size, channels, pages_per_seq, rows_per_block,
                                        scale):
    cache = _written_cache(num_kv_heads, head_dim, page_size, pages_per_seq, pages_per_seq)
    q = jax.random.normal(jax.random.key(q_len), (4, q_len, num_q_heads, head_dim))
    out = tpu_kernel.sketch_page_logits(q, cache, channels=channels, scale=scale,
                                        interpret=True, rows_per_block=rows_per_block)
    _assert_matches_reference(self, out, q, cache, channels, scale)

  @parameterized.named_parameters(("gpu", "gpu", 32), ("tpu", "tpu", 64))
  def test_tokens_past_the_length_never_count(self, kernel, pages_per_seq):
    # Positive queries, negative keys: every stored logit is below 0, the value of a token
    # not yet written, so a kernel that let one token past a sequence's length into a page's
    # maximum would give 0 there.
    cache = _written_cache(2, 32, 16, pages_per_seq, 5, sign=-1.0)
    q = jnp.abs(jax.random.normal(jax.random.key(6), (4, 2, 4, 32)))
    if kernel == "gpu":
      out = gpu_kernel.sketch_page_logits(q, cache, channels=3, interpret=INTERPRET,
                                          pages_per_block=8)
    else:
      out = tpu_kernel.sketch_page_logits(q, cache, channels=3, interpret=True)
    self.assertTrue(np.all(out[np.isfinite(out)] < 0))
    _assert_matches_reference(self, out, q, cache, 3, None)

  @parameterized.named_parameters(("bfloat16_q8_page16", 8, 16, jnp.bfloat16),
                                  ("float32_page64", 1, 64, jnp.float32))
  def test_tpu_kernel_lowers_to_mosaic(self, q_len, page_size, dtype):
    config = cache_lib.CacheConfig(num_kv_heads=8, head_dim=128, max_seqs=2,
                                   max_seq_len=131072, page_size=page_size, key_sketch=True)
    q = jax.ShapeDtypeStruct((2, q_len, 32, 128), dtype)
    module = spec.tpu_module(functools.partial(tpu_kernel.sketch_page_logits, channels=16), q,
                             spec.cache_shapes(config))
    self.assertIn("sketch_page_logits_tpu", module)

  def test_tpu_kernel_refuses_a_partial_lane_row(self):
    config = cache_lib.CacheConfig(num_kv_heads=1, head_dim=16, max_seqs=1,
                                   max_seq_len=16 * 40, key_sketch=True)  # 2.5 rows of pages.
    with self.assertRaisesRegex(NotImplementedError, "pallas_tpu sketch scoring needs"):
      tpu_kernel.sketch_page_logits(jnp.ones((1, 1, 1, 16)), cache_lib.create(config),
                                    channels=2, interpret=True)

  def test_dispatch_off_accelerators_is_the_reference(self):
    if jax.default_backend() in ("gpu", "tpu"):
      self.skipTest("there the default is the platform's kernel")
    config = cache_lib.CacheConfig(num_kv_heads=2, head_dim=32, max_seqs=2, max_seq_len=64,
                                   key_sketch=True)
    k = jax.random.normal(jax.random.key(0), (2, 64, 2, 32))
    cache = cache_lib.prefill(cache_lib.create(config), k, k, jnp.asarray([64, 20]))
    q = jax.random.normal(jax.random.key(1), (2, 1, 4, 32))
    np.testing.assert_array_equal(scoring.sketch_page_logits(q, cache, channels=4),
                                  scoring.reference_sketch_page_logits(q, cache, channels=4))
    for name in ("pallas_gpu", "pallas_tpu"):
      with self.assertRaisesRegex(NotImplementedError, f"{name} runs on"):
        scoring.sketch_page_logits(q, cache, channels=4, implementation=name)


if __name__ == "__main__":
  absltest.main()
