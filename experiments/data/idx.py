"""MNIST-format IDX files, read without trusting their headers.

An IDX file is a magic number (0x00000803 for images, 0x00000801 for labels),
big-endian uint32 dimensions, then the bytes. `read_idx` reads one, plain or
gzip-compressed; `scan_idx_dir` checks (and optionally reads) the four files
of a directory; `load_idx_dir` loads them as a `Dataset`. Every problem is a
`DataError` whose one-line message names the file and says what to do.
"""

import gzip
import math
import pathlib
import struct
import zlib

import numpy as np

from experiments.data.dataset import IMAGE_SHAPE
from experiments.data.dataset import DataError
from experiments.data.dataset import Dataset
from experiments.data.dataset import check_split
from experiments.data.dataset import make_dataset

IDX_FILES = {
  "train_x": "train-images-idx3-ubyte",
  "train_y": "train-labels-idx1-ubyte",
  "test_x": "t10k-images-idx3-ubyte",
  "test_y": "t10k-labels-idx1-ubyte",
}
_IDX_NDIM = {0x00000801: 1, 0x00000803: 3}  # magic -> number of dimensions
_GZIP_MAGIC = b"\x1f\x8b"
# Deflate expands at most about 1032-fold: a gzip file whose IDX header claims
# more than this many times its size is truncated or lying.
_MAX_GZIP_RATIO = 1032
_CHUNK = 1 << 20
_IDX_HINT = (
  "expected train-images-idx3-ubyte, train-labels-idx1-ubyte, "
  "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each optionally .gz), "
  "e.g. from Debian's dataset-fashion-mnist package "
  "(see `dpkg -L dataset-fashion-mnist`)"
)


def _read_chunks(f, n: int, keep: bool):
  """Reads up to ``n`` bytes of ``f`` in chunks; the bytes or their count."""
  buf, count = bytearray(), 0
  while count < n:
    chunk = f.read(min(_CHUNK, n - count))
    if not chunk:
      break
    count += len(chunk)
    if keep:
      buf += chunk
  return buf if keep else count


def _idx_header(f, path, size: int, compressed: bool) -> tuple[int, ...]:
  """Reads and checks the header; the dims, never trusted beyond the file."""
  head = f.read(4)
  magic = int.from_bytes(head, "big")
  if magic not in _IDX_NDIM:
    raise DataError(
      f"{path}: expected IDX magic 0x00000803 (images) or 0x00000801 (labels), "
      f"found {'0x' + head.hex() if head else 'an empty file'}; "
      "is this an MNIST-format file?"
    )
  header = 4 + 4 * _IDX_NDIM[magic]
  raw = f.read(header - 4)
  if len(raw) < header - 4:
    raise DataError(
      f"{path}: truncated header, expected {header} bytes, "
      f"found {4 + len(raw)}; download the file again"
    )
  dims = struct.unpack(f">{_IDX_NDIM[magic]}I", raw)
  expected = header + math.prod(dims)
  room = size * _MAX_GZIP_RATIO if compressed else size
  if expected > room:  # Checked before anything the size of the data is read.
    raise DataError(
      f"{path}: truncated: header says dims {dims}, i.e. {expected} bytes, "
      f"found {size}{' compressed' if compressed else ''} bytes; "
      "download the file again"
    )
  return dims


def _scan_idx(path, keep: bool):
  """``(dims, uint8 array or None)`` of an IDX file, checked throughout."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{path}: no such file")
  size = path.stat().st_size
  with path.open("rb") as f:
    compressed = f.read(2) == _GZIP_MAGIC
  try:
    with (gzip.open if compressed else open)(path, "rb") as f:
      dims = _idx_header(f, path, size, compressed)
      n = math.prod(dims)
      body = _read_chunks(f, n, keep)
      found = len(body) if keep else body
      trailing = len(f.read(_CHUNK))
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(
      f"{path}: corrupt gzip data ({e}); download the file again"
    ) from e
  if found != n or trailing:
    header = 4 + 4 * len(dims)
    problem = "truncated" if found < n else "trailing bytes"
    total = header + found + trailing
    raise DataError(
      f"{path}: {problem}: header says dims {dims}, i.e. {header + n} bytes, "
      f"found {total}{'+' if trailing == _CHUNK else ''} bytes"
      f"{' after decompression' if compressed else ''}; "
      "download the file again"
    )
  return dims, np.frombuffer(body, np.uint8).reshape(dims) if keep else None


def read_idx(path) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (the MNIST file format).

  Gzip-compressed files are recognised by their magic bytes, whatever the
  file name. The header is checked against the file's size before anything
  is allocated, so a damaged header cannot ask for terabytes.

  Args:
    path: file with magic 0x00000803 (images [N, rows, cols]) or 0x00000801
      (labels [N]), then big-endian uint32 dimensions and the data.

  Returns:
    A writable uint8 array with the dimensions given in the header.

  Raises:
    DataError: no such file, bad gzip stream, unknown magic, or a size that
      does not match the header (truncated file or trailing bytes).
  """
  return _scan_idx(path, keep=True)[1]


def _idx_paths(data_dir) -> dict[str, pathlib.Path]:
  """The four IDX files of ``data_dir`` (plain or .gz), or a `DataError`."""
  if data_dir is None:
    raise DataError(
      "--dataset idx needs --data-dir DIR, the directory holding the four "
      f"IDX files; {_IDX_HINT}"
    )
  data_dir = pathlib.Path(data_dir)
  if not data_dir.exists():
    raise DataError(f"--data-dir {data_dir} does not exist; {_IDX_HINT}")
  if not data_dir.is_dir():
    raise DataError(
      f"--data-dir {data_dir} is a file, not a directory; pass the directory "
      f"that holds the IDX files; {_IDX_HINT}"
    )
  paths = {}
  for key, stem in IDX_FILES.items():
    found = [
      p for p in (data_dir / stem, data_dir / f"{stem}.gz") if p.is_file()
    ]
    if found:
      paths[key] = found[0]
  missing = [stem for key, stem in IDX_FILES.items() if key not in paths]
  if len(missing) == len(IDX_FILES):
    raise DataError(f"{data_dir} holds no IDX files; {_IDX_HINT}")
  if missing:
    raise DataError(
      f"{data_dir}: missing IDX file(s) {missing}; expected all of "
      f"{list(IDX_FILES.values())} (each optionally .gz) in this directory, "
      "e.g. from Debian's dataset-fashion-mnist package "
      "(see `dpkg -L dataset-fashion-mnist`)"
    )
  return paths


def scan_idx_dir(data_dir, keep_images: bool) -> dict:
  """Checks the four IDX files of a directory and reads them.

  Args:
    data_dir: the directory (see `IDX_FILES`); None is an error too.
    keep_images: read the images; False only checks them (streamed, not
      kept) and gives their count in their place.

  Returns:
    ``{"train_x", "train_y", "test_x", "test_y"}``: uint8 arrays (labels
    always), the images as arrays or counts.

  Raises:
    DataError: a missing directory or file, a damaged file, image and label
      counts that differ, images not 28x28 or labels outside 0..9.
  """
  paths = _idx_paths(data_dir)
  arrays = {}
  for key, path in paths.items():
    is_images = key.endswith("_x")
    dims, array = _scan_idx(path, keep=keep_images or not is_images)
    if len(dims) != (3 if is_images else 1) or (
      is_images and dims[1:] != IMAGE_SHAPE
    ):
      what = "images [N, 28, 28]" if is_images else "labels [N]"
      raise DataError(f"{path}: expected {what}, found dims {dims}")
    arrays[key] = array if array is not None else dims[0]
  for split in ("train", "test"):
    x = arrays[f"{split}_x"]
    check_split(
      f"IDX files in {data_dir}",
      split,
      x if isinstance(x, int) else len(x),
      arrays[f"{split}_y"],
      labels_name=paths[f"{split}_y"],
    )
  return arrays


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
  return make_dataset(
    **arrays,
    name="idx",
    description=(
      f"MNIST-format IDX files in {data_dir} "
      f"({len(arrays['train_y'])} train / {len(arrays['test_y'])} test)"
    ),
  )
