r"""Lambda and seed sweeps trained as ONE compiled program with ``jax.vmap``.

A sweep's members (one per ``(lam, seed)``) differ only in values: the
initial parameters, the PRNG keys, and the EWC strength ``lam``, which lives
in the optimiser state (``optax.inject_hyperparams(ewc_jax.ewc)``, see
:func:`experiments.train.make_optimizer`). So the members' training states
and keys are stacked along a leading axis and :func:`train.train_chunk` is
``jax.vmap``-ped over them: vmapping over the stacked optimiser state vmaps
over ``lam``. The data (the task stream, permuted by the run's data seed) is
shared: every member draws its mini-batches from the one copy on device.

Every member reproduces :func:`experiments.train.run_method` for its
``(lam, seed)`` to float32 rounding, by construction: the same model
initialisation (``models.make_model(seed=seed)``), the same key derivation
(``key(seed)`` -> ``fold_in(key, task)`` -> ``fold_in(task_key, epoch)``,
and ``fold_in(task_key, 1)`` for the Fisher), the same jitted chunk
(vmapped), the same Fisher and the same ``ewc_jax.consolidate`` (vmapped).
Batched matrix products round differently from single ones, and training
amplifies that over thousands of Adam steps as it amplifies a one-ulp change
of the initial parameters (numbers in docs/scaling.md): short runs give
equal accuracies, long ones agree as two such runs do.

The Fisher of each member. When every member sees the same Fisher data (no
``fisher_examples`` budget smaller than the task), ``ewc_jax.fisher_diagonal``
is itself vmapped over the stacked parameters and keys: its Python loop runs
over chunks of the shared data, which are not batched, so one pass over the
data serves all members. Otherwise (a budget: each member draws its own
subset from its own key) the members' Fishers are computed one after the
other with :func:`experiments.train.task_curvature`, exactly as the separate
runs do. ``ewc_jax.consolidate`` is vmapped too: called directly on a stacked
state it would sum the separate-mode residual over the members and, in
online mode, broadcast the stacked ``gamma`` against the parameters' last
axis (see :func:`consolidate_members`).

Examples:
  python -m experiments.sweep --bench              # K = 8 vmapped vs 8 runs
  python -m experiments.sweep --bench --out runs/sweep_bench.json

From Python::

  results = sweep.run_sweep(config, stream, "ewc", lams=(1, 10, 100, 1000),
                            seeds=(0,))
"""

import argparse
import dataclasses
import functools
import json
import pathlib
import platform
import shutil
import sys
import time
import warnings
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import ewc_jax
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import metrics as metrics_lib
from experiments import models
from experiments import tasks as tasks_lib
from experiments import train


# ----------------------------------------------------------------------------
# Stacking members.


def members(lams: Sequence[float],
            seeds: Sequence[int]) -> list[tuple[float, int]]:
  """The ``(lam, seed)`` of every member, seed-major (as ``run_experiment``).

  Args:
    lams: the strengths.
    seeds: the seeds.

  Returns:
    ``[(lam, seed) for seed in seeds for lam in lams]``.

  Raises:
    ValueError: ``lams`` or ``seeds`` is empty.
  """
  if not len(lams) or not len(seeds):
    raise ValueError(
        f"a sweep needs at least one lam and one seed; got lams={list(lams)}, "
        f"seeds={list(seeds)}.")
  return [(float(lam), int(seed)) for seed in seeds for lam in lams]


def stack(trees: Sequence[Any]) -> Any:
  """Stacks pytrees of the same structure along a new leading axis."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def member(tree: Any, k: int) -> Any:
  """Member ``k`` of a stacked pytree."""
  return jax.tree.map(lambda x: x[k], tree)


def _fold_in(keys: jax.Array, data: int) -> jax.Array:
  """``jax.random.fold_in`` of every member's key (bitwise the same)."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


# ----------------------------------------------------------------------------
# The vmapped jitted pieces.


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4),
                   donate_argnums=(5,))
def train_chunks(graphdef, tx, batch_size: int, max_steps: int, dropout: bool,
                 state: train.State, split: train.DeviceSplit,
                 num_steps: jax.Array, masks: jax.Array, keys: jax.Array):
  """:func:`experiments.train.train_chunk` for every member at once.

  Args:
    graphdef: the model's graph definition (static).
    tx: the optimiser (static), shared by the members.
    batch_size: examples per step (static).
    max_steps: the scan length (static).
    dropout: whether the model uses dropout (static).
    state: the members' training states, stacked (donated).
    split: the training data, shared (not batched).
    num_steps: steps to run, shared (so ``lax.cond`` stays a branch).
    masks: ``[T, C]`` active logits per task, shared.
    keys: ``[K]`` PRNG keys, one per member.

  Returns:
    ``(state, mean_loss)``: the stacked new states and ``[K]`` losses.
  """
  chunk = functools.partial(train.train_chunk, graphdef, tx, batch_size,
                            max_steps, dropout)
  return jax.vmap(chunk, in_axes=(0, None, None, None, 0))(
      state, split, num_steps, masks, keys)


@functools.partial(jax.jit, static_argnums=(0, 1))
def accuracies(graphdef, batch_size: int, params, split: train.DeviceSplit,
               class_mask: jax.Array) -> jax.Array:
  """:func:`experiments.train.accuracy` of every member: float32 ``[K]``.

  ``split.n`` must be ``[K]`` (the same count repeated, see
  :func:`evaluate`): the division ``hits / n`` is then elementwise. With a
  scalar ``n`` it would divide a ``[K]`` vector by a broadcast scalar, which
  XLA rewrites as a multiplication by ``1 / n``, one float32 rounding away
  from the separate runs' ``hits / n`` (0.11499999 for 23/200).
  """
  one = functools.partial(train.accuracy, graphdef, batch_size)
  split_axes = dataclasses.replace(split, x=None, y=None, tid=None, n=0)
  return jax.vmap(one, in_axes=(0, split_axes, None))(params, split,
                                                      class_mask)


def evaluate(graphdef, batch_size: int, params, splits,
             masks) -> np.ndarray:
  """Every member's accuracy on every split: float64 ``[K, T]``."""
  num = jax.tree.leaves(params)[0].shape[0]
  accs = [accuracies(graphdef, batch_size, params,
                     dataclasses.replace(s, n=np.full([num], s.n, np.int32)),
                     masks[t])
          for t, s in enumerate(splits)]
  return np.asarray(jax.device_get(accs), np.float64).T


@jax.jit
def consolidate_members(opt_state, params, curvature):
  """``ewc_jax.consolidate`` vmapped over stacked members.

  ``consolidate`` cannot take a stacked state directly: in separate mode the
  residual ``sum A F / (A + F) (c - p)^2`` would be summed over the member
  axis too (every member would get the sum of all members' residuals; the
  pull itself, curvature and centre, is elementwise and stays right); in
  online mode ``gamma`` (``[K]`` in a stacked state) would broadcast against
  each parameter's LAST axis (an error, or silently wrong when that axis has
  length ``K``) and the residual would lose its member axis. Under
  ``jax.vmap`` each member is folded alone. Its value checks (finite,
  non-negative) need concrete values and are skipped under the trace; the
  Fisher is checked where it is computed (``ewc_jax.fisher_diagonal``).

  Args:
    opt_state: the members' optimiser states, stacked.
    params: their parameters at the end of the task, stacked.
    curvature: their Fishers (or L2 ones, SI importances), stacked.

  Returns:
    The stacked optimiser states with the task folded in.
  """
  return jax.vmap(ewc_jax.consolidate)(opt_state, params, curvature)


# ----------------------------------------------------------------------------
# One method, many members.


def init_members(config: config_lib.Config, method: str, num_classes: int,
                 points: Sequence[tuple[float, int]]):
  """The stacked initial states of the members, as ``run_method`` builds them.

  Args:
    config: the experiment configuration.
    method: a name from ``config.METHODS``.
    num_classes: the output layer's size.
    points: ``(lam, seed)`` of each member.

  Returns:
    ``(graphdef, tx, state)``: the state stacked over the members.
  """
  mode = train.pull_settings(method, 0.0, config)[1]
  tx = train.make_optimizer(train.base_optimizer(config), mode)
  graphdef, states = None, []
  for lam, seed in points:
    model = models.make_model(
        config.model, num_classes, seed=seed, hidden=config.hidden,
        dropout=config.dropout, channels=config.channels,
        cnn_hidden=config.cnn_hidden)
    graphdef, params = models.split_model(model)
    pull_lam, _, gamma = train.pull_settings(method, lam, config)
    state = train.State(params=params, opt_state=train.init_opt_state(
        tx, params, pull_lam, gamma))
    if method == "si":
      state = dataclasses.replace(
          state, omega=jax.tree.map(jnp.zeros_like, params), start=params)
    states.append(state)
  return graphdef, tx, train.unalias(stack(states))


def _train_members(config, graphdef, tx, state, split, masks, total_steps,
                   keys, points, desc, progress):
  """``total_steps`` steps of every member on ``split``, one scan per epoch.

  Chunk ``i`` (epoch ``i``) uses the keys ``fold_in(keys, i)``, as
  ``train.run_method`` without checkpoints does.

  Returns:
    ``(state, losses)``: losses ``[K, chunks]``, each chunk's mean loss.

  Raises:
    train.TrainingDiverged: a member's loss became nan or inf.
  """
  per_chunk = split.n // config.batch_size  # one epoch
  if per_chunk < 1:
    raise train.DataError(
        f"{desc}: {split.n} training examples is fewer than batch_size "
        f"{config.batch_size}.")
  max_steps = split.x.shape[0] // config.batch_size
  losses = []
  bar = tqdm.tqdm(total=total_steps, desc=desc, unit="step", leave=False,
                  disable=not progress, file=sys.stderr)
  for i, start in enumerate(range(0, total_steps, per_chunk)):
    steps = min(per_chunk, total_steps - start)
    state, loss = train_chunks(
        graphdef, tx, config.batch_size, max_steps, config.dropout > 0,
        state, split, jnp.asarray(steps, jnp.int32), masks,
        _fold_in(keys, i))
    losses.append(np.asarray(jax.device_get(loss), np.float64))
    bad = [points[k] for k in np.flatnonzero(~np.isfinite(losses[-1]))]
    if bad:
      bar.close()
      raise train.TrainingDiverged(
          f"{desc}: the training loss of member(s) (lam, seed) {bad} became "
          f"nan or inf within steps {start + 1}-{start + steps} of "
          f"{total_steps}; the sweep stopped. Lower the learning rate or "
          "lambda, or check the data.")
    bar.update(steps)
    bar.set_postfix(loss=f"{losses[-1].mean():.4f}")
  bar.close()
  return state, np.stack(losses, axis=1)


def shares_fisher_data(config: config_lib.Config,
                       task: tasks_lib.Task) -> bool:
  """Whether every member's Fisher reads the same examples of ``task``.

  ``train.task_curvature`` draws a subset of ``config.fisher_examples``
  examples from the member's own key; without a budget (or with one that
  covers the task) the subset is the whole task, the same for all.
  """
  limit = config.fisher_examples
  return limit is None or len(task.train_y) <= limit


def member_curvature(method: str, config: config_lib.Config, graphdef,
                     state: train.State, task: tasks_lib.Task,
                     keys: jax.Array):
  """:func:`experiments.train.task_curvature` of every member, stacked.

  L2 and SI are elementwise and take the stacked state. The Fisher is
  ``ewc_jax.fisher_diagonal`` vmapped over the members' parameters and keys
  when they share the Fisher data (one pass over the data for all), else one
  ``train.task_curvature`` call per member.

  Args:
    method: ``l2``, ``ewc``, ``online_ewc`` or ``si``.
    config: the experiment configuration.
    graphdef: the model's graph definition.
    state: the stacked training states at the end of the task.
    task: the finished task.
    keys: ``[K]`` the members' Fisher keys.

  Returns:
    A stacked non-negative tree shaped like the stacked parameters.
  """
  if method in ("l2", "si"):
    return train.task_curvature(method, config, graphdef, state, task, None)
  if not shares_fisher_data(config, task):
    return stack([
        train.task_curvature(method, config, graphdef, member(state, k), task,
                             keys[k]) for k in range(len(keys))])
  apply_fn = models.eval_apply_fn(graphdef, tuple(task.classes),
                                  task.num_classes)
  data = (task.train_x, task.train_y)

  def fisher(params, key):
    return ewc_jax.fisher_diagonal(
        apply_fn, params, data, estimator=config.fisher, rng=key,
        batch_size=config.fisher_batch_size)

  with warnings.catch_warnings():
    # The first chunk's accumulator is unbatched (zeros), the result
    # batched: its donation cannot be used, which is harmless.
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    return jax.vmap(fisher)(state.params, keys)


def run_sweep_with_params(
    config: config_lib.Config, stream: train.Stream, method: str,
    lams: Sequence[float], seeds: Sequence[int], *,
    progress: Optional[bool] = None,
) -> tuple[list[train.MethodResult], list[Any]]:
  """:func:`run_sweep`, also returning each member's final parameters.

  Returns:
    ``(results, params)``: both in member order.
  """
  if method not in config_lib.METHODS:
    raise ValueError(
        f"unknown method {method!r}; valid: {config_lib.METHODS}.")
  progress = config.progress if progress is None else progress
  start_time = time.perf_counter()
  points = members(lams, seeds)
  num_tasks = stream.num_tasks
  graphdef, tx, state = init_members(
      config, method, train.num_outputs(stream.tasks), points)
  keys = jnp.stack([jax.random.key(seed) for _, seed in points])
  ev = functools.partial(evaluate, graphdef, config.eval_batch_size)
  b = ev(state.params, stream.test, stream.masks)
  b_val = ev(state.params, stream.val, stream.masks)
  num = len(points)
  R = np.zeros([num, num_tasks, num_tasks])
  R_val = np.zeros([num, num_tasks, num_tasks])
  train_loss = [[] for _ in points]
  label = f"{method} x{num} (vmap)"

  if method == "joint":
    split = train.union(stream)
    total = sum(train.steps_per_task(config, t.n) for t in stream.train)
    state, losses = _train_members(
        config, graphdef, tx, state, split, stream.masks, total,
        _fold_in(keys, 0), points, f"{label} all tasks", progress)
    R[:] = ev(state.params, stream.test, stream.masks)[:, None]
    R_val[:] = ev(state.params, stream.val, stream.masks)[:, None]
    for k in range(num):
      train_loss[k].append(losses[k].tolist())
  else:
    for t, split in enumerate(stream.train):
      task_keys = _fold_in(keys, t)
      state, losses = _train_members(
          config, graphdef, tx, state, split, stream.masks,
          train.steps_per_task(config, split.n), task_keys, points,
          f"{label} task {t + 1}/{num_tasks}", progress)
      for k in range(num):
        train_loss[k].append(losses[k].tolist())
      R[:, t] = ev(state.params, stream.test, stream.masks)
      R_val[:, t] = ev(state.params, stream.val, stream.masks)
      if method != "finetune" and t < num_tasks - 1:
        state = _consolidate(method, config, graphdef, state,
                             stream.tasks[t], _fold_in(task_keys, 1))
  time_s = (time.perf_counter() - start_time) / num
  results = [
      train.MethodResult(method=method, seed=seed, lam=lam, R=R[k],
                         R_val=R_val[k], b=b[k], b_val=b_val[k],
                         time_s=time_s, train_loss=train_loss[k])
      for k, (lam, seed) in enumerate(points)]
  return results, [member(state.params, k) for k in range(num)]


def run_sweep(config: config_lib.Config, stream: train.Stream, method: str,
              lams: Sequence[float], seeds: Sequence[int], *,
              progress: Optional[bool] = None) -> list[train.MethodResult]:
  """Trains one method for every ``(lam, seed)`` in ONE vmapped program.

  Member ``k`` equals ``train.run_method(config, stream, method, seed,
  lam)`` to float32 rounding (tested). Memory: ``K`` copies of the
  parameters and optimiser state and ``K`` mini-batches per step; the data
  is shared.

  Args:
    config: the experiment configuration.
    stream: the tasks on device (:func:`experiments.train.make_stream`),
      shared by every member.
    method: a name from ``experiments.config.METHODS``.
    lams: the strengths (SI: ``c``); ignored by finetune and joint, but
      recorded in the results.
    seeds: model initialisation, batch order, dropout and Fisher sampling of
      each member (not the task stream: it is ``stream``).
    progress: show progress bars (default ``config.progress``).

  Returns:
    One :class:`experiments.train.MethodResult` per member, seed-major
    (``[(lam, seed) for seed in seeds for lam in lams]``); ``time_s`` is the
    sweep's wall time divided by the number of members.
  """
  return run_sweep_with_params(config, stream, method, lams, seeds,
                               progress=progress)[0]


def _consolidate(method, config, graphdef, state, task, keys) -> train.State:
  """Folds the finished task into every member's EWC state."""
  curvature = member_curvature(method, config, graphdef, state, task, keys)
  state = dataclasses.replace(state, opt_state=consolidate_members(
      state.opt_state, state.params, curvature))
  if method == "si":
    state = dataclasses.replace(
        state, omega=jax.tree.map(jnp.zeros_like, state.omega),
        start=state.params)
  return train.unalias(state)


# ----------------------------------------------------------------------------
# The experiment, vmapped.


def run_experiment(config: config_lib.Config, workdir: Any, *,
                   overwrite: bool = False,
                   dataset: Optional[data_lib.Dataset] = None,
                   data_seed: Optional[int] = None,
                   log=print) -> dict[str, Any]:
  """:func:`experiments.train.run_experiment` with each sweep vmapped.

  Args:
    config: the configuration.
    workdir: the run directory (created; must be empty unless
      ``overwrite``).
    overwrite: allow a non-empty run directory.
    dataset: use this dataset instead of loading ``config.dataset``.
    data_seed: ``None``: one task stream per seed, as
      ``train.run_experiment`` (same results); each method's lambdas of one
      seed form one program. An int: one stream built from this seed,
      shared by every seed; each method's lambdas x seeds form one program
      (the seeds then vary the model, not the tasks).
    log: called with progress lines and the final table.

  Returns:
    The summary (as in ``summary.json``) plus ``"results"`` and
    ``"workdir"``.

  Raises:
    train.DataError: the data cannot be trained on (before any training).
    train.TrainingDiverged: a member's loss became nan or inf; the finished
      groups' results are in ``runs.json``. Vmapped runs are not
      checkpointed, so there is nothing to resume within a group.
  """
  config = config_lib.validate(config)
  workdir = train.prepare_workdir(workdir, overwrite)
  # Checkpoints of an overwritten run must not outlive it (none are made).
  shutil.rmtree(workdir / train.CHECKPOINTS, ignore_errors=True)
  if dataset is None:
    dataset = data_lib.load_dataset(config.dataset, config.data_dir)
  info = train.dataset_info(dataset)
  train.write_json(workdir / "config.json",
                   {"config": config.to_json(), "dataset": info,
                    "vmap": {"data_seed": data_seed}})
  groups = ([(seed, (seed,)) for seed in config.seeds] if data_seed is None
            else [(data_seed, tuple(config.seeds))])
  results = []
  for stream_seed, seeds in groups:
    tasks = tasks_lib.make_tasks(config.tasks, dataset, config.num_tasks,
                                 stream_seed, val_fraction=config.val_fraction)
    stream = train.make_stream(tasks, eval_batch_size=config.eval_batch_size,
                               train_examples=config.train_examples)
    train.check_stream(stream, config)
    for method in config.methods:
      group = run_sweep(config, stream, method, config.lams(method), seeds)
      results += group
      for r in group:
        m = r.metrics()
        log(f"{method:>10} lam={r.lam:<8g} seed={r.seed}  ACC "
            f"{m['acc']:.4f}  BWT {m['bwt']:+.4f}  val ACC "
            f"{m['val_acc']:.4f}  ({r.time_s:.1f} s, vmap x{len(group)})")
      train.write_results(workdir, config, info, results, final=False)
  summary = train.write_results(workdir, config, info, results, final=True)
  log(train.format_table(summary["methods"]))
  return {**summary, "results": results, "workdir": workdir}


# ----------------------------------------------------------------------------
# Benchmark: K vmapped members against K separate runs.

BENCH_LAMS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)


def bench_config(smoke: bool = False) -> config_lib.Config:
  """The benchmark's configuration: the quick preset on embedded MNIST.

  ``smoke``: 3 tasks, one epoch, a 32-unit MLP on 300 synthetic examples
  per task (seconds; for tests).
  """
  config = config_lib.get_config("quick").replace(
      dataset="embedded", methods=("ewc",), seeds=(0,), progress=False)
  if smoke:
    config = config.replace(dataset="synthetic", num_tasks=3, epochs=1,
                            hidden=(32,), train_examples=300,
                            eval_batch_size=100)
  return config


def bench(config: config_lib.Config, method: str = "ewc",
          lams: Sequence[float] = BENCH_LAMS, repeats: int = 1, *,
          dataset: Optional[data_lib.Dataset] = None,
          log=print) -> dict[str, Any]:
  """Times ``len(lams)`` members vmapped against as many separate runs.

  Both run in this process on the same stream. The first round of each
  includes compilation (each side compiles its own programs once); later
  rounds (``repeats - 1``) are warm. Rounds alternate sequential and vmapped
  so that load from other processes falls on both.

  Args:
    config: the configuration (one seed: ``config.seeds[0]``).
    method: the method to sweep.
    lams: one member per value.
    repeats: rounds of each.
    dataset: use this dataset instead of loading ``config.dataset``.
    log: called with one line per round.

  Returns:
    A JSON-ready dict: times, ratios, agreement of the accuracy matrices
    (equal for short runs; over thousands of Adam steps the float32
    rounding differences of the batched matrix products grow, as a one-ulp
    change of the initial parameters does, see docs/scaling.md), machine
    and versions.
  """
  if dataset is None:
    dataset = data_lib.load_dataset(config.dataset, config.data_dir)
  seed = config.seeds[0]
  tasks = tasks_lib.make_tasks(config.tasks, dataset, config.num_tasks, seed,
                               val_fraction=config.val_fraction)
  stream = train.make_stream(tasks, eval_batch_size=config.eval_batch_size,
                             train_examples=config.train_examples)
  rounds = []
  for r in range(repeats):
    start = time.perf_counter()
    separate = [train.run_method(config, stream, method, seed, lam,
                                 progress=False) for lam in lams]
    sequential_s = time.perf_counter() - start
    start = time.perf_counter()
    vmapped = run_sweep(config, stream, method, lams, (seed,),
                        progress=False)
    vmap_s = time.perf_counter() - start
    gap = max(float(np.max(np.abs(a.R - b.R)))
              for a, b in zip(separate, vmapped, strict=True))
    acc_gap = max(abs(metrics_lib.acc(a.R) - metrics_lib.acc(b.R))
                  for a, b in zip(separate, vmapped, strict=True))
    rounds.append({"sequential_s": sequential_s, "vmap_s": vmap_s,
                   "speedup": sequential_s / vmap_s,
                   "max_abs_R_difference": gap,
                   "max_abs_acc_difference": acc_gap})
    log(f"round {r + 1}{' (compile included)' if r == 0 else ' (warm)'}: "
        f"{len(lams)} sequential runs {sequential_s:.1f} s, vmapped "
        f"{vmap_s:.1f} s, speedup {sequential_s / vmap_s:.2f}x "
        f"(max |R difference| {gap:.2g}, max |ACC difference| "
        f"{acc_gap:.2g})")
  return {
      "what": f"{len(lams)} {method} members vmapped vs {len(lams)} "
              "train.run_method runs, one process",
      "method": method, "lams": list(lams), "seed": seed,
      "config": config.to_json(), "dataset": dataset.description,
      "rounds": rounds,
      "acc_vmap": [metrics_lib.acc(r.R) for r in vmapped],
      "acc_sequential": [metrics_lib.acc(r.R) for r in separate],
      "machine": {"platform": platform.platform(),
                  "processor": platform.processor(),
                  "devices": [str(d) for d in jax.devices()],
                  "jax": jax.__version__, "python": platform.python_version()},
  }


def main(argv: Optional[Sequence[str]] = None) -> int:
  """``python -m experiments.sweep --bench``: the vmapped-sweep benchmark."""
  p = argparse.ArgumentParser(
      prog="python -m experiments.sweep", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--bench", action="store_true",
                 help="time K vmapped members against K separate runs")
  p.add_argument("--out", default="runs/sweep_bench.json",
                 help="where the benchmark's JSON goes")
  p.add_argument("--repeats", type=int, default=2,
                 help="rounds (the first includes compilation)")
  p.add_argument("--smoke", action="store_true",
                 help="a seconds-long benchmark on synthetic data")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a config field of the benchmark, e.g. "
                 "--set hidden=32 (see experiments/config.py)")
  args = p.parse_args(argv)
  if not args.bench:
    p.error("nothing to do: pass --bench (sweeps run from "
            "experiments.permuted_mnist).")
  if args.repeats < 1:
    p.error(f"--repeats must be >= 1, got {args.repeats}.")
  try:
    config = config_lib.override(bench_config(args.smoke), args.set)
  except ValueError as e:
    p.error(str(e))
  result = bench(config, repeats=args.repeats)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  train.write_atomic(out, json.dumps(result, indent=2) + "\n")
  print(f"speedup {result['rounds'][-1]['speedup']:.2f}x; wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
