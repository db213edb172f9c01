"""Implementation "xla": gather the table's pages, then attend.

Reads only the table's `max_pages` pages (not the whole context), from contiguous K/V or from a
paged cache (dequantizing each page from its stored precision), and runs the reference math on
them, so it works on every platform. Its reference is `reference.selected_attention` or
`reference.paged_attention`.
"""

import jax
import jax.numpy as jnp

from intent_jax import cache as cache_lib
from intent_jax import reference
from intent_jax.page_table import PageTable


def gather_pages(x: jax.Array, table: PageTable) -> jax.Array:
  """[batch, seq, heads, dim] -> [batch, max_pages * page_size, heads, dim], the table's pages."""
  batch, seq, heads, dim = x.shape
  ps = table.page_size
  padded = -seq % ps
  pages = jnp.pad(x, ((0, 0), (0, padded), (0, 0), (0, 0))).reshape(batch, -1, ps, heads, dim)
  picked = jnp.take_along_axis(pages, table.page_ids[:, :, None, None, None], axis=1)
  return picked.reshape(batch, table.max_pages * ps, heads, dim)


def gather_selected_attention(q, kv, table: PageTable, *, q_positions=None, sinks=None,
                              scale=None, softcap=None, return_lse=False):
  """Same contract as the reference: kv is a KVCache or a (k, v) pair of contiguous arrays."""
  if isinstance(kv, cache_lib.KVCache):
    k, v = cache_lib.read_table_pages(kv, table)
  else:
    k, v = (gather_pages(x, table) for x in kv)
  batch, q_len = q.shape[:2]
  if q_positions is None:
    q_positions = table.query_positions(q_len)
  flat = lambda x: x.reshape(batch, table.max_pages * table.page_size)
  return reference.attention(
      q, k, v, mask=flat(table.page_token_mask())[:, None, :], q_positions=q_positions,
      kv_positions=flat(table.token_positions()), causal=True, sinks=sinks, scale=scale,
      softcap=softcap, return_lse=return_lse)
