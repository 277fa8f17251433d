"""Result files that are never half-written (text, JSON, CSV), shared by the
experiments."""

import csv
import io
import json
import os
import pathlib
import tempfile
from typing import Any, Sequence


def write_atomic(path: Any, data: Any) -> None:
  """Writes ``data`` (str or bytes) to ``path`` atomically.

  The data goes to a temporary file in the same directory, which is flushed
  to disk (``fsync``) and then replaces ``path`` with ``os.replace``; the
  directory is synced after the rename. A reader, a crash or a power loss
  never sees half a file: after a power loss ``path`` holds either the old
  or the new data.

  Args:
    path: the destination.
    data: text or bytes.
  """
  path = pathlib.Path(path)
  mode = "wb" if isinstance(data, bytes) else "w"
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())  # the data on disk before the name points at it
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  sync_directory(path.parent)


def sync_directory(directory: Any) -> None:
  """Flushes a directory's entries (a rename in it) to disk.

  Args:
    directory: the directory; platforms that cannot open one (Windows) skip.
  """
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:  # some file systems cannot sync a directory
    pass
  finally:
    os.close(fd)


def write_json(path: Any, obj: Any) -> None:
  """Writes ``obj`` as indented JSON, atomically."""
  write_atomic(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def write_csv(path: Any, header: Sequence[str],
              rows: Sequence[Sequence[Any]]) -> None:
  """Writes a CSV table, atomically (``None`` becomes an empty cell)."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(header)
  for row in rows:
    writer.writerow(["" if v is None else v for v in row])
  write_atomic(path, buf.getvalue())
