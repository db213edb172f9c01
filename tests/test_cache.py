"""Tests of intent_jax.cache: storage, precision changes, release, overflow and the paged oracle."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import cache as cache_lib
from intent_jax import quant
from intent_jax import reference
from intent_jax.attention import decode_attention
from intent_jax.layout import BlockLayout, BlockPolicy, SemanticBlock
from intent_jax.precision import Precision
from intent_jax.router import RouterConfig, route

H, D, PS = 2, 8, 16
B16, FP8, INT8, INT4 = Precision.BF16, Precision.FP8, Precision.INT8, Precision.INT4


def _config(max_seqs=3, max_seq_len=160, pools=None, dtype="float32", key_sketch=False):
  pools = pools or {B16: 40, FP8: 12, INT8: 12, INT4: 12}
  return cache_lib.CacheConfig(num_kv_heads=H, head_dim=D, max_seqs=max_seqs,
                               max_seq_len=max_seq_len, page_size=PS, pool_pages=pools,
                               dtype=dtype, key_sketch=key_sketch)


def _kv(seed, batch, tokens):
  kk, kv = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kk, (batch, tokens, H, D)),
          jax.random.normal(kv, (batch, tokens, H, D)))


def _all_tokens_table(lengths, num_tokens=160, **config):
  """A table attending every token of each sequence (no blocks, default ALWAYS)."""
  layout = BlockLayout.stack([BlockLayout.from_blocks([], num_tokens)] * len(lengths))
  return route(layout, jnp.asarray(lengths, jnp.int32), RouterConfig(page_size=PS, **config))


def _requesting(table, precision):
  """The same table asking for `precision` on every page."""
  return dataclasses.replace(table, precisions=jnp.full_like(table.precisions, precision))


class Mirror:
  """The contiguous K/V every sequence should hold, kept in numpy."""

  def __init__(self, batch, max_len):
    self.k = np.zeros((batch, max_len, H, D), np.float32)
    self.v = np.zeros((batch, max_len, H, D), np.float32)
    self.lengths = np.zeros(batch, int)

  def write(self, k, v, counts):
    for b, n in enumerate(np.asarray(counts)):
      start = self.lengths[b]
      self.k[b, start:start + n] = np.asarray(k[b, :n], np.float32)
      self.v[b, start:start + n] = np.asarray(v[b, :n], np.float32)
      self.lengths[b] += n


def _assert_holds(test, cache, mirror, dtype=np.float32):
  np.testing.assert_array_equal(cache.lengths, mirror.lengths)
  k, v = (np.asarray(x) for x in cache_lib.dequantized_kv(cache))
  for b, n in enumerate(mirror.lengths):
    expect_k = mirror.k[b, :n].astype(dtype).astype(np.float32)
    expect_v = mirror.v[b, :n].astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(k[b, :n], expect_k, err_msg=f"K of sequence {b}")
    np.testing.assert_array_equal(v[b, :n], expect_v, err_msg=f"V of sequence {b}")
  # Key bounds of every mapped page: min and max over its stored tokens.
  page_pool, page_slot = np.asarray(cache.page_pool), np.asarray(cache.page_slot)
  for b, n in enumerate(mirror.lengths):
    for page in range(-(-n // PS)):
      pool = cache.pools[page_pool[b, page]]
      stored = k[b, page * PS:min(n, (page + 1) * PS)]
      _assert_tightest_outward(pool.key_min[:, page_slot[b, page]], stored.min(0), np.inf)
      _assert_tightest_outward(pool.key_max[:, page_slot[b, page]], stored.max(0), -np.inf)
  if cache.key_sketch is not None:
    _assert_sketch_holds(test, cache.key_sketch, mirror, dtype)


def _assert_sketch_holds(test, sketch, mirror, dtype):
  """Each written page's keys, per channel, as INT4 codes of absmax / 7 (numpy, by the rule)."""
  codes, scales = np.asarray(sketch.codes), np.asarray(sketch.scale)
  nibbles = np.concatenate([codes & 0xF, codes >> 4], axis=-1).astype(np.int32)
  values = np.where(nibbles >= 8, nibbles - 16, nibbles)  # [H, D, seqs, pages, PS]
  for b, n in enumerate(mirror.lengths):
    for page in range(-(-n // PS)):
      keys = np.zeros((PS, H, D), np.float32)
      stored = mirror.k[b, page * PS:min(n, (page + 1) * PS)].astype(dtype).astype(np.float32)
      keys[:len(stored)] = stored
      scale = scales[:, :, b, page]  # [H, D]
      np.testing.assert_allclose(scale, np.abs(keys).max(axis=0) / 7, rtol=1e-6,
                                 err_msg=f"sketch scales of sequence {b}, page {page}")
      error = np.abs(values[:, :, b, page] * scale[..., None] - keys.transpose(1, 2, 0))
      test.assertTrue(np.all(error <= scale[..., None] * (0.5 + 1e-5)),  # Nearest code, and
                      f"sketch codes of sequence {b}, page {page}")  # tokens not stored 0.


def _assert_tightest_outward(bound, exact, inward):
  """`bound` (bfloat16) is on the outer side of `exact` (float32) and, unless equal to it, its
  next bfloat16 value toward `inward` is not: the closest bfloat16 bound."""
  bound = np.asarray(bound)
  outside = bound.astype(np.float32) <= exact if inward > 0 else bound.astype(np.float32) >= exact
  after = np.nextafter(bound, np.asarray(inward, bound.dtype)).astype(np.float32)
  next_not = (after > exact if inward > 0 else after < exact) | (bound.astype(np.float32) == exact)
  np.testing.assert_array_equal(outside & next_not, True, err_msg=f"{bound} around {exact}")


class StoredBoundsTest(absltest.TestCase):

  def test_rounds_outward_to_the_closest_bfloat16(self):
    f32 = np.finfo(np.float32)
    edges = np.asarray([0.0, -0.0, 1.0, -1.0, 1.0 + 2**-20, -(1.0 + 2**-20), f32.tiny / 4,
                        -f32.tiny / 4, f32.max, -f32.max, np.inf, -np.inf], np.float32)
    values = np.concatenate([edges, np.asarray(jax.random.normal(jax.random.key(0), (500,)))
                             * np.float32(10.0) ** np.arange(-20, 30, 0.1)[:500]])
    lower, upper = cache_lib.stored_bounds(jnp.asarray(values), jnp.asarray(values))
    self.assertEqual(lower.dtype, cache_lib.SUMMARY_DTYPE)
    _assert_tightest_outward(lower, values, np.inf)
    _assert_tightest_outward(upper, values, -np.inf)


class CacheWriteTest(parameterized.TestCase):

  @parameterized.parameters(("float32", False), ("bfloat16", False), ("bfloat16", True))
  def test_prefill_then_appends_hold_the_contiguous_values(self, dtype, key_sketch):
    config = _config(dtype=dtype, key_sketch=key_sketch)
    cache, mirror = cache_lib.create(config), Mirror(3, 160)
    k, v = _kv(0, 3, 64)
    lengths = jnp.asarray([45, 16, 1])
    cache = cache_lib.prefill(cache, k, v, lengths)
    mirror.write(k, v, lengths)
    rng = np.random.default_rng(0)
    for step in range(8):
      k, v = _kv(step + 1, 3, 8)
      counts = rng.integers(0, 9, size=3)
      cache = cache_lib.append(cache, k, v, jnp.asarray(counts))
      mirror.write(k, v, counts)
      _assert_holds(self, cache, mirror, dtype=jnp.dtype(dtype))
    self.assertFalse(np.asarray(cache.overflow).any())
    used = sum(-(-n // PS) for n in mirror.lengths)
    np.testing.assert_array_equal(cache_lib.pages_in_use(cache), [used, 0, 0, 0])

    # Every token selected, every page BF16: attention equals attention on contiguous K/V.
    table = _all_tokens_table(mirror.lengths, recent_tokens=0)
    q = jax.random.normal(jax.random.key(9), (3, 2, 4, D))
    k_c = jnp.asarray(mirror.k.astype(jnp.dtype(dtype)).astype(np.float32))
    v_c = jnp.asarray(mirror.v.astype(jnp.dtype(dtype)).astype(np.float32))
    expected = reference.selected_attention(q, k_c, v_c, table)
    for implementation in ("reference", "xla"):
      out = decode_attention(q, cache, table, implementation=implementation)
      np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6, err_msg=implementation)

  def test_traces_once_across_decode_steps(self):
    config = _config()
    k, v = _kv(0, 3, 64)
    cache = cache_lib.prefill(cache_lib.create(config), k, v, jnp.asarray([40, 33, 50]))
    layout = BlockLayout.stack([BlockLayout.from_blocks([], 160)] * 3)
    router_config = RouterConfig(page_size=PS, recent_tokens=32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(cache, q, k, v, counts):
      cache = cache_lib.append(cache, k, v, counts)
      table = route(layout, cache.lengths, router_config,
                    memory_pressure=cache_lib.memory_pressure(cache))
      return cache, decode_attention(q, cache, table)

    for i in range(4):
      k, v = _kv(10 + i, 3, 4)
      q = jax.random.normal(jax.random.key(i), (3, 4, 4, D))
      cache, out = step(cache, q, k, v, jnp.asarray([4, 1 + i % 3, 2]))
      self.assertTrue(np.isfinite(np.asarray(out)).all())
    np.testing.assert_array_equal(cache.lengths, [56, 33 + 1 + 2 + 3 + 1, 58])


class PrecisionTest(parameterized.TestCase):

  def _routed(self, pressure):
    blocks = [SemanticBlock("system", 0, 20, BlockPolicy.ALWAYS),
              SemanticBlock("doc_a", 20, 70, BlockPolicy.ATTEND, 0.9),
              SemanticBlock("doc_b", 70, 130, BlockPolicy.ATTEND, 0.6)]
    layout = BlockLayout.stack([BlockLayout.from_blocks(blocks, 160)] * 2)
    lengths = jnp.asarray([150, 118])
    table = route(layout, lengths, RouterConfig(page_size=PS, recent_tokens=8),
                  memory_pressure=pressure)
    return lengths, table

  def _expected_values(self, mirror, stored):
    """Contiguous values after fake-quantizing each page as stored: [B, L, H, D] (K and V)."""
    k, v = mirror.k.copy(), mirror.v.copy()
    for (b, page), precision in np.ndenumerate(stored):
      if precision in (cache_lib.UNMAPPED, B16):
        continue
      tokens = slice(page * PS, (page + 1) * PS)
      k[b, tokens] = quant.fake_quant(jnp.asarray(k[b, tokens]), precision, -3)  # per channel
      v[b, tokens] = quant.fake_quant(jnp.asarray(v[b, tokens]), precision, -1)  # per token
    return k, v

  def test_downgrade_stores_pages_as_routed(self):
    lengths, table = self._routed(pressure=0.2)  # doc_a 0.72 -> INT8, doc_b 0.48 -> INT4.
    k, v = _kv(1, 2, 150)
    cache = cache_lib.prefill(cache_lib.create(_config(max_seqs=2)), k, v, lengths)
    mirror = Mirror(2, 160)
    mirror.write(k, v, lengths)
    before = np.asarray(cache_lib.free_pages(cache))
    cache = cache_lib.apply_precision(cache, table)

    requested = np.asarray(table.precisions)
    stored = np.asarray(cache.page_pool)
    for b in range(2):
      for j, page in enumerate(np.asarray(table.page_ids[b, :table.num_pages[b]])):
        full = (page + 1) * PS <= int(lengths[b])
        self.assertEqual(stored[b, page], requested[b, j] if full else B16, f"{b}, {page}")
    self.assertGreater((stored == INT8).sum(), 0)
    self.assertGreater((stored == INT4).sum(), 0)
    moved = [(stored == p).sum() for p in Precision]
    np.testing.assert_array_equal(cache_lib.free_pages(cache),
                                  before + np.asarray([sum(moved[1:]), 0, 0, 0])
                                  - np.asarray([0] + moved[1:]))

    k_expected, v_expected = self._expected_values(mirror, stored)
    k_stored, v_stored = cache_lib.dequantized_kv(cache)
    for b, n in enumerate(np.asarray(lengths)):
      np.testing.assert_allclose(k_stored[b, :n], k_expected[b, :n], rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(v_stored[b, :n], v_expected[b, :n], rtol=1e-6, atol=1e-6)
    q = jax.random.normal(jax.random.key(5), (2, 3, 4, D))
    expected = reference.selected_attention(q, jnp.asarray(k_expected), jnp.asarray(v_expected),
                                            table)
    for implementation in ("reference", "xla"):
      out = decode_attention(q, cache, table, implementation=implementation)
      np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=implementation)
    mirror.k, mirror.v = k_expected, v_expected
    _assert_holds(self, cache, mirror)  # Includes the key bounds of the moved pages.

  def test_int8_then_int4_requantizes_the_stored_values(self):
    k, v = _kv(2, 2, 150)
    cache = cache_lib.prefill(cache_lib.create(_config(max_seqs=2)), k, v,
                              jnp.asarray([150, 118]))
    _, table = self._routed(pressure=0.2)
    int8_table, int4_table = _requesting(table, INT8), _requesting(table, INT4)
    cache = cache_lib.apply_precision(cache, int8_table)
    once = np.asarray(cache_lib.dequantized_kv(cache)[0])
    cache = cache_lib.apply_precision(cache, int4_table)
    twice = np.asarray(cache_lib.dequantized_kv(cache)[0])
    page = int(table.page_ids[0, 2])  # A full doc page of sequence 0.
    tokens = slice(page * PS, (page + 1) * PS)
    self.assertEqual(int(cache.page_pool[0, page]), INT4)
    expected = quant.fake_quant(jnp.asarray(once[0, tokens]), INT4, -3)
    np.testing.assert_allclose(twice[0, tokens], expected, rtol=1e-6, atol=1e-6)
    self.assertEqual(int(cache_lib.pages_in_use(cache)[INT8]), 0)  # INT8 slots were freed.

  def test_never_upgrades_or_moves_between_eight_bit_formats(self):
    k, v = _kv(3, 2, 150)
    pools = {B16: 40, FP8: 20, INT8: 20, INT4: 20}  # Room for every full page in each.
    cache = cache_lib.prefill(cache_lib.create(_config(max_seqs=2, pools=pools)), k, v,
                              jnp.asarray([150, 118]))
    _, table = self._routed(pressure=0.0)
    cache = cache_lib.apply_precision(cache, _requesting(table, FP8))
    stored = np.asarray(cache.page_pool).copy()
    self.assertEqual(int((stored == FP8).sum()), 16)  # 9 + 7 full pages.
    for request in (INT8, B16):
      cache = cache_lib.apply_precision(cache, _requesting(table, request))
      np.testing.assert_array_equal(cache.page_pool, stored)
    cache = cache_lib.apply_precision(cache, _requesting(table, INT4))
    np.testing.assert_array_equal(np.asarray(cache.page_pool)[stored == FP8], INT4)

  def test_full_target_pool_keeps_pages(self):
    k, v = _kv(4, 2, 150)
    pools = {B16: 40, INT4: 3}
    cache = cache_lib.prefill(cache_lib.create(_config(max_seqs=2, pools=pools)), k, v,
                              jnp.asarray([150, 118]))
    _, table = self._routed(pressure=0.0)
    cache = cache_lib.apply_precision(cache, _requesting(table, INT4))
    self.assertEqual(int((np.asarray(cache.page_pool) == INT4).sum()), 3)
    self.assertEqual(int(cache_lib.free_pages(cache)[INT4]), 0)


class ReleaseAndOverflowTest(parameterized.TestCase):

  def test_release_and_reuse_leave_other_sequences_intact(self):
    config = _config(key_sketch=True)
    cache, mirror = cache_lib.create(config), Mirror(3, 160)
    k, v = _kv(0, 3, 100)
    cache = cache_lib.prefill(cache, k, v, jnp.asarray([100, 70, 33]))
    mirror.write(k, v, [100, 70, 33])
    free_before = int(cache_lib.free_pages(cache)[B16])
    cache = cache_lib.release(cache, 1)
    self.assertEqual(int(cache_lib.free_pages(cache)[B16]), free_before + 5)
    mirror.lengths[1] = 0
    _assert_holds(self, cache, mirror)
    k2, v2 = _kv(7, 3, 100)
    cache = cache_lib.prefill(cache, k2, v2, jnp.asarray([0, 90, 0]))
    mirror.write(k2, v2, [0, 90, 0])
    _assert_holds(self, cache, mirror)

  def test_refused_writes_set_overflow_and_change_nothing(self):
    config = _config(max_seq_len=64, pools={B16: 6}, key_sketch=True)
    cache, mirror = cache_lib.create(config), Mirror(3, 64)
    k, v = _kv(0, 3, 40)
    cache = cache_lib.prefill(cache, k, v, jnp.asarray([40, 30, 0]))  # 3 + 2 pages of 6.
    mirror.write(k, v, [40, 30, 0])
    write = jax.jit(cache_lib.append)
    k, v = _kv(1, 3, 8)
    # Sequence 0 stays in its last page; 1 needs a page (the last free one); 2 needs one too.
    cache = write(cache, k, v, jnp.asarray([8, 8, 8]))
    mirror.write(k, v, [8, 8, 0])
    np.testing.assert_array_equal(cache.overflow, [False, False, True])
    _assert_holds(self, cache, mirror)
    # Past max_seq_len is refused the same way.
    big_k, big_v = _kv(2, 3, 30)
    cache = jax.jit(cache_lib.prefill)(cache, big_k, big_v, jnp.asarray([20, 0, 0]))
    mirror.write(big_k, big_v, [0, 0, 0])
    np.testing.assert_array_equal(cache.overflow, [True, False, True])
    _assert_holds(self, cache, mirror)

  def test_eager_calls_raise_naming_the_sequence(self):
    config = _config(max_seq_len=64, pools={B16: 6})
    k, v = _kv(0, 3, 60)
    cache = cache_lib.create(config)
    with self.assertRaisesRegex(ValueError, "sequence 2: writing 30 tokens at length 0 needs 2"
                                " new pages, but the BF16 pool has 1 free"):
      cache_lib.prefill(cache, k, v, jnp.asarray([40, 30, 30]))
    with self.assertRaisesRegex(ValueError, "sequence 0: writing 60 tokens at length 10 would"
                                " reach 70, past max_seq_len=64"):
      cache = cache_lib.prefill(cache, k, v, jnp.asarray([10, 0, 0]))
      cache_lib.prefill(cache, k, v, jnp.asarray([60, 0, 0]))

  @parameterized.named_parameters(
      ("k_shape", dict(k=jnp.ones((2, 8, H, D))), ValueError, "k must have shape \\[max_seqs=3"),
      ("k_dtype", dict(k=jnp.ones((3, 8, H, D), jnp.int32)), TypeError, "k must be a float"),
      ("kv_shapes", dict(v=jnp.ones((3, 7, H, D))), ValueError, "must have the same shape"),
      ("counts_shape", dict(counts=jnp.ones(2, jnp.int32)), ValueError,
       "counts must be an integer array of shape \\(3,\\)"),
      ("counts_range", dict(counts=jnp.asarray([9, 0, 0])), ValueError,
       "counts\\[0\\]=9 must be in \\[0, 8\\]"),
  )
  def test_bad_write_arguments(self, overrides, error, message):
    args = dict(k=jnp.ones((3, 8, H, D)), v=jnp.ones((3, 8, H, D)), counts=jnp.ones(3, jnp.int32))
    args.update(overrides)
    with self.assertRaisesRegex(error, message):
      cache_lib.append(cache_lib.create(_config()), args["k"], args["v"], args["counts"])

  def test_bad_release(self):
    with self.assertRaisesRegex(ValueError, "seq=3 is out of range \\[0, 3\\)"):
      cache_lib.release(cache_lib.create(_config()), 3)
    with self.assertRaisesRegex(TypeError, "seq must be an int"):
      cache_lib.release(cache_lib.create(_config()), 1.0)

  @parameterized.parameters(
      (dict(head_dim=7), "head_dim=7 must be even"),
      (dict(page_size=8), "page_size=8 must be a power of two"),
      (dict(pool_pages={Precision.BF16: 0}), "BF16 pool at least one page"),
      (dict(pool_pages=(4, -1, 0, 0)), "must give a page count >= 0"),
      (dict(pool_pages={7: 3}), "keys \\[7\\] that are not Precisions"),
      (dict(dtype="int8"), "dtype='int8' must be one of"),
      (dict(max_seqs=0), "max_seqs=0 must be a positive int"),
      (dict(key_sketch=1), "key_sketch must be a bool"),
  )
  def test_bad_config(self, overrides, message):
    args = dict(num_kv_heads=H, head_dim=D, max_seqs=2, max_seq_len=64)
    args.update(overrides)
    with self.assertRaisesRegex((ValueError, TypeError), message):
      cache_lib.CacheConfig(**args)


class AccountingAndConsistencyTest(absltest.TestCase):

  def test_memory_accounting(self):
    config = _config()
    cache = cache_lib.create(config)
    self.assertEqual(float(cache_lib.memory_pressure(cache)), 0.0)
    k, v = _kv(0, 3, 64)
    cache = cache_lib.prefill(cache, k, v, jnp.asarray([64, 17, 5]))
    per_page = H * (2 * PS * D * 4 + 4 * D)  # float32 K and V, plus bfloat16 key bounds.
    self.assertEqual(config.stored_page_bytes(B16), per_page)
    np.testing.assert_array_equal(cache_lib.bytes_in_use(cache), [7 * per_page, 0, 0, 0])
    self.assertAlmostEqual(float(cache_lib.memory_pressure(cache)),
                           7 * per_page / sum(cache_lib.capacity_bytes(config)), places=6)
    int4_page = H * (2 * PS * D // 2 + 4 * (D + PS) + 4 * D)
    self.assertEqual(config.stored_page_bytes(INT4), int4_page)
    self.assertEqual(config.key_sketch_bytes, 0)
    sketched = _config(key_sketch=True)  # INT4 codes and a float32 scale per page channel.
    self.assertEqual(sketched.key_sketch_bytes, H * D * 3 * 10 * (PS // 2 + 4))
    sketch = cache_lib.create(sketched).key_sketch
    self.assertEqual(sketch.codes.nbytes + sketch.scale.nbytes, sketched.key_sketch_bytes)
    self.assertIsNone(cache.key_sketch)

  def test_key_sketch_is_kept_through_precision_changes(self):
    """apply_precision moves pages between pools; the sketch, indexed by logical page, stays."""
    cache, mirror = cache_lib.create(_config(key_sketch=True)), Mirror(3, 160)
    k, v = _kv(3, 3, 100)
    cache = cache_lib.prefill(cache, k, v, jnp.asarray([100, 64, 20]))
    mirror.write(k, v, [100, 64, 20])
    before = jax.tree.map(np.asarray, cache.key_sketch)
    cache = cache_lib.apply_precision(cache, _requesting(_all_tokens_table(mirror.lengths), INT4))
    self.assertGreater(int(cache_lib.pages_in_use(cache)[INT4]), 0)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, cache.key_sketch), before)
    _assert_sketch_holds(self, cache.key_sketch, mirror, np.float32)

  def test_table_for_other_lengths_gives_nan_rows(self):
    k, v = _kv(0, 3, 64)
    cache = cache_lib.prefill(cache_lib.create(_config()), k, v, jnp.asarray([30, 20, 10]))
    table = _all_tokens_table([30, 20, 10])
    k1, v1 = _kv(1, 3, 1)
    cache = cache_lib.append(cache, k1, v1, jnp.asarray([1, 0, 0]))
    out = np.asarray(decode_attention(jax.random.normal(jax.random.key(0), (3, 1, 4, D)), cache,
                                      table))
    self.assertTrue(np.isnan(out[0]).all())
    self.assertTrue(np.isfinite(out[1:]).all())


if __name__ == "__main__":
  absltest.main()
