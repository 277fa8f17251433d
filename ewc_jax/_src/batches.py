"""Fixed-size, masked chunks of a dataset, for jitted per-example passes."""

from typing import Any, Iterator

import jax
import numpy as np


def is_batch(data: Any) -> bool:
  """A batch is a tuple, dict or array whose leaves are all arrays."""
  if isinstance(data, list) or not isinstance(data, (tuple, dict)) and (
      not hasattr(data, "shape")):
    return False
  leaves = jax.tree.leaves(data)
  return bool(leaves) and all(hasattr(x, "shape") for x in leaves)


def batches(data: Any, name: str) -> Iterator[Any]:
  """Yields the batches of ``data``: an array pytree, or an iterable of them."""
  if is_batch(data):
    yield data
    return
  try:
    it = iter(data)
  except TypeError:
    raise ValueError(
        f"{name} must be an array (pytree) with a leading example axis or an "
        f"iterable of such batches; got {type(data).__name__}.") from None
  for batch in it:
    if not is_batch(batch):
      raise ValueError(
          f"each batch of {name} must be an array (or a tuple/dict of arrays) "
          f"with a leading example axis; got {type(batch).__name__}.")
    yield batch


def leading_size(batch: Any, name: str) -> int:
  """The common leading (example) axis of every array in ``batch``."""
  sizes = {np.shape(x)[0] if np.ndim(x) else None
           for x in jax.tree.leaves(batch)}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        f"every array in a batch of {name} needs the same leading (example) "
        f"axis; got leading sizes {sorted(s for s in sizes if s is not None)}"
        f"{' and a scalar' if None in sizes else ''}.")
  return sizes.pop()


def _pad(x, size):
  n = x.shape[0]
  if n == size:
    return x
  pad = [(0, size - n)] + [(0, 0)] * (x.ndim - 1)
  return (jax.numpy.pad if isinstance(x, jax.Array) else np.pad)(x, pad)


def chunks(data: Any, batch_size: int,
           name: str) -> Iterator[tuple[Any, np.ndarray]]:
  """Yields ``(chunk, mask)``, each chunk padded to ``batch_size`` examples.

  One shape for every chunk keeps a jitted step compiled once; ``mask`` is 1
  for real examples and 0 for padding.
  """
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or (
      batch_size < 1):
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  for batch in batches(data, name):
    n = leading_size(batch, name)
    for start in range(0, n, batch_size):
      take = min(batch_size, n - start)
      chunk = jax.tree.map(
          lambda x, s=start, t=take: _pad(x[s:s + t], batch_size), batch)
      mask = np.zeros([batch_size], np.float32)
      mask[:take] = 1.0
      yield chunk, mask
