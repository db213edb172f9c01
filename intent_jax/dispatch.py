"""Choosing among implementations of one function: the first that takes the inputs."""

import jax


def platform_order(default_order) -> tuple[str, ...]:
  """The names `default_order` ({platform: names}) tries on JAX's backend; ("reference",) on a
  platform it does not list."""
  return default_order.get(jax.default_backend(), ("reference",))


def require_platform(name: str) -> str:
  """The platform a "pallas_<platform>" implementation runs on; NotImplementedError elsewhere."""
  platform = name.removeprefix("pallas_")
  if jax.default_backend() != platform:
    raise NotImplementedError(f"{name} runs on {platform.upper()}s")
  return platform


def first_supported(names, attempt):
  """attempt(name) for the first of `names` whose attempt does not raise NotImplementedError;
  the last name is attempted unguarded, so its error reaches the caller."""
  for name in names[:-1]:
    try:
      return attempt(name)
    except NotImplementedError:
      continue
  return attempt(names[-1])
