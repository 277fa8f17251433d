"""The reference per-example path: ``jax.vmap`` of VJPs, any model.

Each example's gradient comes from a VJP of ``apply_fn`` on that example
alone (one forward pass; the ``K`` cotangents of the estimator reuse it),
squared and summed in float32. The layer-wise path (``layerwise.py``) must
agree with this one to float32 rounding.
"""

import jax
import jax.numpy as jnp

from ewc_jax._src import estimators


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
                tms, acc, unroll):
  """A group with ``K`` cotangents per example: one forward serves all K."""
  size = ms.shape[0]
  # A copy of the parameters per example: the VJP with respect to the copies
  # is the per-example gradient.
  copies = jax.tree.map(lambda p: jnp.broadcast_to(p, (size,) + p.shape),
                        params)
  logits, vjp_fn = jax.vjp(
      lambda ps: jax.vmap(lambda p, x: apply_fn(p, _one(x))[0])(ps, xs),
      copies)
  u, w = jax.vmap(
      lambda lg, y, k, tm: estimators.log_likelihood_cotangents(
          estimator, lg, y, k, num_samples, tm))(logits, ys, ks, tms)
  u = u.astype(logits.dtype)

  def add_class(k, acc):
    (g,) = vjp_fn(u[:, k])
    return jax.tree.map(lambda a, gi: a + _masked_sum(w[:, k], gi, ms, unroll),
                        acc, g)

  return jax.lax.fori_loop(0, u.shape[1], add_class, acc)


def _group_single(apply_fn, estimator, num_samples, params, xs, ys, ks, ms,
                  tms, acc, unroll):
  """A group with one cotangent per example: no parameter copies needed."""
  def one(x, y, key, tm):
    logits, vjp_fn = jax.vjp(lambda p: apply_fn(p, _one(x))[0], params)
    u, w = estimators.log_likelihood_cotangents(estimator, logits, y, key,
                                                num_samples, tm)
    return vjp_fn(u[0].astype(logits.dtype))[0], w[0]

  g, w = jax.vmap(one)(xs, ys, ks, tms)
  return jax.tree.map(lambda a, gi: a + _masked_sum(w, gi, ms, unroll), acc, g)


def chunk_sum(apply_fn, estimator, num_samples, params, inputs, labels,
              keys, mask, token_mask, plan):
  """Sum over a chunk of ``sum_k w_k g_k^2``: the reference per-example path.

  Per-example gradients come from ``jax.vmap`` of a VJP (one forward pass per
  example; the ``K`` cotangents of the estimator reuse it), ``plan.group``
  examples at a time through a ``fori_loop`` that indexes the carried chunk.
  On XLA:CPU (``plan.unroll``) groups of 8 are summed by an unrolled loop:
  a reduction over the example axis of ``[group, #params]`` compiles to a
  slow strided loop there, while the unrolled sum fuses into one kernel
  (about 85x faster). Memory is O(group x K x #params).

  Args:
    apply_fn, num_samples: as in ``fisher_diagonal``.
    estimator: an ``estimators.Estimator`` (per-example).
    params: the parameter pytree.
    inputs, labels, keys: one chunk (leading axis ``plan.chunk``).
    mask: boolean ``[chunk]``, False for padding.
    token_mask: ``[chunk, *positions]`` (sequences), or ``None``.
    plan: a ``chunking.ChunkPlan``.

  Returns:
    A float32 pytree shaped like ``params``.
  """
  size = plan.group
  group = _group_single if estimator.one_cotangent(num_samples) else (
      _group_many)

  def body(i, acc):
    take = lambda a: jax.tree.map(  # noqa: E731
        lambda b: jax.lax.dynamic_slice_in_dim(b, i * size, size), a)
    return group(apply_fn, estimator, num_samples, params, take(inputs),
                 take(labels), take(keys), take(mask), take(token_mask), acc,
                 plan.unroll)

  zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
  return jax.lax.fori_loop(0, mask.shape[0] // size, body, zeros)
