"""Checks around a Fisher pass: finiteness with blame, shapes, placement."""

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax._src import tree as tree_lib


def checked(fisher, finite, params, inputs):
  """The Fisher, or an error blaming the parameters, the data or the model.

  Args:
    fisher: the computed Fisher.
    finite: one flag per leaf of ``fisher`` (tracers: no check).
    params: the parameters it was taken at.
    inputs: the data inputs when at hand (arrays), else ``None``.

  Returns:
    ``fisher`` when every flag is set.

  Raises:
    ValueError: naming the first non-finite parameter leaf, else the data,
      else the Fisher's leaf.
  """
  flags = jax.tree.leaves(finite)
  if not all(tree_lib.is_concrete(f) for f in flags) or all(
      bool(f) for f in jax.device_get(flags)):
    return fisher
  _check_finite("params", params,
                "The Fisher is taken at these parameters and is non-finite "
                "too: fix the parameters (a diverged run?) first.")
  if inputs is not None:
    _check_finite("data inputs", inputs,
                  "The Fisher is non-finite: Check the data for nan/inf.")
  _check_finite("the Fisher", fisher,
                "The parameters are finite. Check the data for nan/inf and "
                "the model's logits (overflow?).")
  return fisher


def _check_finite(name, tree, advice):
  """``tree_lib.check_finite`` with ``advice`` appended to its error."""
  try:
    tree_lib.check_finite(name, tree)
  except ValueError as e:
    raise ValueError(f"{e} {advice}") from None


def num_params(params) -> int:
  """The number of parameters (static: works on tracers too)."""
  return sum(int(np.prod(jnp.shape(p))) for p in jax.tree.leaves(params))


def like(value, param):
  """`value` placed with `param`'s sharding (XLA may have chosen another)."""
  sharding = getattr(param, "sharding", None)
  if sharding is None or not isinstance(param, jax.Array) or (
      value.sharding.is_equivalent_to(sharding, param.ndim)):
    return value
  return jax.device_put(value, sharding)


_CLASSES: dict = {}  # (apply_fn, shapes) -> number of classes
_MAX_CLASSES = 64


def num_classes(apply_fn, params, inputs) -> int:
  key = (apply_fn, jax.tree.structure((params, inputs)),
         tuple((jnp.shape(a), jnp.result_type(a))
               for a in jax.tree.leaves(params)),
         tuple((jnp.shape(a)[1:], jnp.result_type(a))
               for a in jax.tree.leaves(inputs)))
  if key not in _CLASSES:
    if len(_CLASSES) >= _MAX_CLASSES:
      del _CLASSES[next(iter(_CLASSES))]
    _CLASSES[key] = count_classes(apply_fn, params, inputs)
  return _CLASSES[key]


def count_classes(apply_fn, params, inputs) -> int:
  out = jax.eval_shape(apply_fn, params, inputs)
  if not hasattr(out, "shape"):
    raise ValueError(
        "apply_fn(params, inputs) must return ONE logits array of shape "
        f"[batch, classes]; got a {type(out).__name__}.")
  if len(out.shape) != 2:
    raise ValueError(
        "apply_fn(params, inputs) must return logits of shape [batch, "
        f"classes]; got shape {out.shape}.")
  return out.shape[1]
