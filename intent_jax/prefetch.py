"""Speculative prefetch: predict the next step's pages from the last steps' selections.

The predictor votes: a page is predicted for step s if the tables of at least `min_votes` of the
steps s - window .. s - 1 read it. The simulator replays a sequence of selections and reports how
many needed pages the prediction covered and how many bytes it would move early or in vain.
Prefetching never changes a result; it only orders copies.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class PrefetchReport:
  """Totals over the simulated steps (every step after the first)."""

  hit_rate: float  # Needed pages that were predicted / needed pages.
  precision: float  # Predicted pages that were needed / predicted pages.
  needed_pages: int
  predicted_pages: int
  early_bytes: float  # Bytes of predicted pages that were needed (moved ahead of time).
  wasted_bytes: float  # Bytes of predicted pages that were not needed.


def predictions(selections: jax.Array, *, window: int, min_votes: int = 1) -> jax.Array:
  """bool[steps, ..., pages]: the prediction for each step from the `window` steps before it.

  Step 0 has no history and predicts nothing.
  """
  if window < 1 or not 1 <= min_votes <= window:
    raise ValueError(f"need window >= 1 and 1 <= min_votes <= window, got {window}, {min_votes}")
  counts = jnp.cumsum(selections.astype(jnp.int32), axis=0)
  counts = jnp.concatenate([jnp.zeros_like(counts[:1]), counts], axis=0)
  steps = selections.shape[0]
  upto = jnp.arange(steps)
  since = jnp.maximum(upto - window, 0)
  return (counts[upto] - counts[since]) >= min_votes


def simulate(selections: jax.Array, *, window: int, page_bytes: float,
             min_votes: int = 1) -> PrefetchReport:
  """Replays bool[steps, ..., pages] selections (host side) and reports the predictor's record."""
  predicted = predictions(selections, window=window, min_votes=min_votes)[1:]
  needed = selections[1:]
  hits = int(jnp.sum(predicted & needed))
  needed_pages, predicted_pages = int(jnp.sum(needed)), int(jnp.sum(predicted))
  return PrefetchReport(
      hit_rate=hits / max(needed_pages, 1),
      precision=hits / max(predicted_pages, 1),
      needed_pages=needed_pages,
      predicted_pages=predicted_pages,
      early_bytes=hits * page_bytes,
      wasted_bytes=(predicted_pages - hits) * page_bytes,
  )
