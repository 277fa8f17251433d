"""The continual LM experiment, the parts that need no tunix.

The sequence Fisher the experiment uses (``ewc_jax.fisher_diagonal`` on
``(inputs, labels, mask)``) against Python loops over sequences, the
trainer (the lambda sweep without retracing, divergence, validation
stopping, the library's helper on the same pieces), the job's progress
bars, the corpora, the settings and
the command line's refusals. Tests that build tunix's Qwen3 are in
test_continual_lm.py (CI's LM step).
"""

import ast
import logging
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ewc_jax
from ewc_jax import continual
from experiments.common import progress as progress_lib
from experiments.continual_lm import config as config_lib
from experiments.continual_lm import corpora
from experiments.continual_lm import main as main_lib
from experiments.continual_lm import results as results_lib
from experiments.continual_lm import trainer

V, T, D = 7, 5, 4


def tiny_params(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"emb": 0.8 * jax.random.normal(k[0], (V, D)),
          "mix": 0.5 * jax.random.normal(k[1], (D, D)),
          "out": 0.8 * jax.random.normal(k[2], (D, V))}


def tiny_apply(params, tokens):
  """A causal toy LM: ``[B, T] -> [B, T, V]``; position t sees tokens <= t."""
  x = params["emb"][tokens]
  context = jnp.cumsum(x, axis=1) / jnp.arange(1, tokens.shape[1] + 1)[:, None]
  return jnp.tanh(x + context @ params["mix"]) @ params["out"]


def tiny_forward(trainable, frozen, tokens):
  del frozen
  return tiny_apply(trainable, tokens)


def _data(n=6, seed=1):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, V, (n, T)).astype(np.int32)
  labels = rng.integers(0, V, (n, T)).astype(np.int32)
  mask = rng.random((n, T)) > 0.25
  mask[:, 0] = True
  return inputs, labels, mask


@jax.jit
def _seq_grad(params, tokens, labels, mask):
  """One sequence's gradient of its masked summed log-likelihood."""
  def loglik(p):
    logp = jax.nn.log_softmax(tiny_apply(p, tokens[None])[0])
    return jnp.sum(jnp.where(mask, logp[jnp.arange(T), labels], 0.0))

  return jax.grad(loglik)(params)


def _tree_sum(trees):
  return jax.tree.map(lambda *x: sum(x), *trees)


# --- the sequence Fisher ----------------------------------------------------


@pytest.mark.slow  # an end-to-end run: CI's own step
def test_empirical_and_sampled_fisher_match_a_python_loop():
  params, (inputs, labels, mask) = tiny_params(), _data()
  tokens = mask.sum()
  want = jax.tree.map(lambda x: x / tokens, _tree_sum([
      jax.tree.map(jnp.square, _seq_grad(params, x, y, m))
      for x, y, m in zip(inputs, labels, mask)]))
  got = ewc_jax.fisher_diagonal(tiny_apply, params, (inputs, labels, mask),
                                   estimator="empirical", batch_size=4)
  chex.assert_trees_all_close(got, want, rtol=1e-5)
  per_seq = ewc_jax.fisher_diagonal(
      tiny_apply, params, (inputs, labels, mask), estimator="empirical",
      batch_size=4, normalize="sequences")
  chex.assert_trees_all_close(
      per_seq, jax.tree.map(lambda x: x * tokens / len(inputs), want),
      rtol=1e-5)
  # Sampled: tokens drawn at every position; each sequence's draws come
  # from its own key, so the chunking changes nothing.
  rng = jax.random.key(5)
  got_s = [ewc_jax.fisher_diagonal(
      tiny_apply, params, (inputs, None, mask), estimator="sampled",
      rng=rng, num_samples=2, batch_size=b) for b in (3, 4)]
  chex.assert_trees_all_close(got_s[0], got_s[1], rtol=1e-5)
  assert all(float(x.sum()) > 0 for x in jax.tree.leaves(got_s[0]))


def test_exact_fisher_is_the_expectation_of_the_sampled_one():
  params, (inputs, _, mask) = tiny_params(2), _data(2)
  # One compiled gradient of log p(v | position t), looped over in Python.
  grad_tv = jax.jit(jax.grad(lambda p, x, t, v: jax.nn.log_softmax(
      tiny_apply(p, x[None])[0])[t, v]))
  grads = []
  for x, m in zip(inputs, mask):
    probs = jax.nn.softmax(tiny_apply(params, x[None])[0])
    for t in range(T):
      for v in range(V):
        g = grad_tv(params, x, t, v)
        grads.append(jax.tree.map(
            lambda a, w=probs[t, v] * m[t]: w * a ** 2, g))
  want = jax.tree.map(lambda x: x / mask.sum(), _tree_sum(grads))
  exact = ewc_jax.fisher_diagonal(tiny_apply, params, (inputs, None, mask),
                                     estimator="exact")
  chex.assert_trees_all_close(exact, want, rtol=1e-5)
  # Monte Carlo: many draws come near the expectation (cross terms between
  # positions vanish only on average).
  sampled = ewc_jax.fisher_diagonal(
      tiny_apply, params, (inputs, None, mask), estimator="sampled",
      rng=jax.random.key(0), num_samples=400)
  for a, b in zip(jax.tree.leaves(sampled), jax.tree.leaves(exact)):
    assert abs(float(a.sum()) / float(b.sum()) - 1) < 0.1


@pytest.mark.slow  # an end-to-end run: CI's own step
def test_batched_is_the_snippets_squared_batch_mean_gradient():
  params = tiny_params(3)
  inputs, labels, _ = _data(7)
  got = ewc_jax.fisher_diagonal(tiny_apply, params, (inputs, labels, None),
                                   estimator="batched", batch_size=3)
  parts = []
  for start in range(0, 7, 3):
    x, y = inputs[start:start + 3], labels[start:start + 3]
    g = jax.grad(lambda p, x=x, y=y: jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(
            tiny_apply(p, x), y)))(params)
    n = len(x)
    parts.append(jax.tree.map(lambda a, n=n: n * a ** 2 / 7, g))
  chex.assert_trees_all_close(got, _tree_sum(parts), rtol=1e-5)


# --- the trainer -------------------------------------------------------------


def _sequences(n=24, seed=0):
  rng = np.random.default_rng(seed)
  # A learnable pattern: the next token is the previous one plus one.
  start = rng.integers(0, V, (n, 1))
  return ((start + np.arange(T + 1)[None]) % V).astype(np.int32)


def test_lambda_sweep_reuses_one_compilation_and_pulls():
  params, data = tiny_params(), _sequences()
  tx = trainer.optimizer(1e-2)
  imp = jax.tree.map(jnp.ones_like, params)
  kw = dict(importance=imp, tx=tx, num_steps=6, batch_size=8,
            steps_per_call=3)
  ft, h0 = trainer.fine_tune(tiny_forward, params, None, data, lam=0.0, **kw)
  trainer.fine_tune(tiny_forward, params, None, data, lam=3.0, **kw)  # warm
  count = []
  listener = lambda event, *a, **k: count.append(1) if (  # noqa: E731
      event == "/jax/core/compile/backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    pulled = {lam: trainer.fine_tune(tiny_forward, params, None, data,
                                     lam=lam, **kw) for lam in (1.0, 100.0)}
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not count  # lam is set in the state (tree_set), never retraced
  dist = lambda p: float(sum(jnp.sum((a - b) ** 2) for a, b in zip(  # noqa
      jax.tree.leaves(p), jax.tree.leaves(params))))
  assert dist(pulled[100.0][0]) < dist(pulled[1.0][0]) < dist(ft)
  assert np.all(h0["penalty"] == 0) and pulled[100.0][1]["penalty"][-1] > 0
  # The penalty logged is (lam / 2) sum F (theta - theta*)^2 at each step.
  one, _ = trainer.fine_tune(tiny_forward, params, None, data, lam=100.0,
                             **{**kw, "num_steps": 1})
  np.testing.assert_allclose(pulled[100.0][1]["penalty"][1],
                             ewc_jax.ewc_penalty(one, params, imp, 100.0),
                             rtol=1e-4)


def test_trainer_matches_the_library_helper():
  # Full batches (order cannot matter) and SGD: the experiment's loop and
  # continual_fine_tune are the same pieces.
  params, data = tiny_params(4), _sequences(16)
  imp = jax.tree.map(lambda x: jnp.abs(x) + 0.1, params)
  sgd = optax.sgd(0.1)
  tx = optax.chain(optax.inject_hyperparams(
      ewc_jax.ewc, static_args=("mode",))(lam=0.0), sgd)

  def loss_fn(p, seq):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        tiny_apply(p, seq[None, :-1])[0], seq[1:]))

  lib = continual.continual_fine_tune(
      loss_fn, params, None, data, lam=30.0, importance=imp, optimizer=sgd,
      num_steps=4, batch_size=16)
  got, hist = trainer.fine_tune(tiny_forward, params, None, data, lam=30.0,
                                importance=imp, tx=tx, num_steps=4,
                                batch_size=16, steps_per_call=2)
  chex.assert_trees_all_close(got, lib.params, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(hist["loss"], lib.losses, rtol=1e-5)
  np.testing.assert_allclose(hist["penalty"], lib.penalties, rtol=1e-4,
                             atol=1e-8)


def test_divergence_names_the_step_and_keep_best_returns_the_best():
  params, data = tiny_params(), _sequences()
  huge = trainer.optimizer(1e30)
  with pytest.raises(trainer.Diverged, match="at step 2") as e:
    trainer.fit(tiny_forward, params, None, data, tx=huge,
                opt_state=huge.init(params), num_steps=6, batch_size=8,
                steps_per_call=3)
  # step 1's loss is taken before the first update, step 2's after it
  assert e.value.step == 2 and not np.isfinite(e.value.loss)
  other = _sequences(16, seed=5)[:, ::-1].copy()  # reversed: unlearnt

  def evaluate_fn(p, step):
    return {"other": trainer.evaluate(tiny_forward, p, None, other)}

  tx = trainer.optimizer(3e-2)
  best, _, hist = trainer.fit(
      tiny_forward, params, None, data, tx=tx, opt_state=tx.init(params),
      num_steps=12, batch_size=8, steps_per_call=3, eval_every=3,
      evaluate_fn=evaluate_fn, keep_best="other")
  assert hist["eval_steps"] == [0, 3, 6, 9, 12]
  k = int(np.argmin(hist["eval"]["other"]))
  assert hist["best_step"] == hist["eval_steps"][k]
  assert trainer.evaluate(tiny_forward, best, None, other) == pytest.approx(
      hist["eval"]["other"][k], rel=1e-5)
  # evaluate's padded chunks against a plain mean.
  plain = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      tiny_apply(best, data[:11, :-1]), data[:11, 1:])))
  assert trainer.evaluate(tiny_forward, best, None, data[:11],
                          batch_size=4) == pytest.approx(plain, rel=1e-5)
  with pytest.raises(ValueError, match="eval_every .* multiple"):
    trainer.fit(tiny_forward, params, None, data, tx=tx, opt_state=(),
                num_steps=4, batch_size=8, steps_per_call=3, eval_every=4)


# --- progress ----------------------------------------------------------------


def test_progress_counts_every_phase_and_logs_without_a_terminal(caplog):
  # The LM study's phases on the runner's Job (experiments.common.progress).
  p = progress_lib.Job(10, desc="job", enabled=False)
  with caplog.at_level(logging.INFO, logger=progress_lib.__name__):
    with p.phase(4, desc="a", log=True) as bar:
      bar.update(1)
      bar.update(9)  # clipped to the phase's size
    assert p.done == 4
    with p.phase(6, initial=6, desc="b (kept)", log=True):
      pass  # kept from an earlier attempt: counted done
    with p.phase(0, desc="c", log=True):
      pass
  assert p.done == 10
  assert [r.getMessage().split(":")[0] for r in caplog.records] == [
      "a ...", "a", "b (kept) ...", "b (kept)", "c ...", "c"]
  assert caplog.records[-1].getMessage().endswith(
      tuple(f"(job 100%, {s} s so far)" for s in range(3)))


def test_a_phase_left_short_counts_its_steps_without_speeding_the_eta():
  p = progress_lib.Job(8, desc="job", enabled=False)
  with p.phase(5, desc="short") as bar:
    bar.update(2)  # stopped early (e.g. a phase shorter than planned)
  assert p.done == 5
  with pytest.raises(KeyboardInterrupt):  # interrupted: nothing more counted
    with p.phase(3, desc="stopped") as bar:
      bar.update(1)
      raise KeyboardInterrupt
  assert p.done == 6


def test_progress_draws_the_job_bar_and_the_phase_bar(capsys):
  p = progress_lib.Job(8, desc="job", file=sys.stderr)
  with p.phase(5, desc="pretrain") as bar:
    bar.update(2)
    p.note("compiling")
    bar.update(3)
  with p.phase(3, desc="finetune") as bar:
    bar.update(3)
  p.close()
  err = capsys.readouterr().err
  assert "job" in err and "pretrain" in err and "finetune" in err
  assert "8/8" in err and "compiling" in err


# --- corpora, settings and the command line ----------------------------------


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


def test_corpora_are_capped_and_fixed():
  cap = 50_000
  a, source = corpora.load_corpus(None, "a", "packages", cap)
  assert len(a) == cap and "numpy" in source
  b, _ = corpora.load_corpus(None, "b", "stdlib", code_cap=cap)
  assert len(b) == cap and b.count(b'"""') < 20
  assert corpora.load_corpus(None, "b", "stdlib", code_cap=cap)[0] == b
  w = corpora.windows(np.arange(11), 3, "x")
  assert w.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
  with pytest.raises(ValueError, match="x has 3 tokens"):
    corpora.windows(np.arange(3), 3, "x")


def test_presets_are_valid_and_bad_settings_are_named():
  for config in config_lib.PRESETS.values():
    config_lib.validate(config)
  base = config_lib.PRESETS["tiny"]
  for change, match in (
      (dict(lams=(1.0, 1.0)), "lams lists a value twice"),
      (dict(lams=(0.0,)), "lam must be finite and > 0"),
      (dict(methods=("ewc_sampled",)), "needs the finetune run"),
      (dict(d_model=30), "times an even head_dim"),
      (dict(num_kv_heads=3), "must divide num_heads"),
      (dict(eval_every=7), "multiple of steps_per_call"),
      (dict(vocab_size=100), "vocab_size must be at least 257"),
      (dict(max_b_rise=-1.0), "max_b_rise must be >= 0"),
  ):
    with pytest.raises(ValueError, match=match):
      config_lib.validate(config_lib.dataclasses.replace(base, **change))


def test_help_lists_every_config_field(capsys):
  assert main_lib.main(["--help"]) == 0
  text = capsys.readouterr().out
  for field in config_lib.Config.__dataclass_fields__:
    assert "--" + field.replace("_", "-") in text, field
  for flag in ("--preset", "--out", "--resume", "--overwrite", "--model-dir",
               "--mesh"):
    assert flag in text


def _one_line(capsys, text):
  err = capsys.readouterr().err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
  assert text in err, err


def test_command_line_refuses_before_any_work(tmp_path, capsys, monkeypatch):
  out = tmp_path / "run"
  assert main_lib.main(["--lam", "1", "x"]) == 2
  assert "--lam" in capsys.readouterr().err
  assert main_lib.main(["--lam", "-1", "--out", str(out)]) == 2
  _one_line(capsys, "lam must be finite and > 0")
  assert main_lib.main(["--out", ""]) == 2
  _one_line(capsys, "--out is empty")
  a_file = tmp_path / "file"
  a_file.write_text("")
  assert main_lib.main(["--out", str(a_file)]) == 2
  _one_line(capsys, "is a file, not a directory")
  previous = tmp_path / "previous"
  previous.mkdir()
  (previous / "state.json").write_text("{}")
  assert main_lib.main(["--out", str(previous)]) == 2
  _one_line(capsys, "already holds a run (state.json); pass --resume")
  assert main_lib.main(["--out", str(out), "--resume"]) == 2
  _one_line(capsys, "holds no run to continue")
  assert main_lib.main(["--out", str(previous), "--resume",
                        "--overwrite"]) == 2
  _one_line(capsys, "exclude each other")
  # Without the LM extra: one line naming the install command.
  # (Both the module and the package's attribute: where the extra is
  # installed, another test may have imported the module already.)
  monkeypatch.setitem(sys.modules, "experiments.continual_lm.experiment",
                      None)
  monkeypatch.delattr(sys.modules["experiments.continual_lm"], "experiment",
                      raising=False)
  assert main_lib.main(["--out", str(out)]) == 2
  _one_line(capsys, "pip install --no-deps -r requirements-lm.txt")
  assert not out.exists()


def test_results_table_states_the_trade_off():
  run = lambda method, lam, a, b: {  # noqa: E731
      "name": f"{method}-lam{lam:g}", "method": method, "lam": lam,
      "lam_matched": lam, "ppl_a_before": 10.0, "ppl_a_after": a,
      "ppl_b_before": 30.0, "ppl_b_after": b, "seconds": 1.0,
      "eval_steps": [0, 5], "ppl_a": [10.0, a], "ppl_b": [30.0, b]}
  results = {
      "runs": [run("finetune", 0.0, 16.0, 12.0),
               run("ewc_sampled", 10.0, 11.5, 12.3)],
      "chosen": {"lam": 10.0, "met": True, "rule": "the rule"},
      "model": {"num_params": 1000, "lora_params": None},
      "machine": {"device": "cpu", "devices": 1},
      "config": {"batched_scale": None, "fisher_batch_size": 4,
                 "seq_len": 8},
      "fisher": {}, "timing": {"runs": 2.0}, "seconds": 3.0}
  text = results_lib.results_table(results)
  assert "| EWC, sampled Fisher (chosen) | 10 |" in text
  # (11.5 - 10) / (16 - 10) = 25%; 12.3 / 12 - 1 = +2.5%
  assert "to 25% of fine-tuning's, with B's perplexity +2.5%" in text
  assert results_lib.plot(results)[:8] == b"\x89PNG\r\n\x1a\n"
