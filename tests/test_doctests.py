"""The docstring examples of the library run and print what they say."""

import doctest
import importlib

import pytest

MODULES = ["ewc_jax._src.fisher", "ewc_jax._src.transform",
           "ewc_jax._src.continual", "experiments.common.tracking"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name),
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0, f"{name} has no docstring example"
  assert result.failed == 0
