"""The Kronecker-factored EWC pull as an optax gradient transformation."""

import numbers
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ewc_jax._src import states as states_lib
from ewc_jax._src import tree as tree_lib
from ewc_jax._src import validate
from ewc_jax._src.jaxpr.kronecker import DenseLayer
from ewc_jax._src.kfac import packing
from ewc_jax._src.kfac import state as state_lib
from ewc_jax._src.types import MODE_NAMES
from ewc_jax._src.types import Mode

MODES = MODE_NAMES

# optax.inject_hyperparams turns numbers into arrays; these two fix shapes
# or are consolidation data, so they must stay Python numbers.
STATIC_ARGS = "('gamma', 'max_tasks')"


def _check_layers(layers):
  if not isinstance(layers, (tuple, list)) or not all(
      isinstance(ly, DenseLayer) for ly in layers):
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
        f"{STATIC_ARGS}).")
  if (isinstance(max_tasks, bool) or not isinstance(max_tasks,
                                                    numbers.Integral)
      or max_tasks < 1):
    raise ValueError(f"max_tasks must be None or an int >= 1, got "
                     f"{max_tasks!r}.")
  return int(max_tasks)


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
  validate.choice("mode", mode, MODES)
  max_tasks = _check_max_tasks(max_tasks)
  if mode == "separate" and max_tasks is None:
    raise ValueError(
        'mode="separate" keeps one Kronecker term per task, each with its '
        "own anchor, and needs max_tasks: the most tasks you will "
        "consolidate (memory and step time grow linearly with it). For "
        'constant memory use mode="online" (max_tasks=None: pooled factors '
        "anchored at the latest task).")
  gamma0 = states_lib.check_mode_and_gamma(
      mode, MODES, gamma, "KFACEWCState.kfac_gamma", STATIC_ARGS)
  validate.check_lam(lam, "ewc_jax.kfac_ewc", STATIC_ARGS)
  store = state_lib.store_for(max_tasks, mode == "separate")
  state_lib.register_flax_serialization()

  def init_fn(params):
    return state_lib.init(layers, params, mode, gamma0, store)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # e.g. value=loss, meant for other transformations
    if params is None:
      raise ValueError(states_lib.no_params_message("ewc_jax.kfac_ewc"))
    try:  # shapes are static: checked once per trace under jit
      tree_lib.check_same_structure("the kfac_ewc state", state.anchor,
                                    "params", params)
      tree_lib.check_same_structure("params", params, "updates", updates)
    except ValueError as e:
      raise ValueError(
          f"kfac_ewc update got params unlike those given to init: {e}"
      ) from e
    return _add_pulls(updates, state, params,
                      jnp.asarray(lam, jnp.float32)), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _add_pulls(updates, state, params, lam_f32):
  """``updates`` plus ``lam`` times each leaf's pull (float32, cast back)."""
  p = tree_lib.leaves_by_path(params)
  c = tree_lib.leaves_by_path(state.anchor)
  store = state.layers.store
  pulls = {}
  for i, ly in enumerate(state.layers.layers):
    pulls.update(packing.split(ly, lam_f32 * store.pull(
        state, i, packing.matrix(ly, p), packing.matrix(ly, c))))
  for path, fi in tree_lib.leaves_by_path(state.diagonal).items():
    pulls[path] = lam_f32 * fi * (jnp.asarray(p[path], jnp.float32)
                                  - c[path])

  def add(path_u):
    path, u = path_u
    if path not in pulls:
      return u
    return (u.astype(jnp.float32) + pulls[path]).astype(u.dtype)

  pairs, treedef = jax.tree_util.tree_flatten_with_path(updates)
  return treedef.unflatten(
      [add((tree_lib.path_str(q), u)) for q, u in pairs])
