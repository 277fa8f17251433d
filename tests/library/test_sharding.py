"""Multi-device checks, on 4 simulated CPU devices in a subprocess.

XLA_FLAGS must be set before jax is imported, so the checks live in
tests/library/sharded_check.py and run in a fresh interpreter.
"""

import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Simulated devices in subprocesses: CI's own step (the main suite deselects).
pytestmark = pytest.mark.multidevice


def _check_lines(script, devices):
  """The stdout lines of ``script`` run on ``devices`` simulated devices."""
  env = dict(os.environ, PYTHONPATH=str(ROOT),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "library" /
                                             script)],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout.splitlines()


def test_sharded_fisher_and_train_step_match_single_device():
  lines = _check_lines("sharded_check.py", 4)
  assert sum(line.startswith("ok fisher ") and "sharded == single" in line
             for line in lines) == 5
  for check in ("ok fisher sharded: one program", "ok empirical_fisher",
                "ok train step"):
    assert any(line.startswith(check) for line in lines), check


def test_sequence_fisher_and_pull_on_8_devices_with_sharded_params():
  lines = _check_lines("sequence_sharded_check.py", 8)
  assert sum("sharded (FSDP + TP) == single" in line for line in lines) == 3
  for check in ("ok sequence fisher stream", "ok sequence ewc"):
    assert any(line.startswith(check) for line in lines), check


def test_two_processes_on_loopback_share_the_fisher_and_the_pull():
  with socket.socket() as sock:  # a free port on loopback
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  script = str(ROOT / "tests" / "library" / "multihost_check.py")
  procs = [subprocess.Popen([sys.executable, script, str(i), "2", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env) for i in range(2)]
  outs = []
  for proc in procs:
    try:
      outs.append(proc.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
  for i, (proc, out) in enumerate(zip(procs, outs)):
    assert proc.returncode == 0, out
    assert f"ok process {i}" in out
    assert "process-local sequences == one process" in out
