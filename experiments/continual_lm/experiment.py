r"""Continual fine-tuning of a Qwen3 language model with EWC.

The job, in phases (each one's results are kept in the run directory as it
finishes, so an interrupted run resumes with ``--resume``):

1. **data**: corpus A (old) and B (new); each one's tail is held out, its
   first half for validation (choosing lambda), its second for the test
   (the table); never trained on.
2. **pretrain** (offline default only): a byte-level BPE tokenizer trained
   on A's training text, a small Qwen3 trained on A, saved as a Hugging
   Face checkpoint directory ``OUT/pretrained``. With ``--model-dir`` the
   user's checkpoint is used instead.
3. **load**: the checkpoint directory through :func:`family.load`, the same
   code path for a download and for ``OUT/pretrained``.
4. **fisher**: importances on A at the loaded weights: the sampled
   sequence Fisher (the true Fisher), the empirical one, the snippet's
   batched importance, and the sampled Fisher of the LoRA adapters.
5. **runs**, all from the same loaded weights, on B: ``finetune``;
   ``ewc_sampled`` at every lambda of the sweep, the lambda chosen on the
   validation texts (the lowest A perplexity among the lambdas whose B
   perplexity is within ``max_b_rise`` of fine-tuning's); then at that
   lambda ``ewc_empirical``, ``batched`` (at ``lambda * scale``), and
   ``lora`` / ``lora_ewc`` (EWC on the adapters only).

The chosen EWC model is written as a Hugging Face checkpoint
(``OUT/finetuned``). Perplexities are per token of the checkpoint's
tokenizer, on held-out text.
"""

import dataclasses
import logging
import math
import os
import pathlib
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ewc_jax
from experiments.common import progress as progress_lib
from experiments.common import tracking
from experiments.continual_lm import family
from experiments.continual_lm import hf_config
from experiments.continual_lm import sequences as seq_lib
from experiments.continual_lm import tokenizer as tok_lib
from experiments.continual_lm import trainer
from experiments.continual_lm import workdir
from experiments.continual_lm.config import Config
from experiments.continual_lm.config import validate

logger = logging.getLogger(__name__)
FISHERS = {"ewc_sampled": "sampled", "ewc_empirical": "empirical",
           "batched": "batched", "lora_ewc": "sampled"}


class RunDiverged(RuntimeError):
  """A run's training loss became nan or inf (named: method, lambda, step)."""

  def __init__(self, name: str, step: int, loss: float):
    super().__init__(f"{name} diverged at step {step} (training loss {loss})")
    self.name, self.step, self.loss = name, step, loss


@dataclasses.dataclass(frozen=True)
class LiveMetrics:
  """Where live metrics go, one run each (``pretrain``, ``ewc_sampled-lam10``).

  Scalars: ``train/loss`` and (with EWC) ``train/penalty`` at every step,
  ``heldout/ppl_a`` and ``heldout/ppl_b`` (test texts) at every evaluation.
  """

  logdir: Optional[str] = None
  wandb_project: Optional[str] = None

  def open(self, name: str, config: Config) -> tracking.Trackers:
    # purge_step 0: a run started again after an interrupt replaces the
    # curves its first attempt left (every run starts from its step 0).
    return tracking.open_trackers(
        name, logdir=self.logdir, wandb_project=self.wandb_project,
        group="continual_lm", config=dataclasses.asdict(config),
        purge_step=0)


def _open(live: Optional[LiveMetrics], name: str, config: Config):
  return tracking.Trackers() if live is None else live.open(name, config)


def _ppl(loss: float) -> float:
  return float(math.exp(min(loss, 50.0)))


# --- phases ------------------------------------------------------------------


def offline_model_config(config: Config, vocab_size: int
                         ) -> hf_config.ModelConfig:
  return hf_config.config_from_dict({
      "model_type": "qwen3", "vocab_size": vocab_size,
      "hidden_size": config.d_model, "intermediate_size": config.mlp_dim,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.d_model // config.num_heads,
      "rope_theta": config.rope_theta, "rms_norm_eps": 1e-6,
      "tie_word_embeddings": True}, where="the offline model",
      dtype=config.dtype)


def _forward(graphdef):
  """``forward(trainable, frozen, tokens)`` of one graph (cached by id).

  The same function object for the same graph, so that the compiled steps
  (cached per function) are reused; tunix's config is not hashable, so the
  graph is kept by identity.
  """
  if id(graphdef) not in _FORWARDS:
    _FORWARDS[id(graphdef)] = (graphdef, _make_forward(graphdef))
  return _FORWARDS[id(graphdef)][1]


_FORWARDS: dict = {}


def _make_forward(graphdef):
  def forward(trainable, frozen, tokens):
    return family.make_apply_fn(graphdef, frozen)(trainable, tokens)
  return forward


def pretrain(config: Config, run_dir: workdir.RunDir, texts, progress, live):
  """Tokenizer and a small Qwen3 trained on A, saved as a checkpoint."""
  with progress.phase(0, desc="tokenizer", log=True):
    # On A's training text only, as a real checkpoint's tokenizer knows its
    # pretraining data and not the new domain's.
    tok = tok_lib.train([texts["a"][0]["train"]], config.vocab_size)
    tok_path = run_dir.out / "tokenizer.json"
    tok_lib.save(tok, tok_path)
    data = seq_lib.tokenize(config, tok, texts)
  model_config = offline_model_config(config, tok.get_vocab_size())
  params = family.init_params(model_config, config.seed)
  model = family.build(model_config, params)
  sp = family.split(model)
  forward = _forward(sp.graphdef)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.pretrain_lr, min(100, config.pretrain_steps // 10 + 1),
      config.pretrain_steps, config.pretrain_lr / 10)
  tx = trainer.optimizer(schedule)
  a_val = data["a_val"]

  def evaluate_fn(p, step):
    return {"a": trainer.evaluate(forward, p, sp.rest, a_val)}

  with progress.phase(config.pretrain_steps, desc="pretrain on A",
                      log=True) as bar, \
      _open(live, "pretrain", config) as trackers:
    progress.note(f"{family.num_params(sp.trainable):,} parameters")

    def on_steps(first, losses, pens):
      del pens
      for i, loss in enumerate(losses):
        trackers.scalars({"train/loss": loss}, first + i + 1)
      bar.update(len(losses))

    params, _, hist = trainer.fit(
        forward, sp.trainable, sp.rest, data["a_train"], tx=tx,
        opt_state=tx.init(sp.trainable), num_steps=config.pretrain_steps,
        batch_size=config.batch_size, seed=config.seed,
        steps_per_call=config.steps_per_call,
        eval_every=config.pretrain_eval_every, evaluate_fn=evaluate_fn,
        keep_best="a", on_steps=on_steps)
    for step, loss in zip(hist["eval_steps"], hist["eval"]["a"]):
      trackers.scalars({"heldout/ppl_a_val": _ppl(loss)}, step)
  family.save(run_dir.pretrained, params, model_config,
              tokenizer_json=tok_path, max_positions=config.seq_len,
              eos_token_id=tok_lib.eos_id(tok))
  kept = hist["eval_steps"].index(hist["best_step"])
  run_dir.state["pretrain"] = {
      "steps": config.pretrain_steps, "seconds": hist["seconds"],
      "eval_steps": hist["eval_steps"],
      "ppl_a_val": [_ppl(x) for x in hist["eval"]["a"]],
      "best_step": int(hist["best_step"]),
      "ppl_a_val_kept": _ppl(hist["eval"]["a"][kept]),
      "final_train_loss": float(np.mean(hist["loss"][-20:])),
  }
  run_dir.save()
  logger.info("trained on A in %.0f s; kept step %d (A validation "
              "perplexity %.2f)", hist["seconds"], hist["best_step"],
              run_dir.state["pretrain"]["ppl_a_val_kept"])


def importances(config: Config, run_dir: workdir.RunDir, full, lora, data,
                progress) -> dict[str, Any]:
  """``{method: importance}`` on A, loaded from the run directory if done."""
  a = data["a_train"][:config.fisher_examples]
  found = {}
  wanted = sorted({m for m in config.methods if m in FISHERS})
  for method in wanted:
    estimator = FISHERS[method]
    sp = lora if method == "lora_ewc" else full
    key = "lora_sampled" if method == "lora_ewc" else estimator
    if key in found:
      continue
    units = -(-len(a) * (config.fisher_samples if estimator == "sampled"
                         else 1) // config.fisher_batch_size)
    cached = run_dir.load_tree(key, sp.trainable)
    if cached is not None and key in run_dir.state["fisher"]:
      found[key] = cached
      with progress.phase(units, initial=units, desc=f"fisher {key} (kept)",
                          log=True):
        pass
      continue
    with progress.phase(units, desc=f"fisher {key}", log=True):
      forward = _forward(sp.graphdef)
      apply_fn = lambda p, x, f=forward, r=sp.rest: f(p, r, x)  # noqa: E731
      start = time.perf_counter()
      value = jax.block_until_ready(ewc_jax.fisher_diagonal(
          apply_fn, sp.trainable, (a[:, :-1], a[:, 1:], None),
          estimator=estimator, rng=jax.random.key(config.seed),
          num_samples=config.fisher_samples,
          batch_size=config.fisher_batch_size))
      seconds = time.perf_counter() - start
    run_dir.save_tree(key, value)
    run_dir.state["fisher"][key] = {
        "estimator": estimator, "seconds": seconds,
        "sum": float(sum(jnp.sum(x) for x in jax.tree.leaves(value))),
        "dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(value)}),
        "sequences": int(len(a)), "lora": method == "lora_ewc"}
    run_dir.save()
    found[key] = value
  info = run_dir.state["fisher"]
  if "sampled" in found and "empirical" in found:
    info["ratio_empirical_to_sampled"] = (info["empirical"]["sum"]
                                          / info["sampled"]["sum"])
  if "sampled" in found and "batched" in found:
    info["ratio_sampled_to_batched"] = (info["sampled"]["sum"]
                                        / info["batched"]["sum"])
    flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(
        found[m])]).astype(np.float64) for m in ("sampled", "batched")]
    info["cosine_sampled_batched"] = float(
        flat[0] @ flat[1] / (np.linalg.norm(flat[0])
                             * np.linalg.norm(flat[1]) + 1e-300))
  return {m: found["lora_sampled" if m == "lora_ewc" else FISHERS[m]]
          for m in wanted}


def _plan(config: Config, lam: Optional[float]):
  """The runs after the sweep, at the chosen lambda."""
  out = []
  for method in config.methods:
    if method in ("finetune", "ewc_sampled"):
      continue
    if method == "lora":
      out.append((method, 0.0, 0.0))
    elif method == "batched":
      out.append((method, lam * config.scale(), lam))
    else:
      out.append((method, lam, lam))
  return out


def _run_name(method: str, lam: float) -> str:
  return f"{method}-lam{lam:g}"


def run_one(config: Config, method: str, lam: float, matched: float, sp,
            importance, data, start_eval, progress, live):
  """One fine-tuning run on B; returns its result row and trained params."""
  forward = _forward(sp.graphdef)
  lora = method.startswith("lora")
  tx = _TX.setdefault((lora, config.lora_lr if lora else config.finetune_lr),
                      trainer.optimizer(config.lora_lr if lora
                                        else config.finetune_lr))
  name = _run_name(method, lam)

  def evaluate_fn(p, step):
    if step == 0:
      return {"a": start_eval["a_test"], "b": start_eval["b_test"]}
    return {"a": trainer.evaluate(forward, p, sp.rest, data["a_test"]),
            "b": trainer.evaluate(forward, p, sp.rest, data["b_test"])}

  with progress.phase(config.finetune_steps, desc=name, log=True) as bar, \
      _open(live, name, config) as trackers:
    def on_steps(first, losses, pens):
      for i, (loss, pen) in enumerate(zip(losses, pens, strict=True)):
        values = {"train/loss": loss}
        if lam > 0:
          values["train/penalty"] = pen
        trackers.scalars(values, first + i + 1)
      bar.update(len(losses))

    try:
      params, hist = trainer.fine_tune(
          forward, sp.trainable, sp.rest, data["b_train"], lam=lam,
          importance=importance, tx=tx, num_steps=config.finetune_steps,
          batch_size=config.batch_size, seed=config.seed + 1,
          steps_per_call=config.steps_per_call,
          eval_every=config.eval_every, evaluate_fn=evaluate_fn,
          on_steps=on_steps)
    except trainer.Diverged as e:
      raise RunDiverged(name, e.step, e.loss) from None
    for step, a, b in zip(hist["eval_steps"], hist["eval"]["a"],
                          hist["eval"]["b"], strict=True):
      trackers.scalars({"heldout/ppl_a": _ppl(a), "heldout/ppl_b": _ppl(b)},
                       step)
  a_val = trainer.evaluate(forward, params, sp.rest, data["a_val"])
  b_val = trainer.evaluate(forward, params, sp.rest, data["b_val"])
  ppl_a = [_ppl(x) for x in hist["eval"]["a"]]
  ppl_b = [_ppl(x) for x in hist["eval"]["b"]]
  row = {
      "name": name, "method": method, "lam": float(lam),
      "lam_matched": float(matched), "estimator": FISHERS.get(method),
      "lora": lora, "trainable_params": family.num_params(sp.trainable),
      "ppl_a_before": ppl_a[0], "ppl_a_after": ppl_a[-1],
      "ppl_b_before": ppl_b[0], "ppl_b_after": ppl_b[-1],
      "ppl_a_val": _ppl(a_val), "ppl_b_val": _ppl(b_val),
      "eval_steps": hist["eval_steps"], "ppl_a": ppl_a, "ppl_b": ppl_b,
      "final_loss": float(np.mean(hist["loss"][-10:])),
      "final_penalty": float(hist["penalty"][-1]),
      "seconds": hist["seconds"],
  }
  logger.info("%-22s ppl A %.2f -> %.2f, ppl B %.2f -> %.2f (%.0f s)", name,
              ppl_a[0], ppl_a[-1], ppl_b[0], ppl_b[-1], hist["seconds"])
  return row, params


_TX: dict = {}


def choose(config: Config, runs: list[dict]) -> Optional[dict]:
  """The lambda of the sweep chosen on the validation texts (or None).

  Among the ``ewc_sampled`` runs whose B validation perplexity is at most
  ``(1 + max_b_rise)`` times fine-tuning's, the one with the lowest A
  validation perplexity; where none qualifies, the one with the lowest B
  validation perplexity (and ``met`` False). Test texts are never read.
  """
  sweep = [r for r in runs if r["method"] == "ewc_sampled"]
  if not sweep:
    return None
  ft = next((r for r in runs if r["method"] == "finetune"), None)
  if ft is None:
    best = sweep[0]
    return {"lam": best["lam"], "met": None, "rule": "the only lambda"}
  limit = (1.0 + config.max_b_rise) * ft["ppl_b_val"]
  ok = [r for r in sweep if r["ppl_b_val"] <= limit]
  if ok:
    best = min(ok, key=lambda r: r["ppl_a_val"])
  else:
    best = min(sweep, key=lambda r: r["ppl_b_val"])
  return {"lam": best["lam"], "met": bool(ok), "b_val_limit": limit,
          "rule": f"lowest A validation perplexity with B validation "
                  f"perplexity <= (1 + {config.max_b_rise:g}) x finetune's"}


def total_units(config: Config, pretraining: bool) -> int:
  runs = sum(len(config.lams) if m == "ewc_sampled" else 1
             for m in config.methods)
  fisher = sum(-(-config.fisher_examples * (
      config.fisher_samples if FISHERS[m] == "sampled" else 1)
      // config.fisher_batch_size) for m in set(config.methods) & set(FISHERS))
  return ((config.pretrain_steps if pretraining else 0) + fisher
          + runs * config.finetune_steps)


def run(config: Config, out: str | os.PathLike, *,
        live: Optional[LiveMetrics] = None, resume: bool = False,
        show_progress: Optional[bool] = None) -> dict[str, Any]:
  """The whole job (see the module docstring); returns the results.

  Args:
    config: the settings (validated here).
    out: the run directory (state, checkpoints, results).
    live: live metrics (TensorBoard, W&B); None: none.
    resume: continue the run in ``out`` (same configuration).
    show_progress: draw progress bars; None: where stderr is a terminal.

  Raises:
    RunDiverged: a run's loss became non-finite; the finished runs are
      kept in ``out/state.json``.
    hf_config.CheckpointError, ValueError: bad checkpoint or data (one line).
  """
  validate(config)
  start = time.perf_counter()
  run_dir = workdir.RunDir(pathlib.Path(out), config)
  if resume:
    run_dir.load()
  run_dir.out.mkdir(parents=True, exist_ok=True)
  run_dir.save()
  texts = seq_lib.load_texts(config)
  offline = config.model_dir is None
  model_dir = run_dir.pretrained if offline else pathlib.Path(
      config.model_dir)
  mesh = family.make_mesh(config.mesh)
  progress = progress_lib.Job(
      total_units(config, offline), desc="job",
      enabled=show_progress is not False,
      file=sys.stderr if show_progress else None)  # None: a terminal only
  timing = {}
  with progress, progress.logging():
    t = time.perf_counter()
    if offline and not (run_dir.state["pretrain"]
                        and run_dir.pretrained.is_dir()):
      pretrain(config, run_dir, texts, progress, live)
    elif offline:
      with progress.phase(config.pretrain_steps,
                          initial=config.pretrain_steps,
                          desc="pretrain on A (kept)", log=True):
        pass
    timing["pretrain"] = time.perf_counter() - t
    t = time.perf_counter()
    with progress.phase(0, desc="load checkpoint", log=True):
      model, model_config, hf = family.load(model_dir, dtype=config.dtype,
                                            mesh=mesh)
      tok = tok_lib.load(model_dir / "tokenizer.json")
      data = seq_lib.tokenize(config, tok, texts)
      full = family.split(model)
      lora = None
      if any(m.startswith("lora") for m in config.methods):
        lora = family.split(family.with_lora(
            family.build(model_config, full.trainable),
            rank=config.lora_rank, alpha=config.lora_alpha,
            seed=config.seed), lora=True)
      forward = _forward(full.graphdef)
      start_eval = {k: trainer.evaluate(forward, full.trainable, full.rest,
                                        data[k])
                    for k in ("a_val", "a_test", "b_val", "b_test")}
    timing["load"] = time.perf_counter() - t
    logger.info("model: Qwen3 %s parameters (%s); A: %d train / %d val / %d "
                "test sequences, B: %d / %d / %d",
                f"{family.num_params(full.trainable):,}", config.dtype,
                *[data["info"][w][f"{s}_sequences"] for w in "ab"
                  for s in ("train", "val", "test")])
    t = time.perf_counter()
    found = importances(config, run_dir, full, lora, data, progress)
    timing["fisher"] = time.perf_counter() - t
    t = time.perf_counter()
    done = {r["name"]: r for r in run_dir.state["runs"]}

    def do(method, lam, matched):
      name = _run_name(method, lam)
      if name in done:
        with progress.phase(config.finetune_steps,
                            initial=config.finetune_steps,
                            desc=f"{name} (kept)", log=True):
          pass
        return done[name], None
      sp = lora if method.startswith("lora") else full
      row, params = run_one(config, method, lam, matched, sp,
                            found.get(method), data, start_eval, progress,
                            live)
      run_dir.state["runs"].append(row)
      done[name] = row
      run_dir.save()
      return row, params

    if "finetune" in config.methods:
      do("finetune", 0.0, 0.0)
    if "ewc_sampled" in config.methods:
      for lam in config.lams:
        row, params = do("ewc_sampled", lam, lam)
        chosen = choose(config, run_dir.state["runs"])
        if params is not None and chosen["lam"] == lam:
          family.save(run_dir.finetuned, params, model_config,
                      tokenizer_json=model_dir / "tokenizer.json",
                      max_positions=hf.get("max_position_embeddings",
                                           config.seq_len),
                      eos_token_id=hf.get("eos_token_id"))
        run_dir.state["chosen"] = chosen
        run_dir.save()
    chosen = run_dir.state["chosen"]
    lam = chosen["lam"] if chosen else config.lams[0]
    for method, value, matched in _plan(config, lam):
      do(method, value, matched)
    timing["runs"] = time.perf_counter() - t
  order = {n: i for i, n in enumerate(
      [_run_name("finetune", 0.0)]
      + [_run_name("ewc_sampled", x) for x in config.lams])}
  runs = sorted(run_dir.state["runs"], key=lambda r: order.get(r["name"],
                                                               len(order)))
  return {
      "config": dataclasses.asdict(config),
      "machine": {
          "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind),
          "devices": jax.device_count(),
          "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "optax": optax.__version__,
          "tunix": _version("google-tunix"), "qwix": _version("qwix"),
          "tokenizers": _version("tokenizers"),
      },
      "model": {"dir": None if offline else str(model_dir),
                "family": "qwen3", "config": {k: hf.get(k) for k in (
                    "vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "rope_theta",
                    "tie_word_embeddings")},
                "num_params": family.num_params(full.trainable),
                "lora_params": (None if lora is None
                                else family.num_params(lora.trainable))},
      "corpora": data["info"],
      "start": {k: _ppl(v) for k, v in start_eval.items()},
      "pretrain": run_dir.state["pretrain"],
      "fisher": run_dir.state["fisher"],
      "chosen": run_dir.state["chosen"],
      "runs": runs,
      "seconds": time.perf_counter() - start,
      "timing": timing,
  }


def _version(name: str) -> Optional[str]:
  from importlib import metadata  # noqa: PLC0415

  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None
