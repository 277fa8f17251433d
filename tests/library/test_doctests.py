"""The docstring examples of the library run and print what they say."""

import doctest
import importlib

import pytest

# Module, and the optional package its examples need (None: the library's
# own dependencies suffice; CI's Python 3.12 step installs only those).
MODULES = [("ewc_jax._src.fisher", None), ("ewc_jax._src.transform", None),
           ("ewc_jax._src.continual", None),
           ("ewc_jax._src.hyperparams", None)]


@pytest.mark.parametrize("name,needs", MODULES)
def test_docstring_examples(name, needs):
  if needs is not None:
    pytest.importorskip(needs)
  result = doctest.testmod(importlib.import_module(name),
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0, f"{name} has no docstring example"
  assert result.failed == 0
