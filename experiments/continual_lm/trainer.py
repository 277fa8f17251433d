"""The experiment's trainer: jitted scans of steps, held-out evaluations.

Experiment code, not library code: the library's one-call helper is
``ewc_jax.continual.continual_fine_tune``; this module adds what a study
needs around the same optax chain (``optax.chain(ewc_jax.ewc(lam), opt)``):
held-out losses every ``eval_every`` steps, callbacks, the best parameters
by a held-out loss, and a lambda sweep that compiles once.
"""

import functools
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ewc_jax

LossFn = Callable[[Any, Any], jax.Array]
Callback = Callable[[int, Any], Mapping[str, Any]]
# on_chunk(first_step, losses, penalties, evals): after every chunk, with
# host arrays; evals holds the held-out losses just measured (if any).
ChunkHook = Callable[[int, np.ndarray, np.ndarray, Mapping[str, float]], None]


def check_positive_int(name: str, value: Any, *, allow_none: bool = False):
  """Raises a ValueError naming ``name`` unless ``value`` is an int >= 1."""
  if value is None and allow_none:
    return
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 1):
    raise ValueError(f"{name} must be a positive int, got {value!r}.")


def num_examples(data: Any, name: str) -> int:
  """The leading size of an in-memory data set, with errors naming it."""
  leaves = jax.tree.leaves(data)
  if (isinstance(data, list) or not leaves
      or not all(hasattr(x, "shape") and jnp.ndim(x) for x in leaves)):
    raise ValueError(
        f"{name} must be a pytree of arrays with a leading example axis (e.g. "
        f"an int array [N, T] of token ids); got {type(data).__name__}.")
  sizes = {x.shape[0] for x in leaves}
  if len(sizes) != 1:
    raise ValueError(
        f"every array of {name} needs the same leading (example) axis; got "
        f"{sorted(sizes)}.")
  n = sizes.pop()
  if n == 0:
    raise ValueError(f"{name} holds no examples.")
  return n


def _mean_loss(loss_fn: LossFn, params: Any, batch: Any) -> jax.Array:
  losses = jax.vmap(loss_fn, in_axes=(None, 0))(params, batch)
  return jnp.mean(losses.astype(jnp.float32))


@functools.partial(jax.jit, static_argnums=(0,))
def _loss_sum(loss_fn, params, chunk, mask):
  losses = jax.vmap(loss_fn, in_axes=(None, 0))(params, chunk)
  return jnp.sum(mask * losses.astype(jnp.float32))


def evaluate(loss_fn: LossFn, params: Any, data: Any, *,
             batch_size: int = 64) -> float:
  """The mean of ``loss_fn`` over the examples of ``data``.

  For a language model whose per-example loss is a sequence's mean token
  loss, over sequences of equal length, this is the mean token loss and
  ``math.exp`` of it the perplexity. Chunks are zero-padded to
  ``batch_size`` (one compilation) and the padding masked out.

  Example:
    >>> import jax.numpy as jnp
    >>> loss = lambda p, z: (z - p['w']) ** 2
    >>> evaluate(loss, {'w': jnp.array(1.0)}, jnp.array([0.0, 3.0]))
    2.5

  Raises:
    ValueError: no examples in ``data``; a bad ``batch_size``.
  """
  check_positive_int("batch_size", batch_size)
  n = num_examples(data, "data")
  total = jnp.zeros([], jnp.float32)
  for start in range(0, n, batch_size):
    take = min(batch_size, n - start)
    chunk = jax.tree.map(lambda x, s=start, t=take: np.pad(
        np.asarray(x[s:s + t]), [(0, batch_size - t)] + [(0, 0)] * (
            x.ndim - 1)), data)
    mask = (np.arange(batch_size) < take).astype(np.float32)
    total = total + _loss_sum(loss_fn, params, chunk, jnp.asarray(mask))
  return float(total) / n


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4))
def _train_chunk(loss_fn, optimizer, use_ewc, params, opt_state, lam, data,
                 idx, active):
  """Runs ``idx.shape[0]`` optimiser steps as one ``jax.lax.scan``.

  The EWC transformation is rebuilt here around the traced ``lam``, so every
  lambda of a sweep shares one compiled function (the EWC state, anchors and
  importance included, is an argument, never a baked-in constant). Steps with
  ``active`` False are skipped, so a short last chunk reuses the compilation.
  """
  tx = optax.chain(ewc_jax.ewc(lam), optimizer) if use_ewc else optimizer
  zero = jnp.zeros([], jnp.float32)

  def step(carry, xs):
    rows, on = xs

    def run(carry):
      params, opt_state = carry
      batch = jax.tree.map(lambda x: x[rows], data)
      loss, grads = jax.value_and_grad(
          lambda p: _mean_loss(loss_fn, p, batch))(params)
      pen = (ewc_jax.penalty(params, opt_state, lam=lam) if use_ewc
             else zero)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), (loss, pen)

    return jax.lax.cond(on, run, lambda c: (c, (zero, zero)), carry)

  (params, opt_state), (losses, penalties) = jax.lax.scan(
      step, (params, opt_state), (idx, active))
  return params, opt_state, losses, penalties


def _copy(tree: Any) -> Any:
  # Fresh buffers, so that donating them never deletes the caller's arrays
  # (a float32 anchor in the EWC state may alias the caller's params).
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def index_plan(key: jax.Array, n: int, batch_size: int,
               num_steps: int) -> np.ndarray:
  """``[num_steps, batch_size]`` rows: epochs of fresh permutations.

  Drawn on the host (a NumPy generator seeded by the key's bits): a device
  permutation would compile once per data set size.
  """
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  gen = np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())
  per_epoch = n // batch_size
  epochs = -(-num_steps // per_epoch)
  rows = [gen.permutation(n)[: per_epoch * batch_size].reshape(
      per_epoch, batch_size) for _ in range(epochs)]
  return np.concatenate(rows)[:num_steps].astype(np.int32)


def _check_fit_args(data, batch_size, num_steps, eval_data, eval_every,
                    eval_batch_size, callback, keep_best, data_name) -> int:
  n = num_examples(data, data_name)
  check_positive_int("batch_size", batch_size)
  if batch_size > n:
    raise ValueError(
        f"batch_size ({batch_size}) exceeds the {n} examples of {data_name}.")
  check_positive_int("num_steps", num_steps, allow_none=True)
  check_positive_int("eval_every", eval_every, allow_none=True)
  check_positive_int("eval_batch_size", eval_batch_size)
  if eval_data is not None and not isinstance(eval_data, Mapping):
    raise ValueError(
        "eval_data must be a mapping from names to data sets (e.g. "
        f"{{'old': old_test}}); got {type(eval_data).__name__}.")
  for name, split in (eval_data or {}).items():
    num_examples(split, f"eval_data[{name!r}]")
  if keep_best is not None and keep_best not in (eval_data or {}):
    raise ValueError(
        f"keep_best must name a set of eval_data, got {keep_best!r}.")
  if callback is not None and not callable(callback):
    raise ValueError(f"callback must be callable, got {callback!r}.")
  return n


def fit(
    loss_fn: LossFn,
    params: Any,
    data: Any,
    *,
    optimizer: optax.GradientTransformation,
    opt_state: Any = None,
    lam: Optional[float] = None,
    num_steps: Optional[int] = None,
    batch_size: int = 32,
    rng: Optional[jax.Array] = None,
    eval_data: Optional[Mapping[str, Any]] = None,
    eval_every: Optional[int] = None,
    eval_batch_size: int = 64,
    callback: Optional[Callback] = None,
    keep_best: Optional[str] = None,
    data_name: str = "data",
    on_chunk: Optional[ChunkHook] = None,
) -> tuple[Any, Any, dict[str, Any]]:
  """Minimises the mean of ``loss_fn`` over mini-batches of ``data``.

  Each step draws ``batch_size`` examples without replacement from a fresh
  permutation per epoch (:func:`index_plan`); the steps between two
  evaluations run as one jitted ``jax.lax.scan``.

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example;
      deterministic. The same object across calls reuses the compiled step.
    params: the parameter pytree (not modified).
    data: a pytree of arrays with a leading example axis, held in memory.
    optimizer: an optax transformation.
    opt_state: the state to start from: ``optimizer.init(params)`` when
      None and ``lam`` is None; with ``lam``, the state of
      ``optax.chain(ewc_jax.ewc(lam), optimizer)`` (already consolidated).
    lam: None for plain training; else the EWC strength, a traced argument
      (a lambda sweep compiles once).
    num_steps: optimiser steps; ``None`` runs one epoch, ``N // batch_size``.
    batch_size: examples per step, at most ``N``.
    rng: a PRNG key for the batch order (default ``jax.random.key(0)``).
    eval_data: ``{name: data}``: held-out sets whose mean loss is recorded
      before the first step, every ``eval_every`` steps and after the last.
    eval_every: steps between evaluations; ``None``: before and after only.
    eval_batch_size: chunk size of the evaluations.
    callback: ``callback(step, params) -> {metric: value}`` at the same
      points; its results go to ``history["metrics"]``.
    keep_best: a name of ``eval_data``: return the parameters with the
      lowest loss on it among the evaluation points (validation stopping),
      not the last ones.
    data_name: how errors name ``data``.
    on_chunk: ``on_chunk(first_step, losses, penalties, evals)`` after each
      chunk of steps (live metrics): the chunk's per-step values, already
      on the host, and the held-out losses measured after it.

  Returns:
    ``(params, opt_state, history)``; ``history`` holds ``"loss"`` and
    ``"penalty"`` (``[num_steps]`` float32 each), ``"eval_steps"``,
    ``"eval"`` (``{name: losses}``), ``"metrics"``, ``"best_step"`` and
    ``"train_seconds"`` (compilation included).
  """
  n = _check_fit_args(data, batch_size, num_steps, eval_data, eval_every,
                      eval_batch_size, callback, keep_best, data_name)
  num_steps = num_steps if num_steps is not None else n // batch_size
  key = rng if rng is not None else jax.random.key(0)
  plan = index_plan(key, n, batch_size, num_steps)
  chunk = min(eval_every or num_steps, num_steps)
  eval_data = dict(eval_data or {})
  watch = bool(eval_data) or callback is not None
  use_ewc = lam is not None
  if opt_state is None:
    opt_state = optimizer.init(params)
  data = jax.device_put(data)
  params, opt_state = _copy(params), _copy(opt_state)
  lam = jnp.asarray(lam if use_ewc else 0.0, jnp.float32)
  history = {"loss": [], "penalty": [], "eval_steps": [],
             "eval": {name: [] for name in eval_data}, "metrics": [],
             "best_step": None}
  best = [params]

  def watch_point(step):
    history["eval_steps"].append(step)
    for name, split in eval_data.items():
      history["eval"][name].append(
          evaluate(loss_fn, params, split, batch_size=eval_batch_size))
    if callback is not None:
      history["metrics"].append(dict(callback(step, params)))
    if keep_best is not None and history["eval"][keep_best][-1] <= min(
        history["eval"][keep_best]):
      history["best_step"], best[0] = step, _copy(params)

  start_time = time.perf_counter()
  if watch:
    watch_point(0)
  for start in range(0, num_steps, chunk):
    take = min(chunk, num_steps - start)
    idx = np.zeros([chunk, batch_size], np.int32)
    idx[:take] = plan[start:start + take]
    active = np.arange(chunk) < take
    params, opt_state, losses, penalties = _train_chunk(
        loss_fn, optimizer, use_ewc, params, opt_state, lam, data, idx,
        active)
    history["loss"].append(np.asarray(losses[:take]))
    history["penalty"].append(np.asarray(penalties[:take]))
    if watch:
      watch_point(start + take)
    if on_chunk is not None:
      on_chunk(start, history["loss"][-1], history["penalty"][-1],
               {name: v[-1] for name, v in history["eval"].items()}
               if watch else {})
  history["loss"] = np.concatenate(history["loss"])
  history["penalty"] = np.concatenate(history["penalty"])
  history["eval_steps"] = np.asarray(history["eval_steps"], np.int32)
  history["eval"] = {k: np.asarray(v) for k, v in history["eval"].items()}
  history["train_seconds"] = time.perf_counter() - start_time
  if keep_best is not None:
    params = best[0]
  return params, opt_state, history


def fine_tune(loss_fn: LossFn, params: Any, data: Any, *, lam: float,
              importance: Any, optimizer: optax.GradientTransformation,
              **kwargs) -> tuple[Any, dict[str, Any]]:
  """Trains on ``data`` with EWC anchored at ``params`` with ``importance``.

  ``optax.chain(ewc_jax.ewc(lam), optimizer)``, consolidated once at
  ``params`` with ``importance`` (none for ``lam = 0``: plain fine-tuning
  through the same chain and the same compiled step), then :func:`fit`.

  Returns:
    ``(params, history)`` as in :func:`fit`, with ``history["lam"]``.
  """
  tx = optax.chain(ewc_jax.ewc(lam), optimizer)  # checks lam
  opt_state = tx.init(params)
  if float(lam) > 0.0:  # lam = 0: a zero importance would be warned of
    opt_state = ewc_jax.consolidate(opt_state, params, importance)
  params, _, history = fit(loss_fn, params, data, optimizer=optimizer,
                           opt_state=opt_state, lam=float(lam), **kwargs)
  history["lam"] = float(lam)
  return params, history
