"""Continual fine-tuning with EWC: importance on old data, training on new.

The high-level entry point for the common case of one model, an old data set
whose skills must be kept and a new one to learn (say a language model
fine-tuned on a new corpus). Everything here is built from the core API:
:func:`ewc_jax.empirical_fisher` for the importance, :func:`ewc_jax.ewc` and
:func:`ewc_jax.consolidate` for the pull, :func:`ewc_jax.penalty` for the log.
"""

import functools
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ewc_jax._src import chunking
from ewc_jax._src import fisher as fisher_lib
from ewc_jax._src import transform as transform_lib

IMPORTANCE_ESTIMATORS = ("empirical", "batched")

LossFn = Callable[[Any, Any], jax.Array]
Callback = Callable[[int, Any], Mapping[str, Any]]

# HF Trainer's defaults: AdamW, learning rate 5e-5, no weight decay.
DEFAULT_OPTIMIZER = optax.adam(5e-5)


def _check_positive_int(name: str, value: Any, *, allow_none: bool = False):
  if value is None and allow_none:
    return
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 1):
    raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _num_examples(data: Any, name: str) -> int:
  """The leading size of an in-memory data set, with errors naming it."""
  if not chunking.is_batch(data):
    raise ValueError(
        f"{name} must be a pytree of arrays with a leading example axis (e.g. "
        f"an int array [N, T] of token ids); got {type(data).__name__}.")
  n = chunking.leading_size(data, name)
  if n == 0:
    raise ValueError(f"{name} holds no examples.")
  return n


def _mean_loss(loss_fn: LossFn, params: Any, batch: Any,
               mask: Optional[jax.Array] = None) -> jax.Array:
  losses = jax.vmap(loss_fn, in_axes=(None, 0))(params, batch)
  losses = losses.astype(jnp.float32)
  if mask is None:
    return jnp.mean(losses)
  return jnp.sum(mask * losses) / jnp.sum(mask)


def compute_importance(
    loss_fn: LossFn,
    params: Any,
    data: Any,
    *,
    estimator: str = "empirical",
    batch_size: int = 64,
    num_examples: Optional[int] = None,
) -> Any:
  r"""How much each parameter matters to ``data``: a diagonal importance.

  With ``loss_fn(params, z)`` the negative log-likelihood of one example
  ``z`` (for a language model, a sequence's mean token loss):

  * ``"empirical"`` (default): the empirical Fisher, the mean over the ``N``
    examples of squared per-example gradients (via
    :func:`ewc_jax.empirical_fisher`),

    .. math:: F = \frac{1}{N} \sum_n \left(\nabla_\theta \ell(\theta; z_n)
        \right)^2.

  * ``"batched"``: the square of each mini-batch's MEAN gradient, averaged
    over the mini-batches ``B_m`` of ``batch_size`` examples weighted by
    their sizes (a short last batch counts for what it holds),

    .. math:: \tilde F = \frac{1}{N} \sum_m |B_m| \left(\frac{1}{|B_m|}
        \sum_{n \in B_m} \nabla_\theta \ell(\theta; z_n)\right)^2,

    which is what ``compute_importance`` of the PyTorch snippet (and
    Avalanche's EWC) computes. It is not a Fisher: when per-example
    gradients are uncorrelated it is about ``F / batch_size``, so lambda
    values tuned for one estimator must be scaled by about ``batch_size`` for
    the other. Offered for comparison.

  Both estimators take the data in chunks of ``batch_size`` (padded to one
  shape, so each compiles once) and accumulate in float32 whatever the
  parameters' dtype, so bfloat16 models get a float32 importance. Peak memory
  is O(batch_size x #params) for ``"empirical"`` and O(#params) plus one
  mini-batch's activations for ``"batched"``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ewc_jax.continual import compute_importance
    >>> loss = lambda p, z: 0.5 * (z[0] * p['w'] - z[1]) ** 2
    >>> data = (jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0]))
    >>> params = {'w': jnp.array(1.0)}
    >>> float(compute_importance(loss, params, data)['w'])  # (1 + 16) / 2
    8.5
    >>> f = compute_importance(loss, params, data, estimator='batched')
    >>> float(f['w'])  # ((1 + 4) / 2) ** 2
    6.25

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE example
      (one slice, without the leading axis, of ``data``'s arrays).
      Deterministic (dropout off). Pass the same function object each time
      to reuse the compiled code.
    params: the parameter pytree at the end of the old task.
    data: a pytree of arrays with a leading example axis, or an iterable of
      such batches (streamed).
    estimator: ``"empirical"`` or ``"batched"``.
    batch_size: examples per chunk; for ``"batched"`` also the mini-batch
      whose mean gradient is squared.
    num_examples: use at most this many examples; ``None`` uses all.

  Returns:
    A float32 pytree shaped like ``params``.

  Raises:
    ValueError: unknown ``estimator``; ``batch_size`` or ``num_examples`` not
      a positive int; no examples in ``data``.
  """
  if estimator not in IMPORTANCE_ESTIMATORS:
    raise ValueError(
        f"estimator must be one of {IMPORTANCE_ESTIMATORS}, got "
        f"{estimator!r}.")
  return fisher_lib.empirical_fisher(
      loss_fn, params, data, estimator=estimator, batch_size=batch_size,
      num_examples=num_examples)


@functools.partial(jax.jit, static_argnums=(0,))
def _loss_sum(loss_fn, params, chunk, mask):
  losses = jax.vmap(loss_fn, in_axes=(None, 0))(params, chunk)
  return jnp.sum(mask * losses.astype(jnp.float32))


def evaluate(loss_fn: LossFn, params: Any, data: Any, *,
             batch_size: int = 64) -> float:
  """The mean of ``loss_fn`` over the examples of ``data``.

  For a language model whose per-example loss is a sequence's mean token
  loss, over sequences of equal length, this is the mean token loss and
  ``math.exp`` of it the perplexity.

  Example:
    >>> import jax.numpy as jnp
    >>> from ewc_jax.continual import evaluate
    >>> loss = lambda p, z: (z - p['w']) ** 2
    >>> evaluate(loss, {'w': jnp.array(1.0)}, jnp.array([0.0, 3.0]))
    2.5

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar`` as in
      :func:`compute_importance`.
    params: the parameters.
    data: a pytree of arrays with a leading example axis, or an iterable of
      such batches.
    batch_size: examples per chunk.

  Returns:
    A Python float.

  Raises:
    ValueError: no examples in ``data``; a bad ``batch_size``.
  """
  total, count = jnp.zeros([], jnp.float32), 0
  for chunk, mask in chunking.chunks(data, batch_size, None, "data"):
    total = total + _loss_sum(loss_fn, params, chunk,
                              jnp.asarray(mask, jnp.float32))
    count += int(mask.sum())
  if count == 0:
    raise ValueError("data holds no examples: nothing to evaluate.")
  return float(total) / count


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3),
                   donate_argnums=(4, 5))
def _train_chunk(loss_fn, optimizer, use_ewc, ewc_mask, params, opt_state,
                 lam, data, idx, active):
  """Runs ``idx.shape[0]`` optimiser steps as one ``jax.lax.scan``.

  The EWC transformation is rebuilt here around the traced ``lam``, so every
  lambda of a sweep shares one compiled function (the EWC state, anchors and
  importance included, is an argument, never a baked-in constant). Steps with
  ``active`` False are skipped, so a short last chunk reuses the compilation.
  """
  if use_ewc:
    tx = optax.chain(transform_lib.ewc(lam, mask=ewc_mask), optimizer)
  else:
    tx = optimizer
  zero = jnp.zeros([], jnp.float32)

  def step(carry, xs):
    rows, on = xs

    def run(carry):
      params, opt_state = carry
      batch = jax.tree.map(lambda x: x[rows], data)
      loss, grads = jax.value_and_grad(
          lambda p: _mean_loss(loss_fn, p, batch))(params)
      pen = transform_lib.penalty(params, opt_state) if use_ewc else zero
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), (loss, pen)

    def skip(carry):
      return carry, (zero, zero)

    return jax.lax.cond(on, run, skip, carry)

  (params, opt_state), (losses, penalties) = jax.lax.scan(
      step, (params, opt_state), (idx, active))
  return params, opt_state, losses, penalties


def _copy(tree: Any) -> Any:
  # Fresh buffers, so that donating them never deletes the caller's arrays
  # (a float32 anchor in the EWC state may alias the caller's params).
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _index_plan(key: jax.Array, n: int, batch_size: int,
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


def _fit(loss_fn, params, data, *, optimizer, opt_state, use_ewc, ewc_mask,
         lam, num_steps, batch_size, rng, eval_data, eval_every,
         eval_batch_size, callback, data_name):
  """The training loop shared by :func:`train` and the fine-tuning."""
  n = _num_examples(data, data_name)
  _check_positive_int("batch_size", batch_size)
  if batch_size > n:
    raise ValueError(
        f"batch_size ({batch_size}) exceeds the {n} examples of {data_name}.")
  _check_positive_int("num_steps", num_steps, allow_none=True)
  _check_positive_int("eval_every", eval_every, allow_none=True)
  _check_positive_int("eval_batch_size", eval_batch_size)
  if eval_data is not None and not isinstance(eval_data, Mapping):
    raise ValueError(
        "eval_data must be a mapping from names to data sets (e.g. "
        f"{{'old': old_test}}); got {type(eval_data).__name__}.")
  eval_data = dict(eval_data or {})
  for name, split in eval_data.items():
    _num_examples(split, f"eval_data[{name!r}]")
  if callback is not None and not callable(callback):
    raise ValueError(f"callback must be callable, got {callback!r}.")
  num_steps = num_steps if num_steps is not None else n // batch_size
  key = rng if rng is not None else jax.random.key(0)
  plan = _index_plan(key, n, batch_size, num_steps)
  chunk = min(eval_every or num_steps, num_steps)
  watch = bool(eval_data) or callback is not None

  data = jax.device_put(data)
  params, opt_state = _copy(params), _copy(opt_state)
  lam = jnp.asarray(lam, jnp.float32)
  history = {"loss": [], "penalty": [], "eval_steps": [],
             "eval": {name: [] for name in eval_data}, "metrics": []}

  def watch_point(step):
    history["eval_steps"].append(step)
    for name, split in eval_data.items():
      history["eval"][name].append(
          evaluate(loss_fn, params, split, batch_size=eval_batch_size))
    if callback is not None:
      history["metrics"].append(dict(callback(step, params)))

  start_time = time.perf_counter()
  if watch:
    watch_point(0)
  for start in range(0, num_steps, chunk):
    take = min(chunk, num_steps - start)
    idx = np.zeros([chunk, batch_size], np.int32)
    idx[:take] = plan[start:start + take]
    active = np.arange(chunk) < take
    params, opt_state, losses, penalties = _train_chunk(
        loss_fn, optimizer, use_ewc, ewc_mask, params, opt_state, lam, data,
        idx, active)
    history["loss"].append(np.asarray(losses[:take]))
    history["penalty"].append(np.asarray(penalties[:take]))
    if watch:
      watch_point(start + take)
  history["loss"] = np.concatenate(history["loss"])
  history["penalty"] = np.concatenate(history["penalty"])
  history["eval_steps"] = np.asarray(history["eval_steps"], np.int32)
  history["eval"] = {k: np.asarray(v) for k, v in history["eval"].items()}
  history["train_seconds"] = time.perf_counter() - start_time
  return params, opt_state, history


def train(
    loss_fn: LossFn,
    params: Any,
    data: Any,
    *,
    optimizer: optax.GradientTransformation = DEFAULT_OPTIMIZER,
    num_steps: Optional[int] = None,
    batch_size: int = 32,
    rng: Optional[jax.Array] = None,
    eval_data: Optional[Mapping[str, Any]] = None,
    eval_every: Optional[int] = None,
    eval_batch_size: int = 64,
    callback: Optional[Callback] = None,
) -> tuple[Any, dict[str, Any]]:
  """Minimises the mean of ``loss_fn`` over mini-batches of ``data``.

  A plain trainer (the ``lam = 0`` case of :func:`continual_fine_tune`, with
  no importance computed): each step draws ``batch_size`` examples without
  replacement from a fresh permutation per epoch, and the steps between two
  evaluations run as one jitted ``jax.lax.scan``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from ewc_jax.continual import train
    >>> loss = lambda p, z: (z - p['w']) ** 2
    >>> params, history = train(loss, {'w': jnp.array(0.0)},
    ...                         jnp.array([1.0, 3.0]), batch_size=2,
    ...                         optimizer=optax.sgd(0.25), num_steps=20)
    >>> round(float(params['w']), 3)
    2.0

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example (no
      leading axis); deterministic. Pass the same function object to every
      call to reuse the compiled step.
    params: the parameter pytree (not modified).
    data: a pytree of arrays with a leading example axis, held in memory.
    optimizer: an optax transformation (the same object across calls reuses
      the compiled step).
    num_steps: optimiser steps; ``None`` runs one epoch, ``N // batch_size``.
    batch_size: examples per step, at most ``N``.
    rng: a PRNG key for the batch order (default ``jax.random.key(0)``).
    eval_data: ``{name: data}``: held-out sets whose mean loss (see
      :func:`evaluate`) is recorded before the first step, every
      ``eval_every`` steps and after the last.
    eval_every: steps between evaluations; ``None``: before and after only.
    eval_batch_size: chunk size of the evaluations.
    callback: ``callback(step, params) -> {metric: value}``, called at the
      same points as the evaluations; its results go to
      ``history["metrics"]``.

  Returns:
    ``(params, history)``, with ``history`` as in :func:`continual_fine_tune`
    (its ``"penalty"`` is zero).

  Raises:
    ValueError: ``data`` not an array pytree or empty; ``batch_size`` larger
      than the data; a non-positive ``num_steps``, ``eval_every`` or batch
      size; empty ``eval_data`` sets.
  """
  params, _, history = _fit(
      loss_fn, params, data, optimizer=optimizer,
      opt_state=optimizer.init(params), use_ewc=False, ewc_mask=None,
      lam=0.0, num_steps=num_steps, batch_size=batch_size, rng=rng,
      eval_data=eval_data, eval_every=eval_every,
      eval_batch_size=eval_batch_size, callback=callback, data_name="data")
  return params, history


def continual_fine_tune(
    loss_fn: LossFn,
    params: Any,
    old_data: Any,
    new_data: Any,
    *,
    lam: float = 1.0,
    optimizer: optax.GradientTransformation = DEFAULT_OPTIMIZER,
    num_steps: Optional[int] = None,
    batch_size: int = 32,
    estimator: str = "empirical",
    fisher_batch_size: int = 64,
    fisher_examples: Optional[int] = None,
    importance: Optional[Any] = None,
    mask: Optional[Any] = None,
    rng: Optional[jax.Array] = None,
    eval_data: Optional[Mapping[str, Any]] = None,
    eval_every: Optional[int] = None,
    eval_batch_size: int = 64,
    callback: Optional[Callback] = None,
) -> tuple[Any, dict[str, Any]]:
  r"""Fine-tunes on ``new_data`` while EWC protects what ``old_data`` needed.

  The JAX counterpart of the PyTorch snippet's
  ``continual_fine_tune(model, tokenizer, old_dataset, new_dataset)``:

  1. the importance ``F`` of each parameter on the old data, at the current
     parameters ``theta*`` (:func:`compute_importance`; the per-example
     empirical Fisher by default, the snippet's squared batch gradients with
     ``estimator="batched"``);
  2. training on the new data with
     ``optax.chain(ewc_jax.ewc(lam), optimizer)`` after
     ``ewc_jax.consolidate(opt_state, theta*, F)``, which minimises

     .. math:: \frac{1}{|B|}\sum_{z \in B} \ell(\theta; z)
         + \frac{\lambda}{2} \sum_i F_i (\theta_i - \theta^*_i)^2

     over mini-batches ``B`` of the new data (the snippet's ``ewc_loss``,
     with the 1/2 of Kirkpatrick et al.; the snippet has none, so its lambda
     is half of this one for the same pull).

  The model is any parameter pytree plus a per-example loss. With Flax NNX::

    graphdef, params = nnx.split(model, nnx.Param)  # model holds only Params
    def loss_fn(params, tokens):  # one sequence [T + 1] of token ids
      logits = nnx.merge(graphdef, params)(tokens[None, :-1])[0]
      return optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), tokens[1:]).mean()
    params, history = continual_fine_tune(loss_fn, params, old, new, lam=10.)
    nnx.update(model, params)

  The steps between two evaluations run as one jitted ``jax.lax.scan``;
  lambda, the anchors and the importance are traced arguments, so a lambda
  sweep with the same ``loss_fn`` and ``optimizer`` objects compiles once.
  Compute the importance once with :func:`compute_importance` and pass it as
  ``importance`` to sweep lambda without recomputing it.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from ewc_jax.continual import continual_fine_tune
    >>> loss = lambda p, z: (z[1] - z[0] * p['w']) ** 2
    >>> old = jnp.array([[1.0, 2.0], [2.0, 1.0]])  # F = (2^2 + 4^2) / 2
    >>> new = jnp.array([[1.0, 3.0], [2.0, 6.0]])  # y = 3x: needs w = 3
    >>> params = {'w': jnp.array(1.0)}
    >>> opt = optax.sgd(0.02)
    >>> ft, _ = continual_fine_tune(loss, params, old, new, lam=0.0,
    ...                             optimizer=opt, num_steps=200, batch_size=2)
    >>> kept, hist = continual_fine_tune(loss, params, old, new, lam=1.0,
    ...                                  optimizer=opt, num_steps=200,
    ...                                  batch_size=2)
    >>> # kept: 5 (3 - w) = lam F (w - 1), the new pull against the old one.
    >>> print(round(float(ft['w']), 2), round(float(kept['w']), 2))
    3.0 1.67
    >>> bool(hist['penalty'][-1] > 0)
    True

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar``, the loss (negative
      log-likelihood) of ONE example; for a language model a sequence's mean
      token loss. Deterministic. The same object across calls reuses the
      compiled functions.
    params: the parameters after training on the old data: the EWC anchor
      and the starting point (not modified).
    old_data: the old data set: a pytree of arrays with a leading example
      axis, or an iterable of such batches. Unused when ``importance`` is
      given or ``lam`` is 0 (may then be ``None``).
    new_data: the new data set, a pytree of arrays with a leading example
      axis, held in memory.
    lam: the EWC strength ``lambda >= 0``; 0 is plain fine-tuning (no
      importance is computed). Values for ``"batched"`` are about
      ``fisher_batch_size`` times those for ``"empirical"``.
    optimizer: the base optax optimiser (default Adam, lr 5e-5, as HF
      Trainer); EWC's pull is chained before it.
    num_steps: optimiser steps; ``None`` runs one epoch of ``new_data``.
    batch_size: examples per step.
    estimator: the importance, ``"empirical"`` or ``"batched"`` (see
      :func:`compute_importance`).
    fisher_batch_size: chunk size of the importance; for ``"batched"``, also
      the mini-batch whose mean gradient is squared.
    fisher_examples: use at most this many old examples; ``None``: all.
    importance: a precomputed importance shaped like ``params`` (skips
      step 1; ``estimator``, ``fisher_*`` and ``old_data`` are then unused).
    mask: passed to :func:`ewc_jax.ewc`: which parameters EWC holds.
    rng: a PRNG key for the batch order (default ``jax.random.key(0)``).
    eval_data: ``{name: data}`` held-out sets (e.g. ``{"old": ..., "new":
      ...}``) whose mean loss is recorded before the first step, every
      ``eval_every`` steps and after the last.
    eval_every: steps between evaluations; ``None``: before and after only.
    eval_batch_size: chunk size of the evaluations.
    callback: ``callback(step, params) -> {metric: value}``, called at the
      evaluation points (for metrics other than the mean loss).

  Returns:
    ``(params, history)``: the fine-tuned parameters and a dict with

    * ``"loss"``: ``[num_steps]`` float32, each step's mean new-data loss;
    * ``"penalty"``: ``[num_steps]`` float32, the EWC penalty at the same
      parameters (so ``loss + penalty`` is the objective; 0 at step 0);
    * ``"eval_steps"``: int32 steps at which evaluations ran (0 = before);
    * ``"eval"``: ``{name: float array}`` mean losses at those steps;
    * ``"metrics"``: the callback's dicts at those steps;
    * ``"lam"``, ``"estimator"``, ``"importance_seconds"``,
      ``"train_seconds"`` (the latter includes compilation).

  Raises:
    ValueError: ``lam`` negative or not finite; unknown ``estimator``; empty
      ``old_data`` or ``new_data`` (the message names which); ``batch_size``
      larger than ``new_data``; non-positive step or batch counts; an
      ``importance`` not shaped like ``params``.

  References:
    Kirkpatrick et al., `Overcoming catastrophic forgetting in neural networks
    <https://arxiv.org/abs/1612.00796>`_, PNAS 2017.
  """
  tx = optax.chain(transform_lib.ewc(lam, mask=mask), optimizer)  # checks lam
  lam = float(lam)
  if estimator not in IMPORTANCE_ESTIMATORS:
    raise ValueError(
        f"estimator must be one of {IMPORTANCE_ESTIMATORS}, got "
        f"{estimator!r}.")
  _check_positive_int("fisher_batch_size", fisher_batch_size)
  _check_positive_int("fisher_examples", fisher_examples, allow_none=True)
  _num_examples(new_data, "new_data")  # fail before the costly importance
  start = time.perf_counter()
  if importance is None and lam > 0.0:
    if old_data is None:
      raise ValueError(
          "old_data is None: pass the old data set, or a precomputed "
          "importance=..., or lam=0 for plain fine-tuning.")
    try:
      importance = compute_importance(
          loss_fn, params, old_data, estimator=estimator,
          batch_size=fisher_batch_size, num_examples=fisher_examples)
    except ValueError as e:
      raise ValueError(f"old_data: {e}") from e
  jax.block_until_ready(importance)
  importance_seconds = time.perf_counter() - start
  opt_state = tx.init(params)
  if lam > 0.0:  # lam = 0: no pull, and a zero importance would be warned of
    opt_state = transform_lib.consolidate(opt_state, params, importance)
  params, _, history = _fit(
      loss_fn, params, new_data, optimizer=optimizer, opt_state=opt_state,
      use_ewc=True, ewc_mask=_hashable_mask(mask), lam=lam,
      num_steps=num_steps, batch_size=batch_size, rng=rng,
      eval_data=eval_data, eval_every=eval_every,
      eval_batch_size=eval_batch_size, callback=callback,
      data_name="new_data")
  history.update(lam=lam, estimator=estimator,
                 importance_seconds=importance_seconds)
  return params, history


def _hashable_mask(mask: Any) -> Any:
  """``mask`` as a static jit argument: a tree is wrapped in a callable."""
  if mask is None or callable(mask):
    return mask
  return lambda _: mask
