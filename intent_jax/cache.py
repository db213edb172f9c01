"""Paged KV cache with mixed-precision storage: create, prefill, append, release, apply_precision.

Storage is one pool of pages per Precision. A pool holds, for every kv head, `num_pages` pages of
`page_size` tokens, so that one (kv head, page) is contiguous in memory:
  k, v:             [num_kv_heads, num_pages, page_size, head_dim] (INT4: head_dim // 2 bytes),
  k_scale:          f32[num_kv_heads, num_pages, head_dim], one per channel of a page (quantized),
  v_scale:          f32[num_kv_heads, num_pages, page_size], one per token (quantized),
  key_min, key_max: bf16[num_kv_heads, num_pages, head_dim], channel-wise bounds of the stored K,
                    rounded outward (min down, max up) so that they still hold every key.
The K/V split of scales is KIVI's: keys have outlier channels, so a scale per channel keeps them
from flattening every other channel; values are spread per token. The BF16 pool stores values in
the cache's `dtype` (bfloat16 by default, float32 where a test needs exact storage).

With `CacheConfig(key_sketch=True)` the cache also keeps a `KeySketch`: K again, in INT4 and
channel-major, indexed by sequence and logical page rather than by pool slot, so that reading a
few channels of every page of a sequence reads contiguous bytes (query-aware scoring,
`scoring.sketch_page_logits`). It is quantized from the keys as written (one scale per channel of
a page), rewritten for every page a write touches, and not changed by `apply_precision`.

Each sequence maps its logical pages (token t lives in page t // page_size) to a (pool, slot).
Free slots of a pool form a stack. New tokens are always written to BF16 pages; `apply_precision`
moves full pages to lower formats (downgrades only) and frees their old slots.

Functions are pure; the jitted ones take the cache donated: do not use a cache after passing it.
A write a pool cannot serve, or one past `max_seq_len`, is refused for its sequence: nothing is
written, the sequence keeps its length and its `overflow` flag is set. Called eagerly (outside
jit), `prefill` and `append` check first and raise ValueError naming the sequence instead.
"""

from collections.abc import Mapping
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import quant
from intent_jax.precision import NUM_PRECISIONS, SCALE_BYTES, Precision, page_bytes
from intent_jax.page_table import PageTable
from intent_jax.validation import is_int, is_traced, require_positive_ints

UNMAPPED = -1
K_SCALE_AXIS = -2  # K pages [..., page_size, head_dim]: reduce over tokens, a scale per channel.
V_SCALE_AXIS = -1  # V pages: reduce over channels, a scale per token.
SUMMARY_DTYPE = jnp.bfloat16  # Of key_min and key_max: half the bytes of float32, rounded outward.
SUMMARY_BYTES_PER_CHANNEL = 2 * jnp.dtype(SUMMARY_DTYPE).itemsize
_FULL_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """Static shape of a cache (hashable).

  Attributes:
    num_kv_heads, head_dim: attention shape; head_dim even (INT4 packs pairs).
    max_seqs: sequences the cache holds (the decode batch).
    max_seq_len: tokens one sequence may hold.
    page_size: tokens per page, a power of two in [16, 256].
    pool_pages: pages per pool, as a mapping {Precision: pages} or a tuple in Precision order.
      Default: a BF16 pool holding every page of every sequence and no quantized pools.
    dtype: storage dtype of the BF16 pool: "bfloat16", "float16" or "float32".
    key_sketch: also keep the INT4 channel-major copy of K (`KeySketch`) for query-aware page
      scoring: `key_sketch_bytes` more memory (+19% of a BF16 page at head_dim 128, page 16).
  """

  num_kv_heads: int
  head_dim: int
  max_seqs: int
  max_seq_len: int
  page_size: int = 16
  pool_pages: tuple[int, ...] | Mapping | None = None
  dtype: str = "bfloat16"
  key_sketch: bool = False

  def __post_init__(self):
    require_positive_ints(self, ("num_kv_heads", "head_dim", "max_seqs", "max_seq_len"))
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even (INT4 packs two values a byte)")
    ps = self.page_size
    if not is_int(ps) or not 16 <= ps <= 256 or ps & (ps - 1):
      raise ValueError(f"page_size={ps!r} must be a power of two in [16, 256]")
    pages = self.pool_pages
    if pages is None:
      pages = {Precision.BF16: self.max_seqs * self.max_pages_per_seq}
    if isinstance(pages, Mapping):
      unknown = [p for p in pages if not is_int(p) or p not in set(Precision)]
      if unknown:
        raise ValueError(f"pool_pages has keys {unknown} that are not Precisions")
      pages = tuple(pages.get(p, 0) for p in Precision)
    pages = tuple(pages)
    if len(pages) != NUM_PRECISIONS or not all(is_int(n) and n >= 0 for n in pages):
      raise ValueError(
          f"pool_pages={self.pool_pages!r} must give a page count >= 0 for each of"
          f" {[p.name for p in Precision]}")
    if pages[Precision.BF16] < 1:
      raise ValueError(
          "pool_pages must give the BF16 pool at least one page: new tokens land there")
    object.__setattr__(self, "pool_pages", tuple(int(n) for n in pages))
    dtype = jnp.dtype(self.dtype).name if self.dtype is not None else None
    if dtype not in _FULL_DTYPES:
      raise ValueError(f"dtype={self.dtype!r} must be one of {_FULL_DTYPES}")
    object.__setattr__(self, "dtype", dtype)
    if not isinstance(self.key_sketch, bool):
      raise TypeError(f"key_sketch must be a bool, got {self.key_sketch!r}")

  @property
  def max_pages_per_seq(self) -> int:
    return math.ceil(self.max_seq_len / self.page_size)

  def stored_page_bytes(self, precision: Precision) -> int:
    """Bytes one page of `precision` takes in memory (all kv heads: data, scales, key bounds)."""
    full_bytes = jnp.dtype(self.dtype).itemsize
    per_head = page_bytes(precision, self.page_size, self.head_dim, full_value_bytes=full_bytes)
    return self.num_kv_heads * (per_head + SUMMARY_BYTES_PER_CHANNEL * self.head_dim)

  @property
  def key_sketch_bytes(self) -> int:
    """Bytes of the key sketch (0 without one): per kv head, sequence and logical page, INT4
    codes of the page's keys and a float32 scale per channel."""
    if not self.key_sketch:
      return 0
    per_page = self.head_dim * (self.page_size // 2 + SCALE_BYTES)
    return self.num_kv_heads * self.max_seqs * self.max_pages_per_seq * per_page


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k", "v", "k_scale", "v_scale", "key_min", "key_max", "free_slots", "num_free"],
    meta_fields=["precision"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class Pool:
  """The pages of one precision. Scales are None for BF16. free_slots[:num_free] are free."""

  k: jax.Array
  v: jax.Array
  k_scale: jax.Array | None
  v_scale: jax.Array | None
  key_min: jax.Array
  key_max: jax.Array
  free_slots: jax.Array  # i32[num_pages], a stack: the top is free_slots[num_free - 1].
  num_free: jax.Array  # i32[]
  precision: Precision

  @property
  def num_pages(self) -> int:
    return self.free_slots.shape[0]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scale"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True, eq=False)
class KeySketch:
  """K of every sequence's logical pages in INT4, channel-major (see the module docstring).

  Attributes:
    codes: u8[num_kv_heads, head_dim, max_seqs, max_pages_per_seq, page_size // 2], the keys of
      a (head, channel, sequence, page) packed along the page's tokens (`quant.pack_int4`).
    scale: f32[num_kv_heads, head_dim, max_seqs, max_pages_per_seq], one per channel of a page:
      key = code * scale. Tokens not written read as 0.
  """

  codes: jax.Array
  scale: jax.Array


SKETCH_PRECISION = Precision.INT4


def empty_sketch(config: CacheConfig) -> KeySketch | None:
  """The key sketch of an empty cache (zeros), or None when `config` keeps none."""
  if not config.key_sketch:
    return None
  c = config
  shape = (c.num_kv_heads, c.head_dim, c.max_seqs, c.max_pages_per_seq)
  return KeySketch(codes=jnp.zeros(shape + (c.page_size // 2,), jnp.uint8),
                   scale=jnp.zeros(shape, jnp.float32))


def _sketch_pages(pages, stored):
  """(codes, scale) of `KeySketch` for K pages [H, *S, page_size, head_dim] whose tokens
  `stored` (bool[*S, page_size]) hold keys: [H, head_dim, *S, page_size // 2] and
  [H, head_dim, *S]."""
  keys = jnp.where(stored[None, ..., None], pages.astype(jnp.float32), 0.0)
  keys = jnp.moveaxis(keys, -1, 1)  # [H, D, *S, page_size]
  quantized = quant.quantize(keys, SKETCH_PRECISION, -1)
  return quantized.data, quantized.scale[..., 0]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["pools", "page_pool", "page_slot", "lengths", "overflow", "key_sketch"],
    meta_fields=["config"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class KVCache:
  """A paged KV cache.

  Attributes:
    pools: one Pool per Precision, in Precision order.
    page_pool: i32[max_seqs, max_pages_per_seq], Precision of the pool holding each logical
      page, UNMAPPED (-1) if none.
    page_slot: i32[max_seqs, max_pages_per_seq], the slot in that pool, UNMAPPED if none.
    lengths: i32[max_seqs], tokens each sequence holds.
    overflow: bool[max_seqs], a write for the sequence was refused (out of pages or too long).
    key_sketch: KeySketch, or None unless config.key_sketch.
    config: static CacheConfig.
  """

  pools: tuple[Pool, ...]
  page_pool: jax.Array
  page_slot: jax.Array
  lengths: jax.Array
  overflow: jax.Array
  key_sketch: KeySketch | None
  config: CacheConfig


def empty_pool(config: CacheConfig, precision: Precision) -> Pool:
  """The pool of `precision` of an empty cache of `config`: every slot free."""
  n, h, ps, d = config.pool_pages[precision], config.num_kv_heads, config.page_size, config.head_dim
  stored_d = d // 2 if precision == Precision.INT4 else d
  dtype = config.dtype if precision == Precision.BF16 else quant.STORAGE_DTYPE[precision]
  data = lambda: jnp.zeros((h, n, ps, stored_d), dtype)
  quantized = precision != Precision.BF16
  return Pool(
      k=data(),
      v=data(),
      k_scale=jnp.zeros((h, n, d), jnp.float32) if quantized else None,
      v_scale=jnp.zeros((h, n, ps), jnp.float32) if quantized else None,
      key_min=jnp.full((h, n, d), jnp.inf, SUMMARY_DTYPE),
      key_max=jnp.full((h, n, d), -jnp.inf, SUMMARY_DTYPE),
      free_slots=jnp.arange(n - 1, -1, -1, dtype=jnp.int32),  # Slot 0 on top.
      num_free=jnp.asarray(n, jnp.int32),
      precision=precision,
  )


def create(config: CacheConfig) -> KVCache:
  """An empty cache: every page free, every sequence empty."""
  if not isinstance(config, CacheConfig):
    raise TypeError(f"config must be a CacheConfig, got {type(config).__name__}")
  unmapped = lambda: jnp.full((config.max_seqs, config.max_pages_per_seq), UNMAPPED, jnp.int32)
  return KVCache(  # Every field its own buffer: the jitted functions donate them.
      pools=tuple(empty_pool(config, p) for p in Precision),
      page_pool=unmapped(),
      page_slot=unmapped(),
      lengths=jnp.zeros(config.max_seqs, jnp.int32),
      overflow=jnp.zeros(config.max_seqs, jnp.bool_),
      key_sketch=empty_sketch(config),
      config=config,
  )


# ---------------------------------------------------------------------------------------------
# Slot stacks.


def _pop_plan(num_free, demand):
  """Which requests a pool serves, in order, until the first it cannot; and slots taken before.

  Returns (granted bool[R], taken_before i32[R]); request r's k-th slot is stack entry
  num_free - 1 - taken_before[r] - k.
  """
  total = jnp.cumsum(demand)
  granted = (demand == 0) | (total <= num_free)
  return granted, total - demand


def _push(pool: Pool, slots, mask) -> Pool:
  """Returns slots[mask] to the pool's free stack."""
  if pool.num_pages == 0:
    return pool
  slots, mask = slots.reshape(-1), mask.reshape(-1)
  position = jnp.where(mask, pool.num_free + jnp.cumsum(mask) - 1, pool.num_pages)
  return dataclasses.replace(
      pool,
      free_slots=pool.free_slots.at[position].set(slots, mode="drop"),
      num_free=pool.num_free + jnp.sum(mask, dtype=jnp.int32))


# ---------------------------------------------------------------------------------------------
# Reading pages.


def _dequantized_pages(pool: Pool, slots):
  """f32 K and V of pool pages `slots` (any shape S): [num_kv_heads, *S, page_size, head_dim]."""
  k, v = pool.k[:, slots], pool.v[:, slots]
  if pool.precision == Precision.BF16:
    return k.astype(jnp.float32), v.astype(jnp.float32)
  k_scale = jnp.expand_dims(pool.k_scale[:, slots], K_SCALE_AXIS)
  v_scale = jnp.expand_dims(pool.v_scale[:, slots], V_SCALE_AXIS)
  return (quant.dequantize(quant.Quantized(k, k_scale, pool.precision)),
          quant.dequantize(quant.Quantized(v, v_scale, pool.precision)))


def read_pages(cache: KVCache, pools, slots):
  """f32 K and V of the pages at (pools, slots), each of shape S: [*S, page_size, kv_heads, dim].

  Entries whose pool is UNMAPPED read as zeros.
  """
  cfg = cache.config
  shape = pools.shape + (cfg.page_size, cfg.num_kv_heads, cfg.head_dim)
  k_out, v_out = jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)
  for pool in cache.pools:
    if pool.num_pages == 0:
      continue
    here = pools == pool.precision
    k, v = _dequantized_pages(pool, jnp.where(here, slots, 0))
    here = here[..., None, None, None]
    k_out = jnp.where(here, jnp.moveaxis(k, 0, -2), k_out)
    v_out = jnp.where(here, jnp.moveaxis(v, 0, -2), v_out)
  return k_out, v_out


def stored_precisions(cache: KVCache) -> tuple[Precision, ...]:
  """The formats the cache has pools of (pools with at least one page), most precise first."""
  return tuple(pool.precision for pool in cache.pools if pool.num_pages > 0)


def lookup(cache: KVCache, table: PageTable):
  """(pools, slots), i32[batch, max_pages]: where each table entry is stored; UNMAPPED past
  num_pages or where the cache holds no such page."""
  in_table = jnp.arange(table.max_pages) < table.num_pages[:, None]
  pages = jnp.clip(table.page_ids, 0, cache.config.max_pages_per_seq - 1)
  pools = jnp.take_along_axis(cache.page_pool, pages, axis=1)
  slots = jnp.take_along_axis(cache.page_slot, pages, axis=1)
  mapped = in_table & (table.page_ids < cache.config.max_pages_per_seq) & (pools != UNMAPPED)
  return jnp.where(mapped, pools, UNMAPPED), jnp.where(mapped, slots, UNMAPPED)


def _flat_pages(x):
  """[batch, pages, page_size, ...] -> [batch, pages * page_size, ...]."""
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def read_table_pages(cache: KVCache, table: PageTable):
  """f32 K and V of the table's entries: [batch, max_pages * page_size, kv_heads, head_dim]."""
  k, v = read_pages(cache, *lookup(cache, table))
  return _flat_pages(k), _flat_pages(v)


def page_key_bounds(cache: KVCache):
  """(key_min, key_max), f32[max_seqs, max_pages_per_seq, num_kv_heads, head_dim]: channel-wise
  bounds of the keys stored in each sequence's logical pages (as stored: dequantized values for
  quantized pages); unmapped pages give (+inf, -inf)."""
  c = cache.config
  shape = (c.max_seqs, c.max_pages_per_seq, c.num_kv_heads, c.head_dim)
  lower, upper = jnp.full(shape, jnp.inf, jnp.float32), jnp.full(shape, -jnp.inf, jnp.float32)
  for precision, pool in zip(Precision, cache.pools):
    if pool.num_pages == 0:
      continue
    here = (cache.page_pool == int(precision))[..., None, None]
    slots = jnp.clip(cache.page_slot, 0, pool.num_pages - 1)
    lower = jnp.where(here, jnp.moveaxis(pool.key_min[:, slots], 0, 2).astype(jnp.float32), lower)
    upper = jnp.where(here, jnp.moveaxis(pool.key_max[:, slots], 0, 2).astype(jnp.float32), upper)
  return lower, upper


def dequantized_kv(cache: KVCache):
  """Contiguous f32 K and V of every sequence: [max_seqs, max_pages_per_seq * page_size,
  num_kv_heads, head_dim], each page in its stored precision; unmapped pages read as zeros."""
  k, v = read_pages(cache, cache.page_pool, cache.page_slot)
  return _flat_pages(k), _flat_pages(v)


# ---------------------------------------------------------------------------------------------
# Writing tokens.


def plan_write(cache: KVCache, counts):
  """Which sequences a write of `counts` new tokens can serve.

  Returns (fits bool[B]: within max_seq_len, granted bool[B]: pages available, demand i32[B]:
  new pages needed, taken_before i32[B]: pages granted to earlier sequences).
  """
  ps = cache.config.page_size
  new_lengths = cache.lengths + counts
  fits = new_lengths <= cache.config.max_seq_len
  first_new_page = (cache.lengths + ps - 1) // ps
  demand = jnp.where(fits, (new_lengths + ps - 1) // ps - first_new_page, 0)
  granted, taken_before = _pop_plan(cache.pools[Precision.BF16].num_free, demand)
  return fits, granted, demand, taken_before


def _key_bounds(pages, stored):
  """Channel-wise min and max over the `stored` (bool[B, K, ps]) tokens of pages
  [H, B, K, ps, D], as stored (`stored_bounds`): [H, B, K, D] each."""
  stored = stored[None, ..., None]
  values = pages.astype(jnp.float32)
  return stored_bounds(jnp.min(jnp.where(stored, values, jnp.inf), axis=-2),
                       jnp.max(jnp.where(stored, values, -jnp.inf), axis=-2))


def stored_bounds(lower, upper):
  """float32 key bounds as the cache stores them, SUMMARY_DTYPE: `lower` rounded toward -inf and
  `upper` toward +inf, so the stored box still holds every key (exact: on the bits)."""

  def toward(x, up: bool):
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    inexact = (bits & 0xFFFF) != 0
    negative = (bits >> 31) == 1
    # Dropping the low 16 bits rounds toward zero: step away from zero where that is the way.
    high = (bits >> 16) + (inexact & (negative != up)).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(high.astype(jnp.uint16), SUMMARY_DTYPE)

  return toward(lower, up=False), toward(upper, up=True)


def write_tokens(cache: KVCache, k, v, counts, agree=None):
  """The write behind `prefill` and `append`, unjitted, for composing into other jitted code.

  Args:
    cache: the cache; k, v: [max_seqs, tokens, num_kv_heads, head_dim]; counts: i32[max_seqs].
    agree: optional function bool[max_seqs] -> bool[max_seqs] that may refuse more of the
      sequences this cache can serve (a sharded cache refuses a sequence any shard refuses).

  Returns:
    (the new cache, served bool[max_seqs]); refused sequences keep their length and are flagged.
  """
  cfg = cache.config
  ps, max_pages = cfg.page_size, cfg.max_pages_per_seq
  pool = cache.pools[Precision.BF16]
  batch, new_tokens = k.shape[:2]
  counts = jnp.clip(counts, 0, new_tokens)
  fits, granted, demand, _ = plan_write(cache, counts)
  served = fits & granted
  if agree is not None:
    served = agree(served)
  counts = jnp.where(served, counts, 0)
  demand = jnp.where(served, demand, 0)
  taken_before = jnp.cumsum(demand) - demand  # Stack entries taken by earlier served sequences.
  rows = jnp.arange(batch)[:, None]

  # Map the new pages: sequence b's k-th new page pops stack entry num_free - 1 - before - k.
  most_new = math.ceil(new_tokens / ps) + 1
  nth = jnp.arange(most_new)
  new_page = (cache.lengths[:, None] + ps - 1) // ps + nth
  is_new = nth < demand[:, None]
  stack_index = jnp.clip(pool.num_free - 1 - taken_before[:, None] - nth, 0, pool.num_pages - 1)
  target = jnp.where(is_new, new_page, max_pages)  # Out of range: dropped.
  page_pool = cache.page_pool.at[rows, target].set(int(Precision.BF16), mode="drop")
  page_slot = cache.page_slot.at[rows, target].set(pool.free_slots[stack_index], mode="drop")

  # Write the tokens.
  positions = cache.lengths[:, None] + jnp.arange(new_tokens)
  writing = jnp.arange(new_tokens) < counts[:, None]
  slot = page_slot[rows, jnp.clip(positions // ps, 0, max_pages - 1)]
  slot = jnp.where(writing, slot, pool.num_pages)  # Out of range: dropped.
  offset = positions % ps
  store = lambda pages, x: pages.at[:, slot, offset].set(
      jnp.moveaxis(x, 2, 0).astype(pages.dtype), mode="drop")
  pool_k, pool_v = store(pool.k, k), store(pool.v, v)

  # Key bounds of every page the write touched, over all of its stored tokens.
  lengths = cache.lengths + counts
  first_touched = cache.lengths // ps
  touched_page = first_touched[:, None] + nth
  touched = (counts[:, None] > 0) & (touched_page <= (lengths[:, None] - 1) // ps)
  touched_slot = page_slot[rows, jnp.clip(touched_page, 0, max_pages - 1)]
  touched_k = pool_k[:, touched_slot]
  touched_positions = touched_page[..., None] * ps + jnp.arange(ps)
  stored = touched_positions < lengths[:, None, None]  # [B, K, ps]
  key_min, key_max = _key_bounds(touched_k, stored)
  sketch = cache.key_sketch
  if sketch is not None:
    codes, scale = _sketch_pages(touched_k, stored)
    page = jnp.where(touched, touched_page, max_pages)  # Out of range: dropped.
    sketch = KeySketch(codes=sketch.codes.at[:, :, rows, page].set(codes, mode="drop"),
                       scale=sketch.scale.at[:, :, rows, page].set(scale, mode="drop"))
  touched_slot = jnp.where(touched, touched_slot, pool.num_pages)
  pool = dataclasses.replace(
      pool, k=pool_k, v=pool_v,
      key_min=pool.key_min.at[:, touched_slot].set(key_min, mode="drop"),
      key_max=pool.key_max.at[:, touched_slot].set(key_max, mode="drop"),
      num_free=pool.num_free - jnp.sum(demand, dtype=jnp.int32))
  pools = tuple(pool if p == Precision.BF16 else cache.pools[p] for p in Precision)
  cache = dataclasses.replace(cache, pools=pools, page_pool=page_pool, page_slot=page_slot,
                              lengths=lengths, overflow=cache.overflow | ~served,
                              key_sketch=sketch)
  return cache, served


@functools.partial(jax.jit, donate_argnums=(0,))
def _write(cache: KVCache, k, v, counts) -> KVCache:
  return write_tokens(cache, k, v, counts)[0]


def check_write_arrays(cfg: CacheConfig, k, v, counts, name: str) -> None:
  """Raises unless k, v are float [max_seqs, tokens, num_kv_heads, head_dim] and `counts`
  (called `name`) an integer [max_seqs] array; eagerly, also unless counts are in [0, tokens]."""
  for arg, x in (("k", k), ("v", v)):
    expected = (cfg.max_seqs, None, cfg.num_kv_heads, cfg.head_dim)
    if (not hasattr(x, "shape") or x.ndim != 4 or x.shape[0] != cfg.max_seqs or
        x.shape[2:] != expected[2:]):
      raise ValueError(
          f"{arg} must have shape [max_seqs={cfg.max_seqs}, tokens, num_kv_heads="
          f"{cfg.num_kv_heads}, head_dim={cfg.head_dim}], got {list(getattr(x, 'shape', []))}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{arg} must be a float array, got {x.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"k{list(k.shape)} and v{list(v.shape)} must have the same shape")
  if counts.shape != (cfg.max_seqs,) or not jnp.issubdtype(counts.dtype, jnp.integer):
    raise ValueError(
        f"{name} must be an integer array of shape ({cfg.max_seqs},), got {counts.dtype}"
        f"{list(counts.shape)}")
  if is_traced(counts):
    return
  counts_host = np.asarray(counts)
  bad = np.nonzero((counts_host < 0) | (counts_host > k.shape[1]))[0]
  if bad.size:
    raise ValueError(
        f"{name}[{bad[0]}]={counts_host[bad[0]]} must be in [0, {k.shape[1]}] (tokens given)")


def _check_write(cache: KVCache, k, v, counts, name: str) -> None:
  """Validates a write's arguments; eagerly, also that every sequence can be served."""
  if not isinstance(cache, KVCache):
    raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
  cfg = cache.config
  check_write_arrays(cfg, k, v, counts, name)
  if is_traced(cache, counts):
    return  # Inside jit: refused writes set `overflow` instead.
  counts_host = np.asarray(counts)
  fits, granted, demand, taken_before = (np.asarray(x) for x in plan_write(cache, counts))
  lengths = np.asarray(cache.lengths)
  for b in range(cfg.max_seqs):
    if not fits[b]:
      raise ValueError(
          f"sequence {b}: writing {counts_host[b]} tokens at length {lengths[b]} would reach"
          f" {lengths[b] + counts_host[b]}, past max_seq_len={cfg.max_seq_len}")
    if not granted[b]:
      free = int(cache.pools[Precision.BF16].num_free) - int(taken_before[b])
      raise ValueError(
          f"sequence {b}: writing {counts_host[b]} tokens at length {lengths[b]} needs"
          f" {demand[b]} new pages, but the BF16 pool has {max(free, 0)} free after the"
          " sequences before it")


def prefill(cache: KVCache, k, v, lengths) -> KVCache:
  """Writes the first lengths[b] tokens of k[b], v[b] after what sequence b holds.

  Args:
    cache: the cache (donated).
    k, v: [max_seqs, tokens, num_kv_heads, head_dim].
    lengths: i32[max_seqs], tokens to write per sequence (0 leaves a sequence alone).

  Returns:
    The new cache. Outside jit, raises ValueError naming the first sequence that does not fit.
  """
  lengths = jnp.asarray(lengths)
  _check_write(cache, k, v, lengths, "lengths")
  return _write(cache, k, v, lengths.astype(jnp.int32))


def append(cache: KVCache, k, v, counts=None) -> KVCache:
  """One decode step: appends counts[b] (default all) of the 1..8 tokens k[b], v[b] to sequence b,
  each at its own length. Same contract as `prefill`."""
  if counts is None:
    counts = jnp.full((cache.config.max_seqs,), k.shape[1], jnp.int32)
  counts = jnp.asarray(counts)
  _check_write(cache, k, v, counts, "counts")
  return _write(cache, k, v, counts.astype(jnp.int32))


# ---------------------------------------------------------------------------------------------
# Releasing sequences and changing precision.


@functools.partial(jax.jit, donate_argnums=(0,))
def _release(cache: KVCache, seq) -> KVCache:
  row_pool, row_slot = cache.page_pool[seq], cache.page_slot[seq]
  pools = tuple(_push(pool, row_slot, row_pool == pool.precision) for pool in cache.pools)
  return dataclasses.replace(
      cache, pools=pools,
      page_pool=cache.page_pool.at[seq].set(UNMAPPED),
      page_slot=cache.page_slot.at[seq].set(UNMAPPED),
      lengths=cache.lengths.at[seq].set(0),
      overflow=cache.overflow.at[seq].set(False))


def release(cache: KVCache, seq) -> KVCache:
  """Empties sequence `seq` and returns its pages to their pools (the cache is donated)."""
  if not isinstance(cache, KVCache):
    raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
  check_seq(cache.config, seq)
  return _release(cache, jnp.asarray(seq, jnp.int32))


def check_seq(config: CacheConfig, seq) -> None:
  """Eagerly, raises unless `seq` is an int in [0, max_seqs) (inside jit: nothing to check)."""
  if is_traced(seq):
    return
  if not is_int(seq) and not (hasattr(seq, "shape") and np.asarray(seq).shape == () and
                              jnp.issubdtype(np.asarray(seq).dtype, jnp.integer)):
    raise TypeError(f"seq must be an int, got {seq!r}")
  if not 0 <= int(seq) < config.max_seqs:
    raise ValueError(f"seq={int(seq)} is out of range [0, {config.max_seqs})")


def _downgrade(current, target):
  """Whether a page stored in `current` moves to `target`: BF16 -> FP8, INT8 or INT4, and
  FP8 or INT8 -> INT4. Never up, never between the two 8-bit formats."""
  from_full = (current == Precision.BF16) & (target != Precision.BF16)
  to_int4 = (target == Precision.INT4) & ((current == Precision.FP8) |
                                          (current == Precision.INT8))
  return from_full | to_int4


@functools.partial(jax.jit, donate_argnums=(0,))
def _apply_precision(cache: KVCache, table: PageTable) -> KVCache:
  cfg = cache.config
  ps, max_pages = cfg.page_size, cfg.max_pages_per_seq
  current, slot = lookup(cache, table)
  full = (table.page_ids + 1) * ps <= cache.lengths[:, None]  # The page being written stays.
  move = (current != UNMAPPED) & full & _downgrade(current, table.precisions)
  k_pages, v_pages = read_pages(cache, jnp.where(move, current, UNMAPPED), slot)
  k_pages, v_pages = jnp.moveaxis(k_pages, -2, 0), jnp.moveaxis(v_pages, -2, 0)  # [H, B, P, ps, D]
  rows = jnp.arange(table.batch_size)[:, None]
  pools, page_pool, page_slot = list(cache.pools), cache.page_pool, cache.page_slot
  moved = jnp.zeros_like(move)
  for target in (Precision.FP8, Precision.INT8, Precision.INT4):
    pool = pools[target]
    if pool.num_pages == 0:
      continue
    wants = move & (table.precisions == target)
    order = jnp.cumsum(wants.reshape(-1)).reshape(wants.shape)  # 1-based among the wanting.
    got = wants & (order <= pool.num_free)
    new_slot = pool.free_slots[jnp.clip(pool.num_free - order, 0, pool.num_pages - 1)]
    dest = jnp.where(got, new_slot, pool.num_pages)  # Out of range: dropped.
    k_q = quant.quantize(k_pages, target, K_SCALE_AXIS)
    v_q = quant.quantize(v_pages, target, V_SCALE_AXIS)
    lower, upper = stored_bounds(jnp.min(quant.dequantize(k_q), axis=-2),
                                 jnp.max(quant.dequantize(k_q), axis=-2))
    put = lambda stored, value: stored.at[:, dest].set(value, mode="drop")
    pools[target] = dataclasses.replace(
        pool,
        k=put(pool.k, k_q.data), v=put(pool.v, v_q.data),
        k_scale=put(pool.k_scale, k_q.scale[..., 0, :]),
        v_scale=put(pool.v_scale, v_q.scale[..., 0]),
        key_min=put(pool.key_min, lower), key_max=put(pool.key_max, upper),
        num_free=pool.num_free - jnp.sum(got, dtype=jnp.int32))
    page = jnp.where(got, table.page_ids, max_pages)
    page_pool = page_pool.at[rows, page].set(int(target), mode="drop")
    page_slot = page_slot.at[rows, page].set(new_slot, mode="drop")
    moved = moved | got
  for source in (Precision.BF16, Precision.FP8, Precision.INT8):
    pools[source] = _push(pools[source], slot, moved & (current == source))
  return dataclasses.replace(cache, pools=tuple(pools), page_pool=page_pool, page_slot=page_slot)


def apply_precision(cache: KVCache, table: PageTable) -> KVCache:
  """Re-quantizes the full pages `table` marks lower than they are stored (the cache is donated).

  Downgrades only (BF16 -> FP8, INT8 or INT4; FP8 or INT8 -> INT4), each page from the values it
  holds, and frees its old slot. A sequence's last page stays until it is full. A page whose target
  pool has no free slot keeps its format (in table order, pages are served until a pool runs out).
  """
  if not isinstance(cache, KVCache):
    raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
  check_table_fits(cache.config, table)
  return _apply_precision(cache, table)


def check_table_fits(config: CacheConfig, table: PageTable) -> None:
  """Raises unless `table` is a PageTable of the cache's page size and batch."""
  if not isinstance(table, PageTable):
    raise TypeError(f"table must be a PageTable, got {type(table).__name__}")
  if table.page_size != config.page_size or table.batch_size != config.max_seqs:
    raise ValueError(
        f"table (page_size {table.page_size}, batch {table.batch_size}) does not fit the cache"
        f" (page_size {config.page_size}, max_seqs {config.max_seqs})")


# ---------------------------------------------------------------------------------------------
# Memory accounting.


def capacity_bytes(config: CacheConfig) -> tuple[int, ...]:
  """Bytes each pool occupies when full, in Precision order."""
  return tuple(config.pool_pages[p] * config.stored_page_bytes(p) for p in Precision)


# Each takes a cache, or caches stacked on leading axes (sharded.ShardedKVCache.shards): the
# results then carry those axes in front.


def free_pages(cache: KVCache) -> jax.Array:
  """i32[NUM_PRECISIONS]: free pages per pool."""
  return jnp.stack([pool.num_free for pool in cache.pools], axis=-1)


def pages_in_use(cache: KVCache) -> jax.Array:
  """i32[NUM_PRECISIONS]: pages holding data per pool."""
  return jnp.asarray(cache.config.pool_pages, jnp.int32) - free_pages(cache)


def bytes_in_use(cache: KVCache) -> jax.Array:
  """f32[NUM_PRECISIONS]: bytes of the pages holding data per pool."""
  per_page = jnp.asarray([cache.config.stored_page_bytes(p) for p in Precision], jnp.float32)
  return pages_in_use(cache).astype(jnp.float32) * per_page


def memory_pressure(cache: KVCache) -> jax.Array:
  """f32[] in [0, 1]: bytes in use over the bytes of all pools (the router's memory_pressure)."""
  return jnp.sum(bytes_in_use(cache), axis=-1) / float(sum(capacity_bytes(cache.config)))
