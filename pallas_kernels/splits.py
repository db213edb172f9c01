"""Flash-decoding splits: merging the partial results of the kernels' programs, and the query
rows those programs compute (GQA packing: `query_rows`, whose layout `combine` undoes).

A program that attends part of a sequence's keys writes, per query row, its running maximum logit
`m`, its softmax denominator `l` (relative to m) and its unnormalized output `acc`. `combine` turns
each split into an (output, log-sum-exp) pair and merges them with `reference.merge_partials`,
where the per-head sink logits join the denominator.
"""

import jax.numpy as jnp

from intent_jax import reference
from intent_jax import scoring

MASK_VALUE = -1e30  # Logit of an invisible key; finite, so no inf - inf.


def next_power_of_two(n: int) -> int:
  """The least power of two >= n (1 for n <= 1): Triton's arrays' sizes, rows padded to them."""
  return 1 << (max(n, 1) - 1).bit_length()


def query_rows(q, num_kv_heads: int, rows: int):
  """GQA packing: the query rows of each kv head, row t * group + g for token t and query head g
  of the group (token-major: a token's rows are its heads' consecutive rows of q), zero-padded
  to `rows` (>= q_len * group): [batch, kv heads, rows, head_dim]."""
  batch, q_len, num_q_heads, head_dim = q.shape
  group = num_q_heads // num_kv_heads
  packed = jnp.moveaxis(q.reshape(batch, q_len, num_kv_heads, group, head_dim), 2, 1)
  packed = packed.reshape(batch, num_kv_heads, q_len * group, head_dim)
  return jnp.pad(packed, ((0, 0), (0, 0), (0, rows - q_len * group), (0, 0)))


def row_positions(q_positions, group: int, rows: int):
  """The position of each `query_rows` row, i32[batch, rows]: row t * group + g is at token t's
  position, padding rows at -1 (they see no key)."""
  row_pos = jnp.repeat(q_positions.astype(jnp.int32), group, axis=1)
  return jnp.pad(row_pos, ((0, 0), (0, rows - row_pos.shape[1])), constant_values=-1)


def chosen_channel_rows(q, num_kv_heads: int, channels: int, rows: int):
  """The sketch kernels' query: (chosen i32[batch, kv heads, channels], the channels
  `scoring.top_query_channels` picks per kv head; `query_rows` of float32 q restricted to them,
  f32[batch, kv heads, rows, channels])."""
  batch, q_len, _, head_dim = q.shape
  q = q.astype(jnp.float32)
  chosen = scoring.top_query_channels(q.reshape(batch, q_len, num_kv_heads, -1, head_dim),
                                      channels)
  q_rows = query_rows(q, num_kv_heads, rows)
  return chosen, jnp.take_along_axis(q_rows, chosen[:, :, None, :], axis=-1)


def unpack_rows(x, q_len: int, num_q_heads: int):
  """Undoes `query_rows`: [batch, kv heads, rows, *tail] -> [batch, q_len, num_q_heads, *tail],
  the padding rows dropped."""
  batch, num_kv_heads, _, *tail = x.shape
  group = num_q_heads // num_kv_heads
  x = x[:, :, :q_len * group].reshape(batch, num_kv_heads, q_len, group, *tail)
  return jnp.moveaxis(x, 2, 1).reshape(batch, q_len, num_q_heads, *tail)


def whole_acc(partials):
  """(m, l, acc[, acc_low, acc_high]) -> (m, l, acc): the two halves of the channels (the
  Triton kernel's INT4 pages) added to acc."""
  m, l, acc, *halves = partials
  if halves:
    acc = acc + jnp.concatenate(halves, axis=-1)
  return m, l, acc


def combine(partials, q_shape, *, sinks=None, return_lse=False):
  """Log-sum-exp over the splits' partial results; the sinks join the denominator.

  Args:
    partials: (m, l, acc[, acc_low, acc_high]): m, l f32[batch, kv_heads, splits, rows], acc
      f32[batch, kv_heads, splits, rows, head_dim] (or two halves of it); row t * group + g is
      query head g of the group at query token t; rows past q_len * group are padding.
    q_shape: (batch, q_len, num_q_heads, head_dim).
    sinks: optional f32[num_q_heads].
    return_lse: also return the merged log-sum-exp f32[batch, q_len, num_q_heads].

  Returns:
    f32[batch, q_len, num_q_heads, head_dim] (and the log-sum-exp with return_lse).
  """
  m, l, acc = whole_acc(partials)
  batch, q_len, num_q_heads, _ = q_shape
  num_splits = m.shape[2]

  def by_split(x):  # [batch, kv heads, splits, rows, *tail] -> [splits, batch, q_len, heads, *tail]
    x = jnp.moveaxis(x, 2, 0)
    x = unpack_rows(x.reshape(num_splits * batch, *x.shape[2:]), q_len, num_q_heads)
    return x.reshape(num_splits, batch, *x.shape[1:])

  seen = l > 0
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
  out = acc / jnp.where(seen, l, 1.0)[..., None]
  return reference.merge_partials(by_split(out), by_split(lse), sinks=sinks,
                                  return_lse=return_lse)
