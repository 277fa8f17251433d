"""Continual-learning task streams built from a `Dataset`.

Every stream first holds out a validation split of the training data
(stratified, fixed seed; the test split is only reported), then derives its
tasks from the same three splits. Task transforms are data computed once
here, so they cannot differ between batches, epochs or data-loader workers.

* ``permuted``: a fixed random pixel permutation per task (Goodfellow et al.
  2013; Kirkpatrick et al. 2017). Labels unchanged, one shared 10-way head.
* ``rotated``: the images rotated by a fixed angle per task (Lopez-Paz &
  Ranzato 2017). Labels unchanged, one shared 10-way head.
* ``split_task`` / ``split_domain``: Split MNIST, five tasks of two classes
  each, in the task- or domain-incremental scenario (van de Ven & Tolias 2019,
  "Three scenarios for continual learning", https://arxiv.org/abs/1904.07734).
"""

import math
from typing import NamedTuple, Optional

import numpy as np
import scipy.ndimage

from experiments.data import IMAGE_SHAPE, Dataset, stratified_split

TASK_KINDS = ("permuted", "rotated", "split_task", "split_domain")
# The split kinds' tasks: the digit pairs (0, 1), (2, 3), ..., (8, 9).
SPLIT_TASKS = 5


class Task(NamedTuple):
  """One task of a stream.

  Attributes:
    name: e.g. ``"permuted-3"``.
    train_x: float32 [n, 28, 28] training images.
    train_y: int32 [n] training labels.
    val_x: float32 validation images, held out from the training data.
    val_y: int32 validation labels.
    test_x: float32 test images.
    test_y: int32 test labels.
    classes: labels that occur in this task; in the task-incremental scenario
      only these logits are active (one head per task).
    num_classes: size of the output layer; labels are in ``range(num_classes)``.
  """

  name: str
  train_x: np.ndarray
  train_y: np.ndarray
  val_x: np.ndarray
  val_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  classes: tuple[int, ...]
  num_classes: int


def train_val_split(
  x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int
):
  """Holds out a deterministic, class-stratified validation split.

  Args:
    x: examples [N, ...].
    y: integer labels [N].
    val_fraction: share of each class to hold out, in [0, 1).
    seed: seed of the split.

  Returns:
    ``(train_x, train_y, val_x, val_y)``, disjoint and in the original order.
  """
  keep, held = stratified_split(y, val_fraction, seed)
  return x[keep], y[keep], x[held], y[held]


def permute_pixels(x: np.ndarray, permutation: np.ndarray) -> np.ndarray:
  """Applies one pixel permutation to every image.

  Args:
    x: images [n, 28, 28].
    permutation: indices into the 784 flattened pixels; output pixel ``k`` is
      input pixel ``permutation[k]``.

  Returns:
    The permuted images [n, 28, 28].
  """
  return x.reshape(len(x), math.prod(x.shape[1:]))[:, permutation].reshape(
    x.shape
  )


def pad_images(x: np.ndarray, side: int) -> np.ndarray:
  """Zero-pads images ``[n, h, w]`` to ``[n, side, side]``, centred
  (``torchvision.transforms.Pad(2)`` for 28 -> 32)."""
  top, left = (side - x.shape[1]) // 2, (side - x.shape[2]) // 2
  return np.pad(x, [(0, 0), (top, side - x.shape[1] - top),
                    (left, side - x.shape[2] - left)])


def rotate_images(x: np.ndarray, angle: float) -> np.ndarray:
  """Rotates every image by ``angle`` degrees about its centre.

  Uses ``scipy.ndimage.rotate`` with bilinear interpolation (order 1), the
  size kept (``reshape=False``) and zeros filled in at the corners.

  Args:
    x: images [n, 28, 28].
    angle: rotation in degrees, counter-clockwise as displayed.

  Returns:
    The rotated images [n, 28, 28], same dtype.
  """
  return scipy.ndimage.rotate(x, angle, axes=(2, 1), reshape=False, order=1)


def _splits(ds: Dataset, val_fraction: float, seed: int):
  """Validates ``ds`` and returns its (train, val, test) (x, y) pairs."""
  for what, x in (("train_x", ds.train_x), ("test_x", ds.test_x)):
    if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
      raise ValueError(
        f"{ds.name} {what}: expected images [N, 28, 28], got {x.shape}"
      )
  train_x, train_y, val_x, val_y = train_val_split(
    ds.train_x, ds.train_y, val_fraction, seed
  )
  return (train_x, train_y), (val_x, val_y), (ds.test_x, ds.test_y)


def _check_num_tasks(num_tasks: int) -> None:
  if num_tasks < 1:
    raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")


def _transformed_tasks(ds, transforms, val_fraction, seed) -> list[Task]:
  """One task per named image transform; labels and head unchanged."""
  (train_x, train_y), (val_x, val_y), (test_x, test_y) = _splits(
    ds, val_fraction, seed
  )
  classes = tuple(range(ds.num_classes))
  return [
    Task(
      name,
      f(train_x),
      train_y,
      f(val_x),
      val_y,
      f(test_x),
      test_y,
      classes,
      ds.num_classes,
    )
    for name, f in transforms.items()
  ]


def permuted_tasks(
  ds: Dataset,
  num_tasks: int,
  seed: int,
  val_fraction: float = 0.1,
  first_identity: bool = False,
  pad_to: Optional[int] = None,
) -> list[Task]:
  """Permuted MNIST: each task applies its own fixed pixel permutation.

  The permutations are drawn once from ``np.random.default_rng(seed)`` and
  the same one is applied to a task's train, validation and test images.
  With ``pad_to`` the images are first zero-padded (centred) to
  ``pad_to x pad_to`` and the permutation runs over all ``pad_to**2``
  pixels, padding included, as van de Ven & Tolias's code does (32: 1024
  inputs).

  Args:
    ds: the source dataset.
    num_tasks: number of tasks.
    seed: seed of the permutations and of the validation split.
    val_fraction: share of the training data held out for validation.
    first_identity: leave task 0 unpermuted (the later tasks do not change).
    pad_to: pad the images to this side before permuting (``None``: 28,
      no padding).

  Returns:
    ``num_tasks`` tasks named ``permuted-{t}``, all classes active, images
    ``[n, pad_to, pad_to]`` with ``pad_to``.
  """
  _check_num_tasks(num_tasks)
  side = IMAGE_SHAPE[0] if pad_to is None else pad_to
  if side < IMAGE_SHAPE[0]:
    raise ValueError(f"pad_to must be None or >= {IMAGE_SHAPE[0]}, got "
                     f"{pad_to}.")
  rng = np.random.default_rng(seed)
  size = side * side
  permutations = [rng.permutation(size) for _ in range(num_tasks)]
  if first_identity:
    permutations[0] = np.arange(size)
  transforms = {
    f"permuted-{t}": lambda x, p=p: permute_pixels(pad_images(x, side), p)
    for t, p in enumerate(permutations)
  }
  return _transformed_tasks(ds, transforms, val_fraction, seed)


def rotated_tasks(
  ds: Dataset,
  num_tasks: int,
  seed: int,
  max_angle: float = 180.0,
  angles=None,
  val_fraction: float = 0.1,
) -> list[Task]:
  """Rotated MNIST: each task rotates all images by its own fixed angle.

  Args:
    ds: the source dataset.
    num_tasks: number of tasks.
    seed: seed of the validation split (the angles are not random).
    max_angle: by default the angles are ``max_angle * t / num_tasks`` for
      task ``t``, evenly spaced in ``[0, max_angle)``.
    angles: explicit angles in degrees, one per task, instead.
    val_fraction: share of the training data held out for validation.

  Returns:
    ``num_tasks`` tasks named ``rotated-{angle}``, all classes active.
  """
  _check_num_tasks(num_tasks)
  if angles is None:
    angles = [max_angle * t / num_tasks for t in range(num_tasks)]
  elif len(angles) != num_tasks:
    raise ValueError(
      f"angles has {len(angles)} entries but num_tasks is {num_tasks}"
    )
  transforms = {
    f"rotated-{a:g}": lambda x, a=a: rotate_images(x, a) for a in angles
  }
  if len(transforms) != num_tasks:
    raise ValueError(f"angles must be distinct, got {list(angles)}")
  return _transformed_tasks(ds, transforms, val_fraction, seed)


def split_tasks(
  ds: Dataset,
  scenario: str,
  seed: int,
  val_fraction: float = 0.1,
  num_tasks: int = 5,
) -> list[Task]:
  """Split MNIST: task ``t`` holds the two classes ``(2t, 2t + 1)``.

  Scenarios (van de Ven & Tolias 2019):

  * ``"task"`` (task-incremental): labels stay global in 0..9 and
    ``classes`` names the two logits of the task. The training code masks the
    logits to ``classes`` (one head per task) and needs to know the task at
    test time.
  * ``"domain"`` (domain-incremental): labels become ``y - 2t`` (0 for the
    even digit, 1 for the odd one) with one shared 2-way head,
    ``classes == (0, 1)`` and ``num_classes == 2``; no task identity needed.

  Args:
    ds: the source dataset (10 classes).
    scenario: ``"task"`` or ``"domain"``.
    seed: seed of the validation split.
    val_fraction: share of the training data held out for validation.
    num_tasks: the first ``num_tasks`` class pairs, 1 to 5.

  Returns:
    ``num_tasks`` tasks named ``split-{a}{b}``.
  """
  if scenario not in ("task", "domain"):
    raise ValueError(f"scenario must be 'task' or 'domain', got {scenario!r}")
  if not 1 <= num_tasks <= ds.num_classes // 2:
    raise ValueError(
      f"num_tasks must be in 1..{ds.num_classes // 2}, got {num_tasks}"
    )
  splits = _splits(ds, val_fraction, seed)
  tasks = []
  for t in range(num_tasks):
    pair = (2 * t, 2 * t + 1)
    parts = []
    for x, y in splits:
      mask = np.isin(y, pair)
      parts += [x[mask], y[mask] - 2 * t if scenario == "domain" else y[mask]]
    classes, num_classes = (
      ((0, 1), 2) if scenario == "domain" else (pair, ds.num_classes)
    )
    tasks.append(
      Task(f"split-{pair[0]}{pair[1]}", *parts, classes, num_classes)
    )
  return tasks


def make_tasks(
  kind: str, ds: Dataset, num_tasks: int, seed: int, **kwargs
) -> list[Task]:
  """Builds a task stream by name.

  Args:
    kind: one of `TASK_KINDS`: ``"permuted"``, ``"rotated"``, ``"split_task"``
      or ``"split_domain"``.
    ds: the source dataset.
    num_tasks: number of tasks (at most 5 for the split kinds).
    seed: seed of the stream and of its validation split.
    **kwargs: passed on to `permuted_tasks`, `rotated_tasks` or `split_tasks`.

  Returns:
    The list of tasks.
  """
  if kind == "permuted":
    return permuted_tasks(ds, num_tasks, seed, **kwargs)
  if kind == "rotated":
    return rotated_tasks(ds, num_tasks, seed, **kwargs)
  if kind in ("split_task", "split_domain"):
    return split_tasks(
      ds, kind.removeprefix("split_"), seed, num_tasks=num_tasks, **kwargs
    )
  raise ValueError(
    f"unknown task kind {kind!r}; valid kinds: {', '.join(TASK_KINDS)}"
  )
