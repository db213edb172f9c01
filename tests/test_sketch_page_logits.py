"""The key-sketch scoring kernel (pallas_kernels/gpu/sketch_page_logits.py) against the jax.numpy
answer, `scoring.reference_sketch_page_logits`: in Pallas interpret mode on CPU, compiled on a
GPU (`python -m tests.test_sketch_page_logits` there)."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import cache as cache_lib
from intent_jax import scoring
from pallas_kernels.gpu import sketch_page_logits as gpu_kernel

INTERPRET = jax.default_backend() != "gpu"

# (name, q_len, num_q_heads, num_kv_heads, head_dim, page_size, channels, pages per block, scale)
CASES = (
    ("one_token_gqa4", 1, 8, 2, 32, 16, 4, 4, None),
    ("three_tokens_odd_channels", 3, 6, 2, 64, 16, 5, 8, 0.3),
    ("every_channel_page_32", 2, 4, 1, 16, 32, 16, 2, None),
    ("one_channel_wide_block", 1, 4, 4, 128, 16, 1, 64, 0.1),
)


class SketchPageLogitsKernelTest(parameterized.TestCase):

  @parameterized.named_parameters(*CASES)
  def test_matches_reference(self, q_len, num_q_heads, num_kv_heads, head_dim, page_size,
                             channels, pages_per_block, scale):
    # 11 pages per sequence: blocks of 2, 4 or 8 pages leave a partial last block. Lengths end
    # mid-page, on a page boundary, and at zero; written by a prefill and two appends.
    max_len = 11 * page_size
    lengths = [max_len - 3, 4 * page_size, 0, page_size + 1]
    config = cache_lib.CacheConfig(num_kv_heads=num_kv_heads, head_dim=head_dim, max_seqs=4,
                                   max_seq_len=max_len, page_size=page_size, key_sketch=True)
    kk, kv, kq = jax.random.split(jax.random.key(head_dim + channels), 3)
    k = jax.random.normal(kk, (4, max_len, num_kv_heads, head_dim))
    k = k * jnp.where(jnp.arange(head_dim) % 7 == 2, 6.0, 1.0)  # Outlier channels.
    v = jax.random.normal(kv, k.shape)
    first = jnp.maximum(jnp.asarray(lengths) - 2, 0)
    cache = cache_lib.prefill(cache_lib.create(config), k, v, first)
    for step in range(2):
      at = (jnp.arange(4), first + step)
      cache = cache_lib.append(cache, k[at][:, None], v[at][:, None],
                               (jnp.asarray(lengths) > first + step).astype(jnp.int32))
    np.testing.assert_array_equal(cache.lengths, lengths)
    q = jax.random.normal(kq, (4, q_len, num_q_heads, head_dim))
    out = gpu_kernel.sketch_page_logits(q, cache, channels=channels, scale=scale,
                                        interpret=INTERPRET, pages_per_block=pages_per_block)
    expected = scoring.reference_sketch_page_logits(q, cache, channels=channels, scale=scale)
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(expected))
    self.assertEqual(int(np.sum(np.isfinite(expected))),
                     num_kv_heads * sum(-(-n // page_size) for n in lengths))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

  def test_dispatch_off_gpu_is_the_reference(self):
    if not INTERPRET:
      self.skipTest("on a GPU the default is the kernel")
    config = cache_lib.CacheConfig(num_kv_heads=2, head_dim=32, max_seqs=2, max_seq_len=64,
                                   key_sketch=True)
    k = jax.random.normal(jax.random.key(0), (2, 64, 2, 32))
    cache = cache_lib.prefill(cache_lib.create(config), k, k, jnp.asarray([64, 20]))
    q = jax.random.normal(jax.random.key(1), (2, 1, 4, 32))
    np.testing.assert_array_equal(scoring.sketch_page_logits(q, cache, channels=4),
                                  scoring.reference_sketch_page_logits(q, cache, channels=4))


if __name__ == "__main__":
  absltest.main()
