"""A sequence model's Fisher and EWC pull on 8 simulated CPU devices.

Run by tests/library/test_sharding.py in a fresh interpreter (XLA_FLAGS
first). The mesh is 2 (data) x 4 (model): examples split over "data";
parameters FSDP-sharded (the embedding's rows over "model") and
tensor-parallel (the MLP's up projection by columns, its down projection by
rows). Each result must equal the one-device result to float32 rounding,
and the Fisher, the EWC curvature and the anchor must come back sharded
like the parameters.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ewc_jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((2, 4), ("data", "model"),
                     axis_types=(jax.sharding.AxisType.Auto,) * 2)
V, T, D = 8, 5, 8


def lm(p, tokens):
  """Embedding (tied output), a per-token MLP, a scale: [batch, T, V]."""
  h = p["emb"][tokens] + p["pos"]
  h = h + jax.nn.gelu(h @ p["up"]) @ p["down"]
  h = h * p["scale"] / jnp.sqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)
  return h @ p["emb"].T


ks = jax.random.split(jax.random.key(0), 5)
params = {"emb": 0.5 * jax.random.normal(ks[0], (V, D)),
          "pos": 0.5 * jax.random.normal(ks[1], (T, D)),
          "up": 0.5 * jax.random.normal(ks[2], (D, 2 * D)),
          "down": 0.5 * jax.random.normal(ks[3], (2 * D, D)),
          "scale": jnp.ones(D)}
specs = {"emb": P("model", None), "pos": P(), "up": P(None, "model"),
         "down": P("model", None), "scale": P()}
sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
           for k, v in params.items()}
n = 12
tokens = jax.random.randint(ks[4], (n, T), 0, V)
labels = jnp.roll(tokens, -1, axis=1)
mask = jnp.arange(T)[None] < jax.random.randint(jax.random.key(9), (n, 1),
                                                1, T + 1)
rows = NamedSharding(mesh, P("data"))
data = (tokens, labels, mask)
placed = tuple(jax.device_put(x, rows) for x in data)


def same_sharding(tree, like):
  for f, p in zip(jax.tree.leaves(tree), jax.tree.leaves(like)):
    assert f.sharding.is_equivalent_to(p.sharding, p.ndim), (f.sharding,
                                                             p.sharding)


for est, path in (("sampled", "fast"), ("empirical", "vmap"),
                  ("batched", "fast")):
  kw = dict(estimator=est, path=path, rng=jax.random.key(3), batch_size=4)
  want = ewc_jax.fisher_diagonal(lm, params, data, **kw)
  forms = [placed] + ([tuple(map(np.asarray, data))] if est == "sampled"
                      else [])  # host arrays: once is enough
  for d in forms:
    got = ewc_jax.fisher_diagonal(lm, sharded, d, sharding=rows, **kw)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-9)
    same_sharding(got, sharded)
  print(f"ok sequence fisher {est} {path}: sharded (FSDP + TP) == single")

# A stream over the mesh, sharded parameters: the same program per chunk.
stream = [tuple(x[:8] for x in data), tuple(x[8:] for x in data)]
kw = dict(estimator="sampled", rng=jax.random.key(3), batch_size=4)
got = ewc_jax.fisher_diagonal(lm, sharded, stream, sharding=rows, **kw)
chex.assert_trees_all_close(
    got, ewc_jax.fisher_diagonal(lm, params, data, **kw), rtol=1e-5,
    atol=1e-9)
same_sharding(got, sharded)
print("ok sequence fisher stream: sharded == single")

# The EWC pull: consolidation and a jitted step keep the sharding.
fisher = ewc_jax.fisher_diagonal(lm, sharded, placed, sharding=rows, **kw)
opt = optax.chain(ewc_jax.ewc(5.0), optax.sgd(0.1))
state = ewc_jax.consolidate(opt.init(sharded), sharded, fisher)
same_sharding(state[0].curvature, sharded)
same_sharding(state[0].center, sharded)
ref_state = ewc_jax.consolidate(opt.init(params), params,
                                jax.tree.map(np.asarray, fisher))


def loss(p, batch):
  x, y, m = batch
  logp = jax.nn.log_softmax(lm(p, x))
  nll = -jnp.take_along_axis(logp, y[..., None], -1)[..., 0]
  return jnp.sum(jnp.where(m, nll, 0.0)) / jnp.sum(m)


@jax.jit
def step(p, s, batch):
  u, s = opt.update(jax.grad(loss)(p, batch), s, p)
  return optax.apply_updates(p, u), s


moved = jax.tree.map(lambda p: p + 0.05, sharded)
new, new_state = step(moved, state, placed)
ref, _ = step(jax.tree.map(lambda p: p + 0.05, params), ref_state, data)
chex.assert_trees_all_close(new, ref, rtol=1e-5, atol=1e-7)
same_sharding(new, sharded)
same_sharding(new_state[0].center, sharded)
print("ok sequence ewc: sharded step == single; state sharded like params")
