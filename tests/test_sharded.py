"""Tests of intent_jax.sharded: decode over a cache split across 8 simulated CPU devices.

tests/conftest.py starts JAX with 8 CPU devices. Every sharded result is compared with the
single-device cache fed the same tokens and tables, and the single-device oracle.
"""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

import intent_jax as ij
from intent_jax import cache as cache_lib
from intent_jax import models
from intent_jax import reference
from intent_jax import scoring
from intent_jax import sharded
from intent_jax.precision import Precision

H, HQ, D, PS, B, MAX_LEN = 8, 16, 16, 16, 2, 256
MESH_SHAPES = ((1, 8), (2, 4), (4, 2), (8, 1))  # (heads, pages)
PARTITION = sharded.Partition(heads="heads", pages="pages")
POOLS = {Precision.BF16: 32, Precision.FP8: 16, Precision.INT8: 16, Precision.INT4: 16}


def _mesh(heads, pages):
  devices = np.array(jax.devices()[:heads * pages]).reshape(heads, pages)
  return Mesh(devices, ("heads", "pages"))


def _config(pools=None, max_seqs=B, key_sketch=False):
  return cache_lib.CacheConfig(num_kv_heads=H, head_dim=D, max_seqs=max_seqs,
                               max_seq_len=MAX_LEN, page_size=PS, pool_pages=pools or POOLS,
                               dtype="float32", key_sketch=key_sketch)


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _layout():
  """system (ALWAYS), three documents scored for BF16, 8-bit and INT4, the turn (RECENT)."""
  return ij.BlockLayout.stack([
      ij.BlockLayout.from_blocks([
          ij.SemanticBlock("system", 0, 20, ij.BlockPolicy.ALWAYS),
          ij.SemanticBlock("doc_a", 20, 70, ij.BlockPolicy.ATTEND, score=0.9),
          ij.SemanticBlock("doc_b", 70, 100, ij.BlockPolicy.ATTEND, score=0.6),
          ij.SemanticBlock("doc_c", 100, 130, ij.BlockPolicy.ATTEND, score=0.3),
          ij.SemanticBlock("turn", 130, MAX_LEN, ij.BlockPolicy.RECENT)], MAX_LEN)] * B)


ROUTER = ij.RouterConfig(page_size=PS, recent_tokens=24, score_threshold=0.2,
                         bf16_min_score=0.8, eight_bit_min_score=0.5)


def _route(lengths):
  return ij.route(_layout(), jnp.asarray(lengths, jnp.int32), ROUTER)


def _both(mesh, pools=None, key_sketch=False):
  """An empty single-device cache and an empty sharded one of the same global config."""
  config = _config(pools, key_sketch=key_sketch)
  return cache_lib.create(config), sharded.create(config, mesh, PARTITION)


def _prefilled(mesh, lengths, seed, key_sketch=False):
  """Both caches holding the same random tokens, lengths[b] of sequence b."""
  single, split = _both(mesh, key_sketch=key_sketch)
  tokens = max(lengths)
  k, v = _normal(seed, (B, tokens, H, D)), _normal(seed + 1, (B, tokens, H, D))
  lengths = jnp.asarray(lengths)
  return cache_lib.prefill(single, k, v, lengths), sharded.prefill(split, k, v, lengths)


class ShardedDecodeTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.assertGreaterEqual(jax.device_count(), 8, "tests/conftest.py must give 8 CPU devices")

  @parameterized.parameters([(shape, "xla") for shape in MESH_SHAPES] + [((4, 2), "reference")])
  def test_decode_matches_single_device_oracle(self, mesh_shape, implementation):
    """Prefill, mixed-precision storage, a causal 3-token append, sinks and soft-cap."""
    seed = sum(mesh_shape) * 10 + len(implementation)
    single, split = _both(_mesh(*mesh_shape))
    lengths = jnp.array([237, 150])
    k, v = _normal(seed, (B, 240, H, D)), _normal(seed + 1, (B, 240, H, D))
    single = cache_lib.prefill(single, k, v, lengths)
    split = sharded.prefill(split, k, v, lengths)
    table = _route(lengths)
    single = cache_lib.apply_precision(single, table)
    split = sharded.apply_precision(split, table)
    used = np.asarray(sharded.pages_in_use(split))
    np.testing.assert_array_equal(used.sum(axis=0), cache_lib.pages_in_use(single))
    self.assertGreaterEqual(int(np.sum(used.sum(axis=0)[1:] > 0)), 2, "mixed precision")

    counts = jnp.array([3, 2])
    new_k, new_v = _normal(seed + 2, (B, 3, H, D)), _normal(seed + 3, (B, 3, H, D))
    single = cache_lib.append(single, new_k, new_v, counts)
    split = sharded.append(split, new_k, new_v, counts)
    lengths = lengths + counts
    np.testing.assert_array_equal(split.lengths, lengths)
    table = _route(lengths)
    q = _normal(seed + 4, (B, 3, HQ, D))
    sinks = _normal(seed + 5, (HQ,))
    positions = lengths[:, None] - jnp.array([[3, 2, 1], [2, 2, 1]])  # Repeats: still causal.
    for kwargs in (dict(sinks=sinks), dict(softcap=5.0, q_positions=positions)):
      want = reference.paged_attention(q, single, table, **kwargs)
      got = ij.decode_attention(q, split, table, implementation=implementation, **kwargs)
      chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)

  @parameterized.parameters((2, 4))
  def test_one_token_and_empty_rows(self, heads, pages):
    """q_len 1; a sequence with nothing stored and a table with nothing selected give zeros."""
    single, split = _prefilled(_mesh(heads, pages), [61, 0], seed=1)
    table = _route([61, 0])
    q = _normal(3, (B, 1, HQ, D))
    got = ij.decode_attention(q, split, table)
    chex.assert_trees_all_close(got, reference.paged_attention(q, single, table), atol=1e-5)
    np.testing.assert_array_equal(got[1], 0.0)
    nothing = dataclasses.replace(table, num_pages=jnp.zeros_like(table.num_pages))
    np.testing.assert_array_equal(ij.decode_attention(q, split, nothing), 0.0)

  @parameterized.parameters((2, 4))
  def test_query_mode_route_matches_single_device(self, heads, pages):
    single, split = _prefilled(_mesh(heads, pages), [200, 97], seed=4, key_sketch=True)
    lengths = jnp.array([200, 97])
    q = _normal(6, (B, 2, HQ, D))
    layout = _layout()
    for channels in (None, 3):  # Key bounds, then the key sketch's top-channel logits.
      chex.assert_trees_all_close(sharded.page_scores(q, split, channels=channels),
                                  scoring.page_scores(q, single, channels=channels), atol=1e-5)
      config = dataclasses.replace(ROUTER, query_channels=channels)
      want = ij.route(layout, lengths, config, query=q, cache=single, budget=6)
      got = ij.route(layout, lengths, config, query=q, cache=split, budget=6)
      chex.assert_trees_all_equal(got, want)

  def test_refused_write_changes_no_shard(self):
    """A sequence one page shard cannot serve is refused on all: nothing written, flagged."""
    pools = {Precision.BF16: 8}  # Two pages per page shard of 4.
    single, split = _both(_mesh(2, 4), pools)
    k, v = _normal(7, (B, 160, H, D)), _normal(8, (B, 160, H, D))
    split = sharded.prefill(split, k, v, jnp.array([64, 0]))  # One page on every shard.
    before = jax.tree.map(np.asarray, split)
    with self.assertRaisesRegex(ValueError, "sequence 1: .* page shard 0"):
      sharded.prefill(split, k, v, jnp.array([0, 80]))  # Shard 0 would need 2 pages.
    write = jax.jit(sharded.prefill)
    split = write(split, k, v, jnp.array([0, 80]))
    np.testing.assert_array_equal(split.overflow, [False, True])
    np.testing.assert_array_equal(split.lengths, [64, 0])
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, split.shards.pools),
                                before.shards.pools)
    split = write(split, k, v, jnp.array([0, 64]))  # Fits: one page per shard.
    np.testing.assert_array_equal(split.lengths, [64, 64])
    np.testing.assert_array_equal(sharded.free_pages(split)[:, Precision.BF16], 0)
    split = sharded.release(split, 0)
    np.testing.assert_array_equal(sharded.free_pages(split)[:, Precision.BF16], 1)
    np.testing.assert_array_equal(split.lengths, [0, 64])

  def test_memory_accounting_per_shard(self):
    single, split = _both(_mesh(2, 4))
    self.assertEqual(float(sharded.memory_pressure(split)), 0.0)
    k, v = _normal(9, (B, 100, H, D)), _normal(10, (B, 100, H, D))
    split = sharded.prefill(split, k, v, jnp.array([100, 20]))  # Pages 0..6 and 0..1.
    np.testing.assert_array_equal(sharded.pages_in_use(split)[:, Precision.BF16], [3, 3, 2, 1])
    local = split.shards.config
    self.assertEqual(local.num_kv_heads, H // 2)
    per_page = local.stored_page_bytes(Precision.BF16)
    np.testing.assert_allclose(sharded.bytes_in_use(split)[:, Precision.BF16],
                               per_page * np.array([3, 3, 2, 1]))
    capacity = sum(cache_lib.capacity_bytes(local))
    self.assertAlmostEqual(float(sharded.memory_pressure(split)), 3 * per_page / capacity,
                           places=6)

  def test_decode_step_traces_once(self):
    _, split = _both(_mesh(2, 4))
    k, v = _normal(11, (B, 100, H, D)), _normal(12, (B, 100, H, D))
    split = sharded.prefill(split, k, v, jnp.array([100, 40]))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(split, new_k, q, lengths):
      split = sharded.append(split, new_k, new_k)
      return split, ij.decode_attention(q, split, _route(lengths))

    lengths = jnp.array([100, 40])
    for i in range(3):
      lengths = lengths + 1
      split, out = step(split, _normal(20 + i, (B, 1, H, D)), _normal(30 + i, (B, 1, HQ, D)),
                        lengths)
      self.assertTrue(np.all(np.isfinite(out)))

  def test_argument_errors(self):
    mesh = _mesh(2, 4)
    with self.assertRaisesRegex(ValueError, "over one axis"):
      sharded.Partition(heads="pages", pages="pages")
    with self.assertRaisesRegex(ValueError, "not one of the mesh's"):
      sharded.create(_config(), mesh, sharded.Partition(heads="tp"))
    with self.assertRaisesRegex(ValueError, "num_kv_heads=6 must be a multiple"):
      sharded.create(dataclasses.replace(_config(), num_kv_heads=6, pool_pages=None),
                     _mesh(4, 2), PARTITION)
    with self.assertRaisesRegex(ValueError, "split evenly"):
      sharded.create(_config({Precision.BF16: 30}), mesh, PARTITION)
    single, split = _both(mesh)
    q = _normal(0, (B, 1, HQ, D))
    table = _route([0, 0])
    with self.assertRaisesRegex(TypeError, "need a sharded.ShardedKVCache"):
      ij.decode_attention(q, single, table, mesh=mesh)
    with self.assertRaisesRegex(ValueError, "not the mesh"):
      ij.decode_attention(q, split, table, mesh=_mesh(4, 2))
    with self.assertRaisesRegex(ValueError, "q.* must be"):
      ij.decode_attention(_normal(0, (B, 1, HQ, D + 2)), split, table)


class ShardedGenerateTest(absltest.TestCase):

  def test_generate_over_sharded_caches_matches_one_device(self):
    config = models.DecoderConfig(vocab_size=64, model_dim=32, num_layers=2, num_heads=4,
                                  num_kv_heads=2, head_dim=8, mlp_dim=64)
    model = models.Decoder(config, rngs=nnx.Rngs(0))
    prompts = jax.random.randint(jax.random.key(1), (2, 40), 0, 64)
    lengths = jnp.array([40, 26])
    layout = ij.BlockLayout.stack([
        ij.BlockLayout.from_blocks([
            ij.SemanticBlock("system", 0, 8, ij.BlockPolicy.ALWAYS),
            ij.SemanticBlock("tool", 8, n - 4, ij.BlockPolicy.ATTEND, score=0.4),
            ij.SemanticBlock("turn", n - 4, n, ij.BlockPolicy.RECENT)], 96)
        for n in (40, 26)])
    tokens = []
    for mesh, partition in ((None, None), (_mesh(2, 4), PARTITION)):
      caches = models.create_caches(config, max_seqs=2, max_seq_len=96, dtype="float32",
                                    mesh=mesh, partition=partition,
                                    pool_pages={Precision.BF16: 16})
      out = models.generate(model, prompts, lengths, caches, max_new_tokens=12, layout=layout,
                            open_block=2, router_config=ij.RouterConfig(recent_tokens=8))
      tokens.append(np.asarray(out.tokens))
    self.assertIsInstance(out.kvs[0], sharded.ShardedKVCache)
    np.testing.assert_array_equal(tokens[1], tokens[0])


if __name__ == "__main__":
  absltest.main()
