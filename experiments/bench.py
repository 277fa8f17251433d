"""Benchmarks: Fisher throughput, memory, train-step overhead, presets.

Every number that is compared is a ratio measured in this one process on this
one machine (shared machines are noisy; absolute numbers are reported but
only ratios are targets):

* Fisher throughput per estimator and path, against one batched gradient
  pass (the gradient of the mean loss, chunk by chunk) over the same data
  and chunk size, on the MLP 784-1000-1000-10 (about 1.8M parameters);
* the generic vmap path on a model the fast path does not know;
* the compiled per-chunk memory of the Fisher step against ``batch_size``,
  and the peak resident memory of whole Fisher passes over 4x more streamed
  data (subprocesses);
* the train step with ``chain(ewc, adam)`` against plain ``adam``;
* the end-to-end time of experiment presets (subprocesses).

Usage:
  python -m experiments.bench                    # all but the slow presets
  python -m experiments.bench --presets quick,vandeven2019 --out bench.json
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import ewc_jax
from ewc_jax._src import fisher as fisher_lib
from experiments import files


class MLP(nnx.Module):

  def __init__(self, sizes, rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


class Recurrent(nn.Module):
  """Weights used inside ``lax.scan``: unknown to the fast path."""
  hidden: int = 128

  @nn.compact
  def __call__(self, x):  # x: [batch, 784] read as 28 steps of 28 pixels
    steps = x.reshape(x.shape[0], 28, 28)
    inputs = nn.Dense(self.hidden)(steps)
    w = self.param("w", nn.initializers.orthogonal(), (self.hidden,) * 2)
    h0 = jnp.zeros((x.shape[0], self.hidden))
    h, _ = jax.lax.scan(lambda h, xt: (jnp.tanh(h @ w + xt), None), h0,
                        jnp.swapaxes(inputs, 0, 1))
    return nn.Dense(10)(h)


HIDDEN = 1000


def mlp(hidden=HIDDEN):
  model = MLP([784, hidden, hidden, 10], nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  return (lambda p, x: nnx.merge(graphdef, p)(x)), params


def recurrent():
  module = Recurrent()
  params = module.init(jax.random.key(0), jnp.ones((1, 784)))["params"]
  return (lambda p, x: module.apply({"params": p}, x)), params


def data(n, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.random((n, 784), np.float32)),
          jnp.asarray(rng.integers(0, 10, n, dtype=np.int32)))


def best_time(fn, reps):
  jax.block_until_ready(fn())  # compile and warm up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def gradient_pass(apply_fn, params, x, y, batch_size):
  """A function running one batched gradient pass over (x, y)."""

  @jax.jit
  def step(acc, p, xb, yb):
    def loss(p):
      logp = jax.nn.log_softmax(apply_fn(p, xb))
      return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], 1))
    return jax.tree.map(jnp.add, acc, jax.grad(loss)(p))

  def run():
    acc = jax.tree.map(jnp.zeros_like, params)
    for s in range(0, x.shape[0], batch_size):
      acc = step(acc, params, x[s:s + batch_size], y[s:s + batch_size])
    return acc
  return run


def bench_fisher(args):
  rows = []
  mlp_h = lambda: mlp(args.hidden)  # noqa: E731
  cases = [("mlp", mlp_h, "fast", ("exact", "sampled", "empirical"),
            args.fast_examples),
           ("mlp", mlp_h, "vmap", ("exact", "sampled", "empirical"),
            args.vmap_examples),
           ("mlp", mlp_h, "auto", ("batched",), args.fast_examples),
           ("recurrent", recurrent, "auto", ("exact", "empirical"),
            args.vmap_examples)]
  for name, make, path, estimators, n in cases:
    apply_fn, params = make()
    x, y = data(n)
    grad_s = best_time(gradient_pass(apply_fn, params, x, y, args.batch_size),
                       args.reps)
    for est in estimators:
      run = lambda: ewc_jax.fisher_diagonal(  # noqa: E731
          apply_fn, params, (x, y), estimator=est, rng=jax.random.key(0),
          batch_size=args.batch_size, path=path)
      s = best_time(run, args.reps)
      used = path if path != "auto" else fisher_lib._choose_path(
          "auto", apply_fn, params, x[:1])
      if est == "batched":
        used = "-"  # one batched gradient per chunk: no per-example path
      rows.append(dict(model=name, path=used, estimator=est, examples=n,
                       fisher_ex_per_s=n / s, grad_ex_per_s=n / grad_s,
                       ratio=grad_s / s))
      print(f"  fisher {name:9s} {used:4s} {est:9s} {n / s:9.0f} ex/s  "
            f"grad {n / grad_s:9.0f} ex/s  ratio {grad_s / s:5.2f}",
            flush=True)
  return rows


def bench_memory(args):
  """Compiled temporary memory of one Fisher chunk against batch_size."""
  apply_fn, params = mlp(args.hidden)
  rows = []
  for path in ("vmap", "fast"):
    for bs in (16, 64, 256):
      x, y = data(bs)
      lowered = fisher_lib._fisher_step.lower(
          apply_fn, "empirical", 1, path, fisher_lib._f32_zeros(params),
          params, x, y, jax.random.key(0), jnp.ones(bs))
      mem = lowered.compile().memory_analysis()
      temp = getattr(mem, "temp_size_in_bytes", None)
      rows.append(dict(path=path, batch_size=bs, temp_bytes=temp))
      print(f"  memory {path:4s} batch_size {bs:4d}: "
            f"{(temp or 0) / 2**20:8.1f} MiB temporaries per chunk",
            flush=True)
  for n in (args.rss_examples, 4 * args.rss_examples):
    code = (
        "import resource, numpy as np, jax, jax.numpy as jnp, ewc_jax\n"
        "from experiments import bench\n"
        f"f, p = bench.mlp({args.hidden})\n"
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
  apply_fn, params = mlp(args.hidden)
  x, y = data(args.steps * 128)
  xb = x.reshape(args.steps, 128, 784)
  yb = y.reshape(args.steps, 128)

  def make(opt):
    @jax.jit
    def run(params, state):
      def step(carry, batch):
        p, s = carry

        def loss(p):
          logp = jax.nn.log_softmax(apply_fn(p, batch[0]))
          return -jnp.mean(jnp.take_along_axis(logp, batch[1][:, None], 1))
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, u), s), None
      return jax.lax.scan(step, (params, state), (xb, yb))[0]
    return run

  fisher = jax.tree.map(lambda p: jnp.full(p.shape, 0.1), params)
  rows = []
  for name, opt in (("adam", optax.adam(1e-4)),
                    ("ewc+adam", optax.chain(ewc_jax.ewc(100.0),
                                             optax.adam(1e-4)))):
    state = opt.init(params)
    if name != "adam":
      state = ewc_jax.consolidate(state, params, fisher)
    run = make(opt)
    s = best_time(lambda run=run, state=state: run(params, state), args.reps)
    rows.append(dict(optimizer=name, steps=args.steps,
                     ms_per_step=1e3 * s / args.steps))
  ratio = rows[1]["ms_per_step"] / rows[0]["ms_per_step"]
  for r in rows:
    r["ratio_to_adam"] = r["ms_per_step"] / rows[0]["ms_per_step"]
  print(f"  train step adam {rows[0]['ms_per_step']:.2f} ms, ewc+adam "
        f"{rows[1]['ms_per_step']:.2f} ms, ratio {ratio:.3f}", flush=True)
  return rows


def bench_presets(args):
  rows = []
  for preset in [p for p in args.presets.split(",") if p]:
    with tempfile.TemporaryDirectory() as tmp:
      start = time.perf_counter()
      proc = subprocess.run(
          [sys.executable, "-m", "experiments.permuted_mnist", "--preset",
           preset, "--out", os.path.join(tmp, "run")],
          capture_output=True, text=True)
      seconds = time.perf_counter() - start
    rows.append(dict(preset=preset, seconds=seconds, ok=proc.returncode == 0,
                     tail=proc.stdout[-2000:] + proc.stderr[-1000:]))
    print(f"  preset {preset}: {seconds:.1f} s "
          f"({'ok' if proc.returncode == 0 else 'FAILED'})", flush=True)
  return rows


def environment():
  return dict(
      python=platform.python_version(), jax=jax.__version__,
      jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
      backend=jax.default_backend(),
      devices=[d.device_kind for d in jax.devices()],
      cpu=platform.processor() or platform.machine(), cores=os.cpu_count())


def write_json(path, obj):
  files.write_atomic(path, json.dumps(obj, indent=2, default=str))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="bench_results.json")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--fast-examples", type=int, default=8192)
  parser.add_argument("--vmap-examples", type=int, default=1024)
  parser.add_argument("--rss-examples", type=int, default=2048)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--presets", default="quick",
                      help="comma-separated presets to time end to end")
  parser.add_argument("--only", default="fisher,memory,train,presets")
  parser.add_argument("--hidden", type=int, default=HIDDEN,
                      help="MLP width (784-H-H-10)")
  args = parser.parse_args(argv)
  parts = args.only.split(",")
  results = dict(environment=environment(), args=vars(args))
  print("environment:", results["environment"], flush=True)
  for part, fn in (("fisher", bench_fisher), ("memory", bench_memory),
                   ("train", bench_train_step), ("presets", bench_presets)):
    if part in parts:
      results[part] = fn(args)
      write_json(args.out, results)
  print("\nsummary (ratios measured in this process):")
  for r in results.get("fisher", []):
    print(f"  {r['model']:9s} {r['path']:4s} {r['estimator']:9s} "
          f"{r['ratio']:5.2f}x batched-gradient throughput")
  for r in results.get("train", [])[1:]:
    print(f"  train step ewc+adam / adam: {r['ratio_to_adam']:.3f}")
  for r in results.get("presets", []):
    print(f"  preset {r['preset']}: {r['seconds']:.1f} s")
  print(f"results written to {args.out}")


if __name__ == "__main__":
  main()
