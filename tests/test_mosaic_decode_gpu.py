"""The Mosaic GPU decode kernel (implementation "pallas_mosaic_gpu").

Compiled on a Hopper GPU (`python -m tests.test_mosaic_decode_gpu` on the GPU machine): against
reference.paged_attention. Off a GPU (make test), where Pallas's GPU interpret mode cannot run
the kernel: its inputs (each split's slots, key bias and block count) through a NumPy model of
the kernel's arithmetic against the reference, and the kernel's lowering for CUDA.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import reference
from intent_jax.attention import decode_attention
from intent_jax.layout import BlockLayout, BlockPolicy
from intent_jax.precision import Precision
from intent_jax.router import RouterConfig, route
from pallas_kernels import splits
from pallas_kernels.gpu import mosaic_decode as kernel
from tests import spec

B16, INT8 = Precision.BF16, Precision.INT8
BATCH = spec.KERNEL_BATCH
ON_HOPPER = getattr(jax.devices()[0], "compute_capability", None) == "9.0"


def bf16_case(seed, *, num_kv_heads=2, head_dim=64, page_size=16, recent=16,
              default_policy=BlockPolicy.ALWAYS):
  return spec.kernel_case(seed, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          page_size=page_size, dtype="bfloat16", pressure=0.0, eight_bit=INT8,
                          recent=recent, default_policy=default_policy, formats=(B16,))


def modelled_partials(q_rows, slots, bias, steps, cache, pages_per_block, scale):
  """What the kernel computes from its inputs, in float64 NumPy: (m, l, acc) per split."""
  pool = cache.pools[B16]
  k, v = (np.asarray(x, np.float64) for x in (pool.k, pool.v))
  q_rows, slots, bias, steps = (np.asarray(x) for x in (q_rows, slots, bias, steps))
  batch, heads, rows, head_dim = q_rows.shape
  num_splits = slots.shape[1]
  m = np.full((batch, heads, num_splits, rows), splits.MASK_VALUE)
  l = np.zeros((batch, heads, num_splits, rows))
  acc = np.zeros((batch, heads, num_splits, rows, head_dim))
  for b in range(batch):
    for s in range(num_splits):
      entries = slots[b, s].reshape(-1)[:steps[b, s] * pages_per_block]
      visible = bias[b, s][:entries.size * cache.config.page_size] == 0
      for h in range(heads):
        keys, values = (x[h, entries].reshape(-1, head_dim)[visible] for x in (k, v))
        if not keys.shape[0]:
          continue
        logits = np.asarray(q_rows[b, h], np.float64) @ keys.T * scale
        m[b, h, s] = logits.max(axis=1)
        weights = np.exp(logits - m[b, h, s][:, None])
        l[b, h, s] = weights.sum(axis=1)
        acc[b, h, s] = weights @ values
  return tuple(jnp.asarray(x, jnp.float32) for x in (m, l, acc))


class ProgramEntriesTest(parameterized.TestCase):
  """The wrapper's split of the table, checked on any host through a model of the kernel."""

  @parameterized.named_parameters(
      ("gqa4_page16_3splits", 2, 8, 16, 4, 3, 0),
      ("mqa_page32_1split", 1, 4, 32, 2, 1, 0),
      ("more_splits_than_blocks", 2, 8, 16, 4, 16, 0),
      ("queries_before_the_end", 2, 8, 16, 4, 2, 45),
  )
  def test_modelled_kernel_matches_oracle(self, num_kv_heads, num_q_heads, page_size,
                                          pages_per_block, num_splits, back):
    cache, table = bf16_case(5, num_kv_heads=num_kv_heads, page_size=page_size)
    q = jax.random.normal(jax.random.key(1), (BATCH, 1, num_q_heads, 64), jnp.bfloat16)
    q_positions = cache.lengths[:, None] - 1 - back
    inputs = kernel.program_entries(cache, table, q_positions, num_splits, pages_per_block)
    slots, bias, steps = inputs
    self.assertEqual(slots.shape[:2], (BATCH, num_splits))
    self.assertEqual(bias.shape[2], slots.shape[2] * slots.shape[3] * page_size)
    # Every entry of the table lies in exactly one split's blocks.
    np.testing.assert_array_equal(
        np.asarray(steps).sum(axis=1) * pages_per_block >= np.asarray(table.num_pages), True)
    q_rows = splits.query_rows(q, num_kv_heads, kernel.ROWS)
    partials = modelled_partials(q_rows, *inputs, cache, pages_per_block, 0.125)
    out, lse = splits.combine(partials, q.shape, return_lse=True)
    attend = lambda positions: reference.paged_attention(q, cache, table, q_positions=positions,
                                                         scale=0.125, return_lse=True)
    expected, expected_lse = attend(q_positions)
    if back:
      self.assertGreater(float(jnp.max(jnp.abs(expected - attend(None)[0]))), 1e-2)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5, atol=1e-5)

  def test_bias_masks_unattended_tokens(self):
    """Keys the table leaves out of partial pages, and entries past the table, are masked."""
    cache, table = bf16_case(2, recent=0)
    slots, bias, steps = kernel.program_entries(cache, table, table.query_positions(1), 2, 4)
    attended = int(jnp.sum(jnp.asarray(bias) == 0))
    mask = table.page_token_mask() & (table.token_positions() < cache.lengths[:, None, None])
    self.assertEqual(attended, int(jnp.sum(mask)))
    self.assertLess(attended, int(jnp.sum(table.num_pages)) * table.page_size)  # Partial pages.

  def test_rejects_what_it_does_not_run(self):
    cache, table = bf16_case(1)
    q = jnp.ones((BATCH, 1, 4, 64), jnp.bfloat16)
    with self.assertRaisesRegex(NotImplementedError, "one query token"):
      kernel.static_validate_inputs(jnp.ones((BATCH, 2, 4, 64), jnp.bfloat16), cache, table)
    with self.assertRaisesRegex(NotImplementedError, "bfloat16 queries"):
      kernel.static_validate_inputs(q.astype(jnp.float32), cache, table)
    mixed, mixed_table = spec.kernel_case(1, num_kv_heads=2, head_dim=64, page_size=16,
                                          dtype="bfloat16", pressure=0.4, eight_bit=INT8,
                                          recent=16)
    with self.assertRaisesRegex(NotImplementedError, "bfloat16 pages only"):
      kernel.static_validate_inputs(q, mixed, mixed_table)
    if jax.default_backend() != "gpu":
      with self.assertRaisesRegex(NotImplementedError, "runs on GPUs"):
        decode_attention(q, cache, table, implementation="pallas_mosaic_gpu")


class LoweringTest(parameterized.TestCase):
  """Pallas's Mosaic GPU lowering (shapes, layouts, copies, barriers) on any host."""

  @parameterized.parameters((64, 16, 4, 3, None), (128, 16, 8, 2, 30.0), (64, 64, 1, 3, None))
  def test_lowers_for_cuda(self, head_dim, page_size, pages_per_block, stages, softcap):
    cache, table = bf16_case(3, head_dim=head_dim, page_size=page_size)
    q = jnp.ones((BATCH, 1, 8, head_dim), jnp.bfloat16)
    decode = jax.jit(lambda q, c, t: kernel.mosaic_decode(
        q, c, t, num_splits=2, pages_per_block=pages_per_block, stages=stages, softcap=softcap))
    text = decode.trace(q, cache, table).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("mosaic_gpu", text)


@absltest.skipUnless(ON_HOPPER, "compiled on a Hopper GPU only")
class CompiledTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("gqa4_d64", 2, 8, 64, 16, None, {}),
      ("gqa8_d128_softcap_sinks", 2, 16, 128, 16, 3, dict(softcap=4.0, scale=0.2, sinks=True)),
      ("page32_1split", 1, 4, 64, 32, 1, {}),
      ("page64_many_splits", 2, 8, 128, 64, 16, {}),
  )
  def test_matches_paged_oracle(self, num_kv_heads, num_q_heads, head_dim, page_size, num_splits,
                                options):
    cache, table = bf16_case(7, num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size)
    kq, ks = jax.random.split(jax.random.key(head_dim))
    q = jax.random.normal(kq, (BATCH, 1, num_q_heads, head_dim), jnp.bfloat16)
    if options.get("sinks"):
      options = dict(options, sinks=jax.random.normal(ks, (num_q_heads,)))
    out = kernel.mosaic_decode(q, cache, table, num_splits=num_splits, **options)
    expected = reference.paged_attention(q, cache, table, **options)
    self.assertEqual(out.dtype, jnp.bfloat16)
    out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
    self.assertTrue(np.isfinite(out).all())
    self.assertLess(np.linalg.norm(out - expected) / np.linalg.norm(expected), 1e-2)

  def test_return_lse_and_query_positions(self):
    cache, table = bf16_case(4)
    q = jax.random.normal(jax.random.key(5), (BATCH, 1, 4, 64), jnp.bfloat16)
    q_positions = cache.lengths[:, None] - 40
    out, lse = kernel.mosaic_decode(q, cache, table, q_positions=q_positions, return_lse=True,
                                    num_splits=3)
    want_out, want_lse = reference.paged_attention(q, cache, table, q_positions=q_positions,
                                                   return_lse=True)
    np.testing.assert_allclose(out, want_out, rtol=2e-2, atol=2e-2)  # bf16 matmul inputs.
    np.testing.assert_allclose(lse, want_lse, rtol=1e-2, atol=1e-2)

  def test_nothing_selected_gives_zeros(self):
    cache, table = bf16_case(0, recent=0, default_policy=BlockPolicy.SKIP)
    empty = BlockLayout.stack([BlockLayout.from_blocks([], spec.KERNEL_TOKENS)] * BATCH)
    table = route(empty, cache.lengths, RouterConfig(recent_tokens=0,
                                                     default_policy=BlockPolicy.SKIP))
    q = jax.random.normal(jax.random.key(0), (BATCH, 1, 4, 64), jnp.bfloat16)
    np.testing.assert_array_equal(kernel.mosaic_decode(q, cache, table), 0.0)

  def test_dispatched_by_default(self):
    cache, table = bf16_case(6)
    q = jax.random.normal(jax.random.key(6), (BATCH, 1, 4, 64), jnp.bfloat16)
    np.testing.assert_array_equal(decode_attention(q, cache, table),
                                  kernel.mosaic_decode(q, cache, table))


if __name__ == "__main__":
  absltest.main()
