"""Hostile inputs to the library: each row of the README's table."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ewc_jax

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
APPLY = lambda p, x: x @ p["w"] + p["b"]
X = jnp.ones((6, 3))
Y = jnp.zeros(6, jnp.int32)


def state():
  return optax.chain(ewc_jax.ewc(1.0), optax.sgd(0.1)).init(PARAMS)


def test_all_zero_fisher_warns():
  zero = jax.tree.map(jnp.zeros_like, PARAMS)
  with pytest.warns(UserWarning, match="zero everywhere"):
    ewc_jax.consolidate(state(), PARAMS, zero)


def test_integer_fisher_is_rejected():
  ints = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.int32), PARAMS)
  with pytest.raises(ValueError, match=r"fisher\['b'\] has dtype int32"):
    ewc_jax.consolidate(state(), PARAMS, ints)


def test_nan_params_are_rejected_at_consolidation():
  bad = {"w": PARAMS["w"].at[1, 1].set(jnp.inf), "b": PARAMS["b"]}
  with pytest.raises(ValueError, match=r"params\['w'\] has 1 non-finite"):
    ewc_jax.consolidate(state(), bad, PARAMS)


def test_nan_in_data_gives_a_clear_error():
  x = X.at[2, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="non-finite.*Check the data for nan"):
    ewc_jax.fisher_diagonal(APPLY, PARAMS, (x, Y))
  with pytest.raises(ValueError, match="non-finite.*Check the data for nan"):
    ewc_jax.empirical_fisher(
        lambda p, ex: jnp.sum(APPLY(p, ex[0][None]) ** 2), PARAMS, (x, Y))


def test_float_labels_are_rejected():
  with pytest.raises(ValueError, match="labels must be integers"):
    ewc_jax.fisher_diagonal(APPLY, PARAMS, (X, np.zeros(6, np.float32)),
                            estimator="empirical")


def test_penalty_without_ewc_state():
  with pytest.raises(ValueError, match="found no ewc_jax.ewc state"):
    ewc_jax.penalty(PARAMS, optax.sgd(0.1).init(PARAMS))


def test_penalty_with_mismatched_params():
  with pytest.raises(ValueError, match="lacks"):
    ewc_jax.penalty({"w": PARAMS["w"]}, state())


# The fresh hostile pass of issue 14 (docs/hostile_inputs.md, last library
# table): each test failed before its fix.

_K = jax.random.split(jax.random.key(2), 3)
_MLP = {"w1": jax.random.normal(_K[0], (4, 5)),
        "b1": jax.random.normal(_K[1], (5,)),
        "w2": jax.random.normal(_K[2], (5, 3))}
_XS = jax.random.normal(jax.random.key(1), (10, 4))
_YS = jnp.arange(10) % 3


def _mlp(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _fisher_by_jacobian(params, estimator):
  """The Fisher from full per-example Jacobians of log p (slow, obvious)."""
  def one(x, y):
    logits = _mlp(params, x[None])[0]
    jac = jax.jacobian(lambda q: jax.nn.log_softmax(_mlp(q, x[None])[0]))(
        params)
    if estimator == "exact":
      p = jax.nn.softmax(logits)
      return jax.tree.map(lambda j: jnp.einsum("c,c...->...", p, j ** 2), jac)
    c = y if estimator == "empirical" else jnp.argmax(logits)
    return jax.tree.map(lambda j: j[c] ** 2, jac)
  return jax.tree.map(lambda f: f.mean(0), jax.vmap(one)(_XS, _YS))


@pytest.mark.parametrize("estimator,path", [("exact", "fast"),
                                            ("empirical", "vmap")])
def test_the_gradient_of_the_fisher_is_the_true_one(estimator, path):
  # Before: the class weights were stop_gradient-ed, so jax.grad through the
  # Fisher silently dropped their term (exact: +2.63 instead of -2.75).
  def total(fisher_fn, s):
    params = jax.tree.map(lambda a: a * s, _MLP)
    return sum(jnp.sum(f) for f in jax.tree.leaves(fisher_fn(params)))

  ours = lambda p: ewc_jax.fisher_diagonal(  # noqa: E731
      _mlp, p, (_XS, _YS), estimator=estimator, path=path)
  ref = lambda p: _fisher_by_jacobian(p, estimator)  # noqa: E731
  np.testing.assert_allclose(total(ours, 1.0), total(ref, 1.0), rtol=1e-5)
  np.testing.assert_allclose(
      jax.grad(lambda s: total(ours, s))(1.0),
      jax.jit(jax.grad(lambda s: total(ref, s)))(1.0), rtol=1e-4)


def test_gamma_in_separate_mode_is_refused():
  with pytest.raises(ValueError, match='only in mode="online"'):
    ewc_jax.ewc(1.0, gamma=0.5)
  opt = optax.chain(ewc_jax.ewc(1.0), optax.sgd(0.1))
  s = optax.tree_utils.tree_set(opt.init(PARAMS), gamma=0.5)
  with pytest.raises(ValueError,
                     match="separate-mode state holds EWCState.gamma"):
    ewc_jax.consolidate(s, PARAMS, PARAMS)
  ewc_jax.ewc(1.0, gamma=1.0)  # the default value stays accepted
  ewc_jax.ewc(1.0, mode="online", gamma=0.5)


def test_penalty_checks_an_injected_lam():
  opt = optax.chain(optax.inject_hyperparams(
      ewc_jax.ewc, static_args=("mode",))(lam=3.0), optax.sgd(0.1))
  s = ewc_jax.consolidate(opt.init(PARAMS), PARAMS, PARAMS)
  s = optax.tree_utils.tree_set(s, lam=-5.0)  # before: a penalty of -20
  with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
    ewc_jax.penalty(jax.tree.map(lambda a: a + 1, PARAMS), s)


def test_kfac_inputs_are_checked_as_the_diagonal_ones_are():
  curv = ewc_jax.kfac_fisher(APPLY, PARAMS, (X, Y))
  opt = optax.chain(ewc_jax.kfac_ewc(1.0, curv.layers), optax.sgd(0.1))
  s = opt.init(PARAMS)
  with pytest.raises(ValueError, match=r"kfac_ewc update got params unlike.*"
                     r"params lacks \[\"\['b'\]\"\]"):  # before: KeyError
    opt.update({"w": PARAMS["w"]}, s, {"w": PARAMS["w"]})
  with pytest.raises(ValueError, match=r"Kronecker factors\[0\].a has .* "
                     "non-finite.*Check the data"):  # before: nan factors
    ewc_jax.kfac_fisher(APPLY, PARAMS, (X.at[0, 0].set(jnp.nan), Y))
  nan_anchor = jax.tree.map(lambda a: a * jnp.nan, PARAMS)
  with pytest.raises(ValueError, match=r"anchor\['b'\] has 2 non-finite"):
    ewc_jax.kfac_penalty(PARAMS, nan_anchor, curv, 1.0)  # before: nan
  with pytest.raises(ValueError, match="lam must be a finite number"):
    ewc_jax.kfac_penalty(PARAMS, PARAMS, curv, float("inf"))  # before: inf


def test_bad_keys_and_model_outputs_are_named():
  with pytest.raises(ValueError, match="rng must be one jax.random key.*"
                     "got int 0"):
    ewc_jax.fisher_diagonal(APPLY, PARAMS, (X, Y), estimator="sampled", rng=0)
  keys = jax.random.split(jax.random.key(0), 3)
  with pytest.raises(ValueError, match=r"shape \(3,\) \(split keys"):
    ewc_jax.kfac_fisher(APPLY, PARAMS, (X, Y), estimator="sampled", rng=keys)
  ewc_jax.fisher_diagonal(APPLY, PARAMS, (X, Y), estimator="sampled",
                          rng=jax.random.PRNGKey(0))  # a raw key is fine
  ewc_jax.kfac_fisher(APPLY, PARAMS, (X, Y), estimator="sampled",
                      rng=jax.random.key(0), num_samples=np.int64(2))
  with pytest.raises(ValueError, match="must return ONE logits array.*tuple"):
    ewc_jax.fisher_diagonal(lambda p, x: (APPLY(p, x), 0), PARAMS, (X, Y))
  with pytest.raises(ValueError, match=r"pass the tuple \(inputs, labels\)"):
    ewc_jax.fisher_diagonal(APPLY, PARAMS, [X, Y])
  with pytest.raises(ValueError, match=r"params\['w'\] has dtype int32"):
    ewc_jax.mas_importance(APPLY, {"w": jnp.ones((3, 2), jnp.int32),
                                   "b": PARAMS["b"]}, X)
  si = ewc_jax.synaptic_intelligence(optax.sgd(0.1))
  for xi in ("0.1", float("inf")):
    with pytest.raises(ValueError, match="xi must be a"):
      ewc_jax.si_importance(si.init(PARAMS), PARAMS, xi=xi)


def test_continual_fine_tune_refuses_nan_data_and_warns_on_divergence():
  from ewc_jax.continual import continual_fine_tune  # noqa: PLC0415
  loss = lambda p, z: (z[1] - z[0] * p["w"]) ** 2  # noqa: E731
  new = jnp.array([[1.0, 3.0], [2.0, 6.0]])
  kw = dict(lam=0.0, num_steps=3, batch_size=2)
  with pytest.raises(ValueError, match=r"new_data has 1 non-finite"):
    continual_fine_tune(loss, {"w": jnp.array(1.0)}, None,
                        new.at[0, 0].set(jnp.nan), **kw)  # before: nan params
  with pytest.raises(ValueError, match="rng must be one jax.random key"):
    continual_fine_tune(loss, {"w": jnp.array(1.0)}, None, new, rng=0, **kw)
  with pytest.warns(RuntimeWarning, match="loss became non-finite at step"):
    continual_fine_tune(loss, {"w": jnp.array(1.0)}, None, new * 1e20,
                        optimizer=optax.sgd(1e10), **kw)


# The hostile pass of issue 22 (docs/hostile_inputs.md, its library rows):
# each test failed on the code before its fix.


@pytest.mark.parametrize("bad", [-3.0, float("nan"), 1.5])
def test_a_gamma_set_outside_0_1_is_refused_at_consolidation(bad):
  opt = optax.chain(ewc_jax.ewc(1.0, mode="online"), optax.sgd(1.0))
  st = optax.tree_utils.tree_set(opt.init(PARAMS), gamma=jnp.float32(bad))
  fisher = jax.tree.map(jnp.ones_like, PARAMS)
  with pytest.raises(ValueError, match=r"EWCState.gamma must be a finite "
                                       r"number in \[0, 1\]"):
    ewc_jax.consolidate(st, PARAMS, fisher)
  # Under jit, where it cannot raise, the curvature turns to nan.
  poisoned = jax.jit(ewc_jax.consolidate)(st, PARAMS, fisher)
  assert np.all(np.isnan(np.asarray(poisoned[0].curvature["w"])))


def test_a_kfac_gamma_set_outside_0_1_is_refused_at_consolidation():
  curv = ewc_jax.kfac_fisher(APPLY, PARAMS, (X, None))
  opt = optax.chain(ewc_jax.kfac_ewc(1.0, curv.layers), optax.sgd(1.0))
  st = optax.tree_utils.tree_set(opt.init(PARAMS), kfac_gamma=-3.0)
  with pytest.raises(ValueError, match="kfac_gamma must be a finite number"):
    ewc_jax.kfac_consolidate(st, PARAMS, curv)


def test_a_prefix_mask_as_documented():
  params = {"enc": {"w": jnp.ones((3, 2)), "b": jnp.ones(2)},
            "head": {"w": jnp.ones((2, 2))}}
  fisher = jax.tree.map(jnp.ones_like, params)
  moved = jax.tree.map(lambda p: p + 1.0, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for tx in (ewc_jax.ewc(2.0, mask={"enc": True, "head": False}),
             optax.masked(ewc_jax.ewc(2.0), {"enc": True, "head": False})):
    st = ewc_jax.consolidate(tx.init(params), params, fisher)
    u, _ = tx.update(zeros, st, moved)
    np.testing.assert_allclose(u["enc"]["w"], 2.0 * np.ones((3, 2)))
    np.testing.assert_allclose(u["head"]["w"], np.zeros((2, 2)))
    np.testing.assert_allclose(ewc_jax.penalty(moved, st, lam=2.0), 8.0)


def test_flax_serialization_round_trips_ewc_and_kfac_states():
  serialization = pytest.importorskip("flax.serialization")
  fisher = jax.tree.map(jnp.ones_like, PARAMS)
  opt = optax.chain(ewc_jax.ewc(1.0, mode="online"), optax.adam(1e-3))
  st = ewc_jax.consolidate(opt.init(PARAMS), PARAMS, fisher)
  back = serialization.from_bytes(opt.init(PARAMS),
                                  serialization.to_bytes(st))
  assert jax.tree.structure(back) == jax.tree.structure(st)
  assert back[0].mode == "online"
  np.testing.assert_array_equal(back[0].curvature["w"], st[0].curvature["w"])
  curv = ewc_jax.kfac_fisher(APPLY, PARAMS, (X, None))
  kopt = optax.chain(ewc_jax.kfac_ewc(1.0, curv.layers), optax.sgd(0.1))
  ks = ewc_jax.kfac_consolidate(kopt.init(PARAMS), PARAMS, curv)
  kback = serialization.from_bytes(kopt.init(PARAMS),
                                   serialization.to_bytes(ks))
  assert jax.tree.structure(kback) == jax.tree.structure(ks)
  np.testing.assert_array_equal(kback[0].a[0], ks[0].a[0])


def test_mas_on_a_dict_output_names_it():
  apply = lambda p, x: {"logits": x @ p["w"], "aux": x}  # noqa: E731
  with pytest.raises(ValueError, match=r"got a dict with keys \['aux', "
                                       r"'logits'\]: pick the output"):
    ewc_jax.mas_importance(apply, PARAMS, X)


def test_batched_on_a_stream_equals_the_arrays():
  x = jax.random.normal(jax.random.key(0), (9, 3))
  y = jax.random.randint(jax.random.key(1), (9,), 0, 2)
  kw = dict(estimator="batched", batch_size=4)
  arrays = ewc_jax.fisher_diagonal(APPLY, PARAMS, (x, y), **kw)
  stream = ewc_jax.fisher_diagonal(
      APPLY, PARAMS, [(x[:5], y[:5]), (x[5:], y[5:])], **kw)
  for a, b in zip(jax.tree.leaves(arrays), jax.tree.leaves(stream)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_an_apply_fn_with_fewer_rows_than_inputs_is_refused():
  apply = lambda p, x: (x @ p["w"] + p["b"])[:-1]  # noqa: E731
  with pytest.raises(ValueError, match="returned 5 rows of logits for 6 "
                                       "inputs"):
    ewc_jax.fisher_diagonal(apply, PARAMS, (X, None))


def test_lookahead_takes_its_fast_params_and_names_the_mix_up():
  la = optax.lookahead(optax.chain(ewc_jax.ewc(1.0), optax.sgd(0.1)),
                       sync_period=2, slow_step_size=0.5)
  lp = optax.LookaheadParams.init_synced(PARAMS)
  fisher = jax.tree.map(jnp.ones_like, PARAMS)
  with pytest.raises(ValueError, match=r"optax.LookaheadParams: pass "
                                       r"\.fast"):
    ewc_jax.consolidate(la.init(lp), lp, fisher)
  st = ewc_jax.consolidate(la.init(lp), lp.fast, fisher)
  moved = optax.LookaheadParams(jax.tree.map(lambda p: p + 1.0, PARAMS),
                                PARAMS)
  u, _ = jax.jit(la.update)(jax.tree.map(jnp.zeros_like, PARAMS), st, moved)
  np.testing.assert_allclose(u.fast["w"], -0.1 * np.ones((3, 2)))
