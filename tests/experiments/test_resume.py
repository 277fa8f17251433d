"""Never lose a run: checkpoints, resume, determinism and hostile inputs.

The last section covers the rows of docs/hostile_inputs.md that no other
test file covers.
"""

import dataclasses
import functools
import gzip
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ewc_jax
from experiments import data
from experiments.data import tfds_source
from experiments.common import checkpoint as checkpoint_lib
from experiments.permuted_mnist import checkpointing
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import experiment
from experiments.permuted_mnist import loop
from experiments.permuted_mnist import main as permuted_mnist
from experiments.permuted_mnist import methods
from experiments.permuted_mnist import models
from experiments.permuted_mnist import ops
from experiments.permuted_mnist import stream as stream_lib
from experiments.permuted_mnist import tasks as tasks_lib
from experiments.permuted_mnist import workdir as workdir_lib
from tests.experiments import tiny

REPO = pathlib.Path(__file__).resolve().parents[2]


_dataset = tiny.dataset


def _config(**changes):
  # 540 training examples per task, 16 steps per epoch; lr 3e-3 leaves the
  # accuracies well away from 0 and 1, so that R tells runs apart.
  return tiny.config(**{"hidden": (8,), "epochs": 1, "learning_rate": 3e-3,
                        "checkpoint_every": 5, **changes})


def _stream(seed=0):
  return tiny.stream(seed=seed)


@functools.lru_cache(maxsize=None)
def _reference(method, seed=0):
  """An uninterrupted run without checkpoints."""
  return loop.run_method(_config(), _stream(seed), method, seed, 1.0)


class _Interrupted(Exception):
  pass


def _interrupt_after(steps):
  """A chunk hook that raises once ``steps`` steps have run."""
  done = [0]

  def hook(n):
    done[0] += n
    if done[0] >= steps:
      raise _Interrupted

  return hook


def _init_state(config, method, lam, seed):
  return ops.init_state(config, methods.get(method), 10, [(lam, seed)],
                         batched=False)


def _ewc_states(opt_state):
  return [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, ewc_jax.EWCState))
          if isinstance(s, ewc_jax.EWCState)]


# ----------------------------------------------------------------------------
# Determinism.


def test_same_seed_gives_identical_results():
  again = loop.run_method(
      _config(), stream_lib.make_stream(
          tasks_lib.make_tasks("permuted", _dataset(), 3, 0),
          eval_batch_size=100), "si", 0, 1.0)
  first = _reference("si")
  np.testing.assert_array_equal(again.R, first.R)
  np.testing.assert_array_equal(again.R_val, first.R_val)
  assert again.train_loss == first.train_loss


def test_different_seeds_give_different_permutations_and_inits():
  a, b = _stream(0).tasks, _stream(1).tasks
  assert not np.array_equal(a[1].train_x, b[1].train_x)
  params = [_init_state(_config(), "ewc", 1.0, seed)[2].params
            for seed in (0, 1)]
  for p, q in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
    if p.ndim == 2:  # kernels (biases start at zero)
      assert not np.array_equal(p, q)
  other = loop.run_method(_config(), _stream(1), "si", 1, 1.0)
  assert not np.array_equal(other.R, _reference("si").R)


def test_chunk_boundaries_do_not_change_results(tmp_path):
  # Checkpoints every 5 steps cut each 16-step epoch into 4 chunks.
  cut = loop.run_method(_config(), _stream(), "si", 0, 1.0,
                         checkpoint_dir=tmp_path / "ckpt")
  ref = _reference("si")
  np.testing.assert_array_equal(cut.R, ref.R)
  np.testing.assert_array_equal(cut.R_val, ref.R_val)
  assert [len(losses) for losses in cut.train_loss] == [4, 4, 4]


def test_segments_split_at_epochs_and_checkpoints():
  assert loop.segments(10, 4, None) == [(0, 4), (4, 8), (8, 10)]
  assert loop.segments(10, 4, 3) == [(0, 3), (3, 4), (4, 6), (6, 8),
                                      (8, 9), (9, 10)]
  assert loop.segments(10, 4, 3, start=6) == [(6, 8), (8, 9), (9, 10)]


# ----------------------------------------------------------------------------
# Checkpoints and resume.


@pytest.mark.parametrize("method", ["si", "online_ewc"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, caplog,
                                                    method):
  config = _config()
  ref = loop.run_method(config, _stream(), method, 0, 1.0,
                         checkpoint_dir=tmp_path / "ref")
  ckpt = tmp_path / "run"
  # Interrupted after step 10 of task 2 (joint: of its single phase).
  with pytest.raises(_Interrupted):
    loop.run_method(config, _stream(), method, 0, 1.0, checkpoint_dir=ckpt,
                    on_chunk=_interrupt_after(26))
  store = checkpoint_lib.RunCheckpoints(ckpt)
  _, _, fresh = _init_state(config, method, 1.0, 0)
  key = jax.random.key(0)
  tree, meta = store.restore({"state": fresh,
                              "key": jax.random.key_data(key)})
  store.close()
  # The checkpoint holds the whole state and where the run stood.
  assert (meta["task"], meta["step"]) == (1, 10)
  assert meta["config"] == config.to_json() and meta["data_seed"] == 0
  assert (meta["method"], meta["members"]) == (method, [[1.0, 0]])
  np.testing.assert_array_equal(tree["key"], jax.random.key_data(key))
  np.testing.assert_array_equal(meta["R"][0][0], ref.R[0])
  assert not np.any(np.asarray(meta["R"])[0, 1:])
  # The EWC state (anchor and Fisher sum of task 1) and SI's path integral.
  curvature = _ewc_states(tree["state"].opt_state)[0].curvature
  assert sum(float(jnp.sum(a)) for a in jax.tree.leaves(curvature)) > 0
  if method == "si":
    assert any(bool(jnp.any(w != 0)) for w in jax.tree.leaves(
        tree["state"].opt_state.omega))
  caplog.set_level("INFO", logger="experiments")
  resumed = loop.run_method(config, _stream(), method, 0, 1.0,
                            checkpoint_dir=ckpt)
  assert "resuming" in caplog.records[0].getMessage()
  np.testing.assert_array_equal(resumed.R, ref.R)
  np.testing.assert_array_equal(resumed.R_val, ref.R_val)
  np.testing.assert_array_equal(resumed.b, ref.b)
  assert resumed.train_loss == ref.train_loss


def test_checkpoint_of_another_run_or_config_is_refused(tmp_path):
  with pytest.raises(_Interrupted):
    loop.run_method(_config(), _stream(), "online_ewc", 0, 1.0,
                    checkpoint_dir=tmp_path, on_chunk=_interrupt_after(5))
  with pytest.raises(ValueError, match=r"another run: members \[\[1.0, 0\]\], "
                                       r"expected \[\[2.0, 0\]\]"):
    loop.run_method(_config(), _stream(), "online_ewc", 0, 2.0,
                    checkpoint_dir=tmp_path)
  with pytest.raises(ValueError, match="another config: learning_rate"):
    loop.run_method(_config(learning_rate=1e-3), _stream(), "online_ewc", 0,
                    1.0, checkpoint_dir=tmp_path)


def test_a_half_written_checkpoint_leaves_the_previous_one_usable(tmp_path):
  store = checkpoint_lib.RunCheckpoints(tmp_path)
  tree = {"w": jnp.arange(3.0), "n": jnp.ones((), jnp.int32)}
  arrays, paths = checkpoint_lib.flatten(tree)
  store.save(7, arrays, {"paths": paths, "note": "good"})
  store.close()
  # What a process killed mid-write leaves: orbax's temporary directory.
  partial = tmp_path / "9.orbax-checkpoint-tmp" / "state"
  partial.mkdir(parents=True)
  (partial / "garbage").write_bytes(b"\0" * 10)
  store = checkpoint_lib.RunCheckpoints(tmp_path)
  assert store.latest_step() == 7
  restored, meta = store.restore(jax.tree.map(jnp.zeros_like, tree))
  assert meta["note"] == "good"
  np.testing.assert_array_equal(restored["w"], tree["w"])
  assert not (tmp_path / "9.orbax-checkpoint-tmp").exists()  # cleaned up
  store.save(9, arrays, {"paths": paths, "note": "next"})
  store.close()
  # max_to_keep=1: only the newest complete step remains.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["9"]


def test_restore_into_a_different_state_is_refused(tmp_path):
  store = checkpoint_lib.RunCheckpoints(tmp_path, asynchronous=False)
  arrays, paths = checkpoint_lib.flatten({"w": jnp.zeros(3)})
  store.save(1, arrays, {"paths": paths})
  with pytest.raises(ValueError, match=r"\['w'\] is float32\[3\], expected "
                                       r"float32\[4\]"):
    store.restore({"w": jnp.zeros(4)})
  with pytest.raises(ValueError, match="holds a different state"):
    store.restore({"v": jnp.zeros(3)})
  store.close()
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint_lib.RunCheckpoints(tmp_path / "empty").restore({})


def test_run_names_keep_every_digit_of_lambda():
  names = {checkpoint_lib.run_name("ewc", lam, 0)
           for lam in (0.1, 0.1000001, 1e-4, 10.0)}
  assert len(names) == 4
  assert checkpoint_lib.run_name("si", 3, 2) == "si-lam3.0-seed2"


def _experiment(tmp_path, **changes):
  config = _config(methods=("finetune", "ewc"), lam=(1.0,), **changes)
  return config, experiment.train_and_evaluate(config, tmp_path,
                                               dataset=_dataset())


def test_resume_reads_finished_runs_and_refuses_other_configs(
    tmp_path, monkeypatch, capsys):
  config, first = _experiment(tmp_path)
  assert not (tmp_path / workdir_lib.CHECKPOINTS).exists()  # deleted when done

  def fail(*args, **kwargs):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(loop, "run", fail)
  again = experiment.train_and_evaluate(config, tmp_path, dataset=_dataset(),
                                        resume=True)
  for a, b in zip(first["results"], again["results"], strict=True):
    np.testing.assert_array_equal(a.R, b.R)
    assert a.time_s == b.time_s and a.train_loss == b.train_loss
  assert again["methods"] == first["methods"]
  # Display-only fields may change; anything else is refused, by name.
  experiment.train_and_evaluate(config.replace(progress=True), tmp_path,
                       dataset=_dataset(), resume=True)
  with pytest.raises(ValueError, match=r"epochs: saved 1, now 2; lam: saved "
                                       r"\[1.0\], now \[2.0\]"):
    experiment.train_and_evaluate(config.replace(epochs=2, lam=(2.0,)),
                                  tmp_path,
                         dataset=_dataset(), resume=True)
  other = data.load_synthetic(num_train=600, num_test=200, seed=1)
  with pytest.raises(ValueError, match="the data differ.*sha256"):
    experiment.train_and_evaluate(config, tmp_path, dataset=other, resume=True)
  # The command line: flags that change the config are refused, naming them.
  with pytest.raises(SystemExit) as exit_info:
    permuted_mnist.main(["--resume", str(tmp_path), "--epochs", "3"])
  assert exit_info.value.code == 2
  assert "differing field(s): epochs: saved 1, now 3" in (
      capsys.readouterr().err)
  for argv, message in (
      (["--resume", str(tmp_path), "--out", str(tmp_path)], "drop --out"),
      (["--resume", str(tmp_path / "nothing")], "holds no config.json")):
    with pytest.raises(SystemExit):
      permuted_mnist.main(argv)
    assert message in capsys.readouterr().err


def test_overwrite_clears_old_checkpoints_and_keep_keeps_final_ones(tmp_path):
  stale = tmp_path / workdir_lib.CHECKPOINTS / "finetune-lam0.0-seed0" / "999"
  stale.mkdir(parents=True)
  (tmp_path / "config.json").write_text(  # the previous run's
      json.dumps({"config": {}, "dataset": {}}))
  config = _config(methods=("finetune",), keep_checkpoints=True)
  experiment.train_and_evaluate(config, tmp_path, dataset=_dataset(),
                                overwrite=True,
                       )
  steps = sorted(int(p.name) for p in (stale.parent).iterdir())
  # The last two (a damaged one has one to fall back to): the end of task 3
  # (3 x 16 steps) and the last one within it; never the stale 999, which
  # went with the previous run (previous/, deleted once this one completed).
  assert steps == [47, 48]
  assert not (tmp_path / workdir_lib.PREVIOUS).exists()


@pytest.mark.slow  # an end-to-end run: CI's own step
def test_sigkill_mid_task_then_resume_matches_an_uninterrupted_run(tmp_path):
  # The CLI on the default synthetic data (1,800 training examples per task,
  # 56 steps): finetune runs 168 steps and finishes; si is killed by SIGKILL
  # at step 40 of task 2 (264 steps in all), just after its checkpoint at
  # step 40 was handed to the background writer: the resume starts from
  # step 40 or, if that write was cut short, from step 20.
  args = [sys.executable, "-m", "experiments.permuted_mnist",
          "--dataset", "synthetic", "--methods", "finetune,si", "--lam", "1",
          "--num-tasks", "3", "--epochs", "1", "--hidden", "8",
          "--batch-size", "32", "--lr", "0.003", "--seeds", "0",
          "--set", "eval_batch_size=100", "--checkpoint-every", "20",
          "--no-progress"]
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("JAX_COMPILATION")}
  env["JAX_PLATFORMS"] = "cpu"
  # The killed and the resumed process share a compilation cache (the
  # resume then compiles nothing); the reference compiles on its own.
  cached = {**env, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  full, run = tmp_path / "full", tmp_path / "run"
  reference = subprocess.Popen([*args, "--out", str(full)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    crashed = subprocess.run(
        [sys.executable, "-m", "tests.experiments.crash_entry", "249",
         *args[3:], "--out", str(run)], cwd=REPO, capture_output=True,
        text=True, env=cached, timeout=300)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    done = json.loads((run / "runs.json").read_text())
    assert [r["method"] for r in done] == ["finetune"]
    assert (run / workdir_lib.CHECKPOINTS / "si-lam1.0-seed0").is_dir()
    resumed = subprocess.run(
        [sys.executable, "-m", "experiments.permuted_mnist", "--resume",
         str(run)], cwd=REPO, capture_output=True, text=True, env=cached,
        timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "finished earlier, read from runs.json" in resumed.stdout
    assert re.search(r"si lam=1 seed=0: resuming from its checkpoint at "
                     r"task 2, step (20|40)\n", resumed.stdout)
    _, err = reference.communicate(timeout=300)
  finally:
    reference.kill()
  assert reference.returncode == 0, err.decode()
  want = json.loads((full / "runs.json").read_text())
  got = json.loads((run / "runs.json").read_text())
  assert [r["method"] for r in got] == ["finetune", "si"]
  for a, b in zip(want, got, strict=True):
    assert np.array_equal(a["R"], b["R"]), (a["R"], b["R"])
    assert np.array_equal(a["R_val"], b["R_val"])
    assert a["train_loss"] == b["train_loss"]
  assert not (run / workdir_lib.CHECKPOINTS).exists()


# ----------------------------------------------------------------------------
# Hostile inputs of the runner.


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path):
  # SGD with a huge pull: task 1 trains; task 2 overflows within a chunk.
  config = _config(optimizer="sgd", learning_rate=0.1)
  with pytest.raises(loop.TrainingDiverged,
                     match=r"ewc lam=1e\+30 seed=0 task 2/3: the training "
                           r"loss became nan within steps 1-5 of 16"):
    loop.run_method(config, _stream(), "ewc", 0, 1e30,
                     checkpoint_dir=tmp_path)
  store = checkpoint_lib.RunCheckpoints(tmp_path)
  assert store.latest_step() == 16  # after task 1: the last good one
  store.close()


def test_non_finite_state_is_never_checkpointed(tmp_path):
  config = _config()
  _, _, state = _init_state(config, "ewc", 1.0, 0)
  state = dataclasses.replace(state, params=jax.tree.map(
      lambda p: p.at[(0,) * p.ndim].set(jnp.nan), state.params))
  saver = checkpointing.RunCheckpointer(
      tmp_path, config, "ewc", [(1.0, 0)], 0, [16] * 3,
      lambda t: f"ewc task {t + 1}")
  record = checkpointing.Record(
      R=np.zeros([1, 3, 3]), R_val=np.zeros([1, 3, 3]), b=np.zeros([1, 3]),
      b_val=np.zeros([1, 3]), train_loss=[[]], task_loss=[[]], task=1,
      step=5)
  with pytest.raises(loop.TrainingDiverged,
                     match=r"ewc task 2: \['state'\].*holds nan or inf after "
                           "step 5; not checkpointed"):
    saver.save(state, jax.random.key(0), record)
  assert saver.store.latest_step() is None
  saver.close()


def test_cli_reports_data_errors_and_divergence_without_a_traceback(
    tmp_path, monkeypatch, capsys):
  for error in (loop.TrainingDiverged("ewc seed=0 task 2/3: nan"),
                stream_lib.DataError("task 0 (permuted-0) test split: nan")):
    def fail(*args, error=error, **kwargs):
      raise error

    monkeypatch.setattr(experiment, "train_and_evaluate", fail)
    status = permuted_mnist.main(["--dataset", "synthetic", "--out",
                                  str(tmp_path / "x"), "--overwrite"])
    assert status == 1
    assert capsys.readouterr().err == f"error: {error}\n"


def _nan_image(t):
  x = t.train_x.copy()
  x[3, 5, 5] = np.nan
  return dict(train_x=x)


@pytest.mark.parametrize("change, match", [
    (_nan_image,
     r"task 1 \(permuted-1\) train split: 1 image\(s\) hold nan or inf "
     r"values \(first at example 3\); fix the data"),
    (lambda t: dict(test_x=np.where(np.arange(28) == 4, np.inf, t.test_x)),
     r"task 1 \(permuted-1\) test split: 200 image\(s\) hold nan or inf "
     r"values \(first at example 0\)"),
    (lambda t: dict(train_x=(t.train_x * 255).astype(np.uint8)),
     r"train split: images have dtype uint8; expected floating point"),
    (lambda t: dict(val_x=t.val_x.reshape(len(t.val_x), -1)),
     r"val split: images must have shape \[n, 28, 28\], got \(60, 784\)"),
    (lambda t: dict(train_y=t.train_y.astype(np.float32)),
     r"train split: labels have dtype float32; expected integers"),
    (lambda t: dict(test_y=t.test_y[:-1]),
     r"test split: labels must have shape \[200\] \(one per image\)"),
    (lambda t: dict(train_y=np.where(t.train_y == 3, 12, t.train_y)),
     r"train split: labels \[12\] are not among the task's classes"),
    (lambda t: dict(val_x=t.val_x[:0], val_y=t.val_y[:0]),
     r"task 1 \(permuted-1\) val split holds no examples"),
])
def test_bad_task_data_is_rejected_before_training(change, match):
  tasks = list(_stream().tasks)
  tasks[1] = tasks[1]._replace(**change(tasks[1]))
  with pytest.raises(stream_lib.DataError, match=match):
    stream_lib.make_stream(tasks, eval_batch_size=100)


def test_an_empty_task_stream_is_rejected():
  with pytest.raises(stream_lib.DataError, match="holds no tasks"):
    stream_lib.make_stream([], eval_batch_size=100)


def test_nan_in_a_dataset_stops_the_experiment_before_any_training(
    tmp_path, monkeypatch):
  ds = _dataset()
  x = ds.test_x.copy()
  x[7, 0, 0] = np.nan
  monkeypatch.setattr(loop, "run", lambda *a, **k: pytest.fail())
  with pytest.raises(stream_lib.DataError, match=r"task 0 \(permuted-0\) test "
                                            r"split.*first at example 7"):
    experiment.train_and_evaluate(_config(), tmp_path,
                                  dataset=ds._replace(test_x=x))


def test_too_few_examples_for_a_batch_is_caught_before_training(tmp_path):
  # Split MNIST tasks are smaller than permuted ones: one of 120 examples.
  ds = _dataset()
  keep = (ds.train_y >= 2) | (np.arange(len(ds.train_y)) < 100)
  small = ds._replace(train_x=ds.train_x[keep], train_y=ds.train_y[keep])
  config = _config(tasks="split_task", batch_size=64, methods=("finetune",))
  with pytest.raises(stream_lib.DataError, match=r"task 0 \(split-01\) has \d+ "
                                            "training examples, fewer than "
                                            "batch_size 64"):
    experiment.train_and_evaluate(config, tmp_path, dataset=small)


@pytest.mark.parametrize("changes, match", [
    (dict(epochs="3"), "epochs must be an int, got str '3'"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(num_tasks=0), "num_tasks must be >= 1"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(eval_batch_size=0), "eval_batch_size must be >= 1"),
    (dict(fisher_batch_size=0), "fisher_batch_size must be >= 1"),
    (dict(cnn_hidden=0), "cnn_hidden must be >= 1"),
    (dict(checkpoint_every=0), "checkpoint_every must be None or >= 1"),
    (dict(iterations=0), "iterations must be None or >= 1"),
    (dict(train_examples=0), "train_examples must be None or >= 1"),
    (dict(fisher_examples=0), "fisher_examples must be None or >= 1"),
    (dict(hidden=[16]), "hidden must be a tuple, got list"),
    (dict(hidden=(16, 0)), r"hidden \(layer widths\) must all be >= 1"),
    (dict(channels=(0,)), r"channels \(layer widths\) must all be >= 1"),
    # hostile pass: before, a traceback from the CNN's constructor
    (dict(model="cnn", channels=()), "channels must name at least one"),
    (dict(learning_rate=0.0), "learning_rate must be > 0"),
    (dict(learning_rate=float("nan")), "learning_rate must be a finite"),
    (dict(b1=1.0), r"b1 must be in \[0, 1\)"),
    (dict(b2=-0.1), r"b2 must be in \[0, 1\)"),
    (dict(momentum=1.5), r"momentum must be in \[0, 1\)"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(gamma=0.0), r"gamma must be in \(0, 1\]"),
    (dict(si_xi=0.0), "si_xi must be > 0"),
    (dict(si_xi=float("inf")), "si_xi must be a finite number"),
    (dict(lam=(float("nan"),)), "each entry of lam must be a finite number"),
    (dict(lam=(-1.0,)), r"lam \(ewc's strength sweep\) must be a non-empty"),
    (dict(si_c=()), r"si_c \(si's strength sweep\) must be a non-empty"),
    (dict(l2_lam=(1.0, 1.0)), "lists a value twice"),
    (dict(seeds=()), "seeds must name at least one seed"),
    (dict(seeds=(-1,)), r"seeds must be integers in \[0, 2\*\*32\)"),
    (dict(seeds=(1, 1)), "seeds lists a seed twice"),
    (dict(methods=()), "methods must be a non-empty list"),
    (dict(methods=("replay",)), "methods must be a non-empty list"),
    (dict(dataset="cifar"), "dataset must be one of"),
    (dict(tasks="shuffled"), "tasks must be one of"),
    (dict(fisher="diag"), "fisher must be one of"),
    (dict(model="resnet"), "model must be one of"),
    (dict(optimizer="lion"), "optimizer must be one of"),
    (dict(tasks="split_task", num_tasks=6), "has at most 5 tasks"),
    (dict(val_fraction=0.0), r"val_fraction must be in \(0, 1\)"),
    (dict(progress=1), "progress must be a bool, got int 1"),
    (dict(data_dir=3), "data_dir must be a str"),
])
def test_bad_config_values_are_rejected(changes, match):
  with pytest.raises(ValueError, match=match):
    config_lib.get_config("quick").replace(**changes)


def test_bad_saved_configs_are_rejected(tmp_path):
  with pytest.raises(ValueError, match=r"unknown config field\(s\) \['lr'\]"):
    config_lib.from_json({"lr": 1.0})
  with pytest.raises(ValueError, match="must be a JSON object"):
    config_lib.from_json([1])
  (tmp_path / "config.json").write_text('{"dataset": {}}')
  with pytest.raises(ValueError, match="is not a run's config"):
    workdir_lib.saved_config(tmp_path)
  config = config_lib.get_config("quick")
  assert config_lib.from_json(config.to_json()) == config


def test_other_runner_inputs_are_rejected(tmp_path):
  with pytest.raises(ValueError, match="--set expects FIELD=VALUE, got "
                                       "'epochs'"):
    permuted_mnist.parse(["--set", "epochs"])
  with pytest.raises(SystemExit):  # tyro: --progress takes no value
    permuted_mnist.parse(["--set", "progress=maybe"])
  with pytest.raises(ValueError, match="unknown preset 'slow'"):
    config_lib.get_config("slow")
  with pytest.raises(ValueError, match="unknown method 'replay'"):
    loop.run_method(_config(), _stream(), "replay", 0)
  (tmp_path / "file").write_text("")
  with pytest.raises(FileExistsError, match="exists and is a file"):
    workdir_lib.prepare_workdir(tmp_path / "file", overwrite=True)
  with pytest.raises(ValueError, match="resume and overwrite exclude"):
    experiment.train_and_evaluate(_config(), tmp_path, overwrite=True,
                                  resume=True)
  store = checkpoint_lib.RunCheckpoints(tmp_path / "ckpt",
                                        asynchronous=False)
  arrays, paths = checkpoint_lib.flatten({"w": jnp.zeros(3)})
  store.save(1, arrays, {"paths": paths, "format": 0})
  with pytest.raises(ValueError, match="has format 0; this code reads "
                                       "format 1"):
    store.restore({"w": jnp.zeros(3)})
  store.close()


# ----------------------------------------------------------------------------
# Rows of docs/hostile_inputs.md with no test elsewhere (library and data).

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
APPLY = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
X = jnp.ones((6, 3))
Y = jnp.zeros(6, jnp.int32)


def test_fisher_rejects_bad_batches_labels_and_num_samples():
  with pytest.raises(ValueError, match="num_samples must be a positive int"):
    ewc_jax.fisher_diagonal(APPLY, PARAMS, (X, Y), estimator="sampled",
                            rng=jax.random.key(0), num_samples=0)
  with pytest.raises(ValueError, match="each batch of data must be a tuple"):
    ewc_jax.fisher_diagonal(APPLY, PARAMS, ["oops"])
  with pytest.raises(ValueError, match=r"data must be \(inputs, labels\)"):
    ewc_jax.fisher_diagonal(APPLY, PARAMS, {"x": X, "y": Y})
  with pytest.raises(ValueError, match='estimator="empirical" needs data '
                                       "labels"):
    ewc_jax.fisher_diagonal(APPLY, PARAMS, (X, None), estimator="empirical")
  with pytest.raises(ValueError, match=r"labels must be a 1-D array .* got "
                                       r"shape \(\)"):
    ewc_jax.fisher_diagonal(APPLY, PARAMS, (X, jnp.zeros((), jnp.int32)))
  with pytest.raises(ValueError, match="data holds no examples"):
    ewc_jax.empirical_fisher(lambda p, ex: jnp.sum(p["w"]), PARAMS,
                             (X[:0], Y[:0]))
  with pytest.raises(ValueError, match=r"estimator must be one of "
                                       r"\('empirical', 'batched'\), got "
                                       r"'exact'"):
    ewc_jax.empirical_fisher(lambda p, ex: jnp.sum(p["w"]), PARAMS, (X, Y),
                             estimator="exact")


def test_transform_rejects_integer_params_and_other_node_types():
  opt = optax.chain(ewc_jax.ewc(1.0), optax.sgd(0.1))
  state = opt.init(PARAMS)
  ints = {"w": jnp.ones((3, 2), jnp.int32), "b": jnp.zeros(2, jnp.int32)}
  with pytest.raises(ValueError, match=r"params\['b'\] has dtype int32"):
    ewc_jax.consolidate(state, ints, PARAMS)

  @dataclasses.dataclass
  class Box:
    w: jax.Array
    b: jax.Array

  jax.tree_util.register_dataclass(Box, data_fields=["w", "b"],
                                   meta_fields=[])
  with pytest.raises(ValueError, match="trees are matched by path"):
    ewc_jax.consolidate(state, PARAMS, Box(**PARAMS))
  with pytest.raises(ValueError, match=r"fisher lacks \[\"\['b'\]\"\]"):
    ewc_jax.ewc_penalty(PARAMS, PARAMS, {"w": PARAMS["w"]}, 1.0)
  # Same paths, other node types (a tuple and a list, as an nnx.State and
  # its pure dict): trees are matched by path.
  w = PARAMS["w"]
  np.testing.assert_allclose(
      ewc_jax.ewc_penalty((w + 1.0,), [w], (jnp.ones_like(w),), 2.0), 6.0)


def test_read_idx_truncated_header(tmp_path):
  path = tmp_path / "short"
  path.write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 6)
  with pytest.raises(ValueError, match="short: truncated header, expected 16 "
                                       "bytes, found 10"):
    data.read_idx(path)
  gz = tmp_path / "empty.gz"
  gz.write_bytes(gzip.compress(b""))
  with pytest.raises(ValueError, match="found an empty file"):
    data.read_idx(gz)


def test_tfds_images_of_the_wrong_shape_are_rejected(monkeypatch):
  class Builder:
    data_dir, version = "nowhere", "0"

    def is_prepared(self):
      return True

  rgb = [{"image": np.zeros((28, 28, 3), np.uint8), "label": 1}] * 2
  monkeypatch.setattr(tfds_source, "_tfds_builder", lambda name, d: Builder())
  monkeypatch.setattr(data.tfds, "data_source", lambda *a, **k: rgb)
  with pytest.raises(ValueError, match=r"TFDS mnist train: expected images "
                                       r"\[N, 28, 28, 1\], got \(2, 28, 28, "
                                       r"3\)"):
    data.load_tfds("mnist")


def test_task_and_model_builders_reject_bad_arguments():
  with pytest.raises(ValueError, match="angles must be distinct"):
    tasks_lib.rotated_tasks(_dataset(), 2, 0, angles=[10.0, 10.0])
  with pytest.raises(ValueError, match="model must be one of"):
    models.make_model("resnet", 10, seed=0)

  class WithStats(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones(2))
      self.count = nnx.BatchStat(jnp.zeros(()))

  with pytest.raises(ValueError, match="only state is nnx.Param"):
    models.split_model(WithStats())
  tasks = list(_stream().tasks)
  tasks[1] = tasks[1]._replace(num_classes=2, classes=(0, 1))
  with pytest.raises(ValueError, match=r"tasks disagree on num_classes: "
                                       r"\[2, 10\]"):
    stream_lib.num_outputs(tasks)
  with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
    methods.make_optimizer(("lion", 1e-3), "separate")
