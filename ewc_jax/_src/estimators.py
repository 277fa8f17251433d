"""The Fisher estimators, one record each: the only place their names live.

Every per-example estimator is a weighted set of output-space cotangents
``u_k`` per example, ``F = sum_k w_k (J^T u_k)^2`` with ``J`` the Jacobian
of the log-likelihood's logits: the two paths (``per_example.py``'s
``jax.vmap`` of VJPs and ``layerwise.py``) differ only in how they form the
squares. ``"batched"`` is no per-example estimator: it squares a mini-batch's
mean gradient.

A categorical model's logits are ``[*positions, C]`` per example: no
positions for a classifier (``[C]``), one per token for a sequence model
(``[T, V]``), with a token mask. ``d log p(c) / d logits = e_c - softmax``
at each position, so one sequence's gradient (that of the masked SUM of its
token log-likelihoods) backpropagates the cotangent
``mask_t (e_{y_t} - p_t)`` at every position at once.
"""

import dataclasses
from typing import Callable, Literal, Optional, get_args

import jax
import jax.numpy as jnp

from ewc_jax._src import validate

# How the diagonal Fisher is estimated (see ewc_jax.fisher_diagonal). The
# Literal is for type checkers; TABLE below must hold exactly these names.
EstimatorName = Literal["exact", "sampled", "empirical", "predicted",
                        "batched"]


def _positions(logits):
  return logits.shape[:-1]


def _masked(u, mask):
  """``u`` ``[K, *positions, C]`` zeroed at masked-out positions."""
  if mask is None:
    return u
  return u * mask.astype(u.dtype)[None, ..., None]


def _exact(logits, probs, labels, key, num_samples, mask):
  """Every class at every position, weight ``p(c)`` (and the mask)."""
  del labels, key, num_samples
  num_classes = logits.shape[-1]
  if not _positions(logits):  # a classifier: one cotangent per class
    return jnp.eye(num_classes, dtype=jnp.float32) - probs, probs
  # A sequence: one cotangent per (position t, class c), nonzero only at
  # its own position: u[t, c][s] = delta_ts (e_c - p_s).
  size = probs.size // num_classes
  flat = probs.reshape(size, num_classes)
  rows = jnp.eye(size, dtype=jnp.float32)
  classes = jnp.eye(num_classes, dtype=jnp.float32)
  u = rows[:, None, :, None] * (classes[None, :, None, :] - flat[None, None])
  w = flat if mask is None else flat * mask.reshape(size, 1)
  return (u.reshape((size * num_classes,) + logits.shape),
          w.reshape(-1).astype(jnp.float32))


def _all_classes(positions: int, classes: int, num_samples: int) -> int:
  del num_samples
  return positions * classes


def _drawn(positions: int, classes: int, num_samples: int) -> int:
  del positions, classes
  return num_samples


def _one(positions: int, classes: int, num_samples: int) -> int:
  del positions, classes, num_samples
  return 1


def _sampled(logits, probs, labels, key, num_samples, mask):
  """``num_samples`` labels drawn from the model at every position."""
  del labels
  y = jax.random.categorical(key, logits,
                             shape=(num_samples,) + _positions(logits))
  u = jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.float32) - probs
  return (_masked(u, mask),
          jnp.full([num_samples], 1.0 / num_samples, jnp.float32))


def _one_label(pick):
  def cotangents(logits, probs, labels, key, num_samples, mask):
    del key, num_samples
    y = pick(logits, labels)
    u = jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.float32)[None] - probs
    return _masked(u, mask), jnp.ones([1], jnp.float32)
  return cotangents


@dataclasses.dataclass(frozen=True)
class Estimator:
  """One estimator of the diagonal Fisher (static, hashable).

  Attributes:
    name: what users pass as ``estimator=``.
    needs_labels: the data labels enter the estimate.
    needs_key: it draws labels from the model (``rng`` required).
    per_example: a sum of per-example squared gradients (the paths apply);
      otherwise the square of mini-batch mean gradients.
    default_chunk: the chunk (mini-batch) size when ``batch_size=None``;
      ``None``: planned per backend. ``"batched"`` fixes it, because its
      value depends on it.
    cotangents: ``(logits, probs, labels, key, num_samples, mask) -> (u,
      w)`` for one example: ``u`` ``[K, *logits.shape]`` float32 cotangents
      of the logits and ``w`` ``[K]`` their weights (per-example only).
    count: ``(positions, classes, num_samples) -> K``.
    doc: one line for error messages and docs.
  """
  name: str
  needs_labels: bool
  needs_key: bool
  per_example: bool
  default_chunk: Optional[int]
  cotangents: Optional[Callable]
  count: Callable[[int, int, int], int]
  doc: str

  def num_cotangents(self, logits_shape: tuple, num_samples: int) -> int:
    """``K``, the cotangents per example, for logits ``[*positions, C]``."""
    positions = 1
    for s in logits_shape[:-1]:
      positions *= s
    return self.count(positions, logits_shape[-1], num_samples)

  def one_cotangent(self, num_samples: int) -> bool:
    """Whether it backpropagates one cotangent per example."""
    return self.per_example and self.count(1, 2, num_samples) == 1


TABLE = {e.name: e for e in (
    Estimator("exact", False, False, True, None, _exact, _all_classes,
              "every class, weighted by the model's p(y|x): the true Fisher"),
    Estimator("sampled", False, True, True, None, _sampled, _drawn,
              "num_samples labels drawn from the model (Monte Carlo)"),
    Estimator("empirical", True, False, True, None,
              _one_label(lambda logits, labels: labels), _one,
              "the data label (the empirical Fisher)"),
    Estimator("predicted", False, False, True, None,
              _one_label(lambda logits, labels: jnp.argmax(logits, -1)),
              _one, "the model's own argmax label (van de Ven & Tolias 2019)"),
    Estimator("batched", True, False, False, 256, None, _one,
              "the square of each mini-batch's mean gradient (not a Fisher: "
              "about F / batch_size)"),
)}
if set(TABLE) != set(get_args(EstimatorName)):
  raise AssertionError("estimators.TABLE and EstimatorName disagree.")

NAMES: tuple[str, ...] = tuple(TABLE)
PER_EXAMPLE: tuple[str, ...] = tuple(n for n, e in TABLE.items()
                                     if e.per_example)


def get(name: str, options: tuple = NAMES, what: str = "estimator"
        ) -> Estimator:
  """The record of ``name``, or a ValueError listing ``options``."""
  return TABLE[validate.choice(what, name, options)]


def log_likelihood_cotangents(estimator: Estimator, logits, labels, key,
                              num_samples: int, mask=None):
  r"""Output-space cotangents whose backpropagation gives the Fisher terms.

  Args:
    estimator: a per-example :class:`Estimator`.
    logits: ``[*positions, C]`` logits of one example.
    labels: ``[*positions]`` data labels (used by ``"empirical"``).
    key: a PRNG key (used by ``"sampled"``).
    num_samples: labels drawn per example by ``"sampled"``.
    mask: ``[*positions]`` booleans (positions that count), or ``None``.

  Returns:
    ``(u, w)``: cotangents ``[K, *positions, C]`` and weights ``[K]``,
    float32.
  """
  if estimator.cotangents is None:
    raise ValueError(f'estimator="{estimator.name}" is not a per-example '
                     "estimator: it has no cotangents.")
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits)
  return estimator.cotangents(logits, probs, labels, key, num_samples, mask)


def backprop_cotangents(forward, primal, estimator: Estimator, labels, key,
                        num_samples: int, mask=None):
  """Backpropagates one example's :func:`log_likelihood_cotangents`.

  Args:
    forward: ``forward(primal) -> (logits, aux)`` for one example.
    primal: what the gradients are taken with respect to.
    estimator, labels, key, num_samples, mask: as for
      :func:`log_likelihood_cotangents`.

  Returns:
    ``(aux, grads, w)``: ``forward``'s ``aux``, the ``K`` gradients with
    respect to ``primal`` (leading axis ``K``, one forward pass) and their
    weights ``[K]``.
  """
  logits, vjp_fn, aux = jax.vjp(forward, primal, has_aux=True)
  u, w = log_likelihood_cotangents(estimator, logits, labels, key,
                                   num_samples, mask)
  (grads,) = jax.vmap(vjp_fn)(u.astype(logits.dtype))
  return aux, grads, w
