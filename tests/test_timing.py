"""Tests for benchmarks.timing: the device-time chain runs every call, in sequence."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing


def _flops(compiled):
  analysis = compiled.cost_analysis()
  return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


class ChainedTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.x = jax.random.normal(jax.random.key(1), (64, 64), jnp.float32)
    self.w = jax.random.normal(jax.random.key(2), (64, 64), jnp.float32)
    self.buffer = jax.random.normal(jax.random.key(3), (1024,), jnp.float32)

  def test_every_call_is_kept(self):
    matmul = lambda x, w: x @ w
    one_call = _flops(jax.jit(matmul).lower(self.x, self.w).compile())
    for flush in (False, True):
      chain = timing.chained(matmul, 4, flush).lower(self.buffer, self.x, self.w).compile()
      # Four products: none merged with another (each input differs by its nudge).
      self.assertGreaterEqual(_flops(chain), 4 * one_call)
      self.assertLess(_flops(chain), 5 * one_call)

  def test_work_on_small_arguments_is_not_shared(self):
    # The product depends on w alone; x is only summed. Nudging w keeps four products.
    fn = lambda x, w: (x.sum() + (w @ w)[0, 0], x)
    one_call = _flops(jax.jit(lambda w: w @ w).lower(self.w).compile())
    chain = timing.chained(fn, 4, False).lower(self.buffer, self.x, self.w).compile()
    self.assertGreaterEqual(_flops(chain), 4 * one_call)

  def test_stand_in_chain_has_no_calls(self):
    matmul = lambda x, w: x @ w
    one_call = _flops(jax.jit(matmul).lower(self.x, self.w).compile())
    chain = timing.chained(None, 4, True, 64 * 64).lower(self.buffer, self.x, self.w).compile()
    self.assertLess(_flops(chain), one_call / 4)

  def test_chain_returns_zero(self):
    chain = timing.chained(lambda x, w: x @ w, 3, True)
    self.assertEqual(float(chain(self.buffer, self.x, self.w)), 0.0)

  def test_nudged_moves_small_leaves_only(self):
    big = jnp.ones((timing.NUDGED_MAX_SIZE + 1,), jnp.int8)
    tree = dict(q=jnp.ones((2,), jnp.bfloat16), slots=jnp.arange(3), live=jnp.zeros(2, bool),
                pool=big)
    out = timing.nudged(tree, jnp.float32(1.0))
    np.testing.assert_array_equal(out["q"], np.full((2,), 2.0))
    self.assertEqual(out["q"].dtype, jnp.bfloat16)
    np.testing.assert_array_equal(out["slots"], np.arange(3) + 1)
    np.testing.assert_array_equal(out["live"], np.ones(2, bool))
    self.assertIs(out["pool"], big)


if __name__ == "__main__":
  absltest.main()
