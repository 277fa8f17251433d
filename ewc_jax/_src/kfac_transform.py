"""The Kronecker-factored EWC pull as an optax gradient transformation."""

import math
import warnings
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from ewc_jax._src import kfac as kfac_lib
from ewc_jax._src import tree as tree_lib

MODES = ("separate", "online")

_NO_PARAMS_MSG = (
    "ewc_jax.kfac_ewc needs the current parameters: call "
    "`optimizer.update(grads, opt_state, params)`; params was None.")


class KFACEWCState(NamedTuple):
  """State of :func:`kfac_ewc`: past tasks folded into one quadratic.

  Per dense layer the precision is ``(A_sum kron G_sum) / weight``; every
  other leaf keeps a diagonal one. See :func:`kfac_ewc` for the recursion.

  Attributes:
    a: tuple of ``A_sum`` per layer, float32 ``[d_in (+1), d_in (+1)]``.
    g: tuple of ``G_sum`` per layer, float32 ``[d_out, d_out]``.
    weight: float32 scalar, the (gamma-discounted) number of tasks.
    diagonal: shaped like params: the summed diagonal Fisher of non-layer
      leaves, ``optax.MaskedNode()`` at layer leaves.
    anchor: shaped like params, float32: the quadratic's centre.
    lam: float32 scalar, the lambda of the last update.
    gamma: float32 scalar, online mode's decay.
    online: bool scalar, ``True`` in online mode.
    num_tasks: int32 scalar, tasks consolidated so far.
  """
  a: tuple
  g: tuple
  weight: jax.Array
  diagonal: Any
  anchor: Any
  lam: jax.Array
  gamma: jax.Array
  online: jax.Array
  num_tasks: jax.Array


def _is_masked(x):
  return isinstance(x, optax.MaskedNode)


def _flat(tree):
  """``({path: leaf}, [paths in order], treedef)``, MaskedNode skipped."""
  pl, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [jax.tree_util.keystr(p) for p, _ in pl]
  return dict(zip(paths, (x for _, x in pl))), paths, treedef


def _layer_paths(layers):
  return {ly.kernel for ly in layers} | {ly.bias for ly in layers
                                       if ly.bias is not None}


def _check_layers(layers):
  if not isinstance(layers, (tuple, list)) or not all(
      isinstance(ly, kfac_lib.DenseLayer) for ly in layers):
    raise ValueError(
        "layers must be a tuple of DenseLayer, from ewc_jax.dense_layers("
        "apply_fn, params, inputs) or kfac_fisher(...).layers; got "
        f"{type(layers).__name__}.")
  return tuple(layers)


def _delta(layer, p, c):
  """``D = [W - c_W; b - c_b]``, float32, from path dicts."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  d = f32(p[layer.kernel]) - f32(c[layer.kernel])
  if layer.transposed:
    d = d.T
  if layer.bias is not None:
    d = jnp.concatenate([d, (f32(p[layer.bias]) - f32(c[layer.bias]))[None]])
  return d


def kfac_ewc(
    lam: Union[float, jax.Array],
    layers: tuple,
    *,
    mode: str = "separate",
    gamma: float = 1.0,
) -> optax.GradientTransformation:
  r"""Adds the gradient of the Kronecker-factored EWC penalty to the updates.

  For a dense layer with ``D = [W; b] - [W*; b*]`` the penalty
  ``(lam/2) vec(D)^T (A kron G) vec(D) = (lam/2) tr(D^T A D G)`` has
  gradient ``lam * A D G``, which this adds to the updates (split back into
  the kernel and bias); other leaves get the diagonal pull
  ``lam * F * (theta - theta*)``. Put it first in a chain:
  ``optax.chain(kfac_ewc(lam, layers), optax.adam(lr))``.

  **Several tasks.** A sum of Kronecker products is not one, so both modes
  keep, per layer, the summed factors and a task weight,

  .. math::
    A_{sum} \leftarrow \gamma A_{sum} + A_t, \quad
    G_{sum} \leftarrow \gamma G_{sum} + G_t, \quad
    W \leftarrow \gamma W + 1,

  and use the precision ``(A_sum kron G_sum) / W = W (A_bar kron G_bar)``:
  ``W`` tasks' worth of the Kronecker factorisation of the *pooled* data
  (``A_bar``, ``G_bar`` the weighted means of the factors). This is KFAC's
  own independence assumption applied across tasks (``E[a a^T kron g g^T]
  ~ E[a a^T] kron E[g g^T]`` over the union of the tasks' examples); it is
  exact for one task and keeps O(1) memory, where the exact sum of per-task
  Kronecker terms would need O(T) (Ritter et al. 2018 discuss both).

  * ``"online"`` (Ritter, Botev & Barber 2018's online Laplace, with
    Schwarz et al.'s decay ``gamma``): one quadratic anchored at the latest
    task's parameters; diagonal leaves ``F* <- gamma F* + F_t``.
  * ``"separate"`` (Kirkpatrick et al.'s sum of per-task quadratics, with
    ``gamma = 1``): with every task's block replaced by the pooled one, the
    sum ``sum_k (theta - theta*_k)^T P (theta - theta*_k)`` is exactly
    ``T (theta - mean_k theta*_k)^T P (theta - mean_k theta*_k)`` plus a
    constant, so the layers are anchored at the mean of the task anchors;
    diagonal leaves fold exactly as in :func:`ewc_jax.ewc`.

  The state never changes shape, so a jitted step is traced once for all
  tasks. Anchors and diagonals take each parameter's sharding; the factors
  ``A``, ``G`` are per layer, placed by default (replicated) and the pull
  ``A D G`` is left to XLA's partitioner.

  Example:
    >>> import jax.numpy as jnp, optax, ewc_jax
    >>> params = {'w': jnp.zeros((2, 2))}
    >>> apply_fn = lambda p, x: x @ p['w']
    >>> x = jnp.eye(2)
    >>> curv = ewc_jax.kfac_fisher(apply_fn, params, (x, None))
    >>> opt = optax.chain(ewc_jax.kfac_ewc(1.0, curv.layers), optax.sgd(1.0))
    >>> state = ewc_jax.kfac_consolidate(opt.init(params), params, curv)
    >>> new = {'w': jnp.array([[1.0, 0.0], [0.0, 0.0]])}
    >>> u, state = opt.update({'w': jnp.zeros((2, 2))}, state, new)
    >>> print(u['w'] + 0.0)  # -A D G, A = I/2, G = [[1, -1], [-1, 1]] / 4
    [[-0.125  0.125]
     [ 0.     0.   ]]

  Args:
    lam: the strength lambda >= 0 (same convention as :func:`ewc_jax.ewc`).
    layers: the dense layers, ``kfac_fisher(...).layers`` or
      :func:`ewc_jax.dense_layers`; they fix the state's shapes.
    mode: ``"separate"`` or ``"online"``.
    gamma: online mode's decay in (0, 1]; must be 1 in separate mode.

  Returns:
    An :class:`optax.GradientTransformation` with a :class:`KFACEWCState`.

  References:
    Ritter, Botev & Barber, `Online Structured Laplace Approximations for
    Overcoming Catastrophic Forgetting <https://arxiv.org/abs/1805.07810>`_,
    NeurIPS 2018.
    Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015.
  """
  layers = _check_layers(layers)
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  if tree_lib.is_concrete(gamma):
    if not 0.0 < float(gamma) <= 1.0:
      raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}.")
    if mode == "separate" and float(gamma) != 1.0:
      raise ValueError('gamma decays old tasks only in mode="online"; got '
                       f'gamma={gamma!r} with mode="separate".')
  if tree_lib.is_concrete(lam) and not callable(lam):
    value = float(jnp.asarray(lam))
    if not math.isfinite(value) or value < 0:
      raise ValueError(f"lam must be a finite number >= 0, got {value}.")
  covered = _layer_paths(layers)

  def init_fn(params):
    p, _, _ = _flat(params)
    missing = sorted(covered - set(p))
    if missing:
      raise ValueError(f"params lacks the layer leaves {missing[:3]} that "
                       "kfac_ewc's layers name.")
    for ly in layers:
      want = (ly.d_out, ly.d_in) if ly.transposed else (ly.d_in, ly.d_out)
      if jnp.shape(p[ly.kernel]) != want:
        raise ValueError(
            f"params{ly.kernel} has shape {jnp.shape(p[ly.kernel])}; the "
            f"layer expects {want}.")
    zeros = lambda x: jnp.zeros_like(x, jnp.float32)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    diagonal = jax.tree.unflatten(treedef, [
        optax.MaskedNode() if jax.tree_util.keystr(k) in covered else zeros(x)
        for k, x in flat])
    return KFACEWCState(
        a=tuple(jnp.zeros([ly.d_in + (ly.bias is not None)] * 2, jnp.float32)
                for ly in layers),
        g=tuple(jnp.zeros([ly.d_out] * 2, jnp.float32) for ly in layers),
        weight=jnp.zeros([], jnp.float32), diagonal=diagonal,
        anchor=jax.tree.map(zeros, params),
        lam=jnp.asarray(lam, jnp.float32),
        gamma=jnp.asarray(gamma, jnp.float32),
        online=jnp.asarray(mode == "online"),
        num_tasks=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(_NO_PARAMS_MSG)
    try:  # shapes are static: checked once per trace under jit
      tree_lib.check_same_structure("the kfac_ewc state", state.anchor,
                                    "params", params)
      tree_lib.check_same_structure("params", params, "updates", updates)
    except ValueError as e:
      raise ValueError(
          f"kfac_ewc update got params unlike those given to init: {e}"
      ) from e
    lam_f32 = jnp.asarray(lam, jnp.float32)
    p, _, _ = _flat(params)
    c, _, _ = _flat(state.anchor)
    u, paths, treedef = _flat(updates)
    scale = lam_f32 * jnp.where(state.weight > 0, 1.0 / state.weight, 0.0)
    pulls = {}
    for ly, a, g in zip(layers, state.a, state.g):
      pull_w, pull_b = kfac_lib.split_delta(
          ly, scale * (a @ _delta(ly, p, c) @ g))
      pulls[ly.kernel] = pull_w
      if ly.bias is not None:
        pulls[ly.bias] = pull_b
    f, _, _ = _flat(state.diagonal)
    for path, fi in f.items():
      pulls[path] = lam_f32 * fi * (jnp.asarray(p[path], jnp.float32)
                                    - c[path])
    new = [u[k] if k not in pulls else
           (u[k].astype(jnp.float32) + pulls[k]).astype(u[k].dtype)
           for k in paths]
    return jax.tree.unflatten(treedef, new), state._replace(
        lam=lam_f32, gamma=jnp.asarray(gamma, jnp.float32))

  return optax.GradientTransformation(init_fn, update_fn)


def _is_state(x):
  return isinstance(x, KFACEWCState)


def _fold(s: KFACEWCState, params, curvature) -> KFACEWCState:
  """Folds one finished task (anchor ``params``) into ``s``."""
  if len(s.a) != len(curvature.factors) or any(
      a.shape != f.a.shape or g.shape != f.g.shape
      for a, g, f in zip(s.a, s.g, curvature.factors)):
    raise ValueError(
        "curvature's Kronecker factors "
        f"{[(f.a.shape, f.g.shape) for f in curvature.factors]} do not match "
        f"the kfac_ewc state's {[(a.shape, g.shape) for a, g in zip(s.a, s.g)]}"
        "; build kfac_ewc with this curvature's layers.")
  tree_lib.check_same_structure(
      "the kfac_ewc state's diagonal", s.diagonal, "curvature.diagonal",
      curvature.diagonal, is_leaf=_is_masked)
  decay = jnp.where(s.online, s.gamma, 1.0)
  count = (s.num_tasks + 1).astype(jnp.float32)
  f32 = lambda x: jnp.asarray(x, jnp.float32)

  def anchor(c, p, f, fs):
    if _is_masked(f):  # a layer leaf: latest (online) or mean (separate)
      return jnp.where(s.online, f32(p), c + (f32(p) - c) / count)
    total = fs + f32(f)
    share = f32(f) / jnp.where(total > 0, total, 1.0)
    separate = jnp.where(total > 0, c + share * (f32(p) - c), f32(p))
    return jnp.where(s.online, f32(p), separate)

  new_anchor = jax.tree.map(anchor, s.anchor, params, curvature.diagonal,
                            s.diagonal, is_leaf=_is_masked)
  diagonal = jax.tree.map(
      lambda fs, f: fs if _is_masked(fs) else decay * fs + f32(f),
      s.diagonal, curvature.diagonal, is_leaf=_is_masked)
  return s._replace(
      a=tuple(decay * a + f.a for a, f in zip(s.a, curvature.factors)),
      g=tuple(decay * g + f.g for g, f in zip(s.g, curvature.factors)),
      weight=decay * s.weight + 1.0, diagonal=diagonal, anchor=new_anchor,
      num_tasks=s.num_tasks + 1)


def kfac_consolidate(opt_state: Any, params: Any,
                     curvature: kfac_lib.KFACCurvature) -> Any:
  """Folds a finished task into every :func:`kfac_ewc` state in opt_state.

  The state is found wherever it sits (``optax.chain``,
  ``optax.inject_hyperparams``, :func:`synaptic_intelligence`, ...; not
  under ``optax.masked``: the ``layers`` already choose the leaves). Shapes
  never change, so a jitted step taking ``opt_state`` is not retraced; this may
  itself run under ``jax.jit`` (value checks are then skipped).

  Args:
    opt_state: an optimiser state holding one or more :func:`kfac_ewc`
      states.
    params: the parameters at the end of the task (the anchor).
    curvature: the task's :class:`KFACCurvature` from :func:`kfac_fisher`.

  Returns:
    ``opt_state`` with the task folded in.

  Raises:
    ValueError: no kfac_ewc state; a curvature that does not fit ``params``
      or the state (the path or shapes are named); non-finite values.
  """
  if not any(_is_state(x)
             for x in jax.tree.leaves(opt_state, is_leaf=_is_state)):
    raise ValueError(
        "kfac_consolidate found no ewc_jax.kfac_ewc state in opt_state; build "
        "the optimiser with optax.chain(ewc_jax.kfac_ewc(lam, layers), ...).")
  kfac_lib.check_curvature(curvature, params)
  tree_lib.check_floating("params", params)
  tree_lib.check_finite("params", params)
  tree_lib.check_finite("curvature", curvature.factors)
  tree_lib.check_finite("curvature.diagonal", jax.tree.leaves(
      curvature.diagonal), nonnegative=True)
  if tree_lib.all_zero((curvature.factors, jax.tree.leaves(
      curvature.diagonal))):
    warnings.warn("kfac_consolidate got a curvature that is zero everywhere: "
                  "this task adds no penalty.", stacklevel=2)
  return jax.tree.map(
      lambda s: _fold(s, params, curvature) if _is_state(s) else s,
      opt_state, is_leaf=_is_state)
