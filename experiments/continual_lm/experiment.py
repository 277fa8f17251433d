r"""Continual fine-tuning of a byte-level language model with EWC.

A small transformer LM (:mod:`experiments.continual_lm.model`) is trained on
corpus A, then fine-tuned on corpus B three ways: plain fine-tuning, EWC with
the per-example empirical Fisher, and EWC with the PyTorch snippet's
"batched" importance (squared mini-batch mean gradients). Perplexity on
held-out text of A (what should be kept) and B (what is learnt) is recorded
during the fine-tuning. Corpora: :mod:`experiments.continual_lm.corpora`.

Lambda: ``lams`` are per-example-Fisher-scale strengths. EWC runs at each
value; the batched importance is about ``F / batch_size``, so it runs at
``lam * batched_scale`` (default ``fisher_batch_size``) to be matched.
"""

import dataclasses
import hashlib
import logging
import math
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ewc_jax
from experiments.common import timing as timing_lib
from experiments.common import tracking
from experiments.continual_lm import corpora
from experiments.continual_lm import model as lm_model
from experiments.continual_lm import trainer
from experiments.continual_lm.config import Config
from experiments.continual_lm.config import validate

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ESTIMATOR = {"ewc": "empirical", "batched": "batched"}
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LiveMetrics:
  """Where live metrics go, one run each (``pretrain``, ``ewc-lam10.0``).

  Scalars: ``train/loss`` and (with EWC) ``train/penalty`` at every step,
  ``heldout/ppl_a`` and ``heldout/ppl_b`` at every evaluation.

  Attributes:
    logdir: TensorBoard event files, one subdirectory per run.
    wandb_project: a W&B project (needs ``wandb``), or ``None``.
  """

  logdir: Optional[str] = None
  wandb_project: Optional[str] = None

  def open(self, name: str, config: Config) -> tracking.Trackers:
    return tracking.open_trackers(
        name, logdir=self.logdir, wandb_project=self.wandb_project,
        group="continual_lm", config=dataclasses.asdict(config))


def _chunk_hook(trackers: tracking.Trackers, penalty: bool):
  """A :func:`trainer.fit` chunk hook writing to ``trackers``."""

  def hook(first, losses, penalties, evals):
    for i, (loss, pen) in enumerate(zip(losses, penalties, strict=True)):
      values = {"train/loss": loss}
      if penalty:
        values["train/penalty"] = pen
      trackers.scalars(values, first + i + 1)
    if evals:
      trackers.scalars({f"heldout/ppl_{name}": _ppl([loss])[0]
                        for name, loss in evals.items()},
                       first + len(losses))

  return hook


def split_corpus(text: bytes, config: Config,
                 name: str) -> tuple[np.ndarray, np.ndarray]:
  """Train and held-out sequences: the held-out text is the tail."""
  cut = int(len(text) * (1.0 - config.heldout_fraction))
  train = corpora.to_sequences(text[:cut], config.seq_len,
                               f"{name} (training part)")
  test = corpora.to_sequences(text[cut:], config.seq_len,
                              f"{name} (held-out part)")
  if len(train) < config.batch_size:
    raise ValueError(
        f"{name} gives {len(train)} training sequences of {config.seq_len} "
        f"bytes, fewer than batch_size {config.batch_size}; use a longer "
        "text or a smaller seq_len / batch_size.")
  rng = np.random.default_rng(config.seed)
  train = train[rng.permutation(len(train))]
  if len(test) > config.eval_sequences:
    test = test[np.sort(rng.choice(len(test), config.eval_sequences,
                                   replace=False))]
  return train, test


def load_data(config: Config) -> dict[str, Any]:
  """Both corpora, split: ``{"a": (train, test), "b": ..., "info": ...}``.

  Raises:
    ValueError: a corpus file is missing or too short (named).
  """
  out, info = {}, {}
  for which in ("a", "b"):
    text, source = corpora.load_corpus(
        getattr(config, f"corpus_{which}"), which, config.corpora,
        config.corpus_bytes)
    out[which] = split_corpus(text, config, f"corpus_{which}")
    info[which] = {"source": source, "bytes": len(text),
                   "sha256": hashlib.sha256(text).hexdigest(),
                   "train_sequences": len(out[which][0]),
                   "test_sequences": len(out[which][1])}
  out["info"] = info
  return out


def _optimizer(lr: Any) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))


def _ppl(losses: Any) -> list[float]:
  return [float(math.exp(min(x, 50.0))) for x in np.asarray(losses)]


def _total(tree: Any) -> float:
  return float(sum(jnp.sum(x) for x in jax.tree.leaves(tree)))


def pretrain(config: Config, loss_fn, params, data, key, on_chunk=None):
  """Trains on A; keeps the parameters best on held-out A."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.pretrain_lr, min(100, config.pretrain_steps // 10 + 1),
      config.pretrain_steps, config.pretrain_lr / 10)
  held_out = {"a": data["a"][1], "b": data["b"][1]}
  params, _, hist = trainer.fit(
      loss_fn, params, data["a"][0], optimizer=_optimizer(schedule),
      num_steps=config.pretrain_steps, batch_size=config.batch_size,
      rng=jax.random.fold_in(key, 0), eval_data=held_out,
      eval_every=config.pretrain_eval_every, keep_best="a",
      on_chunk=on_chunk)
  kept = list(hist["eval_steps"]).index(hist["best_step"])
  return params, {
      "steps": config.pretrain_steps,
      "seconds": hist["train_seconds"],
      "eval_steps": hist["eval_steps"].tolist(),
      "ppl_a": _ppl(hist["eval"]["a"]),
      "ppl_b": _ppl(hist["eval"]["b"]),
      "best_step": int(hist["best_step"]),
      "ppl_a_kept": _ppl(hist["eval"]["a"])[kept],
      "ppl_b_kept": _ppl(hist["eval"]["b"])[kept],
      "final_train_loss": float(np.mean(hist["loss"][-20:])),
  }


def importances(config: Config, loss_fn, params, a_train):
  """``{method: importance}`` on A for the EWC methods, and their summary."""
  found, info = {}, {}
  for method in config.methods:
    if method == "finetune":
      continue
    start = time.perf_counter()
    found[method] = jax.block_until_ready(ewc_jax.empirical_fisher(
        loss_fn, params, a_train, estimator=ESTIMATOR[method],
        batch_size=config.fisher_batch_size,
        num_examples=config.fisher_examples))
    info[method] = {
        "estimator": ESTIMATOR[method],
        "seconds": time.perf_counter() - start,
        "sum": _total(found[method]),
        "dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(
            found[method])}),
    }
  if "ewc" in found and "batched" in found:
    info["ratio_empirical_to_batched"] = (
        info["ewc"]["sum"] / info["batched"]["sum"])
    # How alike the two are up to scale (1: proportional).
    flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(
        found[m])]).astype(np.float64) for m in ("ewc", "batched")]
    info["cosine_empirical_batched"] = float(
        flat[0] @ flat[1] / (np.linalg.norm(flat[0]) * np.linalg.norm(flat[1])
                             + 1e-300))
  return found, info


def fine_tune_all(config: Config, loss_fn, params, data, found, key,
                  live: Optional[LiveMetrics] = None):
  """Fine-tunes on B once per method and lambda; one result row each."""
  plan = []
  for method in config.methods:
    if method == "finetune":
      plan.append((method, 0.0, 0.0))
    else:
      factor = config.scale() if method == "batched" else 1.0
      plan.extend((method, lam * factor, lam) for lam in config.lams)
  held_out = {"a": data["a"][1], "b": data["b"][1]}
  optimizer = _optimizer(config.finetune_lr)  # one object: compiled once
  runs = []
  for method, lam, matched in plan:
    with _open(live, f"{method}-lam{float(lam)!r}", config) as trackers:
      _, hist = trainer.fine_tune(
          loss_fn, params, data["b"][0], lam=lam,
          importance=found.get(method), optimizer=optimizer,
          num_steps=config.finetune_steps, batch_size=config.batch_size,
          rng=jax.random.fold_in(key, 1), eval_data=held_out,
          eval_every=config.eval_every, data_name="corpus_b",
          on_chunk=_chunk_hook(trackers, penalty=lam > 0))
    ppl_a, ppl_b = _ppl(hist["eval"]["a"]), _ppl(hist["eval"]["b"])
    runs.append({
        "method": method, "estimator": ESTIMATOR.get(method),
        "lam": lam, "lam_matched": matched,
        "ppl_a_before": ppl_a[0], "ppl_a_after": ppl_a[-1],
        "ppl_b_before": ppl_b[0], "ppl_b_after": ppl_b[-1],
        "eval_steps": hist["eval_steps"].tolist(),
        "ppl_a": ppl_a, "ppl_b": ppl_b,
        "final_loss": float(np.mean(hist["loss"][-10:])),
        "final_penalty": float(hist["penalty"][-1]),
        "seconds": hist["train_seconds"],
    })
    logger.info("%-8s lam %-8g: ppl A %.2f -> %.2f, ppl B %.2f -> %.2f "
                "(%.0f s)", method, lam, ppl_a[0], ppl_a[-1], ppl_b[0],
                ppl_b[-1], hist["train_seconds"])
  return runs


def _open(live: Optional[LiveMetrics], name: str,
          config: Config) -> tracking.Trackers:
  return tracking.Trackers() if live is None else live.open(name, config)


def run(config: Config, *, live: Optional[LiveMetrics] = None
        ) -> dict[str, Any]:
  """Trains on A, fine-tunes on B with every method and lambda.

  Progress lines go to the ``logging`` module.

  Args:
    config: the settings (validated here).
    live: live metrics (TensorBoard, W&B); ``None``: none.

  Returns:
    The results: config, machine, corpora, before/after perplexities and
    curves of every run, seconds per phase (``timing``: compile, train,
    fisher, other); JSON-serialisable.
  """
  validate(config)
  start = time.perf_counter()
  data = load_data(config)
  graphdef, params = lm_model.make_model(
      seq_len=config.seq_len, d_model=config.d_model,
      num_heads=config.num_heads, num_layers=config.num_layers,
      dtype=DTYPES[config.dtype], seed=config.seed)
  loss_fn = lm_model.make_loss_fn(graphdef)
  key = jax.random.key(config.seed)
  info = data["info"]
  logger.info(
      "model: %s %s parameters; A: %d train / %d test sequences, B: %d / %d",
      f"{lm_model.num_params(params):,}", config.dtype,
      info["a"]["train_sequences"], info["a"]["test_sequences"],
      info["b"]["train_sequences"], info["b"]["test_sequences"])
  timer = timing_lib.PhaseTimer()  # compilation split out of each phase
  with _open(live, "pretrain", config) as trackers, timer.phase("train"):
    params, pre = pretrain(config, loss_fn, params, data, key,
                           on_chunk=_chunk_hook(trackers, penalty=False))
  logger.info("trained on A in %.0f s, kept step %d: ppl A %.2f -> %.2f, "
              "ppl B %.2f", pre["seconds"], pre["best_step"], pre["ppl_a"][0],
              pre["ppl_a_kept"], pre["ppl_b_kept"])
  with timer.phase("fisher"):
    found, importance_info = importances(config, loss_fn, params,
                                         data["a"][0])
  with timer.phase("train"):
    runs = fine_tune_all(config, loss_fn, params, data, found, key, live)
  return {
      "config": dataclasses.asdict(config),
      "machine": {
          "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind),
          "cpu_count": os.cpu_count(),
          "jax": jax.__version__,
          "optax": optax.__version__,
      },
      "corpora": info,
      "num_params": lm_model.num_params(params),
      "pretrain": pre,
      "importance": importance_info,
      "runs": runs,
      "seconds": time.perf_counter() - start,
      # Held-out evaluations are part of "train" here.
      "timing": timer.finish(time.perf_counter() - start),
  }
