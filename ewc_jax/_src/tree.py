"""Pytree checks with errors that name the offending path."""

from typing import Any

import jax
import numpy as np


def _paths(tree: Any, is_leaf=None) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def check_same_structure(
    name_a: str, a: Any, name_b: str, b: Any, *, check_shapes: bool = True,
    is_leaf=None,
) -> None:
  """Raises a ValueError naming the first path where two pytrees differ.

  Args:
    name_a: name of the first tree in the message (e.g. ``"params"``).
    a: the first tree.
    name_b: name of the second tree in the message.
    b: the second tree.
    check_shapes: also compare the shapes of leaves at the same path.
    is_leaf: passed to ``jax.tree_util.tree_flatten_with_path``.
  """
  pa, pb = _paths(a, is_leaf), _paths(b, is_leaf)
  missing = [p for p in pa if p not in pb]
  extra = [p for p in pb if p not in pa]
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"{name_b} lacks {missing[:3]}")
    if extra:
      parts.append(f"{name_b} has {extra[:3]}, which {name_a} lacks")
    raise ValueError(
        f"{name_a} and {name_b} must have the same tree structure: "
        + "; ".join(parts) + ".")
  if jax.tree_util.tree_structure(a, is_leaf=is_leaf) != (
      jax.tree_util.tree_structure(b, is_leaf=is_leaf)):
    raise ValueError(
        f"{name_a} and {name_b} have the same leaf paths but different node "
        f"types: {jax.tree_util.tree_structure(a, is_leaf=is_leaf)} vs "
        f"{jax.tree_util.tree_structure(b, is_leaf=is_leaf)}.")
  if check_shapes:
    for path, leaf in pa.items():
      if is_leaf is not None and is_leaf(leaf):
        continue  # a placeholder leaf (e.g. optax.MaskedNode): no shape
      sa, sb = np.shape(leaf), np.shape(pb[path])
      if sa != sb:
        raise ValueError(
            f"{name_a}{path} has shape {sa} but {name_b}{path} has shape "
            f"{sb}.")


def is_concrete(x: Any) -> bool:
  """True when ``x`` holds a value (not a tracer inside jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_floating(name: str, tree: Any) -> None:
  """Raises a ValueError naming the first leaf whose dtype is not floating."""
  for path, leaf in _paths(tree).items():
    dtype = jax.numpy.result_type(getattr(leaf, "dtype", leaf))
    if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
      raise ValueError(f"{name}{path} has dtype {dtype}; expected a floating "
                       "dtype (float32, bfloat16, ...).")


def all_zero(tree: Any) -> bool:
  """True when every (concrete) leaf of ``tree`` is zero."""
  leaves = [x for x in jax.tree.leaves(tree) if is_concrete(x)]
  return bool(leaves) and all(not np.any(np.asarray(jax.device_get(x)))
                              for x in leaves)


def check_finite(name: str, tree: Any, *, nonnegative: bool = False,
                 hint: str = "") -> None:
  """Raises a ValueError naming the first leaf with a non-finite value.

  Tracers (values inside ``jax.jit``) are skipped: the check needs values.

  Args:
    name: the tree's name in the message (e.g. ``"params"``).
    tree: the tree to check.
    nonnegative: also refuse negative values.
    hint: appended to the non-finite message (what to do about it).
  """
  for path, leaf in _paths(tree).items():
    if not is_concrete(leaf):
      continue
    arr = np.asarray(jax.device_get(leaf), dtype=np.float64)
    if not np.all(np.isfinite(arr)):
      bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
      raise ValueError(
          f"{name}{path} has {bad} non-finite value(s) (nan or inf)."
          + (f" {hint}" if hint else ""))
    if nonnegative and np.any(arr < 0):
      raise ValueError(
          f"{name}{path} has negative values (min {arr.min():.3g}); a "
          "diagonal Fisher is a sum of squares and cannot be negative.")
