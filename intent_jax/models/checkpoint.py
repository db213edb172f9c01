"""Saving and loading a model's parameters as one .npz file (no orbax needed).

Each parameter is stored under its path in the module tree ("blocks/0/attention/q_proj/kernel").
"""

import numpy as np

from flax import nnx
import jax.numpy as jnp


def _flat_params(model: nnx.Module) -> dict[str, object]:
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {"/".join(str(part) for part in path): variable for path, variable in flat}


def save(model: nnx.Module, path: str) -> None:
  """Writes the model's parameters to `path` (.npz); bfloat16 is stored as float32."""
  arrays = {}
  for name, variable in _flat_params(model).items():
    value = variable.get_value()
    arrays[name] = np.asarray(value.astype(jnp.float32) if value.dtype == jnp.bfloat16 else value)
  np.savez(path, **arrays)


def load(model: nnx.Module, path: str) -> nnx.Module:
  """Reads parameters saved by `save` into `model` (in place; also returned).

  Raises:
    ValueError: the file lacks a parameter of the model, has one the model lacks, or a shape
      differs.
  """
  with np.load(path) as stored:
    stored = {name: stored[name] for name in stored.files}
  params = _flat_params(model)
  missing, unexpected = sorted(set(params) - set(stored)), sorted(set(stored) - set(params))
  if missing or unexpected:
    raise ValueError(f"checkpoint {path} does not fit the model: missing {missing[:5]},"
                     f" unexpected {unexpected[:5]}")
  for name, variable in params.items():  # Check every shape before changing anything.
    if stored[name].shape != variable.get_value().shape:
      raise ValueError(f"checkpoint {path}: {name} has shape {stored[name].shape}, the model"
                       f" {variable.get_value().shape}")
  for name, variable in params.items():  # The state's variables are the model's own.
    variable.set_value(jnp.asarray(stored[name], variable.get_value().dtype))
  return model
