"""The docstring examples of the experiments' modules run as they say."""

import doctest
import importlib

import pytest

MODULES = ["experiments.common.tracking"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name),
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0, f"{name} has no docstring example"
  assert result.failed == 0
