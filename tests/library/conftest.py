"""The library's tests run strict: no implicit dtype promotion, and every
warning an error (as equinox's tests do). An autouse fixture and a marker,
rather than global settings, so that they do not reach the experiments'
tests when pytest-xdist runs both in one worker.

optax's own ``adam`` (its bias correction: ``1 - b ** count`` with an int32
count) and ``MultiSteps`` promote implicitly, so the tests that run them are
marked ``standard_promotion``; the library itself passes strict everywhere
else it is tested.
"""

import jax
import pytest


@pytest.fixture(autouse=True)
def _strict_dtype_promotion(request):
  mode = ("standard" if request.node.get_closest_marker("standard_promotion")
          else "strict")
  with jax.numpy_dtype_promotion(mode):
    yield


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if "library" in item.path.parts:
      item.add_marker(pytest.mark.filterwarnings("error"))
