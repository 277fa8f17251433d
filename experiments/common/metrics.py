"""Continual-learning metrics from an accuracy matrix.

``R[i, j]`` is the test accuracy on task ``j`` after training task ``i``, for
``T`` tasks; ``b[j]`` is the accuracy of the initial (untrained) model on task
``j``. Definitions follow Lopez-Paz & Ranzato 2017 ("Gradient Episodic Memory
for Continual Learning", https://arxiv.org/abs/1706.08840) for ACC, BWT and
FWT, and Chaudhry et al. 2018 ("Riemannian Walk for Incremental Learning",
https://arxiv.org/abs/1801.10112) for forgetting.

With a single task there is nothing earlier to forget or transfer from, so
`bwt`, `fwt` and `forgetting` are defined as 0.0 when ``T == 1``.
"""

import numpy as np


def _check_matrix(R) -> np.ndarray:
  R = np.asarray(R, dtype=np.float64)
  if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
    raise ValueError(
      "R must be a non-empty square T x T matrix (R[i, j] = accuracy on task j "
      f"after training task i), got shape {R.shape}"
    )
  return R


def acc(R) -> float:
  """Average accuracy over all tasks after the last one: ``mean_j R[T-1, j]``.

  Args:
    R: T x T accuracy matrix.

  Returns:
    The final average accuracy.
  """
  return float(_check_matrix(R)[-1].mean())


def bwt(R) -> float:
  """Backward transfer: ``mean_{j<T-1} (R[T-1, j] - R[j, j])``.

  Negative values mean forgetting.

  Args:
    R: T x T accuracy matrix.

  Returns:
    The backward transfer, 0.0 for one task.
  """
  R = _check_matrix(R)
  if len(R) == 1:
    return 0.0
  return float(np.mean(R[-1, :-1] - np.diag(R)[:-1]))


def fwt(R, b) -> float:
  """Forward transfer: ``mean_{j>0} (R[j-1, j] - b[j])``.

  Args:
    R: T x T accuracy matrix.
    b: length-T accuracies of the initial model on each task.

  Returns:
    The forward transfer, 0.0 for one task.
  """
  R = _check_matrix(R)
  b = np.asarray(b, dtype=np.float64)
  if b.shape != (len(R),):
    raise ValueError(f"b must have shape ({len(R)},) to match R, got {b.shape}")
  if len(R) == 1:
    return 0.0
  return float(np.mean(np.diag(R, k=1) - b[1:]))


def forgetting(R) -> float:
  """Average forgetting: ``mean_{j<T-1} (max_{l<T-1} R[l, j] - R[T-1, j])``.

  Args:
    R: T x T accuracy matrix.

  Returns:
    The average forgetting, 0.0 for one task.
  """
  R = _check_matrix(R)
  if len(R) == 1:
    return 0.0
  return float(np.mean(R[:-1, :-1].max(axis=0) - R[-1, :-1]))


def average_accuracy_curve(R) -> np.ndarray:
  """Average accuracy on the tasks seen so far, after each task.

  Args:
    R: T x T accuracy matrix.

  Returns:
    Length-T array with entry ``i`` equal to ``mean_{j<=i} R[i, j]``.
  """
  R = _check_matrix(R)
  return np.array([R[i, : i + 1].mean() for i in range(len(R))])


def summarize(R, b=None) -> dict:
  """All scalar metrics of an accuracy matrix.

  Args:
    R: T x T accuracy matrix.
    b: optional length-T accuracies of the initial model; adds ``fwt``.

  Returns:
    ``{"acc", "bwt", "forgetting"}`` and ``"fwt"`` when ``b`` is given.
    With one task BWT, FWT and forgetting are undefined (no earlier or later
    task): they are ``None`` (``n/a`` in tables, ``null`` in JSON), not 0.
  """
  one = len(_check_matrix(R)) == 1
  summary = {"acc": acc(R), "bwt": None if one else bwt(R),
             "forgetting": None if one else forgetting(R)}
  if b is not None:
    fwt_value = fwt(R, b)  # checks b's shape even for one task
    summary["fwt"] = None if one else fwt_value
  return summary
