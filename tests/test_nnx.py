"""Tests of intent_jax.nnx: rotary embedding, DenseKV and the IntentAttention layer."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import cache as cache_lib
from intent_jax.layout import BlockLayout, BlockPolicy, SemanticBlock
from intent_jax.nnx import DenseKV, IntentAttention, apply_rope
from intent_jax.router import RouterConfig, route

D_MODEL, HEADS, KV_HEADS, HEAD_DIM, MAX_LEN = 32, 4, 2, 16, 64


def _stores(batch=2, dtype="float32"):
  config = cache_lib.CacheConfig(num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, max_seqs=batch,
                                 max_seq_len=MAX_LEN, dtype=dtype)
  return cache_lib.create(config), DenseKV.create(batch, MAX_LEN, KV_HEADS, HEAD_DIM, dtype)


class RopeTest(absltest.TestCase):

  def test_matches_rotation_in_numpy(self):
    x = np.asarray(jax.random.normal(jax.random.key(0), (1, 3, 2, 8)))
    positions = np.asarray([[0, 5, 17]])
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), 100.0))
    for t, p in enumerate(positions[0]):
      for i in range(4):
        angle = p * 100.0**(-i / 4)
        a, b = x[0, t, :, i], x[0, t, :, i + 4]
        np.testing.assert_allclose(got[0, t, :, i], a * np.cos(angle) - b * np.sin(angle),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[0, t, :, i + 4], b * np.cos(angle) + a * np.sin(angle),
                                   rtol=1e-5, atol=1e-5)

  def test_dot_products_depend_on_distance_only(self):
    q = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(2), (1, 1, 1, 16))
    dot = lambda pq, pk: float(jnp.sum(apply_rope(q, jnp.asarray([[pq]]), 1e4) *
                                       apply_rope(k, jnp.asarray([[pk]]), 1e4)))
    self.assertAlmostEqual(dot(7, 3), dot(104, 100), places=4)
    self.assertNotAlmostEqual(dot(7, 3), dot(7, 4), places=3)


class DenseKVTest(absltest.TestCase):

  def test_write_appends_each_sequence_at_its_length(self):
    kv = DenseKV.create(2, 8, 1, 2, "float32")
    values = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 1, 2)
    kv = kv.write(values, -values, jnp.asarray([3, 1]))
    kv = kv.write(values + 100, values, jnp.asarray([1, 2]))
    np.testing.assert_array_equal(kv.lengths, [4, 3])
    np.testing.assert_array_equal(kv.k[0, :4, 0, 0], [0, 2, 4, 100])
    np.testing.assert_array_equal(kv.k[1, :3, 0, 0], [6, 106, 108])
    np.testing.assert_array_equal(kv.k[1, 3:], 0)


class IntentAttentionTest(parameterized.TestCase):

  def test_routed_layer_equals_dense_layer(self):
    layer = IntentAttention(D_MODEL, HEADS, KV_HEADS, HEAD_DIM, rngs=nnx.Rngs(0))
    cache, dense = _stores()
    x = jax.random.normal(jax.random.key(3), (2, 20, D_MODEL))
    lengths = jnp.asarray([20, 11])
    y_cache, cache = layer(x, cache, lengths=lengths)
    y_dense, dense = layer(x, dense, lengths=lengths)
    np.testing.assert_allclose(y_cache, y_dense, rtol=1e-6)
    k_stored = cache_lib.dequantized_kv(cache)[0]
    for b, n in enumerate([20, 11]):
      np.testing.assert_allclose(k_stored[b, :n], dense.k[b, :n], rtol=1e-6)
    layout = BlockLayout.stack([BlockLayout.from_blocks([], MAX_LEN)] * 2)
    for step in range(3):  # Decode 1..4 tokens a step; every token routed in.
      new = jax.random.normal(jax.random.key(10 + step), (2, 4, D_MODEL))
      counts = jnp.asarray([4, 1 + step])
      table = route(layout, cache.lengths + counts, RouterConfig(recent_tokens=0))
      y_cache, cache = layer(new, cache, lengths=counts, table=table, decode=True)
      y_dense, dense = layer(new, dense, lengths=counts, decode=True)
      np.testing.assert_allclose(y_cache[0], y_dense[0], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(y_cache[1, :1 + step], y_dense[1, :1 + step], rtol=1e-5,
                                 atol=1e-6)

  def test_skipped_block_is_not_attended(self):
    layer = IntentAttention(D_MODEL, HEADS, KV_HEADS, HEAD_DIM, rngs=nnx.Rngs(1))
    cache, _ = _stores(batch=1)
    x = jax.random.normal(jax.random.key(4), (1, 32, D_MODEL))
    _, cache = layer(x, cache, lengths=jnp.asarray([32]))
    new = jax.random.normal(jax.random.key(5), (1, 1, D_MODEL))
    config, lengths = RouterConfig(recent_tokens=0), jnp.asarray([33])

    def step(policy):  # Each call gets its own copy: the cache is donated.
      layout = BlockLayout.from_blocks([SemanticBlock("old", 0, 16, policy)], MAX_LEN)
      own = jax.tree.map(jnp.copy, cache)
      return layer(new, own, lengths=jnp.asarray([1]), table=route(layout, lengths, config),
                   decode=True)[0]

    skipped, kept = step(BlockPolicy.SKIP), step(BlockPolicy.ALWAYS)
    self.assertGreater(float(jnp.abs(skipped - kept).max()), 1e-4)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "num_heads=3 must be a multiple of num_kv_heads=2"):
      IntentAttention(D_MODEL, 3, 2, HEAD_DIM, rngs=nnx.Rngs(0))
    layer = IntentAttention(D_MODEL, HEADS, KV_HEADS, HEAD_DIM, rngs=nnx.Rngs(0))
    cache, _ = _stores()
    with self.assertRaisesRegex(ValueError, "needs the routed table"):
      layer(jnp.zeros((2, 1, D_MODEL)), cache, decode=True)


if __name__ == "__main__":
  absltest.main()
