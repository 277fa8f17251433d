"""Drivers of a pass over data: arrays, a stream, a mesh; one static job.

Every pass (the diagonal Fisher, ``empirical_fisher``, KFAC's factors, MAS)
is a per-chunk function (``chunk_sums.py``) run by one of three drivers,
each a compiled program whose single static argument is a :class:`Job`:

* :func:`over_arrays`: the whole pass over arrays as ONE program: a
  ``fori_loop`` over chunks on the device (the last one padded with row 0, a
  real example, and masked), with no host round trip per chunk;
* :func:`add_chunk`: one chunk of a stream, added to a running sum (donated);
* :func:`over_mesh`: stacked chunks ``[num_chunks, chunk, ...]`` whose rows
  are split over a mesh (data parallelism) with replicated parameters; each
  device loops over ITS rows of every chunk with the single-device code,
  and the sums meet in one ``psum`` at the end (or per chunk, for functions
  that need all of a chunk's rows, such as a batch's mean gradient);
* :func:`over_global`: the same stacked chunks with parameters sharded
  over the mesh (FSDP, tensor parallelism: a model too large for one
  device), as one program in the global view: XLA's partitioner splits each
  chunk's rows over the data axes and every parameter, and the sums, as the
  parameters are split, so that no device holds all of either.

Row ``r`` of the data (its global index: in the arrays, or counted through
a stream) draws from ``fold_in(key, r)``, so that every example keeps its
key whatever the chunk size, the number of devices or the stream's
batching. The programs return, beside the sums, one small int32 vector for
the checks made after them (one transfer): whether each leaf is finite,
then the range of the labels used (at the positions that count).
"""

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from ewc_jax._src import chunking
from ewc_jax._src import tree as tree_lib


@dataclasses.dataclass(frozen=True)
class Job:
  """Everything static about one pass (hashable).

  Attributes:
    fn: the per-chunk function (see ``chunk_sums.py``).
    size: rows per chunk (per device with ``sharding``).
    n: real rows in the data (arrays), ``None`` for a stream's step.
    divide: divide the sums by ``fn.divisor`` (arrays), or return them for
      a running sum (a stream).
    sharding: the data's ``NamedSharding`` (rows split over the mesh), or
      ``None`` for one device.
    rows: with ``sharding``: ``None`` when the data arrive stacked, else the
      real rows of raw ``[N, ...]`` arrays, stacked in the program.
    param_shardings: with sharded parameters (:func:`over_global`), the
      shardings of the sums' leaves (the parameters'), else ``None``.
  """
  fn: Any
  size: int
  n: Optional[int] = None
  divide: bool = True
  sharding: Optional[NamedSharding] = None
  rows: Optional[int] = None
  param_shardings: Optional[tuple] = None


def finite_flags(tree):
  """One boolean per leaf: all of its values are finite."""
  return jax.tree.map(lambda t: jnp.all(jnp.isfinite(t)), tree)


def _summary(out, labels, real):
  """``[finite(leaf) for leaf] + [min(labels), max(labels)]`` as int32.

  ``real``: a boolean like ``labels`` marking the labels that count (real
  rows, and the positions a token mask keeps).
  """
  flags = [f.astype(jnp.int32) for f in jax.tree.leaves(finite_flags(out))]
  low = high = jnp.zeros([], jnp.int32)
  if labels is not None:
    info = jnp.iinfo(labels.dtype)
    low = jnp.min(jnp.where(real, labels, info.max)).astype(jnp.int32)
    high = jnp.max(jnp.where(real, labels, info.min)).astype(jnp.int32)
  return jnp.stack(flags + [low, high])


def row_keys(key, rows):
  """One key per row: ``fold_in(key, r)`` for each global row index."""
  return jax.vmap(lambda r: jax.random.fold_in(key, r))(rows)


def _required(value, what):
  if value is None:
    raise ValueError(f"this program needs the job's {what}.")
  return value


def _labels_and_real(fn, data, rows_real):
  """The labels to check and where they count (``None``: no labels)."""
  found = fn.labels(data)
  if found is None:
    return None, None
  labels, valid = found
  real = rows_real.reshape(rows_real.shape + (1,) * (labels.ndim -
                                                     rows_real.ndim))
  real = real & jnp.ones(labels.shape, bool)
  return labels, real if valid is None else real & valid


def _loop(chunk_fn, tree, key, n, size, zeros):
  """``sum_i chunk_fn(chunk_i, mask_i, keys_i)`` over ``n`` rows in chunks."""
  def add(i, acc, chunk, mask):
    part = chunk_fn(chunk, mask, row_keys(key, i * size + jnp.arange(size)))
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


@functools.partial(jax.jit, static_argnums=(0,))
def over_arrays(job: Job, params, data, key):
  """The pass over the first ``job.n`` rows of arrays, as one program.

  Returns:
    ``(sums / n, summary)``.
  """
  fn, n = job.fn, _required(job.n, "n")
  sums = _loop(lambda c, m, k: fn(params, c, m, k), data, key, n, job.size,
               fn.zeros(params))
  divisor = fn.divisor(data, n)
  out = jax.tree.map(lambda s: s / divisor, sums)
  first = jax.tree.leaves(data)[0]
  labels, real = _labels_and_real(fn, data, jnp.arange(first.shape[0]) < n)
  return out, _summary(out, labels, real)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def add_chunk(job: Job, acc, params, chunk, mask, key, first_row):
  """One chunk of a stream, its rows ``first_row + i``, added to ``acc``."""
  rows = first_row + jnp.arange(job.size)
  part = job.fn(params, chunk, mask, row_keys(key, rows))
  return jax.tree.map(jnp.add, acc, part)


def _stacked(tree, job):
  """Raw arrays stacked in the program (``job.rows`` given) or as they are."""
  if job.rows is None:
    return tree
  sharding = _required(job.sharding, "sharding")
  total = job.size * chunking.num_shards(sharding)
  target = NamedSharding(sharding.mesh, chunking.chunks_spec(sharding))
  return jax.lax.with_sharding_constraint(
      jax.tree.map(lambda x: chunking.stack(x, job.rows, total), tree),
      target)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def over_mesh(job: Job, params, acc, data, key, first_row, count, divisor):
  """Stacked chunks split over a mesh, as one program (see module doc).

  Args:
    job: ``job.size`` rows per device per chunk; ``job.divide``: return the
      sums divided by ``count`` (arrays), else added to ``acc`` (a stream's
      running sum; ``None``: zeros).
    params: replicated inside (FSDP parameters are gathered once).
    acc: the running sum, or ``None``.
    data: stacked chunks (or raw arrays, see :class:`Job`).
    key, first_row: the data's row ``j`` draws from ``fold_in(key,
      first_row + j)``, as without a mesh.
    count: rows (from the first) that are real; the rest is padding.
    divisor: what ``job.divide`` divides by (``fn.divisor`` of the data).

  Returns:
    ``(sums or their mean, summary)``.
  """
  fn, size = job.fn, job.size
  sharding = _required(job.sharding, "sharding")
  axes = chunking.data_axes(sharding)
  total = size * chunking.num_shards(sharding)
  data = _stacked(data, job)

  def local(params, tree, key, first_row, count):
    d = jax.lax.axis_index(axes) if axes else 0
    rows = d * size + jnp.arange(size)

    def body(i, acc):
      chunk = jax.tree.map(lambda a: a[i], tree)
      keys = row_keys(key, first_row + i * total + rows)
      part = fn(params, chunk, i * total + rows < count, keys, axes)
      return jax.tree.map(jnp.add, acc, part)

    m = jax.tree.leaves(tree)[0].shape[0]
    sums = jax.lax.fori_loop(0, m, body, fn.zeros(params))
    return jax.lax.psum(sums, axes) if fn.reduce_at_end and axes else sums

  replicated = PartitionSpec()
  sums = jax.shard_map(
      local, mesh=sharding.mesh,
      in_specs=(replicated, chunking.chunks_spec(sharding), replicated,
                replicated, replicated),
      out_specs=replicated, check_vma=False)(params, data, key, first_row,
                                             count)
  out = sums if acc is None else jax.tree.map(jnp.add, acc, sums)
  if job.divide:
    out = jax.tree.map(lambda t: t / divisor, out)
  m, rows = jax.tree.leaves(data)[0].shape[:2]  # stacked: the data's order
  labels, real = _labels_and_real(
      fn, jax.tree.map(lambda a: a.reshape((m * rows,) + a.shape[2:]), data),
      jnp.arange(m * rows) < count)
  return out, _summary(out, labels, real)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def over_global(job: Job, params, acc, data, key, first_row, count,
                divisor):
  """Stacked chunks, parameters sharded: the pass in the global view.

  Arguments as :func:`over_mesh`'s. Each chunk's rows are constrained to
  the data axes, the running sums to the parameters' shardings.
  """
  fn = job.fn
  sharding = _required(job.sharding, "sharding")
  total = job.size * chunking.num_shards(sharding)
  data = _stacked(data, job)
  rows_split = NamedSharding(sharding.mesh, PartitionSpec(
      chunking.data_axes(sharding) or None))
  treedef = jax.tree.structure(fn.zeros(params))

  def like_params(tree):
    return jax.tree.unflatten(treedef, [
        jax.lax.with_sharding_constraint(x, s) for x, s in zip(
            jax.tree.leaves(tree), job.param_shardings)])

  def body(i, acc):
    chunk = jax.lax.with_sharding_constraint(
        jax.tree.map(lambda a: a[i], data), rows_split)
    rows = i * total + jnp.arange(total)
    part = fn(params, chunk, rows < count, row_keys(key, first_row + rows))
    return like_params(jax.tree.map(jnp.add, acc, part))

  m = jax.tree.leaves(data)[0].shape[0]
  start = like_params(fn.zeros(params) if acc is None else acc)
  out = jax.lax.fori_loop(0, m, body, start)
  if job.divide:
    out = like_params(jax.tree.map(lambda t: t / divisor, out))
  rows = jax.tree.leaves(data)[0].shape[1]
  labels, real = _labels_and_real(
      fn, jax.tree.map(lambda a: a.reshape((m * rows,) + a.shape[2:]), data),
      jnp.arange(m * rows) < count)
  return out, _summary(out, labels, real)


# The host side: placing data, running a pass over arrays or a stream.


def _place(tree, rows, size, sharding):
  """``(tree, rows)`` for :func:`over_mesh`.

  Arrays already on the mesh (and tracers, inside ``jit``) go in raw and are
  stacked in the program (``rows``); others (NumPy, arrays on one device)
  are stacked on the host shard by shard (``None``: already stacked), so
  that no device receives more than its rows.
  """
  leaves = jax.tree.leaves(tree)
  if not all(map(tree_lib.is_concrete, leaves)) or all(
      chunking.on_mesh(x, sharding) for x in leaves):
    return tree, rows  # inside jit: stacked in the program, whatever they are
  return jax.tree.map(
      lambda x: chunking.stack_on_mesh(x, rows, size, sharding), tree), None


def _mesh_zeros(fn, params, sharding):
  """``fn``'s zeros, replicated on ``sharding``'s mesh.

  That is where a sharded program puts its output: a stream's running sum
  then keeps one placement, and its program compiles once.
  """
  zeros = jax.eval_shape(fn.zeros, params)
  return jax.device_put(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), zeros),
      NamedSharding(sharding.mesh, PartitionSpec()))


def num_shards(sharding) -> int:
  return 1 if sharding is None else chunking.num_shards(sharding)


def _param_shardings(fn, params):
  """The sums' shardings when the parameters are split over devices, else
  ``None`` (replicated parameters: :func:`over_mesh`)."""
  leaves = jax.tree.leaves(params)
  if not any(isinstance(p, jax.Array) and tree_lib.is_concrete(p)
             and not p.sharding.is_fully_replicated for p in leaves):
    return None
  sums = jax.eval_shape(fn.zeros, params)
  if jax.tree.structure(sums) != jax.tree.structure(params):
    return None  # sums not shaped like the parameters (KFAC's factors)
  return tuple(p.sharding for p in leaves)


def _program(job):
  return over_mesh if job.param_shardings is None else over_global


def run_arrays(fn, params, data, key, size: int, n: int, sharding=None):
  """The mean of ``fn``'s sums over the first ``n`` rows of ``data``.

  Args:
    fn: a per-chunk function (``chunk_sums.py``).
    params: the parameters (replicated or FSDP-sharded with ``sharding``).
    data: a pytree of arrays with a leading axis of at least ``n`` rows.
    key: the pass's PRNG key.
    size: rows per chunk (per device with ``sharding``).
    n: the rows to use.
    sharding: a ``NamedSharding`` splitting the rows, or ``None``.

  Returns:
    ``(mean, summary)``: the summary as :func:`over_arrays`'s (on device).
  """
  if sharding is None:
    return over_arrays(Job(fn, size, n), params, data, key)
  tree, rows = _place(data, n, size * num_shards(sharding), sharding)
  job = Job(fn, size, n, True, sharding, rows, _param_shardings(fn, params))
  return _program(job)(job, params, None, tree, key, 0, n,
                       fn.divisor(data, n))


def run_stream(fn, params, chunks, key, size: int, sharding=None,
               check=None):
  """``(sum over the chunks' real rows, their count, fn's weight)``.

  Args:
    fn: a per-chunk function.
    params: the parameters.
    chunks: an iterable of ``(chunk, mask)``, each chunk padded to
      ``size * shards`` rows, ``mask`` a boolean NumPy array.
    key: the stream's row ``r`` (counted over all chunks) draws from
      ``fold_in(key, r)``.
    size: rows per chunk (per device with ``sharding``).
    sharding: a ``NamedSharding`` splitting the rows, or ``None``.
    check: called as ``check(chunk, real)`` before each chunk runs.
  """
  total = size * num_shards(sharding)
  shardings = None if sharding is None else _param_shardings(fn, params)
  if sharding is None or shardings is not None:
    acc = fn.zeros(params)  # each leaf placed like its parameter
  else:
    acc = _mesh_zeros(fn, params, sharding)
  count, weight = 0, 0.0
  for chunk, mask in chunks:
    real = int(mask.sum())
    if check is not None:
      check(chunk, real)
    first_row = jnp.asarray(count, jnp.int32)
    if sharding is None:
      acc = add_chunk(Job(fn, size, divide=False), acc, params, chunk,
                      jnp.asarray(mask), key, first_row)
    else:
      tree, rows = _place(chunk, total, total, sharding)
      job = Job(fn, size, None, False, sharding, rows, shardings)
      acc, _ = _program(job)(job, params, acc, tree, key, first_row, real, 1)
    count += real
    weight += fn.host_weight(chunk, real)
  return acc, count, weight
