"""Continual training with EWC and its relatives, and the experiment driver.

Every method trains the same model with the same optimiser,
``optax.chain(ewc_jax.ewc(lam, ...), base_optimizer)``; they differ only in
what is folded in with :func:`ewc_jax.consolidate` at each task boundary:

* ``finetune``: nothing (``lam = 0``): the forgetting baseline.
* ``l2``: a "Fisher" of ones, i.e. plain L2 towards the past solutions.
* ``ewc``: the diagonal Fisher of the finished task (Kirkpatrick et al. 2017),
  one quadratic per task (``mode="separate"``).
* ``online_ewc``: ``F* <- gamma F* + F`` anchored at the latest parameters
  (Schwarz et al. 2018).
* ``si``: Synaptic Intelligence (Zenke et al. 2017): the importance
  ``Omega = max(omega, 0) / (Delta^2 + xi)`` from the path integral
  ``omega = sum_steps -g * delta_theta`` (``g`` the gradient of the task loss
  alone), folded in online with ``gamma = 1``. Zenke's surrogate loss
  ``c sum Omega (theta - theta*)^2`` has no 1/2, so the pull uses
  ``lam = 2 c``. Negative path integrals (noisy steps that raised the loss)
  are clipped at 0: a negative curvature would push parameters away.
* ``joint``: one model trained on the union of all tasks: the upper bound.

An epoch (or a chunk of iterations) is one ``jax.lax.scan`` over mini-batches
drawn on device from data already on device. The optimiser state keeps its
shapes across tasks and holds ``lam`` (an injected hyperparameter), so the
jitted chunk is traced once per model, pull mode and data shape: every task,
lambda and seed reuses it.

Never losing a run. :func:`run_experiment` checkpoints every (method, lambda,
seed) run with orbax (:mod:`experiments.checkpoint`) after each task and every
``config.checkpoint_every`` steps within a task, and writes each finished
run's results atomically to ``runs.json``. ``run_experiment(..., resume=True)``
(``--resume RUN_DIR``) reads the finished runs back and continues the
interrupted one from its last checkpoint. Step ``s`` of task ``t`` draws its
mini-batch and dropout key from ``(seed, t, s)`` alone, so a resumed run ends
with the same accuracy matrix, bit for bit, as an uninterrupted one. The loss
is checked once per chunk, on the host: a non-finite loss stops the run with
:class:`TrainingDiverged` and the last good checkpoint is kept.
"""

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import ewc_jax
from experiments import checkpoint as checkpoint_lib
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import files
from experiments import metrics as metrics_lib
from experiments import models
from experiments import tasks as tasks_lib


class DataError(ValueError):
  """The data of a task stream cannot be trained on (the message says why)."""


class TrainingDiverged(FloatingPointError):
  """The training loss (or a state to checkpoint) became nan or inf."""


# Test hook: a process that has run at least this many optimiser steps (over
# all its runs) kills itself with SIGKILL at the next chunk boundary, as a
# crash or a pre-emption would. Unset, it costs one dict lookup per chunk.
CRASH_ENV = "EWC_JAX_CRASH_AT_STEP"
_steps_run = 0


def _crash_hook(steps: int) -> None:
  global _steps_run
  _steps_run += steps
  limit = os.environ.get(CRASH_ENV)
  if limit and _steps_run >= int(limit):
    os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------
# Data on device.


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


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


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


def _cap(task: tasks_lib.Task, limit: Optional[int]) -> tasks_lib.Task:
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
  ``[n, 28, 28]`` with finite values (the loaders scale bytes to [0, 1]),
  and as many integer labels, each one of the task's classes.

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
      if x.ndim != 3 or x.shape[1:] != data_lib.IMAGE_SHAPE:
        raise DataError(
            f"{where}: images must have shape [n, 28, 28], got {x.shape}.")
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


def check_stream(stream: "Stream", config: config_lib.Config) -> None:
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
  tasks = tuple(_cap(t, train_examples) for t in tasks)
  num_outputs(tasks)

  def split(name, multiple):
    xs = [getattr(t, f"{name}_x") for t in tasks]
    ys = [getattr(t, f"{name}_y") for t in tasks]
    length = _round_up(max(len(y) for y in ys), multiple)
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


# ----------------------------------------------------------------------------
# Optimiser and training state.


@functools.lru_cache(maxsize=None)
def make_optimizer(base: tuple[Any, ...],
                   mode: str) -> optax.GradientTransformation:
  """``optax.chain(ewc_jax.ewc(lam, mode=mode, gamma=...), base optimiser)``.

  ``lam`` and ``gamma`` are injected hyperparameters
  (``optax.inject_hyperparams``): they live in the optimiser state, set by
  :func:`init_opt_state`, not in the transformation. One optimiser object
  per ``(base, mode)`` (cached), so every lambda of a sweep, every seed and
  the unregularised methods share one compiled training chunk.

  Args:
    base: ``("adam", lr, b1, b2)`` or ``("sgd", lr, momentum)``.
    mode: ``"separate"`` or ``"online"``.

  Returns:
    The optimiser.
  """
  if base[0] == "adam":
    _, lr, b1, b2 = base
    base_tx = optax.adam(lr, b1=b1, b2=b2)
  elif base[0] == "sgd":
    _, lr, momentum = base
    base_tx = optax.sgd(lr, momentum=momentum or None)
  else:
    raise ValueError(f"unknown optimizer {base[0]!r}.")
  pull = optax.inject_hyperparams(ewc_jax.ewc, static_args=("mode",))
  return optax.chain(pull(lam=0.0, mode=mode, gamma=1.0), base_tx)


def init_opt_state(tx: optax.GradientTransformation, params: Any,
                   lam: float, gamma: float) -> Any:
  """``tx.init(params)`` with the pull's ``lam`` and ``gamma`` set.

  Args:
    tx: from :func:`make_optimizer`.
    params: the initial parameters.
    lam: the EWC strength (0: no pull).
    gamma: online mode's decay of the old Fisher.

  Returns:
    The optimiser state.
  """
  pull_state, *rest = tx.init(params)
  values = {"lam": jnp.asarray(lam, jnp.float32),
            "gamma": jnp.asarray(gamma, jnp.float32)}
  pull_state = pull_state._replace(
      hyperparams={**pull_state.hyperparams, **values},
      # The EWC state keeps its own copies (consolidate reads gamma there).
      inner_state=dataclasses.replace(pull_state.inner_state, **values))
  return (pull_state, *rest)


def base_optimizer(config: config_lib.Config) -> tuple[Any, ...]:
  """The hashable description of ``config``'s base optimiser."""
  if config.optimizer == "adam":
    return ("adam", config.learning_rate, config.b1, config.b2)
  return ("sgd", config.learning_rate, config.momentum)


def pull_settings(method: str, lam: float,
                  config: config_lib.Config) -> tuple[float, str, float]:
  """The ``(lam, mode, gamma)`` of the EWC transformation for ``method``.

  Args:
    method: a name from ``config.METHODS``.
    lam: the method's strength from its sweep (SI: Zenke's ``c``).
    config: supplies ``gamma``.

  Returns:
    The arguments for :func:`ewc_jax.ewc`.
  """
  if method in ("finetune", "joint"):
    return 0.0, "separate", 1.0
  if method in ("ewc", "l2"):
    return float(lam), "separate", 1.0
  if method == "online_ewc":
    return float(lam), "online", float(config.gamma)
  if method == "si":
    return 2.0 * float(lam), "online", 1.0
  raise ValueError(f"unknown method {method!r}; valid: {config_lib.METHODS}.")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params", "opt_state", "omega", "start"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class State:
  """Everything the jitted training chunk carries.

  Attributes:
    params: the model parameters.
    opt_state: the optimiser state (holds the EWC state).
    omega: SI's path integral for the current task, or ``None``.
    start: the parameters at the start of the current task (SI), or
      ``None``.
  """

  params: Any
  opt_state: Any
  omega: Any = None
  start: Any = None


# ----------------------------------------------------------------------------
# Jitted training and evaluation.


def _loss(graphdef, params, x, y, class_mask, key):
  logits = models.mask_logits(
      models.apply_model(graphdef, params, x, key), class_mask)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), y).mean()


def data_mesh(config: config_lib.Config) -> Optional[jax.sharding.Mesh]:
  """The mesh for data-parallel training, or None for one device."""
  wanted = config.data_parallel or jax.local_device_count()
  n = max(d for d in range(1, min(wanted, jax.local_device_count()) + 1)
          if config.batch_size % d == 0)
  if n <= 1:
    return None
  return jax.make_mesh((n,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.local_devices()[:n])


def _shard_batch(*arrays):
  """Shards the example axis over the ambient mesh's "data" axis, if any."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "data" not in mesh.axis_names:
    return arrays
  spec = jax.sharding.PartitionSpec("data")
  return tuple(jax.lax.with_sharding_constraint(a, spec) for a in arrays)


def _step(graphdef, tx, dropout, state: State, x, y, class_mask, key):
  """One optimiser step; updates SI's path integral when it is tracked."""
  x, y, class_mask = _shard_batch(x, y, class_mask)
  key = key if dropout else None
  loss, grads = jax.value_and_grad(
      lambda p: _loss(graphdef, p, x, y, class_mask, key))(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  omega = state.omega
  if omega is not None:
    # grads is the task loss's gradient only: the pull is added by tx.
    omega = jax.tree.map(lambda w, g, new, old: w - g * (new - old),
                         omega, grads, params, state.params)
  return dataclasses.replace(state, params=params, opt_state=opt_state,
                             omega=omega), loss


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4),
                   donate_argnums=(5,))
def train_chunk(graphdef, tx, batch_size: int, max_steps: int, dropout: bool,
                state: State, split: DeviceSplit, num_steps: jax.Array,
                masks: jax.Array, key: jax.Array, offset: jax.Array = 0):
  """Runs ``num_steps`` optimiser steps as ONE ``jax.lax.scan``.

  Mini-batches are drawn without replacement from a permutation of the
  split's real examples (padding rows never enter a batch), made on device
  from ``key``, the key of one epoch. Step ``i`` of the chunk takes
  mini-batch ``offset + i`` of that permutation and the dropout key
  ``fold_in(., offset + i)``: an epoch split into several chunks (at a
  checkpoint, or a restart) trains exactly as one chunk would. The scan has
  the static length ``max_steps``; steps from ``num_steps`` on are skipped
  with ``jax.lax.cond``, so tasks of different sizes and a last partial
  chunk use the same compiled function.

  Args:
    graphdef: the model's graph definition (static).
    tx: the optimiser (static).
    batch_size: examples per step (static).
    max_steps: the scan length (static), at most ``split.x.shape[0] //
      batch_size``.
    dropout: whether the model uses dropout (static).
    state: the training state (donated).
    split: the training data on device.
    num_steps: steps to run, at most ``split.n // batch_size``.
    masks: ``[T, C]`` active logits per task.
    key: PRNG key of the epoch, for the permutation and dropout.
    offset: the chunk's first step's position in the epoch (0: the chunk
      starts the epoch); ``offset + num_steps <= split.n // batch_size``.

  Returns:
    ``(state, mean_loss)``: the new state and the mean training loss (task
    loss, without the pull) over the steps run.
  """
  perm_key, drop_key = jax.random.split(key)
  size = split.x.shape[0]
  scores = jax.random.uniform(perm_key, [size])
  order = jnp.argsort(jnp.where(jnp.arange(size) < split.n, scores, 2.0))

  def body(state, i):
    def run(state):
      j = offset + i  # the step's position in the epoch
      idx = jax.lax.dynamic_slice(order, [j * batch_size], [batch_size])
      return _step(graphdef, tx, dropout, state, split.x[idx], split.y[idx],
                   masks[split.tid[idx]], jax.random.fold_in(drop_key, j))

    def skip(state):
      return state, jnp.zeros([], jnp.float32)

    return jax.lax.cond(i < num_steps, run, skip, state)

  state, losses = jax.lax.scan(body, state, jnp.arange(max_steps))
  return state, jnp.sum(losses) / jnp.maximum(num_steps, 1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def accuracy(graphdef, batch_size: int, params, split: DeviceSplit,
             class_mask: jax.Array) -> jax.Array:
  """Accuracy of the evaluation-mode model on one split (padding excluded).

  Args:
    graphdef: the model's graph definition (static).
    batch_size: evaluation batch size (static); divides the padded length.
    params: the parameters.
    split: the data, padded to a multiple of ``batch_size``.
    class_mask: ``[C]`` the task's active logits.

  Returns:
    A float32 scalar in [0, 1].
  """
  num_batches = split.x.shape[0] // batch_size
  xs = split.x.reshape(num_batches, batch_size, *split.x.shape[1:])
  ys = split.y.reshape(num_batches, batch_size)
  index = jnp.arange(split.x.shape[0]).reshape(num_batches, batch_size)

  def correct(batch):
    x, y, i = batch
    logits = models.mask_logits(models.apply_model(graphdef, params, x),
                                class_mask)
    hit = (jnp.argmax(logits, -1) == y) & (i < split.n)
    return jnp.sum(hit.astype(jnp.int32))

  return jnp.sum(jax.lax.map(correct, (xs, ys, index))) / split.n


def evaluate(graphdef, batch_size: int, params, splits, masks) -> np.ndarray:
  """Accuracy on every task's split: float64 ``[T]`` (one host transfer)."""
  accs = [accuracy(graphdef, batch_size, params, s, masks[t])
          for t, s in enumerate(splits)]
  return np.asarray(jax.device_get(accs), np.float64)


# ----------------------------------------------------------------------------
# One method on one task sequence.


@dataclasses.dataclass
class MethodResult:
  """The outcome of one (method, lambda, seed) run.

  Attributes:
    method: the method's name.
    seed: the seed (model init and data order; the stream's seed too).
    lam: the strength from the sweep (SI: Zenke's ``c``; 0 if none).
    R: test accuracy ``[T, T]``: ``R[i, j]`` on task ``j`` after task ``i``.
    R_val: the same on the validation splits (used to choose ``lam``).
    b: test accuracy of the initial model on each task ``[T]``.
    b_val: the same on the validation splits.
    time_s: wall time of the run, compilation included.
    train_loss: per task, the mean training loss of each chunk.
  """

  method: str
  seed: int
  lam: float
  R: np.ndarray
  R_val: np.ndarray
  b: np.ndarray
  b_val: np.ndarray
  time_s: float
  train_loss: list[list[float]]

  def metrics(self) -> dict[str, Any]:
    """ACC, BWT, FWT, forgetting on test, and ACC on validation.

    ``joint`` is trained once on all tasks (its ``R`` has identical rows),
    so its FWT is undefined and reported as ``None``.
    """
    out = metrics_lib.summarize(self.R, self.b)
    if self.method == "joint":
      out["fwt"] = None
    out["val_acc"] = metrics_lib.acc(self.R_val)
    return out

  def to_json(self) -> dict[str, Any]:
    """A JSON-ready dict, metrics included."""
    return {
        "method": self.method, "seed": self.seed, "lam": self.lam,
        **self.metrics(), "time_s": self.time_s, "R": self.R.tolist(),
        "R_val": self.R_val.tolist(), "b": self.b.tolist(),
        "b_val": self.b_val.tolist(), "train_loss": self.train_loss,
    }

  @classmethod
  def from_json(cls, row: dict[str, Any]) -> "MethodResult":
    """The inverse of :meth:`to_json` (the metrics are recomputed).

    JSON keeps every bit of a float64, so ``R`` is read back exactly.
    """
    arrays = {k: np.asarray(row[k], np.float64)
              for k in ("R", "R_val", "b", "b_val")}
    return cls(method=row["method"], seed=int(row["seed"]),
               lam=float(row["lam"]), time_s=float(row["time_s"]),
               train_loss=row["train_loss"], **arrays)


def steps_per_task(config: config_lib.Config, n: int) -> int:
  """Optimiser steps for a task of ``n`` training examples."""
  if config.iterations is not None:
    return config.iterations
  return config.epochs * (n // config.batch_size)


def si_importance(omega, params, start, xi: float):
  """SI's importance ``max(omega, 0) / ((params - start)^2 + xi)``.

  Args:
    omega: the path integral ``sum -g * delta`` of the finished task.
    params: the parameters at the end of the task.
    start: the parameters at its start.
    xi: the damping term.

  Returns:
    A non-negative float32 tree shaped like ``params``.
  """
  return jax.tree.map(
      lambda w, p, s: jnp.maximum(w, 0.0) / (jnp.square(p - s) + xi),
      omega, params, start)


def task_curvature(method: str, config: config_lib.Config, graphdef,
                   state: State, task: tasks_lib.Task, key: jax.Array):
  """What ``method`` folds into the EWC state after training ``task``.

  Args:
    method: ``l2``, ``ewc``, ``online_ewc`` or ``si``.
    config: supplies the Fisher estimator, budget and SI's xi.
    graphdef: the model's graph definition.
    state: the training state at the end of the task.
    task: the finished task (its training data feeds the Fisher).
    key: PRNG key for the sampled Fisher.

  Returns:
    A non-negative tree shaped like the parameters.
  """
  if method == "l2":
    return jax.tree.map(jnp.ones_like, state.params)
  if method == "si":
    return si_importance(state.omega, state.params, state.start,
                         config.si_xi)
  apply_fn = models.eval_apply_fn(graphdef, tuple(task.classes),
                                  task.num_classes)
  seed = int(jax.random.randint(key, [], 0, 2**31 - 1))
  x, y = subset(task.train_x, task.train_y, config.fisher_examples, seed)
  return ewc_jax.fisher_diagonal(
      apply_fn, state.params, (x, y), estimator=config.fisher, rng=key,
      batch_size=config.fisher_batch_size)


def _init_state(config, method, lam, num_classes, seed):
  model = models.make_model(
      config.model, num_classes, seed=seed, hidden=config.hidden,
      dropout=config.dropout, channels=config.channels,
      cnn_hidden=config.cnn_hidden)
  graphdef, params = models.split_model(model)
  pull_lam, mode, gamma = pull_settings(method, lam, config)
  tx = make_optimizer(base_optimizer(config), mode)
  state = State(params=params,
                opt_state=init_opt_state(tx, params, pull_lam, gamma))
  if method == "si":
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = dataclasses.replace(state, omega=zeros, start=params)
  return graphdef, tx, unalias(state)


def unalias(state: State) -> State:
  """Copies every leaf, so that no two leaves share a device buffer.

  :func:`train_chunk` donates its state, and XLA refuses to donate one
  buffer twice; ``ewc_jax.ewc``'s init and online consolidation (and SI's
  ``start = params``) alias leaves.
  """
  return jax.tree.map(jnp.copy, state)


def _segments(total: int, per_epoch: int, every: Optional[int],
              start: int = 0) -> list[tuple[int, int]]:
  """Splits steps ``[start, total)`` into chunks ``(first, end)``.

  A chunk ends at every epoch boundary (a multiple of ``per_epoch``) and, if
  ``every`` is set, at every multiple of ``every`` (a checkpoint), so that a
  chunk never spans two epochs and every checkpoint falls between chunks.
  """
  out, a = [], start
  while a < total:
    b = min(total, (a // per_epoch + 1) * per_epoch)
    if every is not None:
      b = min(b, (a // every + 1) * every)
    out.append((a, b))
    a = b
  return out


def _train_on(config, graphdef, tx, state, split, masks, total_steps, key,
              desc, progress, *, start: int = 0,
              losses: Optional[list[float]] = None,
              on_checkpoint: Optional[Callable[..., None]] = None):
  """Trains steps ``start..total_steps`` on ``split``, one scan per chunk.

  Step ``s`` uses the epoch key ``fold_in(key, s // E)`` (``E`` steps per
  epoch) at position ``s % E``: the result does not depend on where the
  chunks (or a restart) fall.

  Args:
    config: supplies the batch size, dropout and ``checkpoint_every``.
    graphdef: the model's graph definition.
    tx: the optimiser.
    state: the training state at step ``start``.
    split: the training data on device.
    masks: ``[T, C]`` active logits per task.
    total_steps: the task's number of steps.
    key: the task's PRNG key.
    desc: names the run and task in the progress bar and in errors.
    progress: show a progress bar.
    start: the first step to run (after a restart).
    losses: the mean losses of the chunks before ``start``.
    on_checkpoint: called as ``on_checkpoint(state, step, losses)`` at every
      multiple of ``config.checkpoint_every`` before ``total_steps``; chunks
      are cut at those steps only when it is given.

  Returns:
    ``(state, losses)``: the state after ``total_steps`` steps and every
    chunk's mean training loss.

  Raises:
    TrainingDiverged: a chunk's mean loss is nan or inf; the state after it
      is not checkpointed.
  """
  per_epoch = split.n // config.batch_size
  if per_epoch < 1:
    raise DataError(
        f"{desc}: {split.n} training examples is fewer than batch_size "
        f"{config.batch_size}.")
  max_steps = split.x.shape[0] // config.batch_size
  every = config.checkpoint_every if on_checkpoint is not None else None
  losses = list(losses or [])
  bar = tqdm.tqdm(total=total_steps, initial=start, desc=desc, unit="step",
                  leave=False, disable=not progress, file=sys.stderr)
  for a, b in _segments(total_steps, per_epoch, every, start):
    epoch, offset = divmod(a, per_epoch)
    state, loss = train_chunk(
        graphdef, tx, config.batch_size, max_steps, config.dropout > 0,
        state, split, jnp.asarray(b - a, jnp.int32), masks,
        jax.random.fold_in(key, epoch), jnp.asarray(offset, jnp.int32))
    loss = float(loss)  # one host sync per chunk
    if not math.isfinite(loss):
      bar.close()
      raise TrainingDiverged(
          f"{desc}: the training loss became {loss} within steps {a + 1}-{b} "
          f"of {total_steps} (checked once per chunk); training stopped. "
          "Lower the learning rate or lambda, or check the data.")
    losses.append(loss)
    bar.update(b - a)
    bar.set_postfix(loss=f"{loss:.4f}")
    if every is not None and b < total_steps and b % every == 0:
      on_checkpoint(state, b, losses)
    _crash_hook(b - a)
  bar.close()
  return state, losses


@dataclasses.dataclass
class _Record:
  """Where a run stands: what a checkpoint's ``meta`` holds besides arrays.

  ``task`` is the next task to train (``num_phases``: all done) and ``step``
  the next step within it; ``train_loss`` has one list per finished task and
  ``task_loss`` the chunks of the current one.
  """

  R: np.ndarray
  R_val: np.ndarray
  b: np.ndarray
  b_val: np.ndarray
  train_loss: list[list[float]]
  task_loss: list[float]
  task: int
  step: int
  time_s: float

  def to_json(self) -> dict[str, Any]:
    # Copies throughout: a background write must not see later changes.
    return {"R": self.R.tolist(), "R_val": self.R_val.tolist(),
            "b": self.b.tolist(), "b_val": self.b_val.tolist(),
            "train_loss": [list(x) for x in self.train_loss],
            "task_loss": list(self.task_loss), "task": self.task,
            "step": self.step, "time_s": self.time_s}

  @classmethod
  def from_json(cls, meta: dict[str, Any]) -> "_Record":
    arrays = {k: np.asarray(meta[k], np.float64)
              for k in ("R", "R_val", "b", "b_val")}
    return cls(**arrays, train_loss=meta["train_loss"],
               task_loss=meta["task_loss"], task=meta["task"],
               step=meta["step"], time_s=meta["time_s"])


class _RunCheckpointer:
  """Saves and restores one run's checkpoints (:mod:`experiments.checkpoint`).

  The saved tree is ``{"state": State, "key": key_data}``; ``meta`` holds the
  :class:`_Record`, the run's identity, the resolved config and the data
  seed, which a restore checks.
  """

  def __init__(self, directory, config, method, lam, seed, totals, desc):
    self.store = checkpoint_lib.RunCheckpoints(directory)
    self.config, self.totals, self.desc = config, totals, desc
    self.identity = {"method": method, "lam": float(lam), "seed": int(seed),
                     "data_seed": int(seed)}

  def save(self, state: State, key: jax.Array, record: _Record) -> None:
    arrays, paths = checkpoint_lib.flatten(
        {"state": state, "key": jax.random.key_data(key)})
    for path, x in zip(paths, arrays.values(), strict=True):
      if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
        raise TrainingDiverged(
            f"{self.desc(record.task)}: {path} holds nan or inf after step "
            f"{record.step}; not checkpointed (the last good checkpoint is "
            "kept).")
    step = sum(self.totals[:record.task]) + record.step
    self.store.save(step, arrays, {
        **self.identity, "config": self.config.to_json(), "paths": paths,
        **record.to_json()})

  def restore(self, state: State, key: jax.Array
              ) -> Optional[tuple[State, jax.Array, _Record]]:
    """The latest checkpoint, or ``None`` when there is none."""
    if self.store.latest_step() is None:
      return None
    tree, meta = self.store.restore(
        {"state": state, "key": jax.random.key_data(key)})
    where = f"checkpoint in {self.store.directory}"
    for name, value in self.identity.items():
      if meta.get(name) != value:
        raise ValueError(
            f"{where} belongs to another run: {name} {meta.get(name)!r}, "
            f"expected {value!r}.")
    saved = config_lib.from_json(meta["config"])
    diff = config_lib.differences(saved, self.config)
    if diff:
      raise ValueError(
          f"{where} was made with another config: {_describe(diff)}.")
    restored_key = jax.random.wrap_key_data(tree["key"])
    return unalias(tree["state"]), restored_key, _Record.from_json(meta)

  def close(self) -> None:
    self.store.close()


def _describe(diff: Sequence[tuple[str, Any, Any]]) -> str:
  show = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
  return "; ".join(f"{name}: saved {show(a)!r}, now {show(b)!r}"
                   for name, a, b in diff)


def run_method(config: config_lib.Config, stream: Stream, method: str,
               seed: int, lam: float = 0.0, *,
               progress: Optional[bool] = None,
               checkpoint_dir: Any = None,
               log: Optional[Callable[[str], None]] = None) -> MethodResult:
  """Trains one method through the task sequence, evaluating after each task.

  With ``checkpoint_dir`` the run is checkpointed after every task and every
  ``config.checkpoint_every`` steps within a task, and continues from the
  latest checkpoint found there (mid-task included), ending with the same
  result as an uninterrupted run.

  Args:
    config: the experiment configuration.
    stream: the tasks on device (:func:`make_stream`), shared by methods.
    method: a name from ``experiments.config.METHODS``.
    seed: seeds the model initialisation, batch order, dropout and Fisher
      sampling.
    lam: the method's strength (SI: ``c``); ignored by finetune and joint.
    progress: show progress bars (default ``config.progress``).
    checkpoint_dir: this run's own checkpoint directory, or ``None``.
    log: called with a line when the run resumes from a checkpoint.

  Returns:
    The :class:`MethodResult`; ``time_s`` includes the time before a
    restart.

  Raises:
    TrainingDiverged: the training loss became nan or inf.
    ValueError: the checkpoint in ``checkpoint_dir`` belongs to another
      run or config.
  """
  if method not in config_lib.METHODS:
    raise ValueError(
        f"unknown method {method!r}; valid: {config_lib.METHODS}.")
  progress = config.progress if progress is None else progress
  start_time = time.perf_counter()
  num_tasks = stream.num_tasks
  graphdef, tx, state = _init_state(
      config, method, lam, num_outputs(stream.tasks), seed)
  key = jax.random.key(seed)
  ev = functools.partial(evaluate, graphdef, config.eval_batch_size)
  label = f"{method}" + (f" lam={lam:g}" if method in config_lib.LAM_FIELDS
                         else "") + f" seed={seed}"
  # A phase is one training run on one split: a task, or joint's union.
  if method == "joint":
    splits = [union(stream)]
    totals = [sum(steps_per_task(config, t.n) for t in stream.train)]
    desc = lambda t: f"{label} all tasks"  # noqa: E731
  else:
    splits = list(stream.train)
    totals = [steps_per_task(config, s.n) for s in splits]
    desc = lambda t: f"{label} task {min(t, num_tasks - 1) + 1}/{num_tasks}"  # noqa: E731

  ckpt = restored = None
  if checkpoint_dir is not None:
    ckpt = _RunCheckpointer(checkpoint_dir, config, method, lam, seed,
                            totals, desc)
  try:
    if ckpt is not None:
      restored = ckpt.restore(state, key)
    if restored is not None:
      state, key, record = restored
      if log is not None:
        log(f"{label}: resuming from its checkpoint at task {record.task + 1},"
            f" step {record.step}")
    else:
      record = _Record(
          R=np.zeros([num_tasks, num_tasks]),
          R_val=np.zeros([num_tasks, num_tasks]),
          b=ev(state.params, stream.test, stream.masks),
          b_val=ev(state.params, stream.val, stream.masks),
          train_loss=[], task_loss=[], task=0, step=0, time_s=0.0)
    elapsed = record.time_s

    def checkpoint(state, task, step, task_loss):
      """Moves ``record`` to (task, step) and saves it with ``state``."""
      record.task, record.step, record.task_loss = task, step, list(task_loss)
      record.time_s = elapsed + time.perf_counter() - start_time
      if ckpt is not None:
        ckpt.save(state, key, record)

    first_task, first_step = record.task, record.step
    for t in range(first_task, len(splits)):
      task_key = jax.random.fold_in(key, t)
      start = first_step if t == first_task else 0

      def on_checkpoint(state, step, losses, t=t):
        checkpoint(state, t, step, losses)

      state, losses = _train_on(
          config, graphdef, tx, state, splits[t], stream.masks, totals[t],
          task_key, desc(t), progress, start=start,
          losses=record.task_loss if start else None,
          on_checkpoint=None if ckpt is None else on_checkpoint)
      if method == "joint":
        record.R[:] = ev(state.params, stream.test, stream.masks)
        record.R_val[:] = ev(state.params, stream.val, stream.masks)
      else:
        record.R[t] = ev(state.params, stream.test, stream.masks)
        record.R_val[t] = ev(state.params, stream.val, stream.masks)
        if method != "finetune" and t < num_tasks - 1:
          state = _consolidate(method, config, graphdef, state,
                               stream.tasks[t],
                               jax.random.fold_in(task_key, 1))
      record.train_loss.append(losses)
      checkpoint(state, t + 1, 0, [])
  finally:
    if ckpt is not None:
      ckpt.close()
  return MethodResult(method=method, seed=seed, lam=float(lam), R=record.R,
                      R_val=record.R_val, b=record.b, b_val=record.b_val,
                      time_s=elapsed + time.perf_counter() - start_time,
                      train_loss=record.train_loss)


def _consolidate(method, config, graphdef, state, task, key) -> State:
  """Folds the finished task into the EWC state (and resets SI's path)."""
  curvature = task_curvature(method, config, graphdef, state, task, key)
  opt_state = ewc_jax.consolidate(state.opt_state, state.params, curvature)
  state = dataclasses.replace(state, opt_state=opt_state)
  if method == "si":
    state = dataclasses.replace(
        state, omega=jax.tree.map(jnp.zeros_like, state.omega),
        start=state.params)
  return unalias(state)


# ----------------------------------------------------------------------------
# The experiment: methods x lambdas x seeds, selection, outputs.


def select(results: Sequence[MethodResult]) -> dict[str, float]:
  """Each method's lambda with the best mean validation ACC over seeds.

  Args:
    results: runs of any methods, lambdas and seeds.

  Returns:
    ``{method: lam}``. Ties go to the smaller lambda.
  """
  scores: dict[str, dict[float, list[float]]] = {}
  for r in results:
    scores.setdefault(r.method, {}).setdefault(r.lam, []).append(
        metrics_lib.acc(r.R_val))
  return {m: max(sorted(by_lam), key=lambda lam: np.mean(by_lam[lam]))
          for m, by_lam in scores.items()}


def aggregate(results: Sequence[MethodResult],
              chosen: dict[str, float]) -> list[dict[str, Any]]:
  """Mean and std over seeds of each method's metrics at its chosen lambda.

  Args:
    results: all runs.
    chosen: ``{method: lam}`` from :func:`select`.

  Returns:
    One row per method (in first-seen order) with ``method``, ``lam``,
    ``seeds`` and ``<metric>_mean`` / ``<metric>_std`` for ``acc``, ``bwt``,
    ``fwt``, ``forgetting``, ``val_acc`` and ``time_s``; ``R_mean`` is the
    accuracy matrix averaged over seeds.
  """
  rows = []
  for method, lam in chosen.items():
    runs = [r for r in results if r.method == method and r.lam == lam]
    row = {"method": method, "lam": lam, "seeds": [r.seed for r in runs]}
    for name in ("acc", "bwt", "fwt", "forgetting", "val_acc", "time_s"):
      values = [r.time_s if name == "time_s" else r.metrics()[name]
                for r in runs]
      if any(v is None for v in values):
        row[f"{name}_mean"] = row[f"{name}_std"] = None
      else:
        row[f"{name}_mean"] = float(np.mean(values))
        row[f"{name}_std"] = float(np.std(values))
    row["R_mean"] = np.mean([r.R for r in runs], axis=0).tolist()
    rows.append(row)
  return rows


write_atomic = files.write_atomic


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Writes ``obj`` as indented JSON, atomically."""
  write_atomic(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def write_csv(path: pathlib.Path, header: Sequence[str],
              rows: Sequence[Sequence[Any]]) -> None:
  """Writes a CSV table, atomically (``None`` becomes an empty cell)."""
  import csv  # noqa: PLC0415
  import io  # noqa: PLC0415

  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(header)
  for row in rows:
    writer.writerow(["" if v is None else v for v in row])
  write_atomic(path, buf.getvalue())


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


def write_results(workdir: pathlib.Path, config: config_lib.Config,
                  dataset_info: dict[str, Any],
                  results: Sequence[MethodResult], *,
                  final: bool) -> dict[str, Any]:
  """Writes every result file (after each run, so partial runs survive).

  Files: ``config.json``; ``runs.json`` and ``runs.csv`` (every method,
  lambda and seed, with R, R_val, b and metrics); ``accuracy.csv`` (R and b
  in long form); ``summary.json`` and ``summary.csv`` (per method, the
  lambda chosen on validation and mean/std over seeds); ``R_<method>.csv``
  (the seed-averaged R at the chosen lambda); and, when ``final``, the plots
  ``avg_accuracy.png`` and ``R_<method>.png``.

  Args:
    workdir: the run directory.
    config: the resolved configuration.
    dataset_info: name, description and sizes of the data.
    results: the runs so far.
    final: also draw the plots.

  Returns:
    The summary dict written to ``summary.json``.
  """
  write_json(workdir / "config.json",
             {"config": config.to_json(), "dataset": dataset_info})
  write_json(workdir / "runs.json", [r.to_json() for r in results])
  names = ("acc", "bwt", "fwt", "forgetting", "val_acc")
  chosen = select(results)
  write_csv(workdir / "runs.csv",
            ["method", "lam", "seed", *names, "time_s", "selected"],
            [[r.method, r.lam, r.seed, *(r.metrics()[n] for n in names),
              round(r.time_s, 3), chosen.get(r.method) == r.lam]
             for r in results])
  long_rows = []
  for r in results:
    for split, mat, init in (("test", r.R, r.b), ("val", r.R_val, r.b_val)):
      long_rows += [[r.method, r.lam, r.seed, split, -1, j, init[j]]
                    for j in range(len(init))]
      long_rows += [[r.method, r.lam, r.seed, split, i, j, mat[i, j]]
                    for i in range(len(mat)) for j in range(len(mat))]
  write_csv(workdir / "accuracy.csv",
            ["method", "lam", "seed", "split", "after_task", "task",
             "accuracy"], long_rows)
  rows = aggregate(results, chosen)
  sweep = {}
  for r in results:
    sweep.setdefault(r.method, {}).setdefault(str(r.lam), []).append(
        metrics_lib.acc(r.R_val))
  summary = {
      "methods": rows,
      "val_acc_by_lam": {m: {lam: float(np.mean(v)) for lam, v in d.items()}
                         for m, d in sweep.items()},
      "complete": final,
  }
  write_json(workdir / "summary.json", summary)
  cols = [f"{n}_{s}" for n in (*names, "time_s") for s in ("mean", "std")]
  write_csv(workdir / "summary.csv", ["method", "lam", "num_seeds", *cols],
            [[row["method"], row["lam"], len(row["seeds"]),
              *(row[c] for c in cols)] for row in rows])
  for row in rows:
    mat = row["R_mean"]
    write_csv(workdir / f"R_{row['method']}.csv",
              ["after_task", *(f"task_{j}" for j in range(len(mat)))],
              [[i, *mat[i]] for i in range(len(mat))])
  if final:
    from experiments import plots  # noqa: PLC0415 (matplotlib is slow)

    for name, png in plots.render_plots(rows).items():
      write_atomic(workdir / name, png)
  return summary


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """The summary table: method, lambda, ACC, BWT, FWT, forgetting, time.

  Args:
    rows: from :func:`aggregate`.

  Returns:
    A fixed-width text table; ``mean +- std`` when there are several seeds.
  """
  def cell(row, name, scale=100.0, digits=2):
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    if mean is None:
      return "n/a"
    text = f"{mean * scale:.{digits}f}"
    if len(row["seeds"]) > 1:
      text += f" +- {std * scale:.{digits}f}"
    return text

  header = ["method", "lam", "ACC %", "BWT %", "FWT %", "forget %",
            "val ACC %", "time s"]
  body = [[r["method"], f"{r['lam']:g}", cell(r, "acc"), cell(r, "bwt"),
           cell(r, "fwt"), cell(r, "forgetting"), cell(r, "val_acc"),
           cell(r, "time_s", 1.0, 1)] for r in rows]
  columns = zip(header, *body, strict=True)
  widths = [max(len(str(x)) for x in col) for col in columns]
  lines = ["  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True))
           for line in [header, *body]]
  lines.insert(1, "-" * len(lines[0]))
  lines.append("lam: the strength chosen on validation (si: Zenke's c, pull "
               "2c); time: per run, compilation included.")
  return "\n".join(lines)


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


CHECKPOINTS = "checkpoints"


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
        f"field(s): {_describe(diff)}. Resume without these flags to "
        "continue with the saved config, or start a new run with --out.")


def _check_same_data(workdir: pathlib.Path, info: dict[str, Any]) -> None:
  saved = json.loads((workdir / "config.json").read_text()).get("dataset", {})
  fields = ("name", "num_train", "num_test", "num_classes", "sha256")
  diff = [f for f in fields if f in saved and saved[f] != info[f]]
  if diff:
    listed = "; ".join(f"{f}: saved {saved[f]!r}, now {info[f]!r}"
                       for f in diff)
    raise ValueError(
        f"cannot resume {workdir}: the data differ from the run's ({listed}).")


def load_results(workdir: Any) -> list[MethodResult]:
  """The finished runs saved in ``workdir/runs.json`` (none if absent)."""
  path = pathlib.Path(workdir) / "runs.json"
  if not path.is_file():
    return []
  return [MethodResult.from_json(row) for row in json.loads(path.read_text())]


def run_experiment(config: config_lib.Config, workdir: Any, *,
                   overwrite: bool = False,
                   dataset: Optional[data_lib.Dataset] = None,
                   log=print, resume: bool = False) -> dict[str, Any]:
  """Runs every method, lambda and seed of ``config`` and writes the results.

  For each seed the task stream is built once (same data and task order for
  every method); each regularised method runs each lambda of its sweep; the
  lambda with the best mean validation ACC is reported (test numbers are
  never used for the choice).

  Every run is checkpointed in ``workdir/checkpoints/<method>-lam<lam>-
  seed<seed>/`` (see :func:`run_method`); once its result is in
  ``runs.json`` its checkpoint is deleted (kept with
  ``config.keep_checkpoints``).

  Args:
    config: the configuration.
    workdir: the run directory (created; must be empty unless
      ``overwrite`` or ``resume``).
    overwrite: allow a non-empty run directory (its checkpoints are
      deleted).
    dataset: use this dataset instead of loading ``config.dataset``.
    log: called with progress lines and the final table.
    resume: continue the run in ``workdir``: finished runs are read from
      ``runs.json``, the interrupted one continues from its checkpoint.
      ``config`` must equal the saved one (:func:`check_resume`).

  Returns:
    The summary (as in ``summary.json``) plus ``"results"``, the list of
    :class:`MethodResult`, and ``"workdir"``.

  Raises:
    DataError: the data cannot be trained on (before any training).
    TrainingDiverged: a run's loss became nan or inf; the finished runs'
      results and the failed run's last good checkpoint are kept.
  """
  config = config_lib.validate(config)
  if resume:
    if overwrite:
      raise ValueError("resume and overwrite exclude each other.")
    workdir = pathlib.Path(workdir)
    check_resume(workdir, config)
  else:
    workdir = prepare_workdir(workdir, overwrite)
    # An overwritten run's checkpoints must not leak into this one.
    shutil.rmtree(workdir / CHECKPOINTS, ignore_errors=True)
  if dataset is None:
    dataset = data_lib.load_dataset(config.dataset, config.data_dir)
  info = dataset_info(dataset)
  done = {}
  if resume:
    _check_same_data(workdir, info)
    done = {(r.method, r.lam, r.seed): r for r in load_results(workdir)}
  write_json(workdir / "config.json",
             {"config": config.to_json(), "dataset": info})
  results = []
  mesh = data_mesh(config)
  if mesh is not None:
    log(f"data parallel: each mini-batch sharded over {mesh.size} devices "
        f"({jax.devices()[0].platform})")
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    _run_all(config, workdir, dataset, info, done, results, log)
  summary = write_results(workdir, config, info, results, final=True)
  if not config.keep_checkpoints:
    shutil.rmtree(workdir / CHECKPOINTS, ignore_errors=True)
  log(format_table(summary["methods"]))
  return {**summary, "results": results, "workdir": workdir}


def _run_all(config, workdir, dataset, info, done, results, log):
  """Runs (or reads back) every (seed, method, lam) run, in order."""
  for seed in config.seeds:
    stream = None
    for method in config.methods:
      for lam in config.lams(method):
        name = checkpoint_lib.run_name(method, lam, seed)
        ckpt_dir = workdir / CHECKPOINTS / name
        result = done.get((method, float(lam), seed))
        if result is None:
          if stream is None:  # only for seeds with runs left to do
            tasks = tasks_lib.make_tasks(
                config.tasks, dataset, config.num_tasks, seed,
                val_fraction=config.val_fraction)
            stream = make_stream(tasks, eval_batch_size=config.eval_batch_size,
                                 train_examples=config.train_examples)
            check_stream(stream, config)
          try:
            result = run_method(config, stream, method, seed, lam,
                                checkpoint_dir=ckpt_dir, log=log)
          except TrainingDiverged as e:
            steps = sorted(int(p.name) for p in ckpt_dir.glob("*")
                           if p.name.isdigit())
            kept = (f"its last good checkpoint (step {steps[-1]}) is kept in "
                    f"{ckpt_dir}" if steps else "this run had no checkpoint "
                    "yet")
            raise TrainingDiverged(
                f"{e} Finished runs are in {workdir / 'runs.json'}; "
                f"{kept}.") from None
          source = f"{result.time_s:.1f} s"
        else:
          source = "finished earlier, read from runs.json"
        results.append(result)
        m = result.metrics()
        log(f"{method:>10} lam={lam:<8g} seed={seed}  ACC {m['acc']:.4f}  "
            f"BWT {m['bwt']:+.4f}  val ACC {m['val_acc']:.4f}  ({source})")
        write_results(workdir, config, info, results, final=False)
        if not config.keep_checkpoints:
          shutil.rmtree(ckpt_dir, ignore_errors=True)
