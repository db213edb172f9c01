"""The page table: what decode attention reads, per sequence (the router's output).

A table lists, per sequence, logical pages in ascending order, the precision each is read at and,
per page, a bitmask of the attended tokens; plus the router's per-block decisions and flags.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

BITS_PER_WORD = 32


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "page_ids", "num_pages", "precisions", "token_bits", "seq_lens", "block_decisions",
        "block_reasons", "block_precisions", "overflow", "truncated"
    ],
    meta_fields=["page_size"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class PageTable:
  """What attention reads, per sequence. Only the first `num_pages` entries are meaningful.

  Attributes:
    page_ids: i32[batch, max_pages], logical page ids (token t lives in page t // page_size),
      ascending; padding entries are 0 with no token bits.
    num_pages: i32[batch], number of selected pages.
    precisions: i32[batch, max_pages], Precision of each selected page.
    token_bits: u32[batch, max_pages, words], bit i of word w set iff token
      page_id * page_size + 32 * w + i is attended.
    seq_lens: i32[batch], sequence lengths the table was routed for.
    block_decisions: i32[batch, max_blocks], Decision of each layout block.
    block_reasons: i32[batch, max_blocks], Reason of each layout block.
    block_precisions: i32[batch, max_blocks], Precision the rule gives each block.
    overflow: bool[batch], an ATTEND block was dropped to fit max_pages.
    truncated: bool[batch], the table misses tokens the policy requires (forced pages over
      max_pages, or a sequence longer than the layout); attention on such a row is wrong.
    page_size: static, tokens per page.
  """

  page_ids: jax.Array
  num_pages: jax.Array
  precisions: jax.Array
  token_bits: jax.Array
  seq_lens: jax.Array
  block_decisions: jax.Array
  block_reasons: jax.Array
  block_precisions: jax.Array
  overflow: jax.Array
  truncated: jax.Array
  page_size: int

  @property
  def batch_size(self) -> int:
    return self.page_ids.shape[0]

  @property
  def max_pages(self) -> int:
    return self.page_ids.shape[1]

  def page_token_mask(self) -> jax.Array:
    """bool[batch, max_pages, page_size]: the attended tokens of each table entry."""
    offsets = jnp.arange(self.page_size, dtype=jnp.uint32)
    words = self.token_bits[..., offsets // BITS_PER_WORD]
    bits = (words >> (offsets % BITS_PER_WORD)) & 1
    in_table = jnp.arange(self.max_pages) < self.num_pages[:, None]
    return (bits == 1) & in_table[..., None]

  def token_positions(self) -> jax.Array:
    """i32[batch, max_pages, page_size]: the sequence position of each table slot."""
    offsets = jnp.arange(self.page_size, dtype=jnp.int32)
    return self.page_ids[..., None] * self.page_size + offsets

  def query_positions(self, q_len: int) -> jax.Array:
    """i32[batch, q_len]: positions of the last `q_len` tokens of each sequence."""
    return self.seq_lens[:, None] - q_len + jnp.arange(q_len, dtype=jnp.int32)


def token_mask(table: PageTable, num_tokens: int) -> jax.Array:
  """bool[batch, num_tokens]: exactly the tokens `table` attends."""
  positions = table.token_positions()
  positions = jnp.where(table.page_token_mask(), positions, num_tokens)
  rows = jnp.arange(table.batch_size)[:, None, None]
  mask = jnp.zeros((table.batch_size, num_tokens), jnp.bool_)
  return mask.at[rows, positions].set(True, mode="drop")


def page_mask(table: PageTable, num_pages: int) -> jax.Array:
  """bool[batch, num_pages]: the logical pages `table` reads."""
  in_table = jnp.arange(table.max_pages) < table.num_pages[:, None]
  page_ids = jnp.where(in_table, table.page_ids, num_pages)
  rows = jnp.arange(table.batch_size)[:, None]
  mask = jnp.zeros((table.batch_size, num_pages), jnp.bool_)
  return mask.at[rows, page_ids].set(True, mode="drop")


def pack_bits(selected: jax.Array) -> jax.Array:
  """bool[pages, page_size] -> u32[pages, words]; token i is bit i % 32 of word i // 32."""
  pages, page_size = selected.shape
  width = min(page_size, BITS_PER_WORD)
  lanes = selected.reshape(pages, page_size // width, width).astype(jnp.uint32)
  return jnp.sum(lanes << jnp.arange(width, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
