r"""Continual fine-tuning of a byte-level language model with EWC.

A small transformer LM (``experiments/lm_model.py``) is trained on corpus A,
then fine-tuned on corpus B three ways: plain fine-tuning, EWC with the
per-example empirical Fisher, and EWC with the PyTorch snippet's "batched"
importance (squared mini-batch mean gradients). Perplexity on held-out text
of A (what should be kept) and B (what is learnt) is recorded during the
fine-tuning; the run writes ``results.json``, ``results.md`` and
``perplexity.png``.

Corpora (offline, no tokenizer: one token per byte):
  A: English prose, the documentation topics of CPython's ``pydoc_data``;
  B: Python source, the standard library's ``inspect.py`` and ``os.py``;
  or any text files with ``--corpus-a FILE --corpus-b FILE``. The last
  ``heldout_fraction`` of each text is held out.

Lambda: ``--lam`` lists per-example-Fisher-scale strengths. EWC runs at each
value; the batched importance is about ``F / batch_size``, so it runs at
``lam * batched_scale`` (default ``fisher_batch_size``) to be matched, and
both the raw value and the matched one are reported. ``--batched-scale 1``
runs the batched importance at the raw values instead.

Examples:
  python -m experiments.continual_lm                  # cpu preset, ~3 min
  python -m experiments.continual_lm --lam 1,10,100 --out runs/lm-sweep
  python -m experiments.continual_lm --dtype bfloat16
  python -m experiments.continual_lm --preset gpu --corpus-a a.txt \
      --corpus-b b.txt

Expected runtime: the ``cpu`` preset takes about 3 minutes on a 2-core CPU
(jax 0.10.2); see docs/continual_lm.md for the measured results.
"""

import argparse
import dataclasses
import io
import json
import math
import os
import pathlib
import sys
import sysconfig
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ewc_jax import continual
from experiments import lm_model
from experiments.files import write_atomic

METHODS = ("finetune", "ewc", "batched")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_ESTIMATOR = {"ewc": "empirical", "batched": "batched"}


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on (written to ``results.json``)."""

  # Model.
  seq_len: int = 64
  d_model: int = 128
  num_heads: int = 4
  num_layers: int = 2
  dtype: str = "float32"
  # Training on A, then fine-tuning on B.
  batch_size: int = 32
  pretrain_steps: int = 1200
  pretrain_lr: float = 3e-3
  finetune_steps: int = 400
  finetune_lr: float = 1e-3
  # EWC.
  methods: tuple[str, ...] = METHODS
  lams: tuple[float, ...] = (1000.0,)
  batched_scale: Optional[float] = None  # None: fisher_batch_size
  fisher_batch_size: int = 32
  fisher_examples: Optional[int] = 1024
  # Data and evaluation.
  corpus_a: Optional[str] = None  # None: pydoc_data.topics
  corpus_b: Optional[str] = None  # None: inspect.py + os.py
  heldout_fraction: float = 0.1
  eval_sequences: int = 128
  eval_every: int = 25
  seed: int = 0

  def scale(self) -> float:
    """The factor from per-example-Fisher lambdas to batched ones."""
    return float(self.batched_scale if self.batched_scale is not None
                 else self.fisher_batch_size)


PRESETS = {
    # About 3 minutes on a 2-core CPU.
    "cpu": Config(),
    # A larger model for one GPU. The default corpora are small (B has
    # about 150 KB of training text): give larger ones with --corpus-a/-b.
    "gpu": Config(seq_len=128, d_model=256, num_heads=8, num_layers=4,
                  batch_size=64, pretrain_steps=2000, pretrain_lr=1e-3,
                  finetune_steps=300, finetune_lr=3e-4,
                  lams=(100.0, 1000.0, 10000.0), fisher_batch_size=64,
                  fisher_examples=2048, eval_sequences=256, eval_every=25),
    # Seconds: for tests and smoke runs.
    "tiny": Config(seq_len=16, d_model=16, num_heads=2, num_layers=1,
                   batch_size=8, pretrain_steps=20, finetune_steps=10,
                   fisher_batch_size=8, fisher_examples=32,
                   eval_sequences=16, eval_every=5),
}


def validate(config: Config) -> Config:
  """Raises a ValueError naming the first bad field."""
  for name in ("seq_len", "d_model", "num_heads", "num_layers", "batch_size",
               "pretrain_steps", "finetune_steps", "fisher_batch_size",
               "eval_sequences", "eval_every"):
    value = getattr(config, name)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")
  if config.fisher_examples is not None and config.fisher_examples < 1:
    raise ValueError(
        f"fisher_examples must be None or >= 1, got {config.fisher_examples}.")
  if config.dtype not in DTYPES:
    raise ValueError(
        f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}.")
  if not config.methods or any(m not in METHODS for m in config.methods):
    raise ValueError(
        f"methods must be a non-empty list from {METHODS}, got "
        f"{config.methods!r}.")
  if not config.lams:
    raise ValueError("lams must hold at least one value.")
  for lam in config.lams:
    if not math.isfinite(lam) or lam < 0:
      raise ValueError(f"lam must be finite and >= 0, got {lam!r}.")
  if config.batched_scale is not None and not config.batched_scale > 0:
    raise ValueError(
        f"batched_scale must be > 0, got {config.batched_scale!r}.")
  for name in ("pretrain_lr", "finetune_lr"):
    if not getattr(config, name) > 0:
      raise ValueError(f"{name} must be > 0, got {getattr(config, name)}.")
  if not 0.0 < config.heldout_fraction < 1.0:
    raise ValueError(
        f"heldout_fraction must lie in (0, 1), got {config.heldout_fraction}.")
  return config


# ----------------------------------------------------------------------------
# Text.


def default_corpus_a() -> tuple[bytes, str]:
  """English prose: CPython's documentation topics (``pydoc_data``)."""
  from pydoc_data import topics  # noqa: PLC0415 (stdlib, lazily)
  text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
  return text.encode("utf-8"), "pydoc_data.topics (CPython docs)"


def default_corpus_b() -> tuple[bytes, str]:
  """Python source: the standard library's ``inspect.py`` and ``os.py``."""
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  parts = [(stdlib / name).read_bytes() for name in ("inspect.py", "os.py")]
  return b"\n\n".join(parts), "stdlib inspect.py + os.py (Python source)"


def load_corpus(path: Optional[str], which: str) -> tuple[bytes, str]:
  """The bytes of corpus ``which`` ("a" or "b"): a file, or the default."""
  if path is None:
    return default_corpus_a() if which == "a" else default_corpus_b()
  p = pathlib.Path(path)
  if not p.is_file():
    raise ValueError(f"corpus_{which}: no such file: {path}")
  return p.read_bytes(), p.name


def to_sequences(text: bytes, seq_len: int, name: str) -> np.ndarray:
  """Cuts bytes into windows ``[N, seq_len + 1]`` (int32), stride seq_len.

  Each window is one example: the model reads its first ``seq_len`` bytes
  and predicts the last ``seq_len``; consecutive windows share one byte, so
  every byte but the first is a target exactly once.

  Raises:
    ValueError: ``text`` shorter than ``seq_len + 1`` bytes (``name`` says
      which text).
  """
  if len(text) < seq_len + 1:
    raise ValueError(
        f"{name} has {len(text)} bytes, shorter than one sequence of "
        f"seq_len + 1 = {seq_len + 1} bytes.")
  arr = np.frombuffer(text, np.uint8).astype(np.int32)
  n = (len(arr) - 1) // seq_len
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None]
  return arr[idx]


def split_corpus(text: bytes, config: Config,
                 name: str) -> tuple[np.ndarray, np.ndarray]:
  """Train and held-out sequences: the held-out text is the tail."""
  cut = int(len(text) * (1.0 - config.heldout_fraction))
  train = to_sequences(text[:cut], config.seq_len, f"{name} (training part)")
  test = to_sequences(text[cut:], config.seq_len, f"{name} (held-out part)")
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


def check_corpora(config: Config) -> None:
  """Raises the ValueError that :func:`run` would, before any training."""
  for which in ("a", "b"):
    text, _ = load_corpus(getattr(config, f"corpus_{which}"), which)
    split_corpus(text, config, f"corpus_{which}")


# ----------------------------------------------------------------------------
# The experiment.


def _optimizer(lr: Any) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))


def _ppl(losses: Any) -> list[float]:
  return [float(math.exp(min(x, 50.0))) for x in np.asarray(losses)]


def _total(tree: Any) -> float:
  return float(sum(jnp.sum(x) for x in jax.tree.leaves(tree)))


def run(config: Config, *, log=print) -> dict[str, Any]:
  """Trains on A, fine-tunes on B with every method and lambda.

  Args:
    config: the settings (validated here).
    log: a ``print``-like function for progress lines.

  Returns:
    The results: config, machine, corpora, before/after perplexities and
    curves of every run (JSON-serialisable).
  """
  validate(config)
  start = time.perf_counter()
  text_a, source_a = load_corpus(config.corpus_a, "a")
  text_b, source_b = load_corpus(config.corpus_b, "b")
  a_train, a_test = split_corpus(text_a, config, "corpus_a")
  b_train, b_test = split_corpus(text_b, config, "corpus_b")
  dtype = DTYPES[config.dtype]
  graphdef, params = lm_model.make_model(
      seq_len=config.seq_len, d_model=config.d_model,
      num_heads=config.num_heads, num_layers=config.num_layers, dtype=dtype,
      seed=config.seed)
  loss_fn = lm_model.make_loss_fn(graphdef)
  held_out = {"a": a_test, "b": b_test}
  key = jax.random.key(config.seed)
  log(f"model: {lm_model.num_params(params):,} {config.dtype} parameters; "
      f"A: {len(a_train)} train / {len(a_test)} test sequences, "
      f"B: {len(b_train)} / {len(b_test)}")

  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.pretrain_lr, min(100, config.pretrain_steps // 10 + 1),
      config.pretrain_steps, config.pretrain_lr / 10)
  t = time.perf_counter()
  params, pre = continual.train(
      loss_fn, params, a_train, optimizer=_optimizer(schedule),
      num_steps=config.pretrain_steps, batch_size=config.batch_size,
      rng=jax.random.fold_in(key, 0), eval_data=held_out)
  pretrain = {
      "steps": config.pretrain_steps,
      "seconds": time.perf_counter() - t,
      "ppl_a": _ppl(pre["eval"]["a"]),
      "ppl_b": _ppl(pre["eval"]["b"]),
      "final_train_loss": float(np.mean(pre["loss"][-20:])),
  }
  log(f"trained on A in {pretrain['seconds']:.0f} s: ppl A "
      f"{pretrain['ppl_a'][0]:.2f} -> {pretrain['ppl_a'][-1]:.2f}, ppl B "
      f"{pretrain['ppl_b'][-1]:.2f}")

  importances, importance_info = {}, {}
  for method in config.methods:
    if method == "finetune":
      continue
    estimator = _ESTIMATOR[method]
    t = time.perf_counter()
    imp = jax.block_until_ready(continual.compute_importance(
        loss_fn, params, a_train, estimator=estimator,
        batch_size=config.fisher_batch_size,
        num_examples=config.fisher_examples))
    importances[method] = imp
    importance_info[method] = {
        "estimator": estimator,
        "seconds": time.perf_counter() - t,
        "sum": _total(imp),
        "dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(imp)}),
    }
    log(f"importance {estimator}: {importance_info[method]['seconds']:.1f} s,"
        f" sum {importance_info[method]['sum']:.4g}")
  if "ewc" in importances and "batched" in importances:
    importance_info["ratio_empirical_to_batched"] = (
        importance_info["ewc"]["sum"] / importance_info["batched"]["sum"])
    # How alike the two are up to scale (1: proportional).
    flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(
        importances[m])]).astype(np.float64) for m in ("ewc", "batched")]
    importance_info["cosine_empirical_batched"] = float(
        flat[0] @ flat[1] / (np.linalg.norm(flat[0]) * np.linalg.norm(flat[1])
                             + 1e-300))

  finetune_opt = _optimizer(config.finetune_lr)
  plan = []
  for method in config.methods:
    if method == "finetune":
      plan.append((method, 0.0, 0.0))
    else:
      factor = config.scale() if method == "batched" else 1.0
      plan.extend((method, lam * factor, lam) for lam in config.lams)
  runs = []
  for method, lam, matched in plan:
    new_params, hist = continual.continual_fine_tune(
        loss_fn, params, None, b_train, lam=lam, optimizer=finetune_opt,
        num_steps=config.finetune_steps, batch_size=config.batch_size,
        importance=importances.get(method), rng=jax.random.fold_in(key, 1),
        eval_data=held_out, eval_every=config.eval_every)
    del new_params
    ppl_a, ppl_b = _ppl(hist["eval"]["a"]), _ppl(hist["eval"]["b"])
    runs.append({
        "method": method,
        "estimator": _ESTIMATOR.get(method),
        "lam": lam,
        "lam_matched": matched,
        "ppl_a_before": ppl_a[0], "ppl_a_after": ppl_a[-1],
        "ppl_b_before": ppl_b[0], "ppl_b_after": ppl_b[-1],
        "eval_steps": hist["eval_steps"].tolist(),
        "ppl_a": ppl_a, "ppl_b": ppl_b,
        "final_loss": float(np.mean(hist["loss"][-10:])),
        "final_penalty": float(hist["penalty"][-1]),
        "seconds": hist["train_seconds"],
    })
    log(f"{method:8s} lam {lam:<8g}: ppl A {ppl_a[0]:.2f} -> {ppl_a[-1]:.2f},"
        f" ppl B {ppl_b[0]:.2f} -> {ppl_b[-1]:.2f} "
        f"({hist['train_seconds']:.0f} s)")

  return {
      "config": dataclasses.asdict(config),
      "machine": {
          "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind),
          "cpu_count": os.cpu_count(),
          "jax": jax.__version__,
          "optax": optax.__version__,
      },
      "corpora": {
          "a": {"source": source_a, "bytes": len(text_a),
                "train_sequences": len(a_train),
                "test_sequences": len(a_test)},
          "b": {"source": source_b, "bytes": len(text_b),
                "train_sequences": len(b_train),
                "test_sequences": len(b_test)},
      },
      "num_params": lm_model.num_params(params),
      "pretrain": pretrain,
      "importance": importance_info,
      "runs": runs,
      "seconds": time.perf_counter() - start,
  }


# ----------------------------------------------------------------------------
# Outputs.


def results_table(results: dict[str, Any]) -> str:
  """Markdown tables: every run, then EWC against batched at matched lambda."""
  scale = results["config"]["batched_scale"] or results["config"][
      "fisher_batch_size"]
  lines = [
      "| method | importance | lambda (raw) | lambda (per-example scale) | "
      "ppl A before | ppl A after | ppl B before | ppl B after |",
      "|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results["runs"]:
    lines.append(
        f"| {r['method']} | {r['estimator'] or '-'} | {r['lam']:g} | "
        f"{r['lam_matched']:g} | {r['ppl_a_before']:.2f} | "
        f"{r['ppl_a_after']:.2f} | {r['ppl_b_before']:.2f} | "
        f"{r['ppl_b_after']:.2f} |")
  by = {(r["method"], r["lam_matched"]): r for r in results["runs"]}
  matched = sorted({lam for m, lam in by if m == "ewc"}
                   & {lam for m, lam in by if m == "batched"})
  if matched:
    lines += [
        "",
        f"Per-example Fisher (ewc) against the batched importance run at "
        f"lambda x {scale:g}:",
        "",
        "| lambda (per-example scale) | ppl A ewc | ppl A batched | "
        "ppl B ewc | ppl B batched |",
        "|---:|---:|---:|---:|---:|",
    ]
    for lam in matched:
      e, b = by[("ewc", lam)], by[("batched", lam)]
      lines.append(
          f"| {lam:g} | {e['ppl_a_after']:.2f} | {b['ppl_a_after']:.2f} | "
          f"{e['ppl_b_after']:.2f} | {b['ppl_b_after']:.2f} |")
  ratio = results["importance"].get("ratio_empirical_to_batched")
  if ratio is not None:
    cosine = results["importance"]["cosine_empirical_batched"]
    lines += ["", f"Measured sum(F per-example) / sum(F batched) = "
              f"{ratio:.1f} (fisher_batch_size "
              f"{results['config']['fisher_batch_size']}); cosine similarity "
              f"of the two importances: {cosine:.3f}."]
  return "\n".join(lines) + "\n"


def plot(results: dict[str, Any]) -> bytes:
  """PNG bytes: held-out perplexity of A and of B against fine-tuning steps."""
  import matplotlib  # noqa: PLC0415 (optional dependency, lazily)
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # noqa: PLC0415

  runs = results["runs"]
  lams = sorted({r["lam_matched"] for r in runs if r["method"] != "finetune"})
  shades = {lam: 0.8 if len(lams) == 1 else 0.4 + 0.6 * i / (len(lams) - 1)
            for i, lam in enumerate(lams)}
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
  for r in runs:
    if r["method"] == "finetune":
      style = dict(color="black", label="finetune")
    else:
      cmap = plt.get_cmap("Blues" if r["method"] == "ewc" else "Oranges")
      ewc = r["method"] == "ewc"
      style = dict(color=cmap(shades[r["lam_matched"]]),
                   linestyle="-" if ewc else "--",
                   linewidth=2.4 if ewc else 1.4,
                   label=f"{r['method']} lam={r['lam']:g}")
    for ax, key in zip(axes, ("ppl_a", "ppl_b")):
      ax.plot(r["eval_steps"], r[key], **style)
  axes[0].set_title("held-out A (old): lower = kept")
  axes[1].set_title("held-out B (new): lower = learnt")
  for ax in axes:
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("perplexity (per byte)")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  return buf.getvalue()


def write_outputs(results: dict[str, Any], out: pathlib.Path) -> None:
  """``results.json``, ``results.md`` and ``perplexity.png`` in ``out``."""
  out.mkdir(parents=True, exist_ok=True)
  write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
  write_atomic(out / "results.md", results_table(results))
  write_atomic(out / "perplexity.png", plot(results))


# ----------------------------------------------------------------------------
# Command line.


def _floats(text: str, flag: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise ValueError(
        f"{flag} takes comma-separated numbers, got {text!r}.") from None


def _flags() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m experiments.continual_lm",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                 help="base settings (default: cpu, about 3 minutes)")
  p.add_argument("--corpus-a", help="text file for corpus A (old)")
  p.add_argument("--corpus-b", help="text file for corpus B (new)")
  p.add_argument("--dtype", choices=sorted(DTYPES),
                 help="parameter dtype; the importance is float32 always")
  p.add_argument("--methods", help="comma list from " + ",".join(METHODS))
  p.add_argument("--lam", help="per-example-scale lambdas, e.g. 1,10,100")
  p.add_argument("--batched-scale", type=float,
                 help="batched lambda = lam x this (default: "
                 "fisher batch size; 1 for raw values)")
  p.add_argument("--pretrain-steps", type=int)
  p.add_argument("--steps", type=int, dest="finetune_steps",
                 help="fine-tuning steps")
  p.add_argument("--lr", type=float, dest="finetune_lr",
                 help="fine-tuning learning rate")
  p.add_argument("--fisher-batch-size", type=int,
                 help="importance chunk (and the batched estimator's batch)")
  p.add_argument("--fisher-examples", type=int,
                 help="old sequences used for the importance")
  p.add_argument("--seed", type=int)
  p.add_argument("--out", default="runs/continual_lm",
                 help="output directory (default runs/continual_lm)")
  return p


def resolve(args: argparse.Namespace) -> Config:
  """The preset with the flags given applied, validated."""
  config = PRESETS[args.preset]
  changes = {}
  for name in ("corpus_a", "corpus_b", "dtype", "batched_scale",
               "pretrain_steps", "finetune_steps", "finetune_lr",
               "fisher_batch_size", "fisher_examples", "seed"):
    if getattr(args, name) is not None:
      changes[name] = getattr(args, name)
  if args.methods is not None:
    changes["methods"] = tuple(
        m.strip() for m in args.methods.split(",") if m.strip())
  if args.lam is not None:
    changes["lams"] = _floats(args.lam, "--lam")
  return validate(dataclasses.replace(config, **changes))


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _flags().parse_args(argv)
  try:
    config = resolve(args)
    check_corpora(config)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = pathlib.Path(args.out)
  results = run(config)
  write_outputs(results, out)
  print(results_table(results))
  print(f"total {results['seconds']:.0f} s; wrote {out / 'results.json'}, "
        f"{out / 'results.md'}, {out / 'perplexity.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
