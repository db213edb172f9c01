"""The TPU kernel in Pallas's TPU interpret mode (CPU) against reference.paged_attention, and
against JAX's own TPU paged_attention on the same BF16 pages."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from benchmarks import decode_inputs
from intent_jax import cache as cache_lib
from intent_jax import reference
from intent_jax.attention import decode_attention
from intent_jax.layout import BlockLayout, BlockPolicy
from intent_jax.precision import Precision
from intent_jax.router import RouterConfig, route
from pallas_kernels.tpu import selected_page_decode as kernel
from tests import spec

B16, FP8, INT8, INT4 = Precision.BF16, Precision.FP8, Precision.INT8, Precision.INT4
BATCH = spec.KERNEL_BATCH

# (name, q_len, num_q_heads, num_kv_heads, head_dim, page_size, cache dtype, q dtype, pressure,
#  eight-bit format, formats present, sinks and softcap, splits)
CASES = (
    ("bf16_page16", 1, 8, 2, 128, 16, "bfloat16", jnp.bfloat16, 0.0, INT8, (B16,), False, None),
    ("all_formats_int4", 3, 4, 1, 256, 32, "float32", jnp.float32, 0.4, INT8,
     (B16, INT8, INT4), True, 2),
    ("fp8_causal_q8", 8, 4, 2, 128, 32, "float32", jnp.float32, 0.3, FP8, (B16, FP8), True, None),
)


class TpuKernelTest(parameterized.TestCase):

  @parameterized.named_parameters(*CASES)
  def test_matches_paged_oracle(self, q_len, num_q_heads, num_kv_heads, head_dim, page_size,
                                cache_dtype, q_dtype, pressure, eight_bit, formats, extras,
                                splits):
    cache, table = spec.kernel_case(q_len, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                    page_size=page_size, dtype=cache_dtype, pressure=pressure,
                                    eight_bit=eight_bit, recent=24, formats=formats)
    stored = np.asarray(cache_lib.lookup(cache, table)[0])
    self.assertEqual(set(stored[stored >= 0].tolist()), set(int(f) for f in formats))
    kq, ks = jax.random.split(jax.random.key(q_len))
    q = jax.random.normal(kq, (BATCH, q_len, num_q_heads, head_dim), q_dtype)
    options = {}
    if extras:
      options = dict(sinks=jax.random.normal(ks, (num_q_heads,)), softcap=4.0, scale=0.1)
    out = kernel.selected_page_decode(q, cache, table, interpret=True, num_splits=splits,
                                      **options)
    expected = reference.paged_attention(q, cache, table, **options)
    if q_dtype == jnp.float32:
      np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    else:
      out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
      self.assertLess(np.linalg.norm(out - expected) / np.linalg.norm(expected), 1e-2)

  def test_return_lse_matches_oracle(self):
    """What sharded decode merges: float32 output and log-sum-exp."""
    cache, table = spec.kernel_case(8, num_kv_heads=2, head_dim=128, page_size=32,
                                    dtype="float32", pressure=0.3, eight_bit=FP8, recent=24,
                                    formats=(B16, FP8))
    q = jax.random.normal(jax.random.key(8), (BATCH, 2, 4, 128))
    out, lse = kernel.selected_page_decode(q, cache, table, interpret=True, return_lse=True)
    want_out, want_lse = reference.paged_attention(q, cache, table, return_lse=True)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)

  def test_nothing_selected_gives_zeros(self):
    cache, _ = spec.kernel_case(0, num_kv_heads=1, head_dim=128, page_size=16, dtype="float32",
                                pressure=0.0, eight_bit=INT8, recent=0, formats=(B16,))
    empty = BlockLayout.stack([BlockLayout.from_blocks([], spec.KERNEL_TOKENS)] * BATCH)
    table = route(empty, cache.lengths, RouterConfig(recent_tokens=0,
                                                     default_policy=BlockPolicy.SKIP))
    q = jax.random.normal(jax.random.key(0), (BATCH, 1, 2, 128))
    out = kernel.selected_page_decode(q, cache, table, sinks=jnp.ones(2), interpret=True)
    np.testing.assert_array_equal(out, 0.0)

  def test_matches_jax_tpu_paged_attention_on_the_same_pages(self):
    rng = np.random.default_rng(3)
    k = jax.random.normal(jax.random.key(4), (2, 512, 2, 128), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(5), (2, 512, 2, 128), jnp.bfloat16)
    table = decode_inputs.selection_table(rng, 2, 512, 16, 0.25,
                                          decode_inputs.precision_picker("bf16"))
    cache = decode_inputs.stored_cache(k, v, table, 16)
    q = jax.random.normal(jax.random.key(6), (2, 1, 8, 128), jnp.bfloat16)
    ours = kernel.selected_page_decode(q, cache, table, interpret=True)
    _, slots = cache_lib.lookup(cache, table)
    pool = cache.pools[B16]
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
      theirs = decode_inputs.jax_tpu_paged_attention(q, pool.k, pool.v, slots)
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    self.assertLess(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs), 1e-2)

  @parameterized.named_parameters(
      ("bf16_page16", 16, 128, (B16,), "bfloat16"),
      ("every_format_page32", 32, 256, (B16, FP8, INT8, INT4), "float32"),
      ("eight_bit_page64", 64, 128, (B16, INT8, FP8), "bfloat16"),
  )
  def test_lowers_to_mosaic(self, page_size, head_dim, formats, dtype):
    config = cache_lib.CacheConfig(num_kv_heads=8, head_dim=head_dim, max_seqs=2,
                                   max_seq_len=32768, page_size=page_size,
                                   pool_pages={f: 1024 for f in formats}, dtype=dtype)
    layouts = BlockLayout.stack([BlockLayout.from_blocks([], 32768)] * 2)
    table = jax.eval_shape(lambda: route(layouts, jnp.zeros(2, jnp.int32),
                                         RouterConfig(page_size=page_size)))
    q = jax.ShapeDtypeStruct((2, 4, 32, head_dim), jnp.bfloat16)
    module = spec.tpu_module(kernel.selected_page_decode, q, spec.cache_shapes(config), table)
    self.assertIn("selected_page_decode", module)

  @parameterized.named_parameters(
      ("head_dim", 64, 32, (B16,), "head_dim a multiple of 128, got 64"),
      ("eight_bit_page", 128, 16, (B16, INT8), "page_size a multiple of 32 for the INT8 pool"),
      ("int4_width", 128, 32, (B16, INT4), "INT4 pages \\(64 bytes a token\\) only when head_dim"),
  )
  def test_unsupported_tiling_is_refused(self, head_dim, page_size, formats, message):
    config = cache_lib.CacheConfig(num_kv_heads=1, head_dim=head_dim, max_seqs=1,
                                   max_seq_len=64, page_size=page_size,
                                   pool_pages={f: 4 for f in formats})
    cache = cache_lib.create(config)
    layout = BlockLayout.from_blocks([], 64)
    table = route(layout, jnp.asarray([0]), RouterConfig(page_size=page_size))
    with self.assertRaisesRegex(NotImplementedError, message):
      kernel.selected_page_decode(jnp.zeros((1, 1, 1, head_dim)), cache, table, interpret=True)

  def test_dispatch_steps_aside_off_tpu(self):
    if jax.default_backend() == "tpu":
      self.skipTest("runs the kernel itself on a TPU")
    cache, table = spec.kernel_case(1, num_kv_heads=1, head_dim=128, page_size=16,
                                    dtype="float32", pressure=0.0, eight_bit=INT8, recent=8,
                                    formats=(B16,))
    q = jax.random.normal(jax.random.key(1), (BATCH, 1, 2, 128))
    with self.assertRaisesRegex(NotImplementedError, "pallas_tpu runs on TPUs"):
      decode_attention(q, cache, table, implementation="pallas_tpu")


if __name__ == "__main__":
  absltest.main()
