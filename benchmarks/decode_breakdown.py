r"""Device time of each stage of the GPU decode path, free of host dispatch
(`timing.device_seconds`: `--reps` calls in sequence inside one jitted function, the L2 cache
flushed before each).

  python -m benchmarks.decode_breakdown --shapes=8x131072,1x131072 --storages=bf16,int4

It also times the stages of the Mosaic GPU kernel's path ("mosaic: ...").
--split_factors also times the whole call with the default split count times each factor.
--query_selection also times, for the first selection's BF16 cache, what choosing pages by the
query does per layer (`selection_stages`): the Pallas selection kernel, the jax.numpy reference,
and the XLA operations the reference is made of alone.
"""

import functools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import decode_inputs
from benchmarks import report
from benchmarks import timing
from intent_jax import attention
from intent_jax import router
from intent_jax import scoring
from intent_jax import traces
from intent_jax.precision import Precision
from pallas_kernels import splits
from pallas_kernels import tuned_block_sizes
from pallas_kernels.gpu import combine_splits
from pallas_kernels.gpu import mosaic_decode
from pallas_kernels.gpu import select_pages as select_kernel
from pallas_kernels.gpu import selected_page_decode as kernel

_SHAPES = flags.DEFINE_list("shapes", ["8x131072", "1x131072"], "batch x tokens.")
_SELECTIONS = flags.DEFINE_list("selections", ["0.25", "0.0625"], "Fractions of pages read.")
_STORAGES = flags.DEFINE_list("storages", ["bf16", "int4"], "Formats of the pages.")
_REPS = flags.DEFINE_integer("reps", 10, "Calls in sequence inside one jitted function.")
_SPLIT_FACTORS = flags.DEFINE_list("split_factors", [], "Also time the whole call with the "
                                   "default split count times these (e.g. 0.5,2).")
_QUERY_SELECTION = flags.DEFINE_bool("query_selection", False,
                                     "Also time the stages of query-aware page selection.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the rows to this JSON file.")


def selection_stages(q, cache, fraction: float) -> dict:
  """{name: (fn, args)}: query-aware selection over `cache` on the agentic trace layout with a
  budget of `fraction` of the pages (as decode_bench's): the page scores, the plan, `select_pages`
  with the platform's selection (the Pallas kernel on a GPU) and with the jax.numpy reference,
  the kernel alone, and the operations of the same shapes the reference is built from, each
  alone: a sort of the page scores, a running count over the pages, the compaction of the
  selected pages into the table (a scatter). Prints whether both selections give one table."""
  c = cache.config
  batch, num_pages = c.max_seqs, c.max_pages_per_seq
  layout = traces.agentic_batch([c.max_seq_len] * batch, seed=1).unnamed()
  lengths = jnp.full((batch,), c.max_seq_len, jnp.int32)
  config = router.RouterConfig(page_size=c.page_size, recent_tokens=1024)
  budget = jnp.int32(round(fraction * num_pages))
  scores = scoring.page_scores(q, cache)
  plan = router.plan_query(layout, lengths, config)
  selected = scores > jnp.quantile(scores, 1 - fraction)
  slots = jnp.where(selected, jnp.cumsum(selected, axis=1) - 1, num_pages)
  rows = jnp.arange(batch)[:, None]
  select = lambda implementation: (lambda scores, plan, budget: router.select_pages(
      plan, page_scores=scores, budget=budget, implementation=implementation))
  tables = [select(name)(scores, plan, budget) for name in (None, "reference")]
  same = all(bool(jnp.array_equal(a, b))
             for a, b in zip(jax.tree.leaves(tables[0]), jax.tree.leaves(tables[1])))
  print(f"select_pages: the default selection's table equals the reference's: {same}")
  capacity = config.table_capacity(c.max_seq_len)
  return {
      "page scores (bounds)": (scoring.page_scores, (q, cache)),
      "plan_query (once a step)": (
          lambda layout, lengths: router.plan_query(layout, lengths, config), (layout, lengths)),
      "select_pages (a layer)": (select(None), (scores, plan, budget)),
      "select_pages, reference": (select("reference"), (scores, plan, budget)),
      "  selection kernel alone": (lambda scores, plan, budget: select_kernel.select_pages(
          plan.forced_page, plan.candidate, scores, jnp.full((batch,), budget),
          capacity=capacity), (scores, plan, budget)),
      "  sort of the page scores": (lambda scores: jnp.sort(scores, axis=1), (scores,)),
      "  running count over pages": (
          lambda scores: jnp.cumsum(scores > 0, axis=1, dtype=jnp.int32), (scores,)),
      "  compaction scatter": (lambda slots: jnp.zeros((batch, num_pages), jnp.int32).at[
          rows, slots].set(jnp.arange(num_pages, dtype=jnp.int32), mode="drop"), (slots,)),
  }


def mosaic_stages(q, cache, table) -> dict:
  """The Mosaic GPU kernel's path: the whole call, the wrapper's split of the table with the
  query rows, the kernel alone, the log-sum-exp combine."""
  pages_per_block = tuned_block_sizes.mosaic_decode_pages_per_block(table.page_size)
  num_splits = tuned_block_sizes.mosaic_num_splits(q.shape[0], 8, table.max_pages,
                                                   pages_per_block,
                                                   tuned_block_sizes.GPU_DEFAULT_CORES)

  prepare = lambda q, cache, table: mosaic_decode.prepare(q, cache, table, None, num_splits,
                                                           pages_per_block)
  inputs = prepare(q, cache, table)
  run_kernel = functools.partial(mosaic_decode.run_kernel, max_pages=table.max_pages,
                                 num_splits=num_splits, pages_per_block=pages_per_block,
                                 stages=tuned_block_sizes.MOSAIC_DECODE_STAGES,
                                 code_stages=tuned_block_sizes.MOSAIC_DECODE_CODE_STAGES,
                                 scale=128**-0.5, softcap=None)
  partials = run_kernel(q, *inputs, cache)
  return {
      f"mosaic: mosaic_decode splits={num_splits}": (mosaic_decode.mosaic_decode,
                                                      (q, cache, table)),
      "mosaic: prepare (entries)": (prepare, (q, cache, table)),
      "mosaic: kernel": (run_kernel, (q,) + inputs + (cache,)),
      "mosaic: combine (combine_splits)": (lambda p: combine_splits.combine_splits(
          p, q.shape, out_dtype=q.dtype), (partials,)),
  }


def main(argv):
  del argv
  rows, rng = [], np.random.default_rng(0)
  first_selection = float(_SELECTIONS.value[0])
  per_call_us = lambda fn, *args: 1e6 * timing.device_seconds(fn, *args, reps=_REPS.value)
  for shape in _SHAPES.value:
    batch, num_tokens = map(int, shape.split("x"))
    kq, kk, kv = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(kq, (batch, 1, 32, 128), jnp.bfloat16)
    k = jax.random.normal(kk, (batch, num_tokens, 8, 128), jnp.bfloat16)
    v = jax.random.normal(kv, (batch, num_tokens, 8, 128), jnp.bfloat16)
    for selection in map(float, _SELECTIONS.value):
      for storage in _STORAGES.value:
        table = decode_inputs.selection_table(rng, batch, num_tokens, 16, selection,
                                              decode_inputs.precision_picker(storage))
        cache = decode_inputs.stored_cache(k, v, table, 16)
        blocks = tuned_block_sizes.gpu_decode_blocks(16, quantized=storage != "bf16")
        num_splits = tuned_block_sizes.gpu_num_splits(batch, 8, table.max_pages,
                                                  blocks.pages_per_block,
                                                  tuned_block_sizes.GPU_DEFAULT_CORES)
        run_kernel = functools.partial(kernel.run_kernel, num_splits=num_splits, blocks=blocks,
                                       poison=False, interpret=False,
                                       compute_dtype=jnp.bfloat16, scale=128**-0.5, softcap=None)
        q_shape = q.shape
        positions = table.query_positions(1)
        inputs = kernel.prepare(q, cache, table, positions, blocks.pages_per_block)
        partials = run_kernel(inputs, cache)
        stages = {
            "decode_attention (all)": (functools.partial(
                attention.decode_attention, implementation="pallas_gpu"), (q, cache, table)),
            f"selected_page_decode splits={num_splits}": (
                kernel.selected_page_decode, (q, cache, table)),
            "prepare (lookup, pack, group)": (lambda q, c, t: kernel.prepare(
                q, c, t, positions, blocks.pages_per_block), (q, cache, table)),
            "kernel": (run_kernel, (inputs, cache)),
            "combine (XLA, splits.combine)": (lambda p: splits.combine(p, q_shape), (partials,)),
            "combine (combine_splits)": (lambda p: combine_splits.combine_splits(
                p, q_shape, out_dtype=q.dtype), (partials,)),
        }
        for factor in map(float, _SPLIT_FACTORS.value):
          other = max(1, int(num_splits * factor))
          stages[f"selected_page_decode splits={other}"] = (
              functools.partial(kernel.selected_page_decode, num_splits=other),
              (q, cache, table))
        if _QUERY_SELECTION.value and storage == "bf16" and selection == first_selection:
          stages.update(selection_stages(q, cache, selection))
        stages.update(mosaic_stages(q, cache, table))
        if storage == "bf16":
          _, slots = kernel.cache_lib.lookup(cache, table)
          pool = cache.pools[Precision.BF16]
          stages["jax pallas paged_attention"] = (
              functools.partial(decode_inputs.jax_paged_attention, k_splits=16),
              (q, pool.k, pool.v, slots))
        for name, (stage, args) in stages.items():
          us = per_call_us(stage, *args)
          rows.append(dict(shape=shape, selection=selection, storage=storage, stage=name, us=us))
          print(f"{shape:<9} sel={selection:<7} {storage:<5} {name:<28} {us:8.1f} us", flush=True)
        del cache
    del q, k, v
  report.write_json(_JSON_OUT.value, rows)


if __name__ == "__main__":
  app.run(main)
