"""Hostile probes of the runner, second pass (issue 22), and its first-hour
command line (issue 21): never lost, never a traceback, quiet when asked.

Each test is one probe that failed before its fix. The subprocess ones
(SIGKILL, a file size limit) run the tiny synthetic setup of
``tests/experiments/tiny.py`` in a few seconds.
"""

import io
import json
import logging
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import data
from experiments.common import progress as progress_lib
from experiments.common import tracking
from experiments.permuted_mnist import experiment
from experiments.permuted_mnist import loop
from experiments.permuted_mnist import main as permuted_mnist
from experiments.permuted_mnist import results as results_lib
from experiments.permuted_mnist import workdir as workdir_lib
from tests.experiments import test_data
from tests.experiments import tiny

REPO = pathlib.Path(__file__).resolve().parents[2]
# 2 tasks of 6 steps (200 training examples, batch 32).
FLAGS = ["--dataset", "synthetic", "--num-tasks", "2", "--epochs", "1",
         "--hidden", "8", "--batch-size", "32", "--train-examples", "200",
         "--set", "eval_batch_size=100", "--seeds", "0", "--methods", "ewc",
         "--no-progress", "--quiet"]


def _python(*args, **kwargs):
  return subprocess.run([sys.executable, *args], cwd=REPO, text=True,
                        capture_output=True, timeout=300, **kwargs)


def _no_traceback_one_line(err):
  assert "Traceback" not in err and "Logging error" not in err, err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  return lines[0]


# ----------------------------------------------------------------------------
# Never lost.


@pytest.mark.slow  # an end-to-end run: CI's own step
def test_killed_overwrite_keeps_the_old_results_and_the_curve_is_whole(
    tmp_path):
  out, logdir = tmp_path / "run", tmp_path / "tb"
  _fake_run(out, True, "old")  # a finished run's files
  (out / "R_ewc.csv").write_text("after_task,task_0\n0,0.5\n")
  old = {p.name: p.read_bytes() for p in out.iterdir()}
  new = [*FLAGS, "--lam", "20", "--checkpoint-every", "2"]
  # --overwrite with another lambda and live metrics, SIGKILLed after 8 of
  # its 12 steps (checkpoints every 2 steps).
  killed = _python("-m", "tests.experiments.crash_entry", "8", *new,
                   "--out", str(out), "--overwrite", "--logdir", str(logdir))
  assert killed.returncode == -9, killed.stderr
  kept = out / workdir_lib.PREVIOUS
  assert {n: (kept / n).read_bytes() for n in old} == old  # byte for byte
  assert not (out / "runs.json").exists()
  # Resumed: complete, the old files gone, the new ones in place.
  assert permuted_mnist.main(["--resume", str(out), "--logdir",
                              str(logdir)]) == 0
  assert not kept.exists()
  (row,) = json.loads((out / "runs.json").read_text())
  assert row["lam"] == 20.0
  # The same run uninterrupted: the same R and the same TensorBoard curves
  # (no point of the killed attempt lost: each was flushed before the
  # checkpoint that the resumed run starts from).
  assert permuted_mnist.main([*new, "--out", str(tmp_path / "fresh"),
                              "--logdir", str(tmp_path / "tb_fresh")]) == 0
  (fresh,) = json.loads((tmp_path / "fresh" / "runs.json").read_text())
  np.testing.assert_array_equal(row["R"], fresh["R"])
  name = "ewc-lam20.0-seed0"
  got = tracking.read_scalars(logdir / name)
  want = tracking.read_scalars(tmp_path / "tb_fresh" / name)
  assert got.keys() == want.keys()
  for tag in want:
    assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
    np.testing.assert_array_equal([v for _, v in got[tag]],
                                  [v for _, v in want[tag]])
  assert [s for s, _ in got["train/loss"]] == [2, 4, 6, 8, 10, 12]


def _fake_run(directory, complete, tag):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(
      {"config": {"tag": tag}, "dataset": {}}))
  (directory / "summary.json").write_text(json.dumps({"complete": complete}))
  (directory / "runs.json").write_text(json.dumps([tag]))


@pytest.mark.slow  # an end-to-end run: CI's own step
def test_overwrite_keeps_the_last_complete_run_whatever_was_killed(tmp_path):
  _fake_run(tmp_path, True, "old")
  workdir_lib.prepare_workdir(tmp_path, overwrite=True)
  previous = tmp_path / workdir_lib.PREVIOUS
  assert json.loads((previous / "runs.json").read_text()) == ["old"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]
  # The overwrite was killed midway: its incomplete run is discarded by the
  # next overwrite, the complete one stays.
  _fake_run(tmp_path, False, "killed")
  workdir_lib.prepare_workdir(tmp_path, overwrite=True)
  assert json.loads((previous / "runs.json").read_text()) == ["old"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]
  # A move into previous/ killed halfway is finished, nothing dropped.
  _fake_run(tmp_path, True, "newer")
  staging = tmp_path / ".previous.tmp"
  staging.mkdir()
  (tmp_path / "runs.json").rename(staging / "runs.json")
  workdir_lib.prepare_workdir(tmp_path, overwrite=True)
  assert sorted(p.name for p in previous.iterdir()) == [
      "config.json", "runs.json", "summary.json"]
  assert json.loads((previous / "runs.json").read_text()) == ["newer"]
  assert workdir_lib.drop_previous(tmp_path) and not previous.exists()


def test_overwrite_refuses_a_directory_that_never_held_a_run(tmp_path,
                                                              capsys):
  mine = tmp_path / "R_ewc.csv"
  mine.write_text("my own numbers")
  with pytest.raises(SystemExit) as exit_info:
    permuted_mnist.main([*FLAGS, "--out", str(tmp_path), "--overwrite"])
  assert exit_info.value.code == 2
  line = _no_traceback_one_line(capsys.readouterr().err)
  assert "never held a run" in line and "R_ewc.csv" in line
  assert mine.read_text() == "my own numbers"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["R_ewc.csv"]


# ----------------------------------------------------------------------------
# One line, never a traceback.


@pytest.mark.slow  # an end-to-end run: CI's own step
def test_a_full_disk_is_one_line_without_orbax_tracebacks(tmp_path):
  # ulimit -f 40 (KiB): a checkpoint's data file is larger.
  command = [sys.executable, "-m", "experiments.permuted_mnist", *FLAGS,
             "--lam", "10", "--hidden", "16", "--checkpoint-every", "3",
             "--out", str(tmp_path / "run")]
  run = subprocess.run(["bash", "-c", 'ulimit -f 40 && exec "$@"', "bash",
                        *command], cwd=REPO, text=True, capture_output=True,
                       timeout=300)
  assert run.returncode == 1
  line = _no_traceback_one_line(run.stderr)
  assert "cannot write checkpoint step" in line
  assert "(File too large [errno 27])" in line


@pytest.mark.slow  # an end-to-end run: CI's own step
def test_checkpoint_fallback_warns_in_one_line_without_tracebacks(
    tmp_path, caplog, monkeypatch):
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  config = tiny.config(hidden=(8,), epochs=1, num_tasks=2, methods=("ewc",),
                       checkpoint_every=4)

  class Crash(Exception):
    pass

  def crash(steps, done=[0]):  # noqa: B006 (a counter)
    done[0] += steps
    if done[0] >= 24:
      raise Crash

  with pytest.raises(Crash):
    loop.run_method(config, tiny.stream(num_tasks=2), "ewc", 0, 1.0,
                    checkpoint_dir=tmp_path, on_chunk=crash)
  newest = max(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
  for f in (tmp_path / str(newest) / "state").rglob("d/*"):
    f.unlink()  # every data file of the newest checkpoint
  with caplog.at_level(logging.WARNING):
    got = loop.run_method(config, tiny.stream(num_tasks=2), "ewc", 0, 1.0,
                          checkpoint_dir=tmp_path)
  (warning,) = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING]
  assert "falling back" in warning and "\n" not in warning
  assert unraisable == []  # orbax's "Event loop is closed", tens of them
  want = loop.run_method(config, tiny.stream(num_tasks=2), "ewc", 0, 1.0)
  np.testing.assert_array_equal(got.R, want.R)


def test_quiet_with_verbose_is_refused(capsys):
  with pytest.raises(SystemExit) as exit_info:
    permuted_mnist.main([*FLAGS, "--verbose"])
  assert exit_info.value.code == 2
  assert "--quiet and --verbose exclude each other" in _no_traceback_one_line(
      capsys.readouterr().err)


@pytest.mark.parametrize("labels", ["train_y", "test_y"])
def test_idx_labels_that_are_all_zero_are_refused(tmp_path, labels):
  arrays = test_data.write_idx_dir(tmp_path, compress=False)
  stem = data.IDX_FILES[labels]
  test_data.write_idx(tmp_path / stem, np.zeros_like(arrays[labels]))
  with pytest.raises(data.DataError,
                     match=rf"{stem}.*every one of the \d+ .* labels is 0: a "
                           "classifier needs at least two classes"):
    data.check_source("idx", tmp_path)


def test_a_bad_flag_value_is_one_line_naming_the_flag(capsys):
  with pytest.raises(SystemExit):
    permuted_mnist.parse(["--tasks", "split"])
  line = _no_traceback_one_line(capsys.readouterr().err)
  assert line.startswith(f"{permuted_mnist.PROG}: error: invalid choice "
                         "'split' for argument '--tasks'")


# ----------------------------------------------------------------------------
# The first hour: --quiet, a closed pipe, split tasks, --help, progress.


class _ClosedAfter(io.StringIO):
  """A stdout whose reader goes away after ``lines`` lines (``| head``)."""

  def __init__(self, lines):
    super().__init__()
    self.left = lines

  def write(self, text):
    if self.left <= 0:
      raise BrokenPipeError(32, "Broken pipe")
    self.left -= text.count("\n")
    return super().write(text)


def test_quiet_prints_the_table_alone_and_a_closed_pipe_ends_quietly(
    tmp_path, capsys, monkeypatch):
  assert permuted_mnist.main([*FLAGS, "--out", str(tmp_path / "q")]) == 0
  out, err = capsys.readouterr()
  summary = json.loads((tmp_path / "q" / "summary.json").read_text())
  assert out == results_lib.format_table(summary["methods"]) + "\n"
  assert err == ""
  monkeypatch.setattr(sys, "stdout", _ClosedAfter(1))
  flags = [f for f in FLAGS if f != "--quiet"]
  status = permuted_mnist.main([*flags, "--out", str(tmp_path / "p")])
  assert status == permuted_mnist.CLOSED_STATUS
  line = _no_traceback_one_line(capsys.readouterr().err)
  assert "standard output was closed: stopped" in line
  assert f"--resume {tmp_path / 'p'}" in line


def test_split_tasks_run_their_five_tasks_unless_told_otherwise():
  assert permuted_mnist.parse(["--tasks", "split_task"])[1].num_tasks == 5
  assert permuted_mnist.parse(["--tasks", "split_domain", "--num-tasks",
                               "3"])[1].num_tasks == 3
  with pytest.raises(ValueError, match="has at most 5 tasks"):
    permuted_mnist.parse(["--tasks", "split_task", "--num-tasks", "10"])


def test_help_lists_the_choices(capsys, monkeypatch):
  monkeypatch.setenv("COLUMNS", "200")
  with pytest.raises(SystemExit):
    permuted_mnist.parse(["--help"])
  text = capsys.readouterr().out
  for choices in ("{exact,sampled,empirical,predicted,batched}",
                  "{permuted,rotated,split_task,split_domain}",
                  "{mlp,cnn}", "{adam,sgd}", "{default,high,highest}",
                  "{None,exact,sampled,empirical,predicted}"):
    assert choices in text, choices
  assert "kfac_ewc,online_kfac_ewc" in text  # --methods


def test_one_overall_bar_counts_every_step_of_the_job(tmp_path,
                                                       monkeypatch):
  bars, real = [], progress_lib.Job

  def job(**kwargs):
    bars.append(real(**{**kwargs, "file": io.StringIO()}))
    return bars[-1]

  monkeypatch.setattr(progress_lib, "Job", job)
  config = tiny.config(methods=("finetune",), seeds=(0, 1, 2), num_tasks=2,
                       iterations=3, progress=True)
  experiment.train_and_evaluate(config, tmp_path / "a",
                                dataset=tiny.dataset())
  (bar,) = bars
  assert bar.total == bar.done == 3 * 2 * 3  # runs x tasks x steps
  text = bar._file.getvalue()
  assert "run 3/3" in text and "18/18" in text and "task 2/2" in text
