"""The default run and `-m slow`: one rule for every parametrized test that keeps a subset by default."""
import pytest


def default_or_slow(cases, default):
  """pytest params of `cases` (each a value, or a tuple of the test's argument values): those in `default`
  run by default, the others only with -m slow."""
  default = set(default)
  return [pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=() if c in default else pytest.mark.slow)
          for c in cases]
