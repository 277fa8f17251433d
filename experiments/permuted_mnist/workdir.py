"""The run directory: creating it, and the checks before resuming one."""

import datetime
import hashlib
import json
import pathlib
from typing import Any

import numpy as np

from experiments import data as data_lib
from experiments.permuted_mnist import checkpointing
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import results as results_lib

CHECKPOINTS = "checkpoints"


def prepare_workdir(workdir: Any, overwrite: bool) -> pathlib.Path:
  """Creates the run directory, refusing a non-empty one without overwrite.

  Args:
    workdir: the run directory.
    overwrite: allow a non-empty directory (files in it are replaced).

  Returns:
    The directory as a path.

  Raises:
    FileExistsError: ``workdir`` exists, is not empty, and ``overwrite`` is
      False; or it is a file.
  """
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise FileExistsError(f"run directory {workdir} exists and is a file.")
  if workdir.is_dir() and any(workdir.iterdir()) and not overwrite:
    raise FileExistsError(
        f"run directory {workdir} already exists and is not empty; pass "
        "--overwrite to replace its results, or choose another --out.")
  workdir.mkdir(parents=True, exist_ok=True)
  return workdir


def default_workdir(config: config_lib.Config) -> pathlib.Path:
  """``runs/<preset>-<YYYYmmdd-HHMMSS>`` (relative to the current dir)."""
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  return pathlib.Path("runs") / f"{config.preset}-{stamp}"


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
    ValueError: ``config`` differs from the saved one; the message names
      every differing field with both values.
  """
  diff = config_lib.differences(saved_config(workdir), config)
  if diff:
    raise ValueError(
        f"cannot resume {workdir} with a different config; differing "
        f"field(s): {checkpointing.describe(diff)}. Resume without these "
        "flags to continue with the saved config, or start a new run with "
        "--out.")


def check_same_data(workdir: pathlib.Path, info: dict[str, Any]) -> None:
  """Refuses to resume ``workdir`` on data other than its run's.

  Raises:
    ValueError: naming each differing property (name, sizes, SHA-256).
  """
  saved = json.loads((workdir / "config.json").read_text()).get("dataset", {})
  fields = ("name", "num_train", "num_test", "num_classes", "sha256")
  diff = [f for f in fields if f in saved and saved[f] != info[f]]
  if diff:
    listed = "; ".join(f"{f}: saved {saved[f]!r}, now {info[f]!r}"
                       for f in diff)
    raise ValueError(
        f"cannot resume {workdir}: the data differ from the run's ({listed}).")


def load_results(workdir: Any) -> list[results_lib.MethodResult]:
  """The finished runs saved in ``workdir/runs.json`` (none if absent)."""
  path = pathlib.Path(workdir) / "runs.json"
  if not path.is_file():
    return []
  return [results_lib.MethodResult.from_json(row)
          for row in json.loads(path.read_text())]
