"""Pytrees matched by path, and checks whose errors name the path.

Users hold their parameters in many containers: plain dicts, Linen's
``FrozenDict``, Flax NNX's ``nnx.State`` of ``Param`` (or of ``LoRAParam``),
the ``OptVariable``/``OptArray`` wrappers of ``nnx.Optimizer``'s state, and
``nnx.to_pure_dict`` of any of these. Their leaves have the same *paths*
(``['layer']['kernel']``) but different node types, so the library pairs
trees by path, never by tree structure: :func:`path_str` drops the
``.value`` step of an NNX variable, and every result keeps the structure of
the tree it was computed for (a state stays a state of ``OptVariable``).
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The last step of an NNX variable's path (`Variable.value`): dropped, so
# that a Param, an OptVariable and a plain array at one place match.
_WRAPPER_KEYS = ("value", "raw_value")


def is_masked(x: Any) -> bool:
  """``optax.MaskedNode``: a leaf (or subtree) that ``optax.masked`` drops."""
  return isinstance(x, optax.MaskedNode)


def _masked_or_none(x: Any) -> bool:
  return x is None or is_masked(x)


def path_str(path: tuple) -> str:
  """``keystr(path)`` without the trailing ``.value`` of an NNX variable."""
  keys = list(path)
  while keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and (
      keys[-1].name in _WRAPPER_KEYS):
    keys.pop()
  return jax.tree_util.keystr(tuple(keys))


def leaves_by_path(tree: Any, is_leaf=None) -> dict[str, Any]:
  """``{path_str: leaf}``, in flattening order."""
  pairs, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {path_str(p): x for p, x in pairs}


def _under(path: str, prefixes: list[str]) -> bool:
  return any(path.startswith(m) and path[len(m):len(m) + 1] in ("[", ".")
             for m in prefixes)


_HINT = (" Pass trees with the same leaf paths as the parameters the "
         "optimiser was initialised with (with Flax NNX: nnx.state(model, "
         "nnx.Param), the filter nnx.Optimizer's wrt names, or "
         "nnx.to_pure_dict of it).")


def map_by_path(fn: Callable, names: tuple, template: Any, *trees: Any,
                check_shapes: bool = True, extra_ok: bool = False,
                hint: str = "") -> Any:
  """``fn(t, *others)`` for each leaf of ``template``, paired by path.

  The result has ``template``'s structure (NNX wrappers included). Leaves of
  ``template`` that are ``None`` or ``optax.MaskedNode`` are kept as they
  are; the other trees are looked up at their paths only.

  Args:
    fn: called with one leaf of ``template`` and the leaves of ``trees`` at
      the same path.
    names: the trees' names in errors, ``template``'s first.
    template: the tree whose structure the result takes.
    *trees: trees holding (at least) ``template``'s paths.
    check_shapes: refuse leaves of different shapes at one path.
    extra_ok: accept paths in ``trees`` that ``template`` lacks (a state
      that regularises only some of the parameters, e.g. LoRA adapters).
    hint: appended to a missing-path error (what to pass instead).

  Raises:
    ValueError: naming the first path that a tree lacks (or has, without
      ``extra_ok``) and the shapes that differ.
  """
  pairs, treedef = jax.tree_util.tree_flatten_with_path(
      template, is_leaf=_masked_or_none)
  paths = [path_str(p) for p, _ in pairs]
  masked = [q for q, (_, x) in zip(paths, pairs) if is_masked(x)]
  lookups = [leaves_by_path(t, is_leaf=is_masked) for t in trees]
  wanted = [q for q, (_, x) in zip(paths, pairs) if not _masked_or_none(x)]
  for name, found in zip(names[1:], lookups):
    missing = [q for q in wanted if q not in found]
    if missing:
      raise ValueError(
          f"{name} lacks {missing[:3]}, which {names[0]} holds: trees are "
          f"matched by path.{hint or _HINT}")
    if not extra_ok:
      known = set(paths)
      extra = [q for q in found if q not in known and not _under(q, masked)]
      if extra:
        raise ValueError(
            f"{name} has {extra[:3]}, which {names[0]} lacks.{hint or _HINT}")
  out = []
  for q, (_, x) in zip(paths, pairs):
    if _masked_or_none(x):
      out.append(x)
      continue
    others = [found[q] for found in lookups]
    if check_shapes:
      for name, o in zip(names[1:], others):
        if not is_masked(o) and np.shape(o) != np.shape(x):
          raise ValueError(
              f"{names[0]}{q} has shape {np.shape(x)} but {name}{q} has "
              f"shape {np.shape(o)}.")
    out.append(fn(x, *others))
  return jax.tree_util.tree_unflatten(treedef, out)


def check_same_structure(name_a: str, a: Any, name_b: str, b: Any, *,
                         check_shapes: bool = True) -> None:
  """Raises a ValueError naming the first path where two pytrees differ.

  Trees are compared by leaf path (:func:`path_str`), so an ``nnx.State``
  of ``Param`` and its pure dict agree.
  """
  map_by_path(lambda *_: None, (name_a, name_b), a, b,
              check_shapes=check_shapes)


def value(x: Any) -> Any:
  """An array, or the one leaf of a wrapper around it (an NNX variable)."""
  leaves = jax.tree.leaves(x)
  if len(leaves) != 1 or leaves[0] is x:  # many leaves, or a leaf itself
    return x
  return leaves[0]


def rewrap(old: Any, new: Any) -> Any:
  """``new`` in ``old``'s wrapper (an NNX variable), or ``new`` itself."""
  if value(old) is old:
    return new
  return jax.tree.unflatten(jax.tree.structure(old), [new])


def same_structure(a: Any, b: Any) -> bool:
  """Whether two pytrees have the same structure (node types included)."""
  ta: Any = jax.tree.structure(a)
  return bool(ta == jax.tree.structure(b))


def is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def is_concrete(x: Any) -> bool:
  """True when ``x`` holds a value (not a tracer inside jit/vmap/grad)."""
  return not is_tracer(x)


def num_params(params: Any) -> int:
  """The number of parameters (static: works on tracers too)."""
  return sum(int(np.prod(jnp.shape(p))) for p in jax.tree.leaves(params))


def sum_leaves(tree: Any) -> jax.Array:
  """The float32 sum of every element of a tree; zero for an empty tree."""
  return jnp.asarray(optax.tree_utils.tree_sum(tree), jnp.float32)


def check_floating(name: str, tree: Any) -> None:
  """Raises a ValueError naming the first leaf whose dtype is not floating."""
  for path, leaf in leaves_by_path(tree).items():
    dtype = jnp.result_type(getattr(leaf, "dtype", leaf))
    if not jnp.issubdtype(dtype, jnp.floating):
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
  for path, leaf in leaves_by_path(tree).items():
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


def place_like(value_: Any, param: Any) -> Any:
  """``value_`` placed with ``param``'s sharding (XLA may choose another)."""
  sharding = getattr(param, "sharding", None)
  if sharding is None or not isinstance(param, jax.Array) or (
      value_.sharding.is_equivalent_to(sharding, param.ndim)):
    return value_
  return jax.device_put(value_, sharding)


def find(tree: Any, cls: type, is_node: Optional[Callable] = None) -> list:
  """Every node of type ``cls`` in ``tree`` (an optimiser state, say)."""
  is_node = is_node or (lambda x: isinstance(x, cls))
  return [x for x in jax.tree.leaves(tree, is_leaf=is_node)
          if isinstance(x, cls)]
