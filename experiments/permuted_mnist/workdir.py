"""The run directory: creating it, locking it, and the checks before resuming.

A run directory holds only files the runner writes (:data:`RUNNER_FILES`,
``R_<method>.csv/png``, ``checkpoints/<run>/``). ``--overwrite`` removes
exactly those and refuses a directory holding anything else; a lock file
(:data:`LOCK`, held with ``filelock`` for the run's life) keeps a second
process out.
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
from experiments.permuted_mnist import checkpointing
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import results as results_lib

CHECKPOINTS = "checkpoints"
LOCK = ".lock"
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
  directory named like a run (``ewc-lam100.0-seed0``).
  """
  workdir, out = pathlib.Path(workdir), []
  for entry in sorted(workdir.iterdir()):
    if entry.name == CHECKPOINTS and entry.is_dir():
      out += [f"{CHECKPOINTS}/{e.name}" for e in sorted(entry.iterdir())
              if not (e.is_dir() and _RUN_NAME.fullmatch(e.name))]
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
  foreign = foreign_files(workdir) if entries else []
  if foreign:
    shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
    raise FileExistsError(
        f"--overwrite replaces only a previous run's files, but {workdir} "
        f"also holds {len(foreign)} other(s): {shown}; move them away or "
        "choose another --out.")


def prepare_workdir(workdir: Any, overwrite: bool) -> pathlib.Path:
  """Creates the run directory; with ``overwrite``, clears a previous run.

  Args:
    workdir: the run directory.
    overwrite: allow a directory holding a previous run; every file the
      runner wrote there (results, plots, checkpoints) is removed, so that
      the directory shows this run alone. Other files are never removed.

  Returns:
    The directory as a path.

  Raises:
    FileExistsError: see :func:`check_workdir`.
    OSError: the directory cannot be created (e.g. a parent is a file).
  """
  workdir = pathlib.Path(workdir)
  check_workdir(workdir, overwrite)
  workdir.mkdir(parents=True, exist_ok=True)
  for entry in workdir.iterdir():
    if entry.name == CHECKPOINTS:
      shutil.rmtree(entry)
    elif entry.name != LOCK:
      entry.unlink()
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
