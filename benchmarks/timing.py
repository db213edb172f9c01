"""Wall-clock timing of jitted functions: warm-up, then the median of repeated timed calls."""

import statistics
import time

import jax


def median_seconds(fn, *args, warmup: int = 2, repeats: int = 10) -> float:
  """Median seconds of `fn(*args)`, each call waited on with block_until_ready."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)
