"""The optimiser state with EWC inside is a plain pytree: orbax round trip."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
import orbax.checkpoint as ocp

import ewc_jax


@pytest.mark.standard_promotion  # optax.adam / MultiSteps
def test_orbax_round_trip_of_an_ewc_optimizer_state(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones(2)}
  opt = optax.chain(
      optax.inject_hyperparams(ewc_jax.ewc, static_args=("mode", "gamma"))(
          lam=3.0, mode="online", gamma=0.7),
      optax.adam(1e-3))
  state = opt.init(params)
  for k in range(2):
    state = ewc_jax.consolidate(
        state, jax.tree.map(lambda p, k=k: p + k, params),
        jax.tree.map(lambda p, k=k: jnp.full_like(p, k + 1.0), params))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, opt.init(params))
  restored = checkpointer.restore(tmp_path / "state", target)
  chex.assert_trees_all_equal(restored, state)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  # The restored state behaves the same: same update, same penalty.
  grads = jax.tree.map(jnp.ones_like, params)
  moved = jax.tree.map(lambda p: p * 0.5, params)
  chex.assert_trees_all_equal(opt.update(grads, restored, moved)[0],
                              opt.update(grads, state, moved)[0])
  assert float(ewc_jax.penalty(moved, restored)) == float(
      ewc_jax.penalty(moved, state)) > 0
