"""The state of :func:`ewc_jax.kfac_ewc`, and its two ways to store tasks.

Per held dense layer the state keeps Kronecker factors; how depends on a
*store*, chosen once by ``kfac_ewc`` and kept static in the state:

* :class:`Pooled` (``max_tasks=None``, online mode only): the decayed sums
  ``A_sum``, ``G_sum`` and the decayed task count ``W``; the precision is
  ``(A_sum kron G_sum) / W``. O(1) memory.
* :class:`PerTask` (``max_tasks`` an int): each task's ``A_k``, ``G_k`` in
  the slot of its consolidation, its weight (online ``gamma ** age``,
  separate 1, empty slots 0) and, in separate mode, its anchor
  ``[W*_k; b*_k]``; the pull sums the exact per-task terms.

Each store says how to allocate, pull and fold, so that no other code
tells the layouts apart.
"""

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ewc_jax._src import states as states_lib
from ewc_jax._src import tree as tree_lib
from ewc_jax._src.kfac import packing
from ewc_jax._src.types import mode_tag


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Pooled:
  """Pooled factors: ``A_sum``, ``G_sum`` and the decayed task count."""
  capacity = None

  def allocate(self, layer, separate: bool):
    del separate
    n, d = packing.rows(layer), layer.d_out
    return (jnp.zeros((n, n), jnp.float32), jnp.zeros((d, d), jnp.float32),
            None)

  def weight(self):
    return jnp.zeros([], jnp.float32)

  def pull(self, s, i, theta, centre):
    """The gradient of layer ``i``'s penalty over lam, ``n x d_out``."""
    w = s.weight
    return (s.a[i] @ (theta - centre) @ s.g[i]) * jnp.where(
        w > 0, 1.0 / w, 0.0)

  def fold(self, s, factors, matrices, decay):
    """``(a, g, weight, task_anchor, ok)`` after one more task."""
    del matrices
    a = tuple(decay * a + f.a for a, f in zip(s.a, factors))
    g = tuple(decay * g + f.g for g, f in zip(s.g, factors))
    return a, g, decay * s.weight + 1.0, s.task_anchor, None


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class PerTask:
  """One exact Kronecker term per task, in ``capacity`` preallocated slots."""
  capacity: int
  separate: bool

  def allocate(self, layer, separate: bool):
    n, d, t = packing.rows(layer), layer.d_out, self.capacity
    return (jnp.zeros((t, n, n), jnp.float32),
            jnp.zeros((t, d, d), jnp.float32),
            jnp.zeros((t, n, d), jnp.float32) if separate else None)

  def weight(self):
    return jnp.zeros([self.capacity], jnp.float32)

  def pull(self, s, i, theta, centre):
    a, g, w = s.a[i], s.g[i], s.weight

    def term(k, acc):  # + w_k A_k (theta - theta*_k) G_k
      d = theta - (s.task_anchor[i][k] if self.separate else centre)
      return acc + (a[k] @ d) @ (w[k] * g[k])

    # Only the filled slots: the cost grows with the tasks consolidated.
    filled = jnp.minimum(s.kfac_num_tasks, self.capacity)
    return jax.lax.fori_loop(0, filled, term, jnp.zeros_like(theta))

  def fold(self, s, factors, matrices, decay):
    slot = jnp.minimum(s.kfac_num_tasks, self.capacity - 1)
    put = lambda stack, x: jax.lax.dynamic_update_index_in_dim(  # noqa: E731
        stack, states_lib.f32(x), slot, 0)
    ok = s.kfac_num_tasks < self.capacity  # overflow under jit: poisoned
    a = tuple(put(a, f.a) for a, f in zip(s.a, factors))
    g = tuple(put(g, f.g) for g, f in zip(s.g, factors))
    weight = states_lib.poison(ok, put(decay * s.weight,
                                       jnp.ones([], jnp.float32)))
    task_anchor = tuple(put(t, m) for t, m in zip(s.task_anchor, matrices))
    return a, g, weight, task_anchor, ok


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class StaticLayers:
  """The dense layers a :class:`KFACEWCState` holds blocks for, and how.

  Static (part of the state's structure, not a leaf), like
  :class:`ewc_jax.EWCState`'s mode.

  Attributes:
    layers: a tuple of :class:`ewc_jax.DenseLayer`.
    store: :class:`Pooled` or :class:`PerTask`.
  """
  layers: tuple
  store: Any = Pooled()


class KFACEWCState(NamedTuple):
  """State of :func:`kfac_ewc`: the past tasks' Kronecker-factored curvature.

  Per held dense layer ``i`` (``layers.layers[i]``), with ``n = d_in (+1)``
  (the homogeneous coordinate when the layer has a bias) and ``T`` the
  ``max_tasks`` of :func:`kfac_ewc`:

  * per-task store (``max_tasks`` an int): ``a[i]`` ``[T, n, n]`` and
    ``g[i]`` ``[T, d_out, d_out]`` hold each task's factors in the slot of
    its consolidation (zeros in empty slots), ``weight`` ``[T]`` each task's
    weight (online: ``gamma ** age``; separate: 1; empty slots: 0), and in
    separate mode ``task_anchor[i]`` ``[T, n, d_out]`` each task's
    ``[W*; b*]``;
  * pooled (``max_tasks=None``, online mode only): ``a[i]`` ``[n, n]`` and
    ``g[i]`` ``[d_out, d_out]`` are the decayed sums of the factors,
    ``weight`` a scalar (the decayed number of tasks), ``task_anchor = ()``.

  Field names differ from :class:`ewc_jax.EWCState`'s, so that
  ``optax.tree_utils.tree_get(opt_state, "kfac_gamma")`` and
  ``tree_get(opt_state, "gamma")`` (``num_tasks``, ``mode``) stay
  unambiguous in a chain that holds both. As there, ``lam`` is no field:
  it is an argument of :func:`kfac_ewc` (injectable with
  ``optax.inject_hyperparams``).

  Attributes:
    a: tuple of ``A`` factors per held layer, float32 (see above).
    g: tuple of ``G`` factors per held layer, float32.
    weight: float32, the task weights (see above).
    task_anchor: tuple of ``[T, n, d_out]`` per held layer (separate mode),
      else ``()``.
    diagonal: shaped like the (masked) params: the summed diagonal Fisher of
      non-layer leaves (online: ``gamma``-decayed); ``optax.MaskedNode()`` at
      layer leaves and at leaves that ``optax.masked`` leaves out.
    anchor: shaped like the (masked) params, float32: the diagonal
      quadratic's centre at non-layer leaves (as :class:`ewc_jax.EWCState`'s
      ``center``), the latest task's parameters at layer leaves (online
      mode's anchor; separate mode anchors at ``task_anchor``).
    kfac_gamma: float32 scalar, online mode's decay, read by
      :func:`kfac_consolidate` only (separate mode ignores it: 1).
    kfac_num_tasks: int32 scalar, tasks consolidated so far (more than
      ``max_tasks`` only in a state poisoned by an overflow under jit).
    kfac_mode: ``"separate"`` or ``"online"``, static (a leafless tag that
      equals the string, as :class:`ewc_jax.EWCState`'s ``mode``).
    layers: the held dense layers and their store, a :class:`StaticLayers`.
  """
  a: tuple
  g: tuple
  weight: jax.Array
  task_anchor: tuple
  diagonal: Any
  anchor: Any
  kfac_gamma: jax.Array
  kfac_num_tasks: jax.Array
  kfac_mode: Any
  layers: StaticLayers


def register_flax_serialization() -> None:
  """Lets ``flax.serialization`` round-trip states holding layers.

  :class:`StaticLayers` is static structure, restored from the target state
  (as orbax does); flax's msgpack needs to be told. A no-op without flax.
  """
  try:
    from flax import serialization  # noqa: PLC0415 (optional)
  except ImportError:
    return
  serialization.register_serialization_state(
      StaticLayers, lambda x: {}, lambda target, state: target,
      override=True)


def store_for(max_tasks: Optional[int], separate: bool):
  return Pooled() if max_tasks is None else PerTask(max_tasks, separate)


def _flat_masked(tree):
  """``([(path, leaf)], treedef)`` with ``optax.MaskedNode`` as a leaf."""
  pl, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=tree_lib.is_masked)
  return [(tree_lib.path_str(p), x) for p, x in pl], treedef


def held_layers(layers, params) -> tuple:
  """The layers whose leaves ``optax.masked`` keeps; clear errors else."""
  pairs, _ = _flat_masked(params)
  leaves = dict(pairs)
  masked = [p for p, x in pairs if tree_lib.is_masked(x)]

  def is_masked(path):  # the leaf itself or a masked subtree above it
    return any(path == m or (path.startswith(m) and path[len(m)] in "[.")
               for m in masked)

  held = []
  for ly in layers:
    paths = packing.paths(ly)
    out = [is_masked(q) for q in paths]
    if all(out):
      continue
    if any(out):
      raise ValueError(
          f"optax.masked keeps params{paths[out.index(False)]} but masks "
          f"params{paths[out.index(True)]} out: kfac_ewc's Kronecker block "
          "covers a dense layer's kernel and bias together; mask both or "
          "neither.")
    packing.check_leaves(ly, leaves)
    held.append(ly)
  return tuple(held)


def init(layers, params, mode: str, gamma: float, store) -> KFACEWCState:
  """A fresh state for ``params`` (MaskedNode where ``optax.masked`` drops)."""
  held = held_layers(layers, params)
  covered = packing.covered(held)
  pairs, treedef = _flat_masked(params)
  zeros = lambda x: jnp.zeros_like(x, jnp.float32)  # noqa: E731
  diagonal = treedef.unflatten([
      x if tree_lib.is_masked(x) else
      optax.MaskedNode() if k in covered else zeros(x) for k, x in pairs])
  anchor = treedef.unflatten([x if tree_lib.is_masked(x) else zeros(x)
                              for _, x in pairs])
  separate = mode == "separate"
  blocks = [store.allocate(ly, separate) for ly in held]
  return KFACEWCState(
      a=tuple(b[0] for b in blocks), g=tuple(b[1] for b in blocks),
      weight=store.weight(),
      task_anchor=tuple(b[2] for b in blocks) if separate else (),
      diagonal=diagonal, anchor=anchor,
      kfac_gamma=jnp.asarray(gamma, jnp.float32),
      kfac_num_tasks=jnp.zeros([], jnp.int32),
      kfac_mode=mode_tag(mode), layers=StaticLayers(held, store))
