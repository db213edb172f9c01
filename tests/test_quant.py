"""Tests of intent_jax.quant: error bounds, packing and edge cases of each format."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import quant
from intent_jax.precision import Precision


def _values(kind, shape=(6, 16, 32)):
  x = jax.random.normal(jax.random.key(0), shape)
  if kind == "heavy_tailed":  # A few outlier channels, as real keys have.
    x = x * jnp.where(jnp.arange(shape[-1]) % 11 == 0, 30.0, 1.0)
  return x


class QuantTest(parameterized.TestCase):

  @parameterized.product(precision=(Precision.INT8, Precision.INT4), axis=(-1, -2, (-2, -1)),
                         kind=("normal", "heavy_tailed"))
  def test_integer_error_is_at_most_half_a_step(self, precision, axis, kind):
    x = _values(kind)
    quantized = quant.quantize(x, precision, axis)
    error = jnp.abs(quant.dequantize(quantized) - x)
    self.assertTrue(bool(jnp.all(error <= quantized.scale / 2 * (1 + 1e-6) + 1e-30)))
    codes = quantized.data if precision == Precision.INT8 else quant.unpack_int4(quantized.data)
    self.assertTrue(bool(jnp.all(jnp.abs(codes.astype(jnp.int32)) <= quant.QMAX[precision])))
    # The largest |x| of each slice maps to the largest code.
    np.testing.assert_array_equal(jnp.max(jnp.abs(codes), axis=axis), quant.QMAX[precision])
    self.assertEqual(quantized.data.dtype, quant.STORAGE_DTYPE[precision])
    packed_dim = 16 if precision == Precision.INT4 else 32
    self.assertEqual(quantized.data.shape, (6, 16, packed_dim))

  @parameterized.parameters("normal", "heavy_tailed")
  def test_fp8_error_is_relative(self, kind):
    x = _values(kind)
    quantized = quant.quantize(x, Precision.FP8, -1)
    error = jnp.abs(quant.dequantize(quantized) - x)
    # e4m3: 3 mantissa bits (half an ulp is 2^-4 relative); subnormals are spaced 2^-9 * scale.
    bound = 2.0**-4 * jnp.abs(x) + 2.0**-10 * quantized.scale
    self.assertTrue(bool(jnp.all(error <= bound * (1 + 1e-6))))
    self.assertEqual(quantized.data.dtype, jnp.float8_e4m3fn)

  def test_int4_nibble_order(self):
    packed = quant.pack_int4(jnp.asarray([[1, -2, -8, 7]], jnp.int8))
    np.testing.assert_array_equal(packed, [[0x81, 0x7E]])  # Byte j: element j, j + 2.
    every_pair = jnp.stack(jnp.meshgrid(jnp.arange(-8, 8), jnp.arange(-8, 8)), -1).reshape(-1, 2)
    every_pair = every_pair.astype(jnp.int8)
    np.testing.assert_array_equal(quant.unpack_int4(quant.pack_int4(every_pair)), every_pair)
    with self.assertRaisesRegex(ValueError, "odd size 3"):
      quant.pack_int4(jnp.zeros((2, 3), jnp.int8))

  def test_nibble_floats_are_the_nibbles(self):
    every_byte = jnp.arange(256, dtype=jnp.int32).astype(jnp.uint8)
    floats = quant.int4_nibble_floats(every_byte)
    for got, want in zip(floats, quant.int4_nibbles(every_byte)):
      self.assertEqual(got.dtype, jnp.float32)
      np.testing.assert_array_equal(got, want.astype(jnp.float32))

  @parameterized.parameters(Precision.FP8, Precision.INT8, Precision.INT4)
  def test_zero_and_constant_blocks_round_trip(self, precision):
    zeros = jnp.zeros((3, 4, 8))
    quantized = quant.quantize(zeros, precision, -1)
    np.testing.assert_array_equal(quantized.scale, 0.0)
    np.testing.assert_array_equal(quant.dequantize(quantized), 0.0)
    constant = jnp.full((3, 4, 8), -2.5)
    np.testing.assert_allclose(quant.fake_quant(constant, precision, -2), constant, rtol=1e-6)

  def test_fake_quant_keeps_dtype_and_bf16_has_no_scale(self):
    x = _values("normal").astype(jnp.bfloat16)
    self.assertEqual(quant.fake_quant(x, Precision.INT4, -1).dtype, jnp.bfloat16)
    quantized = quant.quantize(x, Precision.BF16, -1)
    self.assertIsNone(quantized.scale)
    np.testing.assert_array_equal(quant.dequantize(quantized), x.astype(jnp.float32))


if __name__ == "__main__":
  absltest.main()
