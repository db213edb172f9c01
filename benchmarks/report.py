"""What every benchmark binary reports with: relative error and the JSON file of its rows."""

import json

import numpy as np


def relative_error(out, expected) -> float:
  """||out - expected|| / ||expected||, in float64."""
  out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(out - expected) / max(np.linalg.norm(expected), 1e-30))


def write_json(path: str | None, payload) -> None:
  """Writes `payload` to `path` as indented JSON; does nothing when path is None."""
  if path:
    with open(path, "w") as f:
      json.dump(payload, f, indent=2)
