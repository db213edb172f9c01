"""Timing of jitted functions for the benchmark binaries.

`median_seconds`: wall clock. Warm-up calls first (compilation, allocation); then `rounds` rounds
of `calls` back-to-back calls with one block_until_ready at the end of each round, so host
dispatch overlaps device work. The result is the median over rounds of the time per call. When a
call's device work is shorter than its host dispatch, this measures the host.

`device_seconds`: device time of one call, free of host dispatch. `reps` calls run back to back
inside one jitted function, each made to depend on the last (so none is merged or reordered),
optionally each after a read of a buffer larger than the L2 cache (so no call finds its inputs
there, as in a model where each layer reads other pages). The same function with the calls
replaced by a stand-in of the outputs' size is timed in turn with it; the median over rounds of
the difference is the time of `reps` calls.
"""

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

L2_FLUSH_BYTES = 2**27  # Over twice the L2 cache of the GPUs used (H100 50 MB, H200 60 MB).


def median_seconds(fn, *args, warmup: int = 3, rounds: int = 5, calls: int = 30) -> float:
  """Median over rounds of seconds per call of `fn(*args)`."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  per_call = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(calls - 1):
      fn(*args)
    jax.block_until_ready(fn(*args))
    per_call.append((time.perf_counter() - start) / calls)
  return statistics.median(per_call)


NUDGED_MAX_SIZE = 2**22  # Leaves up to this many elements (queries, tables) get the nudge.


def nudged(tree, nudge):
  """tree with `nudge` (an f32 scalar, 0 at run time) added to every array leaf of at most
  NUDGED_MAX_SIZE elements (as an integer to integer leaves; or-ed as nudge != 0 into booleans).
  Large leaves (cache pools) are left alone: nothing is computed from them but reads."""

  def add(x):
    if not isinstance(x, jax.Array) or x.size > NUDGED_MAX_SIZE:
      return x
    if x.dtype == jnp.bool_:
      return x | (nudge != 0)
    return x + nudge.astype(x.dtype)

  return jax.tree.map(add, tree)


def chained(fn, reps: int, flush: bool, stand_in_size: int = 0):
  """A jitted function of (buffer, *args) calling fn(*args) `reps` times in sequence.

  After each call its outputs are summed, and call i+1's arguments are `nudged` by 0 * that
  sum: a true dependence (x * 0 is not folded for floats) on every output, whole (a single
  element would let XLA compute only that element of a fused producer), and no work on the small
  arguments (a table's preprocessing) is shared between calls. With `flush`, each call first
  waits for a sum over the buffer, which evicts the L2 cache.
  fn=None: the chain without the calls, each output sum taken over `stand_in_size` elements of
  the buffer instead (the size of all of fn's outputs).
  """

  @jax.jit
  def run(buffer, *args):
    carry = jnp.float32(0)
    for _ in range(reps):  # Unrolled: no loop for XLA to hoist from, no host sync per step.
      if flush:
        carry = carry + jnp.sum(buffer + carry) * 0.0
      outs = [buffer[:stand_in_size] + carry] if fn is None else jax.tree.leaves(
          fn(*nudged(args, carry)))
      carry = carry + sum(jnp.sum(out, dtype=jnp.float32) for out in outs) * 0.0
    return carry

  return run


@functools.cache
def _buffer(size: int, devices: tuple):
  """f32[size] of random values, a copy on each device."""
  mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
  return jax.device_put(jax.random.normal(jax.random.key(0), (size,), jnp.float32),
                        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def device_seconds(fn, *args, reps: int = 10, flush: bool = True, rounds: int = 7) -> float:
  """Device seconds per call of fn(*args): the median over rounds of the chain's time (see
  `chained`) less the stand-in chain's, timed one after the other in each round.

  Every output must depend on some argument of at most NUDGED_MAX_SIZE elements (e.g. the
  query); the L2 flush runs on each device that args[0] lives on. Not for a plain elementwise
  fn (a copy): the sum of its output fuses with it, so its output is never written.
  """
  out_size = sum(x.size for x in jax.tree.leaves(jax.eval_shape(fn, *args)))
  devices = tuple(sorted(jax.tree.leaves(args[0])[0].sharding.device_set, key=lambda d: d.id))
  buffer = _buffer(max(L2_FLUSH_BYTES // 4 if flush else 0, out_size), devices)
  calls, stand_in = chained(fn, reps, flush), chained(None, reps, flush, out_size)
  timed = lambda chain: median_seconds(chain, buffer, *args, warmup=0, rounds=1, calls=3)
  for chain in (calls, stand_in) * 2:  # Warm-up: compilation, allocation.
    jax.block_until_ready(chain(buffer, *args))
  differences = [timed(calls) - timed(stand_in) for _ in range(rounds)]
  return max(statistics.median(differences), 0.0) / reps
