"""Continual fine-tuning: the library's one call, the LM experiment."""

import ast
import json
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ewc_jax
from ewc_jax import continual
from experiments.common import tracking
from experiments.continual_lm import config as config_lib
from experiments.continual_lm import corpora
from experiments.continual_lm import main as main_lib
from experiments.continual_lm import model as lm_model
from experiments.continual_lm import trainer

SEQ = 16
TEXT_A = (
    "The quick brown fox jumps over the lazy dog. A bird sings in the old "
    "tree while the river runs slowly to the sea. ") * 12
TEXT_B = (
    "def add(x, y):\n  return x + y\n\nfor i in range(10):\n  print(i)\n"
    "class Node:\n  pass\n") * 12
TEXT_C = ("SELECT name, count(*) FROM users WHERE age > 30 GROUP BY name;\n"
          * 30)
# One optimiser object and one scan length (eval_every=CHUNK) for every run:
# the jitted steps are compiled once.
OPT = optax.adam(1e-2)
CHUNK = 3


def sequences(text):
  return corpora.to_sequences(text.encode(), SEQ, "text")


@pytest.fixture(scope="module")
def lm():
  """A tiny LM trained briefly on A: ``(loss_fn, params, a, b)``."""
  graphdef, params = lm_model.make_model(
      seq_len=SEQ, d_model=16, num_heads=2, num_layers=1, seed=0)
  loss_fn = lm_model.make_loss_fn(graphdef)
  # Equal sizes: the data is an argument of the jitted steps.
  a, b = sequences(TEXT_A)[:64], sequences(TEXT_B)[:64]
  params, _, _ = trainer.fit(loss_fn, params, a, optimizer=OPT,
                             num_steps=60, batch_size=8, eval_every=CHUNK)
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


# --- the library's continual_fine_tune ---------------------------------------


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


def test_library_matches_the_experiment_trainer(lm):
  loss_fn, params, a, b = lm
  # SGD: Adam would amplify the rounding noise of zero gradients (the key
  # bias) differently in the two compilations.
  kw = dict(optimizer=optax.sgd(0.1), num_steps=5, batch_size=8,
            rng=jax.random.key(7))
  importance = ewc_jax.empirical_fisher(loss_fn, params, a, batch_size=16)
  lib = continual.continual_fine_tune(loss_fn, params, a, b, lam=50.0,
                                      fisher_batch_size=16, **kw)
  exp, hist = trainer.fine_tune(loss_fn, params, b, lam=50.0,
                                importance=importance, **kw)
  chex.assert_trees_all_close(lib.params, exp, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lib.losses, hist["loss"], rtol=1e-5)
  np.testing.assert_allclose(lib.penalties, hist["penalty"], rtol=1e-4)


def test_chaining_three_corpora_equals_consolidating_by_hand(lm):
  loss_fn, p0, a, b = lm
  c = sequences(TEXT_C)[:len(b)]
  lam, steps, opt = 30.0, 4, optax.sgd(0.05)
  # Full batches: the batch order cannot matter.
  kw = dict(optimizer=opt, num_steps=steps, batch_size=len(b))
  r1 = continual.continual_fine_tune(loss_fn, p0, a, b, lam=lam, **kw)
  r2 = continual.continual_fine_tune(loss_fn, r1.params, b, c, lam=lam,
                                     opt_state=r1.opt_state, **kw)

  tx = optax.chain(ewc_jax.ewc(lam), opt)
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
  trainer.fine_tune(loss_fn, params, b, eval_every=CHUNK, **kw, lam=1.0)
  assert _compiles(lambda: trainer.fine_tune(
      loss_fn, params, b, eval_every=CHUNK, **kw, lam=7.0)) == 0


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
      (dict(num_steps=0), "num_steps must be a positive int, got 0"),
      (dict(batch_size=8.0), "batch_size must be a positive int"),
      (dict(fisher_batch_size=0), "fisher_batch_size must be a positive int"),
      (dict(fisher_examples=0), "fisher_examples must be a positive int"),
      (dict(new_data=[b, b]), "new_data must be a pytree"),
      (dict(opt_state=OPT.init(params)), "opt_state is not a state"),
  ):
    args = dict(old_data=a, new_data=b, lam=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
      cft(loss_fn, params, args.pop("old_data"), args.pop("new_data"), **args)


def test_import_ewc_jax_stays_light():
  code = ("import sys, ewc_jax, ewc_jax.continual; print(sorted(m for m in "
          "('flax', 'tensorflow_datasets', 'tyro', 'experiments') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True, timeout=120).stdout
  assert out.strip() == "[]"


# --- the experiment's trainer -------------------------------------------------


def test_history_evaluations_and_callback(lm):
  loss_fn, params, a, b = lm
  seen = []

  def callback(step, p):
    seen.append(step)
    return {"b_loss": trainer.evaluate(loss_fn, p, b[:8])}

  new, hist = trainer.fine_tune(
      loss_fn, params, b, lam=0.0, importance=None, optimizer=OPT,
      num_steps=5, batch_size=8, eval_data={"b": b[:8]}, eval_every=CHUNK,
      callback=callback)
  assert seen == [0, 3, 5] and hist["eval_steps"].tolist() == [0, 3, 5]
  assert hist["loss"].shape == (5,) and hist["penalty"].shape == (5,)
  np.testing.assert_allclose(hist["eval"]["b"],
                             [m["b_loss"] for m in hist["metrics"]],
                             rtol=1e-6)
  assert hist["eval"]["b"][-1] == pytest.approx(
      trainer.evaluate(loss_fn, new, b[:8]), rel=1e-6)
  # evaluate's padded chunks against a plain mean.
  plain = float(jnp.mean(jax.vmap(loss_fn, (None, 0))(new, b[:11])))
  assert trainer.evaluate(loss_fn, new, b[:11], batch_size=4) == (
      pytest.approx(plain, rel=1e-5))


def test_keep_best_returns_the_best_evaluated_params(lm):
  loss_fn, params, a, b = lm
  # Training on B raises the loss on A: the best A point is the start.
  best, _, hist = trainer.fit(
      loss_fn, params, b, optimizer=OPT, num_steps=6, batch_size=8,
      eval_data={"a": a}, eval_every=CHUNK, keep_best="a")
  assert hist["eval"]["a"][-1] > hist["eval"]["a"][0]
  assert hist["best_step"] == 0
  chex.assert_trees_all_equal(best, params)
  last, _, _ = trainer.fit(loss_fn, params, b, optimizer=OPT, num_steps=6,
                           batch_size=8, eval_data={"a": a},
                           eval_every=CHUNK)
  assert trainer.evaluate(loss_fn, last, a) == pytest.approx(
      hist["eval"]["a"][-1], rel=1e-6)


def test_trainer_rejects_bad_arguments():
  loss = lambda p, z: jnp.square(z[0] @ p["w"] - z[1])
  params = {"w": jnp.zeros(3)}
  x, y = jnp.ones((8, 3)), jnp.ones(8)
  for kwargs, match in (
      (dict(eval_every=0), "eval_every must be a positive int"),
      (dict(eval_batch_size=0), "eval_batch_size must be a positive int"),
      (dict(callback=3), "callback must be callable"),
      (dict(eval_data={"old": (x[:0], y[:0])}),
       r"eval_data\['old'\] holds no examples"),
      (dict(eval_data=[x]), "eval_data must be a mapping"),
      (dict(keep_best="old"), "keep_best must name a set of eval_data"),
      (dict(batch_size=9), r"batch_size \(9\) exceeds the 8 examples"),
      (dict(num_steps=0), "num_steps must be a positive int"),
  ):
    kw = {"batch_size": 4, "optimizer": OPT, **kwargs}
    with pytest.raises(ValueError, match=match):
      trainer.fit(lambda p, z: loss(p, z), params, (x, y), **kw)
  with pytest.raises(ValueError, match="data holds no examples"):
    trainer.evaluate(loss, params, (x[:0], y[:0]))


# --- corpora, config and the command line -------------------------------------


def test_docstrings_split_from_code(tmp_path):
  path = tmp_path / "m.py"
  path.write_text(
      '"""Module doc, long enough to be kept as prose in the corpus."""\n'
      "import os\n\n"
      "def f():\n"
      '  """Only a docstring here, and long enough to count as prose."""\n\n'
      "def g(): \"\"\"Inline docstring on the def line itself, kept.\"\"\"\n\n"
      "class C:\n"
      '  """Class doc that spans\n  two lines, and is long enough."""\n'
      "  x = 1\n")
  code = corpora.without_docstrings(path)
  tree = ast.parse(code)  # still valid Python
  assert "Module doc" not in code and "Class doc" not in code
  assert "Only a docstring" not in code and "Inline docstring" in code
  assert [n.name for n in tree.body if hasattr(n, "name")] == ["f", "g", "C"]
  prose = corpora.docstrings(path)
  assert prose.split("\n\n")[0].startswith("Module doc")
  assert "Class doc that spans\ntwo lines" in prose and "import" not in prose


def test_package_corpora_are_capped_and_fixed():
  cap = 50_000
  a, source = corpora.load_corpus(None, "a", "packages", cap)
  assert len(a) == cap and "numpy" in source
  b, _ = corpora.load_corpus(None, "b", "packages", cap)
  assert len(b) == cap and b.count(b'"""') < 20
  assert corpora.load_corpus(None, "b", "packages", cap)[0] == b


def test_presets_are_valid_and_the_gpu_one_has_room():
  for config in config_lib.PRESETS.values():
    config_lib.validate(config)
  gpu = config_lib.PRESETS["gpu"]
  seen = gpu.pretrain_steps * gpu.batch_size * (gpu.seq_len + 1)
  # Under two passes over A at its cap (the packages give ~18 MB here).
  assert gpu.corpora == "packages" and seen < 2 * 0.9 * gpu.corpus_bytes
  assert gpu.pretrain_eval_every is not None


def test_bfloat16_language_model_flag():
  flags = main_lib.parse(["--preset", "tiny", "--dtype", "bfloat16",
                          "--lam", "1,10", "--out", "o", "--quiet"])
  config = flags.config
  assert config.dtype == "bfloat16" and config.seq_len == 16
  assert config.lams == (1.0, 10.0)  # commas, as the other experiment
  assert flags.out == "o" and flags.output.quiet
  graphdef, params = lm_model.make_model(
      seq_len=config.seq_len, d_model=config.d_model,
      num_heads=config.num_heads, num_layers=config.num_layers,
      dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
  tokens = jax.ShapeDtypeStruct((config.seq_len + 1,), jnp.int32)
  out = jax.eval_shape(lm_model.make_loss_fn(graphdef), params, tokens)
  assert out.shape == () and out.dtype == jnp.float32


def test_help_lists_every_config_field(capsys):
  assert main_lib.main(["--help"]) == 0
  text = capsys.readouterr().out
  for field in config_lib.Config.__dataclass_fields__:
    assert "--" + field.replace("_", "-") in text, field
  assert "--preset" in text and "--out" in text


def test_experiment_main_writes_outputs(tmp_path, capsys):
  corpus_a, corpus_b = tmp_path / "a.txt", tmp_path / "b.txt"
  corpus_a.write_text(TEXT_A * 2)
  corpus_b.write_text(TEXT_B * 2)
  out = tmp_path / "run"
  rc = main_lib.main([
      "--preset", "tiny", "--corpus-a", str(corpus_a), "--corpus-b",
      str(corpus_b), "--lam", "1", "10", "--pretrain-steps", "6", "--steps",
      "4", "--pretrain-eval-every", "2", "--out", str(out), "--logdir",
      str(tmp_path / "tb")])
  assert rc == 0
  results = json.loads((out / "results.json").read_text())
  assert [(r["method"], r["lam"]) for r in results["runs"]] == [
      ("finetune", 0.0), ("ewc", 1.0), ("ewc", 10.0), ("batched", 8.0),
      ("batched", 80.0)]
  pre = results["pretrain"]
  assert pre["eval_steps"] == [0, 2, 4, 6]
  kept = pre["eval_steps"].index(pre["best_step"])
  assert pre["ppl_a"][kept] == min(pre["ppl_a"])
  for r in results["runs"]:
    assert r["eval_steps"][0] == 0 and r["eval_steps"][-1] == 4
    assert r["ppl_a_before"] == pytest.approx(pre["ppl_a_kept"], rel=1e-5)
  assert results["importance"]["ewc"]["dtypes"] == ["float32"]
  timing = results["timing"]
  assert set(timing) >= {"compile", "train", "fisher", "other"}
  assert 0 < sum(timing.values()) <= results["seconds"] + 0.01
  assert results["importance"]["ratio_empirical_to_batched"] > 0
  assert len(results["corpora"]["a"]["sha256"]) == 64
  assert (out / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "| lambda (per-example scale) |" in (out / "results.md").read_text()
  assert "ppl A ewc" in capsys.readouterr().out
  assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files
  _check_live_metrics(tmp_path / "tb", results)


def _check_live_metrics(logdir, results):
  """--logdir: one run each, every step's loss, the held-out perplexity."""
  assert sorted(p.name for p in logdir.iterdir()) == [
      "batched-lam8.0", "batched-lam80.0", "ewc-lam1.0", "ewc-lam10.0",
      "finetune-lam0.0", "pretrain"]
  pre = tracking.read_scalars(logdir / "pretrain")
  assert [s for s, _ in pre["train/loss"]] == list(range(1, 7))
  assert "train/penalty" not in pre
  np.testing.assert_allclose([v for _, v in pre["heldout/ppl_a"]],
                             results["pretrain"]["ppl_a"][1:], rtol=1e-5)
  for r in results["runs"]:
    got = tracking.read_scalars(logdir / f"{r['method']}-lam{r['lam']!r}")
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4]
    assert ("train/penalty" in got) == (r["lam"] > 0)
    assert [s for s, _ in got["heldout/ppl_b"]] == r["eval_steps"][1:]
    np.testing.assert_allclose([v for _, v in got["heldout/ppl_b"]],
                               r["ppl_b"][1:], rtol=1e-5)


def test_experiment_rejects_bad_flags(tmp_path, capsys):
  short = tmp_path / "short.txt"
  short.write_text("tiny")
  assert main_lib.main(["--lam", "1", "x"]) == 2
  assert "--lam" in capsys.readouterr().err
  assert main_lib.main(["--lam", "-1"]) == 2
  assert "lam must be finite and >= 0" in capsys.readouterr().err
  assert main_lib.main(["--methods", "ewc", "ewc"]) == 2
  assert main_lib.main(["--preset", "tiny", "--corpus-a", str(short),
                        "--out", str(tmp_path / "o")]) == 2
  assert "corpus_a (training part) has 3 bytes" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_experiment_never_loses_results_to_its_output_directory(
    tmp_path, capsys, monkeypatch):
  # The fresh hostile pass (issue 14): results are written at the end.
  corpus_a, corpus_b = tmp_path / "a.txt", tmp_path / "b.txt"
  corpus_a.write_text(TEXT_A * 2)
  corpus_b.write_text(TEXT_B * 2)
  flags = ["--preset", "tiny", "--corpus-a", str(corpus_a), "--corpus-b",
           str(corpus_b), "--pretrain-steps", "2", "--steps", "2",
           "--methods", "finetune", "--quiet"]
  ran = []
  monkeypatch.setattr(main_lib.experiment, "run",
                      lambda config, live: ran.append(1) or {})

  def one_line(status, text):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert text in err, err
    assert status in (1, 2, 130)

  a_file = tmp_path / "file"
  a_file.write_text("")
  # before: a traceback after the whole run, the results lost
  for out in (a_file, a_file / "sub"):
    assert main_lib.main([*flags, "--out", str(out)]) == 2
    one_line(2, "is a file, not a directory")
  assert main_lib.main([*flags, "--out", ""]) == 2  # before: into "."
  one_line(2, "--out is empty")
  previous = tmp_path / "previous"
  previous.mkdir()
  (previous / "results.json").write_text("{}")
  # before: silently replaced by the new run's
  assert main_lib.main([*flags, "--out", str(previous)]) == 2
  one_line(2, "already holds a run's results (results.json); pass "
           "--overwrite")
  assert main_lib.main([*flags, "--corpus-a", str(tmp_path)]) == 2
  one_line(2, "is a directory; pass one text file")
  assert not ran  # all refused before any training

  def interrupted(config, live):
    raise KeyboardInterrupt

  monkeypatch.setattr(main_lib.experiment, "run", interrupted)
  # before: a KeyboardInterrupt traceback
  assert main_lib.main([*flags, "--out", str(tmp_path / "o")]) == 130
  one_line(130, "interrupted; nothing written to")

  def disk_full(results, out):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(main_lib.experiment, "run", lambda config, live: {})
  monkeypatch.setattr(main_lib.results_lib, "write_outputs", disk_full)
  assert main_lib.main([*flags, "--out", str(previous), "--overwrite"]) == 1
  one_line(1, "cannot write the results in")
