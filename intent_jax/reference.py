"""The jax.numpy oracle: the definition of every attention answer in this library.

Everything is computed in float32 at HIGHEST matmul precision and returned in q's dtype.
Shapes: q: [batch, q_len, num_q_heads, head_dim]; k, v: [batch, seq, num_kv_heads, head_dim];
query head h reads kv head h // (num_q_heads // num_kv_heads).
"""

import jax
import jax.numpy as jnp

from intent_jax import cache as cache_lib
from intent_jax.page_table import PageTable, token_mask

_HIGHEST = jax.lax.Precision.HIGHEST


def check_query_args(q, *, sinks=None, q_positions=None) -> None:
  """Raises ValueError unless q is rank 4 and sinks, q_positions fit it."""
  if q.ndim != 4:
    raise ValueError(f"q must be rank 4 ([batch, q_len, heads, head_dim]), got q{list(q.shape)}")
  batch, q_len, num_q_heads, _ = q.shape
  if sinks is not None and jnp.shape(sinks) != (num_q_heads,):
    raise ValueError(f"sinks must have shape ({num_q_heads},), got {list(jnp.shape(sinks))}")
  if q_positions is not None and jnp.shape(q_positions) != (batch, q_len):
    raise ValueError(
        f"q_positions must have shape ({batch}, {q_len}), got {list(jnp.shape(q_positions))}")


def check_attention_args(q, k, v, *, sinks=None, q_positions=None) -> None:
  """Raises ValueError unless q, k, v (and sinks, q_positions) have matching shapes."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        "q, k, v must be rank 4 ([batch, len, heads, head_dim]), got"
        f" q{list(q.shape)} k{list(k.shape)} v{list(v.shape)}")
  if k.shape != v.shape:
    raise ValueError(f"k{list(k.shape)} and v{list(v.shape)} must have the same shape")
  batch, _, num_q_heads, head_dim = q.shape
  if k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(
        f"q{list(q.shape)} and k{list(k.shape)} disagree on batch or head_dim")
  if num_q_heads % k.shape[2]:
    raise ValueError(
        f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={k.shape[2]}")
  check_query_args(q, sinks=sinks, q_positions=q_positions)


def attention(q, k, v, *, mask=None, q_positions=None, kv_positions=None, causal=False,
              sinks=None, scale=None, softcap=None, return_lse=False):
  """Masked GQA attention, the definition every implementation must match.

  Args:
    q: [batch, q_len, num_q_heads, head_dim].
    k, v: [batch, seq, num_kv_heads, head_dim].
    mask: optional bool broadcastable to [batch, q_len, seq]; True = may attend.
    q_positions: i32[batch, q_len]; default: the last q_len positions, seq - q_len + i.
    kv_positions: i32[batch, seq]; default: 0..seq-1.
    causal: if True, a query attends keys with kv_position <= q_position only.
    sinks: optional f32[num_q_heads], a per-head logit that joins the softmax denominator
      (attends to nothing). Not soft-capped.
    scale: logit scale; default 1 / sqrt(head_dim).
    softcap: optional c > 0; logits become c * tanh(logits / c).
    return_lse: also return the log of each row's softmax denominator.

  Returns:
    [batch, q_len, num_q_heads, head_dim] in q.dtype. A query row with nothing to attend
    returns zeros. With return_lse: (the output in float32, for merging, and f32[batch, q_len,
    num_q_heads], the log-sum-exp of the row's visible logits and sink, -inf where there is
    none); `merge_partials` combines such pairs from disjoint key sets.
  """
  check_attention_args(q, k, v, sinks=sinks, q_positions=q_positions)
  batch, q_len, num_q_heads, head_dim = q.shape
  seq, num_kv_heads = k.shape[1], k.shape[2]
  group = num_q_heads // num_kv_heads
  scale = head_dim**-0.5 if scale is None else scale

  qf = q.astype(jnp.float32).reshape(batch, q_len, num_kv_heads, group, head_dim)
  logits = jnp.einsum("bqhgd,bshd->bhgqs", qf, k.astype(jnp.float32), precision=_HIGHEST)
  logits = logits * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)

  visible = jnp.ones((batch, q_len, seq), jnp.bool_)
  if mask is not None:
    visible = visible & jnp.broadcast_to(mask, (batch, q_len, seq))
  if causal:
    if q_positions is None:
      q_positions = jnp.broadcast_to(seq - q_len + jnp.arange(q_len), (batch, q_len))
    if kv_positions is None:
      kv_positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    visible = visible & (kv_positions[:, None, :] <= q_positions[:, :, None])
  visible = visible[:, None, None]  # [batch, 1, 1, q_len, seq]
  logits = jnp.where(visible, logits, -jnp.inf)

  row_max = jnp.max(logits, axis=-1)
  if sinks is not None:
    sink = sinks.astype(jnp.float32).reshape(num_kv_heads, group)[None, :, :, None]
    row_max = jnp.maximum(row_max, sink)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # Rows with nothing to attend.
  weights = jnp.where(visible, jnp.exp(logits - row_max[..., None]), 0.0)
  denominator = jnp.sum(weights, axis=-1)
  if sinks is not None:
    denominator = denominator + jnp.exp(sink - row_max)
  out = jnp.einsum("bhgqs,bshd->bqhgd", weights, v.astype(jnp.float32), precision=_HIGHEST)
  out = out / jnp.moveaxis(jnp.where(denominator > 0, denominator, 1.0), 3, 1)[..., None]
  out = out.reshape(batch, q_len, num_q_heads, head_dim)
  if not return_lse:
    return out.astype(q.dtype)
  lse = jnp.where(denominator > 0, row_max + jnp.log(denominator), -jnp.inf)
  return out, jnp.moveaxis(lse, 3, 1).reshape(batch, q_len, num_q_heads)


def merge_partials(outs, lses, *, sinks=None, return_lse=False):
  """Attention over the union of disjoint key sets, from each set's (out, lse).

  Args:
    outs: [parts, batch, q_len, num_q_heads, head_dim], each part's attention output.
    lses: f32[parts, batch, q_len, num_q_heads], each part's log-sum-exp (`attention`'s
      return_lse), -inf for a part with nothing visible.
    sinks: optional f32[num_q_heads] sink logits, counted once (the parts must have none).
    return_lse: also return the merged log-sum-exp.

  Returns:
    f32[batch, q_len, num_q_heads, head_dim]; zeros where no part sees anything. With
    return_lse, also f32[batch, q_len, num_q_heads].
  """
  top = jnp.max(lses, axis=0)
  if sinks is not None:
    top = jnp.maximum(top, sinks.astype(jnp.float32))
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.exp(lses - top)  # exp(-inf) = 0 for empty parts.
  denominator = jnp.sum(weights, axis=0)
  if sinks is not None:
    denominator = denominator + jnp.exp(sinks.astype(jnp.float32) - top)
  numerator = jnp.sum(weights[..., None] * outs.astype(jnp.float32), axis=0)
  out = numerator / jnp.where(denominator > 0, denominator, 1.0)[..., None]
  if not return_lse:
    return out
  return out, jnp.where(denominator > 0, top + jnp.log(denominator), -jnp.inf)


def selected_attention(q, k, v, table: PageTable, *, q_positions=None, sinks=None, scale=None,
                       softcap=None, return_lse=False):
  """Attention of q over exactly the tokens `table` selects from contiguous k, v.

  Decode attention is causal by position: q_positions default to the last q_len positions of
  each sequence (`table.query_positions`), and a query never sees a later token.
  """
  q_len = q.shape[1]
  if q_positions is None:
    q_positions = table.query_positions(q_len)
  return attention(q, k, v, mask=token_mask(table, k.shape[1])[:, None, :],
                   q_positions=q_positions, causal=True, sinks=sinks, scale=scale,
                   softcap=softcap, return_lse=return_lse)


def paged_attention(q, cache: cache_lib.KVCache, table: PageTable, *, q_positions=None, sinks=None,
                    scale=None, softcap=None, return_lse=False):
  """Attention of q over exactly the tokens `table` selects, read from a paged cache.

  Every page is dequantized from the precision it is stored in (not the one the table asks for),
  then attended as `selected_attention` does. The table must be routed for the cache's lengths
  (`decode_attention` returns NaN rows where it is not).
  """
  k, v = cache_lib.dequantized_kv(cache)
  return selected_attention(q, k, v, table, q_positions=q_positions, sinks=sinks, scale=scale,
                            softcap=softcap, return_lse=return_lse)
