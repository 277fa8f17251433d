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
* ``labels(chunk)``: the class labels whose range is checked, or ``None``.

KFAC's factors are one more such function (``kfac/fisher.py``).
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ewc_jax._src import chunking
from ewc_jax._src import estimators
from ewc_jax._src import layerwise
from ewc_jax._src import per_example


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


@dataclasses.dataclass(frozen=True)
class FisherSums:
  """A categorical model's Fisher: per-example sums, or batched.

  Chunks are ``(inputs, labels)``; labels may be ``None`` where the
  estimator needs none.
  """
  apply_fn: Callable
  estimator: estimators.Estimator
  num_samples: int
  path: str  # "fast" or "vmap"
  plan: chunking.ChunkPlan

  @property
  def reduce_at_end(self) -> bool:
    return self.estimator.per_example

  def zeros(self, params):
    return zeros_f32(params)

  def labels(self, chunk):
    return chunk[1]

  def __call__(self, params, chunk, mask, keys, axes=()):
    inputs, labels = chunk
    if not self.estimator.per_example:
      return self._batched(params, inputs, labels, mask, axes)
    if labels is None:
      labels = jnp.zeros(mask.shape, jnp.int32)
    chunk_sum = (layerwise.chunk_sum if self.path == "fast"
                 else per_example.chunk_sum)
    return chunk_sum(self.apply_fn, self.estimator, self.num_samples, params,
                     inputs, labels, keys, mask, None, self.plan)

  def _nll(self, p, inputs, labels, mask):
    logp = jax.nn.log_softmax(self.apply_fn(p, inputs).astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
    return jnp.where(mask, nll, 0.0)

  def _batched(self, params, inputs, labels, mask, axes):
    """``n_b * (grad of the batch's mean NLL)^2``: a batch weighted by size."""
    count = jnp.sum(mask.astype(jnp.float32))
    if axes:  # the batch's rows on several devices: reduce, then square
      g = jax.grad(lambda p: jnp.sum(self._nll(p, inputs, labels, mask)))(
          params)
      return _mesh_mean_square(g, count, axes)
    g = jax.grad(lambda p: jnp.sum(self._nll(p, inputs, labels, mask))
                 / count)(params)
    return _square_weighted(count, g)


@dataclasses.dataclass(frozen=True)
class LossSums:
  """``empirical_fisher``: squared per-example gradients of any loss.

  ``"empirical"``: ``sum_i g_i^2``; ``"batched"``: ``n_b * (mean
  gradient)^2``. Chunks are any pytree of arrays with a leading axis.
  """
  loss_fn: Callable
  estimator: estimators.Estimator

  @property
  def reduce_at_end(self) -> bool:
    return self.estimator.per_example

  def zeros(self, params):
    return zeros_f32(params)

  def labels(self, chunk):
    del chunk
    return None

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
class MASSums:
  """MAS: ``sum_i |d ||f(x_i)||^2 / d theta|`` over a chunk of inputs."""
  apply_fn: Callable

  reduce_at_end = True

  def zeros(self, params):
    return zeros_f32(params)

  def labels(self, chunk):
    del chunk
    return None

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


def is_chunk_fn(x: Any) -> bool:
  return isinstance(x, (FisherSums, LossSums, MASSums)) or hasattr(
      x, "reduce_at_end")
