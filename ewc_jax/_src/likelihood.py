"""Log-likelihood cotangents of the estimators, and the vmap reference path.

Every per-example estimator is a weighted set of output-space cotangents
``u_k`` per example, ``F = sum_k w_k (J^T u_k)^2`` with ``J = d logits / d
theta``; the two paths (this module's ``jax.vmap`` of VJPs and the layer-wise
path in ``fast.py``) differ only in how they form the squares.
"""

import jax
import jax.numpy as jnp

PER_EXAMPLE = ("exact", "sampled", "empirical", "predicted")


def log_likelihood_cotangents(logits, labels, key, estimator, num_samples):
  r"""Output-space cotangents whose backpropagation gives the Fisher terms.

  For a categorical model ``d log p(c|x) / d logits = e_c - softmax(logits)``.

  Args:
    logits: ``[C]`` logits of one example.
    labels: the example's label (used by ``"empirical"``).
    key: a PRNG key (used by ``"sampled"``).
    estimator: ``"exact"`` (every class ``c``, weight ``p(c|x)``),
      ``"sampled"`` (``num_samples`` labels drawn from ``p(.|x)``, weight
      ``1/num_samples``), ``"empirical"`` (the data label, weight 1) or
      ``"predicted"`` (the model's own argmax label, weight 1).
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
  else:  # empirical or predicted: one label
    y = labels if estimator == "empirical" else jnp.argmax(logits)
    u = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)[None] - probs
    w = jnp.ones([1], jnp.float32)
  return u, w


def backprop_cotangents(forward, primal, labels, key, estimator, num_samples):
  """Backpropagates one example's :func:`log_likelihood_cotangents`.

  Args:
    forward: ``forward(primal) -> (logits, aux)`` for one example.
    primal: what the gradients are taken with respect to.
    labels, key, estimator, num_samples: as for
      :func:`log_likelihood_cotangents`.

  Returns:
    ``(aux, grads, w)``: ``forward``'s ``aux``, the ``K`` gradients with
    respect to ``primal`` (leading axis ``K``, one forward pass) and their
    weights ``[K]``.
  """
  logits, vjp_fn, aux = jax.vjp(forward, primal, has_aux=True)
  u, w = log_likelihood_cotangents(logits, labels, key, estimator, num_samples)
  (grads,) = jax.vmap(vjp_fn)(u.astype(logits.dtype))
  return aux, grads, w


def one_cotangent(estimator: str, num_samples: int) -> bool:
  """Whether the estimator backpropagates one cotangent per example."""
  return estimator in ("empirical", "predicted") or (
      estimator == "sampled" and num_samples == 1)


def _one(x):
  """One example as a batch of one (inputs may be a pytree of arrays)."""
  return jax.tree.map(lambda a: a[None], x)


def _masked_sum(w, g, mask, unroll):
  """``sum_e mask_e w_e g_e^2`` in float32, masked with ``where``.

  Padding rows are copies of a real example, so their squares are finite
  whenever the real ones are: zeroing their weights is then exact. The
  unrolled form (XLA:CPU) does only that; the reduction also zeroes them.
  """
  w = jnp.where(mask, w, 0.0).astype(jnp.float32)
  if unroll:  # XLA:CPU fuses an unrolled sum; a strided reduction is slow
    return sum(w[e] * jnp.square(g[e].astype(jnp.float32))
               for e in range(g.shape[0]))
  g = jnp.where(mask.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0)
  return jnp.einsum("b,b...->...", w, jnp.square(g.astype(jnp.float32)))


def _group_many(apply_fn, estimator, num_samples, params, xs, ys, ks, ms,
                acc, unroll):
  """A group with ``K`` cotangents per example: one forward serves all K."""
  size = ms.shape[0]
  # A copy of the parameters per example: the VJP with respect to the copies
  # is the per-example gradient.
  copies = jax.tree.map(lambda p: jnp.broadcast_to(p, (size,) + p.shape),
                        params)
  logits, vjp_fn = jax.vjp(
      lambda ps: jax.vmap(lambda p, x: apply_fn(p, _one(x))[0])(ps, xs),
      copies)
  u, w = jax.vmap(log_likelihood_cotangents, in_axes=(0, 0, 0, None, None))(
      logits, ys, ks, estimator, num_samples)
  u = u.astype(logits.dtype)

  def add_class(k, acc):
    (g,) = vjp_fn(u[:, k])
    return jax.tree.map(lambda a, gi: a + _masked_sum(w[:, k], gi, ms, unroll),
                        acc, g)

  return jax.lax.fori_loop(0, u.shape[1], add_class, acc)


def _group_single(apply_fn, estimator, num_samples, params, xs, ys, ks, ms,
                  acc, unroll):
  """A group with one cotangent per example: no parameter copies needed."""
  def one(x, y, key):
    logits, vjp_fn = jax.vjp(lambda p: apply_fn(p, _one(x))[0], params)
    u, w = log_likelihood_cotangents(logits, y, key, estimator, num_samples)
    return vjp_fn(u[0].astype(logits.dtype))[0], w[0]

  g, w = jax.vmap(one)(xs, ys, ks)
  return jax.tree.map(lambda a, gi: a + _masked_sum(w, gi, ms, unroll), acc, g)


def vmap_chunk_sum(apply_fn, estimator, num_samples, params, inputs, labels,
                   keys, mask, plan):
  """Sum over a chunk of ``sum_k w_k g_k^2``: the reference per-example path.

  Per-example gradients come from ``jax.vmap`` of a VJP (one forward pass per
  example; the ``K`` cotangents of the estimator reuse it), ``plan.group``
  examples at a time through a ``fori_loop`` that indexes the carried chunk.
  On XLA:CPU (``plan.unroll``) groups of 8 are summed by an unrolled loop:
  a reduction over the example axis of ``[group, #params]`` compiles to a
  slow strided loop there, while the unrolled sum fuses into one kernel
  (about 85x faster). Memory is O(group x K x #params).

  Args:
    apply_fn, estimator, num_samples: as in ``fisher_diagonal``.
    params: the parameter pytree.
    inputs, labels, keys: one chunk (leading axis ``plan.chunk``).
    mask: boolean ``[chunk]``, False for padding.
    plan: a ``chunking.ChunkPlan``.

  Returns:
    A float32 pytree shaped like ``params``.
  """
  size = plan.group
  group = _group_single if one_cotangent(estimator, num_samples) else (
      _group_many)

  def body(i, acc):
    take = lambda a: jax.tree.map(  # noqa: E731
        lambda b: jax.lax.dynamic_slice_in_dim(b, i * size, size), a)
    return group(apply_fn, estimator, num_samples, params, take(inputs),
                 take(labels), take(keys), take(mask), acc, plan.unroll)

  zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
  return jax.lax.fori_loop(0, mask.shape[0] // size, body, zeros)
