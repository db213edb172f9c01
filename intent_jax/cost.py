"""Analytical cost of decode attention: FLOPs and KV bytes, dense vs routed, and memory growth.

Bytes count K and V of every page read, each (kv head, page) once, with the scales of its format
(`precision.page_bytes`); a partly selected page is read whole. FLOPs count the two matmuls
(q.k and p.v) at 2 FLOPs per multiply-add.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from intent_jax.precision import NUM_PRECISIONS, Precision, page_bytes
from intent_jax.page_table import PageTable


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """The attention shape of a decoder, for memory accounting."""

  name: str
  num_layers: int
  num_q_heads: int
  num_kv_heads: int
  head_dim: int


MODEL_SHAPES = {
    "llama3-8b": ModelShape("llama3-8b", num_layers=32, num_q_heads=32, num_kv_heads=8,
                            head_dim=128),
    "llama3-70b": ModelShape("llama3-70b", num_layers=80, num_q_heads=64, num_kv_heads=8,
                             head_dim=128),
}
CONTEXT_LENGTHS = (8192, 32768, 131072, 1048576)


def attention_flops(q_len: int, num_q_heads: int, head_dim: int, num_keys):
  """FLOPs of attention of `q_len` query tokens over `num_keys` keys (one layer)."""
  return 4 * q_len * num_q_heads * head_dim * num_keys


def dense_kv_bytes(num_tokens: int, num_kv_heads: int, head_dim: int, *, page_size: int = 16,
                   precision: Precision = Precision.BF16) -> int:
  """Bytes a dense step reads: every page of a `num_tokens` context (one layer)."""
  pages = math.ceil(num_tokens / page_size)
  return pages * num_kv_heads * page_bytes(precision, page_size, head_dim)


def pages_by_precision(table: PageTable, precisions: jax.Array | None = None) -> jax.Array:
  """i32[batch, NUM_PRECISIONS]: how many table pages each format has.

  `precisions` (i32[batch, max_pages]) replaces the table's requested formats, e.g. with the
  formats a cache stores the pages in (`cache.lookup`).
  """
  precisions = table.precisions if precisions is None else precisions
  in_table = jnp.arange(table.max_pages) < table.num_pages[:, None]
  one_hot = precisions[..., None] == jnp.arange(NUM_PRECISIONS)
  return jnp.sum(one_hot & in_table[..., None], axis=1, dtype=jnp.int32)


def routed_kv_bytes(table: PageTable, num_kv_heads: int, head_dim: int,
                    precisions: jax.Array | None = None) -> jax.Array:
  """f32[batch]: bytes a routed step reads, each page in its format (one layer)."""
  per_page = jnp.asarray(
      [page_bytes(p, table.page_size, head_dim) for p in Precision], jnp.float32)
  counts = pages_by_precision(table, precisions).astype(jnp.float32)
  return counts @ per_page * num_kv_heads


def attended_tokens(table: PageTable) -> jax.Array:
  """i32[batch]: tokens the table attends."""
  bits = jax.lax.population_count(table.token_bits)
  in_table = jnp.arange(table.max_pages) < table.num_pages[:, None]
  return jnp.sum(jnp.where(in_table[..., None], bits, 0), axis=(1, 2), dtype=jnp.int32)


def bytes_per_token(precision: Precision, num_kv_heads: int, head_dim: int,
                    page_size: int = 16) -> float:
  """KV bytes one token costs in one layer, scales included."""
  return num_kv_heads * page_bytes(precision, page_size, head_dim) / page_size


def memory_growth(shape: ModelShape, mix: dict[Precision, float] | None = None, *,
                  context_lengths=CONTEXT_LENGTHS, page_size: int = 16) -> list[dict]:
  """Rows of KV memory by context length for `shape`, with pages stored in `mix`.

  Args:
    shape: the model's attention shape.
    mix: fraction of pages in each Precision (sums to 1); default all BF16.
    context_lengths: token counts to report.
    page_size: tokens per page.

  Returns:
    One dict per length: tokens, bytes_per_token_per_layer, total_bytes (all layers).
  """
  mix = {Precision.BF16: 1.0} if mix is None else mix
  if not math.isclose(sum(mix.values()), 1.0, abs_tol=1e-6):
    raise ValueError(f"mix fractions must sum to 1, got {sum(mix.values())}")
  per_token = sum(
      fraction * bytes_per_token(p, shape.num_kv_heads, shape.head_dim, page_size)
      for p, fraction in mix.items())
  return [
      dict(tokens=n, bytes_per_token_per_layer=per_token,
           total_bytes=per_token * n * shape.num_layers) for n in context_lengths
  ]
