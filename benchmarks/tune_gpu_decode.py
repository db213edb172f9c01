r"""Sweep the GPU kernel's block sizes on one shape: time per variant, to fill tuned_block_sizes.

  python -m benchmarks.tune_gpu_decode --shape=8x131072 --selection=0.25 --storages=bf16,int8
"""

import functools
import itertools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import decode_inputs
from benchmarks import report
from benchmarks import timing
from intent_jax import cost
from intent_jax import cache as cache_lib
from pallas_kernels import tuned_block_sizes
from pallas_kernels.gpu import selected_page_decode as kernel

_SHAPES = flags.DEFINE_list("shapes", ["8x131072", "1x131072"], "batch x tokens.")
_SELECTION = flags.DEFINE_float("selection", 0.25, "Fraction of pages read.")
_STORAGES = flags.DEFINE_list("storages", ["bf16", "int8", "int4"], "Formats of the pages.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per page.")
_PAGES_PER_BLOCK = flags.DEFINE_list("pages_per_block", ["8", "16"], "Values to sweep.")
_NUM_WARPS = flags.DEFINE_list("num_warps", ["4", "8"], "Values to sweep.")
_NUM_STAGES = flags.DEFINE_list("num_stages", ["2", "3"], "Values to sweep.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the rows to this JSON file.")


def main(argv):
  del argv
  rows, rng = [], np.random.default_rng(0)
  for shape in _SHAPES.value:
    batch, num_tokens = map(int, shape.split("x"))
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (batch, 1, 32, 128), jnp.bfloat16)
    k = jax.random.normal(kk, (batch, num_tokens, 8, 128), jnp.bfloat16)
    v = jax.random.normal(kv, (batch, num_tokens, 8, 128), jnp.bfloat16)
    for storage in _STORAGES.value:
      table = decode_inputs.selection_table(rng, batch, num_tokens, _PAGE_SIZE.value,
                                            _SELECTION.value,
                                            decode_inputs.precision_picker(storage))
      cache = decode_inputs.stored_cache(k, v, table, _PAGE_SIZE.value)
      stored, _ = cache_lib.lookup(cache, table)
      nbytes = float(jnp.sum(cost.routed_kv_bytes(table, 8, 128, precisions=stored)))
      prep = jax.jit(lambda q, c, t: kernel.prepare(q, c, t, t.query_positions(1), 8))
      prep_us = timing.median_seconds(prep, q, cache, table) * 1e6
      for ppb, warps, stages in itertools.product(*(map(int, f.value) for f in (
          _PAGES_PER_BLOCK, _NUM_WARPS, _NUM_STAGES))):
        blocks = tuned_block_sizes.GpuDecodeBlocks(ppb, warps, stages)
        run = jax.jit(functools.partial(kernel.selected_page_decode, blocks=blocks))
        try:
          us = timing.median_seconds(run, q, cache, table) * 1e6
        except Exception as e:  # pylint: disable=broad-except
          print(f"{shape} {storage} {blocks}: failed {type(e).__name__}: {str(e)[:300]}")
          continue
        rows.append(dict(shape=shape, storage=storage, pages_per_block=ppb, num_warps=warps,
                         num_stages=stages, us=us, gbps=nbytes / us / 1e3, prep_us=prep_us))
        print(f"{shape:<9} {storage:<5} ppb={ppb:<3} warps={warps} stages={stages}"
              f" {us:8.1f} us {nbytes / us / 1e3:7.0f} GB/s (prepare alone {prep_us:.1f} us)",
              flush=True)
      del cache
    del q, k, v
  report.write_json(_JSON_OUT.value, rows)


if __name__ == "__main__":
  app.run(main)
