"""EWC in tunix's ``PeftTrainer``: ewc_jax's Fisher, the pull in the chain.

tunix's ``PeftTrainer(model, optimizer, config)`` takes an optax
transformation and builds ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam if
LoRA else nnx.Param)``, whose update passes the params to ``tx.update``; so
``optax.chain(ewc_jax.ewc(lam), optax.adamw(...))`` trains through it, full
fine-tuning and LoRA alike (with LoRA the pull sees the adapters only). The
steps:

1. the old data's sequence Fisher at the starting weights (the sampled, true
   Fisher; on the params the trainer trains);
2. ``ewc_jax.consolidate(trainer.optimizer.opt_state, params, fisher)``;
3. ``trainer.train(new_data)``; its checkpoint manager saves the optimiser
   state, hence the EWC state (anchors, Fisher, lambda): a trainer built
   again on the same checkpoint directory restores it and goes on, without
   consolidating again.

Run it on a Hugging Face Qwen3 checkpoint directory (the offline default of
``python -m experiments.continual_lm`` writes one to ``OUT/pretrained``)::

  python -m examples.tunix_peft_ewc --model-dir runs/continual_lm/pretrained \\
      --out runs/peft --steps 100 [--lora]

Needs the LM extra (``pip install --no-deps -r requirements-lm.txt``).
"""

import argparse
import pathlib
import sys
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tunix.sft import peft_trainer

import ewc_jax
from experiments.continual_lm import corpora
from experiments.continual_lm import family
from experiments.continual_lm import tokenizer as tok_lib


def model_inputs(input_tokens: jax.Array, input_mask: jax.Array) -> dict:
  """What tunix's default loss takes: causal mask and positions added."""
  b, t = input_tokens.shape
  return {
      "input_tokens": input_tokens,
      "input_mask": input_mask,
      "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
      "attention_mask": jnp.broadcast_to(
          jnp.tril(jnp.ones((t, t), jnp.bool_)), (b, t, t)),
  }


def batches(sequences: np.ndarray, batch_size: int, *, seed: int = 0
            ) -> Iterator[dict]:
  """Epochs of shuffled batches ``{"input_tokens", "input_mask"}``, endless.

  The same order on every call, so that a resumed trainer (which skips the
  batches it has trained on) sees the same data as an uninterrupted one.
  """
  gen = np.random.default_rng(seed)
  while True:
    order = gen.permutation(len(sequences))
    for start in range(0, len(order) - batch_size + 1, batch_size):
      rows = sequences[order[start:start + batch_size]]
      yield {"input_tokens": rows, "input_mask": np.ones_like(rows, bool)}


def make_trainer(model: nnx.Module, *, lam: float, learning_rate: float,
                 max_steps: int, checkpoint_dir: Optional[str],
                 save_every: int = 50) -> peft_trainer.PeftTrainer:
  """A ``PeftTrainer`` whose optimiser is ``chain(ewc, adamw)``.

  A checkpoint in ``checkpoint_dir`` is restored (model and optimiser, the
  EWC state with it); ``trainer.train_steps`` then says how far it got.
  """
  # lam is a constant of ewc(lam) here: tunix logs the learning rate of the
  # first injected part of a chain and would take an injected EWC for it.
  tx = optax.chain(
      ewc_jax.ewc(lam),
      optax.inject_hyperparams(optax.adamw)(learning_rate=learning_rate,
                                            weight_decay=0.0))
  options = ocp.CheckpointManagerOptions(save_interval_steps=save_every,
                                         max_to_keep=2)
  config = peft_trainer.TrainingConfig(
      eval_every_n_steps=max_steps + 1, max_steps=max_steps,
      checkpoint_root_directory=checkpoint_dir,
      checkpointing_options=options, pbar_description="EWC fine-tuning")
  trainer = peft_trainer.PeftTrainer(model, tx, config)
  return trainer.with_gen_model_input_fn(
      lambda x: model_inputs(x["input_tokens"], x["input_mask"]))


def trained_params(model: nnx.Module) -> tuple[Any, Any, Any]:
  """``(graphdef, params, rest)``: what the trainer trains, and the rest."""
  lora = bool(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  return nnx.split(model, nnx.LoRAParam if lora else nnx.Param, ...)


def consolidate(trainer: peft_trainer.PeftTrainer, old: np.ndarray, *,
                rng: jax.Array, batch_size: int = 16) -> Any:
  """Folds the old data's sampled Fisher into the trainer's EWC state.

  Returns:
    The Fisher (an ``nnx.State`` like the trained params).
  """
  graphdef, params, rest = trained_params(trainer.model)
  apply_fn = family.make_apply_fn(graphdef, rest)
  fisher = ewc_jax.fisher_diagonal(
      apply_fn, params, (old[:, :-1], None, None), estimator="sampled",
      rng=rng, batch_size=batch_size)
  trainer.optimizer.opt_state = ewc_jax.consolidate(
      trainer.optimizer.opt_state, params, fisher)
  return fisher


def fine_tune(model: nnx.Module, old: np.ndarray, new: np.ndarray, *,
              lam: float, learning_rate: float, steps: int, batch_size: int,
              checkpoint_dir: Optional[str], save_every: int = 50,
              seed: int = 0) -> peft_trainer.PeftTrainer:
  """EWC fine-tuning of ``model`` on ``new`` with the pull of ``old``.

  A fresh start consolidates; a restored checkpoint already holds the EWC
  state and continues from its step.
  """
  trainer = make_trainer(model, lam=lam, learning_rate=learning_rate,
                         max_steps=steps, checkpoint_dir=checkpoint_dir,
                         save_every=save_every)
  if trainer.train_steps == 0:
    consolidate(trainer, old, rng=jax.random.key(seed))
  trainer.train(batches(new, batch_size, seed=seed))
  return trainer


def _sequences(tok, text: str, seq_len: int, name: str) -> np.ndarray:
  return corpora.windows(tok_lib.encode(tok, text), seq_len, name)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m examples.tunix_peft_ewc",
      description=__doc__.split("\n\n")[0])
  parser.add_argument("--model-dir", required=True,
                      help="a Hugging Face Qwen3 checkpoint directory")
  parser.add_argument("--out", required=True,
                      help="tunix's checkpoints (resumed from if present)")
  parser.add_argument("--lora", action="store_true",
                      help="qwix LoRA adapters (rank 8); EWC on them only")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--lam", type=float, default=10.0)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--seq-len", type=int, default=64)
  args = parser.parse_args(argv)
  try:
    model, config, _ = family.load(args.model_dir)
    tok = tok_lib.load(pathlib.Path(args.model_dir) / "tokenizer.json")
  except ValueError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  if args.lora:
    model = family.with_lora(model, rank=8, alpha=16.0, seed=0)
  old_text, _ = corpora.stdlib_prose()
  new_text, _ = corpora.stdlib_code_large(1_000_000)
  old = _sequences(tok, old_text.decode(), args.seq_len, "old")[:256]
  new = _sequences(tok, new_text.decode(), args.seq_len, "new")
  trainer = fine_tune(model, old, new, lam=args.lam, learning_rate=args.lr,
                      steps=args.steps, batch_size=args.batch_size,
                      checkpoint_dir=args.out)
  _, params, _ = trained_params(trainer.model)
  penalty = ewc_jax.penalty(params, trainer.optimizer.opt_state, lam=args.lam)
  print(f"trained {trainer.train_steps} steps; EWC penalty "
        f"{float(penalty):.4g}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
