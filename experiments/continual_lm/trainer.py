"""The experiment's training loop: jitted chunks of steps, evaluations.

Experiment code on the library's pieces (the one-call helper is
``ewc_jax.continual.continual_fine_tune``): the optimiser is
``optax.chain(inject_hyperparams(ewc_jax.ewc)(lam=...), clip, adam)``,
consolidated with ``ewc_jax.consolidate`` and re-weighted with
``ewc_jax.set_hyperparams(opt_state, lam=...)`` (no retrace across a
lambda sweep). A model is ``forward(trainable, frozen, tokens[B, T]) ->
logits``; ``frozen`` (LoRA's base weights, or nothing) is an argument of
the compiled step, never a baked-in constant.

Steps run in chunks of ``steps_per_call`` as one ``jax.lax.scan`` each, so
that a Ctrl-C is acted upon within a chunk (about a second on a CPU) and
progress is reported as it goes; a non-finite loss stops the run with
:class:`Diverged` naming the step.
"""

import functools
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ewc_jax

Forward = Callable[[Any, Any, jax.Array], jax.Array]


class Diverged(RuntimeError):
  """The training loss became nan or inf at ``step`` (1-based)."""

  def __init__(self, step: int, loss: float):
    super().__init__(f"the training loss became {loss} at step {step}")
    self.step, self.loss = step, loss


def check_positive_int(name: str, value: Any, *, allow_none: bool = False):
  """Raises a ValueError naming ``name`` unless ``value`` is an int >= 1."""
  if value is None and allow_none:
    return
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 1):
    raise ValueError(f"{name} must be a positive int, got {value!r}.")


def token_nll(forward: Forward, trainable, frozen, batch) -> jax.Array:
  """Mean token negative log-likelihood of ``batch`` ``[B, T + 1]``."""
  logits = forward(trainable, frozen, batch[:, :-1]).astype(jnp.float32)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, batch[:, 1:]))


def optimizer(learning_rate: Any, *, clip: float = 1.0
              ) -> optax.GradientTransformation:
  """``chain(ewc(lam), clip_by_global_norm, adam)``, lam injected (0).

  EWC comes first, so that clipping and Adam see the whole gradient, task
  and pull; with lam 0 (or nothing consolidated) it adds nothing.
  """
  return optax.chain(
      optax.inject_hyperparams(ewc_jax.ewc, static_args=("mode",))(lam=0.0),
      optax.clip_by_global_norm(clip), optax.adam(learning_rate))


def set_lam(opt_state: Any, lam: float) -> Any:
  """``opt_state`` with the EWC strength ``lam`` (no retrace)."""
  return ewc_jax.set_hyperparams(opt_state, lam=jnp.float32(lam))


@functools.lru_cache(maxsize=None)
def _step_fn(forward: Forward, tx: optax.GradientTransformation):
  """The jitted chunk of steps for one model and one optimiser."""

  def run(trainable, opt_state, frozen, data, rows, active):
    zero = jnp.zeros([], jnp.float32)

    def step(carry, xs):
      idx, on = xs

      def go(carry):
        params, state = carry
        batch = data[idx]
        loss, grads = jax.value_and_grad(
            lambda p: token_nll(forward, p, frozen, batch))(params)
        pen = ewc_jax.penalty(params, state).astype(jnp.float32)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), (loss, pen)

      # Steps past the end of a short last call are skipped: one
      # compilation whatever num_steps is.
      return jax.lax.cond(on, go, lambda c: (c, (zero, zero)), carry)

    (trainable, opt_state), (losses, pens) = jax.lax.scan(
        step, (trainable, opt_state), (rows, active))
    return trainable, opt_state, losses, pens

  return jax.jit(run, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=None)
def _eval_fn(forward: Forward):
  def total(trainable, frozen, chunk, weight):
    logits = forward(trainable, frozen, chunk[:, :-1]).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                          chunk[:, 1:])
    return jnp.sum(weight[:, None] * nll)

  return jax.jit(total)


def evaluate(forward: Forward, trainable, frozen, sequences: np.ndarray, *,
             batch_size: int = 32) -> float:
  """Mean token NLL over ``sequences`` ``[N, T + 1]`` (``exp``: perplexity).

  Chunks are zero-padded to ``batch_size`` (one compilation), the padding
  weighted out.
  """
  n, t1 = sequences.shape
  if n == 0:
    raise ValueError("no sequences to evaluate.")
  fn = _eval_fn(forward)
  total = 0.0
  for start in range(0, n, batch_size):
    take = min(batch_size, n - start)
    chunk = np.zeros((batch_size, t1), np.int32)
    chunk[:take] = sequences[start:start + take]
    weight = (np.arange(batch_size) < take).astype(np.float32)
    total += float(fn(trainable, frozen, chunk, weight))
  return total / (n * (t1 - 1))


def index_plan(seed: int, n: int, batch_size: int,
               num_steps: int) -> np.ndarray:
  """``[num_steps, batch_size]`` rows: epochs of fresh permutations."""
  gen = np.random.default_rng(seed)
  per_epoch = n // batch_size
  if per_epoch < 1:
    raise ValueError(f"batch_size ({batch_size}) exceeds the {n} training "
                     "sequences.")
  epochs = -(-num_steps // per_epoch)
  rows = [gen.permutation(n)[: per_epoch * batch_size].reshape(
      per_epoch, batch_size) for _ in range(epochs)]
  return np.concatenate(rows)[:num_steps].astype(np.int32)


def _replicated(tree: Any) -> Optional[jax.sharding.Sharding]:
  """A replicated sharding on the mesh ``tree`` is sharded over, or None.

  The training data then sits on every device of the model's mesh (a
  single-device array would not mix with the sharded params).
  """
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(sharding.mesh,
                                        jax.sharding.PartitionSpec())
  return None


def _copy(tree: Any) -> Any:
  # Fresh buffers: donating them must not delete the caller's arrays (an
  # EWC anchor may alias the params it was consolidated at).
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def fit(
    forward: Forward,
    trainable: Any,
    frozen: Any,
    data: np.ndarray,
    *,
    tx: optax.GradientTransformation,
    opt_state: Any,
    num_steps: int,
    batch_size: int,
    seed: int = 0,
    steps_per_call: int = 5,
    eval_every: Optional[int] = None,
    evaluate_fn: Optional[Callable[[Any, int], Mapping[str, float]]] = None,
    keep_best: Optional[str] = None,
    on_steps: Optional[Callable[[int, np.ndarray, np.ndarray], None]] = None,
) -> tuple[Any, Any, dict[str, Any]]:
  """Minimises the mean token NLL on ``data`` ``[N, T + 1]``.

  Args:
    forward: ``forward(trainable, frozen, tokens) -> logits``; the same
      object across calls reuses the compiled step.
    trainable, frozen: what is trained, and what is passed along as is.
    data: the training sequences.
    tx, opt_state: the optimiser (:func:`optimizer`) and its state.
    num_steps, batch_size: optimiser steps, sequences per step.
    seed: the batch order (:func:`index_plan`).
    steps_per_call: steps per compiled call (interrupt latency).
    eval_every: steps between calls of ``evaluate_fn`` (a multiple of
      ``steps_per_call``); None: at the start and the end only.
    evaluate_fn: ``evaluate_fn(trainable, step) -> {name: loss}``, at the
      start, every ``eval_every`` steps and at the end.
    keep_best: a name of ``evaluate_fn``'s results: return the trainable
      params with its lowest value among the evaluations.
    on_steps: ``on_steps(first_step, losses, penalties)`` after each call.

  Returns:
    ``(trainable, opt_state, history)``: ``history`` holds ``loss`` and
    ``penalty`` per step, ``eval_steps``, ``eval`` (``{name: [loss]}``),
    ``best_step`` and ``seconds``.

  Raises:
    Diverged: a non-finite training loss (the step is named).
  """
  check_positive_int("num_steps", num_steps)
  check_positive_int("steps_per_call", steps_per_call)
  check_positive_int("eval_every", eval_every, allow_none=True)
  if eval_every is not None and eval_every % steps_per_call:
    raise ValueError(f"eval_every ({eval_every}) must be a multiple of "
                     f"steps_per_call ({steps_per_call}).")
  plan = index_plan(seed, len(data), batch_size, num_steps)
  run = _step_fn(forward, tx)
  data = jax.device_put(np.asarray(data, np.int32), _replicated(trainable))
  trainable, opt_state = _copy(trainable), _copy(opt_state)
  history = {"loss": [], "penalty": [], "eval_steps": [], "eval": {},
             "best_step": None}
  best = [trainable]

  def watch(step):
    if evaluate_fn is None:
      return
    values = evaluate_fn(trainable, step)
    history["eval_steps"].append(step)
    for name, value in values.items():
      history["eval"].setdefault(name, []).append(float(value))
    if keep_best is not None and history["eval"][keep_best][-1] <= min(
        history["eval"][keep_best]):
      history["best_step"], best[0] = step, _copy(trainable)

  start_time = time.perf_counter()
  watch(0)
  done = 0
  while done < num_steps:
    take = min(steps_per_call, num_steps - done)
    rows = np.zeros((steps_per_call, batch_size), np.int32)
    rows[:take] = plan[done:done + take]
    active = np.arange(steps_per_call) < take
    trainable, opt_state, losses, pens = run(trainable, opt_state, frozen,
                                             data, rows, active)
    losses, pens = np.asarray(losses)[:take], np.asarray(pens)[:take]
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
      raise Diverged(done + int(bad[0]) + 1, float(losses[bad[0]]))
    history["loss"].append(losses)
    history["penalty"].append(pens)
    if on_steps is not None:
      on_steps(done, losses, pens)
    done += take
    if eval_every is not None and done % eval_every == 0 and done < num_steps:
      watch(done)
  watch(num_steps)
  history["loss"] = np.concatenate(history["loss"])
  history["penalty"] = np.concatenate(history["penalty"])
  history["seconds"] = time.perf_counter() - start_time
  if keep_best is not None:
    trainable = best[0]
  return trainable, opt_state, history


def fine_tune(forward: Forward, trainable, frozen, data, *, lam: float,
              importance: Any, tx: optax.GradientTransformation,
              **kwargs) -> tuple[Any, dict[str, Any]]:
  """Trains on ``data`` with EWC anchored at ``trainable``.

  ``tx.init``, then (for ``lam > 0``) ``ewc_jax.consolidate`` at
  ``trainable`` with ``importance`` and ``lam`` set by :func:`set_lam`;
  lam 0 is plain fine-tuning through the same chain and compiled step.
  """
  if not (np.isfinite(lam) and lam >= 0):
    raise ValueError(f"lam must be finite and >= 0, got {lam!r}.")
  opt_state = tx.init(trainable)
  if lam > 0:
    opt_state = set_lam(
        ewc_jax.consolidate(opt_state, trainable, importance), lam)
  trainable, _, history = fit(forward, trainable, frozen, data, tx=tx,
                              opt_state=opt_state, **kwargs)
  history["lam"] = float(lam)
  return trainable, history
