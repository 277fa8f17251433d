"""Run with 4 simulated CPU devices (see tests/test_sharding.py).

Prints one line per check; exits non-zero on the first failure.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ewc_jax  # noqa: E402
from tests import models  # noqa: E402

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
for path in ("fast", "vmap"):
  for est in ("exact", "empirical", "batched"):
    want = ewc_jax.fisher_diagonal(apply_fn, params, (x, y), estimator=est,
                                   path=path, batch_size=8)
    got = ewc_jax.fisher_diagonal(apply_fn, params, (x, y), estimator=est,
                                  path=path, batch_size=8,
                                  sharding=data_sharding)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-9)
    got_fsdp = ewc_jax.fisher_diagonal(
        apply_fn, sharded_params, (x, y), estimator=est, path=path,
        batch_size=8, sharding=data_sharding)
    chex.assert_trees_all_close(got_fsdp, want, rtol=1e-5, atol=1e-9)
    for f, p in zip(jax.tree.leaves(got_fsdp), jax.tree.leaves(sharded_params)):
      assert f.sharding.is_equivalent_to(p.sharding, p.ndim), (f.sharding,
                                                               p.sharding)
    print(f"ok fisher {path} {est}: sharded == single device, FSDP kept")

def nll(p, example):
  return -jax.nn.log_softmax(apply_fn(p, example[0][None])[0])[example[1]]


chex.assert_trees_all_close(
    ewc_jax.empirical_fisher(nll, sharded_params, (x, y), batch_size=8,
                             sharding=data_sharding),
    ewc_jax.empirical_fisher(nll, params, (x, y), batch_size=8), rtol=1e-5)
print("ok empirical_fisher: sharded == single device")

opt = optax.chain(ewc_jax.ewc(50.0), optax.adam(1e-2))
fisher = ewc_jax.fisher_diagonal(apply_fn, params, (x, y))


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
