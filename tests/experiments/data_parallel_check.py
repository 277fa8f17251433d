"""The runner's data-parallel training on 4 simulated CPU devices.

Run by tests/experiments/test_data_parallel.py in a fresh interpreter
(XLA_FLAGS first).
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import logging  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments.permuted_mnist import config as config_lib  # noqa: E402
from experiments import data  # noqa: E402
from experiments.permuted_mnist import experiment  # noqa: E402
from experiments.permuted_mnist import steps  # noqa: E402

assert jax.device_count() == 4
out = sys.argv[1]
ds = data.load_synthetic(400, 100, seed=0)
base = config_lib.get_config("quick").replace(
    dataset="synthetic", num_tasks=2, epochs=1, hidden=(32,), batch_size=32,
    methods=("ewc",), lam=(10.0,), seeds=(0,), progress=False)
assert steps.data_mesh(base).size == 4
assert steps.data_mesh(base.replace(data_parallel=1)) is None
assert steps.data_mesh(base.replace(batch_size=30)).size == 3  # divides 30
logs = []
handler = logging.Handler()
handler.emit = lambda record: logs.append(record.getMessage())
logging.getLogger("experiments").addHandler(handler)
logging.getLogger("experiments").setLevel(logging.INFO)
runs = {}
for n in (1, 4):
  summary = experiment.train_and_evaluate(
      base.replace(data_parallel=n), os.path.join(out, f"dp{n}"), dataset=ds)
  runs[n] = summary["results"][0]
assert any("sharded over 4 devices" in line for line in logs), logs
np.testing.assert_allclose(runs[4].R, runs[1].R, atol=0.02)
np.testing.assert_allclose(runs[4].train_loss, runs[1].train_loss, rtol=1e-4)
print("ok runner: data parallel over 4 devices == one device")
