"""The layer-wise fast path against the vmap reference."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import ewc_jax
from ewc_jax._src.jaxpr import diagonal
from tests.library import models

X = jax.random.normal(jax.random.key(1), (20, 8, 8))
Y = jax.random.randint(jax.random.key(2), (20,), 0, 3)


class PerToken(nn.Module):
  """A dense layer applied at every position, a weight used twice, a scale."""

  @nn.compact
  def __call__(self, x):  # x: [batch, 8, 8] as 8 tokens of 8 features
    dense = nn.Dense(5)
    h = jnp.tanh(dense(x))  # per-token: G_i = X_i^T Delta_i
    h = h * self.param("scale", nn.initializers.ones, (5,))
    tied = self.param("tied", nn.initializers.normal(1.0), (5, 5))
    h = jnp.tanh(h @ tied) @ tied.T  # the same weight used twice
    return nn.Dense(3)(h.mean(1))


class Recurrent(nn.Module):
  """Parameters used inside lax.scan: not a layer the fast path knows."""

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(0.3), (8, 8))
    h, _ = jax.lax.scan(lambda h, xt: (jnp.tanh(h @ w + xt), None),
                        jnp.zeros((x.shape[0], 8)), jnp.swapaxes(x, 0, 1))
    return nn.Dense(3)(h)


def nnx_mlp():
  return models.nnx_apply(models.NNXMLP([64, 16, 8, 3], nnx.Rngs(0)))


def nnx_cnn():
  return models.nnx_apply(models.NNXCNN(nnx.Rngs(0), classes=3))


MODELS = {
    "nnx_mlp": nnx_mlp,
    "nnx_cnn": nnx_cnn,
    "linen_mlp": lambda: models.linen_apply(models.LinenMLP((6, 3)), X[:1]),
    "linen_cnn": lambda: models.linen_apply(models.LinenCNN(), X[:1]),
    "per_token_tied": lambda: models.linen_apply(PerToken(), X[:1]),
}


def fisher(apply_fn, params, estimator, path, x=X, y=Y):
  return ewc_jax.fisher_diagonal(apply_fn, params, (x, y), estimator=estimator,
                                 rng=jax.random.key(7), num_samples=3,
                                 batch_size=8, path=path)


@pytest.mark.parametrize("estimator", ["exact", "sampled", "empirical"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fast_path_equals_vmap_path(name, estimator):
  apply_fn, params = MODELS[name]()
  assert diagonal.unsupported_reason(apply_fn, params, X) is None
  y = jnp.minimum(Y, 2)
  want = fisher(apply_fn, params, estimator, "vmap", y=y)
  got = fisher(apply_fn, params, estimator, "fast", y=y)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-9)


def test_layers_are_classified():
  apply_fn, params = MODELS["per_token_tied"]()
  plan = diagonal.plan_for(apply_fn, params, jax.ShapeDtypeStruct((8, 8),
                                                           jnp.float32))
  names = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  identity = {names[i] for i in plan.identity_leaves}
  material = {names[i] for i in plan.material_leaves}
  # The output head sees one vector per example: single products.
  assert "['Dense_1']['kernel']" in identity
  # Per-token layers and the tied weight need per-example layer gradients.
  assert {"['Dense_0']['kernel']", "['Dense_0']['bias']", "['tied']",
          "['scale']"} <= material


def test_a_scan_is_one_material_layer_and_matches():
  # Parameters used inside lax.scan: the whole scan is one layer whose
  # per-example gradient comes from one VJP of it.
  apply_fn, params = models.linen_apply(Recurrent(), X[:1])
  assert diagonal.unsupported_reason(apply_fn, params, X) is None
  plan = diagonal.plan_for(apply_fn, params,
                           jax.ShapeDtypeStruct((8, 8), jnp.float32))
  assert "scan" in {plan.layers[j].primitive for j in plan.material_layers}
  for estimator in ("exact", "sampled"):
    chex.assert_trees_all_close(fisher(apply_fn, params, estimator, "fast"),
                                fisher(apply_fn, params, estimator, "vmap"),
                                rtol=1e-5, atol=1e-9)


def test_pytree_inputs_fall_back_to_vmap():
  apply_fn = lambda p, xs: xs["a"] @ p["w"] + xs["b"] @ p["w"]  # noqa: E731
  params = {"w": jax.random.normal(jax.random.key(0), (8, 3))}
  inputs = {"a": X[:, 0], "b": X[:, 1]}
  assert "pytree" in diagonal.unsupported_reason(apply_fn, params, inputs)
  with pytest.raises(ValueError, match='path="fast" cannot handle'):
    fisher(apply_fn, params, "exact", "fast", x=inputs)
  chex.assert_trees_all_close(fisher(apply_fn, params, "exact", "auto",
                                     x=inputs),
                              fisher(apply_fn, params, "exact", "vmap",
                                     x=inputs), rtol=1e-6)


def test_bfloat16_model_fast_path_accumulates_in_float32():
  apply_fn, params = nnx_mlp()
  p16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  x16 = X.astype(jnp.bfloat16)
  got = fisher(apply_fn, p16, "exact", "fast", x=x16)
  want = fisher(apply_fn, p16, "exact", "vmap", x=x16)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(got))
  # Both see bf16 activations; the fast path squares in float32.
  chex.assert_trees_all_close(got, want, rtol=0.1, atol=1e-4)


def test_sub_chunks_and_padding_agree_with_vmap():
  # 150 examples in chunks of 128: sub-chunks of 64 inside, the second chunk
  # padded with masked examples.
  apply_fn, params = nnx_mlp()
  x = jax.random.normal(jax.random.key(3), (150, 64))
  y = jax.random.randint(jax.random.key(4), (150,), 0, 3)
  kw = dict(estimator="exact", batch_size=128)
  chex.assert_trees_all_close(
      ewc_jax.fisher_diagonal(apply_fn, params, (x, y), path="fast", **kw),
      ewc_jax.fisher_diagonal(apply_fn, params, (x, y), path="vmap", **kw),
      rtol=1e-5, atol=1e-9)
