"""The continual LM experiment on tunix's Qwen3 (CI's LM step).

A tiny random Qwen3 checkpoint is written here with safetensors under
Hugging Face's tensor names and loaded through ``--model-dir``'s code path;
its logits are compared with an independent NumPy forward pass written from
the Hugging Face architecture (hf_qwen3_reference.py), at the default and a
non-default rope_theta. Then the command line end to end: a user's
checkpoint, a resumed run, a diverging run, the offline default on a mesh.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tunix", reason="the LM extra (requirements-lm.txt)")
from safetensors.numpy import load_file  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from experiments.common import tracking  # noqa: E402
from experiments.continual_lm import experiment  # noqa: E402
from experiments.continual_lm import family  # noqa: E402
from experiments.continual_lm import main as main_lib  # noqa: E402
from experiments.continual_lm import sequences  # noqa: E402
from experiments.continual_lm import tokenizer as tok_lib  # noqa: E402
from tests.experiments import hf_qwen3_reference as reference  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROSE = ("The quick brown fox jumps over the lazy dog. A bird sings in the "
         "old tree while the river runs slowly to the sea. Naïve café, "
         "façade, 10% more. ") * 40
CODE = ("def add(x, y):\n  return x + y\n\nfor i in range(10):\n  print(i)\n"
        "class Node:\n  def __init__(self):\n    self.items = {}\n") * 40


def hf_config(**change):
  cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
         "vocab_size": 320, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
         "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
         "rope_theta": 1_000_000.0, "rope_scaling": None,
         "attention_bias": False, "use_sliding_window": False,
         "tie_word_embeddings": True, "torch_dtype": "float32"}
  cfg.update(change)
  return cfg


def write_checkpoint(d, cfg, seed=0):
  """A random checkpoint in Hugging Face's names and layouts (not ours)."""
  d = pathlib.Path(d)
  d.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  dm, f = cfg["hidden_size"], cfg["intermediate_size"]
  hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg[
      "num_key_value_heads"]
  normal = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(  # noqa
      np.float32)
  norm = lambda n: (1.0 + 0.1 * rng.standard_normal(n)).astype(  # noqa
      np.float32)
  t = {"model.embed_tokens.weight": normal(cfg["vocab_size"], dm),
       "model.norm.weight": norm(dm)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    t |= {p + "self_attn.q_proj.weight": normal(nh * hd, dm),
          p + "self_attn.k_proj.weight": normal(nkv * hd, dm),
          p + "self_attn.v_proj.weight": normal(nkv * hd, dm),
          p + "self_attn.o_proj.weight": normal(dm, nh * hd),
          p + "self_attn.q_norm.weight": norm(hd),
          p + "self_attn.k_norm.weight": norm(hd),
          p + "mlp.gate_proj.weight": normal(f, dm),
          p + "mlp.up_proj.weight": normal(f, dm),
          p + "mlp.down_proj.weight": normal(dm, f),
          p + "input_layernorm.weight": norm(dm),
          p + "post_attention_layernorm.weight": norm(dm)}
  if not cfg["tie_word_embeddings"]:
    t["lm_head.weight"] = normal(cfg["vocab_size"], dm)
  save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
  (d / "config.json").write_text(json.dumps(cfg))
  tok_lib.save(tok_lib.train([PROSE], 300), d / "tokenizer.json")
  return d


def _logits(model_dir, tokens):
  model, _, _ = family.load(model_dir)
  sp = family.split(model)
  return np.asarray(sp.apply_fn()(sp.trainable, jnp.asarray(tokens)))


@pytest.mark.parametrize("theta,tied", [(1e6, True), (1e4, False)])
def test_a_random_checkpoint_gives_the_reference_logits(tmp_path, theta,
                                                        tied):
  d = write_checkpoint(tmp_path / "ckpt",
                       hf_config(rope_theta=theta, tie_word_embeddings=tied))
  tokens = np.random.default_rng(1).integers(0, 320, (2, 24))
  got = _logits(d, tokens)
  want = reference.logits(d, tokens)
  assert got.shape == (2, 24, 320)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(
      want).max())
  # The test has power: the other theta gives other logits (by 1-25%,
  # what tunix's ignored rope_theta would have cost).
  cfg = json.loads((d / "config.json").read_text())
  cfg["rope_theta"] = 1e6 if theta != 1e6 else 1e4
  (d / "config.json").write_text(json.dumps(cfg))
  other = reference.logits(d, tokens)
  assert np.abs(other - want).max() > 1e-2 * np.abs(want).max()


def test_save_writes_what_load_reads(tmp_path):
  d = write_checkpoint(tmp_path / "ckpt", hf_config(
      rope_theta=5e6, tie_word_embeddings=False), seed=3)
  model, config, _ = family.load(d)
  out = family.save(tmp_path / "again", family.split(model).trainable,
                    config, tokenizer_json=d / "tokenizer.json",
                    max_positions=128)
  a, b = load_file(d / "model.safetensors"), load_file(
      out / "model.safetensors")
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["rope_theta"] == 5e6 and cfg["head_dim"] == 16
  assert not cfg["tie_word_embeddings"]
  assert not list(tmp_path.glob(".again*"))  # written atomically


def _one_line(capsys, text):
  err = capsys.readouterr().err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
  assert text in err, err


def test_a_config_the_model_cannot_honour_is_refused(tmp_path, capsys):
  corpus = tmp_path / "a.txt"
  corpus.write_text(PROSE)
  flags = ["--preset", "tiny", "--corpus-a", str(corpus), "--corpus-b",
           str(corpus)]
  for i, (change, text) in enumerate((
      (dict(model_type="llama"), "model_type 'llama' is not supported"),
      (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
       "rope_scaling="),
      (dict(use_sliding_window=True), "use_sliding_window=True"),
      (dict(attention_bias=True), "attention_bias=True"),
      (dict(hidden_act="gelu"), "hidden_act='gelu'"),
      (dict(num_key_value_heads=3), "num_key_value_heads (3) must divide"),
      (dict(hidden_size=0), "hidden_size must be a positive int"),
  )):
    d = write_checkpoint(tmp_path / f"c{i}", hf_config(**change))
    out = tmp_path / f"o{i}"
    assert main_lib.main([*flags, "--model-dir", str(d), "--out",
                          str(out)]) == 2
    _one_line(capsys, text)
    assert not out.exists()
  d = write_checkpoint(tmp_path / "ok", hf_config())
  (d / "tokenizer.json").unlink()
  assert main_lib.main([*flags, "--model-dir", str(d)]) == 2
  _one_line(capsys, "no tokenizer.json")
  assert main_lib.main([*flags, "--model-dir", str(tmp_path / "none")]) == 2
  _one_line(capsys, "no such directory")
  d = write_checkpoint(tmp_path / "short", hf_config())
  t = load_file(d / "model.safetensors")
  del t["model.layers.1.mlp.up_proj.weight"]
  save_file(t, str(d / "model.safetensors"))
  with pytest.raises(family.CheckpointError, match="up_proj.weight is "
                     "missing"):
    family.load(d)
  t["model.layers.1.mlp.up_proj.weight"] = np.zeros((47, 32), np.float32)
  save_file(t, str(d / "model.safetensors"))
  assert main_lib.main([*flags, "--model-dir", str(d)]) == 2
  _one_line(capsys, "up_proj.weight has shape (47, 32), config.json "
            "implies (48, 32)")
  d = write_checkpoint(tmp_path / "shortctx", hf_config(
      max_position_embeddings=15))  # the tiny preset reads 16 positions
  assert main_lib.main([*flags, "--model-dir", str(d)]) == 2
  _one_line(capsys, "more positions than the checkpoint's "
            "max_position_embeddings 15")
  assert main_lib.main([*flags, "--mesh", "3x5"]) == 2
  _one_line(capsys, "--mesh 3x5: 15 devices, but 1 are present")


def test_tokenizer_round_trips_text(tmp_path):
  tok = tok_lib.train([PROSE, CODE], 300)
  path = tok_lib.save(tok, tmp_path / "tokenizer.json")
  again = tok_lib.load(path)
  for text in (PROSE[:500], CODE[:300], "unseen: 東京 ✓ ü 🙂 \t\n  x\r\n",
               "a" * 200 + " b\n  c"):
    ids = tok_lib.encode(again, text, chunk_chars=64)
    assert tok_lib.decode(again, ids) == text
    np.testing.assert_array_equal(ids, tok_lib.encode(tok, text))
  assert tok.get_vocab_size() == 300 and tok_lib.eos_id(tok) == 0
  bad = tmp_path / "bad.json"
  bad.write_text("{}")
  with pytest.raises(ValueError, match="not a tokenizer.json"):
    tok_lib.load(bad)


def _corpora(tmp_path):
  a, b = tmp_path / "a.txt", tmp_path / "b.txt"
  a.write_text(PROSE * 2)
  b.write_text(CODE * 2)
  return ["--corpus-a", str(a), "--corpus-b", str(b)]


def test_model_dir_end_to_end_resumed_after_an_interrupt(tmp_path, capsys,
                                                         monkeypatch):
  d = write_checkpoint(tmp_path / "user", hf_config(
      max_position_embeddings=64))
  out = tmp_path / "run"
  flags = ["--preset", "tiny", "--model-dir", str(d), *_corpora(tmp_path),
           "--out", str(out), "--logdir", str(tmp_path / "tb"), "--quiet"]
  calls = []
  real = experiment.run_one

  interrupted = []

  def interrupt_third(*args, **kwargs):
    calls.append(args[1])
    if len(calls) == 3 and not interrupted:
      interrupted.append(1)
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(experiment, "run_one", interrupt_third)
  assert main_lib.main(flags) == 130
  _one_line(capsys, "interrupted; the finished phases are kept in")
  state = json.loads((out / "state.json").read_text())
  assert [r["name"] for r in state["runs"]] == ["finetune-lam0",
                                                "ewc_sampled-lam1"]
  assert set(state["fisher"]) >= {"sampled", "empirical", "batched",
                                  "lora_sampled"}
  assert not (out / "results.json").exists()
  assert main_lib.main([*flags, "--lr", "0.5", "--resume"]) == 2
  _one_line(capsys, "holds a run of another configuration (differs in: "
            "finetune_lr)")
  calls.clear()
  assert main_lib.main([*flags, "--resume"]) == 0
  # Only what was left: the rest of the sweep, then the other methods.
  assert calls == ["ewc_sampled", "ewc_empirical", "batched", "lora",
                   "lora_ewc"]
  results = json.loads((out / "results.json").read_text())
  names = [r["name"] for r in results["runs"]]
  assert names[:3] == ["finetune-lam0", "ewc_sampled-lam1",
                       "ewc_sampled-lam10"]
  lam = results["chosen"]["lam"]
  assert set(names[3:]) == {f"ewc_empirical-lam{lam:g}", "lora-lam0",
                            f"lora_ewc-lam{lam:g}",
                            f"batched-lam{lam * 8 * 16:g}"}
  assert results["model"]["dir"] == str(d)
  assert results["model"]["lora_params"] < results["model"]["num_params"]
  for r in results["runs"]:
    values = [r[k] for k in r if k.startswith("ppl_")]
    assert np.all(np.isfinite(np.hstack(values))), r["name"]
    assert r["ppl_a_before"] == pytest.approx(results["start"]["a_test"])
  # The chosen run's model, written as a Hugging Face checkpoint, loads
  # through the same path and gives the validation perplexity recorded.
  chosen = next(r for r in results["runs"]
                if r["name"] == f"ewc_sampled-lam{lam:g}")
  model, _, _ = family.load(out / "finetuned")
  sp = family.split(model)
  tok = tok_lib.load(out / "finetuned" / "tokenizer.json")
  config = main_lib.parse(flags).config
  data = sequences.tokenize(config, tok, sequences.load_texts(config))
  forward = lambda p, f, x: sp.apply_fn()(p, x)  # noqa: E731
  loss = experiment.trainer.evaluate(forward, sp.trainable, None,
                                     data["a_val"])
  assert np.exp(loss) == pytest.approx(chosen["ppl_a_val"], rel=1e-4)
  got = tracking.read_scalars(tmp_path / "tb" / "lora_ewc-lam"
                              f"{lam:g}")
  assert [s for s, _ in got["train/loss"]] == list(range(1, 11))
  assert "train/penalty" in got and "heldout/ppl_a" in got
  text = (out / "results.md").read_text()
  assert "LoRA + EWC" in text and "(chosen)" in text
  assert (out / "perplexity.png").read_bytes()[:4] == b"\x89PNG"


def test_a_diverging_run_exits_nonzero_and_keeps_the_finished_ones(
    tmp_path, capsys):
  d = write_checkpoint(tmp_path / "user", hf_config())
  out = tmp_path / "run"
  flags = ["--preset", "tiny", "--model-dir", str(d), *_corpora(tmp_path),
           "--out", str(out), "--quiet", "--methods", "finetune", "lora",
           "--lora-lr", "1e30"]
  assert main_lib.main(flags) == 1
  _one_line(capsys, "lora-lam0 diverged at step 2 (training loss nan); the "
            "finished runs are kept in")
  state = json.loads((out / "state.json").read_text())
  assert [r["name"] for r in state["runs"]] == ["finetune-lam0"]
  assert not (out / "results.json").exists()  # never a NaN in the results


def test_offline_default_trains_saves_and_loads_on_a_mesh(tmp_path):
  # Two CPU devices in a fresh process: --mesh 2x1 shards the model.
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  out = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.continual_lm", "--preset", "tiny",
       *_corpora(tmp_path), "--mesh", "2x1", "--methods", "finetune",
       "ewc_sampled", "--lam", "1", "--out", str(out), "--quiet"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert results["machine"]["devices"] == 2
  assert results["pretrain"]["best_step"] in results["pretrain"][
      "eval_steps"]
  cfg = json.loads((out / "pretrained" / "config.json").read_text())
  assert cfg["model_type"] == "qwen3" and cfg["rope_theta"] == 10_000.0
  tok = tok_lib.load(out / "pretrained" / "tokenizer.json")
  assert tok_lib.decode(tok, tok_lib.encode(tok, CODE[:200])) == CODE[:200]
  assert (out / "finetuned" / "model.safetensors").is_file()
