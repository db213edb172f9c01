"""The Mosaic GPU decode kernel (implementation "pallas_mosaic_gpu").

Compiled on a Hopper GPU (`python -m tests.test_mosaic_decode_gpu` on the GPU machine): against
reference.paged_attention. Off a GPU (make test), where Pallas's GPU interpret mode cannot run
the kernel: its inputs (each split's slots, key positions and block count) through a NumPy model of
the kernel's arithmetic against the reference, and the kernel's lowering for CUDA.
"""

from absl.testing import absltest
from absl.testing import parameterized
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import attention
from intent_jax import cache as cache_lib
from intent_jax import quant
from intent_jax import reference
from intent_jax.attention import decode_attention
from intent_jax.layout import BlockLayout, BlockPolicy
from intent_jax.precision import Precision
from intent_jax.router import RouterConfig, route
from pallas_kernels import splits
from pallas_kernels.gpu import mosaic_decode as kernel
from tests import spec

B16, FP8, INT8, INT4 = Precision.BF16, Precision.FP8, Precision.INT8, Precision.INT4
BATCH = spec.KERNEL_BATCH
ON_HOPPER = getattr(jax.devices()[0], "compute_capability", None) == "9.0"


def bf16_case(seed, *, num_kv_heads=2, head_dim=64, page_size=16, recent=16,
              default_policy=BlockPolicy.ALWAYS):
  return spec.kernel_case(seed, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          page_size=page_size, dtype="bfloat16", pressure=0.0, eight_bit=INT8,
                          recent=recent, default_policy=default_policy, formats=(B16,))


def quantized_case(seed, formats, *, every_page=None, num_kv_heads=2, head_dim=128,
                   page_size=16):
  """A routed table over a cache with pools for `formats` (BF16 first); with `every_page`, every
  full page is moved to that format (a sequence's last page stays BF16), else the router mixes
  the formats under memory pressure."""
  eight_bit = FP8 if FP8 in formats else INT8
  cache, table = spec.kernel_case(seed, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                  page_size=page_size, dtype="bfloat16",
                                  pressure=0.0 if every_page else 0.6, eight_bit=eight_bit,
                                  recent=16, formats=formats)
  if every_page is not None:
    table = dataclasses.replace(table, precisions=jnp.full_like(table.precisions,
                                                                int(every_page)))
    cache = cache_lib.apply_precision(cache, table)
  return cache, table


def stored_pages(cache, precision):
  """A pool's K (dequantized) and V values (codes, unscaled: the kernel's V scales come from the
  wrapper), float64[kv heads, slots, page_size, head_dim]."""
  pool = cache.pools[precision]
  k, v = pool.k, pool.v
  if precision == INT4:
    k, v = quant.unpack_int4(k), quant.unpack_int4(v)
  k, v = (np.asarray(x.astype(jnp.float32), np.float64) for x in (k, v))
  if precision != B16:
    k = k * np.asarray(pool.k_scale, np.float64)[:, :, None, :]
  return k, v


def split_windows(counts, entries, cache, max_pages, num_splits, pages_per_block):
  """The entries each (sequence, split) reads, as the kernel finds them: yields (b, s, first:
  the window's first entry, window i32[fields, entries], each entry's group, valid: entries at
  or past it are not the split's, or None)."""
  counts, entries = np.asarray(counts), np.asarray(entries)
  num_groups = len(cache_lib.stored_precisions(cache))
  share = kernel._split_share(max_pages, num_splits, pages_per_block, num_groups)
  for b in range(entries.shape[0]):
    for s in range(num_splits):
      if counts.ndim == 1:  # One pool: table order.
        first, valid = (int(x) for x in kernel.table_split(min(counts[b], max_pages), s,
                                                           num_splits, pages_per_block))
        blocks = [-(-valid // pages_per_block)]
      else:
        first, valid, blocks = s * share, None, counts[b, s]
      groups = np.repeat(np.arange(len(blocks)), np.asarray(blocks) * pages_per_block)
      yield b, s, first, entries[b, :, first:first + groups.size], groups, valid


def window_key_positions(window, valid, page_size):
  """i32[entries, page_size]: each key's position from its entry's first position and token
  bits, NEVER where its bit is clear or its entry is at or past `valid`."""
  offsets = np.arange(page_size)
  bits = (window[kernel.WORDS + offsets // 32].T >> (offsets % 32)) & 1
  if valid is not None:
    bits[valid:] = 0
  return np.where(bits == 1, window[kernel.FIRST_POSITION][:, None] + offsets, kernel.NEVER)


def modelled_partials(q, positions, counts, entries, v_scales, cache, *, max_pages, num_splits,
                      pages_per_block, scale):
  """What the kernel computes from its inputs, in float64 NumPy: (m, l, acc) per split."""
  pages = [stored_pages(cache, p) for p in cache_lib.stored_precisions(cache)]
  batch, q_len, num_q_heads, head_dim = q.shape
  heads = cache.config.num_kv_heads
  rows, group = kernel.ROWS, num_q_heads // heads
  q_rows = np.asarray(splits.query_rows(q, heads, rows), np.float64)
  if positions.ndim == 1:  # Sequence lengths: the last q_len positions.
    positions = positions[:, None] - q_len + jnp.arange(q_len)
  row_pos = np.asarray(splits.row_positions(positions, group, rows))
  page_size = cache.config.page_size
  m = np.full((batch, heads, num_splits, rows), splits.MASK_VALUE)
  l = np.zeros((batch, heads, num_splits, rows))
  acc = np.zeros((batch, heads, num_splits, rows, head_dim))
  windows = split_windows(counts, entries, cache, max_pages, num_splits, pages_per_block)
  for b, s, first, window, groups, valid in windows:
    if not groups.size:
      continue
    key_pos = window_key_positions(window, valid, page_size).reshape(-1)
    slots = window[kernel.SLOT]
    for h in range(heads):
      k = np.stack([pages[g][0][h, e] for g, e in zip(groups, slots)]).reshape(-1, head_dim)
      v = np.stack([pages[g][1][h, e] for g, e in zip(groups, slots)]).reshape(-1, head_dim)
      if v_scales is not None:
        v = v * np.asarray(v_scales, np.float64)[b, h, first * page_size:][:v.shape[0], None]
      logits = q_rows[b, h] @ k.T
      logits = np.where(key_pos[None, :] <= row_pos[b][:, None], logits * scale, -np.inf)
      seen = np.isfinite(logits).any(axis=1)
      if not seen.any():
        continue
      m[b, h, s] = np.where(seen, logits.max(axis=1), splits.MASK_VALUE)
      weights = np.exp(logits - m[b, h, s][:, None])
      l[b, h, s] = weights.sum(axis=1)
      acc[b, h, s] = weights @ v
  return tuple(jnp.asarray(x, jnp.float32) for x in (m, l, acc))


class SoftCapTanhTest(absltest.TestCase):
  """The kernel's tanh (one base-2 exponential, since approximate math makes jnp.tanh coarse)."""

  def test_matches_tanh_over_the_range(self):
    x = np.concatenate([np.random.default_rng(5).normal(0, 3, 4096), [0.0, 1e-6, -1e-6],
                        [-1e4, -90.0, 90.0, 1e4]]).astype(np.float32)
    got = np.asarray(kernel._tanh(jnp.asarray(x)))
    self.assertTrue(np.isfinite(got).all())
    np.testing.assert_allclose(got, np.tanh(x.astype(np.float64)), rtol=0, atol=1e-6)


class EntryTest(absltest.TestCase):
  """The kernel's read of a window entry, copied in chunks of ENTRY_CHUNK (the window's layout in
  shared memory, i32[copies, fields, chunk]), on a NumPy stand-in for the shared-memory ref."""

  def test_every_entry_of_several_copies_is_its_own(self):
    fields, copies = 3, 3
    window = np.random.default_rng(2).integers(-2**31, 2**31, (fields, copies * kernel.ENTRY_CHUNK),
                                               dtype=np.int64).astype(np.int32)
    chunked = window.reshape(fields, copies, kernel.ENTRY_CHUNK).transpose(1, 0, 2)
    entries = jnp.arange(copies * kernel.ENTRY_CHUNK, dtype=jnp.int32)
    for field in range(fields):
      got = jax.vmap(lambda e, f=field: kernel._entry(jnp.asarray(chunked), f, e))(entries)
      np.testing.assert_array_equal(got, window[field])

  def test_one_copy_is_read_directly(self):
    window = np.random.default_rng(3).integers(0, 2**20, (1, 3, 96)).astype(np.int32)
    got = jax.vmap(lambda e: kernel._entry(jnp.asarray(window), 1, e))(jnp.arange(96))
    np.testing.assert_array_equal(got, window[0, 1])


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
    given = None if back == 0 and q_len == 1 else q_positions  # The default: from seq_lens.
    inputs = kernel.prepare(q, cache, table, given, num_splits, pages_per_block)
    positions, counts, entries, v_scales = inputs
    self.assertEqual(positions.ndim, 1 if given is None else 2)
    np.testing.assert_array_equal(counts, table.num_pages)  # Table order: one pool.
    self.assertEqual(entries.shape[:2], (BATCH, 2 + -(-page_size // 32)))
    self.assertIsNone(v_scales)
    partials = modelled_partials(q, *inputs, cache, max_pages=table.max_pages,
                                 num_splits=num_splits, pages_per_block=pages_per_block,
                                 scale=0.125)
    out, lse = splits.combine(partials, q.shape, return_lse=True)
    attend = lambda positions: reference.paged_attention(q, cache, table, q_positions=positions,
                                                         scale=0.125, return_lse=True)
    expected, expected_lse = attend(q_positions)
    if back:
      self.assertGreater(float(jnp.max(jnp.abs(expected - attend(None)[0]))), 1e-2)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5, atol=1e-5)

  @parameterized.named_parameters(
      ("int8_pages", (B16, INT8), INT8, 3),
      ("fp8_pages", (B16, FP8), FP8, 2),
      ("int4_pages", (B16, INT4), INT4, 3),
      ("mixed_table", (B16, INT8, INT4), None, 4),
      ("mixed_fp8_one_split", (B16, FP8, INT4), None, 1),
  )
  def test_modelled_quantized_pages(self, formats, every_page, num_splits):
    """Tables over quantized pools: each split's entries grouped by pool in whole blocks, each
    entry's V scales laid out per split."""
    cache, table = quantized_case(11, formats, every_page=every_page)
    stored, _ = cache_lib.lookup(cache, table)
    in_table = np.arange(table.max_pages) < np.asarray(table.num_pages)[:, None]
    kinds = set(np.asarray(stored)[in_table].tolist())
    self.assertGreater(len(kinds), 1)  # Pages of several formats in one table.
    q = jax.random.normal(jax.random.key(3), (BATCH, 1, 8, 128), jnp.bfloat16)
    inputs = kernel.prepare(q, cache, table, None, num_splits, 4)
    blocks = np.asarray(inputs[1])
    self.assertEqual(blocks.shape, (BATCH, num_splits, len(formats)))
    partials = modelled_partials(q, *inputs, cache, max_pages=table.max_pages,
                                 num_splits=num_splits, pages_per_block=4, scale=0.1)
    out, lse = splits.combine(partials, q.shape, return_lse=True)
    expected, expected_lse = reference.paged_attention(q, cache, table, scale=0.1,
                                                       return_lse=True)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5, atol=1e-5)

  def test_blocks_hold_one_format(self):
    """Each block's entries come from the pool of its group, and every attended token of the
    table is in exactly one block."""
    cache, table = quantized_case(12, (B16, INT8, INT4))
    pools, slots = (np.asarray(x) for x in cache_lib.lookup(cache, table))
    entries, blocks, groups = kernel.program_entries(cache, table, 3, 4)
    share = kernel._split_share(table.max_pages, 3, 4, 3)
    precisions = cache_lib.stored_precisions(cache)
    page_ids = np.asarray(table.page_ids)
    self._assert_every_token_once(
        table, split_windows(blocks, entries, cache, table.max_pages, 3, 4))
    for b, s, first, window, window_groups, _ in split_windows(blocks, entries, cache,
                                                                table.max_pages, 3, 4):
      np.testing.assert_array_equal(np.asarray(groups)[b, first:first + window_groups.size],
                                    window_groups)
      attended = (window[kernel.WORDS:] != 0).any(axis=0)
      for e in np.nonzero(attended)[0]:
        page = np.nonzero(page_ids[b] * table.page_size == window[kernel.FIRST_POSITION, e])[0]
        self.assertEqual(pools[b, page[0]], precisions[window_groups[e]])
        self.assertEqual(slots[b, page[0]], window[kernel.SLOT, e])

  @parameterized.parameters(1, 2, 5)
  def test_table_order_windows_hold_every_key_once(self, num_splits):
    """One pool: keys the table leaves out of partial pages, and entries of the next split or
    past the table, get position NEVER; the others their token's position, once."""
    cache, table = bf16_case(2, recent=0)
    mask = np.asarray(table.page_token_mask())
    self.assertLess(mask.sum(), int(jnp.sum(table.num_pages)) * table.page_size)  # Partial pages.
    entries, blocks, _ = kernel.program_entries(cache, table, num_splits, 4)
    self.assertIsNone(blocks)
    self._assert_every_token_once(table, split_windows(table.num_pages, entries, cache,
                                                       table.max_pages, num_splits, 4))

  def _assert_every_token_once(self, table, windows):
    seen = [[] for _ in range(BATCH)]
    for b, _, _, window, _, valid in windows:
      key_pos = window_key_positions(window, valid, table.page_size)
      seen[b].extend(key_pos[key_pos != kernel.NEVER].tolist())
    mask = np.asarray(table.page_token_mask())
    for b in range(BATCH):
      want = np.sort(np.asarray(table.token_positions())[b][mask[b]])
      np.testing.assert_array_equal(np.sort(seen[b]), want)

  def test_rejects_what_it_does_not_run(self):
    cache, table = bf16_case(1)
    q = jnp.ones((BATCH, 1, 4, 64), jnp.bfloat16)
    with self.assertRaisesRegex(NotImplementedError, "at most 64 query rows"):
      kernel.static_validate_inputs(jnp.ones((BATCH, 8, 32, 64), jnp.bfloat16), cache, table)
    with self.assertRaisesRegex(NotImplementedError, "bfloat16 queries"):
      kernel.static_validate_inputs(q.astype(jnp.float32), cache, table)
    int4, int4_table = spec.kernel_case(1, num_kv_heads=2, head_dim=64, page_size=16,
                                        dtype="bfloat16", pressure=0.6, eight_bit=INT8,
                                        recent=16)
    with self.assertRaisesRegex(NotImplementedError, "INT4 pages of head_dim 128"):
      kernel.static_validate_inputs(q, int4, int4_table)
    for bad in (dict(stages=0), dict(code_stages=0), dict(code_stages=1.5)):
      with self.assertRaisesRegex(ValueError, "stages must be an int >= 1"):
        kernel.mosaic_decode(q, cache, table, **bad)
    mixed, mixed_table = quantized_case(1, (B16, FP8, INT4))
    with self.assertRaisesRegex(NotImplementedError, "do not fit in shared memory"):
      kernel.mosaic_decode(jnp.ones((BATCH, 1, 4, 128), jnp.bfloat16), mixed, mixed_table,
                           num_splits=1, stages=4, code_stages=4)
    if jax.default_backend() != "gpu":
      with self.assertRaisesRegex(NotImplementedError, "runs on GPUs"):
        decode_attention(q, cache, table, implementation="pallas_mosaic_gpu")

  def test_default_order_takes_it_first(self):
    """The default GPU order tries this kernel first, then the Triton kernel (which runs the
    inputs this one declines)."""
    self.assertEqual(attention.default_implementations("gpu")[:2],
                     ("pallas_mosaic_gpu", "pallas_gpu"))


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

  @parameterized.parameters(((B16, INT8), INT8, 16), ((B16, FP8), None, 16),
                            ((B16, INT8, INT4), None, 16), ((B16, INT4), INT4, 32))
  def test_quantized_pools_lower_for_cuda(self, formats, every_page, page_size):
    cache, table = quantized_case(4, formats, every_page=every_page, page_size=page_size)
    q = jnp.ones((BATCH, 1, 8, 128), jnp.bfloat16)
    decode = jax.jit(lambda q, c, t: kernel.mosaic_decode(q, c, t, num_splits=2))
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

  @parameterized.named_parameters(
      ("int8", (B16, INT8), INT8, 16, 3), ("fp8", (B16, FP8), FP8, 16, 2),
      ("int4", (B16, INT4), INT4, 16, 3), ("int4_page64", (B16, INT4), INT4, 64, 2),
      ("mixed", (B16, INT8, INT4), None, 16, 4), ("mixed_fp8", (B16, FP8, INT4), None, 32, 1),
      # head_dim 64: tiles of 16 keys of 8-bit codes (as INT4's at 128).
      ("int8_head64", (B16, INT8), INT8, 16, 2, 64), ("fp8_head64", (B16, FP8), None, 32, 3, 64))
  def test_quantized_pages_match_paged_oracle(self, formats, every_page, page_size, num_splits,
                                              head_dim=128):
    cache, table = quantized_case(9, formats, every_page=every_page, page_size=page_size,
                                  head_dim=head_dim)
    q = jax.random.normal(jax.random.key(page_size), (BATCH, 1, 8, head_dim), jnp.bfloat16)
    out = kernel.mosaic_decode(q, cache, table, num_splits=num_splits, softcap=30.0)
    expected = reference.paged_attention(q, cache, table, softcap=30.0)
    out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
    self.assertTrue(np.isfinite(out).all())
    self.assertLess(np.linalg.norm(out - expected) / np.linalg.norm(expected), 1e-2)

  @parameterized.named_parameters(
      ("bf16", (B16,), None), ("int8", (B16, INT8), INT8), ("fp8", (B16, FP8), FP8),
      ("int8_int4", (B16, INT8, INT4), INT4), ("int4", (B16, INT4), INT4))
  def test_dispatched_by_default(self, formats, every_page):
    """By default this kernel runs every cache it supports, of any format."""
    if every_page is None:
      cache, table = bf16_case(6)
    else:
      cache, table = quantized_case(6, formats, every_page=every_page)
    q = jax.random.normal(jax.random.key(6), (BATCH, 1, 2 * cache.config.num_kv_heads,
                                              cache.config.head_dim), jnp.bfloat16)
    np.testing.assert_array_equal(decode_attention(q, cache, table),
                                  kernel.mosaic_decode(q, cache, table))


if __name__ == "__main__":
  absltest.main()
