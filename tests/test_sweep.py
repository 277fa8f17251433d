"""Tests of experiments.sweep: vmapped members equal separate runs.

Every sweep here has K = 3 members, separate-mode pull and the same data
shapes, so the tests share one compiled training chunk.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ewc_jax
from experiments import sweep
from experiments import train
from tests import tiny


_dataset = tiny.dataset
_stream = tiny.stream


def _config(**changes):
  return tiny.config(**{"epochs": 2, **changes})


def _separate_run(monkeypatch, config, method, seed, lam):
  """``train.run_method`` and its final parameters (the last evaluated)."""
  seen = []
  evaluate = train.evaluate

  def spy(graphdef, batch_size, params, splits, masks):
    seen.append(params)
    return evaluate(graphdef, batch_size, params, splits, masks)

  with monkeypatch.context() as m:
    m.setattr(train, "evaluate", spy)
    result = train.run_method(config, _stream(), method, seed, lam)
  return result, seen[-1]


def _assert_members_equal_separate_runs(monkeypatch, config, method, lams,
                                        seeds):
  results, params = sweep.run_sweep_with_params(config, _stream(), method,
                                                lams, seeds)
  assert [(r.lam, r.seed) for r in results] == sweep.members(lams, seeds)
  for got, got_params in zip(results, params, strict=True):
    want, want_params = _separate_run(monkeypatch, config, method, got.seed,
                                      got.lam)
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


def test_lambdas_vmapped_equal_separate_runs(monkeypatch):
  _assert_members_equal_separate_runs(
      monkeypatch, _config(), "ewc", (0.5, 5.0, 50.0), (0,))


def test_seeds_with_a_fisher_budget_equal_separate_runs(monkeypatch):
  # A budget smaller than the task: each member's Fisher reads its own
  # subset, so the Fishers are computed member by member.
  config = _config(fisher_examples=100)
  assert not sweep.shares_fisher_data(config, _stream().tasks[0])
  _assert_members_equal_separate_runs(monkeypatch, config, "ewc", (5.0,),
                                      (0, 1, 2))


def test_other_lambdas_and_methods_reuse_the_compiled_chunk():
  config = _config()
  sweep.run_sweep(config, _stream(), "ewc", (1.0, 2.0, 3.0), (0,))
  size = sweep.train_chunks._cache_size()
  for method, lams, seeds in (("ewc", (7.0, 8.0, 9.0), (1,)),
                              ("l2", (1.0,), (3, 4, 5)),
                              ("finetune", (0.0,), (0, 1, 2))):
    results = sweep.run_sweep(config, _stream(), method, lams, seeds)
    assert len(results) == 3
  assert sweep.train_chunks._cache_size() == size


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_consolidate_members_equals_consolidate_per_member(mode):
  tx = train.make_optimizer(("adam", 1e-3, 0.9, 0.999), mode)
  params = [{"w": jnp.full((2, 5), k + 1.0), "b": jnp.full((4,), -k - 0.5)}
            for k in range(3)]
  fishers = [jax.tree.map(lambda p, k=k: jnp.abs(p) * 0.1 + k, p)
             for k, p in enumerate(params)]
  states = [train.init_opt_state(tx, p, 10.0 * (k + 1), 0.5)
            for k, p in enumerate(params)]
  # A first task, so that the residual and gamma matter.
  states = [ewc_jax.consolidate(s, jax.tree.map(lambda x: 0.3 * x, p), f)
            for s, p, f in zip(states, params, fishers)]
  want = sweep.stack([ewc_jax.consolidate(s, p, f)
                      for s, p, f in zip(states, params, fishers)])
  got = sweep.consolidate_members(sweep.stack(states), sweep.stack(params),
                                  sweep.stack(fishers))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               got, want)


def test_a_diverging_member_stops_the_sweep_and_is_named():
  # lam = inf: inf * 0 (no curvature yet) makes the first step nan.
  with pytest.raises(train.TrainingDiverged, match=r"\(inf, 0\)"):
    sweep.run_sweep(_config(), _stream(), "ewc", (1.0, float("inf"), 2.0),
                    (0,))


def test_members_is_seed_major_and_rejects_empty():
  assert sweep.members((1, 2), (0, 1)) == [(1.0, 0), (2.0, 0), (1.0, 1),
                                           (2.0, 1)]
  with pytest.raises(ValueError, match="at least one lam"):
    sweep.members((), (0,))
  with pytest.raises(ValueError, match="unknown method"):
    sweep.run_sweep(_config(), _stream(), "ewcc", (1.0,), (0,))


def test_run_experiment_with_a_shared_stream_writes_every_member(tmp_path):
  config = _config(methods=("finetune", "ewc"), lam=(1.0,), seeds=(0, 1, 2))
  logged = []
  out = sweep.run_experiment(config, tmp_path / "run", dataset=_dataset(),
                             data_seed=0, log=logged.append)
  assert [(r.method, r.seed) for r in out["results"]] == [
      (m, s) for m in ("finetune", "ewc") for s in (0, 1, 2)]
  runs = json.loads((tmp_path / "run" / "runs.json").read_text())
  assert len(runs) == 6
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["complete"]
  assert {row["method"] for row in summary["methods"]} == {"finetune", "ewc"}
  assert "ACC %" in logged[-1]


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
  from experiments import permuted_mnist  # noqa: PLC0415

  out = tmp_path / "run"
  assert permuted_mnist.main([
      "--dataset", "synthetic", "--methods", "ewc", "--lam", "1,100",
      "--vmap", "--num-tasks", "2", "--epochs", "1", "--hidden", "16",
      "--seeds", "0", "--out", str(out), "--no-progress"]) == 0
  runs = json.loads((out / "runs.json").read_text())
  assert sorted(r["lam"] for r in runs if r["method"] == "ewc") == [
      1.0, 100.0]
  with pytest.raises(SystemExit):
    permuted_mnist.main(["--vmap", "--resume", str(out)])
