"""One call for continual fine-tuning: importance on old data, EWC on new.

A thin helper in the shape of the PyTorch snippet this project grew from,
built only from the public API: :func:`ewc_jax.empirical_fisher` for the
importance, :func:`ewc_jax.ewc` and :func:`ewc_jax.consolidate` for the pull,
:func:`ewc_jax.penalty` for the log. Evaluation, callbacks and sweeps are
experiment code (``experiments/continual_lm/``).
"""

import functools
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ewc_jax._src import empirical
from ewc_jax._src import hyperparams
from ewc_jax._src import transform
from ewc_jax._src import tree as tree_lib
from ewc_jax._src import validate
from ewc_jax._src.estimators import EstimatorName

# HF Trainer's defaults: Adam(W), learning rate 5e-5, no weight decay.
DEFAULT_OPTIMIZER = optax.adam(5e-5)


class FineTuneResult(NamedTuple):
  """What :func:`continual_fine_tune` returns.

  Attributes:
    params: the fine-tuned parameters.
    opt_state: the state of ``optax.chain(ewc_jax.ewc(lam), optimizer)``
      after the last step; its EWC part holds every task consolidated so far.
      Pass it back as ``opt_state=`` to chain a further data set.
    losses: ``[num_steps]`` float32, each step's mean loss on the new data.
    penalties: ``[num_steps]`` float32, the EWC penalty at the same
      parameters (``losses + penalties`` is the objective).
  """

  params: Any
  opt_state: Any
  losses: np.ndarray
  penalties: np.ndarray


def _size(data: Any, name: str) -> int:
  leaves = jax.tree.leaves(data)
  if isinstance(data, list) or not leaves or not all(
      jnp.ndim(x) for x in leaves):
    raise ValueError(f"{name} must be a pytree of arrays with a leading "
                     f"example axis; got {type(data).__name__}.")
  if len({x.shape[0] for x in leaves}) != 1 or not leaves[0].shape[0]:
    raise ValueError(f"{name} holds no examples or unequal leading axes.")
  return leaves[0].shape[0]


@functools.lru_cache(maxsize=32)
def chain(optimizer, mask=None) -> optax.GradientTransformation:
  """``optax.chain(ewc(lam, mask=mask), optimizer)`` with lam injected.

  The state holds lam (set it with ``ewc_jax.set_hyperparams``), and the
  chain is one object per ``(optimizer, mask)``, so one compiled step
  serves every lambda of a sweep.
  """
  ewc = optax.inject_hyperparams(transform.ewc,
                                 static_args=("mode", "gamma", "mask"))
  return optax.chain(ewc(lam=0.0, mask=mask), optimizer)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def _steps(loss_fn, tx, params, opt_state, data, rows):
  """``rows.shape[0]`` steps of the EWC chain as one ``jax.lax.scan``."""

  def step(carry, idx):
    params, opt_state = carry
    batch = jax.tree.map(lambda x: x[idx], data)
    mean = lambda p: jnp.mean(jax.vmap(loss_fn, (None, 0))(p, batch).astype(
        jnp.float32))
    loss, grads = jax.value_and_grad(mean)(params)
    pen = transform.penalty(params, opt_state)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), (loss, pen)

  return jax.lax.scan(step, (params, opt_state), rows)


def continual_fine_tune(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    old_data: Any,
    new_data: Any,
    *,
    lam: float = 1.0,
    optimizer: optax.GradientTransformation = DEFAULT_OPTIMIZER,
    num_steps: Optional[int] = None,
    batch_size: int = 32,
    estimator: EstimatorName = "empirical",
    fisher_batch_size: int = 64,
    fisher_examples: Optional[int] = None,
    importance: Any = None,
    mask: Optional[Callable[[Any], Any]] = None,
    rng: Optional[jax.Array] = None,
    opt_state: Any = None,
) -> FineTuneResult:
  r"""Fine-tunes on ``new_data`` while EWC protects what ``old_data`` needed.

  1. The importance ``F`` of each parameter on the old data at the current
     parameters ``theta*``: :func:`ewc_jax.empirical_fisher` (per-example;
     ``estimator="batched"`` gives the snippet's squared batch gradients,
     about ``F / fisher_batch_size``, so lambdas differ by that factor).
  2. ``ewc_jax.consolidate(opt_state, theta*, F)``, then ``num_steps`` steps
     of ``optax.chain(ewc_jax.ewc(lam), optimizer)`` on mini-batches ``B`` of
     the new data, minimising

     .. math:: \frac{1}{|B|}\sum_{z \in B} \ell(\theta; z)
         + \frac{\lambda}{2} \sum_k \sum_i F_{k,i} (\theta_i - \theta^*_{k,i})^2

  Chain a third data set by passing the result's ``opt_state`` back, which
  keeps the earlier quadratics (and the optimiser's moments)::

    r1 = continual_fine_tune(loss_fn, params, a, b, lam=10.0)
    r2 = continual_fine_tune(loss_fn, r1.params, b, c, lam=10.0,
                             opt_state=r1.opt_state)

  Example:
    >>> import jax.numpy as jnp, optax
    >>> loss = lambda p, z: (z[1] - z[0] * p['w']) ** 2
    >>> old = jnp.array([[1.0, 2.0], [2.0, 1.0]])  # F = (2^2 + 4^2) / 2
    >>> new = jnp.array([[1.0, 3.0], [2.0, 6.0]])  # y = 3x: needs w = 3
    >>> r = continual_fine_tune(loss, {'w': jnp.array(1.0)}, old, new,
    ...                         lam=1.0, optimizer=optax.sgd(0.02),
    ...                         num_steps=200, batch_size=2)
    >>> round(float(r.params['w']), 2)  # 5 (3 - w) = F (w - 1)
    1.67

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar``, the negative
      log-likelihood of ONE example (no leading axis); deterministic.
    params: the parameters after the old data (anchor and start).
    old_data: a pytree of arrays with a leading example axis (or an iterable
      of such batches); unused (may be None) with ``importance`` or lam 0.
    new_data: a pytree of arrays with a leading example axis, in memory.
    lam: the EWC strength >= 0; 0 is plain fine-tuning.
    optimizer: the base optax optimiser, chained after EWC's pull.
    num_steps: optimiser steps; None: one epoch of ``new_data``.
    batch_size: examples per step, at most the size of ``new_data``.
    estimator: ``"empirical"`` or ``"batched"``.
    fisher_batch_size: chunk size of the importance (``"batched"``: the
      mini-batch whose mean gradient is squared).
    fisher_examples: at most this many old examples; None: all.
    importance: a precomputed importance shaped like ``params``.
    mask: passed to :func:`ewc_jax.ewc` (a callable, it is a static
      argument of the compiled step).
    rng: a PRNG key for the batch order (default ``jax.random.key(0)``).
    opt_state: a previous result's ``opt_state`` to continue from.

  Returns:
    A :class:`FineTuneResult`.

  Raises:
    ValueError: a bad ``lam``, ``estimator``, ``rng`` or size; empty data
      (named); nan or inf in ``new_data``; ``old_data`` None with
      ``lam > 0`` and no ``importance``.

  Warns:
    RuntimeWarning: the training loss became nan or inf (the step is named).

  References:
    Kirkpatrick et al., `Overcoming catastrophic forgetting in neural networks
    <https://arxiv.org/abs/1612.00796>`_, PNAS 2017.
  """
  if mask is not None and not callable(mask):
    mask = functools.partial(lambda tree, _: tree, mask)  # a static argument
  validate.check_lam(lam)
  tx = chain(optimizer, mask)
  validate.choice("estimator", estimator, empirical.LOSS_ESTIMATORS)
  n = _size(new_data, "new_data")
  tree_lib.check_finite("new_data", new_data,
                        hint="Fix the data before training on it.")
  if rng is not None:
    validate.check_key("rng", rng)
  for name, value in (("batch_size", batch_size), ("num_steps", num_steps),
                      ("fisher_batch_size", fisher_batch_size),
                      ("fisher_examples", fisher_examples)):
    validate.positive_int_or_none(name, value)
  if batch_size > n:
    raise ValueError(f"batch_size ({batch_size}) exceeds the {n} examples "
                     "of new_data.")
  num_steps = n // batch_size if num_steps is None else num_steps
  if float(lam) > 0.0 and importance is None:
    if old_data is None:
      raise ValueError("old_data is None: pass the old data, a precomputed "
                       "importance=..., or lam=0 for plain fine-tuning.")
    try:
      importance = empirical.empirical_fisher(
          loss_fn, params, old_data, estimator=estimator,
          batch_size=fisher_batch_size, num_examples=fisher_examples)
    except ValueError as e:
      raise ValueError(f"old_data: {e}") from e
  if opt_state is None:
    opt_state = tx.init(params)
  elif not tree_lib.same_structure(opt_state,
                                   jax.eval_shape(tx.init, params)):
    raise ValueError("opt_state is not a state of continual_fine_tune's "
                     "chain (ewc_jax.ewc(lam, mask=mask) with lam injected, "
                     "then optimizer) for these params; pass a previous "
                     "result's opt_state with the same optimizer.")
  opt_state = hyperparams.set_hyperparams(opt_state, lam=lam)
  if float(lam) > 0.0:
    opt_state = transform.consolidate(opt_state, params, importance)
  key = rng if rng is not None else jax.random.key(0)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  # Epochs of permutations drawn on the host: no compile per data size.
  gen = np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())
  rows = np.concatenate([gen.permutation(n)[:n - n % batch_size].reshape(
      -1, batch_size) for _ in range(-(-num_steps // (n // batch_size)))])
  copy = lambda t: jax.tree.map(lambda x: jnp.array(x, copy=True), t)
  (params, opt_state), (losses, pens) = _steps(
      loss_fn, tx, copy(params), copy(opt_state), jax.device_put(new_data),
      jnp.asarray(rows[:num_steps]))
  losses = np.asarray(losses)
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    warnings.warn(
        f"continual_fine_tune: the training loss became non-finite at step "
        f"{int(bad[0])} of {num_steps} and the returned params are not "
        "usable; lower the learning rate or lam.", RuntimeWarning,
        stacklevel=2)
  return FineTuneResult(params, opt_state, losses, np.asarray(pens))
