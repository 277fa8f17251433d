"""MAS and Synaptic Intelligence against closed forms and hand-written loops."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ewc_jax


def test_mas_equals_closed_form_for_a_linear_model():
  w = jax.random.normal(jax.random.key(0), (4, 3))
  b = jax.random.normal(jax.random.key(1), (3,))
  x = np.asarray(jax.random.normal(jax.random.key(2), (7, 4)))
  apply_fn = lambda p, xs: xs @ p["w"] + p["b"]
  got = ewc_jax.mas_importance(apply_fn, {"w": w, "b": b}, x, batch_size=3)
  f = x @ np.asarray(w) + np.asarray(b)  # d ||f||^2 = 2 x f^T, 2 f
  want_w = np.mean(np.abs(2 * x[:, :, None] * f[:, None, :]), axis=0)
  want_b = np.mean(np.abs(2 * f), axis=0)
  np.testing.assert_allclose(got["w"], want_w, rtol=1e-5)
  np.testing.assert_allclose(got["b"], want_b, rtol=1e-5)
  # An (inputs, labels) pair and an iterable of batches give the same.
  pair = ewc_jax.mas_importance(apply_fn, {"w": w, "b": b},
                                (x, np.zeros(7, np.int32)))
  chex.assert_trees_all_close(pair, got, rtol=1e-6)
  stream = ewc_jax.mas_importance(apply_fn, {"w": w, "b": b},
                                  iter([x[:5], x[5:]]), batch_size=4)
  chex.assert_trees_all_close(stream, got, rtol=1e-6)


def test_mas_feeds_consolidate():
  params = {"w": jnp.ones((2, 2))}
  omega = ewc_jax.mas_importance(lambda p, x: x @ p["w"], params,
                                 jnp.eye(2))
  opt = optax.chain(ewc_jax.ewc(1.0), optax.sgd(1.0))
  state = ewc_jax.consolidate(opt.init(params), params, omega)
  np.testing.assert_allclose(ewc_jax.penalty(
      {"w": jnp.zeros((2, 2))}, state, lam=1.0), 0.5 * np.sum(omega["w"]),
      rtol=1e-6)


def test_mas_bad_input():
  with pytest.raises(ValueError, match="data must be an array"):
    ewc_jax.mas_importance(lambda p, x: x, {"w": jnp.ones(2)}, 3.0)
  with pytest.raises(ValueError, match="no examples"):
    ewc_jax.mas_importance(lambda p, x: x, {"w": jnp.ones(2)}, iter([]))


def _loss(p, batch):
  x, y = batch
  return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def _batches(t, n=5):
  keys = jax.random.split(jax.random.key(100 + t), n)
  return [(jax.random.normal(k, (8, 3)),
           jax.random.normal(jax.random.fold_in(k, 1), (8, 2)))
          for k in keys]


@pytest.mark.standard_promotion  # optax.adam / MultiSteps
@pytest.mark.parametrize("wrap_ewc", [False, True])
def test_si_wrapper_equals_zenke_loop(wrap_ewc):
  params = {"w": jax.random.normal(jax.random.key(3), (3, 2)),
            "b": jnp.zeros(2)}
  xi, c = 0.1, 0.5
  inner = optax.adam(0.05)
  chain = optax.chain(ewc_jax.ewc(2 * c, mode="online"), inner) if (
      wrap_ewc) else inner
  opt = ewc_jax.synaptic_intelligence(chain)
  state = opt.init(params)
  step = jax.jit(lambda p, s, b: opt.update(jax.grad(_loss)(p, b), s, p))

  # The hand-written reference: Zenke's recurrence around a bare optimiser,
  # with the penalty c * sum Omega (theta - theta*)^2 added to the gradient.
  ref_p, ref_s = params, inner.init(params)
  big_omega = jax.tree.map(jnp.zeros_like, params)
  anchor = params
  p = params
  for t in range(2):
    omega = jax.tree.map(jnp.zeros_like, params)
    start = ref_p
    for batch in _batches(t):
      upd, state = step(p, state, batch)
      p = optax.apply_updates(p, upd)
      g = jax.grad(_loss)(ref_p, batch)
      pull = jax.tree.map(lambda o, q, a: 2 * c * o * (q - a), big_omega,
                          ref_p, anchor) if wrap_ewc else None
      full = jax.tree.map(jnp.add, g, pull) if wrap_ewc else g
      ref_u, ref_s = inner.update(full, ref_s, ref_p)
      new = optax.apply_updates(ref_p, ref_u)
      omega = jax.tree.map(lambda o, gi, a, b: o - gi * (a - b), omega, g,
                           new, ref_p)
      ref_p = new
    chex.assert_trees_all_close(p, ref_p, rtol=1e-5, atol=1e-6)
    si = jax.tree.leaves(state, is_leaf=lambda s: isinstance(
        s, ewc_jax.SIState))[0]
    chex.assert_trees_all_close(si.omega, omega, rtol=1e-4, atol=1e-6)
    imp = ewc_jax.si_importance(state, p, xi=xi)
    want = jax.tree.map(lambda o, a, b: jnp.maximum(o, 0) / ((a - b) ** 2
                                                             + xi),
                        omega, ref_p, start)
    chex.assert_trees_all_close(imp, want, rtol=1e-4, atol=1e-6)
    big_omega = jax.tree.map(jnp.add, big_omega, want)
    anchor = ref_p
    if wrap_ewc:
      state = ewc_jax.consolidate(state, p, imp)
    state = ewc_jax.si_reset(state, p)
    si = jax.tree.leaves(state, is_leaf=lambda s: isinstance(
        s, ewc_jax.SIState))[0]
    assert not any(np.any(np.asarray(o)) for o in jax.tree.leaves(si.omega))
    chex.assert_trees_all_close(si.start, p)


def test_si_path_integral_uses_the_change_the_parameters_make():
  # bfloat16 parameters at 1.0 move in steps of 2^-7: an update of 1e-3 is
  # rounded away (no change, no credit), one of 0.25 moves them exactly.
  params = {"w": jnp.ones(2, jnp.bfloat16)}
  opt = ewc_jax.synaptic_intelligence(optax.sgd(1.0))
  g = {"w": jnp.array([1e-3, 0.25], jnp.bfloat16)}
  upd, state = opt.update(g, opt.init(params), params)
  moved = optax.apply_updates(params, upd)
  np.testing.assert_array_equal(np.asarray(moved["w"], np.float32),
                                [1.0, 0.75])
  np.testing.assert_array_equal(state.omega["w"], [0.0, 0.25 * 0.25])


def test_si_bad_inputs():
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="exactly one"):
    ewc_jax.si_importance(optax.sgd(1.0).init(params), params)
  with pytest.raises(ValueError, match="xi must be"):
    state = ewc_jax.synaptic_intelligence(optax.sgd(1.0)).init(params)
    ewc_jax.si_importance(state, params, xi=0.0)
  with pytest.raises(ValueError, match="GradientTransformation"):
    ewc_jax.synaptic_intelligence(lambda g: g)
  opt = ewc_jax.synaptic_intelligence(optax.sgd(1.0))
  with pytest.raises(ValueError, match="needs the current parameters"):
    opt.update(params, opt.init(params))


def test_docstring_examples():
  import doctest  # noqa: PLC0415
  from ewc_jax._src import importance  # noqa: PLC0415
  result = doctest.testmod(importance,
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
