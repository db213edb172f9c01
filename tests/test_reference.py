"""Tests of the oracle, intent_jax.reference, against float64 attention written in tests/spec.py."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import reference
from intent_jax.layout import BlockLayout, BlockPolicy
from intent_jax.router import RouterConfig, route
from tests import spec

NUM_TOKENS, MAX_BLOCKS, BATCH, ROUNDS, HEAD_DIM = 200, 6, 8, 20, 16


def _qkv(key, batch, q_len, num_q_heads, num_kv_heads, seq, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(key, 3)
  return (jax.random.normal(kq, (batch, q_len, num_q_heads, HEAD_DIM), dtype),
          jax.random.normal(kk, (batch, seq, num_kv_heads, HEAD_DIM), dtype),
          jax.random.normal(kv, (batch, seq, num_kv_heads, HEAD_DIM), dtype))


class AttentionTest(parameterized.TestCase):

  @parameterized.product(q_len=(1, 5), causal=(False, True), with_sinks=(False, True),
                         softcap=(None, 4.0))
  def test_matches_float64(self, q_len, causal, with_sinks, softcap):
    key = jax.random.key(q_len * 8 + causal * 4 + with_sinks * 2 + (softcap is not None))
    q, k, v = _qkv(key, 3, q_len, 8, 2, 40)
    rng = np.random.default_rng(1)
    mask = rng.random((3, q_len, 40)) < 0.6
    q_positions = rng.integers(0, 40, size=(3, q_len))
    kv_positions = np.stack([rng.permutation(40) for _ in range(3)])
    sinks = rng.normal(size=8).astype(np.float32) if with_sinks else None
    out = reference.attention(q, k, v, mask=jnp.asarray(mask), causal=causal,
                              q_positions=jnp.asarray(q_positions),
                              kv_positions=jnp.asarray(kv_positions),
                              sinks=None if sinks is None else jnp.asarray(sinks), scale=0.2,
                              softcap=softcap)
    visible = mask
    if causal:
      visible = mask & (kv_positions[:, None, :] <= q_positions[:, :, None])
    expected = spec.dense_attention(q, k, v, visible, sinks=sinks, scale=0.2, softcap=softcap)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

  @parameterized.parameters(False, True)
  def test_row_with_nothing_to_attend_is_zero(self, with_sinks):
    q, k, v = _qkv(jax.random.key(0), 2, 3, 4, 4, 10)
    mask = jnp.zeros((2, 3, 10), bool).at[1, 2, 4].set(True)
    sinks = jnp.ones(4) if with_sinks else None
    out = np.asarray(reference.attention(q, k, v, mask=mask, sinks=sinks))
    self.assertTrue(np.isfinite(out).all())
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1, :2], 0.0)
    self.assertGreater(np.abs(out[1, 2]).sum(), 0.0)

  def test_default_causal_positions_are_the_last_tokens(self):
    q, k, v = _qkv(jax.random.key(3), 1, 4, 2, 1, 12)
    out = reference.attention(q, k, v, causal=True)
    visible = np.arange(12)[None, None, :] <= (8 + np.arange(4))[None, :, None]
    np.testing.assert_allclose(out, spec.dense_attention(q, k, v, visible), rtol=1e-5,
                               atol=1e-6)

  @parameterized.parameters(False, True)
  def test_merge_partials_of_disjoint_key_sets_is_the_whole(self, with_sinks):
    """Attention over 3 disjoint key sets (some rows empty in some sets), merged by their
    log-sum-exp, equals attention over their union; the sinks join once, at the merge."""
    q, k, v = _qkv(jax.random.key(7), 2, 3, 4, 2, 30)
    rng = np.random.default_rng(7)
    part_of_key = rng.integers(0, 3, size=(2, 3, 30))
    part_of_key[0, 1] = 0  # Row (0, 1): only part 0 sees anything.
    visible = rng.random((2, 3, 30)) < 0.7
    sinks = jnp.asarray(rng.normal(size=4), jnp.float32) if with_sinks else None
    outs, lses = zip(*(reference.attention(q, k, v, mask=jnp.asarray(visible & (part_of_key == p)),
                                           return_lse=True) for p in range(3)))
    self.assertTrue(np.all(np.isneginf(lses[1][0, 1])))
    merged = reference.merge_partials(jnp.stack(outs), jnp.stack(lses), sinks=sinks)
    whole, whole_lse = reference.attention(q, k, v, mask=jnp.asarray(visible), sinks=sinks,
                                           return_lse=True)
    np.testing.assert_allclose(merged, whole, rtol=1e-5, atol=1e-6)
    logits = np.einsum("bqhd,bshd->bhqs", np.asarray(q, np.float64),
                       np.repeat(np.asarray(k, np.float64), 2, axis=2)) * HEAD_DIM**-0.5
    logits = np.where(visible[:, None], logits, -np.inf)
    if with_sinks:
      logits = np.concatenate([logits, np.broadcast_to(
          np.asarray(sinks, np.float64)[None, :, None, None], logits.shape[:3] + (1,))], -1)
    top = logits.max(-1, keepdims=True)
    expected_lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
    np.testing.assert_allclose(whole_lse, np.moveaxis(expected_lse, 1, 2), rtol=1e-5)

  def test_keeps_dtype(self):
    q, k, v = _qkv(jax.random.key(1), 1, 1, 4, 2, 8, jnp.bfloat16)
    self.assertEqual(reference.attention(q, k, v).dtype, jnp.bfloat16)

  @parameterized.parameters(
      (dict(q=(1, 1, 4, 16), k=(1, 8, 3, 16)),
       "num_q_heads=4 must be a multiple of num_kv_heads=3"),
      (dict(q=(1, 1, 4, 16), k=(1, 8, 2, 8)), "disagree on batch or head_dim"),
      (dict(q=(1, 4, 16), k=(1, 8, 2, 16)), "must be rank 4"),
  )
  def test_bad_shapes(self, shapes, message):
    q, k = jnp.ones(shapes["q"]), jnp.ones(shapes["k"])
    with self.assertRaisesRegex(ValueError, message):
      reference.attention(q, k, k)
    with self.assertRaisesRegex(ValueError, "must have the same shape"):
      reference.attention(jnp.ones((1, 1, 4, 16)), jnp.ones((1, 8, 2, 16)),
                          jnp.ones((1, 9, 2, 16)))


# (name, config, q_len, num_q_heads, num_kv_heads, sinks, scale, softcap)
SELECTED_CASES = (
    ("mha_empty_rows", RouterConfig(page_size=16, recent_tokens=0,
                                    default_policy=BlockPolicy.SKIP), 1, 4, 4, False, None, None),
    ("gqa_sinks_budget", RouterConfig(page_size=32, recent_tokens=12, max_pages=5), 4, 8, 2, True,
     None, None),
    ("mqa_softcap_scale", RouterConfig(page_size=16, recent_tokens=30, max_pages=4,
                                       default_policy=BlockPolicy.SKIP), 8, 8, 1, True, 0.3, 5.0),
)


class SelectedAttentionTest(parameterized.TestCase):

  @parameterized.named_parameters(*SELECTED_CASES)
  def test_routed_tables_match_dense_masked_attention(self, config, q_len, num_q_heads,
                                                     num_kv_heads, with_sinks, scale, softcap):
    rng = np.random.default_rng(q_len)
    sinks = rng.normal(size=num_q_heads).astype(np.float32) if with_sinks else None

    @jax.jit
    def run(layout, seq_lens, q, k, v):
      table = route(layout, seq_lens, config)
      return reference.selected_attention(
          q, k, v, table, sinks=None if sinks is None else jnp.asarray(sinks), scale=scale,
          softcap=softcap)

    empty_rows = 0
    for round_ in range(ROUNDS):
      rows = [spec.random_blocks(rng, NUM_TOKENS, MAX_BLOCKS) for _ in range(BATCH)]
      rows[0] = []  # With a SKIP default and no window, an empty layout selects nothing.
      layout = BlockLayout.stack(
          [BlockLayout.from_blocks(r, NUM_TOKENS, max_blocks=MAX_BLOCKS) for r in rows])
      seq_lens = rng.integers(q_len, NUM_TOKENS + 1, size=BATCH)
      q, k, v = _qkv(jax.random.key(round_), BATCH, q_len, num_q_heads, num_kv_heads,
                     NUM_TOKENS)
      out = run(layout.unnamed(), jnp.asarray(seq_lens), q, k, v)
      visible = np.zeros((BATCH, q_len, NUM_TOKENS), bool)
      for b, blocks in enumerate(rows):
        selected = spec.expected_routing(blocks, NUM_TOKENS, int(seq_lens[b]), config).selected
        q_positions = seq_lens[b] - q_len + np.arange(q_len)
        visible[b] = selected[None, :] & (np.arange(NUM_TOKENS)[None, :] <= q_positions[:, None])
        empty_rows += not visible[b].any()
      expected = spec.dense_attention(q, k, v, visible, sinks=sinks, scale=scale,
                                      softcap=softcap)
      np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6,
                                 err_msg=f"round {round_}: {rows}")
    if config.default_policy == BlockPolicy.SKIP and config.recent_tokens == 0:
      self.assertGreaterEqual(empty_rows, ROUNDS)  # The empty case really was exercised.


if __name__ == "__main__":
  absltest.main()
