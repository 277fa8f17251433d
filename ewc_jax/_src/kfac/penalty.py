"""The Kronecker-factored EWC penalty as a pure function."""

from typing import Any

import jax
import jax.numpy as jnp

from ewc_jax._src import tree as tree_lib
from ewc_jax._src import validate
from ewc_jax._src.kfac import fisher as fisher_lib
from ewc_jax._src.kfac import packing


def kfac_penalty(params: Any, anchor: Any,
                 curvature: fisher_lib.KFACCurvature,
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
    anchor: the parameters after the old task (matched by path, as
      ``params``: NNX states and pure dicts alike).
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
  fisher_lib.check_curvature(curvature, params)
  validate.check_lam(lam)
  tree_lib.check_finite("anchor", anchor)
  tree_lib.check_finite("curvature", curvature.factors)
  tree_lib.check_finite("curvature.diagonal", curvature.diagonal,
                        nonnegative=True)
  leaves = tree_lib.leaves_by_path(params)
  anchors = tree_lib.leaves_by_path(anchor)
  total = jnp.zeros([], jnp.float32)
  for layer, f in zip(curvature.layers, curvature.factors):
    d = packing.matrix(layer, leaves) - packing.matrix(layer, anchors)
    total = total + jnp.sum((f.a @ d) * (d @ f.g))
  terms = tree_lib.map_by_path(
      lambda f, p, a: jnp.sum(f * jnp.square(
          jnp.asarray(p, jnp.float32) - jnp.asarray(a, jnp.float32))),
      ("curvature.diagonal", "params", "anchor"), curvature.diagonal,
      params, anchor, check_shapes=False)
  total = total + tree_lib.sum_leaves(terms)
  return 0.5 * jnp.asarray(lam, jnp.float32) * total
