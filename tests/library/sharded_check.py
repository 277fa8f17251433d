"""Run with 4 simulated CPU devices (see tests/library/test_sharding.py).

Prints one line per check; exits non-zero on the first failure.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import collections  # noqa: E402

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ewc_jax  # noqa: E402
from ewc_jax._src import pass_driver  # noqa: E402
from tests.library import models  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 4, jax.devices()
mesh = jax.make_mesh((4,), ("data",),
                     axis_types=(jax.sharding.AxisType.Auto,))
data_sharding = NamedSharding(mesh, P("data"))
replicated = NamedSharding(mesh, P())

apply_fn, params = models.nnx_apply(models.NNXMLP([16, 32, 8, 4],
                                                  nnx.Rngs(0)))
x = jax.random.normal(jax.random.key(1), (40, 16))
y = jax.random.randint(jax.random.key(2), (40,), 0, 4)


def fsdp(p):
  """Shard each matrix's output axis over the mesh, replicate the rest."""
  spec = P(None, "data") if p.ndim == 2 and p.shape[1] % 4 == 0 else P()
  return jax.device_put(p, NamedSharding(mesh, spec))


sharded_params = jax.tree.map(fsdp, params)
xn, yn = np.asarray(x), np.asarray(y)
# The sharded pass is one program (a shard_map over the mesh): each device
# runs the single-device code on its rows, one psum at the end. Every
# per-example estimator goes through the same per-device code, so a few
# cover them: exact, sampled (each example keeps its key; K = 2 on the vmap
# path), batched (a psum per chunk), from JAX and NumPy arrays. Whole chunks
# (40 = 5 x 8) keep the references' compilation short; the last case cuts a
# chunk (37 examples in chunks of 16, 4 rows per device).
cases = [("fast", "exact", (x, y), 8, None),
         ("vmap", "sampled", (x, y), 8, None),
         ("fast", "batched", (xn, yn), 8, None),
         ("fast", "sampled", (xn, yn), 16, 37)]  # last: kept for below
for path, est, data, size, n in cases:
  kw = dict(estimator=est, path=path, batch_size=size, num_examples=n,
            rng=jax.random.key(3), num_samples=2)
  want = ewc_jax.fisher_diagonal(apply_fn, params, (x, y), **kw)
  got = ewc_jax.fisher_diagonal(apply_fn, params, data,
                                sharding=data_sharding, **kw)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-9)
  print(f"ok fisher {path} {est}: sharded == single device")
# FSDP parameters: gathered once in the program; the Fisher takes their
# sharding. A stream: the same program per chunk, each chunk's keys as
# without a mesh.
for data in ((x, y), [(xn[:16], yn[:16]), (x[16:], y[16:])]):
  got = ewc_jax.fisher_diagonal(apply_fn, sharded_params, data,
                                sharding=data_sharding, **kw)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-9)
  for f, p in zip(jax.tree.leaves(got), jax.tree.leaves(sharded_params)):
    assert f.sharding.is_equivalent_to(p.sharding, p.ndim), (f.sharding,
                                                             p.sharding)
print("ok fisher FSDP and stream: sharded == single device")

# One compilation per data shape, whatever the number of chunks (3, then 41:
# the last one padded), one program dispatched, no per-chunk step.
compiles = collections.Counter()
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: compiles.update([name]))
calls = collections.Counter()
for name in ("over_mesh", "add_chunk"):
  original = getattr(pass_driver, name)
  setattr(pass_driver, name, lambda *a, _o=original, _n=name, **k: (
      calls.update([_n]), _o(*a, **k))[1])
for n in (16 * 2 + 3, 16 * 40 + 3):
  xs = np.asarray(jax.random.normal(jax.random.key(n), (n, 16)))
  before = compiles["/jax/core/compile/backend_compile_duration"]
  calls.clear()
  ewc_jax.fisher_diagonal(apply_fn, params, (xs, None), batch_size=16,
                          sharding=data_sharding)
  assert compiles["/jax/core/compile/backend_compile_duration"] - before == 1
  assert calls == {"over_mesh": 1}, calls
print("ok fisher sharded: one program, compiled once per data shape")


def nll(p, example):
  return -jax.nn.log_softmax(apply_fn(p, example[0][None])[0])[example[1]]


for est, data in (("empirical", (xn, yn)),
                  ("batched", [(x[:16], y[:16]), (x[16:], y[16:])])):
  chex.assert_trees_all_close(
      ewc_jax.empirical_fisher(nll, sharded_params, data, estimator=est,
                               batch_size=8, sharding=data_sharding),
      ewc_jax.empirical_fisher(nll, params, (x, y), estimator=est,
                               batch_size=8), rtol=1e-5, atol=1e-9)
print("ok empirical_fisher: sharded == single device")

opt = optax.chain(ewc_jax.ewc(50.0), optax.adam(1e-2))
fisher = want


def check_state_shardings(state, params):
  (ewc_state,) = [s for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, ewc_jax.EWCState))
                  if isinstance(s, ewc_jax.EWCState)]
  for tree in (ewc_state.curvature, ewc_state.center):
    for s, p in zip(jax.tree.leaves(tree), jax.tree.leaves(params)):
      assert s.sharding.is_equivalent_to(p.sharding, p.ndim), (s.sharding,
                                                               p.sharding)


def loss(p, xb, yb):
  logp = jax.nn.log_softmax(apply_fn(p, xb))
  return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], 1))


@jax.jit
def step(p, s, xb, yb):
  u, s = opt.update(jax.grad(loss)(p, xb, yb), s, p)
  return optax.apply_updates(p, u), s


results = []
for p0 in (params, sharded_params):
  state = opt.init(p0)
  check_state_shardings(state, p0)
  state = ewc_jax.consolidate(state, p0, jax.tree.map(fsdp, fisher)
                              if p0 is sharded_params else fisher)
  check_state_shardings(state, p0)
  p = p0
  xs = x if p0 is params else jax.device_put(x, data_sharding)
  ys = y if p0 is params else jax.device_put(y, data_sharding)
  for _ in range(3):
    p, state = step(p, state, xs, ys)
  check_state_shardings(state, p0)
  results.append(p)
chex.assert_trees_all_close(results[1], results[0], rtol=1e-5, atol=1e-6)
print("ok train step: sharded == unsharded; EWC state sharded like params")
