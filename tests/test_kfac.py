"""KFAC curvature, penalty and transformation against explicit computations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ewc_jax
from tests import models

TOL = dict(rtol=1e-5, atol=1e-6)


def _mlp_params(sizes, bias, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(sizes))
  p = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    p[f"w{i}"] = jax.random.normal(keys[i], (a, b)) / np.sqrt(a)
    if bias:
      p[f"b{i}"] = 0.1 * jax.random.normal(jax.random.fold_in(keys[i], 1),
                                           (b,))
  return p


def _mlp(p, x, perts=None):
  """A tanh MLP; ``perts[i]`` is added to layer i's output (reference)."""
  n = len([k for k in p if k.startswith("w")])
  h = x
  for i in range(n):
    h = h @ p[f"w{i}"] + (p[f"b{i}"] if f"b{i}" in p else 0.0)
    if perts is not None:
      h = h + perts[i]
    if i < n - 1:
      h = jnp.tanh(h)
  return h


def _reference_factors(p, x, weights_fn):
  """Explicit per-example A and G from a hand-written forward pass."""
  n = len([k for k in p if k.startswith("w")])
  sizes = [p[f"w{i}"].shape[1] for i in range(n)]
  a_sum = [0.0] * n
  g_sum = [0.0] * n
  for e in range(x.shape[0]):
    xe = x[e]
    perts = [jnp.zeros(s) for s in sizes]
    jac = jax.jacrev(lambda q, xe=xe: jax.nn.log_softmax(
        _mlp(p, xe, q)))(perts)  # [C, d_out] per layer
    logits = _mlp(p, xe)
    w = weights_fn(e, logits)  # [C]
    h = xe
    for i in range(n):
      xt = jnp.append(h, 1.0) if f"b{i}" in p else h
      a_sum[i] = a_sum[i] + np.outer(xt, xt)
      g_sum[i] = g_sum[i] + np.einsum("c,ci,cj->ij", w, jac[i], jac[i])
      h = h @ p[f"w{i}"] + (p[f"b{i}"] if f"b{i}" in p else 0.0)
      h = jnp.tanh(h)
  n_ex = x.shape[0]
  return [(a / n_ex, g / n_ex) for a, g in zip(a_sum, g_sum)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_factors_equal_explicit_per_example(bias, estimator):
  p = _mlp_params([4, 5, 3], bias)
  x = jax.random.normal(jax.random.key(1), (9, 4))
  y = jnp.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
  curv = ewc_jax.kfac_fisher(_mlp, p, (x, y), estimator=estimator,
                             batch_size=4)
  if estimator == "exact":
    weights = lambda e, logits: jax.nn.softmax(logits)
  else:
    weights = lambda e, logits: jax.nn.one_hot(y[e], 3)
  ref = _reference_factors(p, x, weights)
  assert [(ly.kernel, ly.bias) for ly in curv.layers] == [
      ("['w0']", "['b0']" if bias else None),
      ("['w1']", "['b1']" if bias else None)]
  for f, (a, g) in zip(curv.factors, ref):
    np.testing.assert_allclose(f.a, a, **TOL)
    np.testing.assert_allclose(f.g, g, **TOL)
  assert all(isinstance(d, optax.MaskedNode)
             for d in jax.tree.leaves(curv.diagonal, is_leaf=lambda d:
                                      isinstance(d, optax.MaskedNode)))


def _exact_block(apply_fn, params, x, kernel, bias):
  """One example's exact Fisher block of ``[W; b]``, vec row-major."""
  def logp(p):
    return jax.nn.log_softmax(apply_fn(p, x[None])[0])

  jac = jax.jacrev(logp)(params)
  get = lambda tree, path: {jax.tree_util.keystr(k): v for k, v in
                            jax.tree_util.tree_flatten_with_path(tree)[0]}[path]
  jw = get(jac, kernel)  # [C, d_in, d_out]
  if bias is not None:
    jw = jnp.concatenate([jw, get(jac, bias)[:, None, :]], axis=1)
  jw = jw.reshape(jw.shape[0], -1)
  probs = jax.nn.softmax(apply_fn(params, x[None])[0])
  return np.einsum("c,ci,cj->ij", probs, jw, jw)


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_one_example_kfac_is_the_exact_fisher_block(kind):
  # With one example A kron G is exactly that example's Fisher block.
  x = jax.random.normal(jax.random.key(2), (1, 5))
  if kind == "nnx":
    apply_fn, params = models.nnx_apply(models.NNXMLP([5, 4, 3],
                                                      nnx.Rngs(0)))
  else:
    apply_fn, params = models.linen_apply(models.LinenMLP((4, 3)), x)
  curv = ewc_jax.kfac_fisher(apply_fn, params, (x, None))
  assert len(curv.layers) == 2
  for layer, f in zip(curv.layers, curv.factors):
    assert layer.bias is not None
    block = _exact_block(apply_fn, params, x[0], layer.kernel, layer.bias)
    np.testing.assert_allclose(np.kron(f.a, f.g), block, rtol=1e-4,
                               atol=1e-6)


def test_sampled_is_reproducible_and_near_exact():
  p = _mlp_params([3, 4, 3], True)
  x = jax.random.normal(jax.random.key(3), (64, 3))
  exact = ewc_jax.kfac_fisher(_mlp, p, (x, None))
  s1 = ewc_jax.kfac_fisher(_mlp, p, (x, None), estimator="sampled",
                           rng=jax.random.key(0), num_samples=64)
  s2 = ewc_jax.kfac_fisher(_mlp, p, (x, None), estimator="sampled",
                           rng=jax.random.key(0), num_samples=64)
  chex.assert_trees_all_close(s1.factors, s2.factors)
  np.testing.assert_allclose(s1.factors[1].g, exact.factors[1].g, atol=0.02)


def test_unprovable_layers_fall_back_to_the_diagonal():
  x = jax.random.normal(jax.random.key(4), (6, 3, 4))  # 3 tokens per example
  y = jnp.array([0, 1, 0, 1, 0, 1])
  params = {"tok": jax.random.normal(jax.random.key(5), (4, 4)),
            "shared": jax.random.normal(jax.random.key(6), (4, 4)) / 2,
            "scan": jax.random.normal(jax.random.key(7), (4, 4)) / 2,
            "head": jax.random.normal(jax.random.key(8), (4, 2))}

  def apply_fn(p, xs):
    h = jnp.tanh(xs @ p["tok"]).mean(axis=1)  # a per-token dense layer
    h = jnp.tanh(jnp.tanh(h @ p["shared"]) @ p["shared"])  # weight reused
    h, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ p["scan"]), None), h,
                        None, length=2)
    return h @ p["head"]

  curv = ewc_jax.kfac_fisher(apply_fn, params, (x, y), estimator="empirical")
  assert [ly.kernel for ly in curv.layers] == ["['head']"]
  diag = ewc_jax.fisher_diagonal(apply_fn, params, (x, y),
                                 estimator="empirical", path="vmap")
  for k in ("tok", "shared", "scan"):
    np.testing.assert_allclose(curv.diagonal[k], diag[k], rtol=1e-5,
                               atol=1e-8)
  assert isinstance(curv.diagonal["head"], optax.MaskedNode)


def _torch_style():
  params = {"w": jax.random.normal(jax.random.key(10), (3, 4)),  # [out, in]
            "b": jax.random.normal(jax.random.key(11), (3,)),
            "scale": jnp.array([1.5, 0.5, 1.0])}
  apply_fn = lambda p, x: (x @ p["w"].T + p["b"]) * p["scale"]
  return apply_fn, params


def test_kfac_penalty_equals_explicit_kronecker_form():
  apply_fn, params = _torch_style()
  x = jax.random.normal(jax.random.key(12), (5, 4))
  curv = ewc_jax.kfac_fisher(apply_fn, params, (x, None))
  (layer,) = curv.layers
  assert layer.transposed and layer.bias == "['b']"
  anchor = jax.tree.map(lambda p: p + 0.3, params)
  new = jax.tree.map(lambda p: p * 0.7, params)
  d = np.concatenate([(new["w"] - anchor["w"]).T,
                      (new["b"] - anchor["b"])[None]])
  f = curv.factors[0]
  quad = d.reshape(-1) @ np.kron(f.a, f.g) @ d.reshape(-1)
  quad += np.sum(curv.diagonal["scale"] * (new["scale"]
                                           - anchor["scale"]) ** 2)
  got = jax.jit(ewc_jax.kfac_penalty)(new, anchor, curv, 3.0)
  np.testing.assert_allclose(got, 1.5 * quad, rtol=1e-5)


@pytest.mark.parametrize("inner", [optax.sgd(0.1), optax.adam(0.01)])
def test_one_step_equals_optimiser_on_loss_plus_penalty(inner):
  apply_fn, params = _torch_style()
  x = jax.random.normal(jax.random.key(13), (5, 4))
  curv = ewc_jax.kfac_fisher(apply_fn, params, (x, None))
  lam = 2.0
  task_loss = lambda p: jnp.sum(apply_fn(p, x) ** 2) / 10
  cur = jax.tree.map(lambda p: p + 0.2, params)
  opt = optax.chain(ewc_jax.kfac_ewc(lam, curv.layers), inner)
  state = ewc_jax.kfac_consolidate(opt.init(cur), params, curv)
  upd, _ = jax.jit(opt.update)(jax.grad(task_loss)(cur), state, cur)
  ref_grads = jax.grad(lambda p: task_loss(p) + ewc_jax.kfac_penalty(
      p, params, curv, lam))(cur)
  ref, _ = inner.update(ref_grads, inner.init(cur), cur)
  chex.assert_trees_all_close(upd, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,gamma", [("separate", 1.0), ("online", 0.5)])
def test_several_tasks_follow_the_documented_recursion(mode, gamma):
  p = _mlp_params([3, 4, 2], True)
  xs = [jax.random.normal(jax.random.key(20 + t), (6, 3)) for t in range(2)]
  anchors = [jax.tree.map(lambda q, t=t: q + 0.1 * (t + 1), p)
             for t in range(2)]
  curvs = [ewc_jax.kfac_fisher(_mlp, a, (x, None))
           for a, x in zip(anchors, xs)]
  opt = ewc_jax.kfac_ewc(1.0, curvs[0].layers, mode=mode, gamma=gamma)
  state = opt.init(p)
  for a, c in zip(anchors, curvs):
    state = ewc_jax.kfac_consolidate(state, a, c)
  weight = gamma + 1.0
  pooled = ewc_jax.KFACCurvature(
      tuple(ewc_jax.KroneckerFactors((gamma * c0.a + c1.a) / weight,
                                     gamma * c0.g + c1.g)
            for c0, c1 in zip(curvs[0].factors, curvs[1].factors)),
      curvs[0].diagonal, curvs[0].layers)
  center = anchors[1] if mode == "online" else jax.tree.map(
      lambda a, b: (a + b) / 2, *anchors)
  upd, _ = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, p), state, p)
  ref = jax.jit(jax.grad(
      lambda q: ewc_jax.kfac_penalty(q, center, pooled, 1.0)))(p)
  chex.assert_trees_all_close(upd, ref, rtol=1e-5, atol=1e-6)


def test_no_retrace_across_three_consolidations():
  p = _mlp_params([3, 4, 2], True)
  x = jax.random.normal(jax.random.key(30), (6, 3))
  layers = ewc_jax.dense_layers(_mlp, p, x)
  opt = optax.chain(ewc_jax.kfac_ewc(1.0, layers, mode="online", gamma=0.9),
                    optax.adam(1e-2))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    grads = jax.grad(lambda q: jnp.sum(_mlp(q, x) ** 2))(params)
    upd, state = opt.update(grads, state, params)
    return optax.apply_updates(params, upd), state

  state = opt.init(p)
  for _ in range(3):
    p, state = step(p, state)
    state = ewc_jax.kfac_consolidate(
        state, p, ewc_jax.kfac_fisher(_mlp, p, (x, None)))
  p, state = step(p, state)
  assert int(jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, ewc_jax.KFACEWCState))[0]
             .num_tasks) == 3


def test_bad_inputs_name_the_problem():
  p = _mlp_params([3, 4, 2], True)
  x = jax.random.normal(jax.random.key(31), (4, 3))
  with pytest.raises(ValueError, match="estimator must be one of"):
    ewc_jax.kfac_fisher(_mlp, p, (x, None), estimator="batched")
  with pytest.raises(ValueError, match="needs rng"):
    ewc_jax.kfac_fisher(_mlp, p, (x, None), estimator="sampled")
  with pytest.raises(ValueError, match="needs data labels"):
    ewc_jax.kfac_fisher(_mlp, p, (x, None), estimator="empirical")
  with pytest.raises(ValueError, match=r"labels must be integers in \[0, 2\)"):
    ewc_jax.kfac_fisher(_mlp, p, (x, jnp.array([0, 1, 2, 0])),
                        estimator="empirical")
  with pytest.raises(ValueError, match="one input array"):
    ewc_jax.kfac_fisher(lambda q, d: _mlp(q, d["x"]), p, ({"x": x}, None))
  with pytest.raises(ValueError, match="layers must be a tuple"):
    ewc_jax.kfac_ewc(1.0, "w0")
  with pytest.raises(ValueError, match="gamma decays old tasks only"):
    ewc_jax.kfac_ewc(1.0, (), gamma=0.5)
  curv = ewc_jax.kfac_fisher(_mlp, p, (x, None))
  small = _mlp_params([3, 2], True)
  opt = ewc_jax.kfac_ewc(1.0, ewc_jax.dense_layers(_mlp, small, x))
  with pytest.raises(ValueError, match="do not match the kfac_ewc state"):
    ewc_jax.kfac_consolidate(opt.init(small), p, curv)
  with pytest.raises(ValueError, match="no ewc_jax.kfac_ewc state"):
    ewc_jax.kfac_consolidate(optax.adam(1.0).init(p), p, curv)
  with pytest.raises(ValueError, match="KFACCurvature"):
    ewc_jax.kfac_penalty(p, p, {"w0": 1.0}, 1.0)
  with pytest.raises(ValueError, match=r"params\['w0'\]"):
    ewc_jax.kfac_ewc(1.0, curv.layers).init(
        dict(p, w0=jnp.zeros((2, 2))))


def test_state_is_found_inside_inject_hyperparams_and_si():
  p = _mlp_params([3, 2], True)
  x = jax.random.normal(jax.random.key(32), (4, 3))
  curv = ewc_jax.kfac_fisher(_mlp, p, (x, None))
  opt = ewc_jax.synaptic_intelligence(optax.chain(
      optax.inject_hyperparams(ewc_jax.kfac_ewc, static_args=(
          "layers", "mode"))(lam=4.0, layers=curv.layers), optax.sgd(1.0)))
  state = ewc_jax.kfac_consolidate(opt.init(p), p, curv)
  moved = jax.tree.map(lambda q: q + 0.5, p)
  upd, _ = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, p), state,
                               moved)
  ref = jax.grad(lambda q: ewc_jax.kfac_penalty(q, p, curv, 4.0))(moved)
  chex.assert_trees_all_close(upd, jax.tree.map(jnp.negative, ref),
                              rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ewc_jax._src.kfac",
                                  "ewc_jax._src.kfac_transform"])
def test_docstring_examples(name):
  import doctest  # noqa: PLC0415
  import importlib  # noqa: PLC0415
  result = doctest.testmod(importlib.import_module(name),
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


def test_layers_inside_jit_calls_are_found():
  p = _mlp_params([3, 4, 2], True)
  x = jax.random.normal(jax.random.key(33), (5, 3))
  plain = ewc_jax.kfac_fisher(_mlp, p, (x, None))
  jitted = ewc_jax.kfac_fisher(jax.jit(_mlp), p, (x, None))
  assert jitted.layers == plain.layers and len(plain.layers) == 2
  chex.assert_trees_all_close(jitted.factors, plain.factors, rtol=1e-6)
