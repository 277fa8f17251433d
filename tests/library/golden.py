"""Fisher, KFAC and MAS arrays of fixed models, to compare code versions.

``compute()`` runs a fixed set of models, data and estimators through the
public API only. ``python -m tests.library.golden --write FILE`` stores the
arrays (``.npz``); tests/library/test_golden.py compares today's code with
the file written by an earlier version (its name says which commit), so a
restructuring of the library that changes no maths changes no array.
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ewc_jax
from tests.library import models


class PerToken(nn.Module):
  """A dense layer applied per token, a scale, a weight used twice."""

  @nn.compact
  def __call__(self, x):  # x: [batch, 8, 8] as 8 tokens of 8 features
    h = jnp.tanh(nn.Dense(5)(x))
    h = h * self.param("scale", nn.initializers.ones, (5,))
    tied = self.param("tied", nn.initializers.normal(1.0), (5, 5))
    h = jnp.tanh(h @ tied) @ tied.T
    return nn.Dense(3)(h.mean(1))


def _data(n, shape, classes, seed):
  kx, ky = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kx, (n,) + shape),
          jax.random.randint(ky, (n,), 0, classes))


def _models():
  x8, _ = _data(1, (8, 8), 3, 0)
  return {
      "mlp": (models.nnx_apply(models.NNXMLP([6, 8, 3], nnx.Rngs(0))),
              _data(21, (6,), 3, 1)),
      "cnn": (models.nnx_apply(models.NNXCNN(nnx.Rngs(0), classes=3)),
              _data(13, (8, 8), 3, 2)),
      "linen_mlp": (models.linen_apply(models.LinenMLP((6, 3)), x8),
                    _data(13, (8, 8), 3, 3)),
      "per_token": (models.linen_apply(PerToken(), x8),
                    _data(13, (8, 8), 3, 4)),
  }


def _stream(data, sizes=(5, 7, 9)):
  x, y = data
  out, start = [], 0
  for s in sizes:
    if start >= x.shape[0]:
      break
    out.append((x[start:start + s], y[start:start + s]))
    start += s
  return out


def _put(out, name, tree):
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[f"{name}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)


def compute() -> dict:
  """``{name/leaf path: array}`` for the fixed models and estimators."""
  out = {}
  key = jax.random.key(7)
  for mname, ((apply_fn, params), data) in _models().items():
    for est in ("exact", "sampled", "empirical", "predicted", "batched"):
      for path in ("fast", "vmap"):
        if est == "batched" and path == "vmap":
          continue
        kw = dict(estimator=est, rng=key, batch_size=8,
                  path="vmap" if est == "batched" else path)
        _put(out, f"diag/{mname}/{est}/{path}/arrays",
             ewc_jax.fisher_diagonal(apply_fn, params, data, **kw))
        if mname == "mlp":
          _put(out, f"diag/{mname}/{est}/{path}/stream",
               ewc_jax.fisher_diagonal(apply_fn, params, _stream(data), **kw))
    _put(out, f"diag/{mname}/sampled3/fast/arrays", ewc_jax.fisher_diagonal(
        apply_fn, params, data, estimator="sampled", rng=key, num_samples=3,
        batch_size=8))
    _put(out, f"diag/{mname}/exact/auto/default", ewc_jax.fisher_diagonal(
        apply_fn, params, data))

    def loss(p, z, apply_fn=apply_fn):
      logits = apply_fn(p, z[0][None])[0]
      return -jax.nn.log_softmax(logits)[z[1]]

    for est in ("empirical", "batched"):
      _put(out, f"loss/{mname}/{est}/arrays", ewc_jax.empirical_fisher(
          loss, params, data, estimator=est, batch_size=8))
      if mname == "mlp":
        _put(out, f"loss/{mname}/{est}/stream", ewc_jax.empirical_fisher(
            loss, params, _stream(data), estimator=est, batch_size=8))
    for est in ("exact", "sampled", "empirical"):
      curv = ewc_jax.kfac_fisher(apply_fn, params, data, estimator=est,
                                 rng=key, batch_size=8)
      _put(out, f"kfac/{mname}/{est}", (curv.factors, curv.diagonal))
    _put(out, f"mas/{mname}", ewc_jax.mas_importance(apply_fn, params, data,
                                                     batch_size=8))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--write", required=True, help="the .npz file to write")
  args = p.parse_args()
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_default_matmul_precision", "highest")
  arrays = compute()
  np.savez_compressed(args.write, **arrays)
  print(f"wrote {len(arrays)} arrays to {args.write}")


if __name__ == "__main__":
  main()
