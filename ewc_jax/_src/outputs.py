"""What a model returns and what its labels must be; blame for a bad Fisher.

A categorical model's ``apply_fn(params, inputs)`` returns logits
``[batch, classes]`` (a classifier) or ``[batch, *positions, classes]`` (a
sequence model: ``[batch, T, vocab]``), and its labels are class indices
shaped like the logits without the class axis. Every check raises one line
that names what is wrong.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ewc_jax._src import tree as tree_lib
from ewc_jax._src.jaxpr import walker


class Logits(NamedTuple):
  """The shape of a model's output, per example.

  Attributes:
    positions: ``()`` for a classifier, ``(T,)`` for a sequence model.
    classes: the size of the last (class) axis.
  """
  positions: tuple
  classes: int


def _logits(apply_fn, params, inputs) -> Logits:
  out = jax.eval_shape(apply_fn, params, inputs)
  if not hasattr(out, "shape"):
    raise ValueError(
        "apply_fn(params, inputs) must return ONE logits array of shape "
        f"[batch, classes] (or [batch, T, vocab]); got a "
        f"{type(out).__name__}: pick the logits out of it in apply_fn.")
  rows = jax.tree.leaves(inputs)[0].shape[0]
  if len(out.shape) < 2:
    raise ValueError(
        "apply_fn(params, inputs) must return logits of shape [batch, "
        f"classes] or [batch, T, vocab]; got shape {out.shape}.")
  if out.shape[0] != rows:
    raise ValueError(
        f"apply_fn(params, inputs) returned {out.shape[0]} rows of logits for "
        f"{rows} inputs (shape {out.shape}); it must return one row per "
        "example, in order.")
  return Logits(tuple(out.shape[1:-1]), int(out.shape[-1]))


def logits(apply_fn, params, inputs) -> Logits:
  """The (cached) :class:`Logits` of ``apply_fn`` on inputs like these."""
  example = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)),
      inputs)
  return walker.cached("logits", apply_fn, params, example,
                       lambda: _logits(apply_fn, params, inputs))


def check_label_shape(labels, positions: tuple = (),
                      name: str = "labels") -> None:
  """Labels are class indices: ``[N]`` (a classifier), ``[N, *positions]``."""
  shape = tuple(jnp.shape(labels))
  if len(shape) != 1 + len(positions) or shape[1:] != tuple(positions):
    want = ("a 1-D array of class indices [N]" if not positions else
            "an array of class indices "
            f"[N, {', '.join(map(str, positions))}]")
    hint = (" Flatten them with labels.reshape(-1)."
            if not positions and len(shape) == 2 and shape[1] == 1 else "")
    raise ValueError(
        f"{name} must be {want} (the logits' shape without the class "
        f"axis); got shape {shape}.{hint}")
  dtype = jnp.result_type(labels)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{name} must be integers (class indices); got dtype "
                     f"{dtype}.")


def check_mask(mask, positions: tuple) -> None:
  """A token mask is shaped like the labels: booleans (or 0/1 numbers)."""
  shape = tuple(jnp.shape(mask))
  if len(shape) != 1 + len(positions) or shape[1:] != tuple(positions):
    want = ", ".join(["N"] + [str(p) for p in positions])
    raise ValueError(
        f"mask must be [{want}] (the logits' shape without the class axis: "
        f"one flag per position); got shape {shape}.")
  dtype = jnp.result_type(mask)
  if not (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(
      dtype, jnp.number)):
    raise ValueError(f"mask must be booleans (or 0/1 numbers); got dtype "
                     f"{dtype}.")


def check_label_range(low, high, num_classes: int,
                      name: str = "labels") -> None:
  """Raises when the (concrete) label range leaves ``[0, num_classes)``."""
  if not (tree_lib.is_concrete(low) and tree_lib.is_concrete(high)):
    return
  low, high = int(low), int(high)
  if low < 0 or high >= num_classes:
    raise ValueError(
        f"{name} must lie in [0, {num_classes}) (the number of logits); got "
        f"values in [{low}, {high}].")


def _check_finite(name, tree, advice):
  """``tree_lib.check_finite`` with ``advice`` appended to its error."""
  try:
    tree_lib.check_finite(name, tree)
  except ValueError as e:
    raise ValueError(f"{e} {advice}") from None


def blame_nonfinite(fisher, finite, params, inputs) -> Any:
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


def finish(fisher, finite, params, inputs) -> Any:
  """The Fisher placed like ``params``, checked (:func:`blame_nonfinite`)."""
  fisher = jax.tree.map(tree_lib.place_like, fisher, params)
  return blame_nonfinite(fisher, finite, params, inputs)
