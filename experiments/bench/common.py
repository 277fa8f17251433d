"""Models, data, timing and baselines shared by the benchmarks."""

import json
import os
import pathlib
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
from experiments.common import files
from experiments.data import idx

HIDDEN = 1000
GRAD_CHUNK = 1000  # the batched-gradient baseline's chunk (issue 10)


class MLP(nnx.Module):

  def __init__(self, sizes, rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


class CNN(nnx.Module):
  """Two 3x3 convolutions and a dense head on 28x28 images."""

  def __init__(self, rngs, channels=16):
    self.conv1 = nnx.Conv(1, channels, (3, 3), strides=(2, 2), rngs=rngs)
    self.conv2 = nnx.Conv(channels, channels, (3, 3), strides=(2, 2),
                          rngs=rngs)
    self.head = nnx.Linear(channels * 49, 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], 28, 28, 1)
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    return self.head(x.reshape(x.shape[0], -1))


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


def nnx_apply(model):
  graphdef, params = nnx.split(model, nnx.Param)
  return (lambda p, x: nnx.merge(graphdef, p)(x)), params


def mlp(hidden=HIDDEN):
  return nnx_apply(MLP([784, hidden, hidden, 10], nnx.Rngs(0)))


def cnn():
  return nnx_apply(CNN(nnx.Rngs(0)))


def recurrent():
  module = Recurrent()
  params = module.init(jax.random.key(0), jnp.ones((1, 784)))["params"]
  return (lambda p, x: module.apply({"params": p}, x)), params


def data(n, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.random((n, 784), np.float32)),
          jnp.asarray(rng.integers(0, 10, n, dtype=np.int32)))


def idx_train_set(data_dir, limit=None):
  """Training images ``[N, 784]`` in [0, 1] and labels of an IDX directory.

  Only the two training files are needed; they are read by the experiments'
  one IDX reader (:func:`experiments.data.idx.read_idx`).
  """
  found = {}
  for p in sorted(pathlib.Path(data_dir).iterdir()):
    name = p.name.lower()
    if name.startswith("train-images"):
      found["x"] = p
    elif name.startswith("train-labels"):
      found["y"] = p
  if set(found) != {"x", "y"}:
    raise ValueError(f"--data-dir {data_dir} holds no train-images-idx3 and "
                     "train-labels-idx1 files (Fashion-MNIST/MNIST IDX).")
  x = idx.read_idx(found["x"]).reshape(-1, 784)[:limit]
  y = idx.read_idx(found["y"])[:limit]
  return (jnp.asarray(x.astype(np.float32) / 255.0),
          jnp.asarray(y.astype(np.int32)))


def best_time(fn, reps):
  """The best of ``reps`` timed calls, after one compiling warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def nll_grad(apply_fn, p, xb, yb):
  def loss(p):
    logp = jax.nn.log_softmax(apply_fn(p, xb))
    return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], 1))
  return jax.grad(loss)(p)


def gradient_scan(apply_fn, params, x, y, chunk=GRAD_CHUNK):
  """One batched gradient pass as one jitted ``lax.scan`` over chunks.

  Returns:
    ``(run, n)``: the pass, and the examples it covers (whole chunks).
  """
  n = (x.shape[0] // chunk) * chunk or x.shape[0]
  chunk = min(chunk, n)
  xs = x[:n].reshape((-1, chunk) + x.shape[1:])
  ys = y[:n].reshape(-1, chunk)

  @jax.jit
  def run(p, xs, ys):
    def body(acc, b):
      return jax.tree.map(jnp.add, acc, nll_grad(apply_fn, p, *b)), None
    return jax.lax.scan(body, jax.tree.map(jnp.zeros_like, p), (xs, ys))[0]

  return (lambda: run(params, xs, ys)), n


def gradient_loop(apply_fn, params, x, y, batch_size):
  """One batched gradient pass as a Python loop of jitted chunk gradients."""
  step = jax.jit(lambda acc, p, xb, yb: jax.tree.map(
      jnp.add, acc, nll_grad(apply_fn, p, xb, yb)))

  def run():
    acc = jax.tree.map(jnp.zeros_like, params)
    for s in range(0, x.shape[0], batch_size):
      acc = step(acc, params, x[s:s + batch_size], y[s:s + batch_size])
    return acc
  return run


def path_used(apply_fn, params, x):
  """Which path ``path="auto"`` takes, asked through the public API."""
  try:
    ewc_jax.fisher_diagonal(apply_fn, params, (x[:1], None), path="fast")
    return "fast"
  except ValueError as e:
    if 'path="fast" cannot handle' in str(e):
      return "vmap"
    raise


def environment():
  return dict(
      python=platform.python_version(), jax=jax.__version__,
      backend=jax.default_backend(),
      devices=[d.device_kind for d in jax.devices()],
      cpu=platform.processor() or platform.machine(), cores=os.cpu_count())


def write_json(path, obj):
  files.write_atomic(path, json.dumps(obj, indent=2, default=str))


def train_step_ratio(apply_fn, params, steps, reps):
  """ms per step of ``adam`` and ``chain(ewc, adam)`` in one lax.scan."""
  x, y = data(steps * 128)
  xb, yb = x.reshape(steps, 128, 784), y.reshape(steps, 128)

  def make(opt):
    @jax.jit
    def run(params, state):
      def step(carry, batch):
        p, s = carry
        u, s = opt.update(nll_grad(apply_fn, p, *batch), s, p)
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
    s = best_time(lambda run=run, state=state: run(params, state),
                         reps)
    rows.append(dict(optimizer=name, steps=steps, ms_per_step=1e3 * s / steps))
  for r in rows:
    r["ratio_to_adam"] = r["ms_per_step"] / rows[0]["ms_per_step"]
  return rows


def time_run(argv, timeout=None):
  """Wall time of ``python -m experiments.permuted_mnist ARGV``."""
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    try:
      proc = subprocess.run(
          [sys.executable, "-m", "experiments.permuted_mnist", *argv,
           "--out", os.path.join(tmp, "run")],
          capture_output=True, text=True, timeout=timeout)
      ok, tail = proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[
          -1000:]
    except subprocess.TimeoutExpired:
      ok, tail = False, f"timed out after {timeout} s"
    return time.perf_counter() - start, ok, tail
