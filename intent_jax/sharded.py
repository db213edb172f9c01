"""Decode across devices: a paged KV cache split over a JAX mesh, attention combined by LSE.

A `Partition` names up to two mesh axes:
  * `heads` splits the kv heads into contiguous groups (tensor parallel), their query heads with
    them;
  * `pages` deals each sequence's logical pages round-robin (sequence parallel): page p lives on
    page shard p % n, as local page p // n of that shard's own cache. A device holds its heads of
    its pages and nothing else: no (kv head, page) lives on two devices.

Each device holds an ordinary `cache.KVCache` (its kv heads, its pages, its pools and free slots;
`lengths` count the tokens of its pages). `ShardedKVCache` stacks them: every leaf gets a leading
axis of page shards, and the pools' head axis is split over the heads axis. Writes route each
token to its page's shard; a sequence a shard cannot serve is refused on every shard (one small
collective), so the shards never disagree.

Decode: every device turns the global PageTable into its own (`local_table`), attends its pages
with the fastest local implementation (which also returns the log-sum-exp), and the page shards
exchange (output, lse) in one psum and merge them (`reference.merge_partials`), sinks counted
once. Causal masking stays exact: a shard's local positions keep the order of the
global ones (`local_positions`).
"""

import dataclasses
import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from intent_jax import cache as cache_lib
from intent_jax import reference
from intent_jax import scoring
from intent_jax.page_table import PageTable
from intent_jax.precision import Precision
from intent_jax.validation import is_traced


@dataclasses.dataclass(frozen=True)
class Partition:
  """Which mesh axes split the cache (hashable); None: not split.

  Attributes:
    heads: mesh axis splitting the kv heads (tensor parallel).
    pages: mesh axis splitting each sequence's pages, round-robin (sequence parallel).
  """

  heads: str | None = None
  pages: str | None = None

  def __post_init__(self):
    for name in ("heads", "pages"):
      axis = getattr(self, name)
      if axis is not None and not isinstance(axis, str):
        raise TypeError(f"Partition.{name} must be a mesh axis name or None, got {axis!r}")
    if self.heads is not None and self.heads == self.pages:
      raise ValueError(f"Partition splits heads and pages over one axis {self.heads!r}")

  def shards(self, mesh: Mesh) -> tuple[int, int]:
    """(heads shards, page shards) on `mesh`."""
    size = lambda axis: 1 if axis is None else mesh.shape[axis]
    return size(self.heads), size(self.pages)


def _check_mesh(mesh, partition) -> None:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if not isinstance(partition, Partition):
    raise TypeError(f"partition must be a sharded.Partition, got {type(partition).__name__}")
  for axis in (partition.heads, partition.pages):
    if axis is not None and axis not in mesh.axis_names:
      raise ValueError(f"partition axis {axis!r} is not one of the mesh's {mesh.axis_names}")


def local_config(config: cache_lib.CacheConfig, mesh: Mesh,
                 partition: Partition) -> cache_lib.CacheConfig:
  """The CacheConfig of one device's cache: its kv heads, its share of pages and of each pool.

  Raises ValueError unless the kv heads and every pool's pages divide evenly.
  """
  _check_mesh(mesh, partition)
  head_shards, page_shards = partition.shards(mesh)
  if config.num_kv_heads % head_shards:
    raise ValueError(
        f"num_kv_heads={config.num_kv_heads} must be a multiple of the {head_shards} devices of"
        f" mesh axis {partition.heads!r}")
  uneven = [p.name for p in Precision if config.pool_pages[p] % page_shards]
  if uneven:
    raise ValueError(
        f"pool_pages={config.pool_pages} must split evenly over the {page_shards} page shards of"
        f" mesh axis {partition.pages!r} (pools {uneven} do not)")
  local_pages = math.ceil(config.max_pages_per_seq / page_shards)
  return dataclasses.replace(
      config, num_kv_heads=config.num_kv_heads // head_shards,
      max_seq_len=local_pages * config.page_size,
      pool_pages=tuple(n // page_shards for n in config.pool_pages))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["shards", "lengths"],
    meta_fields=["config", "mesh", "partition"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class ShardedKVCache:
  """A paged KV cache split over a mesh (module docstring).

  Attributes:
    shards: the devices' caches stacked: every leaf [page_shards, ...] split over the pages
      axis; pool data, scales, key bounds and key sketch [page_shards, num_kv_heads, ...] also
      split over the heads axis. Its config is one device's (`local_config`).
    lengths: i32[max_seqs], tokens each sequence holds (replicated).
    config: the global CacheConfig (all heads, all pages, all pools).
    mesh, partition: where the shards live.
  """

  shards: cache_lib.KVCache
  lengths: jax.Array
  config: cache_lib.CacheConfig
  mesh: Mesh
  partition: Partition

  @property
  def overflow(self) -> jax.Array:
    """bool[max_seqs]: a write for the sequence was refused (on every shard alike)."""
    return self.shards.overflow[0]

  @property
  def num_page_shards(self) -> int:
    return self.partition.shards(self.mesh)[1]


PAGED_CACHES = (cache_lib.KVCache, ShardedKVCache)


def cache_functions(cache):
  """The module whose prefill, append, release, apply_precision and memory_pressure take
  `cache`: this one for a ShardedKVCache, `intent_jax.cache` for a KVCache."""
  return sys.modules[__name__] if isinstance(cache, ShardedKVCache) else cache_lib


# What goes through shard_map is a cache without its empty pools (None in their place): they
# hold nothing, and XLA's GPU compiler (jax 0.11.2) crashed on shard_map over a pool with no
# pages. Each device rebuilds them from its config.


def _without_empty_pools(cache: cache_lib.KVCache) -> cache_lib.KVCache:
  return dataclasses.replace(cache, pools=tuple(
      None if pool.free_slots.shape[-1] == 0 else pool for pool in cache.pools))


def _with_empty_pools(part: cache_lib.KVCache, pools) -> cache_lib.KVCache:
  """`part` with the entries of `pools` where it has None."""
  return dataclasses.replace(part, pools=tuple(
      old if new is None else new for new, old in zip(part.pools, pools)))


def _shard_specs(part: cache_lib.KVCache, partition: Partition):
  """PartitionSpecs of stacked shards without empty pools: leading axis over pages, pools' head
  axis over heads."""
  by_shard = PartitionSpec(partition.pages)
  by_head = PartitionSpec(partition.pages, partition.heads)
  head_or_none = lambda x: None if x is None else by_head
  pools = tuple(
      None if pool is None else dataclasses.replace(
          pool, k=by_head, v=by_head, k_scale=head_or_none(pool.k_scale),
          v_scale=head_or_none(pool.v_scale), key_min=by_head, key_max=by_head,
          free_slots=by_shard, num_free=by_shard)
      for pool in part.pools)
  sketch = None if part.key_sketch is None else cache_lib.KeySketch(codes=by_head, scale=by_head)
  return dataclasses.replace(part, pools=pools, page_pool=by_shard, page_slot=by_shard,
                             lengths=by_shard, overflow=by_shard, key_sketch=sketch)


def _device_part(cache: ShardedKVCache):
  """What of the shards goes through shard_map, and its PartitionSpecs."""
  part = _without_empty_pools(cache.shards)
  return part, _shard_specs(part, cache.partition)


def _unstack(part: cache_lib.KVCache) -> cache_lib.KVCache:
  """This device's cache from its slice of the shards (inside shard_map)."""
  local = jax.tree.map(lambda x: x[0], part)
  return dataclasses.replace(local, pools=tuple(
      cache_lib.empty_pool(local.config, precision) if pool is None else pool
      for precision, pool in zip(Precision, local.pools)))


def _stack(local: cache_lib.KVCache) -> cache_lib.KVCache:
  """This device's slice of the shards, without empty pools (inside shard_map)."""
  return jax.tree.map(lambda x: x[None], _without_empty_pools(local))


def _heads_spec(partition: Partition, rank: int, axis: int) -> PartitionSpec:
  """An array of `rank` split over the heads axis at `axis`, replicated otherwise."""
  return PartitionSpec(*(partition.heads if i == axis else None for i in range(rank)))


def _shard_map(fn, cache: ShardedKVCache, in_specs, out_specs, check_vma=True):
  return jax.shard_map(fn, mesh=cache.mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=check_vma)


def _page_shard_index(partition: Partition) -> jax.Array:
  """This device's page shard, inside shard_map."""
  if partition.pages is None:
    return jnp.asarray(0, jnp.int32)
  return jax.lax.axis_index(partition.pages).astype(jnp.int32)


def _gather_page_shards(x, partition: Partition, num_shards: int) -> jax.Array:
  """[page_shards, *x.shape]: every page shard's x, the same on all of them (inside shard_map).

  A psum of one-hot slots rather than all_gather, so that the result is typed replicated over
  the pages axis on every JAX version.
  """
  slots = jnp.zeros((num_shards,) + x.shape, x.dtype).at[_page_shard_index(partition)].set(x)
  return slots if partition.pages is None else jax.lax.psum(slots, partition.pages)


# ---------------------------------------------------------------------------------------------
# Global and local coordinates.


def local_length(lengths: jax.Array, num_shards: int, shard, page_size: int) -> jax.Array:
  """Tokens of the first `lengths` positions that live on page shard `shard` (same shape)."""
  stride = num_shards * page_size
  rounds, rest = lengths // stride, lengths % stride
  return rounds * page_size + jnp.clip(rest - shard * page_size, 0, page_size)


def local_positions(positions: jax.Array, num_shards: int, shard, page_size: int) -> jax.Array:
  """The last local position on `shard` at or before each global position (-1 if none).

  A key at global position g is visible to a query at q iff g <= q; on a shard, local order is
  global order, so that is local position <= local_positions(q).
  """
  return local_length(positions + 1, num_shards, shard, page_size) - 1


def local_table(table: PageTable, num_shards: int, shard, max_pages: int) -> PageTable:
  """The entries of `table` on page shard `shard`, renumbered to its local pages, in order.

  max_pages: entries of the local table (at least what the shard can hold of a sequence).
  """
  in_table = jnp.arange(table.max_pages) < table.num_pages[:, None]
  mine = in_table & (table.page_ids % num_shards == shard)
  rank = jnp.cumsum(mine, axis=1) - 1
  target = jnp.where(mine, rank, max_pages)  # Out of range: dropped.
  rows = jnp.arange(table.batch_size)[:, None]
  place = lambda x: jnp.zeros((table.batch_size, max_pages) + x.shape[2:], x.dtype).at[
      rows, target].set(x, mode="drop")
  return dataclasses.replace(
      table, page_ids=place(table.page_ids // num_shards), precisions=place(table.precisions),
      token_bits=place(table.token_bits),
      num_pages=jnp.minimum(jnp.sum(mine, axis=1, dtype=jnp.int32), max_pages),
      seq_lens=local_length(table.seq_lens, num_shards, shard, table.page_size))


# ---------------------------------------------------------------------------------------------
# Creating and writing.


def create(config: cache_lib.CacheConfig, mesh: Mesh, partition: Partition) -> ShardedKVCache:
  """An empty sharded cache. `config` is global: all kv heads, max_seq_len, and pool_pages for
  all page shards together (each holds pool_pages / page_shards of every pool)."""
  if not isinstance(config, cache_lib.CacheConfig):
    raise TypeError(f"config must be a CacheConfig, got {type(config).__name__}")
  local = local_config(config, mesh, partition)
  stacked = lambda: _stack(cache_lib.create(local))
  make = jax.jit(jax.shard_map(stacked, mesh=mesh, in_specs=(),
                               out_specs=_shard_specs(jax.eval_shape(stacked), partition)))
  replicated = NamedSharding(mesh, PartitionSpec())
  num_shards = partition.shards(mesh)[1]
  stack_shards = lambda pool: jax.tree.map(
      lambda x: jnp.broadcast_to(x, (num_shards,) + x.shape), pool)
  empty = jax.device_put(tuple(
      stack_shards(cache_lib.empty_pool(local, p)) if local.pool_pages[p] == 0 else None
      for p in Precision), replicated)
  lengths = jax.device_put(jnp.zeros(config.max_seqs, jnp.int32), replicated)
  return ShardedKVCache(_with_empty_pools(make(), empty), lengths, config, mesh, partition)


def _shard_share(lengths, counts, num_shards: int, shard, page_size: int):
  """Of counts[b] new tokens after lengths[b], those on `shard`: (local position of the first,
  how many), i32[batch] each."""
  start = local_length(lengths, num_shards, shard, page_size)
  return start, local_length(lengths + counts, num_shards, shard, page_size) - start


def _tokens_on_shard(lengths, counts, tokens: int, num_shards: int, shard, page_size: int):
  """Which of `tokens` new tokens (token i at position lengths[b] + i, counts[b] of them written)
  live on `shard`, in order: (their indices i32[batch, bound] into the new tokens, valid below
  count; count i32[batch])."""
  bound = min(tokens, (math.ceil(tokens / (num_shards * page_size)) + 1) * page_size)
  start, count = _shard_share(lengths, counts, num_shards, shard, page_size)
  local = start[:, None] + jnp.arange(bound)
  position = ((local // page_size) * num_shards + shard) * page_size + local % page_size
  return jnp.clip(position - lengths[:, None], 0, tokens - 1), count


def _write_shard(cache: ShardedKVCache, k, v, counts):
  """One device's part of a write, inside shard_map: (stacked shard, new lengths)."""
  ps, partition = cache.config.page_size, cache.partition
  num_shards, shard = cache.num_page_shards, _page_shard_index(partition)
  local = _unstack(cache.shards)
  counts = jnp.clip(counts, 0, k.shape[1])
  fits = cache.lengths + counts <= cache.config.max_seq_len

  def agree(served):
    served = served & fits
    if partition.pages is None:
      return served
    return jax.lax.pmin(served.astype(jnp.int32), partition.pages) == 1

  index, my_counts = _tokens_on_shard(cache.lengths, counts, k.shape[1], num_shards, shard, ps)
  mine = lambda x: jnp.take_along_axis(x, index[:, :, None, None], axis=1)
  local, served = cache_lib.write_tokens(local, mine(k), mine(v), my_counts, agree=agree)
  return _stack(local), cache.lengths + jnp.where(served, counts, 0)


@functools.partial(jax.jit, donate_argnums=(0,))
def _write(cache: ShardedKVCache, k, v, counts) -> ShardedKVCache:
  kv_spec = _heads_spec(cache.partition, 4, 2)
  part, specs = _device_part(cache)
  body = lambda part, lengths, k, v, counts: _write_shard(
      dataclasses.replace(cache, shards=part, lengths=lengths), k, v, counts)
  part, lengths = _shard_map(
      body, cache, in_specs=(specs, PartitionSpec(), kv_spec, kv_spec, PartitionSpec()),
      out_specs=(specs, PartitionSpec()))(part, cache.lengths, k, v, counts)
  return dataclasses.replace(cache, shards=_with_empty_pools(part, cache.shards.pools),
                             lengths=lengths)


@jax.jit
def _write_plan(cache: ShardedKVCache, counts):
  """Per page shard, what a write of `counts` would need: (fits bool[B], granted bool[P, B],
  demand i32[P, B], free i32[P, B]: BF16 slots left after the sequences before)."""
  ps, partition = cache.config.page_size, cache.partition

  def body(part, lengths, counts):
    local = _unstack(part)
    _, mine = _shard_share(lengths, counts, cache.num_page_shards,
                           _page_shard_index(partition), ps)
    _, granted, demand, taken_before = cache_lib.plan_write(local, mine)
    free = local.pools[Precision.BF16].num_free - taken_before
    return granted[None], demand[None], free[None]

  by_shard = PartitionSpec(partition.pages)
  part, specs = _device_part(cache)
  granted, demand, free = _shard_map(
      body, cache, in_specs=(specs, PartitionSpec(), PartitionSpec()),
      out_specs=(by_shard,) * 3)(part, cache.lengths, counts)
  return cache.lengths + counts <= cache.config.max_seq_len, granted, demand, free


def _check_write(cache: ShardedKVCache, k, v, counts, name: str) -> None:
  """Validates a write; eagerly, also that every shard can serve every sequence."""
  if not isinstance(cache, ShardedKVCache):
    raise TypeError(f"cache must be a ShardedKVCache, got {type(cache).__name__}")
  cache_lib.check_write_arrays(cache.config, k, v, counts, name)
  if is_traced(cache, counts):
    return  # Inside jit: refused writes set `overflow` instead.
  fits, granted, demand, free = (np.asarray(x) for x in _write_plan(cache, counts))
  lengths, counts = np.asarray(cache.lengths), np.asarray(counts)
  for b in range(cache.config.max_seqs):
    if not fits[b]:
      raise ValueError(
          f"sequence {b}: writing {counts[b]} tokens at length {lengths[b]} would reach"
          f" {lengths[b] + counts[b]}, past max_seq_len={cache.config.max_seq_len}")
    refused = np.nonzero(~granted[:, b])[0]
    if refused.size:
      s = refused[0]
      raise ValueError(
          f"sequence {b}: writing {counts[b]} tokens at length {lengths[b]} needs"
          f" {demand[s, b]} new pages on page shard {s}, but its BF16 pool has"
          f" {max(free[s, b], 0)} free after the sequences before it")


def prefill(cache: ShardedKVCache, k, v, lengths) -> ShardedKVCache:
  """`cache.prefill` for a sharded cache: k, v [max_seqs, tokens, num_kv_heads, head_dim] (all
  heads); each token goes to its page's shard. A sequence some shard cannot serve is refused on
  all (eagerly: ValueError naming the sequence and the shard)."""
  lengths = jnp.asarray(lengths)
  _check_write(cache, k, v, lengths, "lengths")
  return _write(cache, k, v, lengths.astype(jnp.int32))


def append(cache: ShardedKVCache, k, v, counts=None) -> ShardedKVCache:
  """`cache.append` for a sharded cache (same contract as `prefill`)."""
  if counts is None:
    counts = jnp.full((cache.config.max_seqs,), k.shape[1], jnp.int32)
  counts = jnp.asarray(counts)
  _check_write(cache, k, v, counts, "counts")
  return _write(cache, k, v, counts.astype(jnp.int32))


def _map_shards(fn, cache: ShardedKVCache, *args) -> ShardedKVCache:
  """Applies fn(local cache, page shard, *args) -> local cache on every device; args replicated."""
  part, specs = _device_part(cache)
  body = lambda part, *args: _stack(fn(_unstack(part), _page_shard_index(cache.partition), *args))
  part = _shard_map(body, cache, in_specs=(specs,) + (PartitionSpec(),) * len(args),
                    out_specs=specs)(part, *args)
  return dataclasses.replace(cache, shards=_with_empty_pools(part, cache.shards.pools))


@functools.partial(jax.jit, donate_argnums=(0,))
def _release(cache: ShardedKVCache, seq) -> ShardedKVCache:
  cache = _map_shards(lambda local, _, seq: cache_lib.release(local, seq), cache, seq)
  return dataclasses.replace(cache, lengths=cache.lengths.at[seq].set(0))


def release(cache: ShardedKVCache, seq) -> ShardedKVCache:
  """`cache.release` for a sharded cache: every shard frees the sequence's pages."""
  if not isinstance(cache, ShardedKVCache):
    raise TypeError(f"cache must be a ShardedKVCache, got {type(cache).__name__}")
  cache_lib.check_seq(cache.config, seq)
  return _release(cache, jnp.asarray(seq, jnp.int32))


@functools.partial(jax.jit, donate_argnums=(0,))
def _apply_precision(cache: ShardedKVCache, table: PageTable) -> ShardedKVCache:
  num_shards = cache.num_page_shards

  def one(local, shard, table):
    mine = local_table(table, num_shards, shard, local.config.max_pages_per_seq)
    return cache_lib.apply_precision(local, mine)

  return _map_shards(one, cache, table)


def apply_precision(cache: ShardedKVCache, table: PageTable) -> ShardedKVCache:
  """`cache.apply_precision` for a sharded cache: each shard re-quantizes its own pages of the
  global table (a shard whose pool is full keeps those pages as they are)."""
  if not isinstance(cache, ShardedKVCache):
    raise TypeError(f"cache must be a ShardedKVCache, got {type(cache).__name__}")
  cache_lib.check_table_fits(cache.config, table)
  return _apply_precision(cache, table)


# ---------------------------------------------------------------------------------------------
# Memory accounting, per page shard (every device of a page shard holds the same pages).


def free_pages(cache: ShardedKVCache) -> jax.Array:
  """i32[page_shards, NUM_PRECISIONS]: free pages per pool of each page shard."""
  return cache_lib.free_pages(cache.shards)


def pages_in_use(cache: ShardedKVCache) -> jax.Array:
  """i32[page_shards, NUM_PRECISIONS]: pages holding data per pool of each page shard."""
  return cache_lib.pages_in_use(cache.shards)


def bytes_in_use(cache: ShardedKVCache) -> jax.Array:
  """f32[page_shards, NUM_PRECISIONS]: bytes in use per pool on each device of a page shard."""
  return cache_lib.bytes_in_use(cache.shards)


def memory_pressure(cache: ShardedKVCache) -> jax.Array:
  """f32[] in [0, 1]: the fullest device's bytes in use over its pools' bytes (the router's
  memory_pressure: a block's precision follows the device that runs out first)."""
  return jnp.max(cache_lib.memory_pressure(cache.shards))


# ---------------------------------------------------------------------------------------------
# Scoring and attention.


@functools.partial(jax.jit, static_argnames=("scale", "channels"))
def _page_values(q, cache: ShardedKVCache, *, scale, channels):
  """Each device's per-head page values of its own pages and heads, in global page order: key
  bounds (channels None) or sketch logits over `channels` channels."""
  partition, num_shards = cache.partition, cache.num_page_shards

  def body(q, part):
    local = _unstack(part)  # The kernels are not run under shard_map: "reference".
    if channels is None:
      values = scoring.page_upper_bounds(q, local, scale=scale, implementation="reference")
    else:
      values = scoring.sketch_page_logits(q, local, channels=channels, scale=scale,
                                          implementation="reference")
    values = _gather_page_shards(values, partition, num_shards)  # [shards, B, local pages, h]
    values = jnp.moveaxis(values, 0, 2)
    return values.reshape(values.shape[0], -1, values.shape[-1])  # Page j * shards + s.

  part, specs = _device_part(cache)
  return _shard_map(
      body, cache, in_specs=(_heads_spec(partition, 4, 2), specs),
      out_specs=_heads_spec(partition, 3, 2))(q, part)


def _check_scoring(q, cache) -> None:
  if not isinstance(cache, ShardedKVCache):
    raise TypeError(f"cache must be a ShardedKVCache, got {type(cache).__name__}")
  scoring.check_query(q, cache.config)


def page_upper_bounds(q, cache: ShardedKVCache, *, scale=None) -> jax.Array:
  """`scoring.page_upper_bounds` from the shards' key bounds: each device bounds its own pages
  and heads; f32[batch, page_shards * local pages, num_kv_heads] in global page order (pages
  past max_pages_per_seq give -inf)."""
  _check_scoring(q, cache)
  return _page_values(q, cache, scale=scale, channels=None)


def sketch_page_logits(q, cache: ShardedKVCache, *, channels: int, scale=None) -> jax.Array:
  """`scoring.sketch_page_logits` from the shards' key sketches, laid out as
  `page_upper_bounds`."""
  _check_scoring(q, cache)
  scoring.check_sketch_scoring(cache.shards.key_sketch, channels, cache.config.head_dim)
  return _page_values(q, cache, scale=scale, channels=channels)


def page_scores(q, cache: ShardedKVCache, *, scale=None, channels: int | None = None) -> jax.Array:
  """`scoring.page_scores` of a sharded cache: f32[batch, max_pages_per_seq]; with `channels`,
  from `sketch_page_logits` instead of the key bounds."""
  if channels is None:
    values = page_upper_bounds(q, cache, scale=scale)
  else:
    values = sketch_page_logits(q, cache, channels=channels, scale=scale)
  return scoring.head_relative_scores(values[:, :cache.config.max_pages_per_seq])


def merge_page_shards(out, lse, partition: Partition, num_shards: int, *, sinks=None):
  """Inside shard_map: attention over every page shard's keys, from this shard's output and
  log-sum-exp (`reference.attention`'s return_lse): one psum, then `reference.merge_partials`
  (sinks counted once). f32, the same on every page shard."""
  part = jnp.concatenate([out.astype(jnp.float32), lse[..., None]], axis=-1)
  parts = _gather_page_shards(part, partition, num_shards)
  return reference.merge_partials(parts[..., :-1], parts[..., -1], sinks=sinks)


@functools.partial(jax.jit, static_argnames=("attend", "scale", "softcap"))
def decode_attention(q, cache: ShardedKVCache, table: PageTable, attend, *, q_positions=None,
                     sinks=None, scale=None, softcap=None) -> jax.Array:
  """Attention over a sharded cache (called by `attention.decode_attention`, which validates).

  Args:
    q: [batch, q_len, num_q_heads, head_dim]; cache: ShardedKVCache; table: the global table.
    attend: static, hashable; attend(q, kv, table, **options) attends a device's own cache and
      table (called with return_lse=True and no sinks).
    q_positions, sinks, scale, softcap: as `attention.decode_attention`.

  Returns:
    f32[batch, q_len, num_q_heads, head_dim], split over the heads axis.
  """
  partition, num_shards, ps = cache.partition, cache.num_page_shards, cache.config.page_size
  if q_positions is None:
    q_positions = table.query_positions(q.shape[1])

  def body(q, part, table, q_positions, sinks):
    local = _unstack(part)
    shard = _page_shard_index(partition)
    mine = local_table(table, num_shards, shard,
                       min(table.max_pages, local.config.max_pages_per_seq))
    positions = local_positions(q_positions, num_shards, shard, ps)
    out, lse = attend(q, local, mine, q_positions=positions, sinks=None, scale=scale,
                      softcap=softcap, return_lse=True)
    return merge_page_shards(out, lse, partition, num_shards, sinks=sinks)

  q_spec = _heads_spec(partition, 4, 2)
  sinks_spec = None if sinks is None else PartitionSpec(partition.heads)
  part, specs = _device_part(cache)
  return _shard_map(
      body, cache,
      in_specs=(q_spec, specs, PartitionSpec(), PartitionSpec(), sinks_spec),
      out_specs=q_spec,
      # Kernels' pallas_calls do not type how their outputs vary over mesh axes; the merged
      # output is the same on every page shard by construction (psum, then the same merge).
      check_vma=False)(q, part, table, q_positions, sinks)
