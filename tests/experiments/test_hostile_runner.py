"""Hostile probes of the runner (issue 14): never silently wrong, never lost.

Each test is one probe: a crash, a second process, a damaged file, a full
disk, an edited config. Every one must end in the right result or in one
line on stderr (no traceback), with nothing of the user's deleted. All run
on the tiny synthetic setup of ``tests/experiments/tiny.py``.
"""

import errno
import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.common import checkpoint as checkpoint_lib
from experiments.common import files
from experiments.permuted_mnist import budget
from experiments.permuted_mnist import checkpointing
from experiments.permuted_mnist import experiment
from experiments.permuted_mnist import loop
from experiments.permuted_mnist import main as permuted_mnist
from experiments.permuted_mnist import methods
from experiments.permuted_mnist import ops
from experiments.permuted_mnist import results as results_lib
from experiments.permuted_mnist import workdir as workdir_lib
from tests.experiments import tiny

REPO = pathlib.Path(__file__).resolve().parents[2]

# The CLI on the tiny synthetic setup: 2 tasks of 1 epoch, finetune and ewc.
FLAGS = ["--dataset", "synthetic", "--num-tasks", "2", "--epochs", "1",
         "--hidden", "8", "--batch-size", "32", "--set",
         "eval_batch_size=100", "--seeds", "0", "--lam", "1",
         "--no-progress", "--quiet"]


def _config(**changes):
  return tiny.config(**{"hidden": (8,), "epochs": 1, "num_tasks": 2,
                        "learning_rate": 3e-3, "lam": (1.0,),
                        "methods": ("finetune", "ewc"), **changes})


def _run(config, workdir, **kwargs):
  return experiment.train_and_evaluate(config, workdir,
                                       dataset=tiny.dataset(), **kwargs)


class _Crash(Exception):
  pass


def _crash_after(steps):
  done = [0]

  def hook(n):
    done[0] += n
    if done[0] >= steps:
      raise _Crash

  return hook


def _one_line_error(capsys):
  err = capsys.readouterr().err
  assert "Traceback" not in err
  assert len(err.strip().splitlines()) == 1, err
  return err


# ----------------------------------------------------------------------------
# Silently wrong or lost.


def test_overwrite_crash_resume_never_reuses_the_old_runs(tmp_path, caplog):
  _run(_config(), tmp_path)
  new = _config(learning_rate=1e-2)
  # --overwrite with a new config, killed in its first run, then resumed.
  with pytest.raises(_Crash):
    _run(new, tmp_path, overwrite=True, on_chunk=_crash_after(20))
  with caplog.at_level(logging.INFO):
    resumed = _run(new, tmp_path, resume=True)
  assert "finished earlier" not in caplog.text
  fresh = _run(new, tmp_path / "fresh")
  for a, b in zip(resumed["results"], fresh["results"], strict=True):
    np.testing.assert_array_equal(a.R, b.R)
  row = json.loads((tmp_path / "runs.json").read_text())[0]
  assert row["config_sha256"] == results_lib.run_digest(
      new, workdir_lib.dataset_info(tiny.dataset()))
  assert row["config"]["learning_rate"] == 1e-2


def test_config_json_edited_between_runs_is_refused_by_name(tmp_path, capsys):
  out = tmp_path / "run"
  with pytest.raises(_Crash):  # finetune finishes, ewc is killed
    permuted_mnist.main([*FLAGS, "--methods", "finetune,ewc", "--out",
                         str(out)], on_chunk=_crash_after(120))
  header = json.loads((out / "config.json").read_text())
  header["config"]["learning_rate"] = 0.01
  (out / "config.json").write_text(json.dumps(header))
  assert permuted_mnist.main(["--resume", str(out)]) == 1
  err = _one_line_error(capsys)
  assert "finetune lam=0.0 seed=0 run of another config (learning_rate: " \
         "saved 0.001, now 0.01)" in err


def test_two_runs_in_the_same_second_get_their_own_directories(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = _config()
  a, b = workdir_lib.default_workdir(config), workdir_lib.default_workdir(
      config)
  assert a != b and a.is_dir() and b.is_dir()
  assert str(os.getpid()) in a.name


@pytest.mark.slow  # an end-to-end run: CI's own step
def test_a_second_process_on_one_run_directory_is_refused(tmp_path, capsys):
  out = tmp_path / "run"
  out.mkdir()
  with workdir_lib.locked(out):  # another process's run, still going
    status = permuted_mnist.main([*FLAGS, "--out", str(out)])
    assert status == 1
    assert "is in use by another process" in _one_line_error(capsys)
    assert [p.name for p in out.iterdir()] == [workdir_lib.LOCK]
  assert permuted_mnist.main([*FLAGS, "--out", str(out)]) == 0
  with workdir_lib.locked(out):  # resuming is refused too
    assert permuted_mnist.main(["--resume", str(out)]) == 1
    assert "in use" in _one_line_error(capsys)


def test_overwrite_never_deletes_a_users_files(tmp_path, capsys):
  _run(_config(methods=("finetune",)), tmp_path)
  mine = tmp_path / "checkpoints" / "model.pt"
  mine.parent.mkdir()
  mine.write_text("precious")
  with pytest.raises(SystemExit) as exit_info:
    permuted_mnist.main([*FLAGS, "--out", str(tmp_path), "--overwrite"])
  assert exit_info.value.code == 2
  assert "checkpoints/model.pt" in _one_line_error(capsys)
  assert mine.read_text() == "precious"
  assert (tmp_path / "summary.json").exists()  # nothing else went either


def test_overwrite_leaves_one_run_in_the_directory(tmp_path):
  _run(_config(methods=("finetune", "ewc")), tmp_path)
  assert (tmp_path / "R_ewc.png").exists()
  _run(_config(methods=("finetune",)), tmp_path, overwrite=True)
  names = {p.name for p in tmp_path.iterdir()}
  assert not {"R_ewc.csv", "R_ewc.png"} & names
  assert {"R_finetune.csv", "R_finetune.png"} <= names
  rows = json.loads((tmp_path / "runs.json").read_text())
  assert [r["method"] for r in rows] == ["finetune"]


def test_a_method_named_twice_is_refused(capsys):
  with pytest.raises(ValueError, match="methods lists ewc more than once"):
    _config(methods=("ewc", "finetune", "ewc"))
  with pytest.raises(SystemExit) as exit_info:
    permuted_mnist.main([*FLAGS, "--methods", "ewc,ewc"])
  assert exit_info.value.code == 2
  assert "methods lists ewc more than once" in _one_line_error(capsys)


def test_a_blow_up_is_stopped_before_nan_keeping_the_last_checkpoint(
    tmp_path):
  # Adam at lr 1e3: the loss reaches ~1e3..1e6 within the first chunk.
  config = _config(learning_rate=1e3, checkpoint_every=5)
  with pytest.raises(loop.TrainingDiverged,
                     match=r"ewc lam=1 seed=0 task 1/2: the training loss "
                           r"diverged to .* within steps 1-5 of 16; training "
                           r"stopped before it overflows"):
    loop.run_method(config, tiny.stream(num_tasks=2), "ewc", 0, 1.0,
                    checkpoint_dir=tmp_path)
  # A vmapped SGD sweep at a huge learning rate: named members.
  with pytest.raises(loop.TrainingDiverged, match=r"member\(s\) \(lam, seed\)"):
    loop.run_sweep(_config(optimizer="sgd", learning_rate=50.0),
                   tiny.stream(num_tasks=2), "ewc", [1.0, 2.0], [0])


def test_the_blow_up_rule():
  assert not loop.blew_up(2.3, None, 10)
  assert not loop.blew_up(40.0, 2.0, 10)  # a bad start, not divergence
  assert loop.blew_up(240.0, None, 10)  # 100 x ln 10
  assert loop.blew_up(30.0, 0.2, 10)  # 100 x its start and > 10 ln 10
  assert not loop.blew_up(21.0, 0.2, 10)


# ----------------------------------------------------------------------------
# Damaged checkpoints.


def _interrupted_checkpoints(directory, steps=25):
  config = _config(checkpoint_every=5)
  with pytest.raises(_Crash):
    loop.run_method(config, tiny.stream(num_tasks=2), "ewc", 0, 1.0,
                    checkpoint_dir=directory, on_chunk=_crash_after(steps))
  store = checkpoint_lib.RunCheckpoints(directory)
  kept = store.all_steps()
  store.close()
  assert len(kept) == 2  # the previous good one is kept too
  return config, kept


@pytest.mark.parametrize("damage", ["garbage", "truncate", "delete"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(
    tmp_path, damage, caplog, capfd):
  config, kept = _interrupted_checkpoints(tmp_path)
  for f in (tmp_path / str(kept[0])).rglob("*"):
    if f.is_file():
      if damage == "garbage":
        f.write_bytes(b"garbage")
      elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
      elif "state" in f.parts:
        f.unlink()
  capfd.readouterr()
  with caplog.at_level(logging.WARNING):
    got = loop.run_method(config, tiny.stream(num_tasks=2), "ewc", 0, 1.0,
                          checkpoint_dir=tmp_path)
  assert f"checkpoint {tmp_path}/{kept[0]} is damaged" in caplog.text
  assert "falling back" in caplog.text
  assert "absl" not in capfd.readouterr().err  # no orbax noise
  want = loop.run_method(config, tiny.stream(num_tasks=2), "ewc", 0, 1.0)
  np.testing.assert_array_equal(got.R, want.R)


def test_no_good_checkpoint_left_says_how_to_restart(tmp_path):
  config, kept = _interrupted_checkpoints(tmp_path)
  for step in kept:
    for f in (tmp_path / str(step)).rglob("*"):
      if f.is_file():
        f.write_bytes(b"garbage")
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"no undamaged checkpoint of this run is left\. "
                           r"To train this run again from its start, delete"):
    loop.run_method(config, tiny.stream(num_tasks=2), "ewc", 0, 1.0,
                    checkpoint_dir=tmp_path)


def test_a_restored_nan_is_corruption_not_divergence(tmp_path, caplog):
  config, kept = _interrupted_checkpoints(tmp_path)
  store = checkpoint_lib.RunCheckpoints(tmp_path, max_to_keep=3,
                                        asynchronous=False)
  tree, meta = store.restore(_like(config))
  arrays, _ = checkpoint_lib.flatten(tree)
  first = next(k for k, x in arrays.items() if x.dtype == np.float32)
  arrays[first] = np.full_like(arrays[first], np.nan)
  store.save(kept[0] + 1, arrays, meta)  # a newest step holding nan
  store.close()
  with caplog.at_level(logging.WARNING):
    got = loop.run_method(config, tiny.stream(num_tasks=2), "ewc", 0, 1.0,
                          checkpoint_dir=tmp_path)
  assert f"checkpoint {tmp_path}/{kept[0] + 1} is corrupt" in caplog.text
  assert "holds nan or inf, which training never checkpoints" in caplog.text
  want = loop.run_method(config, tiny.stream(num_tasks=2), "ewc", 0, 1.0)
  np.testing.assert_array_equal(got.R, want.R)


def _like(config):
  _, _, state = ops.init_state(config, methods.get("ewc"), 10, [(1.0, 0)],
                               batched=False)
  return {"state": state, "key": jax.random.key_data(jax.random.key(0))}


# ----------------------------------------------------------------------------
# One clear line: disk, data, memory, Ctrl-C.


def test_out_under_a_file_is_one_line(tmp_path, capsys):
  (tmp_path / "file").write_text("")
  status = permuted_mnist.main([*FLAGS, "--out", str(tmp_path / "file" /
                                                    "sub")])
  assert status == 1
  assert "cannot write the run's files in" in _one_line_error(capsys)


def test_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
  def full(path, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

  monkeypatch.setattr(files, "write_atomic", full)
  status = permuted_mnist.main([*FLAGS, "--out", str(tmp_path / "run")])
  assert status == 1
  assert "No space left on device" in _one_line_error(capsys)


@pytest.mark.parametrize("flags, match", [
    (["--dataset", "idx", "--data-dir", "NOWHERE"], "NOWHERE"),
    (["--dataset", "idx"], "data"),
])
def test_data_errors_come_before_a_run_directory(tmp_path, monkeypatch,
                                                 capsys, flags, match):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    permuted_mnist.main([*FLAGS, *flags])  # the default run directory
  assert exit_info.value.code == 2
  assert match in _one_line_error(capsys)
  with pytest.raises(SystemExit):
    permuted_mnist.main([*FLAGS, *flags, "--out", "run"])
  _one_line_error(capsys)
  assert list(tmp_path.iterdir()) == []  # no runs/, no run


def test_changed_data_on_resume_is_one_line(tmp_path, capsys):
  out = tmp_path / "run"
  assert permuted_mnist.main([*FLAGS, "--methods", "finetune", "--out",
                              str(out)]) == 0
  header = json.loads((out / "config.json").read_text())
  header["dataset"]["sha256"] = "0" * 64
  (out / "config.json").write_text(json.dumps(header))
  assert permuted_mnist.main(["--resume", str(out)]) == 1
  assert "the data differ from the run's (sha256" in _one_line_error(capsys)


def test_a_run_too_big_for_memory_is_refused_up_front(tmp_path, capsys):
  config = _config(num_tasks=1_000_000)
  need = budget.estimate_bytes(config, tiny.dataset())
  assert need["data"] == 4 * 1_000_000 * 800 * 784
  out = tmp_path / "run"
  assert permuted_mnist.main([*FLAGS, "--num-tasks", "1000000", "--out",
                              str(out)]) == 1
  assert "this run needs about" in _one_line_error(capsys)
  assert not out.exists()


def test_a_failed_run_leaves_no_empty_default_directory(
    tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert permuted_mnist.main([*FLAGS, "--num-tasks", "1000000"]) == 1
  _one_line_error(capsys)
  assert list((tmp_path / "runs").iterdir()) == []


def test_ctrl_c_says_how_to_resume(tmp_path, capsys):
  out = tmp_path / "run"

  def interrupt(n):
    raise KeyboardInterrupt

  status = permuted_mnist.main([*FLAGS, "--methods", "ewc", "--out",
                                str(out), "--checkpoint-every", "5"],
                               on_chunk=interrupt)
  assert status == 130
  err = _one_line_error(capsys)
  assert f"--resume {out}" in err
  assert permuted_mnist.main(["--resume", str(out)]) == 0


# ----------------------------------------------------------------------------
# Files, one task, matmul precision.


def test_atomic_writes_are_synced_to_disk(tmp_path, monkeypatch):
  synced = []
  real = os.fsync
  monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(
      os.path.isdir(f"/proc/self/fd/{fd}")), real(fd))[1])
  files.write_json(tmp_path / "a.json", {"x": 1})
  assert synced == [False, True]  # the file, then its directory
  assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_one_task_reports_bwt_and_fwt_as_not_available(tmp_path):
  summary = _run(_config(num_tasks=1, methods=("finetune",)), tmp_path)
  row = summary["methods"][0]
  assert row["bwt_mean"] is None and row["fwt_mean"] is None
  assert row["forgetting_mean"] is None
  saved = json.loads((tmp_path / "summary.json").read_text())["methods"][0]
  assert saved["bwt_mean"] is None and saved["fwt_mean"] is None
  table = results_lib.format_table(summary["methods"])
  assert table.splitlines()[2].split()[3:6] == ["n/a", "n/a", "n/a"]


def test_matmul_precision_highest_leaves_cpu_results_unchanged(tmp_path):
  with pytest.raises(ValueError, match="matmul_precision must be one of"):
    _config(matmul_precision="fast")
  config = _config(methods=("ewc",))
  default = _run(config, tmp_path / "a")
  highest = _run(config.replace(matmul_precision="highest"), tmp_path / "b")
  np.testing.assert_array_equal(default["results"][0].R,
                                highest["results"][0].R)


@pytest.mark.slow  # an end-to-end run: CI's own step
def test_two_processes_on_one_out(tmp_path):
  # Started together: one runs to the end, the other is refused in one line
  # (the lock, or "not empty" if the first has written already).
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = tmp_path / "run"
  args = [sys.executable, "-m", "experiments.permuted_mnist", *FLAGS,
          "--methods", "finetune", "--out", str(out)]
  procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  try:
    ends = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  codes = sorted(p.returncode for p in procs)
  assert codes[0] == 0 and codes[1] in (1, 2), ends
  err = next(e for p, (_, e) in zip(procs, ends) if p.returncode)
  assert "Traceback" not in err
  assert re.search(r"is in use by another process|is not empty", err), err
  rows = json.loads((out / "runs.json").read_text())
  assert [r["method"] for r in rows] == ["finetune"]


def test_a_checkpoint_write_that_fails_in_orbax_is_one_line(
    tmp_path, monkeypatch, capsys):
  def full(self, *args, **kwargs):
    raise ValueError("RESOURCE_EXHAUSTED: No space left on device\n" * 50)

  monkeypatch.setattr(checkpoint_lib.ocp.CheckpointManager, "save", full)
  status = permuted_mnist.main([*FLAGS, "--methods", "ewc", "--out",
                                str(tmp_path / "run")])
  assert status == 1
  err = _one_line_error(capsys)
  assert "cannot write checkpoint step" in err
  assert "(No space left on device [errno 28])" in err  # the OS's words


def test_the_cli_stops_a_blow_up_in_one_line(tmp_path, capsys):
  assert permuted_mnist.main([*FLAGS, "--methods", "ewc", "--lr", "1000",
                              "--out", str(tmp_path / "adam")]) == 1
  err = _one_line_error(capsys)
  assert "the training loss diverged to" in err
  assert "No run has finished; this run had no checkpoint yet." in err
  assert permuted_mnist.main([*FLAGS, "--methods", "ewc", "--lam", "1,2",
                              "--optimizer", "sgd", "--lr", "50", "--vmap",
                              "--out", str(tmp_path / "vmap")]) == 1
  assert "member(s) (lam, seed)" in _one_line_error(capsys)


# ----------------------------------------------------------------------------
# The fresh hostile pass (issue 14): flags that were silently ignored or
# overridden, Ctrl-C outside a run, files that fail only at the end.


_NO_LAM = FLAGS[:FLAGS.index("--lam")] + FLAGS[FLAGS.index("--lam") + 2:]


def test_lam_takes_spaces_like_every_list_flag():
  _, config = permuted_mnist.parse([*_NO_LAM, "--methods", "ewc", "--lam",
                                    "1", "10"])  # before: "Unrecognized"
  assert config.lam == (1.0, 10.0)
  _, config = permuted_mnist.parse([*_NO_LAM, "--methods", "ewc,si",
                                    "--lam", "ewc=1", "2", "si=3"])
  assert (config.lam, config.si_c) == ((1.0, 2.0), (3.0,))


@pytest.mark.parametrize("flags,match", [
    # before: --set won whatever the order (methods became ewc)
    (["--set", "methods=ewc", "--methods", "finetune"],
     "methods is given twice, by --set methods=... and by --methods"),
    # before: config.json said preset "foo" while quick ran
    (["--set", "preset=foo"], "would only relabel the run"),
    # before: si_c silently replaced by --lam's list
    (["--methods", "ewc,si", "--si-c", "1"],
     r"\['si_c'\] given both by --lam"),
    # before: accepted, and si does not run
    (["--methods", "ewc", "--lam", "si=1"], "si is not among the run's"),
    # before: accepted and ignored (vmapped runs have no checkpoints)
    (["--methods", "ewc", "--vmap", "--checkpoint-every", "2"],
     "--vmap runs are not checkpointed"),
    # before: the run's files went to the current directory
    (["--methods", "ewc", "--out", ""], "--out is empty"),
])
def test_flags_that_would_be_ignored_are_refused(flags, match, tmp_path,
                                                 capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as e:
    permuted_mnist.main([*FLAGS, *flags])
  assert e.value.code == 2
  assert re.search(match, _one_line_error(capsys))
  assert list(tmp_path.iterdir()) == []


def test_a_logdir_that_is_a_file_is_refused_before_the_run(tmp_path, capsys):
  a_file = tmp_path / "tb"
  a_file.write_text("")
  with pytest.raises(SystemExit):  # before: status 1 after training began
    permuted_mnist.main([*FLAGS, "--out", str(tmp_path / "run"), "--logdir",
                         str(a_file / "sub")])
  assert "is a file, not a directory" in _one_line_error(capsys)
  assert not (tmp_path / "run").exists()


_FAKE_MAIN = """
import gc, os, signal, sys, time
def main():
  fired = []
  def callback(phase, info):  # Ctrl-C landing in a gc callback
    if phase == "start" and not fired:
      fired.append(1)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
  gc.callbacks.append(callback)
  gc.collect()
  try:
    time.sleep(5)
    return 0
  except KeyboardInterrupt:
    print("main was interrupted", file=sys.stderr)
    return 130
"""


def test_ctrl_c_in_a_gc_callback_or_while_importing_is_not_lost(tmp_path):
  (tmp_path / "fake_gc.py").write_text(_FAKE_MAIN)
  # SIGINT to itself while importing: held back, then one line.
  (tmp_path / "fake_import.py").write_text(
      "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\n"
      "time.sleep(0.05)\ndef main():\n  return 0\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO),
                                                     str(tmp_path)]))
  for module, line in (("fake_gc", "main was interrupted"),
                       ("fake_import", "prog: interrupted")):
    proc = subprocess.run(
        [sys.executable, "-c", "from experiments.common import entry; "
         f"entry.run({module!r}, 'prog')"], env=env, capture_output=True,
        text=True, timeout=60)
    # before: the gc callback swallowed the interrupt (status 0, "Exception
    # ignored"); an interrupted import printed a traceback
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == line, proc.stderr
