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

With ``sharding=`` (data parallelism over a mesh), the data are stacked as
chunks ``[num_chunks, chunk, ...]`` whose rows are split over the mesh, and
one program runs a ``shard_map``: each device loops over ITS rows of every
chunk with the single-device code (its own sub-chunks and groups), and the
sums meet in one ``psum`` at the end (``"batched"``: one per chunk, since a
batch's mean gradient needs all its rows). Each example keeps the key it has
without a mesh, so the sharded pass equals the unsharded one to float32
rounding.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

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
                    inputs, labels, keys, mask):
  """``sum_i sum_k w_ik g_ik^2`` over one chunk, by the chosen path."""
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
                           params, xs, ys, jax.random.split(k, plan.chunk),
                           mask)

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
                           params, inputs, labels,
                           jax.random.split(key, plan.chunk), mask)
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


def _over_mesh(chunk_fn, sharding, size, params, tree, key, first, count,
               reduce):
  """``sum_i chunk_fn(params, chunk_i, mask_i, keys_i)``, each device: its rows.

  Args:
    chunk_fn: one device's share of a chunk -> float32 sums like ``params``.
    sharding: the data ``NamedSharding`` (see ``chunking.data_axes``).
    size: rows per device per chunk.
    params: replicated inside (FSDP parameters are gathered once).
    tree: stacked chunks ``[m, size * shards, ...]`` split as
      ``chunking.chunks_spec``.
    key, first: chunk ``i`` uses ``fold_in(key, first + i)``, split over
      its rows as without a mesh.
    count: rows (from the first) that are real; the rest is padding.
    reduce: ``psum`` the sums over the data axes at the end.
  """
  axes = chunking.data_axes(sharding)
  total = size * chunking.num_shards(sharding)

  def local(params, tree, key, first, count):
    d = jax.lax.axis_index(axes) if axes else 0
    rows = d * size + jnp.arange(size)

    def body(i, acc):
      chunk = jax.tree.map(lambda a: a[i], tree)
      keys = jax.random.split(jax.random.fold_in(key, first + i), total)
      keys = jax.lax.dynamic_slice_in_dim(keys, d * size, size)
      part = chunk_fn(params, chunk, i * total + rows < count, keys)
      return jax.tree.map(jnp.add, acc, part)

    m = jax.tree.leaves(tree)[0].shape[0]
    sums = jax.lax.fori_loop(0, m, body, zeros_f32(params))
    return jax.lax.psum(sums, axes) if reduce and axes else sums

  replicated = PartitionSpec()
  return jax.shard_map(
      local, mesh=sharding.mesh,
      in_specs=(replicated, chunking.chunks_spec(sharding), replicated,
                replicated, replicated),
      out_specs=replicated, check_vma=False)(params, tree, key, first, count)


def _stacked(tree, rows, size, sharding):
  """Raw arrays stacked in the program (``rows`` given) or already stacked."""
  if rows is None:
    return tree
  target = NamedSharding(sharding.mesh, chunking.chunks_spec(sharding))
  return jax.lax.with_sharding_constraint(
      jax.tree.map(lambda x: chunking.stack(x, rows, size), tree), target)


def _batched_over_mesh(grad_of_sum, axes):
  """``n_b * (mean gradient)^2`` of a chunk whose rows are split over axes."""
  def chunk_fn(params, chunk, mask, _):
    g = jax.tree.map(lambda t: t.astype(jnp.float32),
                     grad_of_sum(params, chunk, mask))
    count = jnp.sum(mask.astype(jnp.float32))
    if axes:
      g, count = jax.lax.psum((g, count), axes)
    return jax.tree.map(lambda t: count * jnp.square(t / count), g)
  return chunk_fn


def _finish(acc, sums, labels, count, divide):
  """The sums (added to ``acc``, or divided by ``count``) and their summary."""
  out = sums if acc is None else jax.tree.map(jnp.add, acc, sums)
  if divide:
    out = jax.tree.map(lambda t: t / count, out)
  flags = [f.astype(jnp.int32) for f in jax.tree.leaves(finite_flags(out))]
  low = high = jnp.zeros([], jnp.int32)
  if labels is not None:  # stacked: row-major order is the data's order
    real = jnp.arange(labels.size).reshape(labels.shape) < count
    info = jnp.iinfo(labels.dtype)
    low = jnp.min(jnp.where(real, labels, info.max)).astype(jnp.int32)
    high = jnp.max(jnp.where(real, labels, info.min)).astype(jnp.int32)
  return out, jnp.stack(flags + [low, high])


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7),
                   donate_argnums=(9,))
def sharded_fisher_program(apply_fn, estimator, num_samples, path, plan,
                           sharding, rows, divide, params, acc, inputs,
                           labels, key, first, count):
  """Stacked chunks split over a mesh, as one program (see module doc).

  Args:
    plan: ONE device's plan (``plan.chunk`` rows per device per chunk).
    rows: ``None`` when ``inputs``/``labels`` are stacked chunks already;
      else they are raw ``[N, ...]`` arrays, stacked here from their first
      ``rows`` rows.
    divide: return the sums divided by ``count`` (arrays), else the sums
      added to ``acc`` (a stream's running sum; ``None``: zeros).

  Returns:
    ``(fisher or sums, summary)``, ``summary`` as :func:`summary`.
  """
  axes = chunking.data_axes(sharding)
  size = plan.chunk
  inputs, labels = _stacked((inputs, labels), rows,
                            size * chunking.num_shards(sharding), sharding)
  if estimator == "batched":
    def grad_of_sum(p, chunk, mask):
      xs, ys = chunk

      def nll_sum(p):
        logp = jax.nn.log_softmax(apply_fn(p, xs).astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, ys[:, None], axis=1)[:, 0]
        return jnp.sum(jnp.where(mask, nll, 0.0))
      return jax.grad(nll_sum)(p)
    chunk_fn = _batched_over_mesh(grad_of_sum, axes)
  else:
    def chunk_fn(p, chunk, mask, keys):
      xs, ys = chunk
      return per_example_sum(apply_fn, estimator, num_samples, path, plan, p,
                             xs, ys, keys, mask)
  sums = _over_mesh(chunk_fn, sharding, size, params, (inputs, labels), key,
                    first, count, reduce=estimator != "batched")
  return _finish(acc, sums, labels, count, divide)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5),
                   donate_argnums=(7,))
def sharded_loss_program(loss_fn, estimator, size, sharding, rows, divide,
                         params, acc, data, count):
  """``empirical_fisher``'s pass over a mesh: as :func:`sharded_fisher_program`.

  Returns:
    ``(fisher or sums, summary)`` as :func:`sharded_fisher_program`.
  """
  axes = chunking.data_axes(sharding)
  data = _stacked(data, rows, size * chunking.num_shards(sharding), sharding)
  if estimator == "batched":
    def grad_of_sum(p, chunk, mask):
      losses = jax.vmap(loss_fn, in_axes=(None, 0))
      return jax.grad(lambda p: jnp.sum(jnp.where(
          mask, losses(p, chunk).astype(jnp.float32), 0.0)))(p)
    chunk_fn = _batched_over_mesh(grad_of_sum, axes)
  else:
    def chunk_fn(p, chunk, mask, _):
      return loss_sum(loss_fn, estimator, p, chunk, mask)
  sums = _over_mesh(chunk_fn, sharding, size, params, data,
                    jax.random.key(0), 0, count,
                    reduce=estimator != "batched")
  return _finish(acc, sums, None, count, divide)
