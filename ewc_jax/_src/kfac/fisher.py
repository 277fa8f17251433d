"""Kronecker-factored (KFAC) Fisher of dense layers, diagonal for the rest."""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ewc_jax._src import chunk_sums
from ewc_jax._src import chunking
from ewc_jax._src import estimators
from ewc_jax._src import fisher as fisher_lib
from ewc_jax._src import outputs
from ewc_jax._src import pass_driver
from ewc_jax._src import tree as tree_lib
from ewc_jax._src import validate
from ewc_jax._src.estimators import EstimatorName
from ewc_jax._src.jaxpr import kronecker
from ewc_jax._src.jaxpr import walker
from ewc_jax._src.kfac import packing

# Every per-example estimator of the diagonal Fisher works here too.
KFAC_ESTIMATORS = estimators.PER_EXAMPLE
DEFAULT_CHUNK = 128


class KroneckerFactors(NamedTuple):
  """One dense layer's curvature ``A kron G`` (float32).

  Attributes:
    a: ``[d_in (+1), d_in (+1)]``, ``E[x~ x~^T]``; the last coordinate is the
      homogeneous 1 when the layer has a bias.
    g: ``[d_out, d_out]``, ``E[sum_c w_c g_c g_c^T]``.
  """
  a: jax.Array
  g: jax.Array


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["factors", "diagonal"],
    meta_fields=["layers"])
@dataclasses.dataclass(frozen=True)
class KFACCurvature:
  """The curvature returned by :func:`kfac_fisher`.

  Attributes:
    factors: a tuple of :class:`KroneckerFactors`, one per dense layer.
    diagonal: a pytree shaped like ``params``: the diagonal Fisher (float32)
      of every leaf that is no dense layer's kernel or bias, and
      ``optax.MaskedNode()`` at those that are.
    layers: a tuple of :class:`DenseLayer` (static, not a leaf), aligned with
      ``factors``: which leaves each block covers.
  """
  factors: tuple
  diagonal: Any
  layers: tuple


class _PlanRef:
  """A plan as a static jit argument, hashed by identity (plans are cached)."""

  def __init__(self, plan):
    self.plan = plan


@dataclasses.dataclass(frozen=True)
class KFACSums(chunk_sums.PerRow):
  """The per-chunk function of the factors' pass (see ``chunk_sums.py``).

  Sums ``x~ x~^T`` and ``sum_k w_k g_k g_k^T`` over a chunk's real rows;
  its "params" are the float32 leaves.
  """
  ref: _PlanRef
  estimator: estimators.Estimator
  num_samples: int

  def zeros(self, leaves):
    return [KroneckerFactors(
        jnp.zeros([packing.rows(ly)] * 2, jnp.float32),
        jnp.zeros([ly.d_out] * 2, jnp.float32))
            for ly in self.ref.plan.layers]

  def labels(self, chunk):
    return (chunk[1], None) if self.estimator.needs_labels else None

  def __call__(self, leaves, chunk, mask, keys, axes=()):
    del axes
    plan = self.ref.plan
    inputs, labels = chunk
    if labels is None:
      labels = jnp.zeros(mask.shape, jnp.int32)
    mask = mask.astype(jnp.float32)
    zero = [jnp.zeros(s, jnp.float32) for s in plan.out_shapes]

    def per_example(x, y, k):
      return estimators.backprop_cotangents(
          lambda perts: kronecker.forward(plan, leaves, x, perts), zero,
          self.estimator, y, k, self.num_samples)

    acts, grads, w = jax.vmap(per_example)(inputs, labels, keys)
    w = w * mask[:, None]
    out = []
    for layer, x, g in zip(plan.layers, acts, grads):
      x = x.astype(jnp.float32)
      if layer.bias is not None:
        x = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=1)
      out.append(KroneckerFactors(jnp.einsum("b,bi,bj->ij", mask, x, x),
                                  jnp.einsum("bk,bki,bkj->ij", w, g, g)))
    return out


def _one_input(inputs, name):
  if not hasattr(inputs, "shape") or jnp.ndim(inputs) < 1:
    raise ValueError(
        f"{name} must hold one input array with a leading example axis "
        f"(kfac_fisher traces one example); got {type(inputs).__name__}.")


def _plan(apply_fn, params, inputs) -> _PlanRef:
  """The model's dense layers; one reference per plan, so that the compiled
  pass (keyed by it) is reused across tasks."""
  example = jax.ShapeDtypeStruct(inputs.shape[1:], inputs.dtype)
  return walker.cached("kronecker-ref", apply_fn, params, example,
                       lambda: _PlanRef(kronecker.plan_for(apply_fn, params,
                                                           example)))


def dense_layers(apply_fn: Callable, params: Any, inputs: Any) -> tuple:
  """The dense layers that :func:`kfac_fisher` gives Kronecker blocks.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> logits``.
    params: the parameter pytree.
    inputs: a batch of inputs (one array, leading example axis).

  Returns:
    A tuple of :class:`DenseLayer` in the order the model applies them.
  """
  _one_input(inputs, "inputs")
  return _plan(apply_fn, params, inputs).plan.layers


def kfac_fisher(
    apply_fn: Callable[[Any, Any], jax.Array], params: Any, data: Any, *,
    estimator: EstimatorName = "exact",
    rng: Optional[jax.Array] = None,
    num_samples: int = 1,
    batch_size: Optional[int] = None,
) -> KFACCurvature:
  r"""Kronecker-factored Fisher of the dense layers, diagonal for the rest.

  For every dense layer ``y = x W (+ b)`` of ``apply_fn`` (found by tracing,
  see :func:`dense_layers`), the Fisher block of ``D = [W; b]`` (stacked
  ``(d_in + 1) x d_out``) is approximated as in KFAC (Martens & Grosse 2015):

  .. math::
    F_D \approx A \otimes G, \quad
    A = \frac{1}{N}\sum_n \tilde x_n \tilde x_n^\top, \quad
    G = \frac{1}{N}\sum_n \sum_c w_{nc}\, g_{nc} g_{nc}^\top,

  with ``x~ = [x, 1]`` when the layer has a bias (the homogeneous coordinate
  last, as kfac-jax's dense blocks) and ``g_c = d log p(c|x) / d y``. The
  weights ``w_c`` are the estimator's (any per-example estimator of
  :func:`ewc_jax.fisher_diagonal`): ``"exact"``: ``p(c|x)`` over every
  class; ``"sampled"``: ``num_samples`` labels drawn from ``p(.|x)``, each
  ``1/num_samples``; ``"empirical"``: the data label, weight 1;
  ``"predicted"``: the model's own argmax label. ``A kron G`` acts on
  ``vec(D)`` taken row-major (``D.reshape(-1)``). Every other parameter
  (convolutions, weights used twice, layers inside ``scan``, ...) gets the
  diagonal Fisher of :func:`ewc_jax.fisher_diagonal` with the same estimator
  (for ``"sampled"`` from the same keys: example ``r`` draws from
  ``fold_in(rng, r)`` in both, so the same labels).

  Arrays run as one compiled program over all chunks, streams one program
  per chunk, as in :func:`ewc_jax.fisher_diagonal`. The model is traced once
  per ``apply_fn`` object and input shape, and the compiled pass is cached
  with it: reuse the same ``apply_fn`` across tasks. Factors are
  accumulated in float32 (parameters are cast for the pass).

  Example:
    >>> import jax, jax.numpy as jnp, ewc_jax
    >>> params = {'w': jnp.zeros((3, 2)), 'b': jnp.zeros(2)}
    >>> apply_fn = lambda p, x: x @ p['w'] + p['b']
    >>> c = ewc_jax.kfac_fisher(apply_fn, params, (jnp.eye(3), None))
    >>> c.layers[0].kernel, c.layers[0].bias
    ("['w']", "['b']")
    >>> print(c.factors[0].g)  # p = (1/2, 1/2)
    [[ 0.25 -0.25]
     [-0.25  0.25]]

  Args:
    apply_fn: ``apply_fn(params, inputs) -> logits`` ``[batch, classes]``,
      a pure evaluation-mode function (see :func:`ewc_jax.fisher_diagonal`
      for NNX and Linen); inputs are ONE array with a leading example axis.
    params: the parameter pytree (NNX state, Linen dict, plain dict).
    data: ``(inputs, labels)`` or an iterable of such batches; ``labels`` may
      be ``None`` except for ``"empirical"``. A one-shot iterator is read
      into memory when the model has non-dense parameters (two passes).
    estimator: ``"exact"``, ``"sampled"``, ``"empirical"`` or
      ``"predicted"``.
    rng: a PRNG key; required by ``"sampled"``.
    num_samples: labels drawn per example by ``"sampled"``.
    batch_size: examples per chunk (padded); ``None``: 128. Memory is
      O(batch_size x classes x sum_layers d_out).

  Returns:
    A :class:`KFACCurvature`: factors averaged over the examples, float32.

  Raises:
    ValueError: unknown estimator, ``"sampled"`` without ``rng``, inputs
      that are not one array, labels outside ``[0, classes)``, no examples;
      non-finite factors or diagonal (nan/inf in the data or the logits;
      checked outside ``jax.jit``).

  References:
    Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015.
    Ritter, Botev & Barber, `Online Structured Laplace Approximations for
    Overcoming Catastrophic Forgetting <https://arxiv.org/abs/1805.07810>`_,
    NeurIPS 2018.
  """
  est = estimators.get(estimator, KFAC_ESTIMATORS)
  validate.check_sampling(est, rng, num_samples)
  size = validate.positive_int("batch_size", DEFAULT_CHUNK if batch_size is
                               None else batch_size)
  key = rng if rng is not None else jax.random.key(0)
  if not chunking.is_batch(data) and not isinstance(data, (list, tuple)):
    data = list(chunking.batches(data, "data"))  # read twice below
  leaves = [jnp.asarray(p, jnp.float32) for p in jax.tree.leaves(params)]
  factors, count = _factors(apply_fn, params, data, est, int(num_samples),
                            leaves, key, size)
  tree_lib.check_finite(  # skipped inside jit (no values)
      "the Kronecker factors", factors,
      hint="Check the data for nan/inf and the model's logits (overflow?).")
  plan = _plan(apply_fn, params, _inputs_of(data)).plan
  return KFACCurvature(tuple(factors), _diagonal(
      apply_fn, params, data, plan, est, rng, num_samples, batch_size),
                       plan.layers)


def _inputs_of(data):
  first = data if chunking.is_batch(data) else next(iter(data))
  return _pair(first)[0]


def _pair(chunk):
  if not (isinstance(chunk, tuple) and len(chunk) == 2):
    raise ValueError("data must be (inputs, labels) or an iterable of "
                     f"such pairs; got a {type(chunk).__name__}.")
  _one_input(chunk[0], "inputs")
  return chunk


def _labels(est, labels, n):
  if labels is None:
    if est.needs_labels:
      raise ValueError(f'estimator="{est.name}" needs data labels.')
    return None
  arr = jnp.asarray(labels)
  if est.needs_labels and n and not jnp.issubdtype(arr.dtype, jnp.integer):
    raise ValueError(f"labels must be integers (class indices); got dtype "
                     f"{arr.dtype}.")
  return arr.astype(jnp.int32)


def _factors(apply_fn, params, data, est, num_samples, leaves, key, size):
  """The averaged factors (arrays: one program; a stream: one per chunk)."""
  if chunking.is_batch(data):
    inputs, labels = _pair(data)
    ref = _plan(apply_fn, params, inputs)
    n = chunking.leading_size(data, "data")
    if n == 0:
      raise ValueError(
          "data holds no examples: the Fisher needs at least one.")
    fn = KFACSums(ref, est, num_samples)
    classes = outputs.logits(apply_fn, params, inputs).classes
    mean, summary = pass_driver.run_arrays(
        fn, leaves, (inputs, _labels(est, labels, n)), key, size, n)
    if tree_lib.is_concrete(summary) and fn.labels((inputs, labels)) is not (
        None):
      summary = np.asarray(jax.device_get(summary))
      outputs.check_label_range(summary[-2], summary[-1], classes)
    return mean, n
  if not data:
    raise ValueError("data holds no examples: the Fisher needs at least one.")
  first = _pair(data[0])[0]
  ref = _plan(apply_fn, params, first)
  fn = KFACSums(ref, est, num_samples)
  classes = outputs.logits(apply_fn, params, first).classes

  def pairs():
    for chunk, mask in chunking.chunks(data, size, None, "data"):
      inputs, labels = _pair(chunk)
      yield (inputs, _labels(est, labels, int(mask.sum()))), mask

  def check(chunk, real):
    if fn.labels(chunk) is not None and real:
      got = np.asarray(jax.device_get(chunk[1][:real]))
      outputs.check_label_range(got.min(), got.max(), classes)

  acc, count, _ = pass_driver.run_stream(fn, leaves, pairs(), key, size,
                                         None, check)
  if count == 0:
    raise ValueError("data holds no examples: the Fisher needs at least one.")
  return [KroneckerFactors(a / count, g / count) for a, g in acc], count


def _diagonal(apply_fn, params, data, plan, est, rng, num_samples,
              batch_size):
  """The diagonal Fisher of non-layer leaves; MaskedNode at layer leaves."""
  covered = {ly.kernel_index for ly in plan.layers} | {
      ly.bias_index for ly in plan.layers if ly.bias is not None}
  leaves, treedef = jax.tree.flatten(params)
  if len(covered) == len(leaves):
    diag = [None] * len(leaves)
  else:
    diag = jax.tree.leaves(fisher_lib.fisher_diagonal(
        apply_fn, params, data, estimator=est.name, rng=rng,
        num_samples=num_samples, batch_size=batch_size))
  return jax.tree.unflatten(treedef, [
      optax.MaskedNode() if i in covered else d for i, d in enumerate(diag)])


def check_curvature(curvature: Any, params: Any, name: str = "curvature"):
  """Raises a ValueError naming what does not match ``params``."""
  if not isinstance(curvature, KFACCurvature):
    raise ValueError(f"{name} must be a KFACCurvature from "
                     f"ewc_jax.kfac_fisher; got {type(curvature).__name__}.")
  tree_lib.map_by_path(lambda *_: None, (f"{name}.diagonal", "params"),
                       curvature.diagonal, params, check_shapes=False)
  leaves = tree_lib.leaves_by_path(params)
  for layer, f in zip(curvature.layers, curvature.factors):
    try:
      packing.check_leaves(layer, leaves)
    except ValueError as e:
      raise ValueError(f"{name}'s block for params{layer.kernel} does not "
                       f"fit: {e}") from None
    if (jnp.shape(f.a) != (packing.rows(layer),) * 2
        or jnp.shape(f.g) != (layer.d_out,) * 2):
      raise ValueError(
          f"{name}'s block for params{layer.kernel} has factors "
          f"{jnp.shape(f.a)}, {jnp.shape(f.g)}; the layer needs "
          f"{(packing.rows(layer),) * 2}, {(layer.d_out,) * 2}.")
