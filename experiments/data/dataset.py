"""The in-memory dataset every loader returns, and its checks.

`Dataset` holds float32 images in [0, 1] of shape [N, 28, 28] and int32
labels; `make_dataset` builds one from 0..255 images and integer labels,
checking them. `DataError` is the one-line error of every data source;
`stratified_split` holds out the same share of each class.
"""

from typing import NamedTuple

import numpy as np

IMAGE_SHAPE = (28, 28)


class DataError(ValueError):
  """A data source that cannot be used.

  The message is one line (whitespace, newlines included, is collapsed) that
  names the file, directory or dataset and says what to do, so a command line
  can print it as is.
  """

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))


def check_split(
  name: str, split: str, num_images: int, labels, labels_name=None
) -> None:
  """Raises `DataError` unless a split has examples, one label each, 0..9,
  and at least two classes (labels that are all one value, e.g. all 0, are
  a zeroed or wrong label file: every task would be trivially solved)."""
  if num_images != len(labels):
    raise DataError(
      f"{name}: {num_images} {split} images but {len(labels)} {split} labels; "
      "the image and label files do not belong together"
    )
  if num_images == 0:
    raise DataError(f"{name}: the {split} split holds no examples")
  if labels.min() < 0 or labels.max() > 9:
    raise DataError(
      f"{name}: {split} labels must lie in 0..9, found "
      f"{labels.min()}..{labels.max()}"
    )
  if num_images > 1 and labels.min() == labels.max():
    raise DataError(
      f"{labels_name or name}: every one of the {num_images} {split} labels is "
      f"{labels.min()}: a classifier needs at least two classes; the label "
      "file is damaged or not this image file's"
    )


class Dataset(NamedTuple):
  """An image classification dataset held in memory.

  Attributes:
    train_x: float32 [N, 28, 28] training images in [0, 1].
    train_y: int32 [N] training labels.
    test_x: float32 [M, 28, 28] test images in [0, 1].
    test_y: int32 [M] test labels.
    num_classes: number of classes; labels are in ``range(num_classes)``.
    name: short name, e.g. ``"mnist"``.
    description: one line saying which data this is and where it came from.
  """

  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  name: str
  description: str


def _images(x: np.ndarray, what: str) -> np.ndarray:
  """Validates [N, 28, 28] pixel values in 0..255 and scales them to [0, 1]."""
  x = np.asarray(x)
  if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
    raise DataError(
      f"{what}: expected images of shape [N, 28, 28], got {x.shape}"
    )
  x = x.astype(np.float32)
  x /= 255.0
  return x


def make_dataset(
  train_x, train_y, test_x, test_y, name, description
) -> Dataset:
  """Builds a validated `Dataset` from 0..255 images and integer labels."""
  for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
    check_split(name, split, len(x), np.asarray(y))
  return Dataset(
    train_x=_images(train_x, f"{name} train images"),
    train_y=np.asarray(train_y, np.int32),
    test_x=_images(test_x, f"{name} test images"),
    test_y=np.asarray(test_y, np.int32),
    num_classes=10,
    name=name,
    description=description,
  )


def stratified_split(
  y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Splits indices into kept and held-out parts with the same class mix.

  Args:
    y: integer labels [N].
    fraction: share of each class to hold out, in [0, 1).
    seed: seed of the `np.random.default_rng` that picks the held-out examples.

  Returns:
    ``(keep, held)``: sorted index arrays that partition ``range(N)``; ``held``
    has ``round(fraction * n_c)`` examples of each class ``c``.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"fraction must be in [0, 1), got {fraction}")
  rng = np.random.default_rng(seed)
  held = [
    rng.permutation(idx)[: round(fraction * len(idx))]
    for idx in (np.flatnonzero(y == c) for c in np.unique(y))
  ]
  held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
  keep = np.setdiff1d(np.arange(len(y)), held)
  return keep, held
