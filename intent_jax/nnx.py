"""Flax NNX attention layer over the paged, intent-routed KV cache.

`IntentAttention` is a GQA self-attention layer with rotary position embeddings. It prefills a
batch of prompts of different lengths (dense causal attention over the prompt) and decodes 1..8
tokens a step, reading from its KV store:
  * a paged `cache.KVCache`: decode attends exactly the tokens of a routed `PageTable`, each page in
    its stored precision (`attention.decode_attention`); a `sharded.ShardedKVCache` does the same
    over a mesh (kv heads and pages split; the layer's parameters are not);
  * a `DenseKV`: plain contiguous K/V and dense attention over every stored token, the baseline the
    routed layer is checked against.
The layer holds parameters only; the KV store goes in and comes out of every call (pure state
passing, so a jitted step can donate it).
"""

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp

from intent_jax import attention as attention_lib
from intent_jax import sharded
from intent_jax.page_table import PageTable


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (rotate-half) of x [batch, tokens, heads, head_dim] at positions
  i32[batch, tokens]; computed in float32, returned in x.dtype."""
  half = x.shape[-1] // 2
  frequencies = theta**(-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None, None] * frequencies  # [b, t, 1, half]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  first, second = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "lengths"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True, eq=False)
class DenseKV:
  """Contiguous K/V of a batch.

  k, v: [batch, max_seq_len, num_kv_heads, head_dim]; lengths: i32[batch], tokens stored.
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @classmethod
  def create(cls, batch: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.bfloat16) -> "DenseKV":
    shape = (batch, max_seq_len, num_kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros(batch, jnp.int32))

  def write(self, k, v, counts) -> "DenseKV":
    """Appends the first counts[b] tokens of k[b], v[b] after each sequence's length."""
    batch, tokens = k.shape[:2]
    positions = self.lengths[:, None] + jnp.arange(tokens)
    positions = jnp.where(jnp.arange(tokens) < counts[:, None], positions, self.k.shape[1])
    rows = jnp.arange(batch)[:, None]
    put = lambda store, x: store.at[rows, positions].set(x.astype(store.dtype), mode="drop")
    return DenseKV(put(self.k, k), put(self.v, v), self.lengths + counts)


def _dense_attention(q, k, v, q_positions, kv_lengths):
  """Causal attention of q at q_positions over the first kv_lengths[b] keys of k, v."""
  kv_positions = jnp.arange(k.shape[1])
  visible = ((kv_positions[None, None, :] <= q_positions[:, :, None]) &
             (kv_positions[None, None, :] < kv_lengths[:, None, None]))
  return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                      mask=visible[:, None])


class IntentAttention(nnx.Module):
  """GQA self-attention with RoPE over a paged, routed KV cache (or a DenseKV).

  Shapes: x [batch, tokens, in_features] -> [batch, tokens, in_features].
  """

  def __init__(self, in_features: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               rope_theta: float = 10000.0, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if head_dim % 2:
      raise ValueError(f"head_dim={head_dim} must be even (rotary embedding)")
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
    self.q_proj = linear(in_features, num_heads * head_dim)
    self.k_proj = linear(in_features, num_kv_heads * head_dim)
    self.v_proj = linear(in_features, num_kv_heads * head_dim)
    self.o_proj = linear(num_heads * head_dim, in_features)
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_theta = rope_theta

  def _project(self, x, positions):
    batch, tokens = x.shape[:2]
    split = lambda y, heads: y.reshape(batch, tokens, heads, self.head_dim)
    q = apply_rope(split(self.q_proj(x), self.num_heads), positions, self.rope_theta)
    k = apply_rope(split(self.k_proj(x), self.num_kv_heads), positions, self.rope_theta)
    return q, k, split(self.v_proj(x), self.num_kv_heads)

  def _output(self, out):
    return self.o_proj(out.reshape(*out.shape[:2], self.num_heads * self.head_dim))

  def __call__(self, x, kv, *, lengths=None, table: PageTable | None = None, decode: bool = False,
               implementation=None):
    """Prefill (decode=False) or one decode step (decode=True).

    Args:
      x: [batch, tokens, in_features].
      kv: cache.KVCache, sharded.ShardedKVCache or DenseKV holding the batch's earlier tokens;
        None at prefill stores nothing (training).
      lengths: i32[batch], how many of the tokens are real: the prompt lengths at prefill (the
        sequences must be empty), the tokens to append at decode (default all).
      table: decode over a KVCache: the PageTable routed for the lengths after this step, or a
        function (q, kv) -> PageTable that routes inside the step from this layer's queries
        [batch, tokens, num_heads, head_dim] and the cache holding the new tokens.
      decode: prefill or decode.
      implementation: decode_attention's implementation (paged caches only).

    Returns:
      (y [batch, tokens, in_features], the KV store holding the new tokens too).
    """
    batch, tokens = x.shape[:2]
    lengths = jnp.full((batch,), tokens, jnp.int32) if lengths is None else lengths
    if not decode:
      positions = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
      q, k, v = self._project(x, positions)
      if isinstance(kv, sharded.PAGED_CACHES):
        kv = sharded.cache_functions(kv).prefill(kv, k, v, lengths)
      elif kv is not None:
        kv = kv.write(k, v, lengths)
      return self._output(_dense_attention(q, k, v, positions, lengths)), kv
    positions = kv.lengths[:, None] + jnp.arange(tokens, dtype=jnp.int32)
    q, k, v = self._project(x, positions)
    if isinstance(kv, sharded.PAGED_CACHES):
      if table is None:
        raise ValueError("decode over a KVCache needs the routed table")
      kv = sharded.cache_functions(kv).append(kv, k, v, lengths)
      if callable(table):
        table = table(q, kv)
      out = attention_lib.decode_attention(q, kv, table, q_positions=positions,
                                           implementation=implementation)
    else:
      kv = kv.write(k, v, lengths)
      out = _dense_attention(q, kv.k, kv.v, positions, kv.lengths)
    return self._output(out), kv
