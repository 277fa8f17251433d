"""Live metrics: --logdir event files read back, W&B only where installed."""

import builtins
import contextlib
import sys
import types

import jax
import numpy as np
import pytest

from experiments.common import tracking
from experiments.permuted_mnist import experiment
from experiments.permuted_mnist import loop
from experiments.permuted_mnist import methods as methods_lib
from experiments.permuted_mnist import main as permuted_mnist
from experiments.permuted_mnist import monitor as monitor_lib
from tests.experiments import tiny

FLAGS = ["--dataset", "synthetic", "--methods", "ewc,l2",
         "--lam", "0.5", "--num-tasks", "3", "--iterations", "12",
         "--hidden", "16", "--batch-size", "32", "--eval-batch-size", "100",
         "--seeds", "0", "--no-progress", "--quiet"]


def _num_params(params):
  return sum(np.size(x) for x in jax.tree.leaves(params))


def test_logdir_writes_every_run_and_leaves_results_unchanged(tmp_path):
  logdir = tmp_path / "tb"
  assert permuted_mnist.main(
      FLAGS + ["--out", str(tmp_path / "a"), "--logdir", str(logdir)]) == 0
  # The same experiment without a monitor: bit-identical results.
  config = permuted_mnist.parse(FLAGS)[1]
  plain = experiment.train_and_evaluate(config, tmp_path / "b")
  runs = {r.method: r for r in plain["results"]}
  assert sorted(p.name for p in logdir.iterdir()) == [
      "ewc-lam0.5-seed0", "l2-lam0.5-seed0"]
  for method, result in runs.items():
    scalars = tracking.read_scalars(logdir / f"{method}-lam0.5-seed0")
    # Loss at the end of each chunk (chunks end at epochs and tasks),
    # steps over all tasks, the values the results hold.
    steps, values = zip(*scalars["train/loss"])
    assert list(steps) == sorted(set(steps)) and {12, 24, 36} <= set(steps)
    assert steps[-1] == 36
    np.testing.assert_allclose(
        values, np.concatenate(result.train_loss), rtol=1e-6)
    for j in range(3):  # at the step where each task's training ended
      got = scalars[f"acc/task_{j}"]
      assert [s for s, _ in got] == [12, 24, 36]
      np.testing.assert_allclose([v for _, v in got], result.R[:, j],
                                 rtol=1e-6)
    np.testing.assert_allclose(
        [v for _, v in scalars["acc/average"]],
        [result.R[i, :i + 1].mean() for i in range(3)], rtol=1e-6)
    assert {t for t in scalars if t.startswith("pull/")} == {
        "pull/penalty", "pull/curvature_sum", "pull/curvature_max"}
  logged = {(r["method"]): r for r in _runs_json(tmp_path / "a")}
  for method, result in runs.items():
    np.testing.assert_array_equal(logged[method]["R"], result.R)
  # L2's curvature is ones per task: the sums are closed-form.
  l2 = tracking.read_scalars(logdir / "l2-lam0.5-seed0")
  n = _num_params(plain["params"][("l2", 0.5, 0)])
  assert l2["pull/curvature_sum"] == [(12, n), (24, 2 * n)]
  assert l2["pull/curvature_max"] == [(12, 1.0), (24, 2.0)]
  penalty = dict(l2["pull/penalty"])
  assert penalty[12] == 0.0 and penalty[24] > 0 and penalty[36] > 0
  ewc = tracking.read_scalars(logdir / "ewc-lam0.5-seed0")
  sums = [v for _, v in ewc["pull/curvature_sum"]]
  assert 0 < sums[0] < sums[1]  # separate mode adds the Fishers up


def _runs_json(workdir):
  import json  # noqa: PLC0415
  return json.loads((workdir / "runs.json").read_text())


@pytest.mark.slow  # an end-to-end run: CI's own step
def test_vmapped_sweep_logs_each_member(tmp_path):
  config = tiny.config(methods=("finetune", "l2"), l2_lam=(0.5, 2.0),
                       iterations=5)
  live = monitor_lib.LiveMetrics(logdir=str(tmp_path / "tb"))
  out = experiment.train_and_evaluate(config, tmp_path / "run", vmap=True,
                                      dataset=tiny.dataset(), live=live)
  finetune = tracking.read_scalars(tmp_path / "tb" / "finetune-lam0.0-seed0")
  assert not [t for t in finetune if t.startswith("pull/")]  # no pull
  for result in out["results"][1:]:
    scalars = tracking.read_scalars(
        tmp_path / "tb" / f"l2-lam{result.lam!r}-seed0")
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]],
                               np.concatenate(result.train_loss), rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars["acc/task_2"]],
                               result.R[:, 2], rtol=1e-6)
    penalty = dict(scalars["pull/penalty"])  # 5 steps per task
    assert penalty[5] == 0.0 and penalty[15] > 0


def test_wandb_missing_is_one_clear_error(tmp_path, capsys, monkeypatch):
  real_import = builtins.__import__

  def no_wandb(name, *args, **kwargs):
    if name == "wandb":
      raise ImportError("No module named 'wandb'")
    return real_import(name, *args, **kwargs)

  monkeypatch.delitem(sys.modules, "wandb", raising=False)
  monkeypatch.setattr(builtins, "__import__", no_wandb)
  with pytest.raises(SystemExit) as exit_info:
    permuted_mnist.main(FLAGS + ["--out", str(tmp_path / "w"), "--wandb"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "--wandb needs the wandb package" in err and "Traceback" not in err
  assert not (tmp_path / "w").exists()  # failed before any work


class _FakeRun:
  def __init__(self, **kwargs):
    self.init, self.logged, self.defined, self.finished = kwargs, [], [], False

  def define_metric(self, name, **kwargs):
    self.defined.append((name, kwargs.get("step_metric")))

  def log(self, values):
    self.logged.append(values)

  def finish(self):
    self.finished = True


def test_wandb_tracker_logs_against_its_axes(monkeypatch):
  runs = []
  fake = types.ModuleType("wandb")
  fake.init = lambda **kwargs: runs.append(_FakeRun(**kwargs)) or runs[-1]
  monkeypatch.setitem(sys.modules, "wandb", fake)
  with tracking.open_trackers("ewc-lam1.0-seed0", wandb_project="p",
                              config={"lam": 1.0}) as trackers:
    trackers.scalars({"train/loss": 2.5}, 10)
    trackers.scalars({"acc/task_0": 0.9, "acc/average": 0.9}, 0,
                     axis="task")
  (run,) = runs
  assert run.init["project"] == "p" and run.init["name"] == "ewc-lam1.0-seed0"
  assert ("train/*", "step") in run.defined and ("acc/*", "task") in run.defined
  assert run.logged == [{"train/loss": 2.5, "step": 10},
                        {"acc/task_0": 0.9, "acc/average": 0.9, "task": 0}]
  assert run.finished


def test_read_scalars_applies_tensorboards_purge(tmp_path):
  with pytest.raises(FileNotFoundError, match="no event files"):
    tracking.read_scalars(tmp_path)
  with tracking.open_trackers("r", logdir=tmp_path) as trackers:
    for step in range(1, 6):
      trackers.scalars({"a": float(step)}, step)
  # A resumed writer in the same second: its own file, the old one kept.
  with tracking.open_trackers("r", logdir=tmp_path, purge_step=3) as trackers:
    trackers.scalars({"a": 30.0}, 3)
    trackers.scalars({"b": 1.0}, 0, axis="task", global_step=4)
  assert len(list((tmp_path / "r").glob("events.out.tfevents.*"))) == 2
  assert tracking.read_scalars(tmp_path / "r") == {
      "a": [(1, 1.0), (2, 2.0), (3, 30.0)], "b": [(4, 1.0)]}
  with pytest.raises(ValueError, match="axis"):
    tracking.TensorBoard(tmp_path / "x").scalars({"a": 1.0}, 0, axis="t")


class _Interrupted(Exception):
  pass


def test_resumed_run_logs_each_step_once(tmp_path):
  config = tiny.config(methods=("ewc",), hidden=(8,), epochs=1,
                       checkpoint_every=5)
  stream, ckpt = tiny.stream(), tmp_path / "ckpt"
  live = monitor_lib.LiveMetrics(logdir=str(tmp_path / "tb"))
  done = [0]

  def interrupt(steps):
    done[0] += steps
    if done[0] >= 26:  # task 2, step 10: its last checkpoint is at step 5
      raise _Interrupted

  with contextlib.closing(
      live.open(config, methods_lib.get("ewc"), [(1.0, 0)])) as monitor:
    with pytest.raises(_Interrupted):
      loop.run_method(config, stream, "ewc", 0, 1.0, checkpoint_dir=ckpt,
                      on_chunk=interrupt, monitor=monitor)
  with contextlib.closing(
      live.open(config, methods_lib.get("ewc"), [(1.0, 0)])) as monitor:
    result = loop.run_method(config, stream, "ewc", 0, 1.0,
                             checkpoint_dir=ckpt, monitor=monitor)
  run_dir = tmp_path / "tb" / "ewc-lam1.0-seed0"
  assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2
  scalars = tracking.read_scalars(run_dir)
  steps, values = zip(*scalars["train/loss"])
  assert list(steps) == sorted(set(steps))  # once each, in order
  np.testing.assert_allclose(values, np.concatenate(result.train_loss),
                             rtol=1e-6)
  for j in range(3):  # 16 steps per task
    assert [s for s, _ in scalars[f"acc/task_{j}"]] == [16, 32, 48]


class _Recorder:
  def __init__(self):
    self.logged = []

  def scalars(self, values, step, axis="step", global_step=None):
    self.logged.append((dict(values), step, axis, global_step))

  def flush(self):
    pass

  def close(self):
    pass


def test_monitor_without_an_ewc_state_reports_no_pull():
  # A method whose pull is no ewc_jax.ewc (e.g. Kronecker-factored) still
  # gets its accuracies; the pull's sizes are left out, not guessed.
  import optax  # noqa: PLC0415

  from experiments.permuted_mnist import steps  # noqa: PLC0415
  params = {"w": np.ones(3, np.float32)}
  state = steps.State(params=params, opt_state=optax.adam(1e-3).init(params))
  recorder = _Recorder()
  monitor = monitor_lib.Monitor(lambda purge: [recorder], batched=False,
                                reports_pull=True)
  monitor.start(0)
  monitor.loss(7, np.float32(0.25))
  monitor.task_end(1, np.array([[0.5, 0.75, 0.1]]),
                   np.array([[0.5, 0.25, 0.0]]), state, state, 9)
  (loss, step, axis, _), (values, task, task_axis, at) = recorder.logged
  assert (loss, step, axis) == ({"train/loss": 0.25}, 7, "step")
  assert (task, task_axis, at) == (1, "task", 9)
  assert values == pytest.approx({
      "acc/task_0": 0.5, "acc/task_1": 0.75, "acc/task_2": 0.1,
      "acc/average": 0.625, "acc/average_all": 0.45,
      "val_acc/average": 0.375})
