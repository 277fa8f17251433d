"""Diagonal Fisher information from per-example gradients."""

import itertools
from typing import Any, Callable, Iterable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax._src import chunk_sums
from ewc_jax._src import chunking
from ewc_jax._src import estimators
from ewc_jax._src import layerwise
from ewc_jax._src import outputs
from ewc_jax._src import pass_driver
from ewc_jax._src import tree as tree_lib
from ewc_jax._src import validate
from ewc_jax._src.estimators import EstimatorName
from ewc_jax._src.jaxpr import diagonal

ESTIMATORS = estimators.NAMES
# The estimators of any per-example loss (no categorical logits to sample).
LOSS_ESTIMATORS = tuple(n for n, e in estimators.TABLE.items()
                        if e.needs_labels)
PATHS = ("auto", "fast", "vmap")

Batch = tuple[Any, Any]
Data = Union[Batch, Iterable[Batch]]


def fisher_diagonal(
    apply_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    data: Data,
    *,
    estimator: EstimatorName = "exact",
    rng: Optional[jax.Array] = None,
    num_samples: int = 1,
    batch_size: Optional[int] = None,
    num_examples: Optional[int] = None,
    path: str = "auto",
    sharding: Optional[jax.sharding.NamedSharding] = None,
) -> Any:
  r"""The diagonal Fisher information of a categorical classifier.

  .. math::
    F = \frac{1}{N} \sum_{n=1}^N \sum_y p(y|x_n)
        \left(\frac{\partial \log p(y|x_n; \theta)}{\partial \theta}\right)^2

  averaged over the ``N`` examples used. The estimators differ in which
  labels ``y`` enter the sum:

  * ``"exact"``: every class, weighted by the model's ``p(y|x)``.
  * ``"sampled"``: ``num_samples`` labels drawn from ``p(.|x)`` per example
    (a Monte-Carlo estimate of ``"exact"``; reproducible for a fixed ``rng``
    and chunk size: keys are drawn per chunk, so pass ``batch_size`` to get
    the same labels on every backend).
  * ``"empirical"``: the data label only (the "empirical Fisher"; Kunstner et
    al. 2019 show its limits).
  * ``"predicted"``: the model's own most likely label ``argmax_y p(y|x)``,
    weight 1, as van de Ven & Tolias's 2019 code computes its Fisher. On a
    trained classifier it is a fraction of ``"exact"`` (about 0.3x on an MLP),
    so their lambdas mean a weaker pull than the same lambda here with exact.
  * ``"batched"``: the square of each mini-batch's MEAN gradient (data labels),
    averaged over batches of ``batch_size`` (default 256 on every backend)
    weighted by their sizes, so a ragged last batch counts for what it holds.
    This is what Avalanche and many snippets compute; it is NOT a Fisher
    (about ``F / batch_size`` when gradients are uncorrelated), so lambda
    values do not transfer. Offered for comparison.

  When ``data`` are arrays, the whole pass is ONE compiled program: a loop
  over chunks on the device, with no host round trip per chunk; the label and
  finiteness checks are made on the device and reported once at the end. An
  iterable of batches runs one compiled step per chunk. Either way the
  examples go in chunks of one shape (the last one padded with copies of a
  real example, masked out), and only one chunk's per-example work exists at
  a time: peak memory is O(chunk x #params) on the vmap path and O(chunk x
  #activations) on the fast path, whatever the dataset size. The compiled
  program is cached per ``apply_fn`` object: reuse the same function across
  tasks (a new lambda each time compiles again).

  The Fisher pass changes no model state: ``apply_fn`` must be a pure
  evaluation-mode function (dropout off, batch-norm statistics read, not
  updated). With Flax NNX: ``graphdef, state = nnx.split(model.eval())`` (or
  ``nnx.view(model, deterministic=True)``), then
  ``apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)`` with
  ``params = nnx.state(model, nnx.Param)`` split off the rest; with Linen:
  ``apply_fn = lambda p, x: model.apply({'params': p, **others}, x,
  train=False)``.

  Example:
    >>> import jax, jax.numpy as jnp, ewc_jax
    >>> params = {'w': jnp.zeros((3, 2))}
    >>> apply_fn = lambda p, x: x @ p['w']
    >>> x = jnp.eye(3); y = jnp.array([0, 1, 0])
    >>> f = ewc_jax.fisher_diagonal(apply_fn, params, (x, y))
    >>> print(f['w'])  # p = (1/2, 1/2): each active weight gets 1/4 / 3
    [[0.08333334 0.08333334]
     [0.08333334 0.08333334]
     [0.08333334 0.08333334]]

  Args:
    apply_fn: ``apply_fn(params, inputs) -> logits``; inputs have a leading
      example axis and logits are ``[batch, classes]``.
    params: the parameter pytree (any: Flax NNX state, Linen dict, plain dict).
    data: ``(inputs, labels)`` arrays, or an iterable of such batches (streamed;
      only one chunk's gradients exist at a time). ``labels`` may be ``None``
      for ``"exact"`` and ``"sampled"``.
    estimator: one of :data:`ESTIMATORS`.
    rng: a PRNG key; required by ``"sampled"``.
    num_samples: labels drawn per example by ``"sampled"``.
    batch_size: examples per chunk (and the mini-batch of ``"batched"``), an
      int (NumPy ints too); ``None`` chooses per backend: 256 on CPU (tuned
      for its caches), thousands on a GPU or TPU (within about 1 GiB of
      temporaries), never more than the data; 256 for ``"batched"``,
      whose value depends on it.
    num_examples: use at most this many examples (a budget, like van de Ven's
      ``--fisher-n``): the FIRST ones, in data order, so shuffle class-sorted
      data first; ``None`` uses all.
    path: ``"auto"`` (the fast layer-wise path when the model's structure
      allows, else ``"vmap"``), ``"fast"`` (error if unsupported) or
      ``"vmap"`` (``jax.vmap`` over per-example VJPs; works for any model).
    sharding: a ``NamedSharding`` splitting the example axis, e.g.
      ``NamedSharding(mesh, PartitionSpec("data"))``: data parallelism. With
      arrays the pass is then ONE program too: the chunks are placed with
      their rows split over the mesh (NumPy data and arrays off the mesh
      shard by shard from the host, arrays on the mesh as they are), each
      device loops over its rows of every chunk, and one ``psum`` adds the
      devices' sums (``"batched"``: one per chunk). A stream runs that
      program once per chunk. ``batch_size`` (a whole chunk, all devices)
      must be divisible by the number of shards. Parameters may themselves
      be sharded (FSDP-style): the program gathers them once, and the Fisher
      takes their sharding. Equal to the unsharded pass up to float32
      rounding (every example keeps its ``"sampled"`` key).

  Returns:
    A float32 pytree shaped like ``params``.

  Raises:
    ValueError: unknown estimator or path; ``"sampled"`` without ``rng``; no
      examples in ``data``; labels not 1-D integers or outside ``[0,
      classes)``; logits not 2-D; parameters not floating (naming the leaf);
      a non-finite Fisher (naming the non-finite parameter leaf, else the
      data, else the Fisher's leaf).

  References:
    Kirkpatrick et al., `Overcoming catastrophic forgetting in neural networks
    <https://arxiv.org/abs/1612.00796>`_, PNAS 2017.
    Kunstner, Balles & Hennig, `Limitations of the empirical Fisher
    approximation <https://arxiv.org/abs/1905.12558>`_, NeurIPS 2019.
    van de Ven & Tolias, `Three scenarios for continual learning
    <https://arxiv.org/abs/1904.07734>`_, 2019.
  """
  est = estimators.get(estimator)
  _check_arguments(est, path, rng, num_samples, num_examples)
  tree_lib.check_floating("params", params)
  key = rng if rng is not None else jax.random.key(0)
  if _is_pair(data):
    return _fisher_of_arrays(apply_fn, params, data, est, key, num_samples,
                             batch_size, num_examples, path, sharding)
  return _fisher_of_stream(apply_fn, params, data, est, key, num_samples,
                           batch_size, num_examples, path, sharding)


def _check_arguments(est, path, rng, num_samples, num_examples):
  validate.choice("path", path, PATHS)
  if est.needs_key:
    if rng is None:
      raise ValueError(
          f'estimator="{est.name}" draws labels from the model and needs rng, '
          "a jax.random key.")
    validate.check_key("rng", rng)
    validate.positive_int("num_samples", num_samples)
  validate.positive_int("num_examples", num_examples, optional=True)


def _is_pair(data) -> bool:
  return (chunking.is_batch(data) and isinstance(data, tuple)
          and len(data) == 2)


def _pair(batch):
  if not (isinstance(batch, tuple) and len(batch) == 2):
    hint = (" (a list [inputs, labels] is read as a list of batches: pass "
            "the tuple (inputs, labels))" if hasattr(batch, "shape") else "")
    raise ValueError(
        "data must be (inputs, labels) or an iterable of such pairs; got a "
        f"batch of type {type(batch).__name__}{hint}.")
  return batch


def _check_batch_labels(est, labels):
  if labels is None:
    if est.needs_labels:
      raise ValueError(f'estimator="{est.name}" needs data labels.')
    return
  outputs.check_label_shape(labels)


def _int32(labels):
  return None if labels is None else jnp.asarray(labels, jnp.int32)


def _setup(apply_fn, params, inputs, est, num_samples, batch_size,
           num_examples, path, shards):
  """The number of classes, the path and the chunk plan for this model.

  With ``shards > 1`` (``sharding=``) the plan is one device's share.
  """
  num_classes = outputs.logits(apply_fn, params, inputs).classes
  chosen = _choose_path(path, apply_fn, params, inputs)
  if not est.per_example:
    size = est.default_chunk if batch_size is None else batch_size
    return num_classes, chosen, chunking.plan_chunks(
        size, None, example_bytes=0, backend="cpu", shards=shards)
  k = est.num_cotangents((num_classes,), num_samples)
  if chosen == "fast":
    example = jax.ShapeDtypeStruct(inputs.shape[1:], inputs.dtype)
    per = layerwise.example_bytes(apply_fn, params, example, k)
  else:
    per = 4 * tree_lib.num_params(params) * (2 + (k > 1))
  return num_classes, chosen, chunking.plan_chunks(
      batch_size, num_examples, example_bytes=per, shards=shards)


def _finish(fisher, finite, params, inputs):
  fisher = jax.tree.map(tree_lib.place_like, fisher, params)
  return outputs.blame_nonfinite(fisher, finite, params, inputs)


def _fisher_of_arrays(apply_fn, params, data, est, key, num_samples,
                      batch_size, num_examples, path, sharding):
  inputs, labels = data
  _check_batch_labels(est, labels)
  n = chunking.leading_size(data, "data")
  if num_examples is not None:
    n = min(n, num_examples)
  if n == 0:
    raise ValueError("data holds no examples: the Fisher needs at least one.")
  shards = pass_driver.num_shards(sharding)
  num_classes, chosen, plan = _setup(apply_fn, params, inputs, est,
                                     num_samples, batch_size, n, path, shards)
  fn = chunk_sums.FisherSums(apply_fn, est, int(num_samples), chosen, plan)
  fisher, summary = pass_driver.run_arrays(
      fn, params, (inputs, _int32(labels)), key, plan.chunk, n, sharding)
  if not tree_lib.is_concrete(summary):
    return fisher  # inside jit or vmap: no values to check
  summary = np.asarray(jax.device_get(summary))  # the one transfer
  if labels is not None and est.needs_labels:
    outputs.check_label_range(summary[-2], summary[-1], num_classes)
  return _finish(fisher, list(summary[:-2]), params, inputs)


def _fisher_of_stream(apply_fn, params, data, est, key, num_samples,
                      batch_size, num_examples, path, sharding):
  batches = chunking.batches(data, "data")
  first = next(batches, None)
  if first is None:
    raise ValueError("data holds no examples: the Fisher needs at least one.")
  # An automatic chunk is planned for the stream's first batch.
  shards = pass_driver.num_shards(sharding)
  num_classes, chosen, plan = _setup(
      apply_fn, params, _pair(first)[0], est, num_samples, batch_size,
      max(chunking.leading_size(first, "data"), 1), path, shards)
  size = plan.chunk * shards

  def pairs():
    for chunk, mask in chunking.chunks(itertools.chain([first], batches),
                                       size, num_examples, "data"):
      inputs, labels = _pair(chunk)
      _check_batch_labels(est, labels)
      yield (inputs, _int32(labels)), mask

  def check(chunk, real):
    labels = chunk[1]
    if labels is not None and est.needs_labels and real:
      got = np.asarray(jax.device_get(labels[:real]))
      outputs.check_label_range(got.min(), got.max(), num_classes)

  fn = chunk_sums.FisherSums(apply_fn, est, int(num_samples), chosen, plan)
  acc, count = pass_driver.run_stream(fn, params, pairs(), key, plan.chunk,
                                      sharding, check)
  if count == 0:
    raise ValueError("data holds no examples: the Fisher needs at least one.")
  fisher = jax.tree.map(lambda a: a / count, acc)
  return _finish(fisher, pass_driver.finite_flags(fisher), params, None)


def _choose_path(path, apply_fn, params, inputs) -> str:
  if path == "vmap":
    return "vmap"
  reason = diagonal.unsupported_reason(apply_fn, params, inputs)
  if reason is None:
    return "fast"
  if path == "fast":
    raise ValueError(f'path="fast" cannot handle this model: {reason}')
  return "vmap"


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
  validate.positive_int("num_examples", num_examples, optional=True)
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
    return _finish(fisher, list(np.asarray(jax.device_get(summary))[:-2]),
                   params, data)
  batches = chunking.batches(data, "data")
  first = next(batches, None)
  if first is None:
    raise ValueError("data holds no examples: the Fisher needs at least one.")
  size = _loss_chunk(batch_size, est, chunking.leading_size(first, "data"),
                     per, shards)
  chunks = chunking.chunks(itertools.chain([first], batches), size * shards,
                           num_examples, "data")
  acc, count = pass_driver.run_stream(fn, params, chunks, key, size, sharding)
  if count == 0:
    raise ValueError("data holds no examples: the Fisher needs at least one.")
  fisher = jax.tree.map(lambda a: a / count, acc)
  return _finish(fisher, pass_driver.finite_flags(fisher), params, None)


def _loss_chunk(batch_size, est, n, example_bytes, shards):
  """Examples per chunk (per device when ``shards > 1``)."""
  if batch_size is None and not est.per_example:
    batch_size = 64
  plan = chunking.plan_chunks(batch_size, n, example_bytes=example_bytes,
                              shards=shards)
  if batch_size is None and jax.default_backend() == "cpu":
    return min(64, plan.chunk)
  return plan.chunk
