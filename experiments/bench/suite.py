"""Benchmarks: Fisher throughput, memory, train-step overhead, presets.

Every number that is compared is a ratio measured in this one process on this
one machine (shared machines are noisy; absolute numbers are reported but
only ratios are targets):

* Fisher throughput per estimator and path, against a batched gradient pass
  (the gradient of the mean loss) over the same data, as one jitted
  ``lax.scan`` over chunks of 1,000 (``ratio``) and as a Python loop of
  jitted chunks of ``batch_size`` (``ratio_loop``, the older baseline), on
  the MLP 784-1000-1000-10 (about 1.8M parameters), a CNN and an RNN (its
  scan one layer of the fast path);
* the compiled temporary memory of a whole Fisher pass against
  ``batch_size``, and the peak resident memory of whole Fisher passes over
  4x more streamed data (subprocesses);
* the train step with ``chain(ewc, adam)`` against plain ``adam``;
* a language model's sampled sequence Fisher against its Adam step, in
  tokens per second (:mod:`.sequence`);
* the end-to-end time of experiment presets (subprocesses).

Usage:
  python -m experiments.bench                    # all but the slow presets
  python -m experiments.bench --presets quick,vandeven2019 --out bench.json
  python -m experiments.bench --device-check --data-dir DIR --out-dir OUT
"""

import argparse
import os
import pathlib
import subprocess
import sys

import jax

import ewc_jax
from experiments.bench import common
from experiments.bench import sequence


def _batch_size(args):
  return None if args.batch_size in (None, 0) else args.batch_size


def fisher_rows(name, make, path, estimators, n, args):
  """Fisher throughput of one model and path against both baselines."""
  apply_fn, params = make()
  x, y = common.data(n)
  run, covered = common.gradient_scan(apply_fn, params, x, y)
  scan_s = common.best_time(run, args.reps) * n / covered
  loop_s = common.best_time(
      common.gradient_loop(apply_fn, params, x, y, args.batch_size or 256),
      args.reps)
  used = path if path != "auto" else common.path_used(apply_fn, params, x)
  rows = []
  wanted = args.estimators.split(",")
  for est in [e for e in estimators if e in wanted]:
    s = common.best_time(lambda est=est: ewc_jax.fisher_diagonal(
        apply_fn, params, (x, y), estimator=est, rng=jax.random.key(0),
        batch_size=_batch_size(args), path=path), args.reps)
    row = dict(model=name, path="-" if est == "batched" else used,
               estimator=est, examples=n, fisher_ex_per_s=n / s,
               grad_ex_per_s=n / scan_s, ratio=scan_s / s,
               ratio_loop=loop_s / s)
    rows.append(row)
    print(f"  fisher {name:9s} {row['path']:4s} {est:9s} {n / s:9.0f} ex/s"
          f"  grad {n / scan_s:9.0f} ex/s  ratio {scan_s / s:5.2f}"
          f"  (loop baseline {loop_s / s:5.2f})", flush=True)
  return rows


def bench_fisher(args):
  mlp = lambda: common.mlp(args.hidden)  # noqa: E731
  per_example = ("exact", "sampled", "empirical", "predicted")
  cases = [("mlp", mlp, "fast", per_example, args.fast_examples),
           ("mlp", mlp, "vmap", ("exact", "sampled", "empirical"),
            args.vmap_examples),
           ("mlp", mlp, "auto", ("batched",), args.fast_examples),
           ("cnn", common.cnn, "auto", ("exact", "empirical"),
            args.vmap_examples),
           ("recurrent", common.recurrent, "auto", ("exact", "empirical"),
            args.vmap_examples)]
  rows = []
  for name, make, path, estimators, n in cases:
    rows += fisher_rows(name, make, path, estimators, n, args)
  return rows


def bench_memory(args):
  """Compiled temporaries of a whole Fisher pass against batch_size."""
  apply_fn, params = common.mlp(args.hidden)
  rows = []
  x, y = common.data(256)
  for path in ("vmap", "fast"):
    for bs in (16, 64, 256):
      fn = jax.jit(lambda p, x, y, bs=bs, path=path: ewc_jax.fisher_diagonal(
          apply_fn, p, (x, y), estimator="empirical", batch_size=bs,
          path=path))
      mem = fn.lower(params, x, y).compile().memory_analysis()
      temp = getattr(mem, "temp_size_in_bytes", None)
      rows.append(dict(path=path, batch_size=bs, temp_bytes=temp))
      print(f"  memory {path:4s} batch_size {bs:4d}: "
            f"{(temp or 0) / 2**20:8.1f} MiB temporaries per pass",
            flush=True)
  streamed = (args.rss_examples, 4 * args.rss_examples)
  for n in streamed if args.rss_examples > 0 else ():
    code = (
        "import resource, numpy as np, jax, ewc_jax\n"
        "from experiments.bench import common\n"
        f"f, p = common.mlp({args.hidden})\n"
        f"n = {n}\n"
        "batches = ((np.random.default_rng(s).random((256, 784), np.float32),"
        " np.zeros(256, np.int32)) for s in range(n // 256))\n"
        "jax.block_until_ready(ewc_jax.fisher_diagonal(f, p, batches, "
        "estimator='empirical', path='vmap', batch_size=64))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True)
    rss = int(out.stdout.strip().splitlines()[-1]) * 1024
    rows.append(dict(path="vmap", streamed_examples=n, peak_rss_bytes=rss))
    print(f"  memory vmap streamed {n:6d} examples: peak RSS "
          f"{rss / 2**20:8.1f} MiB", flush=True)
  return rows


def bench_train_step(args):
  rows = common.train_step_ratio(*common.mlp(args.hidden), args.steps,
                                 args.reps)
  print(f"  train step adam {rows[0]['ms_per_step']:.2f} ms, ewc+adam "
        f"{rows[1]['ms_per_step']:.2f} ms, ratio "
        f"{rows[1]['ratio_to_adam']:.3f}", flush=True)
  return rows


def bench_presets(args):
  rows = []
  for preset in [p for p in args.presets.split(",") if p]:
    seconds, ok, tail = common.time_run(["--preset", preset])
    rows.append(dict(preset=preset, seconds=seconds, ok=ok, tail=tail))
    print(f"  preset {preset}: {seconds:.1f} s ({'ok' if ok else 'FAILED'})",
          flush=True)
  return rows


PARTS = ("fisher", "memory", "train", "sequence", "presets")


def _count(minimum):
  """An argparse type: an int >= ``minimum``."""
  def parse(text):
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"not an int: {text!r}") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value
  return parse


def bench_sequence(args):
  """A language model's sampled sequence Fisher against its Adam step."""
  kw = (dict(vocab=64, width=32, layers=2, heads=2, sequences=4, length=8)
        if args.seq_smoke else {})
  rows = sequence.sequence_fisher_ratio(reps=args.reps, **kw)
  for r in rows:
    print(f"  {r['what']:36s} {r['tokens_per_s']:9.0f} tokens/s, "
          f"{r['ratio_to_train']:.2f}x the train step", flush=True)
  return rows


def parser():
  p = argparse.ArgumentParser(
      prog="python -m experiments.bench",
      description=__doc__.splitlines()[0])
  p.add_argument("--out", default="bench_results.json")
  p.add_argument("--batch-size", type=_count(0), default=None,
                 help="Fisher chunk size (default, or 0: the library's "
                 "automatic)")
  p.add_argument("--fast-examples", type=_count(1), default=8192)
  p.add_argument("--vmap-examples", type=_count(1), default=1024)
  p.add_argument("--rss-examples", type=_count(0), default=2048,
                 help="streamed examples of the peak-RSS subprocesses (and "
                 "4x more); 0 skips them")
  p.add_argument("--estimators", default=",".join(ewc_jax.ESTIMATORS),
                 help="comma-separated Fisher estimators to time")
  p.add_argument("--steps", type=_count(1), default=200)
  p.add_argument("--reps", type=_count(1), default=3)
  p.add_argument("--presets", default="quick",
                 help="comma-separated presets to time end to end")
  p.add_argument("--only", default=",".join(PARTS),
                 help=f"comma-separated parts to run, from {', '.join(PARTS)}")
  p.add_argument("--hidden", type=_count(1), default=common.HIDDEN,
                 help="MLP width (784-H-H-10)")
  p.add_argument("--device-check", action="store_true",
                 help="run the short accelerator check instead (see "
                 "experiments/bench/device_check.py)")
  p.add_argument("--data-dir", help="IDX directory for --device-check")
  p.add_argument("--out-dir", default="bench_device",
                 help="--device-check's output directory")
  p.add_argument("--methods", default="finetune,ewc,online_ewc,si,joint",
                 help="--device-check: vandeven2019 methods to time")
  p.add_argument("--smoke", action="store_true",
                 help="--device-check on a tiny model and data (tests)")
  p.add_argument("--seq-smoke", action="store_true",
                 help="the sequence part on a tiny model (tests)")
  return p


def _check(args) -> None:
  """Refuses, before any timing, what would fail or be lost later.

  Raises:
    ValueError: one line naming the flag.
  """
  from experiments.permuted_mnist import config as config_lib  # noqa: PLC0415
  words = lambda text: [w for w in text.split(",") if w]  # noqa: E731
  for flag, given, valid in (
      ("--estimators", args.estimators, ewc_jax.ESTIMATORS),
      ("--only", args.only, PARTS)):
    unknown = set(words(given)) - set(valid)
    if unknown or not words(given):
      raise ValueError(
          f"{flag}: {f'unknown {sorted(unknown)}' if unknown else 'empty'};"
          f" choose from {', '.join(valid)}")
  unknown = set(words(args.presets)) - set(config_lib.presets())
  if unknown:
    raise ValueError(f"--presets: unknown {sorted(unknown)}; choose from "
                     f"{', '.join(config_lib.presets())}")
  unknown = set(words(args.methods)) - set(config_lib.METHODS)
  if unknown:
    raise ValueError(f"--methods: unknown {sorted(unknown)}; choose from "
                     f"{', '.join(config_lib.METHODS)}")
  if args.device_check:
    if args.data_dir is not None and not pathlib.Path(
        args.data_dir).is_dir():
      raise ValueError(f"--data-dir {args.data_dir} is not a directory; "
                       "pass the directory that holds the IDX train files")
    out = pathlib.Path(args.out_dir)
  else:
    out = pathlib.Path(args.out).parent
  while not out.exists() and out != out.parent:
    out = out.parent
  if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
    raise ValueError(f"cannot write the results: {out} is not a writable "
                     "directory; choose another "
                     f"{'--out-dir' if args.device_check else '--out'}")
  if not args.device_check and pathlib.Path(args.out).is_dir():
    raise ValueError(f"--out {args.out} is a directory; name a file")


def main(argv=None):
  args = parser().parse_args(argv)
  try:
    _check(args)
  except ValueError as e:  # DataError too
    parser().error(" ".join(str(e).split()))
  if args.device_check:
    from experiments.bench import device_check  # noqa: PLC0415
    return device_check.run(args)
  parts = args.only.split(",")
  results = dict(environment=common.environment(), args=vars(args))
  print("environment:", results["environment"], flush=True)
  for part, fn in (("fisher", bench_fisher), ("memory", bench_memory),
                   ("train", bench_train_step), ("sequence", bench_sequence),
                   ("presets", bench_presets)):
    if part in parts:
      results[part] = fn(args)
      common.write_json(args.out, results)
  print("\nsummary (ratios measured in this process):")
  for r in results.get("fisher", []):
    print(f"  {r['model']:9s} {r['path']:4s} {r['estimator']:9s} "
          f"{r['ratio']:5.2f}x batched-gradient scan "
          f"({r['ratio_loop']:5.2f}x loop)")
  for r in results.get("train", [])[1:]:
    print(f"  train step ewc+adam / adam: {r['ratio_to_adam']:.3f}")
  for r in results.get("sequence", [])[1:]:
    print(f"  {r['what']} / train step (tokens/s): "
          f"{r['ratio_to_train']:.2f}")
  for r in results.get("presets", []):
    print(f"  preset {r['preset']}: " + (f"{r['seconds']:.1f} s" if r["ok"]
                                         else "FAILED (see its tail in "
                                         f"{args.out})"))
  print(f"results written to {args.out}")
  return results
