"""Tests of decode_attention: implementations against the oracle, dispatch and input errors."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import attention
from intent_jax import reference
from intent_jax.attention import decode_attention
from intent_jax.layout import BlockLayout, BlockPolicy, SemanticBlock
from intent_jax.router import RouterConfig, route
from tests import spec

NUM_TOKENS, MAX_BLOCKS, BATCH, HEAD_DIM = 300, 6, 6, 32


def _inputs(seed, q_len, num_q_heads, num_kv_heads, dtype, config):
  rng = np.random.default_rng(seed)
  rows = [spec.random_blocks(rng, NUM_TOKENS, MAX_BLOCKS) for _ in range(BATCH)]
  layout = BlockLayout.stack(
      [BlockLayout.from_blocks(r, NUM_TOKENS, max_blocks=MAX_BLOCKS) for r in rows])
  seq_lens = jnp.asarray(rng.integers(q_len, NUM_TOKENS + 1, size=BATCH), jnp.int32)
  table = route(layout, seq_lens, config)
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (BATCH, q_len, num_q_heads, HEAD_DIM), dtype)
  k = jax.random.normal(kk, (BATCH, NUM_TOKENS, num_kv_heads, HEAD_DIM), dtype)
  v = jax.random.normal(kv, (BATCH, NUM_TOKENS, num_kv_heads, HEAD_DIM), dtype)
  return q, k, v, table


def _relative_error(out, expected):
  out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(out - expected) / np.linalg.norm(expected)


class ImplementationsMatchOracleTest(parameterized.TestCase):

  @parameterized.product(
      dtype=(jnp.float32, jnp.bfloat16),
      shape=((1, 8, 8), (3, 8, 2), (8, 4, 1)),  # (q_len, num_q_heads, num_kv_heads)
      features=("plain", "sinks_softcap"),
      config=(RouterConfig(page_size=16, recent_tokens=24, max_pages=12),
              RouterConfig(page_size=32, recent_tokens=0, default_policy=BlockPolicy.SKIP)),
  )
  def test_xla_matches_reference(self, dtype, shape, features, config):
    q_len, num_q_heads, num_kv_heads = shape
    q, k, v, table = _inputs(q_len + num_kv_heads, q_len, num_q_heads, num_kv_heads, dtype,
                             config)
    extra = {}
    if features == "sinks_softcap":
      extra = dict(sinks=jax.random.normal(jax.random.key(9), (num_q_heads,)), softcap=6.0,
                   scale=0.15)
    out = decode_attention(q, (k, v), table, implementation="xla", **extra)
    expected = reference.selected_attention(q, k, v, table, **extra)
    self.assertEqual(out.dtype, dtype)
    truncated = np.asarray(table.truncated)
    self.assertTrue(np.isnan(np.asarray(out, np.float32)[truncated]).all())
    out, expected = out[~truncated], expected[~truncated]
    self.assertGreater(len(out), 0)
    if dtype == jnp.float32:
      np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    else:
      self.assertLess(_relative_error(out, expected), 1e-2)


class DispatchTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    config = RouterConfig(recent_tokens=16)
    self.q, self.k, self.v, self.table = _inputs(0, 1, 4, 2, jnp.float32, config)
    self.expected = reference.selected_attention(self.q, self.k, self.v, self.table)

  def _register(self, name, fn):
    attention.register_implementation(name, fn)
    self.addCleanup(attention.IMPLEMENTATIONS.pop, name)

  def test_default_order(self):
    self.assertEqual(attention.default_implementations("cpu"), ("xla", "reference"))
    self.assertEqual(attention.default_implementations("gpu")[-1], "reference")
    self.assertEqual(attention.default_implementations("unknown"), ("reference",))
    out = decode_attention(self.q, (self.k, self.v), self.table)
    np.testing.assert_allclose(out, self.expected, rtol=1e-5, atol=1e-6)

  def test_falls_through_not_implemented(self):
    calls = []

    def unsupported(*args, **kwargs):
      calls.append(1)
      raise NotImplementedError("no")

    self._register("unsupported", unsupported)
    out = decode_attention(self.q, (self.k, self.v), self.table,
                           implementation=["unsupported", "reference"])
    self.assertLen(calls, 1)
    np.testing.assert_array_equal(out, self.expected)
    with self.assertRaisesRegex(NotImplementedError, "none of the implementations"):
      decode_attention(self.q, (self.k, self.v), self.table, implementation="unsupported")

  def test_first_working_implementation_wins(self):
    self._register("zeros", lambda q, *args, **kwargs: jnp.zeros_like(q))
    out = decode_attention(self.q, (self.k, self.v), self.table, implementation=["zeros", "xla"])
    np.testing.assert_array_equal(out, 0.0)

  def test_unknown_implementation(self):
    with self.assertRaisesRegex(ValueError, "unknown implementation\\(s\\) \\['triton'\\]"):
      decode_attention(self.q, (self.k, self.v), self.table, implementation="triton")
    with self.assertRaisesRegex(TypeError, "implementation must be None, a name"):
      decode_attention(self.q, (self.k, self.v), self.table, implementation=[])

  def test_truncated_rows_are_nan(self):
    blocks = [SemanticBlock("system", 0, 64, BlockPolicy.ALWAYS)]
    layout = BlockLayout.stack([BlockLayout.from_blocks(blocks, 64),
                                BlockLayout.from_blocks(blocks[:0], 64)])
    table = route(layout, jnp.asarray([64, 64]),
                  RouterConfig(recent_tokens=0, max_pages=2, default_policy=BlockPolicy.SKIP))
    np.testing.assert_array_equal(table.truncated, [True, False])
    q, k, v = self.q[:2], self.k[:2, :64], self.v[:2, :64]
    out = np.asarray(decode_attention(q, (k, v), table))
    self.assertTrue(np.isnan(out[0]).all())
    np.testing.assert_array_equal(out[1], 0.0)  # Nothing selected: zeros.

  def test_traces_once_across_steps(self):
    layout = BlockLayout.from_blocks([SemanticBlock("doc", 0, 200, BlockPolicy.ATTEND, 0.8)],
                                     NUM_TOKENS)
    config = RouterConfig(recent_tokens=32, max_pages=8)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(seq_lens, q, k, v):
      return decode_attention(q, (k, v), route(layout, seq_lens, config))

    for seq_len in (100, 180, 250, 300):
      step(jnp.asarray([seq_len]), self.q[:1], self.k[:1], self.v[:1])

  @parameterized.named_parameters(
      ("q_rank", dict(q=jnp.ones((1, 4, 32))), ValueError, "must be rank 4"),
      ("q_int", dict(q=jnp.ones((6, 1, 4, 32), jnp.int32)), TypeError,
       "q has dtype int32; expected bfloat16, float16 or float32"),
      ("kv_dtypes", dict(v=jnp.ones((6, 300, 2, 32), jnp.bfloat16)), TypeError,
       "k has dtype float32 but v has bfloat16"),
      ("too_many_queries", dict(q=jnp.ones((6, 9, 4, 32))), ValueError,
       "q has 9 query tokens; decode takes 1..8"),
      ("heads", dict(q=jnp.ones((6, 1, 3, 32))), ValueError,
       "num_q_heads=3 must be a multiple of num_kv_heads=2"),
      ("batch", dict(q=jnp.ones((2, 1, 4, 32)), k=jnp.ones((2, 300, 2, 32)),
                     v=jnp.ones((2, 300, 2, 32))), ValueError,
       "table has batch 6 but q has batch 2"),
      ("sinks", dict(sinks=jnp.ones(3)), ValueError, "sinks must have shape \\(4,\\)"),
      ("q_positions", dict(q_positions=jnp.ones((6, 2), jnp.int32)), ValueError,
       "q_positions must have shape \\(6, 1\\)"),
      ("scale", dict(scale=-1.0), ValueError, "scale=-1.0 must be None or a positive number"),
      ("softcap", dict(softcap=0.0), ValueError, "softcap=0.0 must be None or a positive"),
      ("table", dict(table="pages"), TypeError, "table must be a PageTable"),
      ("not_array", dict(k=[[1.0]]), TypeError, "k must be an array"),
  )
  def test_bad_inputs(self, overrides, error, message):
    args = dict(q=self.q, k=self.k, v=self.v, table=self.table)
    args.update(overrides)
    with self.assertRaisesRegex(error, message):
      decode_attention(args["q"], (args["k"], args["v"]), args["table"],
                       **{n: args[n] for n in args if n not in ("q", "k", "v", "table")})


if __name__ == "__main__":
  absltest.main()
