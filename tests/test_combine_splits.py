"""The one-launch merge of decode splits (pallas_kernels/gpu/combine_splits.py) against
`splits.combine`: in Pallas interpret mode off a GPU (make test), compiled on one."""

from absl.testing import absltest
from absl.testing import parameterized

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import splits
from pallas_kernels.gpu import combine_splits

INTERPRET = jax.default_backend() != "gpu"


def random_partials(seed, batch, num_kv_heads, num_splits, padded_rows, head_dim, used_rows,
                    q_len=1):
  """(m, l, acc) as a decode kernel writes them: random maxima and sums, some splits of some rows
  empty (l = 0, m at the mask value), padding rows empty, and in every split the row of query
  head 1, token 0 of sequence 0, kv head 0."""
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (batch, num_kv_heads, num_splits, padded_rows)
  m = 4.0 * jax.random.normal(keys[0], shape)
  l = jax.random.uniform(keys[1], shape, minval=0.5, maxval=20.0)
  acc = jax.random.normal(keys[2], shape + (head_dim,)) * l[..., None]
  empty = jax.random.bernoulli(keys[3], 0.3, shape)
  empty = empty.at[0, 0, :, 1].set(True)  # Row t * group + g, t = 0, g = 1.
  empty = empty | (jnp.arange(padded_rows) >= used_rows)
  m = jnp.where(empty, splits.MASK_VALUE, m)
  return m, jnp.where(empty, 0.0, l), jnp.where(empty[..., None], 0.0, acc)


class CombineSplitsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("one_token", 1, 8, 2, 3, 64, 32, False),
      ("one_token_sinks", 1, 8, 2, 5, 16, 32, True),
      ("three_tokens_sinks", 3, 8, 2, 4, 16, 32, True),  # 12 rows used, 16 merged.
      ("one_split", 2, 4, 1, 1, 64, 16, False),
      ("three_chunks_of_two", 1, 8, 2, 6, 64, 32, True),  # Splits read two at a time.
      ("four_blocks_of_channels", 1, 8, 2, 4, 64, 128, True),
  )
  def test_matches_combine(self, q_len, num_q_heads, num_kv_heads, num_splits, padded_rows,
                           head_dim, with_sinks):
    batch = 2
    used_rows = num_q_heads // num_kv_heads * q_len
    partials = random_partials(q_len + num_splits, batch, num_kv_heads, num_splits, padded_rows,
                               head_dim, used_rows, q_len)
    q_shape = (batch, q_len, num_q_heads, head_dim)
    sinks = (jax.random.normal(jax.random.key(9), (num_q_heads,)) if with_sinks else None)
    out, lse = combine_splits.combine_splits(partials, q_shape, sinks=sinks, return_lse=True,
                                             interpret=INTERPRET)
    expected, expected_lse = splits.combine(partials, q_shape, sinks=sinks, return_lse=True)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5, atol=1e-5)
    if not with_sinks:
      self.assertEqual(np.asarray(lse)[0, 0, 1], -np.inf)  # Query head 1 at token 0 saw nothing.
      np.testing.assert_array_equal(np.asarray(out)[0, 0, 1], 0.0)
    out_bf16 = combine_splits.combine_splits(partials, q_shape, sinks=sinks,
                                             out_dtype=jnp.bfloat16, interpret=INTERPRET)
    self.assertEqual(out_bf16.dtype, jnp.bfloat16)
    np.testing.assert_allclose(out_bf16.astype(jnp.float32), expected, rtol=1e-2, atol=1e-2)

  def test_lowers_for_cuda(self):
    """Triton's lowering on any host: 12 rows used of 16 merged, sinks, log-sum-exp."""
    partials = random_partials(1, 2, 2, 3, 16, 128, 12, 3)
    sinks = jnp.zeros((8,), jnp.float32)
    merge = jax.jit(lambda p, s: combine_splits.combine_splits(p, (2, 3, 8, 128), sinks=s,
                                                               return_lse=True))
    text = merge.trace(partials, sinks).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("triton", text)

  def test_rejects_what_it_cannot_merge(self):
    partials = random_partials(0, 1, 1, 2, 4, 32, 4)
    with self.assertRaisesRegex(ValueError, "fewer than the 8 needed"):
      combine_splits.combine_splits(partials, (1, 2, 4, 32), interpret=INTERPRET)
    partials = random_partials(0, 1, 1, 2, 4, 48, 4)
    with self.assertRaisesRegex(ValueError, "power of two, got 48"):
      combine_splits.combine_splits(partials, (1, 1, 4, 48), interpret=INTERPRET)


if __name__ == "__main__":
  absltest.main()
