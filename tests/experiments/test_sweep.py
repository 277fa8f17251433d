"""Vmapped sweeps (``loop.run_sweep``): members equal separate runs.

Every sweep here but SI's has K = 3 members, separate-mode pull and the
same data shapes, so those tests share one compiled training chunk.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ewc_jax
from experiments.bench import sweep
from experiments.permuted_mnist import experiment
from experiments.permuted_mnist import loop
from experiments.permuted_mnist import main
from experiments.permuted_mnist import methods
from experiments.permuted_mnist import steps
from tests.experiments import tiny


_dataset = tiny.dataset
_stream = tiny.stream


def _config(**changes):
  return tiny.config(**{"epochs": 2, **changes})


def _separate_run(config, method, seed, lam):
  """One ``loop.run`` and its final parameters."""
  out = loop.run(config, _stream(), method, [(lam, seed)])
  return out.results[0], out.params


def _assert_members_equal_separate_runs(config, method, lams, seeds):
  out = loop.run_sweep(config, _stream(), method, lams, seeds)
  results = out.results
  params = [steps.member(out.params, k) for k in range(len(results))]
  assert [(r.lam, r.seed) for r in results] == [
      (float(lam), seed) for seed in seeds for lam in lams]
  for got, got_params in zip(results, params, strict=True):
    want, want_params = _separate_run(config, method, got.seed, got.lam)
    assert got.method == want.method
    for name in ("R", "R_val", "b", "b_val"):
      np.testing.assert_array_equal(getattr(got, name), getattr(want, name),
                                    err_msg=f"{name} lam={got.lam}")
    # Only the loss's division by the step count is rounded differently.
    np.testing.assert_allclose(np.concatenate(got.train_loss),
                               np.concatenate(want.train_loss), rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        got_params, want_params)


@pytest.mark.slow  # an end-to-end run: CI's own step
def test_lambdas_vmapped_equal_separate_runs():
  _assert_members_equal_separate_runs(
      _config(), "ewc", (0.5, 5.0, 50.0), (0,))


def test_si_members_equal_separate_runs():
  # SI's path integral lives in the stacked optimiser state, and its
  # consolidation (fold in, then reset the path) is vmapped per member.
  _assert_members_equal_separate_runs(_config(epochs=1), "si", (0.5, 5.0),
                                     (0,))


def test_seeds_with_a_fisher_budget_equal_separate_runs():
  # A budget smaller than the task: each member's Fisher reads its own
  # subset, so the Fishers are computed member by member.
  config = _config(fisher_examples=100)
  assert not methods.shares_fisher_data(config, _stream().tasks[0])
  _assert_members_equal_separate_runs(config, "ewc", (5.0,), (0, 1, 2))


def test_other_lambdas_and_methods_reuse_the_compiled_chunk():
  config = _config()
  loop.run_sweep(config, _stream(), "ewc", (1.0, 2.0, 3.0), (0,))
  size = steps.train_chunks._cache_size()
  for method, lams, seeds in (("ewc", (7.0, 8.0, 9.0), (1,)),
                              ("l2", (1.0,), (3, 4, 5)),
                              ("finetune", (0.0,), (0, 1, 2))):
    results = loop.run_sweep(config, _stream(), method, lams, seeds).results
    assert len(results) == 3
  assert steps.train_chunks._cache_size() == size


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_consolidate_members_equals_consolidate_per_member(mode):
  tx = methods.make_optimizer(("adam", 1e-3, 0.9, 0.999), mode)
  params = [{"w": jnp.full((2, 5), k + 1.0), "b": jnp.full((4,), -k - 0.5)}
            for k in range(3)]
  fishers = [jax.tree.map(lambda p, k=k: jnp.abs(p) * 0.1 + k, p)
             for k, p in enumerate(params)]
  gamma = 0.5 if mode == "online" else 1.0  # separate mode refuses gamma != 1
  states = [methods.set_pull(tx.init(p), 10.0 * (k + 1), gamma)
            for k, p in enumerate(params)]
  # A first task, so that the residual and gamma matter.
  states = [ewc_jax.consolidate(s, jax.tree.map(lambda x: 0.3 * x, p), f)
            for s, p, f in zip(states, params, fishers)]
  want = steps.stack([ewc_jax.consolidate(s, p, f)
                      for s, p, f in zip(states, params, fishers)])
  got = steps.consolidate_members(steps.stack(states), steps.stack(params),
                                  steps.stack(fishers))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               got, want)


def test_a_diverging_member_stops_the_sweep_and_is_named():
  # lam = 3e38 (float32's largest order): finite, so the library takes it;
  # from task 2 on the pull overflows and the member's loss becomes nan.
  with pytest.raises(loop.TrainingDiverged, match=r"\(3e\+38, 0\)"):
    loop.run_sweep(_config(), _stream(), "ewc", (1.0, 3e38, 2.0), (0,))
  with pytest.raises(ValueError, match="lam must be a finite number"):
    loop.run_sweep(_config(), _stream(), "ewc", (1.0, float("inf")), (0,))


def test_sweep_rejects_empty_and_unknown():
  with pytest.raises(ValueError, match="at least one lam"):
    loop.run_sweep(_config(), _stream(), "ewc", (), (0,))
  with pytest.raises(ValueError, match="unknown method"):
    loop.run_sweep(_config(), _stream(), "ewcc", (1.0,), (0,))
  with pytest.raises(ValueError, match="batched=True"):
    loop.run(_config(), _stream(), "ewc", [(1.0, 0), (2.0, 0)])


def test_run_experiment_with_a_shared_stream_writes_every_member(
    tmp_path, caplog):
  config = _config(methods=("finetune", "ewc"), lam=(1.0,), seeds=(0, 1, 2))
  caplog.set_level("INFO", logger="experiments")
  out = experiment.train_and_evaluate(
      config, tmp_path / "run", dataset=_dataset(), vmap=True, data_seed=0)
  logged = [r.getMessage() for r in caplog.records]
  assert [(r.method, r.seed) for r in out["results"]] == [
      (m, s) for m in ("finetune", "ewc") for s in (0, 1, 2)]
  runs = json.loads((tmp_path / "run" / "runs.json").read_text())
  assert len(runs) == 6
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["complete"]
  assert {row["method"] for row in summary["methods"]} == {"finetune", "ewc"}
  assert any("ACC %" in line for line in logged)
  assert set(out["params"]) == {(r.method, r.lam, r.seed)
                                for r in out["results"]}


def test_bench_reports_speedup_and_agreement():
  out = sweep.bench(_config(), lams=(1.0, 2.0, 3.0), dataset=_dataset(),
                    log=lambda line: None)
  (round_,) = out["rounds"]
  assert round_["speedup"] > 0
  assert round_["max_abs_R_difference"] == 0.0
  json.dumps(out)


def test_main_needs_bench():
  with pytest.raises(SystemExit):
    sweep.main([])


def test_cli_vmap_flag_runs_every_lambda(tmp_path):
  out = tmp_path / "run"
  assert main.main([
      "--dataset", "synthetic", "--methods", "ewc", "--lam", "1,100",
      "--vmap", "--num-tasks", "2", "--epochs", "1", "--hidden", "16",
      "--seeds", "0", "--out", str(out), "--no-progress"]) == 0
  runs = json.loads((out / "runs.json").read_text())
  assert sorted(r["lam"] for r in runs if r["method"] == "ewc") == [
      1.0, 100.0]
  with pytest.raises(SystemExit):
    main.main(["--vmap", "--resume", str(out)])
