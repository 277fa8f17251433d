"""The runner's MAS and KFAC-EWC methods (issue 12): end to end on tiny data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ewc_jax
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import loop
from experiments.permuted_mnist import methods
from experiments.permuted_mnist import models
from experiments.permuted_mnist import ops
from tests.experiments import tiny


def _config(**changes):
  # 2 tasks, 10 steps each: seconds, yet every task boundary is crossed.
  return tiny.config(**{"num_tasks": 2, "hidden": (8,), "iterations": 10,
                        "learning_rate": 3e-3, **changes})


def _stream():
  return tiny.stream(num_tasks=2)


@pytest.mark.slow  # an end-to-end run: CI's own step
@pytest.mark.parametrize("method", ["mas", "kfac_ewc", "online_kfac_ewc",
                                    "online_kfac_ewc_sum"])
def test_new_methods_run_end_to_end(method):
  result = loop.run_method(_config(), _stream(), method, 0, 10.0)
  assert result.method == method and result.R.shape == (2, 2)
  assert np.all((result.R >= 0) & (result.R <= 1))
  assert np.all(result.R[np.tril_indices(2)] > 0)
  # The pull acts: a strong lambda changes task 2's training.
  free = loop.run_method(_config(), _stream(), method, 0, 0.0)
  assert not np.array_equal(free.R[1], result.R[1])


def test_kfac_ewc_with_lam_zero_equals_finetune_exactly():
  kfac = loop.run_method(_config(), _stream(), "kfac_ewc", 0, 0.0)
  finetune = loop.run_method(_config(), _stream(), "finetune", 0)
  np.testing.assert_array_equal(kfac.R, finetune.R)
  np.testing.assert_array_equal(kfac.R_val, finetune.R_val)


def test_runner_mas_importance_equals_its_closed_form():
  config = _config()
  task = _stream().tasks[0]
  graphdef, _, state = ops.init_state(config, methods.get("mas"), 10,
                                      [(1.0, 0)], batched=False)
  got = methods.mas_importance(config, graphdef, state, task,
                               jax.random.key(0))
  # Independent reference: per-example autodiff of ||f(x)||^2, |.|, mean.
  apply_fn = models.eval_apply_fn(graphdef)
  x = jnp.asarray(task.train_x)

  def one(xi):
    return jax.grad(lambda p: jnp.sum(jnp.square(apply_fn(p, xi[None]))))(
        state.params)

  want = jax.tree.map(lambda g: jnp.mean(jnp.abs(g), 0), jax.vmap(one)(x))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5,
                                                       atol=1e-7), got, want)


def test_kfac_consolidation_folds_the_task_into_the_pull():
  config = _config()
  method = methods.get("kfac_ewc")
  graphdef, tx, state = ops.init_state(config, method, 10, [(3.0, 0)],
                                       batched=False)
  state = ops.consolidate(method, config, graphdef, state, _stream().tasks[0],
                          jax.random.key(0))
  inner = [s for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda s: isinstance(s, ewc_jax.KFACEWCState))
           if isinstance(s, ewc_jax.KFACEWCState)]
  assert len(inner) == 1 and int(inner[0].kfac_num_tasks) == 1
  assert float(optax.tree_utils.tree_get(state.opt_state, "lam")) == 3.0
  # Separate mode: a per-task store with num_tasks slots, task 1 in slot 0.
  assert inner[0].kfac_mode == "separate"
  np.testing.assert_array_equal(inner[0].weight, [1.0, 0.0])
  assert all(a.shape[0] == config.num_tasks and float(jnp.trace(a[0])) > 0
             and float(jnp.abs(a[1]).max()) == 0 for a in inner[0].a)


def test_online_kfac_keeps_gamma_in_its_state_through_updates():
  config = _config(gamma=0.7)
  graphdef, tx, state = ops.init_state(
      config, methods.get("online_kfac_ewc"), 10, [(2.0, 0)], batched=False)
  grads = jax.tree.map(jnp.zeros_like, state.params)
  _, opt_state = tx.update(grads, state.opt_state, state.params)
  inner = opt_state[0].inner_state
  assert float(inner.kfac_gamma) == pytest.approx(0.7)
  assert inner.kfac_mode == "online" and inner.weight.ndim == 0  # pooled


@pytest.mark.parametrize("method", ["kfac_ewc"])
def test_vmapped_members_equal_separate_runs(method):
  out = loop.run_sweep(_config(), _stream(), method, [0.0, 10.0], [0])
  for lam, result in zip([0.0, 10.0], out.results):
    one = loop.run_method(_config(), _stream(), method, 0, lam)
    np.testing.assert_allclose(result.R, one.R, atol=1e-6)


def test_the_memory_budget_counts_the_per_task_kfac_store(monkeypatch):
  from experiments.permuted_mnist import budget
  # MLP 784-8-10: kernels [784, 8] and [8, 10], each taken with a bias.
  per_slot = (785**2 + 8**2) + (9**2 + 10**2)
  anchors = 785 * 8 + 9 * 10
  sizes = {m: budget.kfac_store_bytes(_config(methods=(m,)), 10)
           for m in ("finetune", "online_kfac_ewc", "online_kfac_ewc_sum",
                     "kfac_ewc")}
  assert sizes == {"finetune": 0, "online_kfac_ewc": 4 * per_slot,
                   "online_kfac_ewc_sum": 4 * 2 * per_slot,
                   "kfac_ewc": 4 * 2 * (per_slot + anchors)}
  config = _config(methods=("finetune", "kfac_ewc"))
  need = budget.estimate_bytes(config, tiny.dataset(), members=3)
  assert need["kfac"] == 3 * sizes["kfac_ewc"]
  # Room for everything but half the store: refused up front, by name.
  monkeypatch.setattr(budget, "available_bytes", lambda: (
      2 * need["data"] + need["state"] - need["kfac"] // 2))
  with pytest.raises(budget.MemoryBudgetError,
                     match="KFAC-EWC's per-task factors"):
    budget.check_memory(config, tiny.dataset(), members=3)


class _Interrupted(Exception):
  pass


def test_kfac_ewc_resumes_to_the_same_result(tmp_path):
  config = _config(checkpoint_every=5)
  ref = loop.run_method(config, _stream(), "kfac_ewc", 0, 10.0,
                        checkpoint_dir=tmp_path / "ref")
  done = [0]

  def hook(n):
    done[0] += n
    if done[0] >= 15:  # mid task 2, after task 1's curvature is folded in
      raise _Interrupted

  with pytest.raises(_Interrupted):
    loop.run_method(config, _stream(), "kfac_ewc", 0, 10.0,
                    checkpoint_dir=tmp_path / "run", on_chunk=hook)
  resumed = loop.run_method(config, _stream(), "kfac_ewc", 0, 10.0,
                            checkpoint_dir=tmp_path / "run")
  np.testing.assert_array_equal(resumed.R, ref.R)
  assert resumed.train_loss == ref.train_loss


def test_new_methods_have_strength_fields():
  for name in ("mas", "kfac_ewc", "online_kfac_ewc", "online_kfac_ewc_sum"):
    assert name in config_lib.METHODS
    field = config_lib.LAM_FIELDS[name]
    assert getattr(config_lib.Config(), field)


def test_vandeven_preset_uses_the_predicted_fisher_and_32x32_inputs():
  from experiments.permuted_mnist.configs import vandeven2019
  config = vandeven2019.get_config()  # unvalidated: "predicted" by name
  assert config.fisher == "predicted" and config.pad_to == 32
  assert config.kfac_fisher == "exact"
  assert "kfac_ewc" in config.methods and "mas" in config.methods


def test_pad_to_pads_before_permuting_and_feeds_a_wider_mlp():
  from experiments.permuted_mnist import tasks as tasks_lib
  ds = tiny.dataset()
  padded = tasks_lib.permuted_tasks(ds, 2, 0, pad_to=32)
  x = padded[1].train_x
  assert x.shape[1:] == (32, 32)
  # The permutation runs over 1024 pixels: the 784 real ones land anywhere,
  # and every image keeps its pixel values (a permutation of the padded one).
  plain = tasks_lib.pad_images(tasks_lib.train_val_split(
      ds.train_x, ds.train_y, 0.1, 0)[0], 32)
  np.testing.assert_array_equal(np.sort(x.reshape(len(x), -1), 1),
                                np.sort(plain.reshape(len(plain), -1), 1))
  config = _config(pad_to=32)
  assert methods.input_shape(config) == (32, 32)
  _, _, state = ops.init_state(config, methods.get("finetune"), 10,
                               [(0.0, 0)], batched=False)
  kernel = jax.tree.leaves(state.params)
  assert any(k.shape == (1024, 8) for k in kernel)
  with pytest.raises(ValueError, match="pad_to"):
    config_lib.validate(_config(pad_to=30, model="cnn"))


def test_kfac_with_the_batched_fisher_is_refused_by_name():
  with pytest.raises(ValueError, match="kfac_fisher"):
    config_lib.validate(_config(methods=("kfac_ewc",), fisher="batched"))
  config_lib.validate(_config(methods=("kfac_ewc",), fisher="batched",
                              kfac_fisher="exact"))


def test_fisher_ratio_script_estimators_match_the_library():
  from experiments.permuted_mnist import fisher_ratio
  graphdef, _, state = ops.init_state(_config(), methods.get("finetune"), 10,
                                      [(0.0, 0)], batched=False)
  apply_fn = models.eval_apply_fn(graphdef)
  task = _stream().tasks[0]
  x, y = jnp.asarray(task.train_x[:100]), jnp.asarray(task.train_y[:100])
  got = fisher_ratio.per_example_fishers(apply_fn, state.params, x, y)
  for name in ("exact", "empirical"):
    want = ewc_jax.fisher_diagonal(apply_fn, state.params, (x, y),
                                   estimator=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-9), got[name], want)
  # Mammoth's term is the empirical one weighted by p(y|x) <= 1.
  ratio = fisher_ratio.ratios(got)
  assert 0 < ratio["mammoth"][0] < ratio["empirical"][0]
