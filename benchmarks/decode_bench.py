r"""Decode attention over selected pages: this library's kernel beside its peers, in one run.

For each (batch, tokens) shape and page size it measures, on the same random data:
  * the copy ceiling (a 1 GiB bf16 copy, bytes read + written),
  * dense attention over the whole context: jax.nn.dot_product_attention with cuDNN and with XLA,
  * per selection (random sorted page sets): JAX's Pallas GPU `paged_attention` over the same
    pages (same bytes), XLA gather of those pages + dense attention, and each of this library's
    --implementations (by default the Mosaic GPU and the Triton kernel) with the pages stored
    in BF16, INT8, FP8, INT4 or a mix, where it supports them,
  * with --traces, tables routed from the synthetic agentic traces of that length,
  * with --query_selection, what choosing pages by the query costs (`select_pages`), ranking
    pages by their key bounds and, for each of --query_channels, by the key sketch's logits
    over that many channels (`RouterConfig(query_channels=)`; the cache then keeps a sketch).
Times are device time per call by default (`timing.device_seconds`: no host dispatch, the L2
cache flushed before each call, as in a model whose layers read other pages); --timing=wall
times back-to-back calls from the host instead, as the earliest tables in BENCHMARKS.md were.
Bytes are K and V of the pages each variant must read, once, scales included; GB/s is bytes over
time; "% copy" is that over the copy ceiling measured in the same run. With --check, each of this
library's variants is first compared with `reference.paged_attention` (the Triton kernel's
outputs poisoned with NaN first, so unwritten blocks show). --q_len, --sinks and --softcap time
and check the kernels with several causal query tokens, sink logits and a soft-cap (this
library's rows only).

With --mesh (heads x pages, e.g. 1x2,2x1), the first selection's BF16 and mixed tables also run on
a `sharded.ShardedKVCache` over that many devices: the step time (LSE merge included) beside the
one-device row of the same table, the bytes each device reads (the largest share), the cost of a
sharded call doing no attention (merge_floor_us), and the per-layer time when --mesh_layers calls
share one jitted call, on one device and on the mesh (layer_us_one_device, layer_us).

  python -m benchmarks.decode_bench --shapes=1x131072,8x32768 --json_out=/tmp/decode.json
"""

import dataclasses
import functools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from benchmarks import decode_inputs
from benchmarks import report
from benchmarks import timing
from intent_jax import attention
from intent_jax import cache as cache_lib
from intent_jax import cost
from intent_jax import gather_attention
from intent_jax import reference
from intent_jax import router
from intent_jax import scoring
from intent_jax import sharded
from intent_jax import traces
from intent_jax.precision import Precision

_SHAPES = flags.DEFINE_list("shapes", ["1x131072", "8x32768", "32x32768", "8x131072"],
                            "batch x tokens.")
_PAGE_SIZES = flags.DEFINE_list("page_sizes", ["16"], "Tokens per page.")
_SELECTIONS = flags.DEFINE_list("selections", ["0.25", "0.0625"], "Fractions of pages read.")
_PRECISIONS = flags.DEFINE_list("precisions", ["bf16", "int8", "fp8", "int4", "mixed"],
                                "Storage of the selected pages: bf16, int8, fp8, int4 or mixed "
                                "(10% BF16, 30% INT8, 60% INT4). Quantized ones run at the first "
                                "selection only.")
_TRACES = flags.DEFINE_bool("traces", False, "Also route the synthetic agentic traces.")
_QUERY_SELECTION = flags.DEFINE_bool(
    "query_selection", True, "Also time query-aware page selection (scoring.page_scores per bound "
    "implementation, route, and both inside a step of --mesh_layers layers) with a budget of the "
    "first selection's pages, on the agentic trace layout.")
_QUERY_CHANNELS = flags.DEFINE_list(
    "query_channels", ["16"], "Channels the key-sketch scores read, for --query_selection rows.")
_MESH = flags.DEFINE_list("mesh", [], "Mesh shapes, heads x pages devices, for sharded rows.")
_MESH_LAYERS = flags.DEFINE_integer(
    "mesh_layers", 8, "Mesh and query-selection rows also time this many decode calls (different "
    "queries, the same cache) in one jitted call, as a model step's layers: the per-layer cost.")
_Q_LEN = flags.DEFINE_integer("q_len", 1, "Query tokens per sequence (1..8), the last q_len "
                              "positions, each seeing the keys up to its own (causal).")
_SINKS = flags.DEFINE_bool("sinks", False, "Random per-head sink logits.")
_SOFTCAP = flags.DEFINE_float("softcap", None, "Logit soft-cap; none by default.")
_PEERS = flags.DEFINE_bool("peers", True, "Measure the peers too (one query token, no sinks or "
                           "soft-cap only: the peers have neither).")
_CHECK = flags.DEFINE_bool("check", True, "Check each variant against the oracle first.")
_IMPLEMENTATIONS = flags.DEFINE_list(
    "implementations", ["pallas_mosaic_gpu", "pallas_gpu"],
    "Registered names, each timed side by side where it supports the input; the other rows "
    "(sharded, in-step, routed traces) dispatch to the first of them that does.")
_NUM_Q_HEADS = flags.DEFINE_integer("num_q_heads", 32, "Query heads.")
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 8, "KV heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Channels per head.")
_TIMING = flags.DEFINE_enum("timing", "device", ["device", "wall"],
                            "device: timing.device_seconds (no host dispatch, L2 flushed before "
                            "each call); wall: timing.median_seconds (back-to-back calls).")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Timed rounds (median).")
_CALLS = flags.DEFINE_integer("calls", 30, "Back-to-back calls per round (wall timing).")
_REPS = flags.DEFINE_integer("reps", 10, "Calls in sequence per timed function (device timing).")
_JSON_OUT = flags.DEFINE_string("json_out", None,
                                "Also write the rows to this JSON file (after each row).")


def select_pages(record, cache, q, fraction, kernel_seconds, measure):
  """Times query-aware selection over `cache` (every page mapped, with a key sketch) on the
  agentic trace layout, with a budget of `fraction` of the pages: the route alone and the
  page-level selection alone (`select_pages` on a plan) from given scores; then for the key
  bounds and for the key sketch at each of --query_channels: the page scores from each
  implementation (checked against the reference's), scores + route, and, as inside a model
  step, --mesh_layers layers in one jitted call (each its own query): decode alone over tables
  routed beforehand vs one `plan_query` and, per layer, scores + select_pages + decode; their
  difference per layer is what selection adds to a step (of which the scores: the same step
  with the scores computed but the tables given)."""
  c = cache.config
  batch, num_tokens, page_size = c.max_seqs, c.max_seq_len, c.page_size
  layout = traces.agentic_batch([num_tokens] * batch, seed=1).unnamed()
  lengths = jnp.full((batch,), num_tokens, jnp.int32)
  config = router.RouterConfig(page_size=page_size, recent_tokens=1024)
  budget = jnp.int32(round(fraction * num_tokens / page_size))
  # The layout, lengths and budget are arguments, not constants: XLA would fold the plan.
  step_inputs = (layout, lengths, budget)
  extra = lambda seconds: ({} if kernel_seconds is None else
                           dict(pct_of_kernel=100 * seconds / kernel_seconds))
  given = jax.jit(scoring.page_scores)(q, cache)
  route_only = jax.jit(lambda scores, layout, lengths, budget: router.route(
      layout, lengths, config, page_scores=scores, budget=budget))
  seconds = measure(route_only, given, *step_inputs)
  record("route(page_scores)", batch, num_tokens, page_size, str(fraction), "-", seconds, 0, 0,
         **extra(seconds))
  plan = router.plan_query(layout, lengths, config)
  select_only = jax.jit(lambda plan, scores, budget: router.select_pages(
      plan, page_scores=scores, budget=budget))
  seconds = measure(select_only, plan, given, budget)
  record("select_pages(plan, page_scores)", batch, num_tokens, page_size, str(fraction), "-",
         seconds, 0, 0, **extra(seconds))
  for channels in [None] + [int(r) for r in _QUERY_CHANNELS.value]:
    if channels is None:
      source = "bounds"
      nbytes = (batch * c.max_pages_per_seq * c.num_kv_heads * c.head_dim *
                cache_lib.SUMMARY_BYTES_PER_CHANNEL)
    else:
      source = f"sketch{channels}"
      nbytes = c.key_sketch_bytes * channels // c.head_dim  # The chosen channels' share.
    scorer = lambda name: jax.jit(functools.partial(scoring.page_scores, channels=channels,
                                                    implementation=name))
    expected = scorer("reference")(q, cache)
    for name in scoring.IMPLEMENTATIONS:
      try:
        max_diff = float(jnp.max(jnp.where(jnp.isfinite(expected),
                                           jnp.abs(scorer(name)(q, cache) - expected), 0.0)))
      except NotImplementedError:
        continue
      seconds = measure(scorer(name), q, cache)
      record(f"query page scores ({name})", batch, num_tokens, page_size, str(fraction), source,
             seconds, nbytes, 0, max_abs_diff=max_diff, **extra(seconds))
    step_config = dataclasses.replace(config, query_channels=channels)
    routed = lambda q, cache, layout, lengths, budget, step_config=step_config: router.route(
        layout, lengths, step_config, query=q, cache=cache, budget=budget)
    seconds = measure(jax.jit(routed), q, cache, *step_inputs)
    record("query page scores + route", batch, num_tokens, page_size, str(fraction), source,
           seconds, nbytes, 0, **extra(seconds))
    in_step_row(record, cache, q, routed, step_config, step_inputs, source, measure)


def in_step_row(record, cache, q, routed, config, step_inputs, source, measure):
  """A model step of --mesh_layers layers: the plan once, then per layer its query's scores,
  selection and decode, against decode alone over tables routed beforehand."""
  c = cache.config
  decode_layer = functools.partial(attention.decode_attention,
                                   implementation=_IMPLEMENTATIONS.value)
  queries = jax.random.normal(jax.random.key(2), (_MESH_LAYERS.value,) + q.shape, q.dtype)
  tables = jax.jit(jax.vmap(routed, in_axes=(0, None, None, None, None)))(queries, cache,
                                                                          *step_inputs)
  decode_only = jax.jit(lambda qs, cache, tables: jax.lax.map(
      lambda x: decode_layer(x[0], cache, x[1]), (qs, tables)))

  def in_step(qs, cache, layout, lengths, budget):
    plan = router.plan_query(layout, lengths, config)
    select = lambda q: router.select_pages(plan, query=q, cache=cache, budget=budget)
    return jax.lax.map(lambda q: decode_layer(q, cache, select(q)), qs)

  in_step = jax.jit(in_step)
  # The scores alone inside the step (kept live as an output), to split selection's cost.
  scores_and_decode = jax.jit(lambda qs, cache, tables: jax.lax.map(
      lambda x: (decode_layer(x[0], cache, x[1]),
                 scoring.page_scores(x[0], cache, channels=config.query_channels)),
      (qs, tables)))
  same = report.relative_error(in_step(queries, cache, *step_inputs),
                               decode_only(queries, cache, tables))
  layers = _MESH_LAYERS.value
  decode_us = 1e6 * measure(decode_only, queries, cache, tables) / layers
  scored_us = 1e6 * measure(scores_and_decode, queries, cache, tables) / layers
  step_us = 1e6 * measure(in_step, queries, cache, *step_inputs) / layers
  read = float(jnp.mean(tables.num_pages)) / c.max_pages_per_seq
  record(f"per layer: scores + select + decode ({source})", c.max_seqs, c.max_seq_len,
         c.page_size, f"{read:.3f}", "bf16", step_us / 1e6, 0, 0,
         rel_err_vs_routed_before=same, decode_only_us=decode_us,
         selection_us=step_us - decode_us, of_which_scores_us=scored_us - decode_us,
         selection_pct_of_decode=100 * (step_us - decode_us) / decode_us)


def merge_floor(mesh, q_shape):
  """A jitted step that does only what sharded decode adds around the kernels: a shard_map over
  the mesh with the psum of every page shard's (output, lse) and the merge."""
  heads_spec = PartitionSpec(None, None, "heads", None)
  partition = sharded.Partition(heads="heads", pages="pages")
  body = lambda q: sharded.merge_page_shards(q, q[..., 0].astype(jnp.float32), partition,
                                             mesh.shape["pages"])

  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=heads_spec, out_specs=heads_spec,
                               check_vma=False))


def _dispatch_name() -> str:
  """The label of rows timed through the --implementations list (first supported)."""
  return "intent_jax " + "|".join(_IMPLEMENTATIONS.value)


def sharded_decode(record, q, cache, table, selection, storage, one_device_seconds, measure):
  """Times decode over `cache`'s pages split over each --mesh shape; bytes are the largest
  device's share."""
  c = cache.config
  stored, _ = cache_lib.lookup(cache, table)
  as_stored = dataclasses.replace(table, precisions=stored)
  k, v = cache_lib.dequantized_kv(cache)  # Re-quantizing these gives the same pages again.
  decode_layer = functools.partial(attention.decode_attention,
                                   implementation=_IMPLEMENTATIONS.value)
  decode = jax.jit(decode_layer)
  layers = jax.jit(lambda qs, kv, table: jax.lax.map(lambda q: decode_layer(q, kv, table), qs))
  queries = jax.random.normal(jax.random.key(1), (_MESH_LAYERS.value,) + q.shape, q.dtype)
  one_device_layer_us = 1e6 * measure(layers, queries, cache, table) / _MESH_LAYERS.value
  for shape in _MESH.value:
    heads, pages = map(int, shape.split("x"))
    if heads * pages > jax.device_count():
      print(f"mesh {shape}: needs {heads * pages} devices, {jax.device_count()} present")
      continue
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:heads * pages]).reshape(heads, pages),
                             ("heads", "pages"))
    split = sharded.create(c, mesh, sharded.Partition(heads="heads", pages="pages"))
    split = sharded.prefill(split, k.astype(c.dtype), v.astype(c.dtype), cache.lengths)
    split = sharded.apply_precision(split, table)
    # In a decode loop the query and the table are made on the mesh; so here too.
    on_mesh = jax.device_put((q, table), NamedSharding(mesh, PartitionSpec()))
    device_bytes = max(
        float(jnp.sum(cost.routed_kv_bytes(
            sharded.local_table(as_stored, pages, s, table.max_pages), c.num_kv_heads // heads,
            c.head_dim)))
        for s in range(pages))
    extra = dict(devices=heads * pages, mesh=shape)
    if _CHECK.value:
      extra["rel_err"] = report.relative_error(decode(on_mesh[0], split, on_mesh[1]),
                                               reference.paged_attention(q, cache, table))
    seconds = measure(lambda q, split, table: decode(q, split, table), on_mesh[0], split,
                      on_mesh[1])
    extra["speedup_vs_one_device"] = one_device_seconds / seconds
    extra["merge_floor_us"] = 1e6 * measure(merge_floor(mesh, q.shape), on_mesh[0])
    extra["layer_us_one_device"] = one_device_layer_us
    extra["layer_us"] = 1e6 * measure(
        layers, jax.device_put(queries, NamedSharding(mesh, PartitionSpec())), split,
        on_mesh[1]) / _MESH_LAYERS.value
    keys = int(jnp.sum(table.num_pages)) * c.page_size // c.max_seqs // (heads * pages)
    record(f"{_dispatch_name()} sharded", c.max_seqs, c.max_seq_len, c.page_size,
           selection, storage, seconds, device_bytes, keys, **extra)
    del split


def main(argv):
  del argv
  hq, hkv, d = _NUM_Q_HEADS.value, _NUM_KV_HEADS.value, _HEAD_DIM.value
  q_len = _Q_LEN.value
  plain = q_len == 1 and not _SINKS.value and _SOFTCAP.value is None
  if not plain and (_MESH.value or _QUERY_SELECTION.value or _TRACES.value):
    raise app.UsageError("--q_len > 1, --sinks and --softcap time the single-device rows only: "
                         "pass --mesh= --query_selection=false --traces=false")
  peers = _PEERS.value and plain
  options = dict(softcap=_SOFTCAP.value,
                 sinks=jax.random.normal(jax.random.key(7), (hq,), jnp.float32) if _SINKS.value
                 else None)
  def measure(fn, *args):
    """Seconds per call of fn(*args)."""
    if _TIMING.value == "wall":
      return timing.median_seconds(fn, *args, rounds=_ROUNDS.value, calls=_CALLS.value)
    return timing.device_seconds(fn, *args, reps=_REPS.value, rounds=_ROUNDS.value)

  rows = []

  def record(name, batch, num_tokens, page_size, selection, storage, seconds, nbytes, keys,
             **extra):
    per_second = 1 / seconds if seconds > 0 else float("nan")  # 0: under the timing's noise.
    row = dict(name=name, batch=batch, tokens=num_tokens, page_size=page_size,
               selection=selection, storage=storage, us=seconds * 1e6, bytes=nbytes,
               gbps=nbytes * per_second / 1e9,
               tflops=4 * q_len * hq * d * keys * per_second / 1e12,
               **extra)
    row["pct_copy"] = 100 * row["gbps"] / copy_gbps
    rows.append(row)
    report.write_json(_JSON_OUT.value, rows)  # Row by row: a run cut short keeps what it measured.
    print(f"{name:<34} B={batch:<3} T={num_tokens:<7} ps={page_size:<3} sel={selection:<7}"
          f" {storage:<6} {row['us']:>9.1f} us {row['gbps']:>7.0f} GB/s {row['pct_copy']:>5.1f}%"
          + "".join(f" {k}={v:.2e}" if isinstance(v, float) else f" {k}={v}"
                    for k, v in extra.items()), flush=True)

  big = jax.random.normal(jax.random.key(0), (2**29,), jnp.bfloat16)  # 1 GiB.
  # Wall clock: 1 GiB takes far longer than its dispatch, and device timing's output sum would
  # fuse with the copy (reading without writing).
  copy_s = timing.median_seconds(jax.jit(lambda x: x + 1), big, rounds=_ROUNDS.value)
  copy_gbps = 2 * big.nbytes / copy_s / 1e9
  del big
  print(f"copy ceiling: {copy_gbps:.0f} GB/s (1 GiB bf16, read + write), {jax.devices()[0]}")
  rows.append(dict(name="copy", gbps=copy_gbps, us=copy_s * 1e6))
  decoders = {name: jax.jit(functools.partial(attention.decode_attention, implementation=name,
                                              **options)) for name in _IMPLEMENTATIONS.value}
  decode = jax.jit(functools.partial(attention.decode_attention,
                                     implementation=_IMPLEMENTATIONS.value, **options))
  rng = np.random.default_rng(0)

  for shape in _SHAPES.value:
    batch, num_tokens = map(int, shape.split("x"))
    kq, kk, kv = jax.random.split(jax.random.key(batch + num_tokens), 3)
    q = jax.random.normal(kq, (batch, q_len, hq, d), jnp.bfloat16)
    k = jax.random.normal(kk, (batch, num_tokens, hkv, d), jnp.bfloat16)
    v = jax.random.normal(kv, (batch, num_tokens, hkv, d), jnp.bfloat16)
    dense_bytes = 2 * k.nbytes
    if peers:
      for impl in ("cudnn", "xla"):
        try:
          seconds = measure(jax.jit(functools.partial(jax.nn.dot_product_attention,
                                                      implementation=impl)), q, k, v)
          record(f"dense dot_product_attention {impl}", batch, num_tokens, 0, "1", "bf16",
                 seconds, dense_bytes, num_tokens)
        except Exception as e:  # pylint: disable=broad-except
          print(f"dense dot_product_attention {impl}: not available ({type(e).__name__})")

    for page_size in map(int, _PAGE_SIZES.value):
      kernel_seconds, selection_cache = None, None
      for s_index, selection in enumerate(_SELECTIONS.value):
        names = _PRECISIONS.value if s_index == 0 else ["bf16"]
        for storage in names:
          table = decode_inputs.selection_table(rng, batch, num_tokens, page_size,
                                                float(selection),
                                                decode_inputs.precision_picker(storage))
          sketch = _QUERY_SELECTION.value and s_index == 0 and storage == "bf16"
          cache = decode_inputs.stored_cache(k, v, table, page_size, key_sketch=sketch)
          stored, slots = cache_lib.lookup(cache, table)
          nbytes = float(jnp.sum(cost.routed_kv_bytes(table, hkv, d, precisions=stored)))
          keys = int(jnp.sum(table.num_pages)) * page_size // batch
          extra = {}
          seconds = None  # The first implementation's that supports the input.
          for name in _IMPLEMENTATIONS.value:
            try:
              if _CHECK.value:
                impl = attention.IMPLEMENTATIONS[name]
                poison = dict(poison=True) if name == "pallas_gpu" else {}
                out = jax.jit(lambda q, c, t: impl(q, c, t, **options, **poison))(q, cache, table)
                expected = reference.paged_attention(q, cache, table, **options)
                extra["rel_err"] = report.relative_error(out, expected)
              name_seconds = measure(decoders[name], q, cache, table)
            except NotImplementedError as e:  # E.g. a format or tiling it does not support.
              print(f"intent_jax {name} {storage} ps={page_size}: not supported ({e})")
            else:
              record(f"intent_jax {name}", batch, num_tokens, page_size, selection, storage,
                     name_seconds, nbytes, keys, **extra)
              seconds = name_seconds if seconds is None else seconds
          if s_index == 0 and storage == "bf16":
            kernel_seconds, selection_cache = seconds, cache
          if s_index == 0 and storage in ("bf16", "mixed") and seconds is not None:
            sharded_decode(record, q, cache, table, selection, storage, seconds, measure)
          if peers and storage == "bf16":
            pool = cache.pools[Precision.BF16]
            peer = (decode_inputs.jax_tpu_paged_attention if jax.default_backend() == "tpu"
                    else functools.partial(decode_inputs.jax_paged_attention, k_splits=16))
            try:
              record("jax pallas paged_attention", batch, num_tokens, page_size, selection, "bf16",
                     measure(jax.jit(peer), q, pool.k, pool.v, slots), nbytes, keys)
            except Exception as e:  # pylint: disable=broad-except
              print(f"jax pallas paged_attention: failed ({type(e).__name__}: {str(e)[:200]})")
            gathered = jax.jit(lambda q, k, v, t: jax.nn.dot_product_attention(
                q, gather_attention.gather_pages(k, t), gather_attention.gather_pages(v, t)))
            record("xla gather + dense", batch, num_tokens, page_size, selection, "bf16",
                   measure(gathered, q, k, v, table), nbytes, keys)
          del cache

      if _QUERY_SELECTION.value and selection_cache is not None:
        select_pages(record, selection_cache, q, float(_SELECTIONS.value[0]), kernel_seconds,
                     measure)
      del selection_cache

      if _TRACES.value:
        layout = traces.agentic_batch([num_tokens] * batch, seed=1).unnamed()
        lengths = jnp.full((batch,), num_tokens, jnp.int32)
        config = router.RouterConfig(page_size=page_size, recent_tokens=1024,
                                     max_pages=num_tokens // page_size // 2)
        table = router.route(layout, lengths, config, memory_pressure=0.3)
        cache = decode_inputs.stored_cache(k, v, table, page_size)
        stored, _ = cache_lib.lookup(cache, table)
        nbytes = float(jnp.sum(cost.routed_kv_bytes(table, hkv, d, precisions=stored)))
        keys = int(jnp.sum(cost.attended_tokens(table))) // batch
        mix = "/".join(str(int(n)) for n in jnp.sum(cost.pages_by_precision(table, stored), 0))
        record(f"{_dispatch_name()} routed trace", batch, num_tokens, page_size,
               f"{float(jnp.mean(table.num_pages)) / (num_tokens // page_size):.3f}", "routed",
               measure(decode, q, cache, table), nbytes, keys, pages_bf16_fp8_int8_int4=mix)
        del cache
    del q, k, v

  report.write_json(_JSON_OUT.value, rows)


if __name__ == "__main__":
  app.run(main)
