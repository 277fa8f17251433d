"""The empirical diagonal Fisher of any model with a per-example loss."""

import itertools
from typing import Any, Callable, Optional

import jax
import numpy as np

from ewc_jax._src import chunk_sums
from ewc_jax._src import chunking
from ewc_jax._src import estimators
from ewc_jax._src import outputs
from ewc_jax._src import pass_driver
from ewc_jax._src import tree as tree_lib
from ewc_jax._src import validate
from ewc_jax._src.estimators import EstimatorName

# The estimators of any per-example loss (no categorical logits to sample).
LOSS_ESTIMATORS = tuple(n for n, e in estimators.TABLE.items()
                        if e.needs_labels)
LOSS_CHUNK = 64  # on CPU, and the default mini-batch of "batched"


def empirical_fisher(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    data: Any,
    *,
    estimator: EstimatorName = "empirical",
    batch_size: Optional[int] = None,
    num_examples: Optional[int] = None,
    sharding: Optional[jax.sharding.NamedSharding] = None,
) -> Any:
  r"""The empirical diagonal Fisher of any model with a per-example loss.

  .. math::
    F = \frac{1}{N} \sum_n \left(\frac{\partial \ell(\theta; z_n)}
        {\partial \theta}\right)^2

  where ``loss_fn(params, example)`` is the negative log-likelihood of ONE
  example ``z_n`` (a regression loss, a sequence's mean token loss, ...).
  Per-example gradients come from ``jax.vmap(jax.grad(loss_fn))`` in chunks
  of ``batch_size``; only one chunk's gradients exist at a time. Arrays run
  as one compiled program over all chunks, as in :func:`fisher_diagonal`.

  Example:
    >>> import jax.numpy as jnp, ewc_jax
    >>> loss = lambda p, z: 0.5 * jnp.sum((z[0] * p['w'] - z[1]) ** 2)
    >>> data = (jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0]))
    >>> f = ewc_jax.empirical_fisher(loss, {'w': jnp.array(1.0)}, data)
    >>> float(f['w'])  # mean of (x^2 w)^2 = (1 + 16) / 2
    8.5

  With ``estimator="batched"`` it returns instead the square of each
  mini-batch's MEAN gradient averaged over batches of ``batch_size``
  weighted by their sizes (what
  the PyTorch snippet and Avalanche compute; about ``F / batch_size``, not a
  Fisher), for comparison.

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar`` for one example, where
      ``example`` is one slice (no leading axis) of ``data``'s arrays.
    params: the parameter pytree.
    data: a pytree of arrays with a leading example axis (e.g. a tuple
      ``(inputs, targets)``), or an iterable of such batches.
    estimator: ``"empirical"`` (per-example) or ``"batched"``.
    batch_size: examples per chunk (the mini-batch of ``"batched"``);
      ``None``: 64 on CPU and for ``"batched"``, larger chunks on a GPU/TPU.
    num_examples: use at most this many examples.
    sharding: a ``NamedSharding`` splitting the example axis (data
      parallelism, one program over arrays), as in :func:`fisher_diagonal`.

  Returns:
    A float32 pytree shaped like ``params``.
  """
  est = estimators.get(estimator, LOSS_ESTIMATORS)
  tree_lib.check_floating("params", params)
  validate.positive_int_or_none("num_examples", num_examples)
  per = 8 * tree_lib.num_params(params)
  shards = pass_driver.num_shards(sharding)
  fn = chunk_sums.LossSums(loss_fn, est)
  key = jax.random.key(0)  # unused: the data hold the labels
  if chunking.is_batch(data):
    n = chunking.leading_size(data, "data")
    n = n if num_examples is None else min(n, num_examples)
    if n == 0:
      raise ValueError(
          "data holds no examples: the Fisher needs at least one.")
    size = _loss_chunk(batch_size, est, n, per, shards)
    fisher, summary = pass_driver.run_arrays(fn, params, data, key, size, n,
                                             sharding)
    if not tree_lib.is_concrete(summary):
      return fisher
    finite = list(np.asarray(jax.device_get(summary))[:-2])
    return outputs.finish(fisher, finite, params, data)
  batches = chunking.batches(data, "data")
  first = next(batches, None)
  if first is None:
    raise ValueError("data holds no examples: the Fisher needs at least one.")
  size = _loss_chunk(batch_size, est, chunking.leading_size(first, "data"),
                     per, shards)
  chunks = chunking.chunks(itertools.chain([first], batches), size * shards,
                           num_examples, "data")
  acc, count, _ = pass_driver.run_stream(fn, params, chunks, key, size,
                                         sharding)
  if count == 0:
    raise ValueError("data holds no examples: the Fisher needs at least one.")
  fisher = jax.tree.map(lambda a: a / count, acc)
  return outputs.finish(fisher, pass_driver.finite_flags(fisher), params, None)


def _loss_chunk(batch_size, est, n, example_bytes, shards):
  """Examples per chunk (per device when ``shards > 1``)."""
  if batch_size is None and not est.per_example:
    batch_size = LOSS_CHUNK
  plan = chunking.plan_chunks(batch_size, n, example_bytes=example_bytes,
                              shards=shards)
  if batch_size is None and jax.default_backend() == "cpu":
    return min(LOSS_CHUNK, plan.chunk)
  return plan.chunk
