"""Wall-clock timing of jitted functions, as the peer measurements in BENCHMARKS.md are taken.

Warm-up calls first (compilation, allocation); then `rounds` rounds of `calls` back-to-back calls
with one block_until_ready at the end of each round, so host dispatch overlaps device work. The
result is the median over rounds of the time per call.
"""

import statistics
import time

import jax


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
