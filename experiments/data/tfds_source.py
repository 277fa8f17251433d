"""MNIST and Fashion-MNIST from TensorFlow Datasets, read without TensorFlow.

A prepared dataset (ArrayRecord files) is read with ``tfds.data_source``;
preparing one needs TensorFlow and the download host, both checked first
(`check_tfds`) so that an offline call fails within seconds.
tensorflow_datasets is imported on first use only.
"""

import contextlib
import importlib.util
import logging
import socket
import threading
import urllib.parse

import numpy as np

from experiments.data.dataset import IMAGE_SHAPE
from experiments.data.dataset import DataError
from experiments.data.dataset import Dataset
from experiments.data.dataset import make_dataset

TFDS_NAMES = ("mnist", "fashion_mnist")


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


@contextlib.contextmanager
def _quiet_absl():
  """Mutes absl warnings while TFDS looks for a dataset: it warns about
  folders that do not exist (``Variant folder ... has no
  dataset_info.json``), which only repeats what `check_tfds` reports."""
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl.setLevel(level)


def import_tfds():
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


def _tfds_prepare_blocker(name: str) -> str | None:
  """Returns why TFDS ``name`` cannot be prepared here, or None if it can."""
  # tfds's MNIST builders read the downloads with tf.io.gfile and encode
  # PNGs with tf.image, so preparing (unlike reading) needs TensorFlow.
  if importlib.util.find_spec("tensorflow") is None:
    return "preparing it needs TensorFlow, which is not installed"
  url = import_tfds().builder_cls(name).URL
  if not network_reachable(url):
    return f"its download host ({url}) is not reachable"
  return None


def _tfds_builder(name: str, data_dir):
  # Random access (tfds.data_source) needs ArrayRecord files, not TFRecords.
  tfds = import_tfds()
  with _quiet_absl():
    return tfds.builder(name, data_dir=data_dir, file_format="array_record")


def check_tfds(name: str, data_dir) -> bool:
  """Whether TFDS ``name`` is prepared; `DataError` if it cannot be made so."""
  if name not in TFDS_NAMES:
    raise DataError(
      f"unknown TFDS dataset {name!r}; expected one of {TFDS_NAMES}"
    )
  builder = _tfds_builder(name, data_dir)
  with _quiet_absl():
    prepared = builder.is_prepared()
  if prepared:
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
  prepared = check_tfds(name, data_dir)
  tfds = import_tfds()
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
  return make_dataset(
    **arrays,
    name=name,
    description=(
      f"TFDS {name} {builder.version} from {builder.data_dir} "
      f"({len(arrays['train_y'])} train / {len(arrays['test_y'])} test)"
    ),
  )
