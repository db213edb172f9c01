"""Scores from the query, for when the runtime does not know which block matters.

* `cosine_scores`: cosine similarity of the query to each block's mean key (a baseline; the
  scores go to `route(..., scores=...)`).
* `page_upper_bounds`: from the cache's per-page key bounds, an upper bound of every logit a page
  can give (the Quest bound), per kv head.
* `page_scores`: those bounds combined over kv heads into one score per page, what
  `route(..., query=...)` ranks ATTEND pages by.
* `top_channel_page_logits`: an estimate instead of a bound, each page's largest logit over the
  channels where the query is largest (combined over heads by `head_relative_scores`).
* `sketch_page_logits`: that estimate read from the cache's INT4 channel-major key sketch
  (`CacheConfig(key_sketch=True)`), which stores those channels contiguously: r of head_dim
  channels cost about r / head_dim of the sketch's bytes.
"""

import importlib

import jax
import jax.numpy as jnp

from intent_jax import cache as cache_lib
from intent_jax import dispatch
from intent_jax import quant
from intent_jax.layout import BlockLayout, token_block_ids


def block_mean_keys(k: jax.Array, layout: BlockLayout, seq_lens: jax.Array) -> jax.Array:
  """f32[batch, max_blocks, num_kv_heads, head_dim]: mean key of each block's tokens.

  Only tokens below each sequence's length count; a block with no such token gets zeros.
  """
  batch, seq, num_kv_heads, head_dim = k.shape
  n = layout.max_blocks
  block_of_token = token_block_ids(layout, seq)
  block_of_token = jnp.where(jnp.arange(seq) < seq_lens[:, None], block_of_token, n)

  def one_sequence(keys, ids):
    sums = jax.ops.segment_sum(keys.astype(jnp.float32), ids, num_segments=n + 1)[:n]
    counts = jax.ops.segment_sum(jnp.ones(seq, jnp.float32), ids, num_segments=n + 1)[:n]
    return sums / jnp.maximum(counts, 1.0)[:, None, None]

  return jax.vmap(one_sequence)(k, block_of_token)


def cosine_scores(q: jax.Array, k: jax.Array, layout: BlockLayout,
                  seq_lens: jax.Array) -> jax.Array:
  """f32[batch, max_blocks] in [0, 1]: (1 + cos(query, block mean key)) / 2, mean over kv heads.

  The query of a kv head is the mean of its group's query heads over the q_len tokens.
  Padding blocks and blocks with no tokens yet score 0.

  Args:
    q: [batch, q_len, num_q_heads, head_dim].
    k: [batch, seq, num_kv_heads, head_dim].
    layout: BlockLayout with `batch` rows.
    seq_lens: i32[batch].
  """
  return block_cosine_scores(q, block_mean_keys(k, layout, seq_lens), layout, seq_lens)


def block_cosine_scores(q: jax.Array, means: jax.Array, layout: BlockLayout,
                        seq_lens: jax.Array) -> jax.Array:
  """`cosine_scores` from precomputed block mean keys f32[batch, max_blocks, kv_heads, head_dim]
  (`block_mean_keys`), so that a decode loop summarizes the blocks once."""
  batch, q_len, num_q_heads, head_dim = q.shape
  num_kv_heads = means.shape[2]
  group_query = q.astype(jnp.float32).reshape(batch, q_len, num_kv_heads, -1, head_dim)
  group_query = group_query.mean(axis=(1, 3))  # [batch, num_kv_heads, head_dim]
  dots = jnp.einsum("bhd,bnhd->bnh", group_query, means, precision=jax.lax.Precision.HIGHEST)
  norms = jnp.linalg.norm(group_query, axis=-1)[:, None, :] * jnp.linalg.norm(means, axis=-1)
  cosine = jnp.where(norms > 0, dots / jnp.where(norms > 0, norms, 1.0), -1.0)
  scores = (1.0 + cosine.mean(axis=-1)) / 2.0
  return jnp.where(layout.valid & (layout.starts < seq_lens[:, None]), scores, 0.0)


def check_query(q: jax.Array, config: cache_lib.CacheConfig):
  """Raises ValueError unless q is a float [max_seqs, q_len, heads, head_dim] query for a cache
  of this config (heads a multiple of its kv heads)."""
  c = config
  if (q.ndim != 4 or not jnp.issubdtype(q.dtype, jnp.floating) or q.shape[0] != c.max_seqs or
      q.shape[2] % c.num_kv_heads or q.shape[3] != c.head_dim):
    raise ValueError(
        f"q must be a float array [batch={c.max_seqs}, q_len, a multiple of {c.num_kv_heads}"
        f" heads, head_dim={c.head_dim}] for this cache, got {q.dtype}{list(q.shape)}")


# Implementations of the page bounds and of the sketch logits, tried in order (the first that
# does not raise NotImplementedError) when `implementation` is None; "reference" is the jax.numpy
# version and takes every input.
DEFAULT_ORDER = {"gpu": ("pallas_gpu", "reference"), "tpu": ("pallas_tpu", "reference")}
IMPLEMENTATIONS = ("reference", "pallas_gpu", "pallas_tpu")


def page_upper_bounds(q: jax.Array, cache: cache_lib.KVCache, *, scale=None,
                      implementation: str | None = None) -> jax.Array:
  """f32[batch, max_pages_per_seq, num_kv_heads]: for each logical page and kv head, a bound no
  logit of the page's stored keys exceeds, for any query head of the group and query token.

  Per channel, max(q * key_max, q * key_min) bounds q * k for every key of the page, so
  scale * sum over channels of it bounds the logit: q+ . key_max + q- . key_min with q+ and q-
  the positive and negative parts of q; the maximum is taken over the group's heads and q_len.
  Unmapped pages give -inf.

  Args:
    q: [batch, q_len, num_q_heads, head_dim], batch = the cache's max_seqs.
    cache: the paged cache (its key bounds).
    scale: logit scale; default 1 / sqrt(head_dim).
    implementation: one of IMPLEMENTATIONS; default the platform's kernel where it takes
      the input, else "reference". The kernels (pallas_kernels/*/page_upper_bounds.py) must
      equal "reference".
  """
  if not isinstance(cache, cache_lib.KVCache):
    raise TypeError(f"cache must be a cache.KVCache, got {type(cache).__name__}")
  check_query(q, cache.config)
  return _first_supported(implementation, "page_upper_bounds", reference_page_upper_bounds,
                          lambda fn: fn(q, cache, scale=scale))


def _first_supported(implementation, function: str, reference, call):
  """call(fn) with `implementation`'s version of `function`, or with the first version of the
  platform's default order that takes the inputs. A kernel is `function` in the module
  pallas_kernels.<platform>.<function> (imported here: kernels build on this package);
  NotImplementedError off its platform."""
  if implementation is None:
    names = dispatch.platform_order(DEFAULT_ORDER)
  elif implementation in IMPLEMENTATIONS:
    names = (implementation,)
  else:
    raise ValueError(f"implementation={implementation!r} must be None or one of {IMPLEMENTATIONS}")

  def attempt(name):
    if name == "reference":
      return call(reference)
    platform = dispatch.require_platform(name)
    module = importlib.import_module(f"pallas_kernels.{platform}.{function}")
    return call(getattr(module, function))

  return dispatch.first_supported(names, attempt)


def reference_page_upper_bounds(q: jax.Array, cache: cache_lib.KVCache, *,
                                scale=None) -> jax.Array:
  """`page_upper_bounds` in jax.numpy: the answer the kernels must give."""
  c = cache.config
  batch, q_len, num_q_heads, head_dim = q.shape
  num_kv_heads = c.num_kv_heads
  scale = head_dim**-0.5 if scale is None else scale
  lower, upper = cache_lib.page_key_bounds(cache)
  mapped = jnp.isfinite(upper[..., 0])  # [batch, pages, kv_heads]
  lower, upper = jnp.where(mapped[..., None], lower, 0.0), jnp.where(mapped[..., None], upper, 0.0)
  grouped = q.astype(jnp.float32).reshape(batch, q_len, num_kv_heads, -1, head_dim)
  highest = jax.lax.Precision.HIGHEST
  bound = (jnp.einsum("bthgd,bphd->bphgt", jnp.maximum(grouped, 0.0), upper, precision=highest) +
           jnp.einsum("bthgd,bphd->bphgt", jnp.minimum(grouped, 0.0), lower, precision=highest))
  bound = jnp.max(bound, axis=(-2, -1)) * scale
  return jnp.where(mapped, bound, -jnp.inf)


def page_max_logits(q: jax.Array, cache: cache_lib.KVCache, *, scale=None) -> jax.Array:
  """f32[batch, max_pages_per_seq, num_kv_heads]: the largest logit of each page's stored keys
  (tokens below the sequence's length), over the group's heads and q_len; -inf for unmapped
  pages. What `page_upper_bounds` bounds; computing it reads every key (an oracle for analysis).
  """
  return _page_max_logits(q, cache, scale=scale, channels=None)


def top_channel_page_logits(q: jax.Array, cache: cache_lib.KVCache, *, channels: int,
                            scale=None) -> jax.Array:
  """f32[batch, max_pages_per_seq, num_kv_heads]: `page_max_logits` with each logit taken over
  `channels` channels only: per sequence and kv head, those where the group's |q| (summed over
  its query heads and tokens) is largest (`top_query_channels`). An estimate, not a bound
  (SparQ's selection step): a page can score above or below its true largest logit. It reads
  `channels / head_dim` of every key; here in jax.numpy over the dequantized cache (see
  `sketch_page_logits` for the version that reads only those channels)."""
  _check_channels(channels, cache.config.head_dim)
  return _page_max_logits(q, cache, scale=scale, channels=channels)


def sketch_page_logits(q: jax.Array, cache: cache_lib.KVCache, *, channels: int, scale=None,
                       implementation: str | None = None) -> jax.Array:
  """f32[batch, max_pages_per_seq, num_kv_heads]: `top_channel_page_logits` with the keys read
  from the cache's key sketch (INT4, one scale per channel of a page) instead of the pages:
  per page and kv head, the largest logit over the page's stored tokens, the group's query heads
  and tokens, taken over the `channels` channels `top_query_channels` picks; -inf for pages with
  no stored token. An estimate for ranking pages, not a bound.

  Args:
    q: [batch, q_len, num_q_heads, head_dim], batch = the cache's max_seqs.
    cache: a KVCache made with CacheConfig(key_sketch=True).
    channels: channels read, in [1, head_dim].
    scale: logit scale; default 1 / sqrt(head_dim).
    implementation: one of IMPLEMENTATIONS; default the platform's kernel where it takes
      the input, else "reference" (pallas_kernels/*/sketch_page_logits.py must equal it).
  """
  if not isinstance(cache, cache_lib.KVCache):
    raise TypeError(f"cache must be a cache.KVCache, got {type(cache).__name__}")
  check_query(q, cache.config)
  check_sketch_scoring(cache.key_sketch, channels, cache.config.head_dim)
  return _first_supported(implementation, "sketch_page_logits", reference_sketch_page_logits,
                          lambda fn: fn(q, cache, channels=channels, scale=scale))


def reference_sketch_page_logits(q: jax.Array, cache: cache_lib.KVCache, *, channels: int,
                                 scale=None) -> jax.Array:
  """`sketch_page_logits` in jax.numpy: the answer the kernels must give. Reads only the chosen
  channels of the sketch (a gather)."""
  c = cache.config
  batch, q_len, _, head_dim = q.shape
  scale = head_dim**-0.5 if scale is None else scale
  grouped = q.astype(jnp.float32).reshape(batch, q_len, c.num_kv_heads, -1, head_dim)
  chosen = top_query_channels(grouped, channels)  # [batch, kv_heads, r]
  q_chosen = jnp.take_along_axis(grouped, chosen[:, None, :, None, :], axis=-1)
  heads, seqs = jnp.arange(c.num_kv_heads)[None, :, None], jnp.arange(batch)[:, None, None]
  sketch = cache.key_sketch
  keys = quant.dequantize(quant.Quantized(  # [batch, kv_heads, r, pages, page_size]
      sketch.codes[heads, chosen, seqs], sketch.scale[heads, chosen, seqs][..., None],
      cache_lib.SKETCH_PRECISION))
  logits = jnp.einsum("bthgr,bhrpk->bpkhgt", q_chosen, keys, precision=jax.lax.Precision.HIGHEST)
  logits = jnp.max(logits, axis=(-2, -1))  # [batch, pages, page_size, kv_heads]
  positions = jnp.arange(c.max_pages_per_seq * c.page_size).reshape(c.max_pages_per_seq, -1)
  stored = positions < cache.lengths[:, None, None]
  return jnp.max(jnp.where(stored[..., None], logits, -jnp.inf), axis=2) * scale


def top_query_channels(grouped_q: jax.Array, channels: int) -> jax.Array:
  """i32[batch, kv_heads, channels]: per sequence and kv head, the channels where the group's
  |q| summed over its query heads and tokens is largest, largest first (ties: the lower channel).

  Args:
    grouped_q: [batch, q_len, num_kv_heads, group, head_dim].
  """
  weight = jnp.sum(jnp.abs(grouped_q.astype(jnp.float32)), axis=(1, 3))
  return jax.lax.top_k(weight, channels)[1].astype(jnp.int32)


def _check_channels(channels, head_dim: int) -> None:
  if not isinstance(channels, int) or not 1 <= channels <= head_dim:
    raise ValueError(f"channels={channels!r} must be an int in [1, head_dim={head_dim}]")


def check_sketch_scoring(key_sketch, channels, head_dim: int) -> None:
  """Raises ValueError unless a cache has a key sketch and `channels` is in [1, head_dim]."""
  if key_sketch is None:
    raise ValueError("scoring from the key sketch needs a cache made with"
                     " CacheConfig(key_sketch=True)")
  _check_channels(channels, head_dim)


def _page_max_logits(q, cache, *, scale, channels):
  if not isinstance(cache, cache_lib.KVCache):
    raise TypeError(f"cache must be a cache.KVCache, got {type(cache).__name__}")
  c = cache.config
  check_query(q, c)
  batch, q_len, _, head_dim = q.shape
  scale = head_dim**-0.5 if scale is None else scale
  k, _ = cache_lib.dequantized_kv(cache)
  grouped = q.astype(jnp.float32).reshape(batch, q_len, c.num_kv_heads, -1, head_dim)
  if channels is not None:
    chosen = jnp.sum(jax.nn.one_hot(top_query_channels(grouped, channels), head_dim), axis=-2)
    grouped = jnp.where(chosen[:, None, :, None, :] > 0, grouped, 0.0)
  logits = jnp.einsum("bthgd,bshd->bshgt", grouped, k, precision=jax.lax.Precision.HIGHEST)
  logits = jnp.max(logits, axis=(-2, -1)) * scale
  stored = jnp.arange(k.shape[1]) < cache.lengths[:, None]
  logits = jnp.where(stored[..., None], logits, -jnp.inf)
  return logits.reshape(batch, c.max_pages_per_seq, c.page_size, c.num_kv_heads).max(axis=2)


def page_scores(q: jax.Array, cache: cache_lib.KVCache, *, scale=None, exact: bool = False,
                channels: int | None = None, implementation: str | None = None) -> jax.Array:
  """f32[batch, max_pages_per_seq]: how much a page can matter to the query, for choosing pages.

  Per kv head, the page's logit bound minus the head's largest bound over the sequence's pages
  (<= 0; 0 for the page that may hold the head's largest logit), so that heads with different
  logit scales compare; the score is the maximum over kv heads: a page counts if any head may
  want it. Unmapped pages give -inf. exact=True ranks by `page_max_logits` instead of the bounds
  (an oracle: it reads every key); `channels` by `sketch_page_logits` over that many channels.
  `implementation` picks the bound's or the sketch's kernel.
  """
  if exact and channels is not None:
    raise ValueError("page_scores takes exact=True or channels, not both")
  if exact:
    return head_relative_scores(page_max_logits(q, cache, scale=scale))
  if channels is not None:
    return head_relative_scores(sketch_page_logits(q, cache, channels=channels, scale=scale,
                                                   implementation=implementation))
  return head_relative_scores(page_upper_bounds(q, cache, scale=scale,
                                                implementation=implementation))


def head_relative_scores(bounds: jax.Array) -> jax.Array:
  """f32[batch, pages] from per-head page values f32[batch, pages, kv_heads] (-inf: no page):
  each head's value minus the head's best, maximum over heads (see `page_scores`)."""
  best = jnp.max(bounds, axis=1, keepdims=True)
  relative = jnp.where(jnp.isfinite(bounds), bounds - jnp.where(jnp.isfinite(best), best, 0.0),
                       -jnp.inf)
  return jnp.max(relative, axis=-1)
