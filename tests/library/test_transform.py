"""The EWC transformation against autodiff of the penalty."""

import inspect
import typing

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ewc_jax
from tests.library import models


def random_tree(seed, like):
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, jnp.shape(x)) for k, x in zip(keys, leaves)])


def random_fisher(seed, like):
  return jax.tree.map(jnp.square, random_tree(seed, like))


PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))},
          "scale": jnp.ones(())}


def loss_fn(params, x):
  return jnp.sum(jnp.tanh(x @ params["dense"]["kernel"]
                          + params["dense"]["bias"]) ** 2) * params["scale"]


@pytest.mark.standard_promotion  # optax.adam / MultiSteps
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_step_equals_optimiser_on_loss_plus_penalty(inner):
  params = random_tree(0, PARAMS)
  anchor, fisher = random_tree(1, PARAMS), random_fisher(2, PARAMS)
  x = jax.random.normal(jax.random.key(3), (5, 3))
  lam = 7.0
  make = {"sgd": lambda: optax.sgd(0.1), "adam": lambda: optax.adam(0.01)}
  opt = optax.chain(ewc_jax.ewc(lam), make[inner]())
  state = ewc_jax.consolidate(opt.init(params), anchor, fisher)
  ref_opt = make[inner]()
  ref_state = ref_opt.init(params)
  for _ in range(3):
    g = jax.grad(loss_fn)(params, x)
    updates, state = jax.jit(opt.update)(g, state, params)
    ref_g = jax.grad(lambda p: loss_fn(p, x) + ewc_jax.ewc_penalty(
        p, anchor, fisher, lam))(params)
    ref_updates, ref_state = ref_opt.update(ref_g, ref_state, params)
    chex.assert_trees_all_close(updates, ref_updates, rtol=1e-6, atol=1e-6)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(
      ewc_jax.penalty(params, state, lam=lam),
      ewc_jax.ewc_penalty(params, anchor, fisher, lam), rtol=1e-6)


def test_nothing_changes_before_the_first_consolidation():
  opt = ewc_jax.ewc(100.0)
  g = random_tree(5, PARAMS)
  updates, _ = opt.update(g, opt.init(PARAMS), random_tree(6, PARAMS))
  chex.assert_trees_all_equal(updates, g)
  assert float(ewc_jax.penalty(random_tree(7, PARAMS), opt.init(PARAMS),
                               lam=100.0)) == 0


def test_separate_mode_is_the_sum_of_the_task_penalties():
  lam = 3.0
  anchors = [random_tree(10 + k, PARAMS) for k in range(3)]
  fishers = [random_fisher(20 + k, PARAMS) for k in range(3)]
  opt = ewc_jax.ewc(lam)
  state = opt.init(PARAMS)
  for a, f in zip(anchors, fishers):
    state = ewc_jax.consolidate(state, a, f)
  assert int(state.num_tasks) == 3
  theta = random_tree(30, PARAMS)

  def explicit(p):
    return sum(ewc_jax.ewc_penalty(p, a, f, lam)
               for a, f in zip(anchors, fishers))

  np.testing.assert_allclose(ewc_jax.penalty(theta, state, lam=lam),
                             explicit(theta), rtol=1e-5)
  zeros = jax.tree.map(jnp.zeros_like, theta)
  pull, _ = opt.update(zeros, state, theta)
  chex.assert_trees_all_close(pull, jax.grad(explicit)(theta), rtol=1e-5,
                              atol=1e-6)


def test_online_mode_follows_its_recurrence():
  lam, gamma = 2.0, 0.5
  opt = ewc_jax.ewc(lam, mode="online", gamma=gamma)
  state = opt.init(PARAMS)
  f_star = jax.tree.map(jnp.zeros_like, PARAMS)
  for k in range(3):
    anchor, f = random_tree(40 + k, PARAMS), random_fisher(50 + k, PARAMS)
    state = ewc_jax.consolidate(state, anchor, f)
    f_star = jax.tree.map(lambda a, b: gamma * a + b, f_star, f)
  chex.assert_trees_all_close(state.curvature, f_star, rtol=1e-6)
  theta = random_tree(60, PARAMS)
  # One quadratic anchored at the LATEST parameters.
  np.testing.assert_allclose(ewc_jax.penalty(theta, state, lam=lam),
                             ewc_jax.ewc_penalty(theta, anchor, f_star, lam),
                             rtol=1e-5)
  pull, _ = opt.update(jax.tree.map(jnp.zeros_like, theta), state, theta)
  chex.assert_trees_all_close(
      pull, jax.grad(ewc_jax.ewc_penalty)(theta, anchor, f_star, lam),
      rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wrap", ["chain", "inject", "masked", "ewc_mask",
                                  "multi"])
def test_consolidate_finds_the_state_and_step_traces_once(wrap):
  params = random_tree(0, PARAMS)
  mask = {"dense": {"kernel": True, "bias": False}, "scale": True}
  if wrap == "chain":
    opt = optax.chain(ewc_jax.ewc(1.5), optax.sgd(0.1))
  elif wrap == "inject":
    opt = optax.chain(optax.inject_hyperparams(ewc_jax.ewc)(lam=1.5),
                      optax.sgd(0.1))
  elif wrap == "masked":
    opt = optax.chain(optax.masked(ewc_jax.ewc(1.5), mask), optax.sgd(0.1))
  elif wrap == "ewc_mask":
    opt = optax.chain(ewc_jax.ewc(1.5, mask=mask), optax.sgd(0.1))
  else:
    opt = optax.multi_transform(
        {"a": optax.chain(ewc_jax.ewc(1.5), optax.sgd(0.1)),
         "b": optax.sgd(0.1)},
        {"dense": {"kernel": "a", "bias": "b"}, "scale": "a"})
  state = opt.init(params)
  shapes = jax.tree.map(jnp.shape, state)

  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    g = jax.grad(loss_fn)(params, jnp.ones((2, 3)))
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state

  anchors = []
  for k in range(3):
    params, state = step(params, state)
    anchors.append(params)
    state = ewc_jax.consolidate(state, params, random_fisher(k, params))
    assert jax.tree.map(jnp.shape, state) == shapes
  params, state = step(params, state)
  assert len(traces) == 1
  # The pull is really active: the penalty is positive after moving away.
  moved = jax.tree.map(lambda p: p + 1.0, params)
  assert float(ewc_jax.penalty(moved, state, lam=1.5)) > 0
  if wrap in ("masked", "ewc_mask"):
    # The bias is masked out: moving it alone costs nothing.
    only_bias = {"dense": {"kernel": params["dense"]["kernel"],
                           "bias": params["dense"]["bias"] + 5.0},
                 "scale": params["scale"]}
    np.testing.assert_allclose(ewc_jax.penalty(only_bias, state, lam=1.5),
                               ewc_jax.penalty(params, state, lam=1.5),
                               rtol=1e-6)


def test_lam_is_settable_with_tree_set_under_inject_hyperparams():
  params, anchor = random_tree(0, PARAMS), random_tree(1, PARAMS)
  fisher = random_fisher(2, PARAMS)
  opt = optax.inject_hyperparams(ewc_jax.ewc, static_args=("mode",))(lam=1.0)
  state = ewc_jax.consolidate(opt.init(params), anchor, fisher)
  zeros = jax.tree.map(jnp.zeros_like, params)
  update = jax.jit(opt.update)
  u1, state = update(zeros, state, params)
  # A strongly typed f32, as the state holds (a Python float or
  # jnp.asarray(4.0) is weakly typed and would retrace the update once).
  state = optax.tree_utils.tree_set(state, lam=jnp.float32(4.0))
  assert float(optax.tree_utils.tree_get(state, "lam")) == 4.0
  # The penalty reads the one injected lam, before and after an update.
  np.testing.assert_allclose(ewc_jax.penalty(params, state),
                             ewc_jax.ewc_penalty(params, anchor, fisher, 4.0),
                             rtol=1e-5)
  u4, state = update(zeros, state, params)
  chex.assert_trees_all_close(
      u4, jax.grad(ewc_jax.ewc_penalty)(params, anchor, fisher, 4.0),
      rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.tree.map(lambda u: 4 * u, u1), u4,
                              rtol=1e-6)
  assert update._cache_size() == 1  # tree_set did not retrace


def test_a_lam_schedule_through_inject_hyperparams_changes_the_pull():
  params, anchor = random_tree(0, PARAMS), random_tree(1, PARAMS)
  fisher = random_fisher(2, PARAMS)
  schedule = optax.linear_schedule(0.0, 10.0, transition_steps=4)
  opt = optax.chain(
      optax.inject_hyperparams(ewc_jax.ewc, static_args=("mode",))(
          lam=schedule, mode="online", gamma=None),
      optax.sgd(1.0))
  state = ewc_jax.consolidate(opt.init(params), anchor, fisher)
  zeros = jax.tree.map(jnp.zeros_like, params)
  update = jax.jit(opt.update)
  for step in range(6):
    updates, state = update(zeros, state, params)
    lam = 10.0 * min(step, 4) / 4  # the schedule at this step's count
    want = jax.tree.map(lambda g: -g, jax.grad(ewc_jax.ewc_penalty)(
        params, anchor, fisher, lam))
    chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        ewc_jax.penalty(params, state),
        ewc_jax.ewc_penalty(params, anchor, fisher, lam), rtol=1e-5,
        atol=1e-6)


def test_a_plain_ewc_state_holds_no_lam():
  state = ewc_jax.ewc(2.0).init(PARAMS)
  assert optax.tree_utils.tree_get(state, "lam") is None
  with pytest.raises(KeyError, match="lam"):  # optax's own loud refusal
    optax.tree_utils.tree_set(state, lam=3.0)
  with pytest.raises(ValueError, match="penalty needs lam"):
    ewc_jax.penalty(PARAMS, state)


@pytest.mark.parametrize("wrap", ["plain", "chain", "inject", "masked",
                                  "multi"])
def test_tree_get_finds_the_curvature(wrap):
  params, anchor = random_tree(0, PARAMS), random_tree(1, PARAMS)
  fisher = random_fisher(2, PARAMS)
  mask = {"dense": {"kernel": True, "bias": False}, "scale": True}
  opt = {
      "plain": lambda: ewc_jax.ewc(1.0),
      "chain": lambda: optax.chain(ewc_jax.ewc(1.0), optax.adam(0.1)),
      "inject": lambda: optax.chain(optax.inject_hyperparams(
          ewc_jax.ewc, static_args=("mode",))(lam=1.0), optax.sgd(0.1)),
      "masked": lambda: optax.chain(ewc_jax.ewc(1.0, mask=mask),
                                    optax.sgd(0.1)),
      "multi": lambda: optax.multi_transform(
          {"a": ewc_jax.ewc(1.0), "b": optax.sgd(0.1)},
          {"dense": "a", "scale": "b"}),
  }[wrap]()
  state = ewc_jax.consolidate(opt.init(params), anchor, fisher)
  got = optax.tree_utils.tree_get(state, "curvature")
  if wrap == "masked":
    assert isinstance(got["dense"]["bias"], optax.MaskedNode)
    chex.assert_trees_all_close(got["dense"]["kernel"],
                                fisher["dense"]["kernel"])
  elif wrap == "multi":
    chex.assert_trees_all_close(got["dense"], fisher["dense"])
  else:
    chex.assert_trees_all_close(got, fisher)  # one task: A = F
  assert int(optax.tree_utils.tree_get(state, "num_tasks")) == 1


def test_gamma_lives_in_the_state_and_tree_set_changes_consolidation():
  params = random_tree(0, PARAMS)
  f1, f2 = random_fisher(1, PARAMS), random_fisher(2, PARAMS)
  opt = optax.chain(
      optax.inject_hyperparams(ewc_jax.ewc, static_args=("mode", "gamma"))(
          lam=1.0, mode="online", gamma=0.9),
      optax.sgd(0.1))
  state = opt.init(params)
  assert float(optax.tree_utils.tree_get(state, "gamma")) == np.float32(0.9)
  state = ewc_jax.consolidate(state, params, f1)
  state = optax.tree_utils.tree_set(state, gamma=0.25)
  state = ewc_jax.consolidate(state, params, f2)
  chex.assert_trees_all_close(
      optax.tree_utils.tree_get(state, "curvature"),
      jax.tree.map(lambda a, b: 0.25 * a + b, f1, f2), rtol=1e-6)


def test_an_injected_gamma_is_refused_with_advice():
  opt = optax.inject_hyperparams(ewc_jax.ewc, static_args=("mode",))(
      lam=1.0, mode="online", gamma=0.9)
  with pytest.raises(TypeError, match=r"gamma.*static_args=\('mode', "
                     r"'gamma'\)"):
    opt.init(PARAMS)


def test_update_accepts_extra_args_on_its_own():
  opt = ewc_jax.ewc(1.0)
  assert isinstance(opt, optax.GradientTransformationExtraArgs)
  g = random_tree(1, PARAMS)
  updates, _ = opt.update(g, opt.init(PARAMS), PARAMS, value=jnp.ones(()))
  chex.assert_trees_all_equal(updates, g)


def test_dtypes_of_updates_are_kept():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  opt = ewc_jax.ewc(1.0)
  state = ewc_jax.consolidate(opt.init(params), random_tree(1, params),
                              random_fisher(2, params))
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  updates, new_state = opt.update(grads, state, params)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(
      lambda x: x.dtype, state)


@pytest.mark.standard_promotion  # optax.adam / MultiSteps
def test_works_with_an_nnx_model_end_to_end():
  model = models.NNXMLP([4, 8, 3], nnx.Rngs(0))
  apply_fn, params = models.nnx_apply(model)
  x = jax.random.normal(jax.random.key(1), (32, 4))
  y = jax.random.randint(jax.random.key(2), (32,), 0, 3)
  opt = optax.chain(ewc_jax.ewc(10.0), optax.adam(1e-2))
  state = opt.init(params)
  fisher = ewc_jax.fisher_diagonal(apply_fn, params, (x, y))
  state = ewc_jax.consolidate(state, params, fisher)
  anchor = params

  def loss(p):  # a second task: push every logit to class 0
    return -jnp.mean(jax.nn.log_softmax(apply_fn(p, x))[:, 0])

  free = params
  free_state = optax.adam(1e-2).init(params)
  for _ in range(20):
    u, state = opt.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, u)
    fu, free_state = optax.adam(1e-2).update(jax.grad(loss)(free), free_state)
    free = optax.apply_updates(free, fu)
  # The pull keeps the parameters closer to the anchor (Fisher-weighted).
  assert float(ewc_jax.ewc_penalty(params, anchor, fisher, 1.0)) < float(
      ewc_jax.ewc_penalty(free, anchor, fisher, 1.0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(lam=-1.0), "lam must be a finite number >= 0"),
    (dict(lam=float("nan")), "lam must be a finite number >= 0"),
    (dict(lam=float("inf")), "lam must be a finite number >= 0"),
    (dict(lam=1.0, gamma=0.0), r"gamma must be a number in \(0, 1\]"),
    (dict(lam=1.0, gamma=1.5), r"gamma must be a number in \(0, 1\]"),
    (dict(lam=1.0, gamma=True), "gamma must be a number"),
    (dict(lam=1.0, mode="sum"), "mode must be one of"),
    (dict(lam=jnp.ones(2)), "lam must be a scalar"),
])
def test_bad_hyperparameters_raise(kwargs, match):
  with pytest.raises((TypeError, ValueError), match=match):
    ewc_jax.ewc(**kwargs)


def test_update_without_params_raises():
  opt = ewc_jax.ewc(1.0)
  with pytest.raises(ValueError, match="needs the current parameters"):
    opt.update(PARAMS, opt.init(PARAMS))


def test_consolidate_rejects_bad_fisher_and_trees():
  opt = optax.chain(ewc_jax.ewc(1.0), optax.sgd(0.1))
  state = opt.init(PARAMS)
  bad = {"dense": {"kernel": jnp.ones((3, 2)).at[0, 0].set(jnp.nan),
                   "bias": jnp.ones(2)}, "scale": jnp.ones(())}
  with pytest.raises(ValueError, match=r"fisher\['dense'\]\['kernel'\] has 1 "
                                       "non-finite"):
    ewc_jax.consolidate(state, PARAMS, bad)
  neg = jax.tree.map(lambda x: -x, PARAMS)
  with pytest.raises(ValueError, match="cannot be negative"):
    ewc_jax.consolidate(state, PARAMS, neg)
  missing = {"dense": {"kernel": jnp.ones((3, 2))}, "scale": jnp.ones(())}
  with pytest.raises(ValueError,
                     match=r"fisher lacks \[\"\['dense'\]\['bias'\]"):
    ewc_jax.consolidate(state, PARAMS, missing)
  wrong_shape = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(2)},
                 "scale": jnp.ones(())}
  with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\] has shape"):
    ewc_jax.consolidate(state, PARAMS, wrong_shape)
  other = {"a": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"params lacks .*which the EWC state "
                                       "holds: trees are matched by path"):
    ewc_jax.consolidate(state, other, other)
  with pytest.raises(ValueError, match="found no ewc_jax.ewc state"):
    ewc_jax.consolidate(optax.sgd(0.1).init(PARAMS), PARAMS, PARAMS)


def test_ewc_penalty_validates_its_arguments():
  with pytest.raises(ValueError, match=r"anchor lacks"):
    ewc_jax.ewc_penalty(PARAMS, {"scale": jnp.ones(())}, PARAMS, 1.0)
  with pytest.raises(ValueError, match="lam must be"):
    ewc_jax.ewc_penalty(PARAMS, PARAMS, PARAMS, -2.0)


@pytest.mark.standard_promotion  # optax.adam / MultiSteps
def test_state_buffers_are_not_aliased_so_donation_works():
  params = random_tree(0, PARAMS)
  opt = optax.chain(ewc_jax.ewc(1.0, mode="online", gamma=0.9),
                    optax.adam(1e-3))
  state = opt.init(params)
  step = jax.jit(lambda s, p: opt.update(jax.tree.map(jnp.ones_like, p), s,
                                         p)[1], donate_argnums=(0,))
  state = step(state, params)
  state = ewc_jax.consolidate(state, params, random_fisher(1, params))
  state = step(state, params)  # would fail: "donate the same buffer twice"
  assert int(state[0].num_tasks) == 1
  # params were not donated away through the state's centre.
  assert bool(jnp.all(jnp.isfinite(params["scale"])))


def test_first_task_centre_is_exactly_the_anchor():
  # (F * p) / F would round; the centre must be p itself, so that the pull
  # is exactly zero at the anchor (Adam would magnify any residue).
  params = jax.tree.map(lambda x: x * 0.1 + 1e-3, random_tree(8, PARAMS))
  fisher = jax.tree.map(lambda x: 1e-30 + x * 1e-3, random_fisher(9, PARAMS))
  state = ewc_jax.consolidate(ewc_jax.ewc(1.0).init(params), params, fisher)
  chex.assert_trees_all_equal(state.center, params)
  pull, _ = ewc_jax.ewc(1.0).update(
      jax.tree.map(jnp.zeros_like, params), state, params)
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(pull))


@pytest.mark.parametrize("lam", ["10", None, b"1", True, [1.0],
                                 lambda count: 1.0, jnp.ones((), jnp.bool_)])
def test_lam_of_a_wrong_type_is_refused_naming_lam(lam):
  with pytest.raises(TypeError, match="lam must be a number"):
    ewc_jax.ewc(lam)


@pytest.mark.parametrize("bad, match", [
    ({"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(2)},
      "scale": jnp.ones(())}, r"params\['dense'\]\['kernel'\] has shape "
                              r"\(2, 3\)"),
    ({"dense": {"kernel": jnp.ones((3, 2))}, "scale": jnp.ones(())},
     r"params lacks \[\"\['dense'\]\['bias'\]"),
    ({"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
      "scale": jnp.ones(()), "extra": jnp.ones(1)},
     r"params has \[\"\['extra'\]\"\]"),
])
@pytest.mark.parametrize("jit", [False, True])
def test_update_with_params_of_another_shape_names_the_path(bad, match, jit):
  opt = ewc_jax.ewc(1.0)
  state = opt.init(PARAMS)
  update = jax.jit(opt.update) if jit else opt.update
  with pytest.raises(ValueError, match="unlike those given to init"):
    update(bad, state, bad)
  with pytest.raises(ValueError, match=match):
    update(bad, state, bad)


def test_nonfinite_params_in_consolidate_are_blamed_on_the_params():
  # A diverged model: its params AND the Fisher computed from them are nan.
  nan_params = {"dense": {"kernel": jnp.ones((3, 2)),
                          "bias": jnp.array([1.0, jnp.inf])},
                "scale": jnp.ones(())}
  nan_fisher = jax.tree.map(lambda x: x * jnp.nan, PARAMS)
  state = ewc_jax.ewc(1.0).init(PARAMS)
  with pytest.raises(ValueError, match=r"^params\['dense'\]\['bias'\] has 1 "
                     "non-finite value.*diverge"):
    ewc_jax.consolidate(state, nan_params, nan_fisher)


@pytest.mark.parametrize("fisher_value, match", [
    (-1.0, "cannot be negative"), (jnp.nan, "non-finite"),
    (jnp.inf, "non-finite")])
def test_ewc_penalty_refuses_a_bad_fisher_as_consolidate_does(fisher_value,
                                                              match):
  fisher = {"dense": {"kernel": jnp.ones((3, 2)).at[1, 0].set(fisher_value),
                      "bias": jnp.ones(2)}, "scale": jnp.ones(())}
  with pytest.raises(ValueError, match=r"fisher\['dense'\]\['kernel'\].*"
                     + match):
    ewc_jax.ewc_penalty(random_tree(0, PARAMS), PARAMS, fisher, 1.0)
  with pytest.raises(ValueError, match=match):
    ewc_jax.consolidate(ewc_jax.ewc(1.0).init(PARAMS), PARAMS, fisher)
  # Under jit the values are not known: no check, the same arithmetic.
  jitted = jax.jit(ewc_jax.ewc_penalty)(random_tree(0, PARAMS), PARAMS,
                                        fisher, 1.0)
  assert jitted.shape == ()


def test_ewc_penalty_refuses_a_nonfinite_anchor():
  anchor = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
            "scale": jnp.array(jnp.nan)}
  with pytest.raises(ValueError, match=r"anchor\['scale'\] has 1 non-finite"):
    ewc_jax.ewc_penalty(PARAMS, anchor, PARAMS, 1.0)


def test_literal_types_list_the_accepted_names():
  assert typing.get_args(ewc_jax.Mode) == ewc_jax._src.transform.MODES
  assert set(typing.get_args(ewc_jax.Estimator)) == set(ewc_jax.ESTIMATORS)
  assert inspect.signature(ewc_jax.ewc).parameters["mode"].annotation == (
      ewc_jax.Mode)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_the_compiled_fold_rounds_as_float32_ops_one_by_one(mode):
  # consolidate folds in one compiled program, where XLA would contract
  # c + s * (p - c) (and gamma * F + f) into fused multiply-adds, rounding
  # once: results would differ in the last bit from the op-by-op fold the
  # library had, and long runs (the quick preset's table) would change. The
  # reference is NumPy's float32, which rounds after every operation.
  rng = np.random.default_rng(0)
  draw = lambda: rng.standard_normal(4096).astype(np.float32)  # noqa: E731
  fishers = [np.square(draw()) for _ in range(3)]
  anchors = [draw() for _ in range(3)]
  gamma = np.float32(0.9)
  opt = optax.chain(ewc_jax.ewc(1.0, mode=mode, **(
      {"gamma": 0.9} if mode == "online" else {})), optax.sgd(0.1))
  state = opt.init({"w": jnp.zeros(4096)})
  a = np.zeros(4096, np.float32)
  c = np.zeros(4096, np.float32)
  for f, p in zip(fishers, anchors):
    state = ewc_jax.consolidate(state, {"w": jnp.asarray(p)},
                                {"w": jnp.asarray(f)})
    if mode == "online":
      a, c = gamma * a + f, p
    else:
      total = a + f
      share = f / np.where(total > 0, total, np.float32(1))
      c = np.where(total > 0, c + share * (p - c), p)
      a = total
  ewc_state = state[0]
  np.testing.assert_array_equal(np.asarray(ewc_state.curvature["w"]), a)
  np.testing.assert_array_equal(np.asarray(ewc_state.center["w"]), c)
