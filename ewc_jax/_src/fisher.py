"""Diagonal Fisher information from per-example gradients."""

import functools
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax._src import tree as tree_lib

ESTIMATORS = ("exact", "sampled", "empirical", "batched")
PATHS = ("auto", "fast", "vmap")

Batch = tuple[Any, Any]
Data = Union[Batch, Iterable[Batch]]


def _f32_zeros(params):
  """Float32 zeros with each parameter's sharding (and shape)."""
  return jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)


def _is_batch(data: Any) -> bool:
  """A batch is a tuple, dict or array whose leaves are all arrays."""
  if isinstance(data, (list, Iterator)) or not isinstance(
      data, (tuple, dict)) and not hasattr(data, "shape"):
    return False
  leaves = jax.tree.leaves(data)
  return bool(leaves) and all(hasattr(x, "shape") for x in leaves)


def _batches(data: Any, name: str) -> Iterator[Any]:
  """Yields the batches of `data`: one array pytree, or an iterable of them."""
  if _is_batch(data):
    yield data
    return
  try:
    it = iter(data)
  except TypeError:
    raise ValueError(
        f"{name} must be a tuple of arrays or an iterable of such batches; "
        f"got {type(data).__name__}.") from None
  for batch in it:
    if not _is_batch(batch):
      raise ValueError(
          f"each batch of {name} must be a tuple (or dict) of arrays with a "
          f"leading example axis; got {type(batch).__name__}.")
    yield batch


def _leading_size(batch: Any, name: str) -> int:
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None
           for x in jax.tree.leaves(batch)}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        f"every array in a batch of {name} needs the same leading (example) "
        f"axis; got leading sizes {sorted(s for s in sizes if s is not None)}"
        f"{' and a scalar' if None in sizes else ''}.")
  return sizes.pop()


def _chunks(data: Data, batch_size: int, num_examples: Optional[int],
            name: str) -> Iterator[tuple[Any, np.ndarray]]:
  """Yields ``(chunk, mask)``, each chunk padded to ``batch_size`` examples.

  Padding keeps one shape for every chunk, so the step compiles once; the
  mask (1 for real examples, 0 for padding) removes the padded examples.
  """
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  if num_examples is not None and (
      not isinstance(num_examples, int) or num_examples < 1):
    raise ValueError(
        f"num_examples must be None or a positive int, got {num_examples!r}.")
  remaining = num_examples
  for batch in _batches(data, name):
    if remaining is not None and remaining <= 0:
      return
    n = _leading_size(batch, name)
    for start in range(0, n, batch_size):
      take = min(batch_size, n - start)
      if remaining is not None:
        take = min(take, remaining)
      if take <= 0:
        return
      chunk = jax.tree.map(
          lambda x, s=start, t=take: _pad(x[s:s + t], batch_size), batch)
      mask = np.zeros([batch_size], np.float32)
      mask[:take] = 1.0
      yield chunk, mask
      if remaining is not None:
        remaining -= take


def _pad(x, size):
  n = x.shape[0]
  if n == size:
    return x
  pad = [(0, size - n)] + [(0, 0)] * (x.ndim - 1)
  return (jnp.pad if isinstance(x, jax.Array) else np.pad)(x, pad)


def _check_labels(labels, num_classes: int) -> None:
  if not tree_lib.is_concrete(labels):
    return
  arr = np.asarray(jax.device_get(labels))
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(
        f"labels must be integers in [0, {num_classes}); got dtype "
        f"{arr.dtype}.")
  if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
    raise ValueError(
        f"labels must lie in [0, {num_classes}) (the number of logits); got "
        f"values in [{arr.min()}, {arr.max()}].")


def log_likelihood_cotangents(logits, labels, key, estimator, num_samples):
  r"""Output-space cotangents whose backpropagation gives the Fisher terms.

  For a categorical model ``d log p(c|x) / d logits = e_c - softmax(logits)``.
  Each estimator is a weighted set of such vectors ``u_k`` per example:
  ``F = sum_k w_k (J^T u_k)^2`` with ``J = d logits / d theta``.

  Args:
    logits: ``[C]`` logits of one example.
    labels: the example's label (used by ``"empirical"``).
    key: a PRNG key (used by ``"sampled"``).
    estimator: ``"exact"``, ``"sampled"`` or ``"empirical"``.
    num_samples: labels drawn per example by ``"sampled"``.

  Returns:
    ``(u, w)``: cotangents ``[K, C]`` and weights ``[K]``, float32.
  """
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits)
  num_classes = logits.shape[-1]
  if estimator == "exact":
    u = jnp.eye(num_classes, dtype=jnp.float32) - probs
    w = probs
  elif estimator == "sampled":
    y = jax.random.categorical(key, logits, shape=(num_samples,))
    u = jax.nn.one_hot(y, num_classes, dtype=jnp.float32) - probs
    w = jnp.full([num_samples], 1.0 / num_samples, jnp.float32)
  else:  # empirical
    u = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)[None] - probs
    w = jnp.ones([1], jnp.float32)
  return jax.lax.stop_gradient(u), jax.lax.stop_gradient(w)


def _one(x):
  """One example as a batch of one (inputs may be a pytree of arrays)."""
  return jax.tree.map(lambda a: a[None], x)


def _group_size(n: int, most: int = 8) -> int:
  return max(g for g in range(1, min(most, n) + 1) if n % g == 0)


def _vmap_chunk_sum(apply_fn, estimator, num_samples, params, inputs, labels,
                    keys, mask):
  """Sum over a chunk of ``sum_k w_k g_k^2``: the reference per-example path.

  Per-example gradients come from ``jax.vmap`` of a VJP (one forward pass per
  example; the ``K`` cotangents of the estimator reuse it). Examples go in
  groups of at most 8 through a ``fori_loop`` that indexes the carried chunk,
  and each group's squares are summed by an unrolled loop: on XLA:CPU a
  reduction over the example axis of ``[group, #params]`` compiles to a slow
  strided loop, while the unrolled sum fuses into one kernel (about 85x
  faster), and larger groups stop fusing. Memory is O(8 x K x #params).
  """
  size = _group_size(mask.shape[0])
  cotangents = jax.vmap(log_likelihood_cotangents,
                        in_axes=(0, 0, 0, None, None))

  def body_many(i, acc):
    take = lambda a: jax.tree.map(
        lambda b: jax.lax.dynamic_slice_in_dim(b, i * size, size), a)
    xs, ys, ks, ms = take(inputs), take(labels), take(keys), take(mask)
    # A copy of the parameters per example: the VJP with respect to the
    # copies is the per-example gradient, and one forward pass serves all K.
    copies = jax.tree.map(lambda p: jnp.broadcast_to(p, (size,) + p.shape),
                          params)
    logits, vjp_fn = jax.vjp(
        lambda ps: jax.vmap(lambda p, x: apply_fn(p, _one(x))[0])(ps, xs),
        copies)
    u, w = cotangents(logits, ys, ks, estimator, num_samples)
    u, w = u.astype(logits.dtype), w * ms[:, None]

    def add_class(k, acc):
      (g,) = vjp_fn(u[:, k])
      return jax.tree.map(
          lambda a, gi: a + sum(w[e, k] * jnp.square(gi[e].astype(jnp.float32))
                                for e in range(size)), acc, g)

    return jax.lax.fori_loop(0, u.shape[1], add_class, acc)

  def one(x, y, key, m):
    logits, vjp_fn = jax.vjp(lambda p: apply_fn(p, _one(x))[0], params)
    u, w = log_likelihood_cotangents(logits, y, key, estimator, num_samples)
    return vjp_fn(u[0].astype(logits.dtype))[0], w[0] * m

  def body_single(i, acc):
    # One cotangent per example (empirical, or one sample): no copies needed.
    take = lambda a: jax.tree.map(
        lambda b: jax.lax.dynamic_slice_in_dim(b, i * size, size), a)
    g, w = jax.vmap(one)(take(inputs), take(labels), take(keys), take(mask))
    return jax.tree.map(
        lambda a, gi: a + sum(w[e] * jnp.square(gi[e].astype(jnp.float32))
                              for e in range(size)), acc, g)

  single = estimator == "empirical" or (
      estimator == "sampled" and num_samples == 1)
  return jax.lax.fori_loop(0, mask.shape[0] // size,
                           body_single if single else body_many,
                           _f32_zeros(params))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4,))
def _fisher_step(apply_fn, estimator, num_samples, path, acc, params, inputs,
                 labels, key, mask):
  keys = jax.random.split(key, mask.shape[0])
  if path == "fast":
    from ewc_jax._src import fast  # noqa: PLC0415 (optional fast path)
    total = fast.chunk_sum(apply_fn, estimator, num_samples, params, inputs,
                           labels, keys, mask)
  else:
    total = _vmap_chunk_sum(apply_fn, estimator, num_samples, params, inputs,
                            labels, keys, mask)
  return jax.tree.map(jnp.add, acc, total)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def _batched_step(apply_fn, acc, params, inputs, labels, mask):
  def mean_nll(p):
    logp = jax.nn.log_softmax(apply_fn(p, inputs).astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
    return jnp.sum(mask * nll) / jnp.sum(mask)

  g = jax.grad(mean_nll)(params)
  return jax.tree.map(
      lambda a, gi: a + jnp.square(gi.astype(jnp.float32)), acc, g)


def fisher_diagonal(
    apply_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    data: Data,
    *,
    estimator: str = "exact",
    rng: Optional[jax.Array] = None,
    num_samples: int = 1,
    batch_size: int = 256,
    num_examples: Optional[int] = None,
    path: str = "auto",
    sharding: Optional[jax.sharding.Sharding] = None,
) -> Any:
  r"""The diagonal Fisher information of a categorical classifier.

  .. math::
    F = \frac{1}{N} \sum_{n=1}^N \sum_y p(y|x_n)
        \left(\frac{\partial \log p(y|x_n; \theta)}{\partial \theta}\right)^2

  averaged over the ``N`` examples used. The estimators differ in which
  labels ``y`` enter the sum:

  * ``"exact"``: every class, weighted by the model's ``p(y|x)``.
  * ``"sampled"``: ``num_samples`` labels drawn from ``p(.|x)`` per example
    (a Monte-Carlo estimate of ``"exact"``; reproducible for a fixed ``rng``).
  * ``"empirical"``: the data label only (the "empirical Fisher"; Kunstner et
    al. 2019 show its limits).
  * ``"batched"``: the square of each mini-batch's MEAN gradient (data labels),
    averaged over batches of ``batch_size``. This is what Avalanche and many
    snippets compute; it is NOT a Fisher (about ``F / batch_size`` when
    gradients are uncorrelated), so lambda values do not transfer. Offered for
    comparison.

  Per-example gradients are taken in chunks of ``batch_size`` (padded to one
  shape, so the step compiles once) and their squares are summed on device:
  peak memory is O(batch_size x #params) whatever the dataset size. The
  compiled step is cached per ``apply_fn`` object: reuse the same function
  across tasks (a new lambda each time compiles again).

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
    estimator: ``"exact"``, ``"sampled"``, ``"empirical"`` or ``"batched"``.
    rng: a PRNG key; required by ``"sampled"``.
    num_samples: labels drawn per example by ``"sampled"``.
    batch_size: examples per chunk (and the mini-batch of ``"batched"``).
    num_examples: use at most this many examples (a budget, like van de Ven's
      ``--fisher-n``): the FIRST ones, in data order, so shuffle class-sorted
      data first; ``None`` uses all.
    path: ``"auto"`` (the fast layer-wise path when the model's structure
      allows, else ``"vmap"``), ``"fast"`` (error if unsupported) or
      ``"vmap"`` (``jax.vmap`` over per-example VJPs; works for any model).
    sharding: where each chunk's examples go, e.g.
      ``NamedSharding(mesh, PartitionSpec("data"))``: the per-example work then
      runs data-parallel and the sum is reduced across the data axis by XLA.
      ``batch_size`` must be divisible by the number of shards. Parameters
      may themselves be sharded (FSDP-style); the Fisher takes their sharding.

  Returns:
    A float32 pytree shaped like ``params``.

  Raises:
    ValueError: unknown estimator or path; ``"sampled"`` without ``rng``; no
      examples in ``data``; labels outside ``[0, classes)``; logits not 2-D.

  References:
    Kirkpatrick et al., `Overcoming catastrophic forgetting in neural networks
    <https://arxiv.org/abs/1612.00796>`_, PNAS 2017.
    Kunstner, Balles & Hennig, `Limitations of the empirical Fisher
    approximation <https://arxiv.org/abs/1905.12558>`_, NeurIPS 2019.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(
        f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
  if path not in PATHS:
    raise ValueError(f"path must be one of {PATHS}, got {path!r}.")
  if estimator == "sampled":
    if rng is None:
      raise ValueError(
          'estimator="sampled" draws labels from the model and needs rng, '
          "a jax.random key.")
    if not isinstance(num_samples, int) or num_samples < 1:
      raise ValueError(
          f"num_samples must be a positive int, got {num_samples!r}.")
  key = rng if rng is not None else jax.random.key(0)
  acc = _f32_zeros(params)
  count, num_batches, num_classes, chosen = 0, 0, None, None
  for i, (chunk, mask) in enumerate(
      _chunks(data, batch_size, num_examples, "data")):
    if not (isinstance(chunk, tuple) and len(chunk) == 2):
      raise ValueError(
          "data must be (inputs, labels) or an iterable of such pairs; got a "
          f"batch of type {type(chunk).__name__}.")
    inputs, labels = chunk
    real = int(mask.sum())
    if num_classes is None:
      num_classes = _num_classes(apply_fn, params, inputs)
      chosen = _choose_path(path, apply_fn, params, inputs)
    if estimator in ("empirical", "batched"):
      if labels is None:
        raise ValueError(f'estimator="{estimator}" needs data labels.')
      _check_labels(labels[:real], num_classes)
    if labels is None:
      labels = np.zeros([batch_size], np.int32)
    labels, mask = jnp.asarray(labels, jnp.int32), jnp.asarray(mask)
    if sharding is not None:
      inputs, labels, mask = jax.device_put((inputs, labels, mask), sharding)
    if estimator == "batched":
      acc = _batched_step(apply_fn, acc, params, inputs, labels, mask)
    else:
      acc = _fisher_step(apply_fn, estimator, num_samples, chosen, acc, params,
                         inputs, labels, jax.random.fold_in(key, i), mask)
    count += real
    num_batches += 1
  if count == 0:
    raise ValueError("data holds no examples: the Fisher needs at least one.")
  denom = num_batches if estimator == "batched" else count
  return _finished(jax.tree.map(lambda a, p: _like(a / denom, p), acc, params))


def _finished(fisher):
  try:
    tree_lib.check_finite("the Fisher", fisher)
  except ValueError as e:
    raise ValueError(
        f"{e} Check the data for nan/inf and the model's logits.") from None
  return fisher


def _like(value, param):
  """`value` placed with `param`'s sharding (XLA may have chosen another)."""
  sharding = getattr(param, "sharding", None)
  if sharding is None or not isinstance(param, jax.Array) or (
      value.sharding.is_equivalent_to(sharding, param.ndim)):
    return value
  return jax.device_put(value, sharding)


def _num_classes(apply_fn, params, inputs) -> int:
  out = jax.eval_shape(apply_fn, params, inputs)
  if len(out.shape) != 2:
    raise ValueError(
        "apply_fn(params, inputs) must return logits of shape [batch, "
        f"classes]; got shape {out.shape}.")
  return out.shape[1]


def _choose_path(path, apply_fn, params, inputs) -> str:
  if path == "vmap":
    return "vmap"
  try:
    from ewc_jax._src import fast  # noqa: PLC0415
  except ImportError:
    fast = None
  reason = "the fast path is not available" if fast is None else (
      fast.unsupported_reason(apply_fn, params, inputs))
  if reason is None:
    return "fast"
  if path == "fast":
    raise ValueError(f'path="fast" cannot handle this model: {reason}')
  return "vmap"


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def _empirical_step(loss_fn, acc, params, chunk, mask):
  grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, chunk)
  return jax.tree.map(
      lambda a, g: a + jnp.einsum(
          "b,b...->...", mask, jnp.square(g.astype(jnp.float32))), acc, grads)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def _batched_loss_step(loss_fn, acc, params, chunk, mask):
  def mean_loss(p):
    losses = jax.vmap(loss_fn, in_axes=(None, 0))(p, chunk)
    return jnp.sum(mask * losses.astype(jnp.float32)) / jnp.sum(mask)

  return jax.tree.map(lambda a, g: a + jnp.square(g.astype(jnp.float32)),
                      acc, jax.grad(mean_loss)(params))


def empirical_fisher(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    data: Any,
    *,
    estimator: str = "empirical",
    batch_size: int = 64,
    num_examples: Optional[int] = None,
    sharding: Optional[jax.sharding.Sharding] = None,
) -> Any:
  r"""The empirical diagonal Fisher of any model with a per-example loss.

  .. math::
    F = \frac{1}{N} \sum_n \left(\frac{\partial \ell(\theta; z_n)}
        {\partial \theta}\right)^2

  where ``loss_fn(params, example)`` is the negative log-likelihood of ONE
  example ``z_n`` (a regression loss, a sequence's mean token loss, ...).
  Per-example gradients come from ``jax.vmap(jax.grad(loss_fn))`` in chunks
  of ``batch_size``; only one chunk's gradients exist at a time.

  Example:
    >>> import jax.numpy as jnp, ewc_jax
    >>> loss = lambda p, z: 0.5 * jnp.sum((z[0] * p['w'] - z[1]) ** 2)
    >>> data = (jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0]))
    >>> f = ewc_jax.empirical_fisher(loss, {'w': jnp.array(1.0)}, data)
    >>> float(f['w'])  # mean of (x^2 w)^2 = (1 + 16) / 2
    8.5

  With ``estimator="batched"`` it returns instead the square of each
  mini-batch's MEAN gradient averaged over batches of ``batch_size`` (what
  the PyTorch snippet and Avalanche compute; about ``F / batch_size``, not a
  Fisher), for comparison.

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar`` for one example, where
      ``example`` is one slice (no leading axis) of ``data``'s arrays.
    params: the parameter pytree.
    data: a pytree of arrays with a leading example axis (e.g. a tuple
      ``(inputs, targets)``), or an iterable of such batches.
    estimator: ``"empirical"`` (per-example) or ``"batched"``.
    batch_size: examples per chunk (the mini-batch of ``"batched"``).
    num_examples: use at most this many examples.
    sharding: where each chunk's examples go (data parallelism), as in
      :func:`fisher_diagonal`.

  Returns:
    A float32 pytree shaped like ``params``.
  """
  if estimator not in ("empirical", "batched"):
    raise ValueError(
        f'estimator must be "empirical" or "batched", got {estimator!r}.')
  step = _empirical_step if estimator == "empirical" else _batched_loss_step
  acc = _f32_zeros(params)
  count, num_batches = 0, 0
  for chunk, mask in _chunks(data, batch_size, num_examples, "data"):
    real, mask = int(mask.sum()), jnp.asarray(mask)
    if sharding is not None:
      chunk, mask = jax.device_put((chunk, mask), sharding)
    acc = step(loss_fn, acc, params, chunk, mask)
    count, num_batches = count + real, num_batches + 1
  if count == 0:
    raise ValueError("data holds no examples: the Fisher needs at least one.")
  denom = count if estimator == "empirical" else num_batches
  return _finished(jax.tree.map(lambda a, p: _like(a / denom, p), acc, params))


