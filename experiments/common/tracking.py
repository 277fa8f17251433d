"""Live metrics: TensorBoard event files, and Weights & Biases if installed.

A tracker takes named scalars at a step; the experiments send one per run
(method, lambda, seed), each to its own subdirectory of ``--logdir``, so that
``tensorboard --logdir DIR`` shows every run's curves side by side.

* :class:`TensorBoard` writes event files with ``tensorboardX`` (a small,
  maintained writer that needs no TensorFlow).
* :class:`WandB` logs to a ``wandb`` run; ``wandb`` is imported only when
  asked for (:func:`import_wandb` says clearly when it is missing).
* :func:`read_scalars` reads event files back as TensorBoard shows them
  (tensorboard's own ``EventAccumulator``, which applies a resumed run's
  purge step), for tests and notebooks.

Trackers only see values already on the host: logging never adds a device
synchronisation. :meth:`Trackers.flush` puts what was logged on disk; a
resumable run calls it before each checkpoint, so that a run killed later
loses none of the points its checkpoint has passed.

Example:
  >>> import tempfile
  >>> d = tempfile.mkdtemp()
  >>> with open_trackers("run", logdir=d) as t:
  ...   t.scalars({"train/loss": 0.5}, step=10)
  >>> read_scalars(d + "/run")
  {'train/loss': [(10, 0.5)]}
"""

import importlib
import itertools
import os
import pathlib
from typing import Any, Mapping, Optional, Sequence

# The x axes a scalar can be logged against (W&B keeps one per prefix;
# TensorBoard has one step per event).
AXES = ("step", "task")
# Makes every event file name unique: tensorboardX names a file by the second
# and host alone, so a second writer opened in the same second would
# overwrite the first one's file.
_WRITERS = itertools.count()


def _check(values: Mapping[str, Any], step: int, axis: str) -> None:
  if axis not in AXES:
    raise ValueError(f"axis must be one of {AXES}, got {axis!r}.")
  if int(step) < 0:
    raise ValueError(f"step must be >= 0, got {step}.")
  for tag in values:
    if not isinstance(tag, str) or not tag:
      raise ValueError(f"scalar names must be non-empty strings, got {tag!r}.")


class TensorBoard:
  """TensorBoard event files in ``logdir`` (written by ``tensorboardX``)."""

  def __init__(self, logdir: Any, *, purge_step: Optional[int] = None):
    """Opens a writer.

    Args:
      logdir: the run's directory (created).
      purge_step: a resumed run's first step: TensorBoard drops the events
        an earlier, interrupted attempt wrote at this step and later.
    """
    try:
      from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional)
    except ImportError:
      raise ImportError(
          "--logdir needs the tensorboardX package (pip install "
          "tensorboardX); it is not installed.") from None
    self.logdir = pathlib.Path(logdir)
    self.logdir.mkdir(parents=True, exist_ok=True)
    self._writer = SummaryWriter(
        logdir=str(self.logdir), purge_step=purge_step, flush_secs=10,
        filename_suffix=f".{os.getpid()}.{next(_WRITERS)}")

  def scalars(self, values: Mapping[str, float], step: int,
              axis: str = "step", *,
              global_step: Optional[int] = None) -> None:
    """Writes each scalar at ``global_step`` if given, else at ``step``.

    TensorBoard has one step axis per run, to which a resumed run's purge
    step applies: values of another ``axis`` (``task``) are written at
    their ``global_step`` (the optimiser step), so that a purge covers
    them too.
    """
    _check(values, step, axis)
    at = int(step if global_step is None else global_step)
    for tag, value in values.items():
      self._writer.add_scalar(tag, float(value), global_step=at)

  def flush(self) -> None:
    """Writes every pending event to disk."""
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def import_wandb() -> Any:
  """The ``wandb`` module.

  Raises:
    ImportError: ``wandb`` is not installed (one line saying so).
  """
  try:
    return importlib.import_module("wandb")
  except ImportError:
    raise ImportError(
        "--wandb needs the wandb package (pip install wandb); it is not "
        "installed.") from None


class WandB:
  """One Weights & Biases run.

  Each prefix (``train/``, ``acc/``) is plotted against its own axis
  (``step``: optimiser steps, ``task``: tasks trained), which W&B keeps as a
  metric of its own, since its built-in step must only grow.
  """

  def __init__(self, name: str, *, project: str,
               group: Optional[str] = None,
               config: Optional[Mapping[str, Any]] = None,
               directory: Optional[Any] = None):
    wandb = import_wandb()
    self._run = wandb.init(
        project=project, name=name, group=group,
        config=dict(config or {}),
        dir=None if directory is None else str(directory),
        reinit="create_new")  # vmapped members are runs open side by side
    self._defined: set[str] = set()

  def scalars(self, values: Mapping[str, float], step: int,
              axis: str = "step", *,
              global_step: Optional[int] = None) -> None:
    """Logs ``values`` against ``axis`` at ``step`` (``global_step`` is
    TensorBoard's alone)."""
    del global_step
    _check(values, step, axis)
    for prefix in sorted({tag.split("/")[0] for tag in values}):
      if prefix not in self._defined:
        self._run.define_metric(axis, hidden=True)
        self._run.define_metric(f"{prefix}/*", step_metric=axis)
        self._defined.add(prefix)
    self._run.log({**{k: float(v) for k, v in values.items()},
                   axis: int(step)})

  def flush(self) -> None:
    """Nothing to do: wandb sends what it is given on its own."""

  def close(self) -> None:
    self._run.finish()


class Trackers:
  """Several trackers as one; a context manager that closes them all."""

  def __init__(self, trackers: Sequence[Any] = ()):
    self.trackers = list(trackers)

  def scalars(self, values: Mapping[str, float], step: int,
              axis: str = "step", *,
              global_step: Optional[int] = None) -> None:
    for tracker in self.trackers:
      tracker.scalars(values, step, axis, global_step=global_step)

  def flush(self) -> None:
    """Puts everything logged so far on disk (before a checkpoint)."""
    for tracker in self.trackers:
      tracker.flush()

  def close(self) -> None:
    for tracker in self.trackers:
      tracker.close()
    self.trackers = []

  def __enter__(self) -> "Trackers":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def open_trackers(name: str, *, logdir: Any = None,
                  wandb_project: Optional[str] = None,
                  group: Optional[str] = None,
                  config: Optional[Mapping[str, Any]] = None,
                  purge_step: Optional[int] = None) -> Trackers:
  """The trackers of one run (none when neither is asked for).

  Args:
    name: the run's name, also its subdirectory of ``logdir``.
    logdir: write TensorBoard event files to ``logdir/name``.
    wandb_project: log to a W&B run of this project.
    group: the W&B group (e.g. the experiment's run directory).
    config: the W&B run's config.
    purge_step: see :class:`TensorBoard`.

  Raises:
    ImportError: a writer's package is not installed.
  """
  trackers = []
  if logdir is not None:
    trackers.append(TensorBoard(pathlib.Path(logdir) / name,
                                purge_step=purge_step))
  if wandb_project is not None:
    trackers.append(WandB(name, project=wandb_project, group=group,
                          config=config, directory=logdir))
  return Trackers(trackers)


def read_scalars(logdir: Any) -> dict[str, list[tuple[int, float]]]:
  """Every scalar in the event files of ``logdir`` (not its subdirectories),
  as TensorBoard shows them.

  Read with tensorboard's ``EventAccumulator`` (the ``tensorboard``
  package, no TensorFlow needed): a session start at step ``s`` (a resumed
  run's purge step) drops every value logged earlier at step ``s`` or
  later, as in TensorBoard's own display.

  Args:
    logdir: one run's directory.

  Returns:
    ``{tag: [(step, value), ...]}`` in the order written (files by name).

  Raises:
    FileNotFoundError: no event file in ``logdir``.
    ImportError: ``tensorboard`` is not installed (one line).
  """
  try:
    from tensorboard.backend.event_processing import (  # noqa: PLC0415
        event_accumulator)
  except ImportError:
    raise ImportError(
        "read_scalars needs the tensorboard package (pip install "
        "tensorboard); it is not installed.") from None
  if not any(pathlib.Path(logdir).glob("events.out.tfevents.*")):
    raise FileNotFoundError(f"no event files in {logdir}.")
  accumulator = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.SCALARS: 0})
  accumulator.Reload()
  return {tag: [(int(e.step), float(e.value))
                for e in accumulator.Scalars(tag)]
          for tag in accumulator.Tags()["scalars"]}
