"""Checkpoints of one training run, written with orbax.

One :class:`RunCheckpoints` per (method, lambda, seed) run, in its own
directory under ``RUN_DIR/checkpoints/``. Each checkpoint holds two items:

* ``state``: every array of the run, as a flat dict of host copies: the
  model parameters, the whole optimiser state (the EWC anchors, the Fisher
  sums, Adam's moments, lambda), SI's path integral and the run's PRNG key
  (its raw ``key_data``).
* ``meta``: JSON: where the run stands (task, step within the task), the
  accuracy matrices so far, the training losses, the resolved config, the
  method, lambda and the data seed, and the tree paths of the arrays, which
  are checked against the state they are restored into.

Writes are atomic: orbax writes a step into ``<step>.orbax-checkpoint-tmp``
and renames it once complete, and deletes the previous step only after that.
A process killed mid-write leaves the previous checkpoint intact; the
half-written directory is removed when the run is resumed.

Damage. Files can still be truncated, overwritten or deleted later. Reading
a damaged checkpoint raises :class:`CheckpointDamaged` (one line, never an
orbax traceback), so that a caller can fall back to an older step; keep two
(``max_to_keep=2``) to have one. A failed write (a full disk, a read-only
directory) raises :class:`CheckpointWriteError`, an ``OSError``.

Quiet failures. orbax reports a failed read or write from its background
threads too: absl error logs with tracebacks, and, once it has closed its
event loop, tensorstore callbacks that fail with ``RuntimeError: Event loop
is closed`` (printed by Python as unraisable exceptions, tens of them on a
full disk). Both only repeat what the one-line error says, so while
checkpoints are in use (from the first :class:`RunCheckpoints` on) orbax's
absl records and those unraisable errors are dropped
(:func:`silence_orbax_failures`); every other log and unraisable exception
goes through as before.
"""

import contextlib
import errno
import logging
import os
import pathlib
import sys
from typing import Any, Iterator, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

# The layout of ``meta``; bump on incompatible changes.
FORMAT = 1


class CheckpointDamaged(Exception):
  """A checkpoint step whose files cannot be read (one-line message)."""


class CheckpointWriteError(OSError):
  """A checkpoint that could not be written (disk full, read-only, ...)."""


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
  """Mutes orbax's own error logs (absl): a damaged file is reported once,
  in our words."""
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    absl.setLevel(level)


_ORBAX_DIR = os.path.dirname(ocp.__file__)


class _DropOrbax(logging.Filter):
  """Drops the absl records that orbax's own code logs."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.pathname.startswith(_ORBAX_DIR)


_DROP_ORBAX = _DropOrbax()


def _closed_loop(unraisable: Any) -> bool:
  value = unraisable.exc_value
  return (isinstance(value, RuntimeError)
          and str(value) == "Event loop is closed")


def silence_orbax_failures() -> None:
  """Drops orbax's absl records and its closed-loop unraisable errors.

  Idempotent; the hook is installed again if something replaced it (a
  test runner does, per test). Other unraisable exceptions reach the
  previous hook.
  """
  absl = logging.getLogger("absl")
  if _DROP_ORBAX not in absl.filters:
    absl.addFilter(_DROP_ORBAX)
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop", False):
    return

  def hook(unraisable: Any) -> None:
    if not _closed_loop(unraisable):
      previous(unraisable)

  hook._drops_closed_loop = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


# Words for the OS errors a write meets, instead of orbax's page of text.
_WRITE_ERRORS = (("RESOURCE_EXHAUSTED", errno.ENOSPC),
                 ("No space left", errno.ENOSPC),
                 ("File too large", errno.EFBIG),
                 ("Read-only file system", errno.EROFS),
                 ("Permission denied", errno.EACCES))


def _brief(error: BaseException) -> str:
  """The first line of an error, with its type: orbax's run to pages.

  A failed write whose cause is a full disk, a file size limit, a
  read-only file system or a permission is named in the OS's words.
  """
  text = str(error)
  for marker, code in _WRITE_ERRORS:
    if marker in text:
      return f"{os.strerror(code)} [errno {code}]"
  lines = text.strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def run_name(method: str, lam: float, seed: int) -> str:
  """The directory name of a run's checkpoints, e.g. ``ewc-lam100.0-seed0``.

  ``repr`` keeps every digit of ``lam``: two lambdas of a sweep never
  share a directory.
  """
  return f"{method}-lam{float(lam)!r}-seed{int(seed)}"


def flatten(tree: Any) -> tuple[dict[str, np.ndarray], list[str]]:
  """Host copies of ``tree``'s leaves, keyed ``"0000"``, ``"0001"``, ...

  Args:
    tree: a pytree of arrays.

  Returns:
    ``(arrays, paths)``: the copies (never views of device buffers, which a
    later donating call may reuse) and each leaf's tree path as text.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  arrays = {f"{i:04d}": np.array(leaf, copy=True)
            for i, (_, leaf) in enumerate(leaves)}
  return arrays, [jax.tree_util.keystr(path) for path, _ in leaves]


class RunCheckpoints:
  """The checkpoints of one run: save, find the latest, restore.

  Attributes:
    directory: where the steps are written.
  """

  def __init__(self, directory: Any, *, max_to_keep: int = 1,
               asynchronous: bool = True):
    """Opens (and creates) ``directory``.

    Args:
      directory: the run's checkpoint directory.
      max_to_keep: how many of the latest checkpoints to keep.
      asynchronous: write in a background thread. The arrays are copied to
        the host first, so training may go on (and donate its buffers)
        while they are written.
    """
    self.directory = pathlib.Path(directory).absolute()
    silence_orbax_failures()
    with quiet_orbax():  # it reads every step's metadata, damaged or not
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=max_to_keep, create=True,
              cleanup_tmp_directories=True,
              enable_async_checkpointing=asynchronous),
          item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    """The step of the newest complete checkpoint, or ``None``."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The steps of every complete checkpoint, newest first."""
    with quiet_orbax():
      return sorted(self._manager.all_steps(), reverse=True)

  def delete(self, step: int) -> None:
    """Removes one step (e.g. a damaged one that a run falls back from)."""
    with quiet_orbax():
      self._manager.delete(step)

  def save(self, step: int, arrays: dict[str, np.ndarray],
           meta: dict[str, Any]) -> None:
    """Writes a checkpoint (in the background when asynchronous).

    Args:
      step: a number larger than every earlier step of this run.
      arrays: host arrays, from :func:`flatten`.
      meta: JSON-ready values.
    """
    try:
      saved = self._manager.save(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardSave(arrays),
              meta=ocp.args.JsonSave({"format": FORMAT, **meta})),
          force=True)
    except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many)
      raise CheckpointWriteError(
          f"cannot write checkpoint step {step} in {self.directory} "
          f"({_brief(e)})") from None
    if not saved:
      raise RuntimeError(
          f"orbax skipped checkpoint step {step} in {self.directory}.")

  def restore(self, like: Any, step: Optional[int] = None
              ) -> tuple[Any, dict[str, Any]]:
    """Reads a checkpoint into a tree shaped like ``like``.

    Args:
      like: a pytree of arrays with the structure, shapes and dtypes of the
        saved one (e.g. a freshly initialised state).
      step: the step to read (default: the latest).

    Returns:
      ``(tree, meta)``: the saved arrays (as ``jax.Array``) in ``like``'s
      structure, and the saved JSON.

    Raises:
      FileNotFoundError: there is no complete checkpoint.
      CheckpointDamaged: the step's files cannot be read.
      ValueError: the checkpoint holds other arrays than ``like`` (another
        model or optimiser), naming the first difference.
    """
    self.wait()
    step = self._manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}.")
    meta = self._read(step, meta=ocp.args.JsonRestore())["meta"]
    if not isinstance(meta, dict) or not isinstance(meta.get("paths"), list):
      raise CheckpointDamaged(
          f"checkpoint {self.directory}/{step}: its metadata is damaged.")
    if meta.get("format") != FORMAT:
      raise ValueError(
          f"checkpoint {self.directory}/{step} has format "
          f"{meta.get('format')!r}; this code reads format {FORMAT}.")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    paths = [jax.tree_util.keystr(path) for path, _ in leaves]
    if meta["paths"] != paths:
      raise ValueError(
          f"checkpoint {self.directory}/{step} holds a different state: "
          f"{_first_difference(meta['paths'], paths)}.")
    # numpy targets: orbax restores host arrays, placed on the device below.
    target = {f"{i:04d}": np.empty(np.shape(leaf), _dtype(leaf))
              for i, (_, leaf) in enumerate(leaves)}
    arrays = self._read(step, state=ocp.args.StandardRestore(target))["state"]
    for i, path in enumerate(paths):
      got, want = arrays[f"{i:04d}"], target[f"{i:04d}"]
      if got.shape != want.shape or got.dtype != want.dtype:
        raise ValueError(
            f"checkpoint {self.directory}/{step}: {path} is "
            f"{got.dtype}{list(got.shape)}, expected "
            f"{want.dtype}{list(want.shape)}.")
    tree = jax.tree_util.tree_unflatten(
        treedef, [jax.numpy.asarray(arrays[f"{i:04d}"])
                  for i in range(len(paths))])
    return tree, meta

  def _read(self, step: int, **items: Any) -> Any:
    """orbax's restore of ``items``; any failure is one-line damage."""
    try:
      with quiet_orbax():
        return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many)
      raise CheckpointDamaged(
          f"checkpoint {self.directory}/{step} is damaged or incomplete "
          f"({_brief(e)})") from None

  def wait(self) -> None:
    """Blocks until a background write has finished.

    Raises:
      CheckpointWriteError: the write failed.
    """
    self._finish(self._manager.wait_until_finished)

  def close(self) -> None:
    """Finishes pending writes and releases orbax's threads.

    Raises:
      CheckpointWriteError: a pending write failed.
    """
    self._finish(self._manager.close)

  def _finish(self, finish) -> None:
    """Runs orbax's ``finish``; a failed write is a CheckpointWriteError.

    orbax's own logs are muted: a failed write is reported in our words, and
    a Ctrl-C while waiting would be logged by orbax as a failed save."""
    try:
      with quiet_orbax():
        finish()
    except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many)
      raise CheckpointWriteError(
          f"cannot write a checkpoint in {self.directory} ({_brief(e)})"
      ) from None


def _dtype(x: Any) -> np.dtype:
  return x.dtype if hasattr(x, "dtype") else np.result_type(x)


def _first_difference(saved: list[str], current: list[str]) -> str:
  for i, (a, b) in enumerate(zip(saved, current)):
    if a != b:
      return f"array {i} is {a} there but {b} here"
  return (f"{len(saved)} arrays there, {len(current)} here (a different "
          "model, optimiser or method)")
