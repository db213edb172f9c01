"""decode_attention: the public entry point; validates, then dispatches to an implementation.

Every implementation takes `(q, kv, table, *, q_positions, sinks, scale, softcap, return_lse)`,
where kv is a paged `KVCache` or a `(k, v)` pair of contiguous arrays, and must match the
reference (`reference.paged_attention` or `reference.selected_attention`, which define the
log-sum-exp too); it raises NotImplementedError for inputs it does not support.
`implementation=` takes a registered name or an ordered list of names: the first that does not
raise NotImplementedError is used. The default list is the fastest registered one for the
platform first and ends with "reference". Over a `sharded.ShardedKVCache`, the chosen
implementation attends every device's own pages and the results are merged (`sharded`).
"""

from collections.abc import Callable, Sequence
import dataclasses

import jax
import jax.numpy as jnp

from intent_jax import cache as cache_lib
from intent_jax import gather_attention
from intent_jax import reference
from intent_jax import sharded
from intent_jax.page_table import PageTable

MAX_QUERY_TOKENS = 8  # Decode and speculative verification; prefill uses reference.attention.

Implementation = Callable[..., jax.Array]
IMPLEMENTATIONS: dict[str, Implementation] = {}
# Preferred order per platform; names not registered are passed over.
DEFAULT_ORDER = {
    "gpu": ("pallas_mosaic_gpu", "pallas_gpu", "xla", "reference"),
    "tpu": ("pallas_tpu", "xla", "reference"),
    "cpu": ("xla", "reference"),
}
_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def register_implementation(name: str, fn: Implementation) -> None:
  """Makes `fn` selectable as `implementation=name`."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"implementation name must be a non-empty str, got {name!r}")
  IMPLEMENTATIONS[name] = fn


def _reference(q, kv, table, **kwargs):
  if isinstance(kv, cache_lib.KVCache):
    return reference.paged_attention(q, kv, table, **kwargs)
  return reference.selected_attention(q, *kv, table, **kwargs)


def _pallas_gpu(q, kv, table, **kwargs):
  if jax.default_backend() != "gpu":
    raise NotImplementedError("pallas_gpu runs on GPUs")
  # Imported here: the kernel package builds on this one.
  from pallas_kernels.gpu import selected_page_decode  # pylint: disable=g-import-not-at-top
  return selected_page_decode.selected_page_decode(q, kv, table, **kwargs)


def _pallas_mosaic_gpu(q, kv, table, **kwargs):
  if jax.default_backend() != "gpu":
    raise NotImplementedError("pallas_mosaic_gpu runs on GPUs")
  if getattr(jax.devices()[0], "compute_capability", None) != "9.0":  # wgmma is Hopper's.
    raise NotImplementedError("pallas_mosaic_gpu runs on Hopper GPUs (compute capability 9.0)")
  from pallas_kernels.gpu import mosaic_decode  # pylint: disable=g-import-not-at-top
  return mosaic_decode.mosaic_decode(q, kv, table, **kwargs)


def _pallas_tpu(q, kv, table, **kwargs):
  if jax.default_backend() != "tpu":
    raise NotImplementedError("pallas_tpu runs on TPUs")
  from pallas_kernels.tpu import selected_page_decode  # pylint: disable=g-import-not-at-top
  return selected_page_decode.selected_page_decode(q, kv, table, **kwargs)


register_implementation("reference", _reference)
register_implementation("xla", gather_attention.gather_selected_attention)
register_implementation("pallas_gpu", _pallas_gpu)
register_implementation("pallas_mosaic_gpu", _pallas_mosaic_gpu)
register_implementation("pallas_tpu", _pallas_tpu)


def default_implementations(platform: str | None = None) -> tuple[str, ...]:
  """The registered implementations tried by default on `platform` (default: JAX's backend)."""
  platform = jax.default_backend() if platform is None else platform
  order = DEFAULT_ORDER.get(platform, ("reference",))
  return tuple(name for name in order if name in IMPLEMENTATIONS)


def _implementation_names(implementation) -> tuple[str, ...]:
  if implementation is None:
    return default_implementations()
  names = (implementation,) if isinstance(implementation, str) else implementation
  if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) for n in names):
    raise TypeError(
        f"implementation must be None, a name or a non-empty list of names, got {implementation!r}")
  unknown = [n for n in names if n not in IMPLEMENTATIONS]
  if unknown:
    raise ValueError(
        f"unknown implementation(s) {unknown}; registered: {sorted(IMPLEMENTATIONS)}")
  return tuple(names)


def _check_array(name, x) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  if x.dtype not in _FLOAT_DTYPES:
    raise TypeError(f"{name} has dtype {x.dtype}; expected bfloat16, float16 or float32")


def static_validate_inputs(q, kv, table, *, q_positions=None, sinks=None, scale=None,
                           softcap=None) -> None:
  """Checks shapes, dtypes and static arguments before tracing; raises ValueError/TypeError."""
  _check_array("q", q)
  if isinstance(kv, sharded.PAGED_CACHES):
    cfg = kv.config
    if q.ndim != 4 or q.shape[0] != cfg.max_seqs or q.shape[3] != cfg.head_dim:
      raise ValueError(
          f"q{list(q.shape)} must be [max_seqs={cfg.max_seqs}, q_len, num_q_heads,"
          f" head_dim={cfg.head_dim}] for this cache")
    if q.shape[2] % cfg.num_kv_heads:
      raise ValueError(
          f"num_q_heads={q.shape[2]} must be a multiple of num_kv_heads={cfg.num_kv_heads}")
    if isinstance(table, PageTable) and table.page_size != cfg.page_size:
      raise ValueError(
          f"table has page_size {table.page_size} but the cache has {cfg.page_size}")
    reference.check_query_args(q, sinks=sinks, q_positions=q_positions)
  else:
    if not isinstance(kv, (tuple, list)) or len(kv) != 2:
      raise TypeError(f"kv must be a KVCache or a (k, v) pair, got {type(kv).__name__}")
    k, v = kv
    _check_array("k", k)
    _check_array("v", v)
    if k.dtype != v.dtype:
      raise TypeError(f"k has dtype {k.dtype} but v has {v.dtype}")
    reference.check_attention_args(q, k, v, sinks=sinks, q_positions=q_positions)
  if not 1 <= q.shape[1] <= MAX_QUERY_TOKENS:
    raise ValueError(
        f"q has {q.shape[1]} query tokens; decode takes 1..{MAX_QUERY_TOKENS}"
        " (use reference.attention for prefill)")
  if not isinstance(table, PageTable):
    raise TypeError(f"table must be a PageTable, got {type(table).__name__}")
  if table.batch_size != q.shape[0]:
    raise ValueError(f"table has batch {table.batch_size} but q has batch {q.shape[0]}")
  if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
    raise ValueError(f"scale={scale!r} must be None or a positive number")
  if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
    raise ValueError(f"softcap={softcap!r} must be None or a positive number")


@dataclasses.dataclass(frozen=True)
class _FirstSupported:
  """Calls the first of the named implementations that does not raise NotImplementedError
  (hashable: a static argument of the sharded path's jit)."""

  names: tuple[str, ...]

  def __call__(self, q, kv, table, **options):
    reasons = []
    for name in self.names:
      try:
        return IMPLEMENTATIONS[name](q, kv, table, **options)
      except NotImplementedError as e:
        reasons.append(f"{name}: {e}")
    raise NotImplementedError(
        f"none of the implementations {list(self.names)} supports these inputs"
        f" ({'; '.join(reasons)})")


def _check_mesh_args(kv, mesh, partition) -> None:
  """A mesh comes with a ShardedKVCache; given here too, it must be the cache's."""
  if isinstance(kv, sharded.ShardedKVCache):
    if mesh is not None and mesh != kv.mesh:
      raise ValueError(f"mesh {mesh} is not the mesh the cache is split over ({kv.mesh})")
    if partition is not None and partition != kv.partition:
      raise ValueError(f"partition {partition} is not the cache's ({kv.partition})")
  elif mesh is not None or partition is not None:
    raise TypeError(
        "mesh and partition need a sharded.ShardedKVCache (sharded.create); a single-device"
        f" {type(kv).__name__} is not split across devices")


def decode_attention(q, kv, table: PageTable, *, q_positions=None, sinks=None, scale=None,
                     softcap=None, implementation=None, mesh=None, partition=None) -> jax.Array:
  """Attention of 1..8 query tokens over exactly the tokens `table` selects.

  Args:
    q: [batch, q_len, num_q_heads, head_dim], q_len in 1..8.
    kv: a paged KVCache (batch = max_seqs), a sharded.ShardedKVCache (split over a mesh), or a
      (k, v) pair of contiguous [batch, seq, num_kv_heads, head_dim] arrays.
    table: PageTable from `route`, for the cache's current lengths.
    q_positions: i32[batch, q_len]; default the last q_len positions of each sequence.
    sinks: optional f32[num_q_heads] sink logits.
    scale: logit scale, default 1/sqrt(head_dim).
    softcap: optional logit soft-cap.
    implementation: None, a registered name, or an ordered list of names.
    mesh, partition: optional; the mesh and sharded.Partition of a ShardedKVCache (checked
      against the cache's own). Without a sharded cache, nothing is split.

  Returns:
    [batch, q_len, num_q_heads, head_dim] in q.dtype (split over the partition's heads axis for
    a sharded cache). Rows with nothing selected are zeros. Rows are NaN, so that a wrong answer
    is never silent, where the table is `truncated` or was routed for other lengths than the
    cache holds.
  """
  static_validate_inputs(q, kv, table, q_positions=q_positions, sinks=sinks, scale=scale,
                         softcap=softcap)
  _check_mesh_args(kv, mesh, partition)
  attend = _FirstSupported(_implementation_names(implementation))
  wrong = table.truncated
  if isinstance(kv, sharded.PAGED_CACHES):
    wrong = wrong | (table.seq_lens != kv.lengths)
  options = dict(q_positions=q_positions, sinks=sinks, scale=scale, softcap=softcap)
  if isinstance(kv, sharded.ShardedKVCache):
    out = sharded.decode_attention(q, kv, table, attend, **options)
  else:
    out = attend(q, kv, table, **options)
  return jnp.where(wrong[:, None, None, None], jnp.nan, out).astype(q.dtype)
