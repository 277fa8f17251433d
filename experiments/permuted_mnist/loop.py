"""ONE training loop: a run, or K runs vmapped as one program, resumable.

A run trains one method through the task sequence, evaluating every task
after every task, and folds each finished task into the EWC state with the
method's importance (:mod:`methods`). With ``batched=True`` the K members
``(lam, seed)`` of a sweep are stacked along a leading axis and every jitted
piece is vmapped over them (:mod:`steps`): the same loop, the same keys, the
same chunks; member ``k`` equals the separate run to float32 rounding.

Chunks. A phase (a task, or joint's union) runs as chunks of one
``lax.scan`` each, cut at epoch boundaries and, with checkpoints, at every
multiple of ``config.checkpoint_every``. Step ``s`` of task ``t`` draws its
mini-batch and dropout key from ``(seed, t, s)`` alone, so the results do
not depend on where chunks (or a restart) fall: a resumed run ends with the
same accuracy matrix, bit for bit. Chunks are dispatched without waiting:
each chunk's loss is read back while the next one runs, and checked for nan
or inf there (at the latest before a checkpoint), so the host never stalls
the device between chunks.

Divergence. A run also stops, before it overflows to nan, when a chunk's
mean training loss blows up (:func:`blew_up`): above ``BLOWUP x`` the
chance-level cross-entropy ``ln C``, or above ``BLOWUP x`` the phase's
first chunk and ``10 ln C``. A learning run never gets there (its loss
starts near ``ln C`` and falls); the check only reads the losses, so it
never changes a result.

Time per phase (compile, train, fisher, eval, checkpoint) is measured with
:class:`experiments.common.timing.PhaseTimer` and returned with the results.
"""

import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import auto as tqdm

from experiments.common import timing as timing_lib
from experiments.data.dataset import DataError
from experiments.permuted_mnist import checkpointing
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import methods as methods_lib
from experiments.permuted_mnist import ops as ops_lib
from experiments.permuted_mnist import results as results_lib
from experiments.permuted_mnist import stream as stream_lib

logger = logging.getLogger(__name__)
TrainingDiverged = checkpointing.TrainingDiverged
# on_chunk(steps): called after every chunk with the steps it ran (a test
# hook: a crash injected there is a crash between two chunks).
ChunkHook = Callable[[int], None]
# A chunk's mean loss this many times its reference means divergence.
BLOWUP = 100.0


def blew_up(loss: float, first: Optional[float], num_classes: int) -> bool:
  """Whether a chunk's mean cross-entropy ``loss`` shows divergence.

  Args:
    loss: the chunk's mean training loss.
    first: the phase's first chunk's mean loss (``None`` for that chunk).
    num_classes: the outputs ``C``; ``ln C`` is the loss at chance.

  Returns:
    ``loss > BLOWUP ln C``, or ``loss > BLOWUP first`` and ``loss > 10 ln
    C``.
  """
  chance = np.log(max(num_classes, 2))
  if loss > BLOWUP * chance:
    return True
  return first is not None and loss > BLOWUP * first and loss > 10 * chance


@dataclasses.dataclass
class RunOutput:
  """What :func:`run` returns.

  Attributes:
    results: one :class:`results.MethodResult` per member.
    params: the final parameters (stacked over members when batched).
  """

  results: list[results_lib.MethodResult]
  params: Any


def steps_per_task(config: config_lib.Config, n: int) -> int:
  """Optimiser steps for a task of ``n`` training examples."""
  if config.iterations is not None:
    return config.iterations
  return config.epochs * (n // config.batch_size)


def steps_per_run(config: config_lib.Config, stream: stream_lib.Stream
                  ) -> int:
  """Optimiser steps of one run (or vmapped group) of any method: the sum
  over tasks (``joint`` trains as many steps on their union)."""
  return sum(steps_per_task(config, s.n) for s in stream.train)


def segments(total: int, per_epoch: int, every: Optional[int],
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


class _Run:
  """One run (or group of members) through its phases; see :func:`run`."""

  def __init__(self, config, stream, method, points, batched, progress,
               on_chunk, monitor=None, job=None):
    self.config, self.stream, self.method = config, stream, method
    self.points, self.progress, self.on_chunk = points, progress, on_chunk
    self.monitor, self.job = monitor, job
    self.ops = ops_lib.Ops(batched, method)
    self.timer = timing_lib.PhaseTimer()
    self.start_time = time.perf_counter()
    self.graphdef, self.tx, self.state = ops_lib.init_state(
        config, method, stream_lib.num_outputs(stream.tasks), points,
        batched)
    self.key = self.ops.keys(points)
    self.num_classes = stream_lib.num_outputs(stream.tasks)
    lam, seed = points[0]
    self.label = (f"{method.name} x{len(points)} (vmap)" if batched else
                  f"{method.name}" + (f" lam={lam:g}" if method.lam_field
                                      else "") + f" seed={seed}")
    if method.joint:  # a phase is one training run on one split
      self.splits = [stream_lib.union(stream)]
      self.totals = [sum(steps_per_task(config, s.n) for s in stream.train)]
    else:
      self.splits = list(stream.train)
      self.totals = [steps_per_task(config, s.n) for s in self.splits]
    self.first_step = np.cumsum([0] + self.totals)  # of each phase, overall
    self.ckpt, self.record, self.base_time = None, None, 0.0

  def desc(self, t: int) -> str:
    if self.method.joint:
      return f"{self.label} all tasks"
    num = self.stream.num_tasks
    return f"{self.label} task {min(t, num - 1) + 1}/{num}"

  def evaluate(self, splits) -> np.ndarray:
    with self.timer.phase("eval"):
      return self.ops.evaluate(self.graphdef, self.config.eval_batch_size,
                               self.state.params, splits, self.stream.masks)

  def start(self) -> None:
    """Restores the latest checkpoint, or evaluates the initial model."""
    restored = None
    if self.ckpt is not None:
      restored = self.ckpt.restore(self.state, self.key)
    if restored is not None:
      self.state, self.key, self.record = restored
      self.timer.add(self.record.timing)
      self.base_time = self.record.time_s
      logger.info("%s: resuming from its checkpoint at task %d, step %d",
                  self.label, self.record.task + 1, self.record.step)
      if self.job is not None:  # the phases before the restored one
        self.job.skip(int(self.first_step[self.record.task]))
      if self.monitor is not None:
        self.monitor.start(int(self.first_step[self.record.task])
                           + self.record.step)
      return
    if self.monitor is not None:
      self.monitor.start(0)
    num, k = self.stream.num_tasks, len(self.points)
    self.record = checkpointing.Record(
        R=np.zeros([k, num, num]), R_val=np.zeros([k, num, num]),
        b=self.evaluate(self.stream.test), b_val=self.evaluate(self.stream.val),
        train_loss=[[] for _ in self.points],
        task_loss=[[] for _ in self.points])

  def checkpoint(self, task: int, step: int, task_loss) -> None:
    """Moves the record to (task, step) and saves it with the state."""
    record = self.record
    record.task, record.step = task, step
    record.task_loss = [list(x) for x in task_loss]
    record.time_s = self.elapsed()
    if self.ckpt is not None:
      if self.monitor is not None:  # what the checkpoint passed, on disk
        self.monitor.flush()
      with self.timer.phase("checkpoint"):
        record.timing = self.timer.rounded()
        self.ckpt.save(self.state, self.key, record)

  def elapsed(self) -> float:
    """Wall time of the run, time before a restart included."""
    return self.base_time + time.perf_counter() - self.start_time

  def check(self, pending, losses, t: int, keep: int = 0) -> None:
    """Reads back all but the last ``keep`` chunk losses, checking them.

    Raises:
      TrainingDiverged: a chunk's mean loss is nan or inf.
    """
    while len(pending) > keep:
      a, b, loss = pending.pop(0)
      loss = np.asarray(jax.device_get(loss), np.float64).reshape(-1)
      bad = np.flatnonzero(~np.isfinite(loss))
      if bad.size:
        where = (f"within steps {a + 1}-{b} of {self.totals[t]} (checked once "
                 "per chunk)")
        what = (f"the training loss became {loss[0]}" if not self.ops.batched
                else "the training loss of member(s) (lam, seed) "
                f"{[self.points[k] for k in bad]} became nan or inf")
        raise TrainingDiverged(
            f"{self.desc(t)}: {what} {where}; training stopped. Lower the "
            "learning rate or lambda, or check the data.")
      blown = [k for k, value in enumerate(loss) if blew_up(
          value, losses[k][0] if losses[k] else None, self.num_classes)]
      if blown:
        k = blown[0]
        who = "" if not self.ops.batched else (
            f" of member(s) (lam, seed) {[self.points[i] for i in blown]}")
        start = (f"{losses[k][0]:.3g} at the task's start, "
                 if losses[k] else "")
        raise TrainingDiverged(
            f"{self.desc(t)}: the training loss{who} diverged to "
            f"{loss[k]:.3g} ({start}{np.log(self.num_classes):.3g} at "
            f"chance) within steps {a + 1}-{b} of {self.totals[t]}; training "
            "stopped before it overflows. Lower the learning rate or lambda.")
      for k, value in enumerate(loss):
        losses[k].append(float(value))
      if self.monitor is not None:
        self.monitor.loss(int(self.first_step[t]) + b, loss)

  def train_phase(self, t: int, start: int, losses) -> list[list[float]]:
    """Trains phase ``t`` from step ``start``; returns its chunk losses."""
    config, split = self.config, self.splits[t]
    per_epoch = split.n // config.batch_size
    if per_epoch < 1:
      raise DataError(
          f"{self.desc(t)}: {split.n} training examples is fewer than "
          f"batch_size {config.batch_size}.")
    every = config.checkpoint_every if self.ckpt is not None else None
    task_key = self.ops.fold_in(self.key, t)
    losses = [list(x) for x in losses]
    pending = []
    with self.bar(t, start) as bar:
      for a, b in segments(self.totals[t], per_epoch, every, start):
        with self.timer.phase("train"):
          epoch, offset = divmod(a, per_epoch)
          self.state, loss = self.ops.train_chunk(
              self.graphdef, self.tx, config.batch_size,
              split.x.shape[0] // config.batch_size, config.dropout > 0,
              self.state, split, jnp.asarray(b - a, jnp.int32),
              self.stream.masks, self.ops.fold_in(task_key, epoch),
              jnp.asarray(offset, jnp.int32))
          pending.append((a, b, loss))
          self.check(pending, losses, t, keep=1)  # overlaps the next chunk
        bar.update(b - a)
        if every is not None and b < self.totals[t] and b % every == 0:
          self.check(pending, losses, t)
          self.checkpoint(t, b, losses)
        if self.on_chunk is not None:
          self.on_chunk(b - a)
      with self.timer.phase("train"):
        self.check(pending, losses, t)
        jax.block_until_ready(self.state)
    return losses

  def bar(self, t: int, start: int) -> Any:
    """Phase ``t``'s progress bar: beneath the job's bar when there is one
    (:class:`experiments.common.progress.Job`), else on its own."""
    if self.job is not None:
      return self.job.phase(self.totals[t], start, self.desc(t))
    return contextlib.closing(tqdm.tqdm(
        total=self.totals[t], initial=start, desc=self.desc(t), unit="step",
        leave=False, disable=None if self.progress else True))

  def finish_phase(self, t: int) -> None:
    """Evaluates after phase ``t`` and folds the finished task in."""
    accs = (self.evaluate(self.stream.test), self.evaluate(self.stream.val))
    for matrix, acc in zip((self.record.R, self.record.R_val), accs,
                           strict=True):
      if self.method.joint:
        matrix[:] = acc[:, None, :]
      else:
        matrix[:, t] = acc
    last = t == self.stream.num_tasks - 1
    before = self.state
    fold = not (self.method.importance is None or self.method.joint or last)
    if fold:
      with self.timer.phase("fisher"):
        key = self.ops.fold_in(self.ops.fold_in(self.key, t), 1)
        self.state = jax.block_until_ready(ops_lib.consolidate(
            self.method, self.config, self.graphdef, self.state,
            self.stream.tasks[t], key, batched=self.ops.batched))
    if self.monitor is not None:
      self.monitor.task_end(t, self.record.R[:, t], self.record.R_val[:, t],
                            before, self.state if fold else None,
                            int(self.first_step[t + 1]))

  def train(self) -> None:
    """Every phase from where the record stands."""
    first_task, first_step = self.record.task, self.record.step
    for t in range(first_task, len(self.splits)):
      start = first_step if t == first_task else 0
      losses = self.train_phase(
          t, start, self.record.task_loss if start else
          [[] for _ in self.points])
      self.finish_phase(t)
      for k, member_losses in enumerate(losses):
        self.record.train_loss[k].append(member_losses)
      # After the last phase a checkpoint only matters if it is kept: a
      # crash before the results are written repeats the last task.
      if t + 1 < len(self.splits) or self.config.keep_checkpoints:
        self.checkpoint(t + 1, 0, [[] for _ in self.points])

  def output(self) -> RunOutput:
    """The members' results (time and phase seconds shared out)."""
    k, rec = len(self.points), self.record
    timing = {n: v / k for n, v in self.timer.finish(self.elapsed()).items()}
    results = [results_lib.MethodResult(
        method=self.method.name, seed=seed, lam=lam, R=rec.R[i],
        R_val=rec.R_val[i], b=rec.b[i], b_val=rec.b_val[i],
        time_s=self.elapsed() / k, train_loss=rec.train_loss[i],
        timing=timing) for i, (lam, seed) in enumerate(self.points)]
    return RunOutput(results=results, params=self.state.params)


def run(config: config_lib.Config, stream: stream_lib.Stream, method: str,
        points: Sequence[tuple[float, int]], *, batched: bool = False,
        data_seed: Optional[int] = None, checkpoint_dir: Any = None,
        progress: Optional[bool] = None,
        on_chunk: Optional[ChunkHook] = None,
        monitor: Any = None, job: Any = None) -> RunOutput:
  """Trains ``method`` through the task sequence, evaluating every task.

  Args:
    config: the experiment configuration.
    stream: the tasks on device (:func:`stream.make_stream`), shared.
    method: a name from :data:`methods.REGISTRY`.
    points: ``(lam, seed)`` of each member; exactly one unless ``batched``.
      ``lam`` is the swept strength (SI: ``c``), ignored by methods without
      one; ``seed`` seeds the initialisation, batch order, dropout and the
      Fisher's sampling.
    batched: train the members as ONE vmapped program.
    data_seed: the task stream's seed, recorded in checkpoints (default:
      the first member's seed).
    checkpoint_dir: checkpoint after every task and every
      ``config.checkpoint_every`` steps (if set) there, and continue from the
      latest
      checkpoint found (mid-task included); ``None``: no checkpoints.
    progress: show progress bars (default ``config.progress``).
    on_chunk: called with the number of steps after every chunk.
    monitor: live metrics (a :class:`monitor.Monitor`): started, then
      given every chunk's losses and every task's accuracies.
    job: the overall progress bar of a job of several runs
      (:class:`experiments.common.progress.Job`): each task's bar is shown
      beneath it and advances it.

  Returns:
    The :class:`RunOutput`; ``time_s`` and ``timing`` include the time
    before a restart and are shared out evenly over batched members.

  Raises:
    TrainingDiverged: the training loss became nan or inf.
    ValueError: an unknown method, or several points without ``batched``.
    checkpointing.CheckpointError: a checkpoint of another run or config in
      ``checkpoint_dir``, or none left undamaged.

  Every matmul runs at ``config.matmul_precision``.
  """
  spec = methods_lib.get(method)
  points = [(float(lam), int(seed)) for lam, seed in points]
  if not points or (len(points) > 1 and not batched):
    raise ValueError(
        f"points must hold one (lam, seed) (several with batched=True); got "
        f"{points}.")
  progress = config.progress if progress is None else progress
  with matmul_precision(config):
    runner = _Run(config, stream, spec, points, batched, progress, on_chunk,
                  monitor, job)
    if checkpoint_dir is not None:
      runner.ckpt = checkpointing.RunCheckpointer(
          checkpoint_dir, config, method, points,
          points[0][1] if data_seed is None else data_seed, runner.totals,
          runner.desc)
    try:
      runner.start()
      runner.train()
    except BaseException:
      # Ctrl-C or an error: finish pending writes quietly; the error that
      # stopped the run is the one to report.
      if runner.ckpt is not None:
        with contextlib.suppress(Exception):
          runner.ckpt.close()
      raise
    if runner.ckpt is not None:
      runner.ckpt.close()
    return runner.output()


def matmul_precision(config: config_lib.Config) -> Any:
  """``jax.default_matmul_precision`` of ``config.matmul_precision`` (a
  no-op for ``default``); see docs/scaling.md for why it matters on GPUs."""
  if config.matmul_precision == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(config.matmul_precision)


def run_method(config: config_lib.Config, stream: stream_lib.Stream,
               method: str, seed: int, lam: float = 0.0,
               **kwargs) -> results_lib.MethodResult:
  """One run of ``method`` (:func:`run` with one point); its result."""
  return run(config, stream, method, [(lam, seed)], **kwargs).results[0]


def run_sweep(config: config_lib.Config, stream: stream_lib.Stream,
              method: str, lams: Sequence[float], seeds: Sequence[int],
              **kwargs) -> RunOutput:
  """Every ``(lam, seed)`` (seed-major) as ONE vmapped program.

  Member ``k`` equals ``run_method(config, stream, method, seed, lam)`` to
  float32 rounding (tested). Memory: K copies of the parameters and
  optimiser state and K mini-batches per step; the data is shared.
  """
  if not len(lams) or not len(seeds):
    raise ValueError(
        f"a sweep needs at least one lam and one seed; got lams={list(lams)}, "
        f"seeds={list(seeds)}.")
  points = [(float(lam), int(seed)) for seed in seeds for lam in lams]
  return run(config, stream, method, points, batched=True, **kwargs)
