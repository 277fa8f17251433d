"""EWC with Flax NNX as it is used: nnx.Optimizer, donated nnx.jit, LoRA.

``nnx.Optimizer`` keeps its state as ``OptVariable``/``OptArray`` wrappers,
the Fisher of ``nnx.state(model, nnx.Param)`` is a State of ``Param``, and
users also hold ``nnx.to_pure_dict`` trees: the library pairs all of them by
path and keeps each tree's own structure.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ewc_jax

LAM, LR = 3.0, 0.05


class MLP(nnx.Module):

  def __init__(self, rngs, lora_rank=None):
    self.hidden = nnx.Linear(6, 8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)
    self.lora = (None if lora_rank is None else
                 nnx.LoRA(6, lora_rank, 8, rngs=rngs))

  def __call__(self, x):
    h = self.hidden(x)
    if self.lora is not None:
      h = h + self.lora(x)
    return self.out(jax.nn.relu(h))


def _pure(state):
  """A pure dict of copies (a donated step frees the model's own buffers)."""
  return jax.tree.map(jnp.copy, nnx.to_pure_dict(state))


def _task(t):
  x = jax.random.normal(jax.random.key(10 + t), (32, 6))
  return x, jnp.argmax(x[:, t:t + 3], axis=1)


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _fisher(model, x, y, wrt=nnx.Param):
  graphdef, params, rest = nnx.split(model, wrt, ...)
  apply_fn = lambda p, xs: nnx.merge(graphdef, p, rest)(xs)  # noqa: E731
  return params, ewc_jax.fisher_diagonal(apply_fn, params, (x, y))


def test_three_tasks_with_nnx_optimizer_donated_jit_and_consolidation():
  model = MLP(nnx.Rngs(0))
  tx = optax.chain(ewc_jax.ewc(LAM), optax.sgd(LR))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit(donate_argnums=(0, 1))
  def step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    opt.update(model, grads)
    return loss

  graphdef, _ = nnx.split(model, nnx.Param)
  apply_fn = lambda p, xs: nnx.merge(graphdef, p)(xs)  # noqa: E731
  anchors, fishers = [], []
  for t in range(3):
    x, y = _task(t)
    before = _pure(nnx.state(model, nnx.Param))
    step(model, opt, x, y)
    after = _pure(nnx.state(model, nnx.Param))
    # Independent reference: SGD on the task loss plus the sum of the past
    # tasks' penalties, written with pure dicts and jax.grad.
    def objective(p, anchors, fishers, x, y):
      total = _loss(nnx.merge(graphdef, nnx.State(p)), x, y)
      for a, f in zip(anchors, fishers):
        total = total + ewc_jax.ewc_penalty(p, a, f, LAM)
      return total

    grads = jax.jit(jax.grad(objective))(before, anchors, fishers, x, y)
    want = jax.tree.map(lambda p, g: p - LR * g, before, grads)
    chex.assert_trees_all_close(after, want, rtol=1e-5, atol=1e-6)
    for _ in range(10):
      step(model, opt, x, y)
    params = nnx.state(model, nnx.Param)
    fisher = ewc_jax.fisher_diagonal(apply_fn, params, (x, y))
    opt.opt_state = ewc_jax.consolidate(opt.opt_state, params, fisher)
    anchors.append(_pure(params))
    fishers.append(_pure(fisher))
    assert jax.tree.structure(opt.opt_state) == jax.tree.structure(
        nnx.Optimizer(model, tx, wrt=nnx.Param).opt_state)
  moved = jax.tree.map(lambda p: p + 0.1, anchors[-1])
  want = sum(ewc_jax.ewc_penalty(moved, a, f, LAM)
             for a, f in zip(anchors, fishers))
  np.testing.assert_allclose(ewc_jax.penalty(moved, opt.opt_state, lam=LAM),
                             want, rtol=1e-5)


def test_mixed_containers_match_by_path():
  model = MLP(nnx.Rngs(1))
  opt = nnx.Optimizer(model, optax.chain(ewc_jax.ewc(LAM), optax.adam(1e-3)),
                      wrt=nnx.Param)
  params, fisher = _fisher(model, *_task(0))
  pure_p, pure_f = nnx.to_pure_dict(params), nnx.to_pure_dict(fisher)
  results = [ewc_jax.consolidate(opt.opt_state, p, f)
             for p, f in ((params, fisher), (pure_p, fisher),
                          (params, pure_f), (pure_p, pure_f))]
  plain = optax.chain(ewc_jax.ewc(LAM), optax.adam(1e-3))
  ref = ewc_jax.consolidate(plain.init(pure_p), pure_p, pure_f)
  moved = jax.tree.map(lambda p: p * 1.5, pure_p)
  for r in results:
    assert jax.tree.structure(r) == jax.tree.structure(opt.opt_state)
    np.testing.assert_allclose(ewc_jax.penalty(moved, r, lam=LAM),
                               ewc_jax.penalty(moved, ref, lam=LAM),
                               rtol=1e-6)


def test_lora_state_holds_the_adapters_and_takes_the_full_tree():
  model = MLP(nnx.Rngs(2), lora_rank=2)
  opt = nnx.Optimizer(model, optax.chain(ewc_jax.ewc(LAM), optax.sgd(LR)),
                      wrt=nnx.LoRAParam)
  held = jax.tree.leaves(opt.opt_state[0].curvature)
  assert sum(x.size for x in held) == 6 * 2 + 2 * 8  # lora_a, lora_b only
  x, y = _task(0)
  lora_p, lora_f = _fisher(model, x, y, wrt=nnx.LoRAParam)
  all_p, all_f = _fisher(model, x, y)  # every Param, adapters included
  a = ewc_jax.consolidate(opt.opt_state, lora_p, lora_f)
  b = ewc_jax.consolidate(opt.opt_state, all_p, all_f)
  chex.assert_trees_all_close(nnx.as_pure(a), nnx.as_pure(b))
  moved = jax.tree.map(lambda p: p + 1.0, nnx.to_pure_dict(lora_p))
  np.testing.assert_allclose(
      ewc_jax.penalty(moved, a, lam=LAM),
      ewc_jax.ewc_penalty(moved, nnx.to_pure_dict(lora_p),
                          nnx.to_pure_dict(lora_f), LAM), rtol=1e-6)


def test_a_tree_without_the_state_paths_is_refused_in_one_line():
  model = MLP(nnx.Rngs(3))
  opt = nnx.Optimizer(model, optax.chain(ewc_jax.ewc(LAM), optax.sgd(LR)),
                      wrt=nnx.Param)
  params, fisher = _fisher(model, *_task(0))
  head_only = jax.tree.map(jnp.abs, nnx.to_pure_dict(params)["out"])
  with pytest.raises(ValueError) as e:
    ewc_jax.consolidate(opt.opt_state, head_only, head_only)
  msg = str(e.value)
  assert "\n" not in msg
  assert "params lacks" in msg and "['hidden']['bias']" in msg
  assert "nnx.state(model, nnx.Param)" in msg


def test_the_anchor_never_aliases_the_params():
  params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
  fisher = jax.tree.map(jnp.ones_like, params)
  for mode in ("separate", "online"):
    state = ewc_jax.consolidate(ewc_jax.ewc(1.0, mode=mode).init(params),
                                params, fisher)
    for c, p in zip(jax.tree.leaves(state.center), jax.tree.leaves(params)):
      assert c.unsafe_buffer_pointer() != p.unsafe_buffer_pointer()
