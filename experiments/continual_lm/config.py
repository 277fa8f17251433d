"""The continual LM experiment's settings: one frozen dataclass, presets.

Every field is a command-line flag (``tyro`` builds them from this class and
its field docstrings; ``--help`` lists them all); ``--preset`` picks the
defaults. `validate` raises a ValueError naming the first bad field.

Training on A keeps the parameters with the lowest held-out A loss among the
evaluations every ``pretrain_eval_every`` steps (validation stopping; with
None, among the start and the end). ``corpora``: ``stdlib`` is CPython's
pydoc topics (A, 466 KB of prose) and ``inspect.py`` + ``os.py`` (B, 164 KB
of code); ``packages`` is the docstrings of the installed scientific Python
packages (A) and the standard library's source without docstrings (B), each
capped at ``corpus_bytes`` (see :mod:`experiments.continual_lm.corpora`).
"""

import dataclasses
import math
from typing import Annotated, Literal, Optional

import tyro

METHODS = ("finetune", "ewc", "batched")
Method = Literal["finetune", "ewc", "batched"]


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on (written to ``results.json``)."""

  seq_len: int = 64
  """Bytes of context per sequence (each example is seq_len + 1 bytes)."""
  d_model: int = 128
  """Width of the transformer's residual stream."""
  num_heads: int = 4
  """Attention heads per layer."""
  num_layers: int = 2
  """Transformer blocks."""
  dtype: Literal["float32", "bfloat16"] = "float32"
  """Parameter dtype; the importance is float32 always."""
  batch_size: int = 32
  """Sequences per step, for training on A and fine-tuning on B."""
  pretrain_steps: int = 1200
  """Steps of training on corpus A."""
  pretrain_lr: float = 3e-3
  """Peak learning rate on A (warmup, then cosine decay to a tenth)."""
  pretrain_eval_every: Optional[int] = None
  """Steps between held-out A evaluations on A (best kept); None: at end."""
  finetune_steps: Annotated[int, tyro.conf.arg(aliases=("--steps",))] = 400
  """Steps of fine-tuning on corpus B."""
  finetune_lr: Annotated[float, tyro.conf.arg(aliases=("--lr",))] = 1e-3
  """Fine-tuning learning rate (Adam, gradients clipped to norm 1)."""
  methods: tuple[Method, ...] = METHODS
  """finetune (plain), ewc (per-example Fisher), batched (the snippet's)."""
  lams: Annotated[tuple[float, ...], tyro.conf.arg(aliases=("--lam",))] = (
      1000.0,)
  """EWC strengths on the per-example-Fisher scale, e.g. --lam 1 10 100."""
  batched_scale: Optional[float] = None
  """Batched lambda = lam x this; None: fisher_batch_size; 1: raw values."""
  fisher_batch_size: int = 32
  """Importance chunk (and the batched estimator's mini-batch)."""
  fisher_examples: Optional[int] = 1024
  """Sequences of A for the importance; None: all."""
  corpora: Literal["stdlib", "packages"] = "stdlib"
  """Default texts: stdlib (630 KB) or packages (tens of MB); see corpora."""
  corpus_bytes: int = 32_000_000
  """Size cap of each 'packages' corpus, in bytes."""
  corpus_a: Optional[str] = None
  """A text file for corpus A (old), instead of the default."""
  corpus_b: Optional[str] = None
  """A text file for corpus B (new), instead of the default."""
  heldout_fraction: float = 0.1
  """Share of each corpus (its tail) held out for evaluation."""
  eval_sequences: int = 128
  """Held-out sequences evaluated (a fixed random subset)."""
  eval_every: int = 25
  """Fine-tuning steps between held-out evaluations."""
  seed: int = 0
  """Seed of the model, the batch order and the held-out subset."""

  def scale(self) -> float:
    """The factor from per-example-Fisher lambdas to batched ones."""
    return float(self.batched_scale if self.batched_scale is not None
                 else self.fisher_batch_size)


PRESETS = {
    # About 3 minutes on a 2-core CPU; results in docs/continual_lm.md.
    "cpu": Config(),
    # One GPU: 3.3M parameters, tens of MB of text, so that 2,000 steps of
    # 64 x 128 bytes (16 MB) are less than one pass over A.
    "gpu": Config(seq_len=128, d_model=256, num_heads=8, num_layers=4,
                  batch_size=64, pretrain_steps=2000, pretrain_lr=1e-3,
                  pretrain_eval_every=100, finetune_steps=300,
                  finetune_lr=3e-4, lams=(100.0, 1000.0, 10000.0),
                  fisher_batch_size=64, fisher_examples=2048,
                  corpora="packages", eval_sequences=512, eval_every=25),
    # Seconds: for tests and smoke runs.
    "tiny": Config(seq_len=16, d_model=16, num_heads=2, num_layers=1,
                   batch_size=8, pretrain_steps=20, finetune_steps=10,
                   fisher_batch_size=8, fisher_examples=32,
                   eval_sequences=16, eval_every=5),
}

_POSITIVE = ("seq_len", "d_model", "num_heads", "num_layers", "batch_size",
             "pretrain_steps", "finetune_steps", "fisher_batch_size",
             "eval_sequences", "eval_every", "corpus_bytes")


def validate(config: Config) -> Config:
  """Returns ``config``; raises a ValueError naming the first bad field."""
  for name in _POSITIVE + ("fisher_examples", "pretrain_eval_every"):
    value = getattr(config, name)
    if value is None and name not in _POSITIVE:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")
  if config.d_model % config.num_heads:
    raise ValueError(f"d_model ({config.d_model}) must be a multiple of "
                     f"num_heads ({config.num_heads}).")
  if not config.methods or any(m not in METHODS for m in config.methods):
    raise ValueError(f"methods must be a non-empty list from {METHODS}, got "
                     f"{config.methods!r}.")
  if len(set(config.methods)) != len(config.methods):
    raise ValueError(f"methods lists a method twice: {config.methods!r}.")
  if not config.lams:
    raise ValueError("lams must hold at least one value.")
  for lam in config.lams:
    if not math.isfinite(lam) or lam < 0:
      raise ValueError(f"lam must be finite and >= 0, got {lam!r}.")
  if config.batched_scale is not None and not (
      math.isfinite(config.batched_scale) and config.batched_scale > 0):
    raise ValueError(
        f"batched_scale must be > 0, got {config.batched_scale!r}.")
  for name in ("pretrain_lr", "finetune_lr"):
    value = getattr(config, name)
    if not (math.isfinite(value) and value > 0):
      raise ValueError(f"{name} must be > 0, got {value}.")
  if not 0.0 < config.heldout_fraction < 1.0:
    raise ValueError(
        f"heldout_fraction must lie in (0, 1), got {config.heldout_fraction}.")
  return config
