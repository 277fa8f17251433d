"""The run directory: creating it, locking it, and the checks before resuming.

A run directory holds only files the runner writes (:data:`RUNNER_FILES`,
``R_<method>.csv/png``, ``checkpoints/<run>/``, ``previous/``), and its
``config.json`` marks it as a run's. ``--overwrite`` refuses a directory
that never held a run (no ``config.json`` of this runner) or that holds
anything else; a lock file (:data:`LOCK`, held with ``filelock`` for the
run's life) keeps a second process out.

Overwriting never loses the old results. The previous run's files are moved
aside into ``previous/`` (:data:`PREVIOUS`, a rename within the directory:
no copy, no extra disk) before the new run writes anything, and deleted only
once the new run has completed (:func:`drop_previous`). A run killed midway
(SIGKILL, a full disk) leaves the old results in ``RUN_DIR/previous/`` and
the new run resumable with ``--resume RUN_DIR``; overwriting again keeps
``previous/`` (the last complete run) and discards the incomplete one.
"""

import contextlib
import datetime
import hashlib
import json
import os
import pathlib
import re
import shutil
from typing import Any, Iterator

import filelock
import numpy as np

from experiments import data as data_lib
from experiments.common import files
from experiments.permuted_mnist import checkpointing
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import results as results_lib

CHECKPOINTS = "checkpoints"
LOCK = ".lock"
# Where --overwrite keeps the previous run's files until the new one is
# complete; _STAGING while they are being moved, _DROPPED while deleted.
PREVIOUS = "previous"
_STAGING, _DROPPED = ".previous.tmp", ".previous.old"
# What the runner writes at the top of a run directory (besides R_<method>.*
# and checkpoints/); --overwrite removes these and nothing else.
RUNNER_FILES = ("config.json", "runs.json", "runs.csv", "accuracy.csv",
                "summary.json", "summary.csv", "avg_accuracy.png", LOCK)
# R_<method>.csv/png, and write_atomic's temporary files (.NAME.XXXX.tmp).
_RUNNER_PATTERN = re.compile(r"R_[A-Za-z0-9_]+\.(csv|png)|\..+\.tmp")
_RUN_NAME = re.compile(r"[A-Za-z0-9_]+-lam.+-seed[0-9]+")


class RunDirError(ValueError):
  """A run directory that cannot be used as asked (one-line message)."""


def foreign_files(workdir: Any) -> list[str]:
  """The entries of ``workdir`` that the runner did not write, sorted.

  ``checkpoints/`` counts as the runner's when every entry in it is a
  directory named like a run (``ewc-lam100.0-seed0``); ``previous/`` (and
  its temporary names) when it holds only a run's files itself.
  """
  workdir, out = pathlib.Path(workdir), []
  for entry in sorted(workdir.iterdir()):
    if entry.name == CHECKPOINTS and entry.is_dir():
      out += [f"{CHECKPOINTS}/{e.name}" for e in sorted(entry.iterdir())
              if not (e.is_dir() and _RUN_NAME.fullmatch(e.name))]
    elif entry.name in (PREVIOUS, _STAGING, _DROPPED) and entry.is_dir():
      out += [f"{entry.name}/{name}" for name in foreign_files(entry)]
    elif not (entry.is_file() and (entry.name in RUNNER_FILES
                                   or _RUNNER_PATTERN.fullmatch(entry.name))):
      out.append(entry.name + ("/" if entry.is_dir() else ""))
  return out


def check_workdir(workdir: Any, overwrite: bool) -> None:
  """Refuses a run directory that a new run would clobber; changes nothing.

  Raises:
    FileExistsError: ``workdir`` is a file; or it is not empty and
      ``overwrite`` is False; or, with ``overwrite``, it holds files the
      runner did not write (named: they are never deleted).
  """
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise FileExistsError(f"run directory {workdir} exists and is a file.")
  if not workdir.is_dir():
    return
  entries = [e for e in workdir.iterdir() if e.name != LOCK]
  if entries and not overwrite:
    raise FileExistsError(
        f"run directory {workdir} already exists and is not empty; pass "
        "--overwrite to replace its results, or choose another --out.")
  if entries and not (holds_run(workdir) or holds_run(workdir / PREVIOUS)
                      or (workdir / _STAGING).is_dir()):
    shown = ", ".join(sorted(e.name for e in entries)[:5]) + (
        " ..." if len(entries) > 5 else "")
    raise FileExistsError(
        f"--overwrite replaces only a previous run's files, but {workdir} "
        f"never held a run (no config.json of this runner) and holds "
        f"{shown}; move them away or choose another --out.")
  foreign = foreign_files(workdir) if entries else []
  if foreign:
    shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
    raise FileExistsError(
        f"--overwrite replaces only a previous run's files, but {workdir} "
        f"also holds {len(foreign)} other(s): {shown}; move them away or "
        "choose another --out.")


def holds_run(workdir: Any) -> bool:
  """Whether ``workdir`` holds a run's ``config.json`` (a JSON object with
  the run's ``config`` and ``dataset``), the mark of a run directory."""
  try:
    header = json.loads((pathlib.Path(workdir) / "config.json").read_text())
  except (OSError, ValueError):
    return False
  return (isinstance(header, dict) and isinstance(header.get("config"), dict)
          and "dataset" in header)


def _complete(workdir: pathlib.Path) -> bool:
  """Whether ``workdir``'s top level holds a completed run's results."""
  try:
    return json.loads((workdir / "summary.json").read_text()).get(
        "complete") is True
  except (OSError, ValueError, AttributeError):
    return False


def _runner_entries(workdir: pathlib.Path) -> list[pathlib.Path]:
  """The top-level entries a run wrote (lock and ``previous/`` aside)."""
  return [e for e in sorted(workdir.iterdir())
          if e.name not in (LOCK, PREVIOUS, _STAGING, _DROPPED)]


def _remove(entry: pathlib.Path) -> None:
  if entry.is_dir():
    shutil.rmtree(entry)
  else:
    entry.unlink()


def _set_aside(workdir: pathlib.Path) -> None:
  """Moves the previous run's files into ``previous/``, crash-safely.

  They are renamed into ``_STAGING`` one by one (a move interrupted there is
  finished by the next call: nothing new is written before it completes),
  then ``_STAGING`` replaces ``previous/`` with two renames. An incomplete
  run on top of an existing ``previous/`` (an overwrite that was killed) is
  discarded instead: ``previous/`` keeps the last complete run.
  """
  staging, previous = workdir / _STAGING, workdir / PREVIOUS
  if (workdir / _DROPPED).exists():
    shutil.rmtree(workdir / _DROPPED)
  entries = _runner_entries(workdir)
  if not staging.is_dir() and previous.is_dir() and not _complete(workdir):
    for entry in entries:
      _remove(entry)
    return
  if not entries and not staging.is_dir():
    return
  staging.mkdir(exist_ok=True)
  for entry in entries:
    entry.rename(staging / entry.name)
  files.sync_directory(workdir)
  if previous.is_dir():
    previous.rename(workdir / _DROPPED)
  staging.rename(previous)
  files.sync_directory(workdir)
  shutil.rmtree(workdir / _DROPPED, ignore_errors=True)


def drop_previous(workdir: Any) -> bool:
  """Deletes what ``--overwrite`` set aside, once the new run is complete.

  Returns:
    Whether there was something to delete.
  """
  workdir, found = pathlib.Path(workdir), False
  for name in (PREVIOUS, _DROPPED):
    if (workdir / name).is_dir():
      shutil.rmtree(workdir / name)
      found = True
  return found


def prepare_workdir(workdir: Any, overwrite: bool) -> pathlib.Path:
  """Creates the run directory; with ``overwrite``, sets a previous run
  aside.

  Args:
    workdir: the run directory.
    overwrite: allow a directory holding a previous run; every file the
      runner wrote there (results, plots, checkpoints) is moved into
      ``previous/``, so that the directory's top level shows this run
      alone; :func:`drop_previous` deletes them once this run is complete.
      Other files are never moved or removed.

  Returns:
    The directory as a path.

  Raises:
    FileExistsError: see :func:`check_workdir`.
    OSError: the directory cannot be created (e.g. a parent is a file).
  """
  workdir = pathlib.Path(workdir)
  check_workdir(workdir, overwrite)
  workdir.mkdir(parents=True, exist_ok=True)
  if overwrite:
    _set_aside(workdir)
  return workdir


def default_workdir(config: config_lib.Config) -> pathlib.Path:
  """Creates and returns ``runs/<preset>-<YYYYmmdd-HHMMSS>-<pid>``.

  The directory is made with an exclusive ``mkdir``: two runs started in
  the same second (even by one process) never share one; a clash gets a
  counter suffix.
  """
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  base = pathlib.Path("runs") / f"{config.preset}-{stamp}-{os.getpid()}"
  base.parent.mkdir(parents=True, exist_ok=True)
  for n in range(1000):
    path = base if n == 0 else base.with_name(f"{base.name}-{n}")
    try:
      path.mkdir()
    except FileExistsError:
      continue
    return path
  raise FileExistsError(f"no free run directory name like {base}.")


@contextlib.contextmanager
def locked(workdir: Any) -> Iterator[None]:
  """Holds ``workdir``'s lock file: one process per run directory.

  Raises:
    RunDirError: another process holds the lock (one line).
  """
  lock = filelock.FileLock(pathlib.Path(workdir) / LOCK, thread_local=False)
  try:
    lock.acquire(timeout=0)
  except filelock.Timeout:
    raise RunDirError(
        f"run directory {workdir} is in use by another process (it holds "
        f"{pathlib.Path(workdir) / LOCK}); wait for that run to finish, or "
        "choose another --out.") from None
  try:
    yield
  finally:
    lock.release()


def dataset_info(ds: data_lib.Dataset) -> dict[str, Any]:
  """Name, description, sizes and a SHA-256 of a dataset's arrays.

  The digest lets a resumed run check that it trains on the same data.
  """
  digest = hashlib.sha256()
  for array in (ds.train_x, ds.train_y, ds.test_x, ds.test_y):
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
  return {"name": ds.name, "description": ds.description,
          "num_train": int(len(ds.train_y)), "num_test": int(len(ds.test_y)),
          "num_classes": int(ds.num_classes), "sha256": digest.hexdigest()}


def saved_config(workdir: Any) -> config_lib.Config:
  """The resolved configuration a run directory was started with.

  Raises:
    FileNotFoundError: ``workdir`` holds no ``config.json``.
    ValueError: the file is not a run's configuration.
  """
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(
        f"cannot resume {workdir}: it holds no config.json (not a run "
        "directory of experiments.permuted_mnist).")
  try:
    values = json.loads(path.read_text())["config"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(
        f"cannot resume {workdir}: {path} is not a run's config ({e!r})."
    ) from None
  return config_lib.from_json(values)


def check_resume(workdir: Any, config: config_lib.Config) -> None:
  """Refuses to resume ``workdir`` with a config that changes its results.

  Args:
    workdir: the run directory.
    config: the configuration to continue with.

  Raises:
    FileNotFoundError: ``workdir`` is not a run directory.
    RunDirError: ``config`` differs from the saved one; the message names
      every differing field with both values.
  """
  diff = config_lib.differences(saved_config(workdir), config)
  if diff:
    raise RunDirError(
        f"cannot resume {workdir} with a different config; differing "
        f"field(s): {checkpointing.describe(diff)}. Resume without these "
        "flags to continue with the saved config, or start a new run with "
        "--out.")


def check_same_data(workdir: pathlib.Path, info: dict[str, Any]) -> None:
  """Refuses to resume ``workdir`` on data other than its run's.

  Raises:
    RunDirError: naming each differing property (name, sizes, SHA-256).
  """
  saved = json.loads((workdir / "config.json").read_text()).get("dataset", {})
  fields = ("name", "num_train", "num_test", "num_classes", "sha256")
  diff = [f for f in fields if f in saved and saved[f] != info[f]]
  if diff:
    listed = "; ".join(f"{f}: saved {saved[f]!r}, now {info[f]!r}"
                       for f in diff)
    raise RunDirError(
        f"cannot resume {workdir}: the data differ from the run's ({listed}).")


def load_results(workdir: Any, config: config_lib.Config,
                 info: dict[str, Any]) -> list[results_lib.MethodResult]:
  """The finished runs of ``config`` saved in ``workdir/runs.json``.

  Every row carries the digest of the config and data it was trained with
  (:func:`results.run_digest`); a row of another config is never reused.

  Args:
    workdir: the run directory.
    config: the configuration being resumed.
    info: the data's :func:`dataset_info`.

  Returns:
    The rows as results (none if there is no ``runs.json``).

  Raises:
    RunDirError: a row of another config (naming the differing fields) or
      data, or one without a digest, or a file that is not JSON rows.
  """
  path = pathlib.Path(workdir) / "runs.json"
  if not path.is_file():
    return []
  try:
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
      raise TypeError("not a list")
  except (json.JSONDecodeError, TypeError) as e:
    raise RunDirError(f"cannot resume {workdir}: {path} is not a list of "
                      f"runs ({e}).") from None
  digest = results_lib.run_digest(config, info)
  for row in rows:
    if row.get("config_sha256") != digest:
      raise RunDirError(
          f"cannot resume {workdir}: runs.json holds the {row.get('method')} "
          f"lam={row.get('lam')} seed={row.get('seed')} run of "
          f"{_row_difference(row, config)} than config.json's; its results "
          "would be mixed with this config's. Start a new run with --out "
          "(or restore config.json).")
  return [results_lib.MethodResult.from_json(row) for row in rows]


def _row_difference(row: dict[str, Any], config: config_lib.Config) -> str:
  """How a runs.json row's config differs from ``config``, in words."""
  if "config" not in row:
    return "an unknown config (no config digest: an older version's file)"
  try:
    saved = config_lib.from_json({**config.to_json(), **row["config"]})
  except ValueError as e:
    return f"another config ({e})"
  diff = config_lib.differences(saved, config)
  if not diff:
    return "the same config but other data"
  return f"another config ({checkpointing.describe(diff)})"
