"""The task stream on the device: padded splits, class masks, data checks.

Every split of every task is padded to one length per split kind, so that the
jitted training chunk and evaluation are traced once for the whole stream.
"""

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import data as data_lib
from experiments.data.dataset import DataError
from experiments.permuted_mnist import tasks as tasks_lib


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["x", "y", "tid", "n"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DeviceSplit:
  """One split of one task on device, padded to a shared length.

  Attributes:
    x: float32 ``[L, 28, 28]`` images; rows ``>= n`` are padding.
    y: int32 ``[L]`` labels.
    tid: int32 ``[L]`` the task index of each example (selects its head).
    n: number of real examples.
  """

  x: jax.Array
  y: jax.Array
  tid: jax.Array
  n: int


def to_device(x: np.ndarray, y: np.ndarray, tid: Any,
              length: int) -> DeviceSplit:
  """Pads ``(x, y)`` to ``length`` rows and puts them on the default device.

  Args:
    x: images ``[n, 28, 28]``.
    y: labels ``[n]``.
    tid: the task index of every example (an int, or an array ``[n]``).
    length: rows after padding (>= n); equal lengths give equal shapes, so
      jitted functions are not retraced.

  Returns:
    The :class:`DeviceSplit`.
  """
  n = len(y)
  pad = length - n
  tid = np.broadcast_to(np.asarray(tid, np.int32), [n])
  return DeviceSplit(
      x=jnp.asarray(np.pad(np.asarray(x, np.float32),
                           [(0, pad), (0, 0), (0, 0)])),
      y=jnp.asarray(np.pad(np.asarray(y, np.int32), [(0, pad)])),
      tid=jnp.asarray(np.pad(tid, [(0, pad)])),
      n=n)


def class_masks(tasks: Sequence[tasks_lib.Task]) -> np.ndarray:
  """Boolean ``[T, C]``: row ``t`` marks task ``t``'s active logits.

  All True for single-head streams; two entries per row for the
  task-incremental split (one head per task).
  """
  num_classes = num_outputs(tasks)
  masks = np.zeros([len(tasks), num_classes], bool)
  for t, task in enumerate(tasks):
    masks[t, list(task.classes)] = True
  return masks


def num_outputs(tasks: Sequence[tasks_lib.Task]) -> int:
  """The size of the output layer shared by all tasks."""
  sizes = {t.num_classes for t in tasks}
  if len(sizes) != 1:
    raise ValueError(f"tasks disagree on num_classes: {sorted(sizes)}.")
  return sizes.pop()


def subset(x: np.ndarray, y: np.ndarray, limit: Optional[int],
           seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A random subset of at most ``limit`` examples, in the original order.

  Never a prefix: the data may be sorted by class (the embedded MNIST
  subset is), and a prefix would hold only the first classes.

  Args:
    x: examples ``[n, ...]``.
    y: labels ``[n]``.
    limit: the most examples to keep; ``None`` keeps all.
    seed: seeds the choice.

  Returns:
    ``(x, y)`` restricted to the subset.
  """
  if limit is None or len(y) <= limit:
    return x, y
  keep = np.sort(np.random.default_rng(seed).choice(len(y), limit,
                                                    replace=False))
  return x[keep], y[keep]


def cap(task: tasks_lib.Task, limit: Optional[int]) -> tasks_lib.Task:
  """``task`` with at most ``limit`` training examples (:func:`subset`)."""
  x, y = subset(task.train_x, task.train_y, limit, seed=0)
  return task._replace(train_x=x, train_y=y)


@dataclasses.dataclass(frozen=True)
class Stream:
  """A task sequence with every split on device, shared by all methods.

  Attributes:
    tasks: the host-side tasks (the Fisher reads their training data).
    train: per task, the training split padded to one length.
    val: per task, the validation split padded to one length.
    test: per task, the test split padded to one length.
    masks: boolean ``[T, C]`` active logits per task (:func:`class_masks`).
  """

  tasks: tuple[tasks_lib.Task, ...]
  train: tuple[DeviceSplit, ...]
  val: tuple[DeviceSplit, ...]
  test: tuple[DeviceSplit, ...]
  masks: jax.Array

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)


def check_tasks(tasks: Sequence[tasks_lib.Task]) -> None:
  """Rejects task data that would train silently wrong, before any training.

  Every split of every task must hold at least one example, float images
  ``[n, 28, 28]`` (or square and larger: padded, ``pad_to``) with finite
  values (the loaders scale bytes to [0, 1]), and as many integer labels,
  each one of the task's classes.

  Args:
    tasks: from :func:`experiments.tasks.make_tasks`.

  Raises:
    DataError: naming the task, the split and what is wrong.
  """
  if not tasks:
    raise DataError("the task stream holds no tasks.")
  for t, task in enumerate(tasks):
    for split in ("train", "val", "test"):
      x, y = getattr(task, f"{split}_x"), getattr(task, f"{split}_y")
      where = f"task {t} ({task.name}) {split} split"
      x, y = np.asarray(x), np.asarray(y)
      if (x.ndim != 3 or x.shape[1] != x.shape[2]
          or x.shape[1] < data_lib.IMAGE_SHAPE[0]):
        raise DataError(
            f"{where}: images must have shape [n, 28, 28], got {x.shape} "
            "(or [n, s, s] with s > 28: padded, pad_to).")
      if not np.issubdtype(x.dtype, np.floating):
        raise DataError(
            f"{where}: images have dtype {x.dtype}; expected floating point "
            "values in [0, 1] (experiments.data scales 0..255 bytes).")
      if y.ndim != 1 or len(y) != len(x):
        raise DataError(
            f"{where}: labels must have shape [{len(x)}] (one per image), "
            f"got {y.shape}.")
      if not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{where}: labels have dtype {y.dtype}; expected integers.")
      if len(y) == 0:
        raise DataError(f"{where} holds no examples.")
      finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
      if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(
            f"{where}: {len(bad)} image(s) hold nan or inf values (first at "
            f"example {bad[0]}); fix the data before training.")
      stray = np.setdiff1d(np.unique(y), task.classes)
      if stray.size:
        raise DataError(
            f"{where}: labels {stray[:5].tolist()} are not among the task's "
            f"classes {list(task.classes)}.")


def check_stream(stream: "Stream", config: Any) -> None:
  """Rejects a stream that ``config`` cannot train on, before any training.

  Raises:
    DataError: a task has fewer training examples than one mini-batch.
  """
  for t, split in enumerate(stream.train):
    if split.n < config.batch_size:
      raise DataError(
          f"task {t} ({stream.tasks[t].name}) has {split.n} training "
          f"examples, fewer than batch_size {config.batch_size}.")


def make_stream(tasks: Sequence[tasks_lib.Task], *, eval_batch_size: int,
                train_examples: Optional[int] = None) -> Stream:
  """Checks a task sequence (:func:`check_tasks`) and moves it to the device.

  Args:
    tasks: from :func:`experiments.tasks.make_tasks`.
    eval_batch_size: evaluation splits are padded to a multiple of it.
    train_examples: keep at most this many training examples per task.

  Returns:
    The :class:`Stream`.

  Raises:
    DataError: the data cannot be trained on (see :func:`check_tasks`).
  """
  check_tasks(tasks)
  tasks = tuple(cap(t, train_examples) for t in tasks)
  num_outputs(tasks)

  def split(name, multiple):
    xs = [getattr(t, f"{name}_x") for t in tasks]
    ys = [getattr(t, f"{name}_y") for t in tasks]
    length = -(-max(len(y) for y in ys) // multiple) * multiple  # round up
    return tuple(to_device(x, y, i, length)
                 for i, (x, y) in enumerate(zip(xs, ys, strict=True)))

  return Stream(tasks=tasks, train=split("train", 1),
                val=split("val", eval_batch_size),
                test=split("test", eval_batch_size),
                masks=jnp.asarray(class_masks(tasks)))


def union(stream: Stream) -> DeviceSplit:
  """All tasks' training data in one split (for ``joint``)."""
  x = np.concatenate([t.train_x for t in stream.tasks])
  y = np.concatenate([t.train_y for t in stream.tasks])
  tid = np.concatenate([np.full(len(t.train_y), i, np.int32)
                        for i, t in enumerate(stream.tasks)])
  return to_device(x, y, tid, len(y))
