"""The layer-wise fast path: per-example squared-gradient sums of a chunk.

``jaxpr/diagonal.py`` traces ``apply_fn`` once per example and finds its
layers; here a chunk of examples goes through it in three steps:

1. one forward pass and one VJP per cotangent give each layer's recorded
   inputs (``acts``) and output gradients (``deltas``) per example;
2. layers whose per-example gradient entries are single products sum
   ``w_k a^2 delta_k^2`` by one batched VJP of the layer with squared inputs
   and squared output gradients: ``(x^2)^T (delta^2)`` for a dense layer;
3. the other layers form their per-example gradients alone and square them.

Padding rows are copies of a real example (never zeros, which a model such
as ``x / ||x||`` cannot take) and their weights are zeroed with ``where``.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax._src import estimators
from ewc_jax._src.jaxpr import diagonal


def example_bytes(apply_fn, params, example, num_cotangents: int) -> int:
  """Estimated float32 temporaries per example of this path (for plans)."""
  plan = diagonal.plan_for(apply_fn, params, example)
  outs = sum(a.size for layer in plan.layers for a in layer.out_avals)
  leaves = jax.tree.leaves(params)
  material = sum(int(np.prod(jnp.shape(leaves[leaf])))
                 for leaf in plan.material_leaves)
  return 4 * (example.size + (2 + num_cotangents) * outs + 2 * material)


def chunk_sum(apply_fn, estimator, num_samples, params, inputs, labels, keys,
              mask, token_mask, chunk_plan):
  """``sum_i sum_k w_ik g_ik^2`` over a chunk, by the layer-wise identities.

  Same contract as ``per_example.chunk_sum``: ``mask`` boolean, float32
  result shaped like ``params``. The chunk goes through in sub-chunks of
  ``chunk_plan.sub_chunk`` (cache-sized on CPU, the whole chunk on an
  accelerator), carried and indexed (faster than a scanned slice on CPU).
  """
  plan = diagonal.plan_for(
      apply_fn, params, jax.ShapeDtypeStruct(inputs.shape[1:], inputs.dtype))
  leaves = jax.tree.leaves(params)
  size = chunk_plan.sub_chunk

  def body(i, acc):
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, i * size, size)  # noqa
    part = sub_chunk_sum(plan, leaves, estimator, num_samples, take(inputs),
                         take(labels), take(keys), take(mask),
                         jax.tree.map(take, token_mask),
                         chunk_plan.loop_examples)
    return [a + b for a, b in zip(acc, part)]

  out = jax.lax.fori_loop(
      0, inputs.shape[0] // size, body,
      [jnp.zeros_like(p, jnp.float32) for p in leaves])
  return jax.tree.unflatten(plan.treedef, out)


def _f32(x):
  """Floating activations as float32; integer ones (token ids, indices, a
  ``select_n`` predicate) as they are: they index, they are not scaled."""
  return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _where_rows(mask, x):
  return jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)


def layer_signals(plan, leaves, estimator, num_samples, inputs, labels, keys,
                  mask, token_mask):
  """Per example: each layer's inputs, output gradients per cotangent, weights.

  Returns:
    ``(acts, deltas, w)``: ``acts[j]`` layer ``j``'s recorded inputs
    ``[B, ...]``, ``deltas[j]`` its output gradients ``[B, K, ...]``, ``w``
    the cotangent weights ``[B, K]``, zero (by ``where``) for padding.
  """
  zero_perts = [[jnp.zeros(a.shape, a.dtype) for a in layer.pert_avals]
                for layer in plan.layers]

  def per_example(x, y, key, tm):
    return estimators.backprop_cotangents(
        lambda perts: diagonal.forward(plan, leaves, x, perts), zero_perts,
        estimator, y, key, num_samples, tm)

  acts, deltas, w = jax.vmap(per_example)(inputs, labels, keys, token_mask)
  # Padding rows copy a real example, so their signals are finite whenever
  # the real ones are, and a zero weight removes them exactly.
  return acts, deltas, _where_rows(mask, w)


def _identity_sums(plan, f32_leaves, acts, deltas, w):
  """Single-product layers: one VJP with squared inputs and gradients."""
  ids = plan.identity_layers
  sq_acts = [[jnp.square(_f32(a)) for a in layer] for layer in acts]
  d2 = [[jnp.einsum("bk,bk...->b...", w, jnp.square(d.astype(jnp.float32)))
         for d in deltas[j]] for j in ids]

  def layer_outs(sub):
    lv = list(f32_leaves)
    for leaf, x in zip(plan.identity_leaves, sub):
      lv[leaf] = x
    return jax.vmap(lambda a: [diagonal.cut(plan, lv, a)[j] for j in ids])(
        sq_acts)

  _, vjp = jax.vjp(layer_outs,
                   [f32_leaves[leaf] for leaf in plan.identity_leaves])
  (grads,) = vjp(d2)
  return [jnp.abs(g) for g in grads]


def _material_sums(plan, f32_leaves, acts, deltas, w, loop_examples):
  """Other layers: each example's layer gradients, formed and squared.

  ``loop_examples`` (XLA:CPU): a ``scan`` over the examples, each with its
  ``K`` cotangents vmapped; the vmapped weight gradient of a convolution is
  then an ordinary convolution with ``K x`` more output channels. Otherwise
  (accelerators, or more cotangents than examples, whose ``K`` gradients at
  once would take more memory): the examples vmapped and a ``scan`` over the
  cotangents, which XLA:CPU runs as slow grouped convolutions.
  """
  mids = plan.material_layers
  sub = [f32_leaves[leaf] for leaf in plan.material_leaves]

  def vjp_of(a):
    def layer_outs(sub):
      lv = list(f32_leaves)
      for leaf, x in zip(plan.material_leaves, sub):
        lv[leaf] = x
      acts32 = [[_f32(v) for v in layer] for layer in a]
      outs = diagonal.cut(plan, lv, acts32)
      return [outs[j] for j in mids]
    return jax.vjp(layer_outs, sub)[1]

  def f32(ds):
    return [[d.astype(jnp.float32) for d in ds_j] for ds_j in ds]

  if loop_examples and w.shape[1] <= w.shape[0]:
    def example(acc, ex):
      a, ds, wk = ex
      (g,) = jax.vmap(vjp_of(a))(f32(ds))  # each [K, ...]
      return [c + jnp.einsum("k,k...->...", wk, jnp.square(gi))
              for c, gi in zip(acc, g)], None

    acc, _ = jax.lax.scan(example, [jnp.zeros_like(s) for s in sub],
                          (acts, [deltas[j] for j in mids], w))
    return acc

  def one(a, ds, wk):
    vjp = vjp_of(a)

    def body(acc, k):
      (g,) = vjp(f32([[d[k] for d in ds_j] for ds_j in ds]))
      return [c + wk[k] * jnp.square(gi) for c, gi in zip(acc, g)], None

    acc, _ = jax.lax.scan(body, [jnp.zeros_like(s) for s in sub],
                          jnp.arange(wk.shape[0]))
    return acc

  per = jax.vmap(one)(acts, [deltas[j] for j in mids], w)
  return [jnp.sum(s, 0) for s in per]


def sub_chunk_sum(plan, leaves, estimator, num_samples, inputs, labels, keys,
                  mask, token_mask=None, loop_examples=False):
  """One sub-chunk's ``sum_i sum_k w_ik g_ik^2`` as a list of leaves."""
  acts, deltas, w = layer_signals(plan, leaves, estimator, num_samples,
                                  inputs, labels, keys, mask, token_mask)
  f32_leaves = [jnp.asarray(p, jnp.float32) for p in leaves]
  out = [jnp.zeros(jnp.shape(p), jnp.float32) for p in leaves]
  if plan.identity_layers:
    sums = _identity_sums(plan, f32_leaves, acts, deltas, w)
    for leaf, s in zip(plan.identity_leaves, sums):
      out[leaf] = s
  if plan.material_layers:
    sums = _material_sums(plan, f32_leaves, acts, deltas, w, loop_examples)
    for leaf, s in zip(plan.material_leaves, sums):
      out[leaf] = s
  return out
