"""The continual LM experiment's settings: one frozen dataclass, presets.

Every field is a command-line flag (``tyro`` builds them from this class and
its field docstrings; ``--help`` lists them all); ``--preset`` picks the
defaults. `validate` raises a ValueError naming the first bad field.

Corpora (:mod:`experiments.continual_lm.corpora`): ``stdlib`` is CPython's
pydoc topics (A, 466 KB of English prose) and the standard library's source
without docstrings (B, capped at ``code_bytes``); ``packages`` is the
docstrings of the installed scientific Python packages (A) and the same
code (B), each capped at ``corpus_bytes``.
"""

import dataclasses
import math
from typing import Annotated, Literal, Optional

import tyro

METHODS = ("finetune", "ewc_sampled", "ewc_empirical", "batched", "lora",
           "lora_ewc")
Method = Literal["finetune", "ewc_sampled", "ewc_empirical", "batched",
                 "lora", "lora_ewc"]


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on (written to ``results.json``)."""

  model_dir: Optional[str] = None
  """A Hugging Face Qwen3 checkpoint directory (config.json, *.safetensors,
  tokenizer.json); None: train a small Qwen3 on corpus A first."""
  mesh: Optional[str] = None
  """Shard over the local devices: FSDPxTP (e.g. 4x2) or auto; None: one."""
  dtype: Literal["float32", "bfloat16"] = "float32"
  """Parameter dtype; the importance is float32 always."""
  # The offline default's model (ignored with --model-dir).
  vocab_size: int = 2048
  """Byte-level BPE vocabulary trained on the corpora."""
  d_model: int = 128
  """Width of the residual stream."""
  num_layers: int = 4
  """Decoder layers."""
  num_heads: int = 4
  """Query heads (head_dim = d_model / num_heads)."""
  num_kv_heads: int = 2
  """Key/value heads (grouped-query attention)."""
  mlp_dim: int = 384
  """SwiGLU hidden width."""
  rope_theta: float = 10_000.0
  """RoPE base of the offline model (Qwen3's checkpoints use 1e6)."""
  pretrain_steps: int = 400
  """Steps of training on corpus A."""
  pretrain_lr: float = 3e-3
  """Peak learning rate on A (warmup, cosine decay to a tenth)."""
  pretrain_eval_every: int = 100
  """Steps between held-out A evaluations while training on A (best kept)."""
  # The continual part.
  seq_len: int = 64
  """Tokens of context per sequence (each example is seq_len + 1 tokens)."""
  batch_size: int = 32
  """Sequences per step."""
  finetune_steps: Annotated[int, tyro.conf.arg(aliases=("--steps",))] = 150
  """Steps of fine-tuning on corpus B."""
  finetune_lr: Annotated[float, tyro.conf.arg(aliases=("--lr",))] = 1e-3
  """Fine-tuning learning rate (Adam, gradients clipped to norm 1)."""
  lora_rank: int = 8
  """LoRA rank (qwix adapters on every projection)."""
  lora_alpha: float = 16.0
  """LoRA alpha (the update is scaled by alpha / rank)."""
  lora_lr: float = 3e-3
  """Learning rate of the LoRA runs."""
  methods: tuple[Method, ...] = METHODS
  """Which runs: finetune, ewc_sampled (the lambda sweep), ewc_empirical,
  batched (the snippet's importance), lora, lora_ewc."""
  lams: Annotated[tuple[float, ...], tyro.conf.arg(aliases=("--lam",))] = (
      1.0, 3.0, 10.0, 30.0)
  """The lambda sweep of ewc_sampled; the others run at the lambda chosen."""
  max_b_rise: float = 0.05
  """Choice of lambda: the lowest A validation perplexity among the lambdas
  whose B validation perplexity is within this fraction of fine-tuning's."""
  batched_scale: Optional[float] = None
  """Batched lambda = lambda x this; None: fisher_batch_size x seq_len."""
  fisher_examples: int = 512
  """Sequences of A for the importance."""
  fisher_batch_size: int = 16
  """Importance chunk (and the batched estimator's mini-batch)."""
  fisher_samples: int = 1
  """Token draws per sequence for the sampled Fisher."""
  corpora: Literal["stdlib", "packages"] = "stdlib"
  """Default texts (see the module docstring)."""
  code_bytes: int = 2_000_000
  """Size cap of the 'stdlib' code corpus B, in bytes."""
  corpus_bytes: int = 32_000_000
  """Size cap of each 'packages' corpus, in bytes."""
  corpus_a: Optional[str] = None
  """A text file for corpus A (old), instead of the default."""
  corpus_b: Optional[str] = None
  """A text file for corpus B (new), instead of the default."""
  heldout_fraction: float = 0.1
  """Share of each corpus (its tail) held out: validation, then test."""
  eval_sequences: int = 128
  """Held-out sequences evaluated per split (validation, test)."""
  eval_every: int = 25
  """Fine-tuning steps between test evaluations (curves)."""
  steps_per_call: int = 5
  """Steps per compiled call (how soon Ctrl-C acts, how often progress)."""
  seed: int = 0
  """Seed of the model, the batch order, the sampled tokens."""

  def scale(self) -> float:
    """The factor from token-normalised lambdas to batched ones."""
    return float(self.batched_scale if self.batched_scale is not None
                 else self.fisher_batch_size * self.seq_len)


PRESETS = {
    # 5 min 10 s wall on the idle 2-core CPU; docs/continual_lm.md.
    "cpu": Config(),
    # One GPU: a 20M-parameter Qwen3 on tens of MB of text (not yet run).
    "gpu": Config(vocab_size=8192, d_model=512, num_layers=6, num_heads=8,
                  num_kv_heads=4, mlp_dim=1536, pretrain_steps=4000,
                  pretrain_lr=1e-3, pretrain_eval_every=250, seq_len=256,
                  batch_size=64, finetune_steps=500, finetune_lr=3e-4,
                  fisher_examples=2048, fisher_batch_size=32,
                  corpora="packages", eval_sequences=512, eval_every=50,
                  steps_per_call=25, lams=(1.0, 3.0, 10.0, 30.0, 100.0)),
    # Seconds: for tests and smoke runs.
    "tiny": Config(vocab_size=300, d_model=32, num_layers=2, num_heads=4,
                   num_kv_heads=2, mlp_dim=64, pretrain_steps=10,
                   pretrain_eval_every=5, seq_len=16, batch_size=8,
                   finetune_steps=10, lora_rank=2, lams=(1.0, 10.0),
                   fisher_examples=16, fisher_batch_size=8,
                   code_bytes=60_000, eval_sequences=16, eval_every=5,
                   steps_per_call=5),
}

_POSITIVE = ("vocab_size", "d_model", "num_layers", "num_heads",
             "num_kv_heads", "mlp_dim", "pretrain_steps",
             "pretrain_eval_every", "seq_len", "batch_size", "finetune_steps",
             "lora_rank", "fisher_examples", "fisher_batch_size",
             "fisher_samples", "code_bytes", "corpus_bytes", "eval_sequences",
             "eval_every", "steps_per_call")


def validate(config: Config) -> Config:
  """Returns ``config``; raises a ValueError naming the first bad field."""
  for name in _POSITIVE:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")
  if config.vocab_size < 257:
    raise ValueError(f"vocab_size must be at least 257 (the 256 bytes and "
                     f"an end-of-text token), got {config.vocab_size}.")
  if config.d_model % config.num_heads or (config.d_model
                                           // config.num_heads) % 2:
    raise ValueError(f"d_model ({config.d_model}) must be num_heads "
                     f"({config.num_heads}) times an even head_dim.")
  if config.num_heads % config.num_kv_heads:
    raise ValueError(f"num_kv_heads ({config.num_kv_heads}) must divide "
                     f"num_heads ({config.num_heads}).")
  for name in ("eval_every", "pretrain_eval_every"):
    if getattr(config, name) % config.steps_per_call:
      raise ValueError(f"{name} ({getattr(config, name)}) must be a "
                       f"multiple of steps_per_call "
                       f"({config.steps_per_call}).")
  if not config.methods or any(m not in METHODS for m in config.methods):
    raise ValueError(f"methods must be a non-empty list from {METHODS}, got "
                     f"{config.methods!r}.")
  if len(set(config.methods)) != len(config.methods):
    raise ValueError(f"methods lists a method twice: {config.methods!r}.")
  if not config.lams:
    raise ValueError("lams must hold at least one value.")
  if len(set(config.lams)) != len(config.lams):
    raise ValueError(f"lams lists a value twice: {config.lams!r}.")
  for lam in config.lams:
    if not math.isfinite(lam) or lam <= 0:
      raise ValueError(f"lam must be finite and > 0 (lambda 0 is the "
                       f"finetune method), got {lam!r}.")
  for name in ("pretrain_lr", "finetune_lr", "lora_lr", "lora_alpha",
               "rope_theta"):
    value = getattr(config, name)
    if not (math.isfinite(value) and value > 0):
      raise ValueError(f"{name} must be > 0, got {value}.")
  if config.batched_scale is not None and not (
      math.isfinite(config.batched_scale) and config.batched_scale > 0):
    raise ValueError(
        f"batched_scale must be > 0, got {config.batched_scale!r}.")
  if not (math.isfinite(config.max_b_rise) and config.max_b_rise >= 0):
    raise ValueError(f"max_b_rise must be >= 0, got {config.max_b_rise}.")
  if not 0.0 < config.heldout_fraction < 1.0:
    raise ValueError(
        f"heldout_fraction must lie in (0, 1), got {config.heldout_fraction}.")
  needs_ft = ("ewc_sampled" in config.methods and "finetune"
              not in config.methods and len(config.lams) > 1)
  if needs_ft:
    raise ValueError("methods: choosing lambda among several needs the "
                     "finetune run (its B perplexity is the reference); add "
                     "finetune or pass one --lam.")
  return config
