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
# The restructuring reproduced every array bit for bit; two later changes of
# behaviour changed some, on purpose:
#   "sampled": each example draws from fold_in(rng, its index) (was: per
#     chunk), so that samples do not depend on the chunking (a new draw);
#   "/stream": a stream's batches are joined into chunks across batch
#     boundaries (was: each batch cut alone), so that a stream gives the
#     arrays' result: float32 rounding for per-example estimators, a new
#     value (the arrays') for "batched".
REFERENCE = GOLDEN / "e0cda3b.npz"
REFERENCE_JAX = "0.10.2"
CHANGED = {"sampled": None, "batched/fast/stream": None, "batched/stream": None,
           "stream": 1e-5}
# Written after those two changes (same jax): every array, bit for bit.
LATEST = GOLDEN / "global-keys.npz"

pytestmark = pytest.mark.golden


@pytest.fixture(scope="module")
def arrays():
  return golden.compute()


def load(path):
  with np.load(path) as npz:  # closed at once: warnings are errors here
    return {name: npz[name] for name in npz.files}


def test_every_reference_array_is_reproduced(arrays):
  want = load(REFERENCE)
  exact = jax.__version__ == REFERENCE_JAX
  assert set(want) <= set(arrays), set(want) - set(arrays)
  differ, kept = [], 0
  for name in want:
    a, b = want[name], arrays[name]
    assert a.shape == b.shape, name
    rtol = next((t for k, t in CHANGED.items() if k in name), 0.0)
    if rtol is None:
      continue  # changed on purpose (see CHANGED)
    kept += 1
    same = (np.array_equal(a, b) if exact and rtol == 0 else
            np.allclose(a, b, rtol=max(rtol, 1e-5), atol=1e-9))
    if not same:
      differ.append(name)
  assert kept > 200
  assert not differ, f"{len(differ)} arrays differ: {differ[:10]}"


def test_every_array_of_the_latest_version_is_reproduced(arrays):
  want = load(LATEST)
  exact = jax.__version__ == REFERENCE_JAX
  differ = [name for name in want if not (
      np.array_equal(want[name], arrays[name]) if exact else
      np.allclose(want[name], arrays[name], rtol=1e-5, atol=1e-9))]
  assert len(want) == len(arrays)
  assert not differ, f"{len(differ)} arrays differ: {differ[:10]}"
