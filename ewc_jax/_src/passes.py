"""The compiled Fisher passes: one program over arrays, one step per chunk.

For arrays, the whole pass (every chunk, its padding mask, the per-chunk
keys, the accumulation and the checks) is one jitted ``fori_loop`` over
chunks: the data stay on the device and nothing returns to the host until
the end. A stream (an iterable of batches) runs one compiled step per chunk
of one shape. Both produce the same sums chunk by chunk, in the same order,
with the same keys (``fold_in(rng, chunk_index)``), so they agree to float32
rounding.

The array program returns, beside the Fisher, one small int32 vector for the
checks made after it (one transfer): whether each leaf is finite, then the
range of the labels used.
"""

import functools

import jax
import jax.numpy as jnp

from ewc_jax._src import chunking
from ewc_jax._src import fast
from ewc_jax._src import likelihood


def zeros_f32(params):
  """Float32 zeros with each parameter's sharding (and shape)."""
  return jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)


def finite_flags(tree):
  """One boolean per leaf: all of its values are finite."""
  return jax.tree.map(lambda t: jnp.all(jnp.isfinite(t)), tree)


def summary(fisher, labels, n):
  """``[finite(leaf) for leaf] + [min(labels), max(labels)]`` as int32."""
  flags = [f.astype(jnp.int32) for f in jax.tree.leaves(finite_flags(fisher))]
  if labels is None:
    low = high = jnp.zeros([], jnp.int32)
  else:
    low, high = jnp.min(labels[:n]), jnp.max(labels[:n])
  return jnp.stack(flags + [low.astype(jnp.int32), high.astype(jnp.int32)])


def _loop(chunk_fn, tree, key, n, size, zeros):
  """``sum_i chunk_fn(chunk_i, mask_i, fold_in(key, i))`` over all chunks."""
  def add(i, acc, chunk, mask):
    part = chunk_fn(chunk, mask, jax.random.fold_in(key, i))
    return jax.tree.map(jnp.add, acc, part)

  def full(i, acc):  # a slice of real rows: cheaper than a gather on CPU
    chunk = jax.tree.map(
        lambda x: jax.lax.dynamic_slice_in_dim(x, i * size, size), tree)
    return add(i, acc, chunk, jnp.ones([size], bool))

  acc = jax.lax.fori_loop(0, n // size, full, zeros) if n >= size else zeros
  if n % size:  # the last, partial chunk: padded with row 0, masked
    last = n // size
    acc = add(last, acc, *chunking.chunk_at(tree, last, size, n))
  return acc


def per_example_sum(apply_fn, estimator, num_samples, path, plan, params,
                    inputs, labels, key, mask):
  """``sum_i sum_k w_ik g_ik^2`` over one chunk, by the chosen path."""
  keys = jax.random.split(key, mask.shape[0])
  if labels is None:
    labels = jnp.zeros(mask.shape, jnp.int32)
  chunk_sum = fast.chunk_sum if path == "fast" else likelihood.vmap_chunk_sum
  return chunk_sum(apply_fn, estimator, num_samples, params, inputs, labels,
                   keys, mask, plan)


def batched_sum(apply_fn, params, inputs, labels, mask):
  """``n_b * (grad of the batch's mean NLL)^2``: a batch weighted by size."""
  count = jnp.sum(mask.astype(jnp.float32))

  def mean_nll(p):
    logp = jax.nn.log_softmax(apply_fn(p, inputs).astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
    return jnp.sum(jnp.where(mask, nll, 0.0)) / count

  return jax.tree.map(lambda g: count * jnp.square(g.astype(jnp.float32)),
                      jax.grad(mean_nll)(params))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def fisher_program(apply_fn, estimator, num_samples, path, plan, n, params,
                   inputs, labels, key):
  """The whole pass over the first ``n`` rows of arrays, as one program.

  Returns:
    ``(fisher, summary)``: the sums divided by ``n``, and :func:`summary`.
  """
  def chunk_fn(chunk, mask, k):
    xs, ys = chunk
    if estimator == "batched":
      return batched_sum(apply_fn, params, xs, ys, mask)
    return per_example_sum(apply_fn, estimator, num_samples, path, plan,
                           params, xs, ys, k, mask)

  sums = _loop(chunk_fn, (inputs, labels), key, n, plan.chunk,
               zeros_f32(params))
  fisher = jax.tree.map(lambda s: s / n, sums)
  return fisher, summary(fisher, labels, n)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4),
                   donate_argnums=(5,))
def fisher_step(apply_fn, estimator, num_samples, path, plan, acc, params,
                inputs, labels, key, mask):
  """One chunk of a stream added to ``acc``."""
  if estimator == "batched":
    part = batched_sum(apply_fn, params, inputs, labels, mask)
  else:
    part = per_example_sum(apply_fn, estimator, num_samples, path, plan,
                           params, inputs, labels, key, mask)
  return jax.tree.map(jnp.add, acc, part)


def loss_sum(loss_fn, estimator, params, chunk, mask):
  """Empirical: ``sum_i g_i^2``; batched: ``n_b * (mean gradient)^2``."""
  if estimator == "empirical":
    grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, chunk)
    return jax.tree.map(
        lambda g: jnp.sum(jnp.where(
            mask.reshape((-1,) + (1,) * (g.ndim - 1)),
            jnp.square(g.astype(jnp.float32)), 0.0), axis=0), grads)
  count = jnp.sum(mask.astype(jnp.float32))

  def mean_loss(p):
    losses = jax.vmap(loss_fn, in_axes=(None, 0))(p, chunk)
    return jnp.sum(jnp.where(mask, losses.astype(jnp.float32), 0.0)) / count

  return jax.tree.map(lambda g: count * jnp.square(g.astype(jnp.float32)),
                      jax.grad(mean_loss)(params))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def loss_program(loss_fn, estimator, size, n, params, data):
  """``empirical_fisher``'s pass over arrays as one program."""
  sums = _loop(lambda c, m, _: loss_sum(loss_fn, estimator, params, c, m),
               data, jax.random.key(0), n, size, zeros_f32(params))
  fisher = jax.tree.map(lambda s: s / n, sums)
  return fisher, summary(fisher, None, n)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def loss_step(loss_fn, estimator, acc, params, chunk, mask):
  """One chunk of a stream added to ``acc``."""
  return jax.tree.map(jnp.add, acc,
                      loss_sum(loss_fn, estimator, params, chunk, mask))
