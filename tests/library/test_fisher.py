"""Fisher estimators against closed forms and slow obvious references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ewc_jax
from tests.library import models


def linear_softmax(seed=0, n=40, d=5, c=4):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  params = {"w": jax.random.normal(k1, (d, c)),
            "b": 0.5 * jax.random.normal(k2, (c,))}
  x = jax.random.normal(k3, (n, d))
  y = jax.random.randint(k4, (n,), 0, c)
  return (lambda p, xs: xs @ p["w"] + p["b"]), params, x, y


def closed_form(params, x, y=None):
  """Exact (y None) or empirical Fisher of a linear softmax model."""
  p = jax.nn.softmax(x @ params["w"] + params["b"])
  if y is None:
    d2 = p * (1 - p)  # sum_c p_c (e_c - p)_j^2 = p_j (1 - p_j)
  else:
    d2 = jnp.square(jax.nn.one_hot(y, p.shape[1]) - p)
  return {"w": (x ** 2).T @ d2 / x.shape[0], "b": d2.mean(0)}


@pytest.mark.parametrize("path", ["vmap", "auto"])
def test_exact_and_empirical_match_closed_form(path):
  apply_fn, params, x, y = linear_softmax()
  exact = ewc_jax.fisher_diagonal(apply_fn, params, (x, y), path=path,
                                  batch_size=16)
  chex.assert_trees_all_close(exact, closed_form(params, x), rtol=1e-5)
  emp = ewc_jax.fisher_diagonal(apply_fn, params, (x, y), path=path,
                                estimator="empirical", batch_size=16)
  chex.assert_trees_all_close(emp, closed_form(params, x, y), rtol=1e-5)


def test_sampled_is_reproducible_and_converges_to_exact():
  apply_fn, params, x, _ = linear_softmax()
  exact = closed_form(params, x)
  kw = dict(estimator="sampled", path="vmap")
  a = ewc_jax.fisher_diagonal(apply_fn, params, (x, None),
                              rng=jax.random.key(3), **kw)
  b = ewc_jax.fisher_diagonal(apply_fn, params, (x, None),
                              rng=jax.random.key(3), **kw)
  chex.assert_trees_all_equal(a, b)
  c = ewc_jax.fisher_diagonal(apply_fn, params, (x, None),
                              rng=jax.random.key(4), **kw)
  assert not np.allclose(a["w"], c["w"])

  def rel_err(f):
    return float(jnp.linalg.norm(f["w"] - exact["w"])
                 / jnp.linalg.norm(exact["w"]))

  errs = [rel_err(ewc_jax.fisher_diagonal(
      apply_fn, params, (x, None), rng=jax.random.key(5), num_samples=s,
      **kw)) for s in (1, 16, 512)]
  assert errs[2] < errs[1] < errs[0]
  assert errs[2] < 0.05


def test_batched_is_square_of_mean_gradient():
  apply_fn, params, x, y = linear_softmax(n=30)

  def mean_nll(p, xs, ys):
    logp = jax.nn.log_softmax(apply_fn(p, xs))
    return -jnp.mean(jnp.take_along_axis(logp, ys[:, None], 1))

  expected = jax.tree.map(jnp.zeros_like, params)
  for s in range(0, 30, 8):  # batches of 8, the last one of 6
    g = jax.grad(mean_nll)(params, x[s:s + 8], y[s:s + 8])
    size = min(8, 30 - s)  # weighted by size: a ragged batch counts less
    expected = jax.tree.map(lambda e, gi, n=size: e + n * gi ** 2 / 30,
                            expected, g)
  got = ewc_jax.fisher_diagonal(apply_fn, params, (x, y), estimator="batched",
                                batch_size=8)
  chex.assert_trees_all_close(got, expected, rtol=1e-5)


def loop_reference(apply_fn, params, x, y, estimator):
  """A Python loop over single examples and classes: slow and obvious."""
  total = jax.tree.map(jnp.zeros_like, params)
  for i in range(x.shape[0]):
    logits = apply_fn(params, x[i:i + 1])[0]
    probs = jax.nn.softmax(logits)
    classes = range(logits.shape[0]) if estimator == "exact" else [int(y[i])]
    for c in classes:
      g = jax.grad(lambda p: jax.nn.log_softmax(apply_fn(p, x[i:i + 1])[0])[c]
                   )(params)
      w = probs[c] if estimator == "exact" else 1.0
      total = jax.tree.map(lambda t, gi: t + w * gi ** 2, total, g)
  return jax.tree.map(lambda t: t / x.shape[0], total)


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_vmap_path_equals_python_loop_on_mlp(estimator):
  apply_fn, params = models.nnx_apply(models.NNXMLP([6, 8, 5, 3],
                                                    nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(1), (7, 6))
  y = jax.random.randint(jax.random.key(2), (7,), 0, 3)
  got = ewc_jax.fisher_diagonal(apply_fn, params, (x, y), path="vmap",
                                estimator=estimator, batch_size=3)
  want = loop_reference(apply_fn, params, x, y, estimator)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)


def test_chunked_unchunked_and_streamed_agree():
  apply_fn, params = models.linen_apply(models.LinenMLP(), jnp.ones((1, 5)))
  x = jax.random.normal(jax.random.key(1), (50, 5))
  y = jax.random.randint(jax.random.key(2), (50,), 0, 4)
  kw = dict(estimator="exact", path="vmap")
  whole = ewc_jax.fisher_diagonal(apply_fn, params, (x, y), batch_size=50,
                                  **kw)
  chunked = ewc_jax.fisher_diagonal(apply_fn, params, (x, y), batch_size=7,
                                    **kw)
  stream = ewc_jax.fisher_diagonal(
      apply_fn, params, ((x[s:s + 11], y[s:s + 11]) for s in range(0, 50, 11)),
      batch_size=7, **kw)
  listed = ewc_jax.fisher_diagonal(
      apply_fn, params, [(np.asarray(x[:25]), np.asarray(y[:25])),
                         (np.asarray(x[25:]), np.asarray(y[25:]))],
      batch_size=64, **kw)
  for other in (chunked, stream, listed):
    chex.assert_trees_all_close(whole, other, rtol=1e-5, atol=1e-8)


def test_num_examples_caps_the_data_used():
  apply_fn, params, x, y = linear_softmax(n=40)
  capped = ewc_jax.fisher_diagonal(apply_fn, params, (x, y), num_examples=13,
                                   batch_size=5)
  chex.assert_trees_all_close(capped, closed_form(params, x[:13]), rtol=1e-5)
  streamed = ewc_jax.fisher_diagonal(
      apply_fn, params, [(x[:10], y[:10]), (x[10:], y[10:])],
      num_examples=13, batch_size=5)
  chex.assert_trees_all_close(streamed, capped, rtol=1e-6)


def test_bfloat16_params_accumulate_in_float32():
  apply_fn, params, x, y = linear_softmax()
  p16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  f = ewc_jax.fisher_diagonal(apply_fn, p16, (x.astype(jnp.bfloat16), y))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(f))
  ref = closed_form(jax.tree.map(lambda p: p.astype(jnp.float32), p16),
                    x.astype(jnp.bfloat16).astype(jnp.float32))
  chex.assert_trees_all_close(f, ref, rtol=5e-2, atol=1e-3)


def test_dropout_model_in_eval_mode_gives_deterministic_fisher():
  model = models.NNXMLP([4, 16, 3], nnx.Rngs(0), dropout=0.5)
  apply_fn, params = models.nnx_apply(model)
  x = jax.random.normal(jax.random.key(1), (9, 4))
  y = jnp.zeros(9, jnp.int32)
  a = ewc_jax.fisher_diagonal(apply_fn, params, (x, y))
  b = ewc_jax.fisher_diagonal(apply_fn, params, (x, y))
  chex.assert_trees_all_equal(a, b)


def test_empirical_fisher_of_regression_loss_matches_closed_form():
  # loss = 0.5 (x.w - t)^2; gradient (x.w - t) x; squared and averaged.
  x = jax.random.normal(jax.random.key(0), (20, 3))
  t = jax.random.normal(jax.random.key(1), (20,))
  params = {"w": jnp.array([0.5, -1.0, 2.0])}

  def loss(p, ex):
    return 0.5 * (ex[0] @ p["w"] - ex[1]) ** 2

  f = ewc_jax.empirical_fisher(loss, params, (x, t), batch_size=6)
  r = x @ params["w"] - t
  chex.assert_trees_all_close(f, {"w": jnp.mean((r[:, None] * x) ** 2, 0)},
                              rtol=1e-5)
  g = ewc_jax.empirical_fisher(loss, params, [(x[:7], t[:7]), (x[7:], t[7:])],
                               batch_size=4)
  chex.assert_trees_all_close(f, g, rtol=1e-5)


def test_empirical_fisher_agrees_with_fisher_diagonal():
  apply_fn, params, x, y = linear_softmax()

  def nll(p, ex):
    return -jax.nn.log_softmax(apply_fn(p, ex[0][None])[0])[ex[1]]

  chex.assert_trees_all_close(
      ewc_jax.empirical_fisher(nll, params, (x, y)),
      ewc_jax.fisher_diagonal(apply_fn, params, (x, y),
                              estimator="empirical"), rtol=1e-5)


@pytest.mark.parametrize("kwargs, data, match", [
    (dict(estimator="fisher"), None, "estimator must be one of"),
    (dict(estimator="sampled"), None, "needs rng"),
    (dict(path="slow"), None, "path must be one of"),
    (dict(estimator="empirical"), "bad_labels", r"labels must lie in \[0, 4\)"),
    (dict(estimator="empirical"), "neg_labels", r"labels must lie in \[0, 4\)"),
    (dict(), "empty", "holds no examples"),
    (dict(), "empty_list", "holds no examples"),
    (dict(batch_size=0), None, "batch_size must be a positive int"),
    (dict(num_examples=0), None, "num_examples must be None or a positive"),
    (dict(), "ragged", "same leading"),
    (dict(), "not_data", "must be a tuple of arrays"),
])
def test_bad_inputs_raise(kwargs, data, match):
  apply_fn, params, x, y = linear_softmax()
  batch = {
      None: (x, y), "bad_labels": (x, y.at[0].set(4)),
      "neg_labels": (x, y.at[3].set(-1)), "empty": (x[:0], y[:0]),
      "empty_list": [], "ragged": (x, y[:5]), "not_data": 3,
  }[data]
  with pytest.raises(ValueError, match=match):
    ewc_jax.fisher_diagonal(apply_fn, params, batch, **kwargs)


def test_logits_must_be_two_dimensional():
  params = {"w": jnp.ones((3,))}
  with pytest.raises(ValueError, match=r"logits of shape \[batch, classes\]"):
    ewc_jax.fisher_diagonal(lambda p, x: x @ p["w"], params,
                            (jnp.ones((4, 3)), jnp.zeros(4, jnp.int32)))


def test_pytree_inputs_take_the_vmap_path():
  apply_fn, params, x, y = linear_softmax()
  pytree_apply = lambda p, inp: apply_fn(p, inp["a"] + inp["b"])
  got = ewc_jax.fisher_diagonal(pytree_apply, params,
                                ({"a": x, "b": jnp.zeros_like(x)}, y),
                                batch_size=16)
  chex.assert_trees_all_close(got, closed_form(params, x), rtol=1e-5)
