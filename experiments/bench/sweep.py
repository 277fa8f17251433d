r"""Benchmark: a lambda sweep trained as ONE vmapped program against K runs.

A sweep's members (one per ``(lam, seed)``) differ only in values: the
initial parameters, the PRNG keys, and ``lam``, which lives in the optimiser
state; :func:`experiments.permuted_mnist.loop.run_sweep` stacks them and
vmaps the one training loop over them (the data is shared). Every member
reproduces its separate run to float32 rounding: the same initialisation,
the same key derivation, the same jitted chunk (vmapped), the same Fisher
and ``ewc_jax.consolidate`` (vmapped). Batched matrix products round
differently from single ones, and training amplifies that over thousands of
Adam steps as it amplifies a one-ulp change of the initial parameters
(numbers in docs/scaling.md): short runs give equal accuracies, long ones
agree as two such runs do.

Examples:
  python -m experiments.bench.sweep --bench        # K = 8 vmapped vs 8 runs
  python -m experiments.bench.sweep --bench --out runs/sweep_bench.json

Sweeps themselves run from the experiment: ``python -m
experiments.permuted_mnist --lam 1,10,100,1000 --vmap``.
"""

import argparse
import json
import logging
import pathlib
import platform
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
import tyro

from experiments import data as data_lib
from experiments.common import cli
from experiments.common import files
from experiments.common import metrics as metrics_lib
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import experiment
from experiments.permuted_mnist import loop
from experiments.permuted_mnist import main as main_lib

logger = logging.getLogger(__name__)

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
          log=logger.info) -> dict[str, Any]:
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
  stream = experiment.make_stream(config, dataset, seed)
  rounds = []
  for r in range(repeats):
    start = time.perf_counter()
    separate = [loop.run_method(config, stream, method, seed, lam,
                                progress=False) for lam in lams]
    sequential_s = time.perf_counter() - start
    start = time.perf_counter()
    vmapped = loop.run_sweep(config, stream, method, lams, (seed,),
                             progress=False).results
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
              "separate runs, one process",
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
  """``python -m experiments.bench.sweep --bench``: the sweep benchmark."""
  p = argparse.ArgumentParser(
      prog="python -m experiments.bench.sweep", description=__doc__,
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
                 "--set hidden=32 (see experiments/permuted_mnist/config.py)")
  args = p.parse_args(argv)
  if not args.bench:
    p.error("nothing to do: pass --bench (sweeps run from "
            "experiments.permuted_mnist).")
  if args.repeats < 1:
    p.error(f"--repeats must be >= 1, got {args.repeats}.")
  try:
    config = config_lib.validate(tyro.cli(
        config_lib.Config, default=bench_config(args.smoke),
        args=main_lib.set_to_flags(args.set)))
  except ValueError as e:
    p.error(str(e))
  with cli.logging_to_stdout():
    result = bench(config, repeats=args.repeats)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  files.write_atomic(out, json.dumps(result, indent=2) + "\n")
  print(f"speedup {result['rounds'][-1]['speedup']:.2f}x; wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
