"""Property-based tests of the transformation over random pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

import ewc_jax

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def trees(draw):
  """A random nested dict of arrays of random shapes and float dtypes."""
  n = draw(st.integers(1, 4))
  seed = draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  tree = {}
  for i in range(n):
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    leaf = jnp.asarray(rng.normal(size=draw(shapes)), dtype)
    if draw(st.booleans()):
      tree[f"group{i}"] = {"w": leaf}
    else:
      tree[f"leaf{i}"] = leaf
  return tree, rng


def like(tree, rng, scale=1.0, positive=False):
  def make(x):
    v = rng.normal(size=x.shape) * scale
    return jnp.asarray(np.abs(v) if positive else v, x.dtype)
  return jax.tree.map(make, tree)


@settings(max_examples=20, deadline=None)
@given(trees(), st.floats(0.0, 1e4), st.sampled_from(["separate", "online"]),
       st.floats(0.05, 1.0), st.integers(0, 3))
def test_transformation_properties(tree_rng, lam, mode, gamma, tasks):
  params, rng = tree_rng
  # gamma decays old tasks only online; separate mode refuses gamma != 1.
  opt = ewc_jax.ewc(lam, mode=mode, gamma=gamma if mode == "online" else 1.0)
  state = opt.init(params)
  shapes0 = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  for _ in range(tasks):
    fisher = jax.tree.map(lambda x: x.astype(jnp.float32),
                          like(params, rng, 10.0, positive=True))
    state = ewc_jax.consolidate(state, like(params, rng), fisher)
    # consolidate never changes state shapes or dtypes.
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes0
  updates = like(params, rng)
  new_updates, new_state = jax.jit(opt.update)(updates, state, params)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state) == shapes0
  for u, nu in zip(jax.tree.leaves(updates), jax.tree.leaves(new_updates)):
    assert nu.dtype == u.dtype and nu.shape == u.shape
    # finite wherever the exact pull fits the dtype's range
    if u.dtype == jnp.float32:
      assert bool(jnp.all(jnp.isfinite(nu)))
  penalty = ewc_jax.penalty(params, new_state, lam=lam)
  assert bool(jnp.isfinite(penalty)) and float(penalty) >= 0
  if tasks == 0:
    for u, nu in zip(jax.tree.leaves(updates), jax.tree.leaves(new_updates)):
      np.testing.assert_array_equal(np.asarray(nu, np.float32),
                                    np.asarray(u, np.float32))


@settings(max_examples=20, deadline=None)
@given(trees(), st.floats(0.0, 100.0))
def test_pull_is_the_gradient_of_the_penalty(tree_rng, lam):
  params, rng = tree_rng
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  anchor = like(params, rng)
  fisher = like(params, rng, positive=True)
  opt = optax.chain(ewc_jax.ewc(lam), optax.identity())
  state = ewc_jax.consolidate(opt.init(params), anchor, fisher)
  zeros = jax.tree.map(jnp.zeros_like, params)
  pull, _ = opt.update(zeros, state, params)
  grad = jax.grad(ewc_jax.ewc_penalty)(params, anchor, fisher, lam)
  for a, b in zip(jax.tree.leaves(pull), jax.tree.leaves(grad)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * (1 + lam))
