"""Argument checks shared by the API boundary: each raises a message naming the argument."""

import enum

import jax
import numpy as np


def is_int(value) -> bool:
  """True for Python and numpy integers, False for bools."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def require_positive_ints(config, names) -> None:
  """Raises ValueError naming the first of the `names` attributes of `config` that is not an int
  >= 1 (bools are not ints)."""
  for name in names:
    value = getattr(config, name)
    if not is_int(value) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive int")


def as_enum(cls: type[enum.IntEnum], value, name: str):
  """Returns `value` as a member of `cls`, or raises TypeError/ValueError naming `name`."""
  if not is_int(value):
    raise TypeError(f"{name} must be a {cls.__name__}, got {value!r}")
  try:
    return cls(value)
  except ValueError:
    raise ValueError(
        f"{name}={value!r} is not a {cls.__name__}; expected one of"
        f" {[member.name for member in cls]}") from None


def is_traced(*xs) -> bool:
  """Whether any leaf of xs is a tracer (the caller runs inside jit)."""
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))
