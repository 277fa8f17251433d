"""The experiment: every method, lambda and seed; selection; result files.

:func:`train_and_evaluate` is the whole experiment as one importable call:
for each seed the task stream is built once (same data and task order for
every method); each regularised method runs each lambda of its sweep; the
lambda with the best mean validation ACC is reported (test numbers are
never used for the choice).

Never losing a run. Every (method, lambda, seed) run is checkpointed in
``workdir/checkpoints/<method>-lam<lam>-seed<seed>/`` (:mod:`loop`); each
finished run's results are written atomically to ``runs.json`` and its
checkpoint deleted (kept with ``config.keep_checkpoints``). ``resume=True``
reads the finished runs back and continues the interrupted one from its
last checkpoint, ending with the same results as an uninterrupted run.

``vmap=True`` trains each method's lambdas (of one seed, or with
``data_seed`` of every seed on one shared stream) as one vmapped program;
such groups are not checkpointed.
"""

import contextlib
import logging
import pathlib
import shutil
from typing import Any, Optional

import jax

from experiments import data as data_lib
from experiments.common import checkpoint as checkpoint_lib
from experiments.common import files
from experiments.common import progress as progress_lib
from experiments.permuted_mnist import budget
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import loop
from experiments.permuted_mnist import methods as methods_lib
from experiments.permuted_mnist import monitor as monitor_lib
from experiments.permuted_mnist import results as results_lib
from experiments.permuted_mnist import steps
from experiments.permuted_mnist import stream as stream_lib
from experiments.permuted_mnist import tasks as tasks_lib
from experiments.permuted_mnist import workdir as workdir_lib

logger = logging.getLogger(__name__)


def make_stream(config: config_lib.Config, dataset: data_lib.Dataset,
                seed: int) -> stream_lib.Stream:
  """The checked task stream of ``seed`` on the device."""
  pad = {} if config.pad_to is None else {"pad_to": config.pad_to}
  tasks = tasks_lib.make_tasks(config.tasks, dataset, config.num_tasks, seed,
                               val_fraction=config.val_fraction, **pad)
  stream = stream_lib.make_stream(tasks, eval_batch_size=config.eval_batch_size,
                                  train_examples=config.train_examples)
  stream_lib.check_stream(stream, config)
  return stream


def _open(config, workdir, overwrite, resume, dataset, vmap_info):
  """Prepares (or checks) the locked ``workdir``; returns the data's info
  and the finished runs of this config."""
  if resume:
    workdir_lib.check_resume(workdir, config)
  else:  # an overwritten run's files (checkpoints included) move aside
    workdir_lib.prepare_workdir(workdir, overwrite)
  previous = workdir / workdir_lib.PREVIOUS
  if previous.is_dir():
    logger.info("the previous run's files are kept in %s until this run "
                "is complete", previous)
  info = workdir_lib.dataset_info(dataset)
  done = {}
  if resume:
    workdir_lib.check_same_data(workdir, info)
    done = {(r.method, r.lam, r.seed): r
            for r in workdir_lib.load_results(workdir, config, info)}
  header = {"config": config.to_json(), "dataset": info}
  if vmap_info is not None:
    header["vmap"] = vmap_info
  files.write_json(workdir / "config.json", header)
  return info, done


def _before_workdir(config, workdir, overwrite, resume, dataset, vmap,
                    data_seed):
  """Everything that can be refused before the run directory is touched:
  the data (loaded), the memory estimate, the directory itself."""
  if dataset is None:
    dataset = data_lib.load_dataset(config.dataset, config.data_dir)
  members = 1
  if vmap:
    members = max(len(config.lams(m)) for m in config.methods) * (
        1 if data_seed is None else len(config.seeds))
  budget.check_memory(config, dataset, members)
  workdir = pathlib.Path(workdir)
  if resume:
    workdir_lib.saved_config(workdir)  # a run directory, or one line
  else:
    workdir_lib.check_workdir(workdir, overwrite)
    workdir.mkdir(parents=True, exist_ok=True)
  return workdir, dataset


def _log_result(result, source: str) -> None:
  m = result.metrics()
  bwt = "n/a" if m["bwt"] is None else f"{m['bwt']:+.4f}"
  logger.info("%10s lam=%-8g seed=%d  ACC %.4f  BWT %s  val ACC %.4f  (%s)",
              result.method, result.lam, result.seed, m["acc"], bwt,
              m["val_acc"], source)


def _monitor(live, config, method, points, batched=False):
  if live is None:
    return contextlib.nullcontext()
  return contextlib.closing(
      live.open(config, methods_lib.get(method), points, batched=batched))


def _run_one(config, workdir, stream, method, lam, seed, on_chunk, live,
             job):
  """One checkpointed run; a divergence says what was kept."""
  ckpt_dir = (workdir / workdir_lib.CHECKPOINTS
              / checkpoint_lib.run_name(method, lam, seed))
  try:
    with _monitor(live, config, method, [(lam, seed)]) as monitor:
      output = loop.run(config, stream, method, [(lam, seed)],
                        checkpoint_dir=ckpt_dir, on_chunk=on_chunk,
                        monitor=monitor, job=job)
  except loop.TrainingDiverged as e:
    kept = sorted(int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit())
    where = (f"its last good checkpoint (step {kept[-1]}) is kept in "
             f"{ckpt_dir}" if kept else "this run had no checkpoint yet")
    done = (f"Finished runs are in {workdir / 'runs.json'}; "
            if (workdir / "runs.json").is_file() else "No run has finished; ")
    raise loop.TrainingDiverged(f"{e} {done}{where}.") from None
  return output, ckpt_dir


class _JobSize:
  """Sizes the job's bar once the first stream gives a run's steps (the
  same for every run, method and seed: the task sizes depend on the data
  and the config alone); runs read back before that are counted then."""

  def __init__(self, job, runs):
    self.job, self.runs, self.per_run, self.earlier = job, runs, None, 0

  def stream(self, config, stream):
    if self.per_run is None:
      self.per_run = loop.steps_per_run(config, stream)
      self.job.set_total(self.per_run * self.runs)
      self.job.skip(self.per_run * self.earlier)

  def finished_earlier(self):
    if self.per_run is None:
      self.earlier += 1
    else:
      self.job.skip(self.per_run)


def _run_all(config, workdir, dataset, info, done, out, on_chunk, live, job):
  """Runs (or reads back) every (seed, method, lam) run, in order."""
  runs = [(seed, method, lam) for seed in config.seeds
          for method in config.methods for lam in config.lams(method)]
  size, streams = _JobSize(job, len(runs)), {}
  for number, (seed, method, lam) in enumerate(runs, 1):
    job.set_description(f"run {number}/{len(runs)}")
    result = done.get((method, float(lam), seed))
    ckpt_dir = None
    if result is None:
      if seed not in streams:  # only for seeds with runs left to do
        streams = {seed: make_stream(config, dataset, seed)}  # one at a time
      stream = streams[seed]
      size.stream(config, stream)
      output, ckpt_dir = _run_one(config, workdir, stream, method, lam,
                                  seed, on_chunk, live, job)
      result = output.results[0]
      out["params"][(method, float(lam), seed)] = output.params
      source = f"{result.time_s:.1f} s"
    else:
      source = "finished earlier, read from runs.json"
      size.finished_earlier()
    out["results"].append(result)
    _log_result(result, source)
    results_lib.write_results(workdir, config, info, out["results"],
                              final=False)
    if ckpt_dir is not None and not config.keep_checkpoints:
      shutil.rmtree(ckpt_dir, ignore_errors=True)


def _run_groups(config, workdir, dataset, info, data_seed, out, live, job):
  """Each method's sweep (of one seed, or of all on one stream) vmapped."""
  groups = ([(seed, (seed,)) for seed in config.seeds] if data_seed is None
            else [(data_seed, tuple(config.seeds))])
  size, number = _JobSize(job, len(groups) * len(config.methods)), 0
  for stream_seed, seeds in groups:
    stream = make_stream(config, dataset, stream_seed)
    size.stream(config, stream)
    for method in config.methods:
      number += 1
      job.set_description(f"group {number}/{size.runs} (vmap)")
      points = [(lam, seed) for seed in seeds  # seed-major, as run_sweep
                for lam in config.lams(method)]
      with _monitor(live, config, method, points, batched=True) as monitor:
        output = loop.run(config, stream, method, points, batched=True,
                          data_seed=stream_seed, monitor=monitor, job=job)
      for k, result in enumerate(output.results):
        out["params"][(method, result.lam, result.seed)] = jax.tree.map(
            lambda x, k=k: x[k], output.params)
        out["results"].append(result)
        _log_result(result, f"{result.time_s:.1f} s, vmap "
                    f"x{len(output.results)}")
      results_lib.write_results(workdir, config, info, out["results"],
                                final=False)


def train_and_evaluate(config: config_lib.Config, workdir: Any, *,
                       overwrite: bool = False,
                       dataset: Optional[data_lib.Dataset] = None,
                       resume: bool = False, vmap: bool = False,
                       data_seed: Optional[int] = None,
                       on_chunk: Optional[loop.ChunkHook] = None,
                       live: Optional[monitor_lib.LiveMetrics] = None
                       ) -> dict[str, Any]:
  """Runs every method, lambda and seed of ``config``; writes the results.

  Args:
    config: the configuration.
    workdir: the run directory (created; must be empty unless ``overwrite``
      or ``resume``).
    overwrite: allow a run directory holding a previous run: its files
      are moved into ``workdir/previous/`` and deleted once this run is
      complete (:func:`workdir.prepare_workdir`).
    dataset: use this dataset instead of loading ``config.dataset``.
    resume: continue the run in ``workdir`` (finished runs are read from
      ``runs.json``); ``config`` must equal the saved one.
    vmap: train each method's sweep as one vmapped program (no
      checkpoints).
    data_seed: with ``vmap``: one task stream from this seed, shared by
      every seed, so that lambdas x seeds form one program.
    on_chunk: a test hook called after every training chunk
      (:func:`loop.run`).
    live: live metrics (TensorBoard, W&B), one run each
      (:mod:`monitor`); ``None``: none.

  Returns:
    The summary (as in ``summary.json``) plus ``"results"`` (every
    :class:`results.MethodResult`), ``"params"`` (the final parameters of
    each run trained here, by ``(method, lam, seed)``) and ``"workdir"``.

  Raises:
    experiments.data.DataError: the data cannot be loaded (before the run
      directory is touched).
    budget.MemoryBudgetError: the run would not fit in memory (before the
      run directory is touched).
    FileExistsError: ``workdir`` is not empty (and not ``overwrite``), or
      holds files the runner did not write (:func:`workdir.check_workdir`).
    workdir.RunDirError: another process holds ``workdir``; or, resuming, a
      config, data or ``runs.json`` row that differs from the saved run.
    stream.DataError: the data cannot be trained on (before any training).
    loop.TrainingDiverged: a run's loss became nan or inf or blew up; the
      finished runs' results and the failed run's last good checkpoint are
      kept.
    checkpointing.CheckpointError: a checkpoint of another run or config,
      or damaged with no good one left.
  """
  config = config_lib.validate(config)
  if vmap and resume:
    raise ValueError("vmapped runs are not checkpointed: resume cannot "
                     "continue them.")
  if data_seed is not None and not vmap:
    raise ValueError("data_seed needs vmap.")
  if resume and overwrite:
    raise ValueError("resume and overwrite exclude each other.")
  workdir, dataset = _before_workdir(config, workdir, overwrite, resume,
                                     dataset, vmap, data_seed)
  with workdir_lib.locked(workdir):
    info, done = _open(config, workdir, overwrite, resume, dataset,
                       {"data_seed": data_seed} if vmap else None)
    return _train(config, workdir, dataset, info, done, vmap, data_seed,
                  on_chunk, live)


def _train(config, workdir, dataset, info, done, vmap, data_seed, on_chunk,
           live):
  """Every run (or vmapped group), then the final result files."""
  out = {"results": [], "params": {}}
  with progress_lib.Job(enabled=config.progress) as job, job.logging():
    if vmap:
      _run_groups(config, workdir, dataset, info, data_seed, out, live, job)
    else:
      mesh = steps.data_mesh(config)
      if mesh is not None:
        logger.info("data parallel: each mini-batch sharded over %d devices "
                    "(%s)", mesh.size, jax.devices()[0].platform)
      with (jax.set_mesh(mesh) if mesh is not None
            else contextlib.nullcontext()):
        _run_all(config, workdir, dataset, info, done, out, on_chunk, live,
                 job)
  summary = results_lib.write_results(workdir, config, info, out["results"],
                                      final=True)
  if not config.keep_checkpoints:
    shutil.rmtree(workdir / workdir_lib.CHECKPOINTS, ignore_errors=True)
  if workdir_lib.drop_previous(workdir):  # an --overwrite is complete
    logger.debug("deleted the previous run's files (%s/)",
                 workdir_lib.PREVIOUS)
  logger.info("%s", results_lib.format_table(summary["methods"]))
  logger.info("%s", results_lib.format_timing(summary["methods"]))
  return {**summary, **out, "workdir": workdir}
