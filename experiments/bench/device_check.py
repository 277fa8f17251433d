"""The accelerator check of issue 10, in one command (under 4 min on a GPU).

  python -m experiments.bench --device-check --data-dir DIR --out-dir OUT

``DIR`` holds Fashion-MNIST (or MNIST) IDX files (``.gz`` or raw), e.g.
Debian's ``dataset-fashion-mnist``. Nothing beyond the project's
requirements is needed: no TensorFlow Datasets, no network. It measures, in
this one process:

* the Fisher pass at default arguments (``batch_size=None``, ``path=
  "auto"``) per estimator on the MLP 784-1000-1000-10 over the training set,
  as a ratio to one batched-gradient pass (a jitted ``lax.scan`` over chunks
  of 1,000);
* the train step ``chain(ewc, adam)`` against ``adam`` (``lax.scan`` of 200
  steps of 128);
* the wall time of ``python -m experiments.permuted_mnist --preset
  vandeven2019 --dataset idx --data-dir DIR --methods M`` per method
  (subprocesses, compilation included);

then prints one table last and writes ``OUT/device_check.json``. Without an
accelerator it says so and still runs (``--smoke``: a tiny model and data,
no presets unless ``--methods`` names some, for tests).
"""

import pathlib

import jax

import ewc_jax
from experiments.bench import common

ESTIMATORS = ("exact", "sampled", "empirical", "predicted", "batched")


def _sizes(args):
  if args.smoke:
    return dict(hidden=16, examples=512, steps=8, reps=1)
  return dict(hidden=common.HIDDEN, examples=60000, steps=200, reps=3)


def fisher_ratios(apply_fn, params, x, y, reps):
  """Default-argument Fisher passes against one batched-gradient scan."""
  run, covered = common.gradient_scan(apply_fn, params, x, y)
  grad_s = common.best_time(run, reps) * x.shape[0] / covered
  rows = []
  for est in ESTIMATORS:
    s = common.best_time(lambda est=est: ewc_jax.fisher_diagonal(
        apply_fn, params, (x, y), estimator=est, rng=jax.random.key(0)),
        reps)
    rows.append(dict(estimator=est, seconds=s, grad_seconds=grad_s,
                     ratio=grad_s / s))
    print(f"  fisher {est:9s} {s:8.4f} s  gradient scan {grad_s:8.4f} s  "
          f"ratio {grad_s / s:6.3f}", flush=True)
  return rows


def preset_times(args):
  rows = []
  methods = [m for m in args.methods.split(",") if m]
  if not methods or not args.data_dir:
    return rows
  for method in methods:
    seconds, ok, tail = common.time_run(
        ["--preset", "vandeven2019", "--dataset", "idx", "--data-dir",
         args.data_dir, "--methods", method, "--no-progress"], timeout=600)
    rows.append(dict(method=method, seconds=seconds, ok=ok, tail=tail))
    print(f"  vandeven2019 {method:10s} {seconds:7.1f} s "
          f"({'ok' if ok else 'FAILED'})", flush=True)
  return rows


def table(results) -> str:
  env = results["environment"]
  lines = [f"device check: {env['backend']} {env['devices'][0]}, jax "
           f"{env['jax']}{'' if results['accelerator'] else ' (no GPU)'}",
           "| what | value |", "| --- | ---: |"]
  for r in results["fisher"]:
    lines.append(f"| Fisher {r['estimator']} / batched-gradient scan "
                 f"({results['examples']} ex) | {r['ratio']:.3f}x "
                 f"({r['seconds']:.4f} s) |")
  t = results["train"][1]
  lines.append(f"| train step chain(ewc, adam) / adam | "
               f"{t['ratio_to_adam']:.3f}x ({t['ms_per_step']:.3f} ms) |")
  for r in results["presets"]:
    lines.append(f"| vandeven2019 --methods {r['method']} | "
                 f"{r['seconds']:.1f} s{'' if r['ok'] else ' FAILED'} |")
  if not results["presets"]:
    lines.append("| vandeven2019 per method | not run (no --data-dir or "
                 "--methods) |")
  return "\n".join(lines)


def run(args):
  """Runs the check; returns the results it wrote."""
  env = common.environment()
  accelerator = env["backend"] != "cpu"
  if not accelerator:
    print("no GPU: the backend is cpu, so these are CPU numbers.", flush=True)
  sizes = _sizes(args)
  out_dir = pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if args.data_dir:
    x, y = common.idx_train_set(args.data_dir, sizes["examples"])
  else:
    x, y = common.data(sizes["examples"])
  apply_fn, params = common.mlp(sizes["hidden"])
  results = dict(environment=env, accelerator=accelerator, sizes=sizes,
                 examples=int(x.shape[0]), data_dir=args.data_dir)
  results["fisher"] = fisher_ratios(apply_fn, params, x, y, sizes["reps"])
  results["train"] = common.train_step_ratio(apply_fn, params, sizes["steps"],
                                            sizes["reps"])
  results["presets"] = preset_times(args)
  results["table"] = table(results)
  common.write_json(out_dir / "device_check.json", results)
  print("\n" + results["table"], flush=True)
  return results
