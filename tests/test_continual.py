"""Continual fine-tuning: entry point, importances, the LM experiment."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ewc_jax
from ewc_jax import continual
from ewc_jax._src import continual as continual_src
from experiments import continual_lm
from experiments import lm_model

SEQ = 16
TEXT_A = (
    "The quick brown fox jumps over the lazy dog. A bird sings in the old "
    "tree while the river runs slowly to the sea. ") * 12
TEXT_B = (
    "def add(x, y):\n  return x + y\n\nfor i in range(10):\n  print(i)\n"
    "class Node:\n  pass\n") * 12
# One optimiser object and one scan length (eval_every=CHUNK) for every run:
# the jitted steps are compiled once.
OPT = optax.adam(1e-2)
CHUNK = 3


def sequences(text):
  return continual_lm.to_sequences(text.encode(), SEQ, "text")


@pytest.fixture(scope="module")
def lm():
  """A tiny LM trained briefly on A: ``(loss_fn, params, a, b)``."""
  graphdef, params = lm_model.make_model(
      seq_len=SEQ, d_model=16, num_heads=2, num_layers=1, seed=0)
  loss_fn = lm_model.make_loss_fn(graphdef)
  # Equal sizes: the data is an argument of the jitted steps.
  a, b = sequences(TEXT_A)[:64], sequences(TEXT_B)[:64]
  params, _ = continual.train(loss_fn, params, a, optimizer=OPT,
                              num_steps=60, batch_size=8, eval_every=CHUNK)
  return loss_fn, params, a, b


def test_pull_is_active_after_the_first_step(lm):
  loss_fn, params, a, b = lm
  kw = dict(optimizer=OPT, num_steps=3, batch_size=8, rng=jax.random.key(3),
            eval_every=CHUNK)
  importance = continual.compute_importance(loss_fn, params, a,
                                            batch_size=16)
  ft, hist_ft = continual.continual_fine_tune(loss_fn, params, a, b, lam=0.0,
                                              **kw)
  ewc, hist = continual.continual_fine_tune(loss_fn, params, a, b, lam=100.0,
                                            importance=importance, **kw)
  # Step 0 starts at the anchor: the same loss, (almost) no penalty.
  assert hist["loss"][0] == hist_ft["loss"][0]
  assert hist["penalty"][0] < 1e-6 * hist["penalty"][1]
  assert np.all(hist["penalty"][1:] > 0)
  assert np.all(hist_ft["penalty"] == 0)
  diff = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), ft, ewc)
  assert max(jax.tree.leaves(diff)) > 1e-4
  # lam = 0 through the EWC chain is plain training (parameters with a
  # zero gradient, like the key bias, move by rounding noise under Adam).
  _, plain = continual.train(loss_fn, params, b, **kw)
  np.testing.assert_allclose(plain["loss"], hist_ft["loss"], rtol=1e-5)


def test_first_task_centre_is_exactly_the_anchor(lm):
  loss_fn, params, a, _ = lm
  importance = continual.compute_importance(loss_fn, params, a,
                                            batch_size=16)
  state = ewc_jax.consolidate(
      optax.chain(ewc_jax.ewc(1.0), OPT).init(params), params, importance)
  chex.assert_trees_all_equal(state[0].center, params)


def test_ewc_keeps_old_loss_lower_than_finetune(lm):
  loss_fn, params, a, b = lm
  kw = dict(optimizer=OPT, num_steps=39, batch_size=8, rng=jax.random.key(0),
            eval_data={"a": a, "b": b}, eval_every=CHUNK)
  _, ft = continual.continual_fine_tune(loss_fn, params, a, b, lam=0.0, **kw)
  _, ewc = continual.continual_fine_tune(loss_fn, params, a, b, lam=3000.0,
                                         fisher_batch_size=16, **kw)
  rise_ft = ft["eval"]["a"][-1] - ft["eval"]["a"][0]
  rise_ewc = ewc["eval"]["a"][-1] - ewc["eval"]["a"][0]
  assert rise_ft > 0.5  # fine-tuning on B forgets A
  assert rise_ewc < 0.5 * rise_ft
  assert ewc["eval"]["b"][-1] < ewc["eval"]["b"][0]  # and B is still learnt
  assert ewc["importance_seconds"] > 0 and ewc["estimator"] == "empirical"


def test_lambda_sweep_compiles_once(lm):
  loss_fn, params, a, b = lm
  importance = continual.compute_importance(loss_fn, params, a,
                                            batch_size=16)
  kw = dict(optimizer=OPT, num_steps=3, batch_size=8, importance=importance,
            eval_every=CHUNK)
  continual.continual_fine_tune(loss_fn, params, a, b, lam=1.0, **kw)
  size = continual_src._train_chunk._cache_size()
  continual.continual_fine_tune(loss_fn, params, a, b, lam=7.0, **kw)
  assert continual_src._train_chunk._cache_size() == size


def test_batched_is_squared_batch_mean_gradient():
  loss_fn = lambda p, z: jnp.mean((jnp.tanh(z[:3] @ p["w"]) + p["b"] - z[3])
                                  ** 2)
  params = {"w": jnp.array([[0.3, -0.2], [0.1, 0.5], [-0.4, 0.2]]),
            "b": jnp.array([0.1, -0.3])}
  data = jax.random.normal(jax.random.key(1), (10, 4))
  got = continual.compute_importance(loss_fn, params, data,
                                     estimator="batched", batch_size=4)
  squares = []
  for batch in (data[0:4], data[4:8], data[8:10]):  # the last one is short
    g = jax.grad(lambda p, batch=batch: jnp.mean(
        jax.vmap(loss_fn, in_axes=(None, 0))(p, batch)))(params)
    # Weighted by batch size: the short batch counts for what it holds.
    squares.append(jax.tree.map(lambda gi, n=len(batch): n * gi ** 2 / 10, g))
  want = jax.tree.map(lambda *s: sum(s), *squares)
  chex.assert_trees_all_close(got, want, rtol=1e-5)
  per_example = [jax.tree.map(jnp.square, jax.grad(loss_fn)(params, z))
                 for z in data]
  emp = continual.compute_importance(loss_fn, params, data, batch_size=4)
  chex.assert_trees_all_close(
      emp, jax.tree.map(lambda *s: sum(s) / len(s), *per_example), rtol=1e-5)


def test_bfloat16_params_give_float32_importance():
  loss_fn = lambda p, z: jnp.mean(jnp.square(z @ p["w"] - 1.0))
  params = {"w": jnp.linspace(-1, 1, 12, dtype=jnp.bfloat16).reshape(4, 3)}
  data = jax.random.normal(jax.random.key(0), (10, 4), jnp.bfloat16)
  for estimator in continual.IMPORTANCE_ESTIMATORS:
    imp = continual.compute_importance(loss_fn, params, data, batch_size=4,
                                       estimator=estimator)
    assert imp["w"].dtype == jnp.float32 and imp["w"].shape == (4, 3)
    assert bool(jnp.all(jnp.isfinite(imp["w"]))) and float(imp["w"].sum()) > 0
    f32 = continual.compute_importance(
        loss_fn, jax.tree.map(lambda x: x.astype(jnp.float32), params),
        data.astype(jnp.float32), batch_size=4, estimator=estimator)
    chex.assert_trees_all_close(imp, f32, rtol=0.05)
  new, hist = continual.continual_fine_tune(
      loss_fn, params, None, data, lam=10.0, importance=imp, num_steps=2,
      batch_size=4, optimizer=OPT)
  assert new["w"].dtype == jnp.bfloat16
  assert np.isfinite(hist["penalty"]).all() and hist["penalty"][1] > 0


def test_bfloat16_language_model_flag():
  args = continual_lm._flags().parse_args(["--preset", "tiny", "--dtype",
                                           "bfloat16"])
  config = continual_lm.resolve(args)
  graphdef, params = lm_model.make_model(
      seq_len=config.seq_len, d_model=config.d_model,
      num_heads=config.num_heads, num_layers=config.num_layers,
      dtype=continual_lm.DTYPES[config.dtype])
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
  tokens = jax.ShapeDtypeStruct((config.seq_len + 1,), jnp.int32)
  out = jax.eval_shape(lm_model.make_loss_fn(graphdef), params, tokens)
  assert out.shape == () and out.dtype == jnp.float32


def test_history_evaluations_and_callback(lm):
  loss_fn, params, a, b = lm
  seen = []

  def callback(step, p):
    seen.append(step)
    return {"b_loss": continual.evaluate(loss_fn, p, b[:8])}

  new, hist = continual.continual_fine_tune(
      loss_fn, params, a, b, lam=0.0, optimizer=OPT, num_steps=5,
      batch_size=8, eval_data={"b": b[:8]}, eval_every=CHUNK,
      callback=callback)
  assert seen == [0, 3, 5]
  assert hist["eval_steps"].tolist() == [0, 3, 5]
  assert hist["loss"].shape == (5,) and hist["penalty"].shape == (5,)
  np.testing.assert_allclose(hist["eval"]["b"],
                             [m["b_loss"] for m in hist["metrics"]],
                             rtol=1e-6)
  assert hist["eval"]["b"][-1] == pytest.approx(
      continual.evaluate(loss_fn, new, b[:8]), rel=1e-6)


def test_clear_errors(lm):
  loss_fn, params, a, b = lm
  cft = continual.continual_fine_tune
  with pytest.raises(ValueError, match="new_data holds no examples"):
    cft(loss_fn, params, a, b[:0], lam=1.0)
  with pytest.raises(ValueError, match="old_data"):
    cft(loss_fn, params, a[:0], b, lam=1.0, num_steps=1, batch_size=4)
  with pytest.raises(ValueError, match="old_data is None"):
    cft(loss_fn, params, None, b, lam=1.0)
  with pytest.raises(ValueError, match="lam must be"):
    cft(loss_fn, params, a, b, lam=-1.0)
  with pytest.raises(ValueError, match="estimator must be"):
    cft(loss_fn, params, a, b, estimator="exact")
  with pytest.raises(ValueError, match="batch_size"):
    cft(loss_fn, params, a, b[:4], lam=0.0, batch_size=8)
  with pytest.raises(ValueError, match="num_steps"):
    cft(loss_fn, params, a, b, lam=0.0, num_steps=0)
  with pytest.raises(ValueError, match="eval_data"):
    cft(loss_fn, params, a, b, lam=0.0, eval_data=[a])
  with pytest.raises(ValueError, match="new_data must be a pytree"):
    cft(loss_fn, params, a, [b, b], lam=0.0)
  with pytest.raises(ValueError, match="data holds no examples"):
    continual.compute_importance(loss_fn, params, a[:0])
  with pytest.raises(ValueError, match="corpus_a has 5 bytes"):
    continual_lm.to_sequences(b"hello", 16, "corpus_a")


def test_experiment_main_writes_outputs(tmp_path, capsys):
  corpus_a, corpus_b = tmp_path / "a.txt", tmp_path / "b.txt"
  corpus_a.write_text(TEXT_A * 2)
  corpus_b.write_text(TEXT_B * 2)
  out = tmp_path / "run"
  rc = continual_lm.main([
      "--preset", "tiny", "--corpus-a", str(corpus_a), "--corpus-b",
      str(corpus_b), "--lam", "1,10", "--pretrain-steps", "6", "--steps", "4",
      "--out", str(out)])
  assert rc == 0
  results = json.loads((out / "results.json").read_text())
  assert [(r["method"], r["lam"]) for r in results["runs"]] == [
      ("finetune", 0.0), ("ewc", 1.0), ("ewc", 10.0), ("batched", 8.0),
      ("batched", 80.0)]
  for r in results["runs"]:
    assert r["eval_steps"][0] == 0 and r["eval_steps"][-1] == 4
    assert r["ppl_a_before"] == pytest.approx(results["runs"][0][
        "ppl_a_before"])
  assert results["importance"]["ewc"]["dtypes"] == ["float32"]
  assert results["importance"]["batched"]["dtypes"] == ["float32"]
  assert results["importance"]["ratio_empirical_to_batched"] > 0
  assert (out / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "| lambda (per-example scale) |" in (out / "results.md").read_text()
  assert "ppl A ewc" in capsys.readouterr().out
  assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_experiment_rejects_bad_flags(tmp_path, capsys):
  short = tmp_path / "short.txt"
  short.write_text("tiny")
  assert continual_lm.main(["--lam", "1,x"]) == 2
  assert "--lam" in capsys.readouterr().err
  assert continual_lm.main(["--lam", "-1"]) == 2
  assert continual_lm.main(["--preset", "tiny", "--corpus-a", str(short),
                            "--out", str(tmp_path / "o")]) == 2
  assert "corpus_a (training part) has 3 bytes" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_mask_leaves_parameters_out():
  loss_fn = lambda p, z: jnp.mean(jnp.square(z @ p["w"] + p["b"] - 1.0))
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  data = jax.random.normal(jax.random.key(0), (12, 4))
  off = {"w": False, "b": False}
  kw = dict(optimizer=optax.sgd(0.1), num_steps=4, batch_size=4)
  _, ft = continual.continual_fine_tune(loss_fn, params, None, data,
                                        lam=0.0, **kw)
  _, masked = continual.continual_fine_tune(
      loss_fn, params, data, data, lam=100.0,
      mask=off, **kw)
  _, held = continual.continual_fine_tune(loss_fn, params, data, data,
                                          lam=100.0, **kw)
  np.testing.assert_allclose(masked["loss"], ft["loss"], rtol=1e-6)
  assert np.all(masked["penalty"] == 0) and held["penalty"][-1] > 0
