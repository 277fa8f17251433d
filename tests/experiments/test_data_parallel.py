"""The runner's data parallelism, on 4 simulated CPU devices in a subprocess.

XLA_FLAGS must be set before jax is imported, so the check lives in
tests/experiments/data_parallel_check.py and runs in a fresh interpreter.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Simulated devices in subprocesses: CI's own step (the main suite deselects).
pytestmark = pytest.mark.multidevice


def test_runner_data_parallel_matches_one_device(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT),
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "experiments" /
                                             "data_parallel_check.py"),
                         str(tmp_path)],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "ok runner: data parallel" in proc.stdout
