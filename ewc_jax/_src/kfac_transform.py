"""The Kronecker-factored EWC pull as an optax gradient transformation."""

import dataclasses
import numbers
import warnings
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ewc_jax._src import hyperparams as hyper_lib
from ewc_jax._src import kfac as kfac_lib
from ewc_jax._src import tree as tree_lib
from ewc_jax._src.types import MODE_NAMES
from ewc_jax._src.types import Mode
from ewc_jax._src.types import StaticStr

MODES = MODE_NAMES

# optax.inject_hyperparams turns numbers into arrays; these two fix shapes
# or are consolidation data, so they must stay Python numbers.
_STATIC_ARGS = "('gamma', 'max_tasks')"

_NO_PARAMS_MSG = (
    "ewc_jax.kfac_ewc needs the current parameters: call "
    "`optimizer.update(grads, opt_state, params)`; params was None.")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class StaticLayers:
  """The dense layers a :class:`KFACEWCState` holds blocks for.

  Static (part of the state's structure, not a leaf), like
  :class:`ewc_jax.EWCState`'s mode: :func:`kfac_consolidate` reads it to
  pair the curvature's blocks with the state's.

  Attributes:
    layers: a tuple of :class:`ewc_jax.DenseLayer`.
  """
  layers: tuple


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
    kfac_mode: ``"separate"`` or ``"online"``, static (a
      :class:`ewc_jax.types.StaticStr`).
    layers: the held dense layers, a :class:`StaticLayers`.
  """
  a: tuple
  g: tuple
  weight: jax.Array
  task_anchor: tuple
  diagonal: Any
  anchor: Any
  kfac_gamma: jax.Array
  kfac_num_tasks: jax.Array
  kfac_mode: StaticStr
  layers: StaticLayers


def _is_masked(x):
  return isinstance(x, optax.MaskedNode)


def _flat(tree):
  """``({path: leaf}, [paths in order], treedef)``, MaskedNode skipped."""
  pl, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [jax.tree_util.keystr(p) for p, _ in pl]
  return dict(zip(paths, (x for _, x in pl))), paths, treedef


def _flat_masked(tree):
  """``([(path, leaf)], treedef)`` with ``optax.MaskedNode`` as a leaf."""
  pl, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)
  return [(jax.tree_util.keystr(p), x) for p, x in pl], treedef


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


def _check_max_tasks(max_tasks):
  if max_tasks is None:
    return None
  if isinstance(max_tasks, (jax.Array, np.ndarray, jax.core.Tracer)):
    raise TypeError(
        "max_tasks arrived as an array: it fixes the state's shapes. With "
        "optax.inject_hyperparams list it as static (static_args="
        f"{_STATIC_ARGS}).")
  if (isinstance(max_tasks, bool) or not isinstance(max_tasks,
                                                    numbers.Integral)
      or max_tasks < 1):
    raise ValueError(f"max_tasks must be None or an int >= 1, got "
                     f"{max_tasks!r}.")
  return int(max_tasks)


def _n_a(layer):
  return layer.d_in + (layer.bias is not None)


def _matrix(layer, leaves):
  """``[W; b]`` as ``(d_in (+1)) x d_out`` float32, from a path dict."""
  w = jnp.asarray(leaves[layer.kernel], jnp.float32)
  if layer.transposed:
    w = w.T
  if layer.bias is not None:
    w = jnp.concatenate([w, jnp.asarray(leaves[layer.bias],
                                        jnp.float32)[None]])
  return w


def _held_layers(layers, params):
  """The layers whose leaves ``optax.masked`` keeps; clear errors else."""
  pairs, _ = _flat_masked(params)
  leaves = dict(pairs)
  masked = [p for p, x in pairs if _is_masked(x)]

  def is_masked(path):  # the leaf itself or a masked subtree above it
    return any(path == m or (path.startswith(m) and path[len(m)] in "[.")
               for m in masked)

  held = []
  for ly in layers:
    paths = [ly.kernel] + ([ly.bias] if ly.bias is not None else [])
    out = [is_masked(q) for q in paths]
    if all(out):
      continue
    if any(out):
      raise ValueError(
          f"optax.masked keeps params{paths[out.index(False)]} but masks "
          f"params{paths[out.index(True)]} out: kfac_ewc's Kronecker block "
          "covers a dense layer's kernel and bias together; mask both or "
          "neither.")
    missing = [q for q in paths if q not in leaves]
    if missing:
      raise ValueError(f"params lacks the layer leaves {missing[:3]} that "
                       "kfac_ewc's layers name.")
    want = (ly.d_out, ly.d_in) if ly.transposed else (ly.d_in, ly.d_out)
    if jnp.shape(leaves[ly.kernel]) != want:
      raise ValueError(
          f"params{ly.kernel} has shape {jnp.shape(leaves[ly.kernel])}; the "
          f"layer expects {want}.")
    if ly.bias is not None and jnp.shape(leaves[ly.bias]) != (ly.d_out,):
      raise ValueError(
          f"params{ly.bias} has shape {jnp.shape(leaves[ly.bias])}; the "
          f"layer expects ({ly.d_out},).")
    held.append(ly)
  return tuple(held)


def _layer_pull(s: KFACEWCState, i: int, theta, centre):
  """The gradient of layer ``i``'s penalty divided by lam, ``n x d_out``."""
  a, g, w = s.a[i], s.g[i], s.weight
  if w.ndim == 0:  # pooled: (A_sum kron G_sum) / W
    return (a @ (theta - centre) @ g) * jnp.where(w > 0, 1.0 / w, 0.0)
  separate = s.kfac_mode == "separate"

  def term(k, acc):  # + w_k A_k (theta - theta*_k) G_k
    d = theta - (s.task_anchor[i][k] if separate else centre)
    return acc + (a[k] @ d) @ (w[k] * g[k])

  # Only the filled slots: the cost grows with the tasks consolidated.
  filled = jnp.minimum(s.kfac_num_tasks, w.shape[0])
  return jax.lax.fori_loop(0, filled, term, jnp.zeros_like(theta))


def kfac_ewc(
    lam: Union[float, jax.Array],
    layers: tuple,
    *,
    mode: Mode = "online",
    gamma: Optional[float] = None,
    max_tasks: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adds the gradient of the Kronecker-factored EWC penalty to the updates.

  For a dense layer with ``D = [W; b] - [W*; b*]`` (stacked
  ``(d_in + 1) x d_out``) one task's penalty
  ``(lam/2) vec(D)^T (A kron G) vec(D) = (lam/2) tr(D^T A D G)`` has
  gradient ``lam * A D G``, which this adds to the updates (split back into
  the kernel and bias); other leaves get the diagonal pull
  ``lam * F * (theta - theta*)`` of :func:`ewc_jax.ewc`. Put it first in a
  chain: ``optax.chain(kfac_ewc(lam, layers), optax.adam(lr))``.

  **Several tasks.** A sum of Kronecker products is not a Kronecker
  product, but the pull only needs its product with ``D``, so each task's
  factors can be kept and the sum applied term by term, at memory and time
  linear in the number of tasks (Ritter et al. 2018). With ``max_tasks`` an
  int the state preallocates ``max_tasks`` slots per layer (factors, and in
  separate mode anchors) and the pull is the exact gradient of

  .. math::
    \text{separate:}\quad \frac{\lambda}{2} \sum_k
      \mathrm{vec}(\Theta - \Theta^*_k)^\top (A_k \otimes G_k)\,
      \mathrm{vec}(\Theta - \Theta^*_k), \qquad
    \text{online:}\quad \frac{\lambda}{2}\,
      \mathrm{vec}(\Theta - \Theta^*)^\top
      \Big(\sum_k \gamma^{t-k} A_k \otimes G_k\Big)
      \mathrm{vec}(\Theta - \Theta^*),

  computed as ``lam * sum_k A_k (Theta - Theta*_k) G_k`` (online:
  ``lam * sum_k gamma^(t-k) A_k (Theta - Theta*) G_k``, ``Theta*`` the
  latest task's parameters) by a loop over the filled slots: a step costs
  ``t (n^2 d_out + n d_out^2)`` per layer after ``t`` tasks (``n = d_in +
  1``), the memory is that of ``max_tasks`` tasks from the start. (One
  batched product over all slots, empty ones zero, pays for the empty
  slots and writes a ``[max_tasks, n, d_out]`` intermediate: on a 2-core
  CPU it measured 1.5x slower than the loop with every slot filled.)
  Separate mode keeps each task's anchor and forms ``Theta - Theta*_k``
  exactly, rather than the equal ``sum_k A_k Theta G_k - C`` (``C`` fixed
  at consolidation) whose difference of large terms loses float32 digits
  near the anchors. The loop
  has a traced trip count, so the update is not reverse-differentiable in
  this form (differentiate :func:`ewc_jax.kfac_penalty` instead).

  With ``max_tasks=None`` (online mode only) the state is O(1): the factors
  are pooled, ``A_sum <- gamma A_sum + A_t``, ``G_sum <- gamma G_sum + G_t``,
  ``W <- gamma W + 1``, and the precision is ``(A_sum kron G_sum) / W``,
  ``W`` tasks' worth of the Kronecker factorisation of the pooled data:
  KFAC's own independence assumption applied across tasks, exact for one
  task (or when all ``A_k`` or all ``G_k`` agree). Separate mode refuses it:
  with one pooled block per layer, the separate sum is ``W (Theta -
  mean_k Theta*_k)^T P (...)`` plus a constant, every layer anchored at the
  unweighted mean of the task anchors, a poor fit that measured below plain
  fine-tuning on 50 permuted-MNIST tasks (README).

  * ``"online"`` (the default; Ritter, Botev & Barber 2018's online
    Laplace, with Schwarz et al.'s decay ``gamma``): one quadratic anchored
    at the latest task's parameters; diagonal leaves ``F* <- gamma F* +
    F_t``.
  * ``"separate"`` (Kirkpatrick et al.'s sum of per-task quadratics,
    ``gamma = 1``): needs ``max_tasks``; diagonal leaves fold exactly as in
    :func:`ewc_jax.ewc`.

  Consolidating a task into a full store (``max_tasks`` tasks already in)
  is refused by :func:`kfac_consolidate` outside ``jax.jit``; under jit
  (where it cannot raise) it poisons the state: the weights and diagonals
  become nan, so every later update is nan, and ``kfac_num_tasks`` exceeds
  ``max_tasks``, which the next consolidation outside jit reports.

  ``lam`` is a hyperparameter as in :func:`ewc_jax.ewc` (no copy in the
  state): constant here, or injected with
  ``optax.inject_hyperparams(ewc_jax.kfac_ewc, static_args=("gamma",
  "max_tasks"))(lam=..., layers=layers, mode=..., gamma=..., max_tasks=...)``
  (``layers`` and ``mode`` are not numbers, so inject leaves them alone).
  ``gamma`` lives in the state (``kfac_gamma``, set it with ``tree_set``).
  Under ``optax.masked`` the state holds only the layers (and leaves) the
  mask keeps; a mask must keep or drop a layer's kernel and bias together.

  The state never changes shape, so a jitted step is traced once for all
  tasks. Anchors and diagonals take each parameter's sharding; the factors
  are per layer, placed by default (replicated) and the pull is left to
  XLA's partitioner.

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
    >>> sep = ewc_jax.kfac_ewc(1.0, curv.layers, mode="separate", max_tasks=2)
    >>> s = ewc_jax.kfac_consolidate(sep.init(params), params, curv)
    >>> s = ewc_jax.kfac_consolidate(s, new, curv)  # second task, own anchor
    >>> u, _ = sep.update({'w': jnp.zeros((2, 2))}, s, params)
    >>> print(u['w'] + 0.0)  # the pull A (0 - new) G; task 1 (at 0) adds 0
    [[-0.125  0.125]
     [ 0.     0.   ]]

  Args:
    lam: the strength lambda >= 0 (same convention as :func:`ewc_jax.ewc`).
    layers: the dense layers, ``kfac_fisher(...).layers`` or
      :func:`ewc_jax.dense_layers`; they fix the state's shapes.
    mode: ``"online"`` (default) or ``"separate"`` (needs ``max_tasks``).
    gamma: online mode's initial decay in (0, 1] (default 1), a Python
      number; must be 1 in separate mode.
    max_tasks: ``None`` (online mode only: pooled factors, O(1) memory) or
      the most tasks :func:`kfac_consolidate` will fold in: one exact
      Kronecker term per task, memory and step time linear in it.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with a
    :class:`KFACEWCState`; extra ``update`` arguments are ignored.

  Raises:
    ValueError: bad ``layers``, ``mode``, ``gamma``, ``lam`` or
      ``max_tasks``; separate mode without ``max_tasks``.
    TypeError: ``gamma`` or ``max_tasks`` given as arrays (list them in
      ``inject_hyperparams``' ``static_args``); a callable ``lam``.

  References:
    Ritter, Botev & Barber, `Online Structured Laplace Approximations for
    Overcoming Catastrophic Forgetting <https://arxiv.org/abs/1805.07810>`_,
    NeurIPS 2018.
    Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015.
    Kirkpatrick et al., `Overcoming catastrophic forgetting in neural
    networks <https://arxiv.org/abs/1612.00796>`_, PNAS 2017.
  """
  layers = _check_layers(layers)
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  max_tasks = _check_max_tasks(max_tasks)
  if mode == "separate" and max_tasks is None:
    raise ValueError(
        'mode="separate" keeps one Kronecker term per task, each with its '
        "own anchor, and needs max_tasks: the most tasks you will "
        "consolidate (memory and step time grow linearly with it). For "
        'constant memory use mode="online" (max_tasks=None: pooled factors '
        "anchored at the latest task).")
  gamma0 = hyper_lib.check_gamma(gamma, "KFACEWCState.kfac_gamma",
                                 _STATIC_ARGS)
  if mode == "separate" and gamma0 != 1.0:
    raise ValueError('gamma decays old tasks only in mode="online"; got '
                     f'gamma={gamma!r} with mode="separate".')
  hyper_lib.check_lam(lam, "ewc_jax.kfac_ewc", _STATIC_ARGS)
  slots = () if max_tasks is None else (max_tasks,)

  def init_fn(params):
    held = _held_layers(layers, params)
    covered = _layer_paths(held)
    pairs, treedef = _flat_masked(params)
    zeros = lambda x: jnp.zeros_like(x, jnp.float32)  # noqa: E731
    diagonal = treedef.unflatten([
        x if _is_masked(x) else optax.MaskedNode() if k in covered
        else zeros(x) for k, x in pairs])
    anchor = treedef.unflatten([x if _is_masked(x) else zeros(x)
                                for _, x in pairs])
    return KFACEWCState(
        a=tuple(jnp.zeros(slots + (_n_a(ly),) * 2, jnp.float32)
                for ly in held),
        g=tuple(jnp.zeros(slots + (ly.d_out,) * 2, jnp.float32)
                for ly in held),
        weight=jnp.zeros(slots, jnp.float32),
        task_anchor=tuple(
            jnp.zeros(slots + (_n_a(ly), ly.d_out), jnp.float32)
            for ly in held) if mode == "separate" else (),
        diagonal=diagonal, anchor=anchor,
        kfac_gamma=jnp.asarray(gamma0, jnp.float32),
        kfac_num_tasks=jnp.zeros([], jnp.int32),
        kfac_mode=StaticStr(mode), layers=StaticLayers(held))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # e.g. value=loss, meant for other transformations
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
    missing = sorted((set(c) - set(p)) | (set(c) - set(u)))
    if missing:
      raise ValueError(f"kfac_ewc update got params or updates without "
                       f"{missing[:3]}, which init's params had.")
    pulls = {}
    for i, ly in enumerate(state.layers.layers):
      pull_w, pull_b = kfac_lib.split_delta(ly, lam_f32 * _layer_pull(
          state, i, _matrix(ly, p), _matrix(ly, c)))
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
    return jax.tree.unflatten(treedef, new), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_state(x):
  return isinstance(x, KFACEWCState)


def _find_states(opt_state):
  return [x for x in jax.tree.leaves(opt_state, is_leaf=_is_state)
          if _is_state(x)]


def _capacity(s: KFACEWCState) -> Optional[int]:
  return None if s.weight.ndim == 0 else s.weight.shape[-1]


def _factors_for(s: KFACEWCState, curvature) -> list:
  """The curvature's factors of each layer the state holds, in order."""
  held = s.layers.layers
  out = []
  for ly in held:
    if ly not in curvature.layers:
      theirs = [lc.kernel for lc in curvature.layers]
      raise ValueError(
          f"curvature's Kronecker blocks {theirs} do not match the kfac_ewc "
          f"state's layers {[h.kernel for h in held]}: it has no block for "
          f"params{ly.kernel} (or one of another shape); build kfac_ewc "
          "with this curvature's layers.")
    out.append(curvature.factors[curvature.layers.index(ly)])
  return out


def _fold(s: KFACEWCState, params, curvature) -> KFACEWCState:
  """Folds one finished task (anchor ``params``) into ``s``."""
  factors = _factors_for(s, curvature)
  p, _, _ = _flat(params)
  fd = dict(_flat_masked(curvature.diagonal)[0])
  online = s.kfac_mode == "online"
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  decay = s.kfac_gamma if online else jnp.float32(1.0)
  capacity = _capacity(s)
  ok = None if capacity is None else s.kfac_num_tasks < capacity

  def poison(x):  # overflow under jit: nan, never a plausible pull
    return x if ok is None else jnp.where(ok, x, jnp.nan)

  # Layers.
  if capacity is None:
    a = tuple(decay * a + f.a for a, f in zip(s.a, factors))
    g = tuple(decay * g + f.g for g, f in zip(s.g, factors))
    weight = decay * s.weight + 1.0
    task_anchor = s.task_anchor
  else:
    slot = jnp.minimum(s.kfac_num_tasks, capacity - 1)
    put = lambda stack, x: jax.lax.dynamic_update_index_in_dim(  # noqa: E731
        stack, f32(x), slot, 0)
    a = tuple(put(a, f.a) for a, f in zip(s.a, factors))
    g = tuple(put(g, f.g) for g, f in zip(s.g, factors))
    weight = poison(put(decay * s.weight, jnp.ones([], jnp.float32)))
    task_anchor = tuple(put(t, _matrix(ly, p)) for t, ly in
                        zip(s.task_anchor, s.layers.layers))

  # Diagonal leaves (and the anchor: latest params at layer leaves).
  def curvature_at(path, shape):
    f = fd.get(path)
    if f is None or _is_masked(f):
      raise ValueError(
          f"the kfac_ewc state keeps a diagonal Fisher at params{path}, but "
          f"curvature.diagonal{path} is "
          f"{'missing' if f is None else 'a Kronecker block leaf'}; build "
          "kfac_ewc with this curvature's layers.")
    if jnp.shape(f) != shape:
      raise ValueError(f"curvature.diagonal{path} has shape {jnp.shape(f)};"
                       f" the kfac_ewc state's has {shape}.")
    return f32(f)

  def param_at(path, shape):
    if path not in p or jnp.shape(p[path]) != shape:
      got = "missing" if path not in p else jnp.shape(p[path])
      raise ValueError(f"params{path} is {got}; the kfac_ewc state was "
                       f"initialised with shape {shape}.")
    return jnp.array(p[path], jnp.float32, copy=True)  # no alias (donation)

  d_pairs, d_def = _flat_masked(s.diagonal)
  c_pairs, c_def = _flat_masked(s.anchor)
  new_diag, new_anchor = [], []
  for (path, fs), (_, c) in zip(d_pairs, c_pairs):
    if _is_masked(c):  # left out by optax.masked
      new_diag.append(fs)
      new_anchor.append(c)
      continue
    theta = param_at(path, c.shape)
    if _is_masked(fs):  # a held layer's leaf
      new_diag.append(fs)
      new_anchor.append(theta)
      continue
    f = curvature_at(path, fs.shape)
    total = fs + f
    share = f / jnp.where(total > 0, total, 1.0)
    centre = jnp.where(total > 0, c + share * (theta - c), theta)
    new_anchor.append(theta if online else centre)
    new_diag.append(poison(decay * fs + f))
  return s._replace(
      a=a, g=g, weight=weight, task_anchor=task_anchor,
      diagonal=d_def.unflatten(new_diag), anchor=c_def.unflatten(new_anchor),
      kfac_num_tasks=s.kfac_num_tasks + 1)


def kfac_consolidate(opt_state: Any, params: Any,
                     curvature: kfac_lib.KFACCurvature) -> Any:
  """Folds a finished task into every :func:`kfac_ewc` state in opt_state.

  The state is found wherever it sits (``optax.chain``,
  ``optax.inject_hyperparams``, ``optax.masked``,
  :func:`synaptic_intelligence`, ...). Shapes never change, so a jitted step
  taking ``opt_state`` is not retraced; this may itself run under
  ``jax.jit`` (value checks are then skipped, and a full per-task store is
  poisoned with nan instead of refused: see :func:`kfac_ewc`).

  Args:
    opt_state: an optimiser state holding one or more :func:`kfac_ewc`
      states.
    params: the parameters at the end of the task (the anchor), the full
      tree (also under ``optax.masked``).
    curvature: the task's :class:`KFACCurvature` from :func:`kfac_fisher`.

  Returns:
    ``opt_state`` with the task folded in.

  Raises:
    ValueError: no kfac_ewc state; a per-task store already holding
      ``max_tasks`` tasks; a curvature that does not fit ``params`` or the
      state (the path or shapes are named); non-finite values.
  """
  states = _find_states(opt_state)
  if not states:
    raise ValueError(
        "kfac_consolidate found no ewc_jax.kfac_ewc state in opt_state; build "
        "the optimiser with optax.chain(ewc_jax.kfac_ewc(lam, layers), ...).")
  for s in states:
    capacity = _capacity(s)
    if capacity is not None and tree_lib.is_concrete(s.kfac_num_tasks):
      done = int(np.max(np.asarray(jax.device_get(s.kfac_num_tasks))))
      if done >= capacity:
        raise ValueError(
            f"kfac_consolidate: the kfac_ewc state already holds {done} "
            f"tasks, its max_tasks={capacity}; another would not fit. Build "
            "kfac_ewc with a larger max_tasks (memory and step time grow "
            'linearly with it), or use mode="online" with max_tasks=None '
            "(pooled factors, constant memory).")
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
