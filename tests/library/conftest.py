"""The library's tests run strict: no implicit dtype promotion, and every
warning an error (as equinox's tests do). An autouse fixture and a marker,
rather than global settings, so that they do not reach the experiments'
tests when pytest-xdist runs both in one worker."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _strict_dtype_promotion():
  with jax.numpy_dtype_promotion("strict"):
    yield


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if "library" in item.path.parts:
      item.add_marker(pytest.mark.filterwarnings("error"))
