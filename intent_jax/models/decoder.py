"""A small Llama-style decoder in Flax NNX over intent-routed KV caches.

RMSNorm, rotary embeddings, SwiGLU, GQA; tied or untied embeddings. The model holds parameters; the
per-layer KV stores (a tuple of `cache.KVCache`, of `sharded.ShardedKVCache` split over a mesh, or
of `nnx.DenseKV` for the dense baseline) go in and come out of each call.
"""

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp

from intent_jax import cache as cache_lib
from intent_jax import sharded
from intent_jax.nnx import DenseKV, IntentAttention
from intent_jax.validation import require_positive_ints


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shape of a decoder (hashable)."""

  vocab_size: int = 256
  model_dim: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 256
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: str = "float32"  # Activations.
  param_dtype: str = "float32"

  def __post_init__(self):
    require_positive_ints(self, ("vocab_size", "model_dim", "num_layers", "num_heads",
                                 "num_kv_heads", "head_dim", "mlp_dim"))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")

  def num_params(self) -> int:
    """Parameter count."""
    attention = self.model_dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attention + 3 * self.model_dim * self.mlp_dim + 2 * self.model_dim
    embeddings = self.vocab_size * self.model_dim * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + embeddings + self.model_dim


CONFIGS = {
    "tiny": DecoderConfig(),
    # About 1.0B parameters (Llama-3.2-1B-like shape, smaller vocabulary).
    "1b": DecoderConfig(vocab_size=32000, model_dim=2048, num_layers=16, num_heads=32,
                        num_kv_heads=8, head_dim=64, mlp_dim=8192, rope_theta=500000.0,
                        dtype="bfloat16", param_dtype="bfloat16"),
}


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x))."""

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                     rngs=rngs)
    self.gate, self.up, self.down = linear(dim, hidden), linear(dim, hidden), linear(hidden, dim)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class DecoderBlock(nnx.Module):
  """Pre-norm attention and SwiGLU with residuals."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    norm = lambda: nnx.RMSNorm(c.model_dim, epsilon=c.norm_eps, dtype=c.dtype,
                               param_dtype=c.param_dtype, rngs=rngs)
    self.attention_norm, self.mlp_norm = norm(), norm()
    self.attention = IntentAttention(c.model_dim, c.num_heads, c.num_kv_heads, c.head_dim,
                                     rope_theta=c.rope_theta, dtype=c.dtype,
                                     param_dtype=c.param_dtype, rngs=rngs)
    self.mlp = SwiGLU(c.model_dim, c.mlp_dim, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)

  def __call__(self, x, kv, **attention_args):
    attended, kv = self.attention(self.attention_norm(x), kv, **attention_args)
    x = x + attended
    return x + self.mlp(self.mlp_norm(x)), kv


class Decoder(nnx.Module):
  """tokens i32[batch, tokens] -> logits f32[batch, tokens, vocab_size]."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config
    self.embed = nnx.Embed(c.vocab_size, c.model_dim, dtype=c.dtype, param_dtype=c.param_dtype,
                           rngs=rngs)
    self.blocks = nnx.List([DecoderBlock(c, rngs=rngs) for _ in range(c.num_layers)])
    self.norm = nnx.RMSNorm(c.model_dim, epsilon=c.norm_eps, dtype=c.dtype,
                            param_dtype=c.param_dtype, rngs=rngs)
    self.lm_head = None if c.tie_embeddings else nnx.Linear(
        c.model_dim, c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
        rngs=rngs)

  def __call__(self, tokens, kvs: tuple | None, *, lengths=None, table=None,
               decode: bool = False, implementation=None):
    """Prefill (decode=False) or one decode step; see IntentAttention for the arguments.

    kvs: one KV store per layer, or None for a forward pass that stores nothing (training).
    table: a PageTable for every layer, or a function (layer, q, kv) -> PageTable that routes
    each layer inside the step.

    Returns (logits f32[batch, tokens, vocab], the per-layer KV stores).
    """
    if kvs is None:
      if decode:
        raise ValueError("decode needs the KV stores (kvs=None is for prefill)")
      kvs = (None,) * self.config.num_layers
    if len(kvs) != self.config.num_layers:
      raise ValueError(
          f"kvs has {len(kvs)} stores but the model has {self.config.num_layers} layers")
    x = self.embed(tokens)
    stores = []
    for layer, (block, kv) in enumerate(zip(self.blocks, kvs)):
      layer_table = functools.partial(table, layer) if callable(table) else table
      x, kv = block(x, kv, lengths=lengths, table=layer_table, decode=decode,
                    implementation=implementation)
      stores.append(kv)
    x = self.norm(x)
    logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
    return logits.astype(jnp.float32), tuple(stores)


def create_caches(config: DecoderConfig, *, max_seqs: int, max_seq_len: int, page_size: int = 16,
                  pool_pages=None, dtype: str = "bfloat16", key_sketch: bool = False, mesh=None,
                  partition: sharded.Partition | None = None) -> tuple:
  """One paged KV cache per layer (see cache.CacheConfig for pool_pages, dtype, key_sketch).

  With a mesh, sharded.ShardedKVCaches split as `partition` says (pool_pages are then the
  totals over the page shards); without, single-device cache.KVCaches.
  """
  cache_config = cache_lib.CacheConfig(
      num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, max_seqs=max_seqs,
      max_seq_len=max_seq_len, page_size=page_size, pool_pages=pool_pages, dtype=dtype,
      key_sketch=key_sketch)
  if mesh is None:
    if partition is not None:
      raise ValueError("partition needs a mesh")
    return tuple(cache_lib.create(cache_config) for _ in range(config.num_layers))
  partition = sharded.Partition() if partition is None else partition
  return tuple(sharded.create(cache_config, mesh, partition) for _ in range(config.num_layers))


def create_dense_kvs(config: DecoderConfig, *, batch: int, max_seq_len: int,
                     dtype: str = "bfloat16") -> tuple[DenseKV, ...]:
  """One contiguous KV store per layer: the dense-attention baseline."""
  return tuple(DenseKV.create(batch, max_seq_len, config.num_kv_heads, config.head_dim, dtype)
               for _ in range(config.num_layers))

