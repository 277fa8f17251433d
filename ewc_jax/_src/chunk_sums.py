"""What one chunk of examples adds to a pass: the per-chunk functions.

A pass over data (``pass_driver.py``) is a per-chunk function run by a
driver. Each function here is a frozen, hashable record (so that it can be
the static argument of the compiled programs) with

* ``zeros(params)``: float32 zeros of what it sums;
* ``__call__(params, chunk, mask, keys, axes)``: the sums over one chunk's
  real rows (``mask``), with one PRNG key per row; ``axes`` names the mesh
  axes the chunk's rows are split over (``()``: all rows are here);
* ``reduce_at_end``: sums over split rows add up (one ``psum`` at the end);
  otherwise the function reduces over ``axes`` itself, per chunk;
* ``labels(chunk)``: ``(labels, valid)``, the class labels whose range is
  checked and where they count (``None``: everywhere), or ``None``;
* ``divisor(data, n)``: what the sums over the first ``n`` rows are divided
  by (``n``, or the tokens they hold), and ``host_weight(chunk, real)`` its
  share from one chunk of a stream.

KFAC's factors are one more such function (``kfac/fisher.py``).
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax._src import chunking
from ewc_jax._src import estimators
from ewc_jax._src import layerwise
from ewc_jax._src import per_example


class PerRow:
  """Normalised per row (example); sums in float32 like the params."""

  @property
  def reduce_at_end(self) -> bool:
    return True

  def zeros(self, params):
    return zeros_f32(params)

  def labels(self, chunk):
    del chunk
    return None

  def divisor(self, data, n):
    del data
    return n

  def host_weight(self, chunk, real):
    del chunk
    return real


def zeros_f32(params):
  """Float32 zeros with each parameter's sharding (and shape)."""
  return jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)


def _square_weighted(count, g):
  return jax.tree.map(lambda t: count * jnp.square(t.astype(jnp.float32)), g)


def _mesh_mean_square(g, count, axes):
  """``n_b * (mean gradient)^2`` from a chunk's summed gradient ``g``."""
  g = jax.tree.map(lambda t: t.astype(jnp.float32), g)
  if axes:
    g, count = jax.lax.psum((g, count), axes)
  return jax.tree.map(lambda t: count * jnp.square(t / count), g)


def _split(chunk):
  """``(inputs, labels, token_mask or None)`` of a Fisher chunk."""
  inputs, labels, *rest = chunk
  return inputs, labels, (rest[0] if rest else None)


@dataclasses.dataclass(frozen=True)
class FisherSums(PerRow):
  """A categorical model's Fisher: per-example sums, or batched.

  Chunks are ``(inputs, labels)`` or ``(inputs, labels, token_mask)``;
  labels may be ``None`` where the estimator needs none. A sequence model
  (``positions``, e.g. ``(T,)``) is normalised per token kept by the mask
  (``per_token``), else per sequence.
  """
  apply_fn: Callable
  estimator: estimators.Estimator
  num_samples: int
  path: str  # "fast" or "vmap"
  plan: chunking.ChunkPlan
  positions: tuple = ()
  per_token: bool = True

  @property
  def reduce_at_end(self) -> bool:
    return self.estimator.per_example

  def labels(self, chunk):
    _, labels, token_mask = _split(chunk)
    return None if labels is None else (labels, token_mask)

  def _tokens(self, data, n, lib):
    token_mask = _split(data)[2]
    if token_mask is None:
      per_row = 1
      for s in self.positions:
        per_row *= s
      return n * per_row
    return lib.sum(lib.asarray(token_mask[:n], lib.float32))

  def divisor(self, data, n):
    if not (self.positions and self.per_token):
      return n
    return self._tokens(data, n, jnp)

  def host_weight(self, chunk, real):
    if not (self.positions and self.per_token):
      return real
    inputs, labels, token_mask = _split(chunk)
    return float(self._tokens(
        (None, None, None if token_mask is None else np.asarray(
            jax.device_get(token_mask))), real, np))

  def __call__(self, params, chunk, mask, keys, axes=()):
    inputs, labels, token_mask = _split(chunk)
    if not self.estimator.per_example:
      return self._batched(params, inputs, labels, mask, token_mask, axes)
    if labels is None:
      labels = jnp.zeros(mask.shape + self.positions, jnp.int32)
    chunk_sum = (layerwise.chunk_sum if self.path == "fast"
                 else per_example.chunk_sum)
    return chunk_sum(self.apply_fn, self.estimator, self.num_samples, params,
                     inputs, labels, keys, mask, token_mask, self.plan)

  def _nll(self, p, inputs, labels, keep):
    logp = jax.nn.log_softmax(self.apply_fn(p, inputs).astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return jnp.where(keep, nll, 0.0)

  def _batched(self, params, inputs, labels, mask, token_mask, axes):
    """``n_b * (grad of the batch's mean NLL)^2``: a batch weighted by size.

    ``n_b`` counts the batch's real examples (tokens, for a sequence model
    normalised per token).
    """
    keep = mask.reshape(mask.shape + (1,) * len(self.positions))
    if token_mask is not None:
      keep = keep & token_mask
    keep = keep & jnp.ones(labels.shape, bool)
    count = jnp.sum(keep.astype(jnp.float32))
    if self.positions and not self.per_token:  # per sequence: n_b rows
      count = jnp.sum(mask.astype(jnp.float32))
    count = jnp.maximum(count, 1.0)  # a chunk that keeps no token adds 0
    if axes:  # the batch's rows on several devices: reduce, then square
      g = jax.grad(lambda p: jnp.sum(self._nll(p, inputs, labels, keep)))(
          params)
      return _mesh_mean_square(g, count, axes)
    g = jax.grad(lambda p: jnp.sum(self._nll(p, inputs, labels, keep))
                 / count)(params)
    return _square_weighted(count, g)


@dataclasses.dataclass(frozen=True)
class LossSums(PerRow):
  """``empirical_fisher``: squared per-example gradients of any loss.

  ``"empirical"``: ``sum_i g_i^2``; ``"batched"``: ``n_b * (mean
  gradient)^2``. Chunks are any pytree of arrays with a leading axis.
  """
  loss_fn: Callable
  estimator: estimators.Estimator

  @property
  def reduce_at_end(self) -> bool:
    return self.estimator.per_example

  def _losses(self, p, chunk, mask):
    losses = jax.vmap(self.loss_fn, in_axes=(None, 0))(p, chunk)
    return jnp.where(mask, losses.astype(jnp.float32), 0.0)

  def __call__(self, params, chunk, mask, keys, axes=()):
    del keys
    if self.estimator.per_example:
      grads = jax.vmap(jax.grad(self.loss_fn), in_axes=(None, 0))(params,
                                                                 chunk)
      return jax.tree.map(
          lambda g: jnp.sum(jnp.where(
              mask.reshape((-1,) + (1,) * (g.ndim - 1)),
              jnp.square(g.astype(jnp.float32)), 0.0), axis=0), grads)
    count = jnp.sum(mask.astype(jnp.float32))
    if axes:
      g = jax.grad(lambda p: jnp.sum(self._losses(p, chunk, mask)))(params)
      return _mesh_mean_square(g, count, axes)
    g = jax.grad(lambda p: jnp.sum(self._losses(p, chunk, mask)) / count)(
        params)
    return _square_weighted(count, g)


def _one(x):
  return jax.tree.map(lambda a: a[None], x)


@dataclasses.dataclass(frozen=True)
class MASSums(PerRow):
  """MAS: ``sum_i |d ||f(x_i)||^2 / d theta|`` over a chunk of inputs."""
  apply_fn: Callable

  def __call__(self, params, chunk, mask, keys, axes=()):
    del keys, axes

    def sq_norm(p, x):
      out = self.apply_fn(p, _one(x))
      return jnp.sum(jnp.square(out.astype(jnp.float32)))

    grads = jax.vmap(jax.grad(sq_norm), in_axes=(None, 0))(params, chunk)
    weights = mask.astype(jnp.float32)
    return jax.tree.map(
        lambda g: jnp.einsum("b,b...->...", weights,
                             jnp.abs(g.astype(jnp.float32))), grads)
