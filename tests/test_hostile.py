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
