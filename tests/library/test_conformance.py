"""Every pull transformation meets the same contract (as optax's own do).

Parametrised over ``ewc`` (separate, online), the three ``kfac_ewc`` stores
(pooled, per-task online, per-task separate) and ``synaptic_intelligence``
around an online ``ewc``: a jitted step is traced once across
consolidations, updates keep their dtype, the state keeps its structure,
shapes and dtypes, and each works under ``inject_hyperparams`` (lam set
with ``set_hyperparams``, no retrace), ``optax.masked`` and
``optax.MultiSteps``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ewc_jax

PARAMS = {"w1": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3),
          "b1": jnp.array([0.1, -0.2, 0.3]),
          "w2": jnp.linspace(0.5, -0.5, 6).reshape(3, 2)}
X = jnp.linspace(-2.0, 2.0, 24).reshape(6, 4)


def apply_fn(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


LAYERS = ewc_jax.dense_layers(apply_fn, PARAMS, X)


def _fisher(params):
  return ewc_jax.fisher_diagonal(apply_fn, params, (X, None))


def _kfac(params):
  return ewc_jax.kfac_fisher(apply_fn, params, (X, None))


def _si_consolidate(state, params):
  state = ewc_jax.consolidate(
      state, params, ewc_jax.si_importance(state, params, xi=0.1))
  return ewc_jax.si_reset(state, params)


# name: (pull factory of lam, consolidate(state, params))
PULLS = {
    "ewc-separate": (lambda lam: ewc_jax.ewc(lam),
                     lambda s, p: ewc_jax.consolidate(s, p, _fisher(p))),
    "ewc-online": (lambda lam: ewc_jax.ewc(lam, mode="online", gamma=0.9),
                   lambda s, p: ewc_jax.consolidate(s, p, _fisher(p))),
    "kfac-pooled": (lambda lam: ewc_jax.kfac_ewc(lam, LAYERS),
                    lambda s, p: ewc_jax.kfac_consolidate(s, p, _kfac(p))),
    "kfac-per-task-online": (
        lambda lam: ewc_jax.kfac_ewc(lam, LAYERS, gamma=0.9, max_tasks=3),
        lambda s, p: ewc_jax.kfac_consolidate(s, p, _kfac(p))),
    "kfac-per-task-separate": (
        lambda lam: ewc_jax.kfac_ewc(lam, LAYERS, mode="separate",
                                     max_tasks=3),
        lambda s, p: ewc_jax.kfac_consolidate(s, p, _kfac(p))),
}
STATIC = {"ewc-separate": ("mode",), "ewc-online": ("mode", "gamma"),
          "kfac-pooled": ("gamma", "max_tasks"),
          "kfac-per-task-online": ("gamma", "max_tasks"),
          "kfac-per-task-separate": ("gamma", "max_tasks")}
FACTORY_ARGS = {"ewc-online": dict(mode="online", gamma=0.9),
                "kfac-pooled": dict(layers=LAYERS),
                "kfac-per-task-online": dict(layers=LAYERS, gamma=0.9,
                                             max_tasks=3),
                "kfac-per-task-separate": dict(layers=LAYERS,
                                               mode="separate",
                                               max_tasks=3)}


def _make(name, lam=2.0):
  """``(optimizer, consolidate)``; ``"si"`` wraps the online ewc."""
  if name == "si":
    make, _ = PULLS["ewc-online"]
    return (ewc_jax.synaptic_intelligence(optax.chain(make(lam),
                                                      optax.sgd(0.1))),
            _si_consolidate)
  make, consolidate = PULLS[name]
  return optax.chain(make(lam), optax.sgd(0.1)), consolidate


NAMES = list(PULLS) + ["si"]


def _grads(params):
  return jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)


def _signature(tree):
  return jax.tree.structure(tree), [
      (jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name", NAMES)
def test_traced_once_shapes_stable_and_the_pull_acts(name):
  opt, consolidate = _make(name)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    u, state = opt.update(_grads(params), state, params)
    return optax.apply_updates(params, u), state

  params, state = PARAMS, opt.init(PARAMS)
  first = _signature(state)
  chex.clear_trace_counter()
  for _ in range(3):
    for _ in range(2):
      params, state = step(params, state)
    state = consolidate(state, params)
    assert _signature(state) == first
  # The pull acts: moving away from the anchor changes the update.
  moved = jax.tree.map(lambda p: p + 0.5, params)
  pulled, _ = opt.update(_grads(moved), state, moved)
  plain, _ = _make(name, lam=0.0)[0].update(_grads(moved), state, moved)
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(pulled), jax.tree.leaves(plain)))


@pytest.mark.parametrize("name", NAMES)
def test_updates_keep_their_dtype(name):
  opt, consolidate = _make(name)
  p16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  state = consolidate(opt.init(p16), PARAMS)
  u, new_state = jax.jit(opt.update)(_grads(p16), state, p16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  assert _signature(new_state) == _signature(state)


@pytest.mark.parametrize("name", list(PULLS))
def test_under_inject_hyperparams_lam_is_set_without_retracing(name):
  factory = ewc_jax.ewc if name.startswith("ewc") else ewc_jax.kfac_ewc
  inner = optax.inject_hyperparams(factory, static_args=STATIC[name])(
      lam=2.0, **FACTORY_ARGS.get(name, {}))
  opt = optax.chain(inner, optax.sgd(0.1))
  state = PULLS[name][1](opt.init(PARAMS), PARAMS)
  moved = jax.tree.map(lambda p: p + 0.5, PARAMS)
  traces = []

  @jax.jit
  def update(state):
    traces.append(1)
    return opt.update(_grads(moved), state, moved)[0]

  u2 = update(state)
  u6 = update(ewc_jax.set_hyperparams(state, lam=6.0))
  u0 = update(ewc_jax.set_hyperparams(state, lam=0.0))
  assert len(traces) == 1
  for a, b, c in zip(*(jax.tree.leaves(t) for t in (u2, u6, u0))):
    np.testing.assert_allclose(b - c, 3.0 * (a - c), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", list(PULLS))
def test_under_optax_masked_the_free_leaves_get_no_pull(name):
  make, consolidate = PULLS[name]
  mask = {"w1": True, "b1": True, "w2": False}
  opt = optax.chain(optax.masked(make(2.0), mask), optax.sgd(0.1))
  state = consolidate(opt.init(PARAMS), PARAMS)
  moved = jax.tree.map(lambda p: p + 0.5, PARAMS)
  u, _ = jax.jit(opt.update)(_grads(moved), state, moved)
  np.testing.assert_allclose(u["w2"], -0.1 * _grads(moved)["w2"])
  assert not np.allclose(u["w1"], -0.1 * _grads(moved)["w1"])


@pytest.mark.parametrize("name", NAMES)
def test_under_multisteps_the_pull_comes_with_the_accumulated_step(name):
  opt, consolidate = _make(name)
  multi = optax.MultiSteps(opt, every_k_schedule=2)
  state = consolidate(multi.init(PARAMS), PARAMS)
  moved = jax.tree.map(lambda p: p + 0.5, PARAMS)
  u1, state = jax.jit(multi.update)(_grads(moved), state, moved)
  u2, state = jax.jit(multi.update)(_grads(moved), state, moved)
  assert all(not np.any(x) for x in jax.tree.leaves(u1))  # accumulating
  want, _ = opt.update(_grads(moved), consolidate(opt.init(PARAMS), PARAMS),
                       moved)
  chex.assert_trees_all_close(u2, want, rtol=1e-5, atol=1e-7)
