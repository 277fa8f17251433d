"""``ewc_jax.continual.continual_fine_tune``, the snippet-shaped one call.

On a tiny NNX language model defined here (the library's tests need only
the library and its [test] extra, not the experiments).
"""

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ewc_jax
from ewc_jax import continual

SEQ = 16
TEXT_A = (
    "The quick brown fox jumps over the lazy dog. A bird sings in the old "
    "tree while the river runs slowly to the sea. ") * 12
TEXT_B = (
    "def add(x, y):\n  return x + y\n\nfor i in range(10):\n  print(i)\n"
    "class Node:\n  pass\n") * 12
TEXT_C = ("SELECT name, count(*) FROM users WHERE age > 30 GROUP BY name;\n"
          * 30)
# One optimiser object for every run: the jitted steps compile once. SGD
# with momentum: optax.adam's bias correction mixes a Python float with its
# int32 count, which the library tests' strict dtype promotion refuses.
OPT = optax.sgd(0.3, momentum=0.9)


class TinyLM(nnx.Module):
  """Bytes -> embedding -> causal running mean -> tanh dense -> logits."""

  def __init__(self, rngs, width=16):
    self.embed = nnx.Embed(256, width, rngs=rngs)
    self.hidden = nnx.Linear(2 * width, width, rngs=rngs)
    self.out = nnx.Linear(width, 256, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    steps = jnp.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]
    context = jnp.cumsum(x, axis=1) / steps
    return self.out(jnp.tanh(self.hidden(jnp.concatenate([x, context], -1))))


def sequences(text):
  ids = np.frombuffer(text.encode(), np.uint8).astype(np.int32)
  n = (len(ids) - 1) // SEQ
  return ids[np.arange(n)[:, None] * SEQ + np.arange(SEQ + 1)[None]]


@pytest.fixture(scope="module")
def lm():
  """A tiny LM trained briefly on A: ``(loss_fn, params, a, b)``."""
  graphdef, params = nnx.split(TinyLM(nnx.Rngs(0)), nnx.Param)

  def loss_fn(params, tokens):  # ONE sequence's mean token loss
    logits = nnx.merge(graphdef, params)(tokens[None, :-1])[0]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[1:]).mean()

  a, b = sequences(TEXT_A)[:64], sequences(TEXT_B)[:64]
  params = continual.continual_fine_tune(
      loss_fn, params, None, a, lam=0.0, optimizer=OPT, num_steps=60,
      batch_size=8).params
  return loss_fn, params, a, b


def _compiles(fn):
  """How many XLA compilations ``fn()`` triggers."""
  count = []
  listener = lambda event, *a, **k: count.append(1) if (  # noqa: E731
      event == "/jax/core/compile/backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    fn()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return len(count)


def test_pull_is_active_after_the_first_step(lm):
  loss_fn, params, a, b = lm
  kw = dict(optimizer=OPT, num_steps=3, batch_size=8, rng=jax.random.key(3))
  importance = ewc_jax.empirical_fisher(loss_fn, params, a, batch_size=16)
  ft = continual.continual_fine_tune(loss_fn, params, a, b, lam=0.0, **kw)
  ewc = continual.continual_fine_tune(loss_fn, params, None, b, lam=100.0,
                                      importance=importance, **kw)
  # Step 0 starts at the anchor: the same loss, (almost) no penalty.
  assert ewc.losses[0] == ft.losses[0]
  assert ewc.penalties[0] < 1e-6 * ewc.penalties[1]
  assert np.all(ewc.penalties[1:] > 0) and np.all(ft.penalties == 0)
  diff = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))),
                      ft.params, ewc.params)
  assert max(jax.tree.leaves(diff)) > 1e-4
  # The penalty logged is (lam / 2) sum F (theta - theta*)^2 by hand.
  one = continual.continual_fine_tune(loss_fn, params, None, b, lam=100.0,
                                      importance=importance, **{
                                          **kw, "num_steps": 1})
  want = ewc_jax.ewc_penalty(one.params, params, importance, 100.0)
  np.testing.assert_allclose(ewc.penalties[1], want, rtol=1e-4)


def test_chaining_three_corpora_equals_consolidating_by_hand(lm):
  loss_fn, p0, a, b = lm
  c = sequences(TEXT_C)[:len(b)]
  lam, steps, opt = 30.0, 4, optax.sgd(0.05)
  # Full batches: the batch order cannot matter.
  kw = dict(optimizer=opt, num_steps=steps, batch_size=len(b))
  r1 = continual.continual_fine_tune(loss_fn, p0, a, b, lam=lam, **kw)
  r2 = continual.continual_fine_tune(loss_fn, r1.params, b, c, lam=lam,
                                     opt_state=r1.opt_state, **kw)

  # The helper's chain: lam injected (set with tree_set, never retraced).
  tx = optax.chain(optax.inject_hyperparams(
      ewc_jax.ewc, static_args=("mode",))(lam=lam), opt)
  fisher = lambda p, d: ewc_jax.empirical_fisher(loss_fn, p, d)  # noqa: E731
  mean = lambda p, d: jnp.mean(jax.vmap(loss_fn, (None, 0))(p, d))  # noqa

  @jax.jit  # one compiled step: op-by-op dispatch would take seconds
  def step(p, state, data):
    updates, state = tx.update(jax.grad(mean)(p, data), state, p)
    return optax.apply_updates(p, updates), state

  state, p = tx.init(p0), p0
  for old, new in ((a, b), (b, c)):
    state = ewc_jax.consolidate(state, p, fisher(p, old))
    for _ in range(steps):
      p, state = step(p, state, new)
  chex.assert_trees_all_close(r2.params, p, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(r2.opt_state, state, rtol=1e-4, atol=1e-6)
  # Both tasks are held in the returned state.
  ewc_states = [x for x in jax.tree.leaves(
      r2.opt_state, is_leaf=lambda x: isinstance(x, ewc_jax.EWCState))
                if isinstance(x, ewc_jax.EWCState)]
  assert [int(x.num_tasks) for x in ewc_states] == [2]


def test_lambda_sweep_compiles_once(lm):
  loss_fn, params, a, b = lm
  importance = ewc_jax.empirical_fisher(loss_fn, params, a, batch_size=16)
  kw = dict(optimizer=OPT, num_steps=3, batch_size=8, importance=importance)
  continual.continual_fine_tune(loss_fn, params, a, b, lam=1.0, **kw)
  assert _compiles(lambda: continual.continual_fine_tune(
      loss_fn, params, a, b, lam=7.0, **kw)) == 0


def test_batched_is_squared_batch_mean_gradient():
  loss_fn = lambda p, z: jnp.mean((jnp.tanh(z[:3] @ p["w"]) + p["b"] - z[3])
                                  ** 2)
  params = {"w": jnp.array([[0.3, -0.2], [0.1, 0.5], [-0.4, 0.2]]),
            "b": jnp.array([0.1, -0.3])}
  data = jax.random.normal(jax.random.key(1), (10, 4))
  got = ewc_jax.empirical_fisher(loss_fn, params, data,
                                 estimator="batched", batch_size=4)
  squares = []
  for batch in (data[0:4], data[4:8], data[8:10]):  # the last one is short
    g = jax.grad(lambda p, batch=batch: jnp.mean(
        jax.vmap(loss_fn, in_axes=(None, 0))(p, batch)))(params)
    # Weighted by batch size: the short batch counts for what it holds.
    n = len(batch)
    squares.append(jax.tree.map(lambda gi, n=n: n * gi ** 2 / 10, g))
  want = jax.tree.map(lambda *s: sum(s), *squares)
  chex.assert_trees_all_close(got, want, rtol=1e-5)
  per_example = [jax.tree.map(jnp.square, jax.grad(loss_fn)(params, z))
                 for z in data]
  emp = ewc_jax.empirical_fisher(loss_fn, params, data, batch_size=4)
  chex.assert_trees_all_close(
      emp, jax.tree.map(lambda *s: sum(s) / len(s), *per_example), rtol=1e-5)


def test_bfloat16_params_give_float32_importance():
  loss_fn = lambda p, z: jnp.mean(jnp.square(z @ p["w"] - 1.0))
  params = {"w": jnp.linspace(-1, 1, 12, dtype=jnp.bfloat16).reshape(4, 3)}
  data = jax.random.normal(jax.random.key(0), (10, 4), jnp.bfloat16)
  for estimator in ("empirical", "batched"):
    imp = ewc_jax.empirical_fisher(loss_fn, params, data, batch_size=4,
                                   estimator=estimator)
    assert imp["w"].dtype == jnp.float32 and float(imp["w"].sum()) > 0
    f32 = ewc_jax.empirical_fisher(
        loss_fn, jax.tree.map(lambda x: x.astype(jnp.float32), params),
        data.astype(jnp.float32), batch_size=4, estimator=estimator)
    chex.assert_trees_all_close(imp, f32, rtol=0.05)
  r = continual.continual_fine_tune(
      loss_fn, params, None, data, lam=10.0, importance=imp, num_steps=2,
      batch_size=4, optimizer=OPT)
  assert r.params["w"].dtype == jnp.bfloat16
  assert np.isfinite(r.penalties).all() and r.penalties[1] > 0


def test_mask_leaves_parameters_out():
  loss_fn = lambda p, z: jnp.mean(jnp.square(z @ p["w"] + p["b"] - 1.0))
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  data = jax.random.normal(jax.random.key(0), (12, 4))
  kw = dict(optimizer=optax.sgd(0.1), num_steps=4, batch_size=4)
  cft = continual.continual_fine_tune
  ft = cft(loss_fn, params, None, data, lam=0.0, **kw)
  masked = cft(loss_fn, params, data, data, lam=100.0,
               mask={"w": False, "b": False}, **kw)
  held = cft(loss_fn, params, data, data, lam=100.0, **kw)
  np.testing.assert_allclose(masked.losses, ft.losses, rtol=1e-6)
  assert np.all(masked.penalties == 0) and held.penalties[-1] > 0


def test_library_clear_errors(lm):
  loss_fn, params, a, b = lm
  cft = continual.continual_fine_tune
  for kwargs, match in (
      (dict(new_data=b[:0]), "new_data holds no examples"),
      (dict(old_data=a[:0], num_steps=1, batch_size=4), "old_data: "),
      (dict(old_data=None), "old_data is None"),
      (dict(lam=-1.0), "lam must be"),
      (dict(estimator="exact"), "estimator must be"),
      (dict(new_data=b[:4], batch_size=8),
       r"batch_size \(8\) exceeds the 4 examples of new_data"),
      (dict(num_steps=0), "num_steps must be None or a positive int, got 0"),
      (dict(batch_size=8.0), "batch_size must be (None or )?a positive int"),
      (dict(fisher_batch_size=0),
       "fisher_batch_size must be (None or )?a positive int"),
      (dict(fisher_examples=0),
       "fisher_examples must be (None or )?a positive int"),
      (dict(new_data=[b, b]), "new_data must be a pytree"),
      (dict(opt_state=OPT.init(params)), "opt_state is not a state"),
  ):
    args = dict(old_data=a, new_data=b, lam=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
      cft(loss_fn, params, args.pop("old_data"), args.pop("new_data"), **args)


def test_import_ewc_jax_stays_light():
  code = ("import sys, ewc_jax, ewc_jax.continual; print(sorted(m for m in "
          "('flax', 'tensorflow_datasets', 'tyro', 'experiments', 'tunix') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True, timeout=120).stdout
  assert out.strip() == "[]"
