"""Data in chunks: batches, padding, stacking on a mesh, per-backend plans.

Every pass works through its data in chunks of one shape, so that its step
compiles once. Arrays are taken by the one-program pass (all chunks in one
``fori_loop`` on the device, see ``pass_driver.py``); iterables of batches
(streams) are cut into chunks here, one compiled step per chunk. Padding
repeats a real example (row 0 of the batch) and a mask removes it with
``jnp.where``: a model undefined at zero input (``x / ||x||``) then never
sees a zero row, and a non-finite value in a padded row cannot leak into the
sum.

How large a chunk is depends on the backend. XLA:CPU is fastest with chunks
of a few hundred examples cut into cache-sized sub-chunks (64 for the
layer-wise path, whose convolution gradients go one example at a time) and
groups of 8 per-example gradients summed by an unrolled loop. A GPU or TPU
is fastest with thousands of examples at once, so that the layer-wise path
is a few large matrix products
``(x^2)^T (delta^2)``; only memory bounds the chunk there.
"""

import dataclasses
import math
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from ewc_jax._src import tree as tree_lib
from ewc_jax._src import validate

CPU_CHUNK = 256  # tuned on a 2-core XLA:CPU (see BENCHMARKS.md)
CPU_SUB_CHUNK = 64
CPU_GROUP = 8
ACCEL_MAX_CHUNK = 8192
ACCEL_MIN_CHUNK = 16
MEMORY_BUDGET = 2**30  # bytes of per-chunk temporaries on an accelerator


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
  """How a Fisher pass cuts its data (static: part of the compiled step).

  Attributes:
    chunk: examples per chunk (one loop iteration, or one step of a stream).
    sub_chunk: the layer-wise path's examples per sub-chunk of a chunk.
    group: the vmap path's examples per group of per-example gradients.
    unroll: sum a group's squares by an unrolled loop (fuses on XLA:CPU)
      rather than by a reduction over the example axis.
    loop_examples: the layer-wise path forms the per-example gradients of
      its "material" layers (convolutions, weights used per token) one
      example at a time, all of its cotangents at once, rather than for all
      examples at once, one cotangent at a time. On XLA:CPU the latter makes
      a convolution's weight gradient a grouped convolution, about 4x
      slower (see BENCHMARKS.md); an accelerator wants the batched form.
  """
  chunk: int
  sub_chunk: int
  group: int
  unroll: bool
  loop_examples: bool = False


def divisor_at_most(n: int, most: int) -> int:
  """The largest divisor of ``n`` that is at most ``most``."""
  return max(g for g in range(1, min(most, n) + 1) if n % g == 0)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def plan_chunks(batch_size: Optional[int], num_examples: Optional[int], *,
                example_bytes: int, backend: Optional[str] = None,
                budget: int = MEMORY_BUDGET, shards: int = 1) -> ChunkPlan:
  """The chunking of a pass for ``backend`` (default: JAX's default backend).

  Args:
    batch_size: the caller's chunk size, or ``None`` for automatic.
    num_examples: examples in the data when known (arrays), else ``None``.
    example_bytes: estimated temporaries per example of the chosen path.
    backend: ``"cpu"``, ``"gpu"``, ``"tpu"``; ``None`` asks JAX.
    budget: bytes of temporaries one chunk may use on an accelerator.
    shards: devices that split each chunk's examples (``sharding=``); the
      plan is then one device's share, ``batch_size / shards`` examples.

  Returns:
    A :class:`ChunkPlan` (per device when ``shards > 1``). An automatic chunk
    never exceeds the data (rounded up to a multiple of 8), and on an
    accelerator the chunks are balanced so that the last one is nearly full.
  """
  backend = backend or jax.default_backend()
  cpu = backend == "cpu"
  if batch_size is not None:
    batch_size = validate.positive_int("batch_size", batch_size)
    if batch_size % shards:
      raise ValueError(
          f"batch_size ({batch_size}) must be divisible by the number of "
          f"devices that sharding splits the examples over ({shards}).")
    batch_size //= shards
  if num_examples is not None:
    num_examples = -(-num_examples // shards)
  if batch_size is not None:
    chunk = batch_size
  elif cpu:
    chunk = CPU_CHUNK
  else:
    most = max(ACCEL_MIN_CHUNK, min(ACCEL_MAX_CHUNK,
                                    budget // max(example_bytes, 1)))
    chunk = 2 ** int(math.log2(most))
    if num_examples is not None:  # balanced chunks: little padding
      pieces = -(-num_examples // chunk)
      chunk = round_up(-(-num_examples // pieces), 8)
  if batch_size is None and num_examples is not None:
    chunk = min(chunk, round_up(num_examples, 8))
  if cpu:
    return ChunkPlan(chunk, divisor_at_most(chunk, CPU_SUB_CHUNK),
                     divisor_at_most(chunk, CPU_GROUP), True, True)
  return ChunkPlan(chunk, chunk, chunk, False)


def is_batch(data: Any) -> bool:
  """A batch is a tuple, dict or array whose leaves are all arrays."""
  if isinstance(data, (list, Iterator)) or not isinstance(
      data, (tuple, dict)) and not hasattr(data, "shape"):
    return False
  leaves = jax.tree.leaves(data)
  return bool(leaves) and all(hasattr(x, "shape") for x in leaves)


def batches(data: Any, name: str) -> Iterator[Any]:
  """Yields the batches of `data`: one array pytree, or an iterable of them."""
  if is_batch(data):
    yield data
    return
  try:
    it = iter(data)
  except TypeError:
    raise ValueError(
        f"{name} must be a tuple of arrays or an iterable of such batches; "
        f"got {type(data).__name__}.") from None
  for batch in it:
    if not is_batch(batch):
      raise ValueError(
          f"each batch of {name} must be a tuple (or dict) of arrays with a "
          f"leading example axis; got {type(batch).__name__}.")
    yield batch


def leading_size(batch: Any, name: str) -> int:
  """The common leading (example) axis of every array in ``batch``."""
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None
           for x in jax.tree.leaves(batch)}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        f"every array in a batch of {name} needs the same leading (example) "
        f"axis; got leading sizes {sorted(s for s in sizes if s is not None)}"
        f"{' and a scalar' if None in sizes else ''}.")
  return next(s for s in sizes if s is not None)


def pad_rows(x, size: int):
  """``x`` padded to ``size`` rows by repeating its row 0 (a real example)."""
  n = x.shape[0]
  if n == size:
    return x
  lib = jnp if isinstance(x, jax.Array) else np
  return lib.concatenate([x, lib.repeat(x[:1], size - n, axis=0)])


def _concat(parts):
  """Row-wise concatenation of same-structured array pytrees."""
  if len(parts) == 1:
    return parts[0]
  return jax.tree.map(
      lambda *xs: (jnp if isinstance(xs[0], jax.Array) else np).concatenate(
          xs), *parts)


def chunks(data: Any, batch_size: int, num_examples: Optional[int],
           name: str) -> Iterator[tuple[Any, np.ndarray]]:
  """Yields ``(chunk, mask)``, each chunk padded to ``batch_size`` examples.

  Rows are taken in order across the batches of ``data``: a chunk may join
  the end of one batch to the start of the next, so that only the last
  chunk is ever short, wherever the stream splits its batches (a
  ``"batched"`` estimate then does not depend on it). ``mask`` is a boolean
  NumPy array: True for real examples.
  """
  batch_size = validate.positive_int("batch_size", batch_size)
  remaining = num_examples
  pending: list = []  # [batch, start, stop]: rows waiting for a chunk
  held = 0

  def emit(take):
    nonlocal held
    parts, need = [], take
    while need:
      batch, start, stop = pending[0]
      k = min(need, stop - start)
      parts.append(jax.tree.map(lambda x, s=start, k=k: x[s:s + k], batch))
      need -= k
      if start + k == stop:
        pending.pop(0)
      else:
        pending[0][1] = start + k
    held -= take
    chunk = jax.tree.map(lambda x: pad_rows(x, batch_size), _concat(parts))
    return chunk, np.arange(batch_size) < take

  for batch in batches(data, name):
    if remaining is not None and remaining <= 0:
      break
    n = leading_size(batch, name)
    if remaining is not None:
      n = min(n, remaining)
      remaining -= n
    if n == 0:
      continue
    pending.append([batch, 0, n])
    held += n
    while held >= batch_size:
      yield emit(batch_size)
  if held:
    yield emit(held)


def chunk_at(tree: Any, i, size: int, n: int) -> tuple[Any, jax.Array]:
  """Chunk ``i`` of the first ``n`` rows of ``tree``, inside a jitted loop.

  Rows past ``n`` are replaced by row 0 (a real example) and masked out.

  Returns:
    ``(chunk, mask)``, ``mask`` a boolean ``[size]``.
  """
  idx = i * size + jnp.arange(size)
  mask = idx < n
  idx = jnp.where(mask, idx, 0)
  return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree), mask


def data_axes(sharding: Any) -> tuple:
  """The mesh axes over which ``sharding`` splits the example axis.

  Raises:
    ValueError: ``sharding`` is not a ``NamedSharding`` that splits only the
      leading (example) axis.
  """
  if not isinstance(sharding, NamedSharding):
    raise ValueError(
        "sharding must be a jax.sharding.NamedSharding that splits the "
        "example axis, e.g. NamedSharding(mesh, PartitionSpec('data')); got "
        f"{type(sharding).__name__}.")
  spec = tuple(sharding.spec)
  if any(s is not None for s in spec[1:]):
    raise ValueError(
        "sharding must split only the leading (example) axis, e.g. "
        f"PartitionSpec('data'); got {sharding.spec}.")
  first = spec[0] if spec else None
  if first is None:
    return ()
  return tuple(first) if isinstance(first, (tuple, list)) else (first,)


def num_shards(sharding: Any) -> int:
  """How many parts ``sharding`` cuts the example axis into."""
  return math.prod(sharding.mesh.shape[a] for a in data_axes(sharding))


def chunks_spec(sharding: Any) -> PartitionSpec:
  """The spec of stacked chunks ``[num_chunks, chunk, ...]``: rows split."""
  axes = data_axes(sharding)
  return PartitionSpec(None, axes if axes else None)


def on_mesh(x: Any, sharding: Any) -> bool:
  """``x`` is a tracer, or a JAX array placed on ``sharding``'s devices.

  Such arrays go into a sharded program as they are (XLA moves their rows);
  others (NumPy, arrays on one device) are better stacked by
  :func:`stack_on_mesh`: a program would copy them whole to every device.
  """
  if not isinstance(x, jax.Array):
    return False
  if not tree_lib.is_concrete(x):
    return True
  return (getattr(x, "committed", True)
          and x.sharding.device_set == sharding.device_set)


def stack(x, rows: int, size: int):
  """Rows ``[0, rows)`` of ``x`` as ``[ceil(rows / size), size, ...]``.

  Rows past ``rows`` (the last chunk's padding) repeat row 0, a real example.
  Works on NumPy and JAX arrays, inside ``jit`` too.
  """
  m = -(-rows // size)
  lib = jnp if isinstance(x, jax.Array) else np
  if x.shape[0] >= m * size:
    return lib.reshape(x[:m * size], (m, size) + x.shape[1:])
  idx = np.arange(m * size)
  idx = np.where(idx < rows, idx, 0)
  return lib.reshape(lib.take(x, idx, axis=0), (m, size) + x.shape[1:])


def stack_on_mesh(x, rows: int, size: int, sharding: Any) -> jax.Array:
  """:func:`stack` built shard by shard on the host, placed on the mesh.

  For data that are not on the mesh yet (NumPy arrays, arrays on other
  devices): each device receives only its rows, every process of a
  multi-host run builds only its own devices' shards, and no padded copy of
  the whole data is made.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    raise ValueError(
        "data arrays span devices of other processes but not the sharding's "
        "mesh: put them on that mesh (jax.device_put) or pass NumPy arrays.")
  host = np.asarray(x)
  m = -(-rows // size)
  flat = np.arange(m * size)
  idx = np.where(flat < rows, flat, 0).reshape(m, size)
  target = NamedSharding(sharding.mesh, chunks_spec(sharding))

  def shard(index):
    return host[idx[index[0], index[1]]][(slice(None), slice(None))
                                         + tuple(index[2:])]

  return jax.make_array_from_callback((m, size) + host.shape[1:], target,
                                      shard)
