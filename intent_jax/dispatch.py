"""Choosing among implementations of one function: the first that takes the inputs."""


def first_supported(names, attempt):
  """attempt(name) for the first of `names` whose attempt does not raise NotImplementedError;
  the last name is attempted unguarded, so its error reaches the caller."""
  for name in names[:-1]:
    try:
      return attempt(name)
    except NotImplementedError:
      continue
  return attempt(names[-1])
