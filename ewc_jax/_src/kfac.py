"""Kronecker-factored (KFAC) Fisher of dense layers, and its EWC penalty."""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ewc_jax._src import chunking
from ewc_jax._src import fisher as fisher_lib
from ewc_jax._src import hyperparams as hyper_lib
from ewc_jax._src import likelihood as likelihood_lib
from ewc_jax._src import kfac_tracer
from ewc_jax._src import tree as tree_lib
from ewc_jax._src.kfac_tracer import DenseLayer

# Every per-example estimator of the diagonal Fisher works here too.
KFAC_ESTIMATORS = tuple(e for e in fisher_lib.ESTIMATORS if e != "batched")


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


def _one_input(inputs, name):
  if not hasattr(inputs, "shape") or jnp.ndim(inputs) < 1:
    raise ValueError(
        f"{name} must hold one input array with a leading example axis "
        f"(kfac_fisher traces one example); got {type(inputs).__name__}.")


_PLANS: dict = {}


class _PlanRef:
  """A plan as a static jit argument, hashed by identity (plans are cached)."""

  def __init__(self, plan):
    self.plan = plan


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


def _plan(apply_fn, params, inputs):
  example = jax.ShapeDtypeStruct(inputs.shape[1:], inputs.dtype)
  key = (apply_fn, jax.tree.structure(params),
         tuple(jnp.shape(p) for p in jax.tree.leaves(params)),
         example.shape, example.dtype)
  if key not in _PLANS:
    if len(_PLANS) >= 32:  # keep recent models, not all
      del _PLANS[next(iter(_PLANS))]
    _PLANS[key] = _PlanRef(kfac_tracer.analyse(apply_fn, params, example))
  return _PLANS[key]


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3,))
def _kfac_step(ref, estimator, num_samples, acc, leaves, inputs, labels, key,
               mask):
  """Adds a chunk's ``sum_i x~ x~^T`` and ``sum_i sum_k w g g^T`` to acc."""
  plan = ref.plan
  zero = [jnp.zeros(s, jnp.float32) for s in plan.out_shapes]
  keys = jax.random.split(key, mask.shape[0])

  def per_example(x, y, k):
    def forward(perts):
      walker = kfac_tracer.Walker(plan, perts)
      (logits,), _ = walker.run(
          plan.jaxpr, plan.consts, list(leaves) + [x],
          kfac_tracer.leaf_infos(len(leaves)))
      return logits, [walker.acts[i] for i in range(len(plan.layers))]

    return likelihood_lib.backprop_cotangents(forward, zero, y, k,
                                              estimator, num_samples)

  acts, grads, w = jax.vmap(per_example)(inputs, labels, keys)
  w = w * mask[:, None]
  out = []
  for layer, (a_sum, g_sum), x, g in zip(plan.layers, acc, acts, grads):
    x = x.astype(jnp.float32)
    if layer.bias is not None:
      x = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=1)
    a_sum = a_sum + jnp.einsum("b,bi,bj->ij", mask, x, x)
    g_sum = g_sum + jnp.einsum("bk,bki,bkj->ij", w, g, g)
    out.append(KroneckerFactors(a_sum, g_sum))
  return out


def _validate(estimator, rng, num_samples):
  if estimator not in KFAC_ESTIMATORS:
    raise ValueError(
        f"estimator must be one of {KFAC_ESTIMATORS}, got {estimator!r}.")
  if estimator == "sampled":
    if rng is None:
      raise ValueError(
          'estimator="sampled" draws labels from the model and needs rng, '
          "a jax.random key.")
    hyper_lib.check_key("rng", rng)
    chunking.positive_int("num_samples", num_samples)  # NumPy ints too


def kfac_fisher(
    apply_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    data: Any,
    *,
    estimator: str = "exact",
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
  ``1/num_samples``; ``"empirical"``: the data label, weight 1. ``A kron G``
  acts on ``vec(D)`` taken row-major (``D.reshape(-1)``). Every other
  parameter (convolutions, weights used twice, layers inside ``scan``, ...)
  gets the diagonal Fisher of :func:`ewc_jax.fisher_diagonal` with the same
  estimator (for ``"sampled"`` its labels are drawn separately).

  The model is traced once per ``apply_fn`` object and input shape, and the
  jitted pass is cached with it: reuse the same ``apply_fn`` across tasks.
  Factors are accumulated in float32 (parameters are cast for the pass).

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
    estimator: ``"exact"``, ``"sampled"`` or ``"empirical"``.
    rng: a PRNG key; required by ``"sampled"``.
    num_samples: labels drawn per example by ``"sampled"``.
    batch_size: examples per jitted chunk (padded); ``None``: 128. Memory is
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
  _validate(estimator, rng, num_samples)
  if estimator == "sampled":  # a static argument of the jitted step
    num_samples = int(num_samples)
  batch_size = 128 if batch_size is None else batch_size
  key = rng if rng is not None else jax.random.key(0)
  if not chunking.is_batch(data) and not isinstance(data, (list, tuple)):
    data = list(chunking.batches(data, "data"))  # read twice below
  leaves = [jnp.asarray(p, jnp.float32) for p in jax.tree.leaves(params)]
  plan, acc, count = None, None, 0
  for i, (chunk, mask) in enumerate(
      chunking.chunks(data, batch_size, None, "data")):
    if not (isinstance(chunk, tuple) and len(chunk) == 2):
      raise ValueError("data must be (inputs, labels) or an iterable of "
                       f"such pairs; got a {type(chunk).__name__}.")
    inputs, labels = chunk
    _one_input(inputs, "inputs")
    if plan is None:
      ref = _plan(apply_fn, params, inputs)
      plan = ref.plan
      acc = [KroneckerFactors(
          jnp.zeros([ly.d_in + (ly.bias is not None)] * 2, jnp.float32),
          jnp.zeros([ly.d_out] * 2, jnp.float32)) for ly in plan.layers]
      num_classes = jax.eval_shape(apply_fn, params, inputs).shape[-1]
    real = int(mask.sum())
    labels = _labels(estimator, labels, real, num_classes, batch_size)
    acc = _kfac_step(ref, estimator, num_samples, acc, leaves,
                     inputs, labels, jax.random.fold_in(key, i),
                     jnp.asarray(mask, jnp.float32))
    count += real
  if count == 0:
    raise ValueError("data holds no examples: the Fisher needs at least one.")
  factors = tuple(KroneckerFactors(a / count, g / count) for a, g in acc)
  tree_lib.check_finite(  # skipped inside jit (no values)
      "the Kronecker factors", factors,
      hint="Check the data for nan/inf and the model's logits (overflow?).")
  return KFACCurvature(factors, _diagonal(apply_fn, params, data, plan,
                                          estimator, rng, num_samples,
                                          batch_size), plan.layers)


def _labels(estimator, labels, real, num_classes, batch_size):
  if labels is None:
    if estimator == "empirical":
      raise ValueError('estimator="empirical" needs data labels.')
    return jnp.zeros([batch_size], jnp.int32)
  arr = np.asarray(labels)
  if estimator == "empirical" and real and (
      not np.issubdtype(arr.dtype, np.integer)
      or arr[:real].min() < 0 or arr[:real].max() >= num_classes):
    raise ValueError(
        f"labels must be integers in [0, {num_classes}) (the number of "
        f"logits); got dtype {arr.dtype}, values in "
        f"[{arr[:real].min()}, {arr[:real].max()}].")
  return jnp.asarray(arr, jnp.int32)


def _diagonal(apply_fn, params, data, plan, estimator, rng, num_samples,
              batch_size):
  """The diagonal Fisher of non-layer leaves; MaskedNode at layer leaves."""
  covered = {ly.kernel_index for ly in plan.layers} | {
      ly.bias_index for ly in plan.layers if ly.bias is not None}
  leaves, treedef = jax.tree.flatten(params)
  if len(covered) == len(leaves):
    diag = [None] * len(leaves)
  else:
    diag = jax.tree.leaves(fisher_lib.fisher_diagonal(
        apply_fn, params, data, estimator=estimator, rng=rng,
        num_samples=num_samples, batch_size=batch_size))
  return jax.tree.unflatten(treedef, [
      optax.MaskedNode() if i in covered else d for i, d in enumerate(diag)])


def layer_delta(layer: DenseLayer, leaves: list, anchor_leaves: list):
  """``D = [W - W*; b - b*]`` as ``(d_in (+1)) x d_out`` float32."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  d = f32(leaves[layer.kernel_index]) - f32(anchor_leaves[layer.kernel_index])
  if layer.transposed:
    d = d.T
  if layer.bias is not None:
    db = f32(leaves[layer.bias_index]) - f32(anchor_leaves[layer.bias_index])
    d = jnp.concatenate([d, db[None]], axis=0)
  return d


def split_delta(layer: DenseLayer, d: jax.Array):
  """The kernel- and bias-shaped parts of a ``(d_in (+1)) x d_out`` matrix."""
  dw = d[:layer.d_in]
  return (dw.T if layer.transposed else dw), (
      d[layer.d_in] if layer.bias is not None else None)


def check_curvature(curvature: Any, params: Any, name: str = "curvature"):
  """Raises a ValueError naming what does not match ``params``."""
  if not isinstance(curvature, KFACCurvature):
    raise ValueError(f"{name} must be a KFACCurvature from "
                     f"ewc_jax.kfac_fisher; got {type(curvature).__name__}.")
  leaves = jax.tree.leaves(params)
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  tree_lib.check_same_structure(
      "params", jax.tree.map(lambda x: 0, params), f"{name}.diagonal",
      jax.tree.map(lambda x: 0, curvature.diagonal, is_leaf=is_masked),
      check_shapes=False)
  for layer, f in zip(curvature.layers, curvature.factors):
    want = (layer.d_in + (layer.bias is not None), layer.d_out)
    shape = jnp.shape(leaves[layer.kernel_index])
    if layer.bias is not None and jnp.shape(
        leaves[layer.bias_index]) != (layer.d_out,):
      raise ValueError(
          f"{name}'s block for params{layer.bias} expects shape "
          f"({layer.d_out},); got {jnp.shape(leaves[layer.bias_index])}.")
    if (shape != ((layer.d_out, layer.d_in) if layer.transposed
                  else (layer.d_in, layer.d_out))
        or jnp.shape(f.a) != (want[0],) * 2
        or jnp.shape(f.g) != (want[1],) * 2):
      raise ValueError(
          f"{name}'s block for params{layer.kernel} (factors {jnp.shape(f.a)}"
          f", {jnp.shape(f.g)}) does not fit a parameter of shape {shape}.")


def kfac_penalty(params: Any, anchor: Any, curvature: KFACCurvature,
                 lam: float) -> jax.Array:
  r"""The Kronecker-factored EWC penalty as a pure function.

  .. math::
    \frac{\lambda}{2} \sum_{\text{layers}} \mathrm{vec}(D)^\top
    (A \otimes G)\, \mathrm{vec}(D)
    + \frac{\lambda}{2} \sum_{\text{other}} F\, d^2,

  computed as ``tr(D^T A D G)`` (never forming ``A kron G``), with
  ``D = [W - W*; b - b*]`` and ``d = theta - theta*`` elsewhere.
  ``jax.grad`` of it is the pull ``lam * A D G`` that :func:`kfac_ewc` adds.

  Args:
    params: the current parameters.
    anchor: the parameters after the old task.
    curvature: a :class:`KFACCurvature` from :func:`kfac_fisher`.
    lam: lambda >= 0.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: ``anchor`` or ``curvature`` not shaped like ``params`` (the
      path is named); a bad ``lam``; outside ``jax.jit``, a non-finite
      anchor or curvature, or a negative diagonal.
  """
  tree_lib.check_same_structure("params", params, "anchor", anchor)
  check_curvature(curvature, params)
  hyper_lib.check_lam(lam)
  tree_lib.check_finite("anchor", anchor)
  tree_lib.check_finite("curvature", curvature.factors)
  tree_lib.check_finite("curvature.diagonal", curvature.diagonal,
                        nonnegative=True)
  leaves, anchors = jax.tree.leaves(params), jax.tree.leaves(anchor)
  total = jnp.zeros([], jnp.float32)
  for layer, f in zip(curvature.layers, curvature.factors):
    d = layer_delta(layer, leaves, anchors)
    total = total + jnp.sum((f.a @ d) * (d @ f.g))
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  terms = jax.tree.map(
      lambda f, p, a: jnp.zeros([]) if is_masked(f) else jnp.sum(
          f * jnp.square(jnp.asarray(p, jnp.float32)
                         - jnp.asarray(a, jnp.float32))),
      curvature.diagonal, params, anchor, is_leaf=is_masked)
  total = total + sum(jax.tree.leaves(terms), jnp.zeros([], jnp.float32))
  return 0.5 * jnp.asarray(lam, jnp.float32) * total
