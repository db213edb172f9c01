"""Tests of intent_jax.scoring: cosine scores against numpy; page logit bounds never below the
true logits; top-channel logits from the key sketch; route in query mode over a real cache."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import chex
import numpy as np

from intent_jax import cache as cache_lib
from intent_jax import reference
from intent_jax import scoring
from intent_jax.precision import Precision
from intent_jax import router as router_lib
from intent_jax.router import RouterConfig, route
from intent_jax.layout import BlockLayout, BlockPolicy, SemanticBlock
from intent_jax.page_table import page_mask, token_mask
from tests import spec


class CosineScoresTest(absltest.TestCase):

  def test_matches_numpy(self):
    blocks = [SemanticBlock("a", 2, 10, BlockPolicy.ATTEND, 0.5),
              SemanticBlock("b", 12, 30, BlockPolicy.ATTEND, 0.5),
              SemanticBlock("late", 35, 40, BlockPolicy.ATTEND, 0.5)]
    layout = BlockLayout.stack([BlockLayout.from_blocks(blocks, 40, max_blocks=4)] * 2)
    seq_lens = jnp.asarray([40, 20])
    kq, kk = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (2, 2, 6, 8))
    k = jax.random.normal(kk, (2, 40, 3, 8))
    scores = np.asarray(scoring.cosine_scores(q, k, layout, seq_lens))
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    for b in range(2):
      for j, block in enumerate(blocks):
        end = min(block.end, int(seq_lens[b]))
        if block.start >= end:
          self.assertEqual(scores[b, j], 0.0)  # Not reached yet.
          continue
        cosines = []
        for h in range(3):
          query = qn[b, :, 2 * h:2 * h + 2].mean(axis=(0, 1))
          key = kn[b, block.start:end, h].mean(axis=0)
          cosines.append(query @ key / np.linalg.norm(query) / np.linalg.norm(key))
        self.assertAlmostEqual(scores[b, j], (1 + np.mean(cosines)) / 2, places=5)
      self.assertEqual(scores[b, 3], 0.0)  # Padding.

  def test_aligned_block_scores_one_and_opposite_zero(self):
    layout = BlockLayout.from_blocks([SemanticBlock("same", 0, 4, BlockPolicy.ATTEND),
                                      SemanticBlock("opposite", 4, 8, BlockPolicy.ATTEND)], 8)
    q = jax.random.normal(jax.random.key(1), (1, 1, 2, 16))
    direction = q[0, 0]  # [kv head, head_dim]: one query head per kv head.
    k = jnp.concatenate([jnp.tile(direction, (1, 4, 1, 1)), jnp.tile(-direction, (1, 4, 1, 1))],
                        axis=1)
    scores = scoring.cosine_scores(q, k, layout, jnp.asarray([8]))
    np.testing.assert_allclose(scores, [[1.0, 0.0]], atol=1e-6)


class PageUpperBoundsTest(parameterized.TestCase):

  def _cache(self, seed, dtype, lengths, page_size=16, length=96):
    config = cache_lib.CacheConfig(num_kv_heads=2, head_dim=16, max_seqs=len(lengths),
                                   max_seq_len=length, page_size=page_size,
                                   pool_pages={p: 64 for p in Precision}, dtype=dtype)
    kk, kv, kp = jax.random.split(jax.random.key(seed), 3)
    shape = (len(lengths), length, 2, 16)
    k = jax.random.normal(kk, shape) * jnp.where(jnp.arange(16) == 3, 8.0, 1.0)  # An outlier.
    v = jax.random.normal(kv, shape)
    lengths = jnp.asarray(lengths)
    cache = cache_lib.prefill(cache_lib.create(config), k, v, lengths)
    layout = BlockLayout.stack([BlockLayout.from_blocks([], length)] * len(lengths))
    table = route(layout, lengths, RouterConfig(page_size=page_size, recent_tokens=0))
    formats = jax.random.randint(kp, table.precisions.shape, 0, len(Precision))
    return cache_lib.apply_precision(cache, dataclasses.replace(table, precisions=formats))

  @parameterized.parameters((0, "float32", 1), (1, "bfloat16", 3), (2, "float32", 3))
  def test_no_stored_key_beats_its_page_bound(self, seed, dtype, q_len):
    lengths = [96, 41, 17]
    cache = self._cache(seed, dtype, lengths)
    q = jax.random.normal(jax.random.key(seed + 10), (3, q_len, 4, 16)) * 2.0
    bounds = np.asarray(scoring.page_upper_bounds(q, cache))
    exact = np.asarray(scoring.page_max_logits(q, cache))
    k, _ = cache_lib.dequantized_kv(cache)  # Stored values, each page in its format.
    logits = np.einsum("bthgd,bshd->bshgt", np.asarray(q, np.float64).reshape(3, q_len, 2, 2, 16),
                       np.asarray(k, np.float64)) / 4.0
    self.assertGreater(int(jnp.sum(cache.page_pool == int(Precision.INT4))), 0)
    for b, length in enumerate(lengths):
      pages = -(-length // 16)
      per_page = logits[b, :pages * 16].reshape(pages, 16, 2, -1)
      stored = (np.arange(pages * 16) < length).reshape(pages, 16)[..., None, None]
      true_max = np.where(stored, per_page, -np.inf).max(axis=(1, 3))  # [pages, kv_heads]
      self.assertTrue(np.all(bounds[b, :pages] >= true_max - 1e-4 * (1 + np.abs(true_max))))
      np.testing.assert_allclose(exact[b, :pages], true_max, rtol=1e-4, atol=1e-4)
      self.assertTrue(np.all(np.isneginf(exact[b, pages:])))
      self.assertTrue(np.all(np.isneginf(bounds[b, pages:])))  # Unmapped pages.

  def test_top_channel_logits_use_the_channels_where_the_query_is_largest(self):
    lengths, q_len, channels = [96, 41, 17], 2, 5
    cache = self._cache(4, "float32", lengths)
    q = jax.random.normal(jax.random.key(14), (3, q_len, 4, 16))
    got = np.asarray(scoring.top_channel_page_logits(q, cache, channels=channels))
    k = np.asarray(cache_lib.dequantized_kv(cache)[0], np.float64)
    grouped = np.asarray(q, np.float64).reshape(3, q_len, 2, 2, 16)
    for b, length in enumerate(lengths):
      pages = -(-length // 16)
      for h in range(2):
        top = np.argsort(np.abs(grouped[b, :, h]).sum(axis=(0, 1)))[-channels:]
        logits = np.einsum("tgd,sd->stg", grouped[b, :, h][..., top], k[b, :length, h][:, top])
        logits = logits.max(axis=(1, 2)) / 4.0
        expected = [logits[p * 16:(p + 1) * 16].max() for p in range(pages)]
        np.testing.assert_allclose(got[b, :pages, h], expected, rtol=1e-5, atol=1e-5)
      self.assertTrue(np.all(np.isneginf(got[b, pages:])))
    # Every channel: the exact page maximum.
    np.testing.assert_allclose(scoring.top_channel_page_logits(q, cache, channels=16),
                               scoring.page_max_logits(q, cache), rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "channels=0 must be an int in \\[1, head_dim=16\\]"):
      scoring.top_channel_page_logits(q, cache, channels=0)

  def test_bad_arguments(self):
    cache = self._cache(0, "float32", [5, 9])
    with self.assertRaisesRegex(ValueError, r"q must be a float array \[batch=2, q_len, a multiple"
                                r" of 2 heads, head_dim=16\]"):
      scoring.page_upper_bounds(jnp.ones((3, 1, 4, 16)), cache)
    with self.assertRaisesRegex(ValueError, "head_dim=16"):
      scoring.page_upper_bounds(jnp.ones((2, 1, 4, 8)), cache)
    with self.assertRaisesRegex(TypeError, "cache must be a cache.KVCache"):
      scoring.page_upper_bounds(jnp.ones((2, 1, 4, 16)), (None, None))

  def test_a_page_of_one_token_is_bounded_exactly(self):
    # bfloat16 keys: the stored (bfloat16) bounds of one key are the key itself.
    cache = self._cache(3, "bfloat16", [1, 33])
    q = jax.random.normal(jax.random.key(4), (2, 1, 4, 16))
    bounds = np.asarray(scoring.page_upper_bounds(q, cache, scale=1.0))
    k, _ = cache_lib.dequantized_kv(cache)
    exact = np.einsum("hgd,hd->hg", np.asarray(q[0, 0]).reshape(2, 2, 16), np.asarray(k[0, 0]))
    np.testing.assert_allclose(bounds[0, 0], exact.max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(bounds[1, 2], np.einsum(  # Token 32 alone in page 2.
        "hgd,hd->hg", np.asarray(q[1, 0]).reshape(2, 2, 16), np.asarray(k[1, 32])).max(axis=1),
                               rtol=1e-5)


class SketchPageLogitsTest(parameterized.TestCase):

  def _cache(self, k, lengths):
    config = cache_lib.CacheConfig(num_kv_heads=2, head_dim=16, max_seqs=len(lengths),
                                   max_seq_len=k.shape[1], pool_pages={p: 64 for p in Precision},
                                   dtype="float32", key_sketch=True)
    lengths = jnp.asarray(lengths)
    cache = cache_lib.prefill(cache_lib.create(config), k, k, lengths)
    layout = BlockLayout.stack([BlockLayout.from_blocks([], k.shape[1])] * len(lengths))
    table = route(layout, lengths, RouterConfig(recent_tokens=0))
    formats = jax.random.randint(jax.random.key(0), table.precisions.shape, 0, len(Precision))
    return cache_lib.apply_precision(cache, dataclasses.replace(table, precisions=formats))

  def test_matches_numpy_over_the_sketch(self):
    lengths, q_len, channels = [96, 41, 0], 2, 5
    k = jax.random.normal(jax.random.key(1), (3, 96, 2, 16)) * jnp.where(
        jnp.arange(16) == 3, 8.0, 1.0)
    cache = self._cache(k, lengths)
    q = jax.random.normal(jax.random.key(2), (3, q_len, 4, 16))
    got = np.asarray(scoring.sketch_page_logits(q, cache, channels=channels))
    codes = np.asarray(cache.key_sketch.codes)
    nibbles = np.concatenate([codes & 0xF, codes >> 4], axis=-1).astype(np.float64)
    keys = np.where(nibbles >= 8, nibbles - 16, nibbles) * np.asarray(
        cache.key_sketch.scale, np.float64)[..., None]  # [H, D, B, pages, 16]
    grouped = np.asarray(q, np.float64).reshape(3, q_len, 2, 2, 16)
    for b, length in enumerate(lengths):
      pages = -(-length // 16)
      for h in range(2):
        top = np.argsort(-np.abs(grouped[b, :, h]).sum(axis=(0, 1)), kind="stable")[:channels]
        page_keys = keys[h, top, b].reshape(channels, -1)[:, :length]  # [r, tokens]
        logits = np.einsum("tgr,rs->stg", grouped[b, :, h][..., top], page_keys)
        logits = logits.max(axis=(1, 2)) / 4.0
        expected = [logits[p * 16:(p + 1) * 16].max() for p in range(pages)]
        np.testing.assert_allclose(got[b, :pages, h], expected, rtol=1e-5, atol=1e-5)
      self.assertTrue(np.all(np.isneginf(got[b, pages:])))

  def test_every_channel_of_keys_on_the_int4_grid_gives_the_page_max_logit(self):
    # Integer keys in [-6, 6] with a 7 at some token of every page channel: scale 1, exact.
    k = jax.random.randint(jax.random.key(3), (2, 64, 2, 16), -6, 7).astype(jnp.float32)
    k = k.at[:, ::16].set(7.0)
    cache = self._cache(k, [64, 37])
    q = jax.random.normal(jax.random.key(4), (2, 1, 4, 16))
    scale = np.asarray(cache.key_sketch.scale)  # [heads, channels, seqs, pages]
    np.testing.assert_array_equal(scale[:, :, 0], 1.0)
    np.testing.assert_array_equal(scale[:, :, 1, :3], 1.0)  # 37 tokens: 3 pages.
    np.testing.assert_allclose(scoring.sketch_page_logits(q, cache, channels=16),
                               scoring.page_max_logits(q, cache), rtol=1e-6)

  def test_bad_arguments(self):
    k = jax.random.normal(jax.random.key(5), (2, 32, 2, 16))
    cache = self._cache(k, [32, 5])
    q = jnp.ones((2, 1, 4, 16))
    with self.assertRaisesRegex(ValueError, "channels=0 must be an int in \\[1, head_dim=16\\]"):
      scoring.sketch_page_logits(q, cache, channels=0)
    no_sketch = cache_lib.create(dataclasses.replace(cache.config, key_sketch=False))
    with self.assertRaisesRegex(ValueError, "key_sketch=True"):
      scoring.sketch_page_logits(q, no_sketch, channels=4)
    if jax.default_backend() != "gpu":
      with self.assertRaisesRegex(NotImplementedError, "pallas_gpu runs on GPUs"):
        scoring.sketch_page_logits(q, cache, channels=4, implementation="pallas_gpu")
    with self.assertRaisesRegex(ValueError, "implementation='mosaic_gpu'"):
      scoring.sketch_page_logits(q, cache, channels=4, implementation="mosaic_gpu")


class QueryRouteTest(parameterized.TestCase):
  """route(..., query=, cache=, budget=) on a cache of random keys."""

  BLOCKS = [SemanticBlock("system", 0, 16, BlockPolicy.ALWAYS),
            SemanticBlock("doc_a", 16, 70, BlockPolicy.ATTEND, 0.9),
            SemanticBlock("doc_b", 70, 120, BlockPolicy.ATTEND, 0.6),
            SemanticBlock("scratch", 120, 140, BlockPolicy.SKIP),
            SemanticBlock("turn", 140, 160, BlockPolicy.RECENT)]
  CONFIG = RouterConfig(page_size=16, recent_tokens=8)

  def _case(self, seed, lengths=(160, 131)):
    config = cache_lib.CacheConfig(num_kv_heads=2, head_dim=16, max_seqs=len(lengths),
                                   max_seq_len=160, dtype="float32", key_sketch=True)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    k = jax.random.normal(kk, (len(lengths), 160, 2, 16))
    v = jax.random.normal(kv, (len(lengths), 160, 2, 16))
    lengths = jnp.asarray(lengths)
    cache = cache_lib.prefill(cache_lib.create(config), k, v, lengths)
    layout = BlockLayout.stack([BlockLayout.from_blocks(self.BLOCKS, 160)] * len(lengths))
    q = jax.random.normal(kq, (len(lengths), 1, 4, 16))
    return q, k, v, cache, layout, lengths

  def _forced_pages(self, lengths):
    """bool[batch, 10]: pages of ALWAYS/RECENT tokens and of the recent window."""
    return self._pages(lengths, [(0, 16), (140, 160)], window=True)

  def _attend_pages(self, lengths):
    """bool[batch, 10]: pages holding ATTEND tokens and no forced one."""
    return self._pages(lengths, [(16, 120)]) & ~self._forced_pages(lengths)

  def _pages(self, lengths, spans, window=False):
    pages = np.zeros((len(lengths), 10), bool)
    for b, length in enumerate(np.asarray(lengths)):
      tokens = np.zeros(160, bool)
      for start, end in spans:
        tokens[start:end] = True
      tokens[length - 8:length] |= window
      tokens[length:] = False
      pages[b, np.unique(np.nonzero(tokens)[0] // 16)] = True
    return pages

  def test_budget_over_all_pages_equals_dense_attention(self):
    q, k, v, cache, layout, lengths = self._case(0)
    table = route(layout, lengths, self.CONFIG, query=q, cache=cache, budget=1000)
    visible = np.arange(160)[None] < np.asarray(lengths)[:, None]
    visible[:, 120:140] &= np.arange(120, 140)[None] >= np.asarray(lengths)[:, None] - 8  # SKIP.
    np.testing.assert_array_equal(token_mask(table, 160), visible)
    self.assertFalse(bool(np.any(table.overflow)))
    out = reference.paged_attention(q, cache, table)
    np.testing.assert_allclose(out, spec.dense_attention(q, k, v, visible[:, None]), atol=1e-5)

  @parameterized.parameters(0, 1, 3, 5, 7, 10)
  def test_forced_pages_always_present_and_budget_kept(self, budget):
    q, _, _, cache, layout, lengths = self._case(1)
    table = route(layout, lengths, self.CONFIG, query=q, cache=cache, budget=budget)
    read = np.asarray(page_mask(table, 10))
    forced = self._forced_pages(lengths)
    self.assertTrue(np.all(read[forced]))
    most = forced.sum(1) + self._attend_pages(lengths).sum(1)
    np.testing.assert_array_equal(table.num_pages, np.clip(budget, forced.sum(1), most))
    self.assertTrue(np.all(np.asarray(table.overflow) == (budget < most)))
    self.assertFalse(bool(np.any(table.truncated)))

  @parameterized.parameters(None, 4)
  def test_budget_picks_the_page_whose_key_matches_the_query(self, query_channels):
    q, k, v, cache, layout, lengths = self._case(2, lengths=(160, 160))
    target = [3, 6]  # A doc_a page and a doc_b page.
    for b, page in enumerate(target):  # One key of the page is 10x the query of both heads.
      k = k.at[b, page * 16 + 5].set(10.0 * q[b, 0, ::2])
    cache = cache_lib.prefill(cache_lib.create(cache.config), k, v, lengths)
    forced = self._forced_pages(lengths)
    config = dataclasses.replace(self.CONFIG, query_channels=query_channels)
    table = route(layout, lengths, config, query=q, cache=cache, budget=forced.sum(1) + 1)
    read = np.asarray(page_mask(table, 10))
    np.testing.assert_array_equal(read, forced | (np.arange(10) == np.asarray(target)[:, None]))
    self.assertTrue(bool(np.all(table.overflow)))
    rows = {r["name"]: r for r in router_lib.explain(table, layout, row=0)}
    self.assertEqual((rows["doc_a"]["decision"], rows["doc_a"]["reason"]),
                     ("PARTIAL", "QUERY_SELECTED"))
    self.assertEqual((rows["doc_b"]["decision"], rows["doc_b"]["reason"]),
                     ("DROPPED", "QUERY_DROPPED"))

  @parameterized.parameters(False, True)
  def test_page_scores_are_bounds_relative_to_each_heads_best(self, exact):
    q, _, _, cache, _, _ = self._case(3)
    per_head = scoring.page_max_logits if exact else scoring.page_upper_bounds
    bounds = np.asarray(per_head(q, cache))
    scores = np.asarray(scoring.page_scores(q, cache, exact=exact))
    relative = bounds - bounds.max(axis=1, keepdims=True)
    np.testing.assert_allclose(scores, relative.max(axis=-1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.isneginf(scores[1]), np.arange(10) >= 9)  # 131 tokens.

  def test_query_channels_rank_by_the_key_sketch(self):
    q, _, _, cache, layout, lengths = self._case(6)
    config = dataclasses.replace(self.CONFIG, query_channels=3)
    scores = scoring.page_scores(q, cache, channels=3)
    relative = np.asarray(scoring.sketch_page_logits(q, cache, channels=3))
    relative = relative - relative.max(axis=1, keepdims=True)
    np.testing.assert_allclose(scores, relative.max(axis=-1), rtol=1e-6, atol=1e-6)
    for budget in (4, 6):
      chex.assert_trees_all_equal(
          route(layout, lengths, config, query=q, cache=cache, budget=budget),
          route(layout, lengths, config, page_scores=scores, budget=budget))
    without = cache_lib.prefill(
        cache_lib.create(dataclasses.replace(cache.config, key_sketch=False)),
        *self._case(6)[1:3], lengths)
    with self.assertRaisesRegex(ValueError, "CacheConfig\\(key_sketch=True\\)"):
      route(layout, lengths, config, query=q, cache=without, budget=4)
    with self.assertRaisesRegex(ValueError, "channels=17 must be an int in \\[1, head_dim=16\\]"):
      route(layout, lengths, dataclasses.replace(config, query_channels=17), query=q,
            cache=cache, budget=4)
    with self.assertRaisesRegex(ValueError, "query_channels=0 must be None or an int >= 1"):
      RouterConfig(query_channels=0)
    with self.assertRaisesRegex(ValueError, "exact=True or channels"):
      scoring.page_scores(q, cache, exact=True, channels=3)

  def test_traces_once_across_budgets_and_queries(self):
    q, _, _, cache, layout, lengths = self._case(4)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(q, cache, budget):
      return route(layout, lengths, self.CONFIG, query=q, cache=cache, budget=budget)

    for budget in (3, 5, 9):
      step(q * budget, cache, jnp.asarray([budget, budget - 1]))

  def test_bad_query_mode_arguments(self):
    q, _, _, cache, layout, lengths = self._case(5)
    with self.assertRaisesRegex(ValueError, "budget is for query mode"):
      route(layout, lengths, self.CONFIG, budget=3)
    with self.assertRaisesRegex(ValueError, "needs both query and cache"):
      route(layout, lengths, self.CONFIG, query=q)
    with self.assertRaisesRegex(ValueError, "either page_scores or query"):
      route(layout, lengths, self.CONFIG, query=q, cache=cache, page_scores=jnp.zeros((2, 10)))
    with self.assertRaisesRegex(ValueError,
                                r"page_scores must be a float array of shape \(2, 10\)"):
      route(layout, lengths, self.CONFIG, page_scores=jnp.zeros((2, 9)))
    with self.assertRaisesRegex(ValueError, "budget must be an int"):
      route(layout, lengths, self.CONFIG, query=q, cache=cache, budget=2.5)
    with self.assertRaisesRegex(ValueError, "cache must have page_size=32"):
      route(layout, lengths, RouterConfig(page_size=32), query=q, cache=cache)
    with self.assertRaisesRegex(TypeError, "cache must be a cache.KVCache"):
      route(layout, lengths, self.CONFIG, query=q, cache=cache.pools)
    with self.assertRaisesRegex(ValueError, "q must be a float array"):
      route(layout, lengths, self.CONFIG, query=q[..., :8], cache=cache)


if __name__ == "__main__":
  absltest.main()
