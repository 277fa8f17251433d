"""Offline text corpora, cut into byte sequences.

Two sets of defaults, both read from the running Python installation (no
network, no tokenizer: one token per byte):

* ``stdlib`` (for the CPU preset): A, English prose, the documentation
  topics of CPython's ``pydoc_data`` (466 KB); B, Python source, the standard
  library's source with its docstrings removed, up to a size cap (2 MB).
* ``packages`` (tens of MB, for bigger models): A, the docstrings of the
  installed scientific Python packages (`PROSE_PACKAGES`); B, the standard
  library's source with its docstrings removed. Files are read in a fixed
  pseudo-random order (by a hash of their path inside the package, so the
  held-out tail mixes every package) up to a size cap.

The texts, and so the numbers, depend on the Python and package versions;
``results.json`` records each corpus's size and SHA-256.
"""

import ast
import hashlib
import importlib.util
import pathlib
import sysconfig
from typing import Iterator, Optional

import numpy as np

# Packages that requirements.txt installs (sklearn and pandas with mlxtend),
# with the most prose in their docstrings; those not installed are skipped.
PROSE_PACKAGES = ("numpy", "scipy", "matplotlib", "sklearn", "pandas", "jax",
                  "flax", "optax", "chex", "orbax", "tensorflow_datasets",
                  "mlxtend", "hypothesis")
_SKIP_DIRS = {"tests", "test", "testing", "__pycache__", "idlelib",
              "site-packages", "_vendor", "vendored", "_vendored"}


def stdlib_prose() -> tuple[bytes, str]:
  """English prose: CPython's documentation topics (``pydoc_data``)."""
  from pydoc_data import topics  # noqa: PLC0415 (stdlib, lazily)
  text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
  return text.encode("utf-8"), "pydoc_data.topics (CPython docs)"


def stdlib_code() -> tuple[bytes, str]:
  """Python source: the standard library's ``inspect.py`` and ``os.py``."""
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  parts = [(stdlib / name).read_bytes() for name in ("inspect.py", "os.py")]
  return b"\n\n".join(parts), "stdlib inspect.py + os.py (Python source)"


def _py_files(roots: list[pathlib.Path]) -> list[pathlib.Path]:
  """The ``.py`` files under ``roots`` (tests skipped), in a fixed order.

  Sorted by a hash of ``<root name>/<path inside root>``: the same order on
  every machine with the same versions, and packages interleaved.
  """
  keyed = []
  for root in roots:
    for p in root.rglob("*.py"):
      rel = p.relative_to(root)
      if not _SKIP_DIRS & set(rel.parts[:-1]):
        name = f"{root.name}/{rel.as_posix()}".encode()
        keyed.append((hashlib.sha256(name).hexdigest(), p))
  return [p for _, p in sorted(keyed)]


def _parse(path: pathlib.Path) -> Optional[tuple[str, ast.Module]]:
  try:
    text = path.read_text("utf-8")
    return text, ast.parse(text)
  except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
    return None  # Not valid UTF-8 Python 3 here: skip it.


def _docstring_nodes(tree: ast.Module) -> Iterator[tuple[ast.Expr, bool]]:
  """Each docstring node, and whether it is its body's only statement."""
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                         ast.AsyncFunctionDef)) and node.body:
      first = node.body[0]
      if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
          and isinstance(first.value.value, str)):
        yield first, len(node.body) == 1


def docstrings(path: pathlib.Path) -> str:
  """The cleaned docstrings of one file, blank-line separated."""
  parsed = _parse(path)
  if parsed is None:
    return ""
  docs = (ast.get_docstring(ast.Module([node], []), clean=True)
          for node, _ in _docstring_nodes(parsed[1]))
  return "\n\n".join(d for d in docs if d and len(d) > 40)


def without_docstrings(path: pathlib.Path) -> str:
  """The source of one file with its docstrings' lines removed.

  A docstring that is a body's only statement becomes ``...``, so the
  result is still valid Python.
  """
  parsed = _parse(path)
  if parsed is None:
    return ""
  text, tree = parsed
  lines = text.splitlines(keepends=True)
  for node, alone in _docstring_nodes(tree):
    first = lines[node.lineno - 1].encode()  # AST offsets count UTF-8 bytes
    last = lines[node.end_lineno - 1].encode()
    if first[:node.col_offset].strip() or last[node.end_col_offset:].strip():
      continue  # Code shares a line with it (``def f(): """doc"""``): keep.
    for i in range(node.lineno - 1, node.end_lineno):
      lines[i] = ""
    if alone:
      lines[node.lineno - 1] = " " * node.col_offset + "...\n"
  return "".join(lines)


def _gather(roots, extract, cap: int) -> bytes:
  """``extract(path)`` of the files of ``roots``, joined, at most ``cap``."""
  out, size = [], 0
  for path in _py_files(roots):
    text = extract(path).encode("utf-8")
    if text.strip():
      out.append(text[:max(cap - size, 0)])
      size += len(out[-1]) + 2
      if size >= cap:
        break
  return b"\n\n".join(out)[:cap]


def package_prose(cap: int) -> tuple[bytes, str]:
  """Docstrings of the installed `PROSE_PACKAGES`, up to ``cap`` bytes."""
  roots, names = [], []
  for name in PROSE_PACKAGES:
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
      roots.append(pathlib.Path(list(spec.submodule_search_locations)[0]))
      names.append(name)
  text = _gather(roots, docstrings, cap)
  return text, f"docstrings of {', '.join(names)} (installed packages)"


def stdlib_code_large(cap: int) -> tuple[bytes, str]:
  """The standard library's source without docstrings, up to ``cap``."""
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  text = _gather([stdlib], without_docstrings, cap)
  return text, "standard library source without docstrings"


def load_corpus(path: Optional[str], which: str, corpora: str = "stdlib",
                cap: int = 32_000_000,
                code_cap: int = 2_000_000) -> tuple[bytes, str]:
  """The bytes of corpus ``which`` ("a" or "b") and where they came from.

  Args:
    path: a text file, or None for the default of ``corpora``.
    which: ``"a"`` (old, prose) or ``"b"`` (new, code).
    corpora: ``"stdlib"`` or ``"packages"`` (see the module docstring).
    cap: the size cap of the ``packages`` corpora, in bytes.
    code_cap: the size cap of the ``stdlib`` code corpus, in bytes.

  Raises:
    ValueError: ``path`` is not a readable file.
  """
  if path is not None:
    p = pathlib.Path(path)
    if p.is_dir():
      raise ValueError(f"corpus_{which}: {path} is a directory; pass one "
                       "text file.")
    if not p.is_file():
      raise ValueError(f"corpus_{which}: no such file: {path}")
    try:
      return p.read_bytes(), p.name
    except OSError as e:  # unreadable: permissions, a vanished file
      raise ValueError(f"corpus_{which}: cannot read {path}: {e}") from None
  if corpora == "packages":
    return package_prose(cap) if which == "a" else stdlib_code_large(cap)
  return stdlib_prose() if which == "a" else stdlib_code_large(code_cap)


def to_sequences(text: bytes, seq_len: int, name: str) -> np.ndarray:
  """Cuts bytes into windows ``[N, seq_len + 1]`` (int32), stride seq_len.

  Each window is one example: the model reads its first ``seq_len`` bytes
  and predicts the last ``seq_len``; consecutive windows share one byte, so
  every byte but the first is a target exactly once.

  Raises:
    ValueError: ``text`` shorter than ``seq_len + 1`` bytes (``name`` says
      which text).
  """
  if len(text) < seq_len + 1:
    raise ValueError(
        f"{name} has {len(text)} bytes, shorter than one sequence of "
        f"seq_len + 1 = {seq_len + 1} bytes.")
  arr = np.frombuffer(text, np.uint8).astype(np.int32)
  n = (len(arr) - 1) // seq_len
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None]
  return arr[idx]


def windows(ids: np.ndarray, seq_len: int, name: str) -> np.ndarray:
  """Cuts token ids into windows ``[N, seq_len + 1]`` (int32), stride seq_len.

  As :func:`to_sequences`, for tokens: consecutive windows share one token,
  so every token but the first is a target exactly once.

  Raises:
    ValueError: fewer than ``seq_len + 1`` tokens (``name`` says which).
  """
  ids = np.asarray(ids, np.int32)
  if len(ids) < seq_len + 1:
    raise ValueError(
        f"{name} has {len(ids)} tokens, shorter than one sequence of "
        f"seq_len + 1 = {seq_len + 1} tokens.")
  n = (len(ids) - 1) // seq_len
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None]
  return ids[idx]
