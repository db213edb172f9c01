"""The Mosaic GPU decode kernel (implementation "pallas_mosaic_gpu").

Compiled on a Hopper GPU (`python -m tests.test_mosaic_decode_gpu` on the GPU machine): against
reference.paged_attention. Off a GPU (make test), where Pallas's GPU interpret mode cannot run
the kernel: its inputs (each split's slots, key positions and block count) through a NumPy model of
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


def modelled_partials(q_rows, row_pos, slots, key_pos, steps, cache, pages_per_block, scale):
  """What the kernel computes from its inputs, in float64 NumPy: (m, l, acc) per split."""
  pool = cache.pools[B16]
  k, v = (np.asarray(x, np.float64) for x in (pool.k, pool.v))
  q_rows, row_pos, slots, key_pos, steps = (
      np.asarray(x) for x in (q_rows, row_pos, slots, key_pos, steps))
  batch, heads, rows, head_dim = q_rows.shape
  num_splits = slots.shape[1]
  m = np.full((batch, heads, num_splits, rows), splits.MASK_VALUE)
  l = np.zeros((batch, heads, num_splits, rows))
  acc = np.zeros((batch, heads, num_splits, rows, head_dim))
  for b in range(batch):
    for s in range(num_splits):
      entries = slots[b, s].reshape(-1)[:steps[b, s] * pages_per_block]
      positions = key_pos[b, s][:entries.size * cache.config.page_size]
      for h in range(heads):
        logits = np.asarray(q_rows[b, h], np.float64) @ k[h, entries].reshape(-1, head_dim).T
        logits = np.where(positions[None, :] <= row_pos[b][:, None], logits * scale, -np.inf)
        seen = np.isfinite(logits).any(axis=1)
        if not seen.any():
          continue
        m[b, h, s] = np.where(seen, logits.max(axis=1), splits.MASK_VALUE)
        weights = np.exp(logits - m[b, h, s][:, None])
        l[b, h, s] = weights.sum(axis=1)
        acc[b, h, s] = weights @ v[h, entries].reshape(-1, head_dim)
  return tuple(jnp.asarray(x, jnp.float32) for x in (m, l, acc))


class ProgramEntriesTest(parameterized.TestCase):
  """The wrapper's split of the table, checked on any host through a model of the kernel."""

  @parameterized.named_parameters(
      ("gqa4_page16_3splits", 2, 8, 16, 4, 3, 1, 0),
      ("mqa_page32_1split", 1, 4, 32, 2, 1, 1, 0),
      ("more_splits_than_blocks", 2, 8, 16, 4, 16, 1, 0),
      ("queries_before_the_end", 2, 8, 16, 4, 2, 1, 45),
      ("three_query_tokens", 2, 8, 16, 4, 3, 3, 20),
  )
  def test_modelled_kernel_matches_oracle(self, num_kv_heads, num_q_heads, page_size,
                                          pages_per_block, num_splits, q_len, back):
    cache, table = bf16_case(5, num_kv_heads=num_kv_heads, page_size=page_size)
    q = jax.random.normal(jax.random.key(1), (BATCH, q_len, num_q_heads, 64), jnp.bfloat16)
    q_positions = cache.lengths[:, None] - q_len - back + jnp.arange(q_len)
    inputs = kernel.prepare(q, cache, table, q_positions, num_splits, pages_per_block)
    slots, key_pos, steps = inputs[2:]
    self.assertEqual(slots.shape[:2], (BATCH, num_splits))
    self.assertEqual(key_pos.shape[2], slots.shape[2] * slots.shape[3] * page_size)
    # Every entry of the table lies in some split's blocks.
    np.testing.assert_array_equal(
        np.asarray(steps).sum(axis=1) * pages_per_block >= np.asarray(table.num_pages), True)
    partials = modelled_partials(*inputs, cache, pages_per_block, 0.125)
    out, lse = splits.combine(partials, q.shape, return_lse=True)
    attend = lambda positions: reference.paged_attention(q, cache, table, q_positions=positions,
                                                         scale=0.125, return_lse=True)
    expected, expected_lse = attend(q_positions)
    if back:
      self.assertGreater(float(jnp.max(jnp.abs(expected - attend(None)[0]))), 1e-2)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5, atol=1e-5)

  def test_unattended_keys_are_never_visible(self):
    """Keys the table leaves out of partial pages, and entries past each split's share or the
    table, get position NEVER; the others their token's position, once."""
    cache, table = bf16_case(2, recent=0)
    _, key_pos, _ = kernel.program_entries(cache, table, 2, 4)
    key_pos = np.asarray(key_pos).reshape(BATCH, -1)
    mask = np.asarray(table.page_token_mask())
    self.assertLess(mask.sum(), int(jnp.sum(table.num_pages)) * table.page_size)  # Partial pages.
    for b in range(BATCH):
      want = np.sort(np.asarray(table.token_positions())[b][mask[b]])
      np.testing.assert_array_equal(np.sort(key_pos[b][key_pos[b] != kernel.NEVER]), want)

  def test_rejects_what_it_does_not_run(self):
    cache, table = bf16_case(1)
    q = jnp.ones((BATCH, 1, 4, 64), jnp.bfloat16)
    with self.assertRaisesRegex(NotImplementedError, "at most 64 query rows"):
      kernel.static_validate_inputs(jnp.ones((BATCH, 8, 32, 64), jnp.bfloat16), cache, table)
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

  @parameterized.parameters((64, 16, 4, 3, None, 1), (128, 16, 8, 2, 30.0, 4),
                            (64, 64, 1, 3, None, 2))
  def test_lowers_for_cuda(self, head_dim, page_size, pages_per_block, stages, softcap, q_len):
    cache, table = bf16_case(3, head_dim=head_dim, page_size=page_size)
    q = jnp.ones((BATCH, q_len, 8, head_dim), jnp.bfloat16)
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

  @parameterized.parameters((2, 4), (8, 8))
  def test_several_query_tokens(self, q_len, num_q_heads):
    """Causal by position: each query token sees the keys up to its own position."""
    cache, table = bf16_case(8)
    q = jax.random.normal(jax.random.key(q_len), (BATCH, q_len, num_q_heads, 64), jnp.bfloat16)
    out = kernel.mosaic_decode(q, cache, table, num_splits=2, softcap=20.0)
    expected = reference.paged_attention(q, cache, table, softcap=20.0)
    out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
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
