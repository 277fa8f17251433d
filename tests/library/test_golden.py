"""Today's Fisher, KFAC and MAS arrays against those of an earlier version.

``golden/<commit>.npz`` holds the arrays of ``golden.compute()`` written by
the library at that commit (``python -m tests.library.golden --write``). A
restructuring that changes no maths must reproduce them bit for bit on the
same jax and machine kind; elsewhere (another jax, another CPU) rounding may
differ, so the test then allows float32 rounding. Its own CI step runs it:
``python -m pytest -q -m golden tests/library/test_golden.py``.
"""

import pathlib

import jax
import numpy as np
import pytest

from tests.library import golden

GOLDEN = pathlib.Path(__file__).parent / "golden"
# Written at e0cda3b (before the library's restructuring) with jax 0.10.2.
REFERENCE = GOLDEN / "e0cda3b.npz"
REFERENCE_JAX = "0.10.2"

pytestmark = pytest.mark.golden


@pytest.fixture(scope="module")
def arrays():
  return golden.compute()


def test_every_reference_array_is_reproduced(arrays):
  want = np.load(REFERENCE)
  exact = jax.__version__ == REFERENCE_JAX
  assert set(want.files) <= set(arrays), set(want.files) - set(arrays)
  differ = []
  for name in want.files:
    a, b = want[name], arrays[name]
    assert a.shape == b.shape, name
    same = np.array_equal(a, b) if exact else np.allclose(a, b, rtol=1e-5,
                                                          atol=1e-9)
    if not same:
      differ.append(name)
  assert not differ, f"{len(differ)} arrays differ: {differ[:10]}"
