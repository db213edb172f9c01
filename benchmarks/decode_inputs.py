"""Inputs of the decode benchmarks: selection tables and caches holding the selected pages."""

import jax.numpy as jnp
import numpy as np

from intent_jax import cache as cache_lib
from intent_jax import page_table
from intent_jax.precision import Precision

MIXED = ((Precision.BF16, 0.1), (Precision.INT8, 0.3), (Precision.INT4, 0.6))
NAMED = {"bf16": Precision.BF16, "int8": Precision.INT8, "fp8": Precision.FP8,
         "int4": Precision.INT4}


def selection_table(rng, batch, num_tokens, page_size, fraction,
                    precisions) -> page_table.PageTable:
  """A table reading `fraction` of each sequence's pages (random, sorted), every token of them."""
  total = num_tokens // page_size
  count = max(1, round(fraction * total))
  page_ids = np.sort(np.stack([rng.choice(total, count, replace=False) for _ in range(batch)]), 1)
  words = -(-page_size // 32)
  all_bits = (1 << min(page_size, 32)) - 1
  none = jnp.zeros((batch, 1), jnp.int32)
  return page_table.PageTable(
      page_ids=jnp.asarray(page_ids, jnp.int32),
      num_pages=jnp.full((batch,), count, jnp.int32),
      precisions=jnp.asarray(precisions(rng, (batch, count)), jnp.int32),
      token_bits=jnp.full((batch, count, words), all_bits, jnp.uint32),
      seq_lens=jnp.full((batch,), num_tokens, jnp.int32),
      block_decisions=none, block_reasons=none, block_precisions=none,
      overflow=jnp.zeros((batch,), bool), truncated=jnp.zeros((batch,), bool),
      page_size=page_size)


def precision_picker(name):
  if name == "mixed":
    formats, weights = zip(*MIXED)
    return lambda rng, shape: rng.choice(np.asarray(formats, int), size=shape, p=weights)
  return lambda rng, shape: np.full(shape, int(NAMED[name]))


def stored_cache(k, v, table, page_size, key_sketch=False):
  """A cache holding k, v (BF16 pool) with the table's pages moved to their precisions; it has
  pools for the formats the table asks for only (and a key sketch if asked)."""
  batch, num_tokens, num_kv_heads, head_dim = k.shape
  in_table = np.arange(table.max_pages) < np.asarray(table.num_pages)[:, None]
  formats = set(np.asarray(table.precisions)[in_table].tolist()) - {int(Precision.BF16)}
  pool_pages = {Precision.BF16: batch * (num_tokens // page_size)}
  pool_pages.update({Precision(f): table.max_pages * batch for f in formats})
  config = cache_lib.CacheConfig(
      num_kv_heads=num_kv_heads, head_dim=head_dim, max_seqs=batch, max_seq_len=num_tokens,
      page_size=page_size, pool_pages=pool_pages, key_sketch=key_sketch)
  cache = cache_lib.prefill(cache_lib.create(config), k, v, jnp.full((batch,), num_tokens))
  return cache_lib.apply_precision(cache, table)


def jax_paged_attention(q, k_pages, v_pages, block_tables, *, k_splits):
  """JAX's Pallas GPU paged_attention over the given pages, every token of them (it applies no
  logit scale, so q is scaled first)."""
  from jax.experimental.pallas.ops.gpu import paged_attention  # pylint: disable=g-import-not-at-top
  batch, _, num_heads, head_dim = q.shape
  pages = block_tables.shape[1]
  splits = k_splits
  while pages % splits:
    splits //= 2
  lengths = jnp.full((batch,), pages * k_pages.shape[2], jnp.int32)
  out = paged_attention.paged_attention(
      (q[:, 0] * head_dim**-0.5).astype(q.dtype), k_pages, v_pages, block_tables, lengths,
      k_splits=splits)
  return out[:, None]


def jax_tpu_paged_attention(q, k_pages, v_pages, block_tables, *, pages_per_compute_block=4):
  """JAX's Pallas TPU paged_attention over the given pages, every token of them (no logit scale
  of its own, so q is scaled first)."""
  # Imported here: a GPU or CPU run never loads the TPU op.
  from jax.experimental.pallas.ops.tpu import paged_attention  # pylint: disable=g-import-not-at-top
  paged_attention_kernel = paged_attention.paged_attention_kernel
  batch, _, num_heads, head_dim = q.shape
  pages = block_tables.shape[1]
  block = pages_per_compute_block
  while pages % block:
    block //= 2
  lengths = jnp.full((batch,), pages * k_pages.shape[2], jnp.int32)
  out = paged_attention_kernel.paged_attention(
      (q[:, 0] * head_dim**-0.5).astype(q.dtype), k_pages, v_pages, lengths, block_tables,
      pages_per_compute_block=block)
  return out[:, None]
