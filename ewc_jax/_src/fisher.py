"""Diagonal Fisher information of a categorical model, classifier or sequence.

One example is one classifier input or one sequence. Its gradient is that of
its log-likelihood: for a sequence, the masked SUM of its token
log-likelihoods (positions a token mask drops, such as padding or prompt
tokens, contribute nothing). The Fisher averages the squared per-example
gradients; a sequence model's by default per token kept (see
:func:`fisher_diagonal`'s ``normalize``).
"""

import itertools
from typing import Any, Callable, Iterable, Literal, NamedTuple, Optional
from typing import Union

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
PATHS = ("auto", "fast", "vmap")
NORMALIZE = ("tokens", "sequences")
# "exact" on a sequence backpropagates one cotangent per (position, class).
MAX_EXACT_COTANGENTS = 2**14

Batch = tuple
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
    path: Literal["auto", "fast", "vmap"] = "auto",
    sharding: Optional[jax.sharding.NamedSharding] = None,
    normalize: Literal["tokens", "sequences"] = "tokens",
) -> Any:
  r"""The diagonal Fisher information of a categorical model.

  .. math::
    F = \frac{1}{N} \sum_{n=1}^N \sum_y p(y|x_n)
        \left(\frac{\partial \log p(y|x_n; \theta)}{\partial \theta}\right)^2

  averaged over the ``N`` examples used. The estimators differ in which
  labels ``y`` enter the sum:

  * ``"exact"``: every class, weighted by the model's ``p(y|x)``.
  * ``"sampled"``: ``num_samples`` labels drawn from ``p(.|x)`` per example
    (a Monte-Carlo estimate of ``"exact"``, the true Fisher). Example ``r``
    of the data (its index in the arrays, or counted through a stream)
    draws from ``fold_in(rng, r)``: the same labels whatever ``batch_size``,
    the backend, the number of devices or the stream's batches.
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

  **Sequence models.** When ``apply_fn`` returns logits ``[batch, T,
  vocab]`` (any ``[batch, *positions, classes]``), one example is one
  sequence, ``data`` is ``(inputs, labels, mask)`` with ``labels`` and
  ``mask`` ``[batch, T]`` (``mask``: the positions that count, e.g. not
  padding, not prompt; ``None`` or omitted: all; labels where the mask is
  False are ignored, so ``-100`` may stand there), and its gradient is that
  of ``sum_t mask_t log p(y_t | context_t)``. ``"sampled"`` draws a token at
  every position (the Monte Carlo true Fisher: contexts stay the data's, so
  the positions' terms are independent, and ``num_samples`` draws per
  sequence); ``"exact"`` sums over the whole vocabulary at every position,
  one backward pass per (position, class), for small vocabularies only;
  ``"empirical"`` uses the data tokens; ``"batched"`` squares the gradient
  of each mini-batch's mean token loss. With ``normalize="tokens"`` (the
  default) the sum of squared per-sequence gradients is divided by the
  number of tokens the masks keep, not by the sequences: training minimises
  the MEAN token loss, whose expected Hessian this estimates, so that
  ``(lam/2) F (theta - theta*)^2`` has the scale of one token's loss and a
  lambda means the same for short and long sequences.
  ``normalize="sequences"`` divides by the number of sequences (a per-
  sequence Fisher, about ``T`` times larger). A classifier has one position
  per example: both are the mean over examples.

  When ``data`` are arrays, the whole pass is ONE compiled program: a loop
  over chunks on the device, with no host round trip per chunk; the label and
  finiteness checks are made on the device and reported once at the end. An
  iterable of batches runs one compiled step per chunk; its batches are cut
  and joined into chunks of ``batch_size`` regardless of where the stream
  splits them, so a stream gives the arrays' result. Either way the examples
  go in chunks of one shape (the last one padded with copies of a real
  example, masked out), and only one chunk's per-example work exists at a
  time: peak memory is O(chunk x #params) on the vmap path and O(chunk x
  #activations) on the fast path, whatever the dataset size. The compiled
  program is cached per ``apply_fn`` object: reuse the same function across
  tasks (a new lambda each time compiles again). Sums are float32 for any
  parameter dtype (bfloat16 models included).

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
    >>> emb = {'e': jnp.zeros((4, 4))}  # a bigram language model
    >>> lm = lambda p, tokens: p['e'][tokens]  # logits [batch, T, vocab]
    >>> tokens = jnp.array([[0, 1, 2], [3, 3, 0]])
    >>> mask = jnp.array([[True, True, False], [True, False, False]])
    >>> f = ewc_jax.fisher_diagonal(lm, emb, (tokens, None, mask),
    ...                             estimator="sampled", rng=jax.random.key(0))
    >>> print(f['e'].sum(1).round(4))  # 3 tokens kept: rows 0, 1, 3 once
    [0.25 0.25 0.   0.25]

  Args:
    apply_fn: ``apply_fn(params, inputs) -> logits``; inputs have a leading
      example axis and logits are ``[batch, classes]`` or ``[batch,
      *positions, classes]``.
    params: the parameter pytree (any: Flax NNX state, Linen dict, plain dict).
    data: ``(inputs, labels)`` or ``(inputs, labels, mask)`` arrays, or an
      iterable of such batches (streamed; only one chunk's gradients exist
      at a time). ``labels`` may be ``None`` for estimators that need none
      (``"exact"``, ``"sampled"``, ``"predicted"``).
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
      be sharded (FSDP, tensor-parallel): the program gathers them on each
      device, and the Fisher takes their sharding. Equal to the unsharded
      pass up to float32 rounding.
    normalize: a sequence model's Fisher per token kept (``"tokens"``) or per
      sequence (``"sequences"``); see above.

  Returns:
    A float32 pytree shaped like ``params``.

  Raises:
    ValueError: unknown estimator, path or normalize; ``"sampled"`` without
      ``rng``; no examples in ``data``; labels or mask not shaped like the
      logits without their class axis, labels not integers or outside ``[0,
      classes)`` where the mask keeps them; an ``apply_fn`` that returns
      another number of rows than it gets; parameters not floating (naming
      the leaf); a non-finite Fisher (naming the non-finite parameter leaf,
      else the data, else the Fisher's leaf).

  References:
    Kirkpatrick et al., `Overcoming catastrophic forgetting in neural networks
    <https://arxiv.org/abs/1612.00796>`_, PNAS 2017.
    Kunstner, Balles & Hennig, `Limitations of the empirical Fisher
    approximation <https://arxiv.org/abs/1905.12558>`_, NeurIPS 2019.
    van de Ven & Tolias, `Three scenarios for continual learning
    <https://arxiv.org/abs/1904.07734>`_, 2019.
    Matena & Raffel, `Merging Models with Fisher-Weighted Averaging
    <https://arxiv.org/abs/2111.09832>`_, NeurIPS 2022 (the sampled Fisher of
    language models).
  """
  est = estimators.get(estimator)
  _check_arguments(est, path, rng, num_samples, num_examples)
  validate.choice("normalize", normalize, NORMALIZE)
  tree_lib.check_floating("params", params)
  key = rng if rng is not None else jax.random.key(0)
  opts = _Options(est, int(num_samples), batch_size, num_examples, path,
                  sharding, normalize == "tokens")
  if _is_batch(data):
    return _fisher_of_arrays(apply_fn, params, data, key, opts)
  return _fisher_of_stream(apply_fn, params, data, key, opts)


class _Options(NamedTuple):
  """The pass's settings."""
  est: estimators.Estimator
  num_samples: int
  batch_size: Optional[int]
  num_examples: Optional[int]
  path: str
  sharding: Optional[jax.sharding.NamedSharding]
  per_token: bool


def _check_arguments(est, path, rng, num_samples, num_examples):
  validate.choice("path", path, PATHS)
  validate.check_sampling(est, rng, num_samples)
  validate.positive_int_or_none("num_examples", num_examples)


def _is_batch(data) -> bool:
  """``(inputs, labels)`` or ``(inputs, labels, mask)`` of arrays."""
  return (isinstance(data, tuple) and len(data) in (2, 3)
          and chunking.is_batch(data))


def _parts(batch):
  """``(inputs, labels, mask)`` of one batch, or a one-line error."""
  if not (isinstance(batch, tuple) and len(batch) in (2, 3)):
    hint = (" (a list [inputs, labels] is read as a list of batches: pass "
            "the tuple (inputs, labels))" if hasattr(batch, "shape") else "")
    raise ValueError(
        "data must be (inputs, labels), (inputs, labels, mask) or an "
        "iterable of such tuples; got a batch of type "
        f"{type(batch).__name__}{hint}.")
  return batch if len(batch) == 3 else (batch[0], batch[1], None)


def _check_batch(est, labels, mask, logits):
  if labels is None:
    if est.needs_labels:
      raise ValueError(f'estimator="{est.name}" needs data labels.')
  else:
    outputs.check_label_shape(labels, logits.positions)
  if mask is not None:
    outputs.check_mask(mask, logits.positions)


def _batch_arrays(labels, mask):
  """Labels as int32 (positions the mask drops: 0) and the mask as bool."""
  if mask is not None:
    mask = jnp.asarray(mask) != 0
  if labels is not None:
    labels = jnp.asarray(labels, jnp.int32)
  return labels, mask


def _setup(apply_fn, params, inputs, opts, num_examples, shards):
  """The logits, the path and the chunk plan (per device with shards > 1)."""
  est = opts.est
  logits = outputs.logits(apply_fn, params, inputs)
  k = est.num_cotangents(logits.positions + (logits.classes,),
                         opts.num_samples)
  if est.per_example and k > MAX_EXACT_COTANGENTS:
    raise ValueError(
        f'estimator="{est.name}" backpropagates {k} cotangents per example '
        f"here (logits {logits.positions + (logits.classes,)} per example): "
        'too many. Use estimator="sampled" (the Monte Carlo estimate of the '
        "same Fisher) with num_samples of a few.")
  chosen = _choose_path(opts.path, apply_fn, params, inputs)
  if not est.per_example:
    size = est.default_chunk if opts.batch_size is None else opts.batch_size
    return logits, chosen, chunking.plan_chunks(
        size, None, example_bytes=0, backend="cpu", shards=shards)
  if chosen == "fast":
    example = jax.ShapeDtypeStruct(inputs.shape[1:], inputs.dtype)
    per = layerwise.example_bytes(apply_fn, params, example, k)
  else:
    per = 4 * tree_lib.num_params(params) * (2 + (k > 1))
  return logits, chosen, chunking.plan_chunks(
      opts.batch_size, num_examples, example_bytes=per, shards=shards)


def _sums(apply_fn, opts, chosen, plan, logits):
  return chunk_sums.FisherSums(apply_fn, opts.est, opts.num_samples, chosen,
                               plan, logits.positions, opts.per_token)


def _fisher_of_arrays(apply_fn, params, data, key, opts):
  inputs, labels, mask = _parts(data)
  _check_batch(opts.est, labels, mask,
               outputs.logits(apply_fn, params, inputs))
  n = chunking.leading_size(data, "data")
  if opts.num_examples is not None:
    n = min(n, opts.num_examples)
  if n == 0:
    raise ValueError("data holds no examples: the Fisher needs at least one.")
  shards = pass_driver.num_shards(opts.sharding)
  logits, chosen, plan = _setup(apply_fn, params, inputs, opts, n, shards)
  labels, mask = _batch_arrays(labels, mask)
  batch = (inputs, labels) if mask is None else (inputs, labels, mask)
  fn = _sums(apply_fn, opts, chosen, plan, logits)
  fisher, summary = pass_driver.run_arrays(fn, params, batch, key,
                                           plan.chunk, n, opts.sharding)
  if not tree_lib.is_concrete(summary):
    return fisher  # inside jit or vmap: no values to check
  summary = np.asarray(jax.device_get(summary))  # the one transfer
  if labels is not None and opts.est.needs_labels:
    outputs.check_label_range(summary[-2], summary[-1], logits.classes)
  _check_tokens(fn, batch, n)
  return outputs.finish(fisher, list(summary[:-2]), params, inputs)


def _check_tokens(fn, batch, n):
  if fn.positions and fn.per_token and float(fn.divisor(batch, n)) == 0:
    raise ValueError("the mask keeps no token: the Fisher needs at least "
                     "one (is the mask inverted?).")


def _fisher_of_stream(apply_fn, params, data, key, opts):
  batches = chunking.batches(data, "data")
  first = next(batches, None)
  if first is None:
    raise ValueError("data holds no examples: the Fisher needs at least one.")
  # An automatic chunk is planned for the stream's first batch.
  shards = pass_driver.num_shards(opts.sharding)
  logits, chosen, plan = _setup(
      apply_fn, params, _parts(first)[0], opts,
      max(chunking.leading_size(first, "data"), 1), shards)
  size = plan.chunk * shards

  def parts():
    for batch in itertools.chain([first], batches):
      inputs, labels, mask = _parts(batch)
      _check_batch(opts.est, labels, mask, logits)
      labels, mask = _batch_arrays(labels, mask)
      yield (inputs, labels) if mask is None else (inputs, labels, mask)

  def check(chunk, real):
    found = fn.labels(chunk)
    if found is None or not opts.est.needs_labels or not real:
      return
    labels, valid = (np.asarray(jax.device_get(x))[:real]
                     if x is not None else None for x in found)
    kept = labels if valid is None else labels[valid]
    if kept.size:
      outputs.check_label_range(kept.min(), kept.max(), logits.classes)

  fn = _sums(apply_fn, opts, chosen, plan, logits)
  chunks = chunking.chunks(parts(), size, opts.num_examples, "data")
  acc, count, weight = pass_driver.run_stream(fn, params, chunks, key,
                                              plan.chunk, opts.sharding,
                                              check)
  if count == 0:
    raise ValueError("data holds no examples: the Fisher needs at least one.")
  if weight == 0:
    raise ValueError("the mask keeps no token: the Fisher needs at least "
                     "one (is the mask inverted?).")
  fisher = jax.tree.map(lambda a: a / weight, acc)
  return outputs.finish(fisher, pass_driver.finite_flags(fisher), params, None)


def _choose_path(path, apply_fn, params, inputs) -> str:
  if path == "vmap":
    return "vmap"
  reason = diagonal.unsupported_reason(apply_fn, params, inputs)
  if reason is None:
    return "fast"
  if path == "fast":
    raise ValueError(f'path="fast" cannot handle this model: {reason}')
  return "vmap"
