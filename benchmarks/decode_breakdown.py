r"""Device time of each stage of the GPU decode path, free of host dispatch.

Each stage runs `--reps` times inside one jitted loop, each repetition made to depend on the last
(so none is hoisted or merged); the time of an empty loop of as many repetitions is subtracted.

  python -m benchmarks.decode_breakdown --shapes=8x131072,1x131072 --storages=bf16,int4

--split_factors also times the whole call with the default split count times each factor.
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
from intent_jax.precision import Precision
from pallas_kernels import splits
from pallas_kernels import tuned_block_sizes
from pallas_kernels.gpu import selected_page_decode as kernel

_SHAPES = flags.DEFINE_list("shapes", ["8x131072", "1x131072"], "batch x tokens.")
_SELECTIONS = flags.DEFINE_list("selections", ["0.25", "0.0625"], "Fractions of pages read.")
_STORAGES = flags.DEFINE_list("storages", ["bf16", "int4"], "Formats of the pages.")
_REPS = flags.DEFINE_integer("reps", 20, "Repetitions inside one jitted loop.")
_SPLIT_FACTORS = flags.DEFINE_list("split_factors", [], "Also time the whole call with the "
                                   "default split count times these (e.g. 0.5,2).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the rows to this JSON file.")


def looped(stage, reps):
  """A jitted function running stage(nudge, *args) `reps` times, each depending on the last."""

  @jax.jit
  def run(*args):
    def body(_, carry):
      out = stage(carry * 0.0, *args)  # carry * 0 is not folded for floats: a true dependence.
      return carry + jax.tree.leaves(out)[0].ravel()[0].astype(jnp.float32)
    return jax.lax.fori_loop(0, reps, body, jnp.float32(0))

  return run


def main(argv):
  del argv
  reps, rows, rng = _REPS.value, [], np.random.default_rng(0)
  per_rep = lambda fn, *args: timing.median_seconds(looped(fn, reps), *args, rounds=3,
                                                    calls=3) / reps * 1e6
  empty_us = per_rep(lambda nudge: nudge)
  print(f"empty loop: {empty_us:.1f} us per repetition (subtracted below)")
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
        nudge_q = lambda nudge, q: q + nudge.astype(q.dtype)
        q_shape = q.shape
        positions = table.query_positions(1)
        inputs = kernel.prepare(q, cache, table, positions, blocks.pages_per_block)
        partials = run_kernel(inputs, cache)
        stages = {
            "decode_attention (all)": (lambda n, q, c, t: attention.decode_attention(
                nudge_q(n, q), c, t, implementation="pallas_gpu"), (q, cache, table)),
            f"selected_page_decode splits={num_splits}": (
                lambda n, q, c, t: kernel.selected_page_decode(nudge_q(n, q), c, t),
                (q, cache, table)),
            "prepare (lookup, pack, group)": (lambda n, q, c, t: kernel.prepare(
                nudge_q(n, q), c, t, positions, blocks.pages_per_block), (q, cache, table)),
            "kernel": (lambda n, i, c: run_kernel(
                i[:-1] + (nudge_q(n, i[-1]),), c), (inputs, cache)),
            "combine": (lambda n, p: splits.combine(
                (p[0] + n,) + tuple(p[1:]), q_shape), (partials,)),
        }
        for factor in map(float, _SPLIT_FACTORS.value):
          other = max(1, int(num_splits * factor))
          stages[f"selected_page_decode splits={other}"] = (
              lambda n, q, c, t, other=other: kernel.selected_page_decode(
                  nudge_q(n, q), c, t, num_splits=other), (q, cache, table))
        if storage == "bf16":
          _, slots = kernel.cache_lib.lookup(cache, table)
          pool = cache.pools[Precision.BF16]
          stages["jax pallas paged_attention"] = (
              lambda n, q, kp, vp, s: decode_inputs.jax_paged_attention(
                  nudge_q(n, q), kp, vp, s, k_splits=16), (q, pool.k, pool.v, slots))
        for name, (stage, args) in stages.items():
          us = per_rep(stage, *args) - empty_us
          rows.append(dict(shape=shape, selection=selection, storage=storage, stage=name, us=us))
          print(f"{shape:<9} sel={selection:<7} {storage:<5} {name:<28} {us:8.1f} us", flush=True)
        del cache
    del q, k, v
  report.write_json(_JSON_OUT.value, rows)


if __name__ == "__main__":
  app.run(main)
