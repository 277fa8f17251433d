"""KFAC curvature, penalty and transformation against explicit computations."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ewc_jax
from tests.library import models

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
  # DenseLayer paths leave out the `.value` of an NNX variable.
  get = lambda tree, path: {  # noqa: E731
      jax.tree_util.keystr(k).removesuffix(".value"): v
      for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}[path]
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


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_pooled_online_follows_the_documented_recursion(gamma):
  # max_tasks=None: A_sum, G_sum and W decayed by gamma, precision
  # (A_sum kron G_sum) / W, anchored at the latest task.
  p = _mlp_params([3, 4, 2], True)
  xs = [jax.random.normal(jax.random.key(20 + t), (6, 3)) for t in range(2)]
  anchors = [jax.tree.map(lambda q, t=t: q + 0.1 * (t + 1), p)
             for t in range(2)]
  curvs = [ewc_jax.kfac_fisher(_mlp, a, (x, None))
           for a, x in zip(anchors, xs)]
  opt = ewc_jax.kfac_ewc(1.0, curvs[0].layers, gamma=gamma)
  state = opt.init(p)
  for a, c in zip(anchors, curvs):
    state = ewc_jax.kfac_consolidate(state, a, c)
  weight = gamma + 1.0
  pooled = ewc_jax.KFACCurvature(
      tuple(ewc_jax.KroneckerFactors((gamma * c0.a + c1.a) / weight,
                                     gamma * c0.g + c1.g)
            for c0, c1 in zip(curvs[0].factors, curvs[1].factors)),
      curvs[0].diagonal, curvs[0].layers)
  upd, _ = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, p), state, p)
  ref = jax.jit(jax.grad(
      lambda q: ewc_jax.kfac_penalty(q, anchors[1], pooled, 1.0)))(p)
  chex.assert_trees_all_close(upd, ref, rtol=1e-5, atol=1e-6)


def _scaled_mlp(p, x):
  """The MLP times a per-class ``scale``: a leaf with a diagonal Fisher."""
  return _mlp({k: v for k, v in p.items() if k != "scale"}, x) * p["scale"]


@functools.lru_cache(maxsize=None)
def _three_tasks(bias):
  """Params, 3 task anchors and curvatures (cached: only read by tests)."""
  p = dict(_mlp_params([3, 4, 2], bias), scale=jnp.array([1.2, 0.8]))
  anchors, curvs = [], []
  for t in range(3):
    anchor = jax.tree.map(
        lambda q, t=t: q + 0.3 * jax.random.normal(jax.random.key(40 + t),
                                                   q.shape), p)
    x = jax.random.normal(jax.random.key(50 + t), (7, 3))
    anchors.append(anchor)
    curvs.append(ewc_jax.kfac_fisher(_scaled_mlp, anchor, (x, None)))
  return p, anchors, curvs


def _layer_vec(q, i, bias):
  d = q[f"w{i}"]
  if bias:
    d = jnp.concatenate([d, q[f"b{i}"][None]])
  return d.reshape(-1)  # row-major, as A kron G acts


def _explicit_sum(q, anchors, curvs, weights, online, bias, lam):
  """(lam/2) sum_k w_k [vec(D_k)^T (A_k kron G_k) vec(D_k) + F_k d_k^2]."""
  total = 0.0
  for k, (anchor, c) in enumerate(zip(anchors, curvs)):
    centre = anchors[-1] if online else anchor
    for i, f in enumerate(c.factors):
      kron = np.kron(np.asarray(f.a), np.asarray(f.g))
      v = _layer_vec(q, i, bias) - _layer_vec(centre, i, bias)
      total += weights[k] * v @ kron @ v
    total += weights[k] * jnp.sum(
        c.diagonal["scale"] * (q["scale"] - centre["scale"]) ** 2)
  return 0.5 * lam * total


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode,gamma", [("separate", 1.0), ("online", 0.6)])
def test_per_task_pull_is_the_gradient_of_the_explicit_kronecker_sum(
    mode, gamma, bias):
  p, anchors, curvs = _three_tasks(bias)
  assert [ly.kernel for ly in curvs[0].layers] == ["['w0']", "['w1']"]
  lam = 3.0
  opt = ewc_jax.kfac_ewc(lam, curvs[0].layers, mode=mode, gamma=gamma,
                         max_tasks=4)  # one slot left empty
  state = opt.init(p)
  for a, c in zip(anchors, curvs):
    state = ewc_jax.kfac_consolidate(state, a, c)
  here = jax.tree.map(lambda q: 0.5 * q, p)
  upd, _ = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, p), state, here)
  weights = [gamma ** (2 - k) for k in range(3)]
  ref = jax.grad(_explicit_sum)(here, anchors, curvs, weights,
                                mode == "online", bias, lam)
  chex.assert_trees_all_close(upd, ref, rtol=2e-5, atol=1e-6)
  # The sum is not the pooled approximation (the test could fail).
  pooled = ewc_jax.kfac_ewc(lam, curvs[0].layers, gamma=gamma)
  ps = pooled.init(p)
  for a, c in zip(anchors, curvs):
    ps = ewc_jax.kfac_consolidate(ps, a, c)
  other, _ = pooled.update(jax.tree.map(jnp.zeros_like, p), ps, here)
  assert not np.allclose(other["w0"], ref["w0"], rtol=1e-2)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_one_jitted_step_is_traced_once_across_three_consolidations(mode):
  p, anchors, curvs = _three_tasks(True)
  opt = optax.chain(ewc_jax.kfac_ewc(1.0, curvs[0].layers, mode=mode,
                                     max_tasks=3), optax.adam(1e-2))
  traces = {"step": 0, "fold": 0}
  x = jax.random.normal(jax.random.key(60), (5, 3))

  @jax.jit
  def step(params, state):
    traces["step"] += 1
    grads = jax.grad(lambda q: jnp.sum(_scaled_mlp(q, x) ** 2))(params)
    upd, state = opt.update(grads, state, params)
    return optax.apply_updates(params, upd), state

  @jax.jit
  def fold(state, params, curvature):
    traces["fold"] += 1
    return ewc_jax.kfac_consolidate(state, params, curvature)

  state = opt.init(p)
  q = p
  for a, c in zip(anchors, curvs):
    q, state = step(q, state)
    state = fold(state, a, c)
  q, state = step(q, state)
  assert traces == {"step": 1, "fold": 1}
  assert int(optax.tree_utils.tree_get(state, "kfac_num_tasks")) == 3
  assert np.all(np.isfinite(np.asarray(q["w0"])))


def test_separate_mode_needs_max_tasks_and_a_full_store_is_refused():
  p, anchors, curvs = _three_tasks(True)
  layers = curvs[0].layers
  with pytest.raises(ValueError, match='needs max_tasks.*mode="online"'):
    ewc_jax.kfac_ewc(1.0, layers, mode="separate")
  with pytest.raises(ValueError, match="max_tasks must be None or an int"):
    ewc_jax.kfac_ewc(1.0, layers, max_tasks=0)
  opt = ewc_jax.kfac_ewc(1.0, layers, mode="separate", max_tasks=2)
  state = opt.init(p)
  for a, c in zip(anchors[:2], curvs[:2]):
    state = ewc_jax.kfac_consolidate(state, a, c)
  with pytest.raises(ValueError, match="holds 2 tasks, its max_tasks=2"):
    ewc_jax.kfac_consolidate(state, anchors[2], curvs[2])
  # Under jit no error can be raised: the state is poisoned with nan, and
  # the count records the overflow for the next check outside jit.
  poisoned = jax.jit(ewc_jax.kfac_consolidate)(state, anchors[2], curvs[2])
  assert int(poisoned.kfac_num_tasks) == 3
  upd, _ = opt.update(jax.tree.map(jnp.zeros_like, p), poisoned, p)
  for k in ("w0", "b0", "w1", "b1", "scale"):
    assert np.all(np.isnan(np.asarray(upd[k]))), k
  with pytest.raises(ValueError, match="holds 3 tasks, its max_tasks=2"):
    ewc_jax.kfac_consolidate(poisoned, anchors[2], curvs[2])
  # One task short of the limit is not poisoned.
  ok = jax.jit(ewc_jax.kfac_consolidate)(opt.init(p), anchors[0], curvs[0])
  upd, _ = opt.update(jax.tree.map(jnp.zeros_like, p), ok, p)
  assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(upd))


def _nested():
  keys = jax.random.split(jax.random.key(70), 2)
  params = {"body": {"w": jax.random.normal(keys[0], (3, 4)) / 2,
                     "b": jnp.full((4,), 0.1)},
            "head": {"w": jax.random.normal(keys[1], (4, 2)) / 2,
                     "b": jnp.zeros(2)}}

  def apply_fn(q, x):
    h = jnp.tanh(x @ q["body"]["w"] + q["body"]["b"])
    return h @ q["head"]["w"] + q["head"]["b"]

  return apply_fn, params


@pytest.mark.parametrize("mask", [
    {"body": True, "head": False},  # a prefix: one MaskedNode for the head
    {"body": {"w": True, "b": True}, "head": {"w": False, "b": False}}])
def test_kfac_ewc_under_optax_masked_holds_only_the_kept_layers(mask):
  apply_fn, params = _nested()
  x = jax.random.normal(jax.random.key(71), (6, 3))
  curv = ewc_jax.kfac_fisher(apply_fn, params, (x, None))
  assert [ly.kernel for ly in curv.layers] == ["['body']['w']",
                                               "['head']['w']"]
  opt = optax.masked(ewc_jax.kfac_ewc(2.0, curv.layers, mode="separate",
                                      max_tasks=2), mask)
  state = opt.init(params)
  inner = optax.tree_utils.tree_get(state, "KFACEWCState")
  assert [ly.kernel for ly in inner.layers.layers] == ["['body']['w']"]
  anchor2 = jax.tree.map(lambda q: q - 0.2, params)
  state = ewc_jax.kfac_consolidate(state, params, curv)
  state = ewc_jax.kfac_consolidate(state, anchor2, curv)
  here = jax.tree.map(lambda q: q + 0.3, params)
  grads = jax.tree.map(jnp.ones_like, params)
  upd, _ = jax.jit(opt.update)(grads, state, here)
  f = curv.factors[0]
  mat = lambda q: jnp.concatenate([q["body"]["w"], q["body"]["b"][None]])
  pull = 2.0 * sum(f.a @ (mat(here) - mat(a)) @ f.g
                   for a in (params, anchor2))
  np.testing.assert_allclose(upd["body"]["w"], 1.0 + pull[:3], rtol=1e-5)
  np.testing.assert_allclose(upd["body"]["b"], 1.0 + pull[3], rtol=1e-5)
  chex.assert_trees_all_equal(upd["head"], grads["head"])  # untouched
  with pytest.raises(ValueError, match="mask both or neither"):
    optax.masked(ewc_jax.kfac_ewc(1.0, curv.layers),
                 {"body": {"w": True, "b": False}, "head": True}).init(params)


def test_tree_get_and_set_in_a_chain_holding_ewc_and_kfac_ewc():
  p, anchors, curvs = _three_tasks(True)
  opt = optax.chain(
      ewc_jax.ewc(1.0, mode="online", gamma=0.9),
      ewc_jax.kfac_ewc(1.0, curvs[0].layers, gamma=0.5, max_tasks=3),
      optax.sgd(1.0))
  state = opt.init(p)
  get = optax.tree_utils.tree_get
  assert float(get(state, "gamma")) == pytest.approx(0.9)
  assert float(get(state, "kfac_gamma")) == 0.5
  assert get(state, "mode") == "online" and get(state, "kfac_mode") == "online"
  assert int(get(state, "num_tasks")) == 0 == int(get(state, "kfac_num_tasks"))
  assert "lam" not in ewc_jax.KFACEWCState._fields
  state = optax.tree_utils.tree_set(state, kfac_gamma=jnp.float32(0.25))
  assert float(get(state, "gamma")) == pytest.approx(0.9)  # EWC's untouched
  for a, c in zip(anchors, curvs):
    state = ewc_jax.kfac_consolidate(state, a, c)
  np.testing.assert_allclose(get(state, "weight"), [0.0625, 0.25, 1.0])
  assert int(get(state, "num_tasks")) == 0  # the EWC state is separate


def test_injected_lam_is_read_from_the_hyperparameters():
  p, anchors, curvs = _three_tasks(False)
  opt = optax.inject_hyperparams(ewc_jax.kfac_ewc, static_args=(
      "gamma", "max_tasks"))(lam=1.0, layers=curvs[0].layers,
                             mode="separate", max_tasks=1)
  state = ewc_jax.kfac_consolidate(opt.init(p), anchors[0], curvs[0])
  zeros = jax.tree.map(jnp.zeros_like, p)
  step = jax.jit(opt.update)
  one, _ = step(zeros, state, p)
  state = optax.tree_utils.tree_set(state, lam=jnp.float32(4.0))
  four, _ = step(zeros, state, p)
  chex.assert_trees_all_close(four, jax.tree.map(lambda u: 4 * u, one),
                              rtol=1e-6)
  assert step._cache_size() == 1
  with pytest.raises(TypeError, match="static_args"):
    optax.inject_hyperparams(ewc_jax.kfac_ewc)(
        lam=1.0, layers=curvs[0].layers, max_tasks=2).init(p)


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
             .kfac_num_tasks) == 3


def test_bad_inputs_name_the_problem():
  p = _mlp_params([3, 4, 2], True)
  x = jax.random.normal(jax.random.key(31), (4, 3))
  with pytest.raises(ValueError, match="estimator must be one of"):
    ewc_jax.kfac_fisher(_mlp, p, (x, None), estimator="batched")
  with pytest.raises(ValueError, match="needs rng"):
    ewc_jax.kfac_fisher(_mlp, p, (x, None), estimator="sampled")
  with pytest.raises(ValueError, match="needs data labels"):
    ewc_jax.kfac_fisher(_mlp, p, (x, None), estimator="empirical")
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    ewc_jax.kfac_fisher(_mlp, p, (x, jnp.array([0, 1, 2, 0])),
                        estimator="empirical")
  with pytest.raises(ValueError, match="one input array"):
    ewc_jax.kfac_fisher(lambda q, d: _mlp(q, d["x"]), p, ({"x": x}, None))
  with pytest.raises(ValueError, match="layers must be a tuple"):
    ewc_jax.kfac_ewc(1.0, "w0")
  with pytest.raises(ValueError, match="gamma decays old tasks only"):
    ewc_jax.kfac_ewc(1.0, (), mode="separate", gamma=0.5, max_tasks=2)
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


@pytest.mark.parametrize("name", ["ewc_jax._src.kfac.fisher",
                                  "ewc_jax._src.kfac.transform"])
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
