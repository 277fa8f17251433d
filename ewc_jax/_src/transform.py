"""The elastic pull of EWC as an optax gradient transformation."""

import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ewc_jax._src import hyperparams as hyper_lib
from ewc_jax._src import tree as tree_lib
from ewc_jax._src.types import MODE_NAMES
from ewc_jax._src.types import Mode
from ewc_jax._src.types import StaticStr

MODES = MODE_NAMES

_NO_PARAMS_MSG = (
    "ewc_jax.ewc needs the current parameters: call "
    "`optimizer.update(grads, opt_state, params)`; params was None.")

# optax.inject_hyperparams' states: where an injected lam lives.
_INJECT_STATES = (optax.InjectHyperparamsState,
                  optax.InjectStatefulHyperparamsState)


class EWCState(NamedTuple):
  """State of :func:`ewc`: all past tasks' quadratics folded into one.

  The sum of per-task quadratics ``sum_k F_k (theta - theta*_k)^2`` equals
  ``A (theta - c)^2 + r`` elementwise, with curvature ``A = sum_k F_k``,
  centre ``c = sum_k F_k theta*_k / A`` (so ``A c = B = sum_k F_k theta*_k``)
  and a constant ``r``. Storing the centre rather than ``B`` keeps the pull
  ``A (theta - c)`` free of the cancellation in ``A theta - B``.

  A ``NamedTuple``, as optax's own states, so that
  ``optax.tree_utils.tree_get(opt_state, "curvature")`` and
  ``tree_set(opt_state, gamma=...)`` find its fields wherever it sits.

  Where the hyperparameters live (each in one place):

  * ``lam`` is read by every update, so it is an argument of :func:`ewc`,
    as every optax hyperparameter: a constant of ``ewc(lam)``, or, under
    ``optax.inject_hyperparams(ewc_jax.ewc, static_args=("mode",))``, the
    injected ``hyperparams["lam"]`` (schedules, ``tree_get``/``tree_set``).
    This state holds no copy of it.
  * ``gamma`` is read only by :func:`consolidate`, never by an update, so it
    lives here; ``ewc(gamma=...)`` only sets its initial value.
  * ``mode`` is static (part of the state's structure, not a leaf).

  Attributes:
    curvature: ``A``, float32, shaped like the (regularised) params.
    center: ``c``, float32, shaped like the (regularised) params.
    residual: scalar float32, ``sum r``: the part of the penalty that no
      parameter value can remove (zero in online mode).
    gamma: scalar float32, online mode's decay of the old Fisher.
    num_tasks: scalar int32, how many tasks have been consolidated.
    mode: ``"separate"`` or ``"online"``, a :class:`StaticStr`.
  """

  curvature: Any
  center: Any
  residual: jax.Array
  gamma: jax.Array
  num_tasks: jax.Array
  mode: StaticStr


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def ewc(
    lam: Union[float, jax.Array],
    *,
    mode: Mode = "separate",
    gamma: Optional[float] = None,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adds the gradient of the EWC penalty to the updates.

  After tasks ``k = 1..K`` with diagonal Fishers ``F_k`` and final parameters
  ``theta*_k``, Elastic Weight Consolidation adds to the loss

  .. math::
    \frac{\lambda}{2} \sum_k \sum_i F_{k,i} (\theta_i - \theta^*_{k,i})^2,

  whose gradient ``lam * (A * theta - B)``, with ``A = sum_k F_k`` and
  ``B = sum_k F_k * theta*_k``, this transformation adds to the incoming
  updates (as :func:`optax.add_decayed_weights` adds ``wd * theta``). Put it
  first in a chain so that the optimiser that follows sees the full gradient:
  ``optax.chain(ewc(lam), optax.adam(lr))``.

  Tasks are folded in with :func:`consolidate`; until then the pull is zero.
  In ``"online"`` mode (Schwarz et al. 2018) consolidation sets
  ``A <- gamma * A + F_new`` and anchors the single quadratic at the latest
  parameters. The state is O(#params) and never changes shape, so a jitted
  train step taking the state as an argument is traced once for all tasks.

  ``lam`` is a hyperparameter like optax's learning rates: fixed here, or
  schedulable and settable without retracing under
  ``optax.inject_hyperparams(ewc_jax.ewc, static_args=("mode",))`` (then
  ``optax.tree_utils.tree_set(opt_state, lam=jnp.float32(x))`` changes the
  pull; a Python float is weakly typed and retraces a jitted step once).
  ``gamma`` lives in the :class:`EWCState` (see there).

  The pull is computed in float32 and cast back to each update's dtype.

  Example:
    >>> import jax.numpy as jnp, optax, ewc_jax
    >>> params = {'w': jnp.array([1.0, 2.0])}
    >>> opt = optax.chain(ewc_jax.ewc(10.0), optax.sgd(0.1))
    >>> state = opt.init(params)
    >>> state = ewc_jax.consolidate(state, params, {'w': jnp.array([1.0, 0.0])})
    >>> grads = {'w': jnp.zeros(2)}
    >>> updates, state = opt.update(grads, state, {'w': jnp.array([2.0, 3.0])})
    >>> print(updates['w'])  # -0.1 * 10 * [1, 0] * ([2, 3] - [1, 2])
    [-1. -0.]

  Args:
    lam: the EWC strength lambda >= 0 (with the 1/2 of Kirkpatrick et al. and
      a Fisher averaged over examples; see the README for other libraries'
      conventions), a number or a real scalar array.
    mode: ``"separate"`` (one quadratic per past task) or ``"online"``.
    gamma: online mode's initial decay of the old Fisher, a Python number in
      (0, 1] (default 1; separate mode accepts only 1). Static for
      ``optax.inject_hyperparams``: list it in ``static_args`` there, or
      set it later with ``tree_set``.
    mask: a tree of booleans shaped like (a prefix of) the params, or a
      callable returning one; ``True`` leaves are regularised. Leaves masked
      out (say a new task's output head) carry no EWC state at all.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state holds an
    :class:`EWCState`; extra arguments of ``update`` (say ``value=loss``)
    are accepted and ignored.

  Raises:
    TypeError: ``lam`` not a real number; ``gamma`` an array.
    ValueError: ``lam`` negative or not finite; ``gamma`` outside (0, 1],
      or not 1 in separate mode; unknown ``mode``.

  References:
    Kirkpatrick et al., `Overcoming catastrophic forgetting in neural networks
    <https://arxiv.org/abs/1612.00796>`_, PNAS 2017.
    Schwarz et al., `Progress & Compress <https://arxiv.org/abs/1805.06370>`_,
    ICML 2018.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  gamma0 = hyper_lib.check_gamma(gamma)
  if mode == "separate" and gamma0 != 1.0:
    raise ValueError(
        f'gamma decays old tasks only in mode="online"; got gamma={gamma!r} '
        'with mode="separate" (which keeps every task at full weight).')
  hyper_lib.check_lam(lam)

  def init_fn(params):
    # zeros_like keeps each parameter's sharding: the pull needs no
    # communication when parameters are sharded (FSDP-style).
    zeros = lambda: jax.tree.map(  # noqa: E731 (fresh buffers for each)
        lambda p: jnp.zeros_like(p, jnp.float32), params)
    return EWCState(
        curvature=zeros(),
        center=zeros(),
        residual=jnp.zeros([], jnp.float32),
        gamma=jnp.asarray(gamma0, jnp.float32),
        num_tasks=jnp.zeros([], jnp.int32),
        mode=StaticStr(mode),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # e.g. value=loss, meant for other transformations
    if params is None:
      raise ValueError(_NO_PARAMS_MSG)
    try:  # shapes are static: checked once per trace under jit
      tree_lib.check_same_structure(
          "the EWC state", state.curvature, "params", params,
          is_leaf=_is_masked)
    except ValueError as e:
      raise ValueError(
          f"ewc update got params unlike those given to init: {e}") from e
    lam_f32 = jnp.asarray(lam, jnp.float32)

    def pull(u, a, c, p):
      if u is None:
        return None
      f32 = u.astype(jnp.float32) + lam_f32 * a * (p.astype(jnp.float32) - c)
      return f32.astype(u.dtype)

    updates = jax.tree.map(
        pull, updates, state.curvature, state.center, params,
        is_leaf=lambda x: x is None)
    return updates, state

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  if mask is not None:
    return optax.masked(tx, mask)
  return tx


def _is_state(x: Any) -> bool:
  return isinstance(x, EWCState)


def _find_states(opt_state: Any) -> list[EWCState]:
  leaves = jax.tree.leaves(opt_state, is_leaf=_is_state)
  return [s for s in leaves if _is_state(s)]


def _states_with_lam(opt_state: Any, lam: Any = None) -> list[tuple]:
  """``(state, lam)`` for each EWC state; lam from the nearest injection."""
  is_node = lambda x: isinstance(x, (EWCState,) + _INJECT_STATES)  # noqa: E731
  found = []
  for node in jax.tree.leaves(opt_state, is_leaf=is_node):
    if isinstance(node, EWCState):
      found.append((node, lam))
    elif isinstance(node, _INJECT_STATES):
      found += _states_with_lam(node.inner_state,
                                node.hyperparams.get("lam", lam))
  return found


def _fold(s: EWCState, params, fisher) -> EWCState:
  """Folds one finished task (anchor ``params``, Fisher ``fisher``) in."""
  # Leaves masked out by optax.masked are MaskedNode in the state; the full
  # params/fisher trees have arrays there, which tree_map skips below.
  tree_lib.check_same_structure(
      "the EWC state", s.curvature, "params", params, is_leaf=_is_masked,
      check_shapes=True)
  tree_lib.check_same_structure(
      "the EWC state", s.curvature, "fisher", fisher, is_leaf=_is_masked,
      check_shapes=True)

  def leaves(fn, *trees):
    return jax.tree.map(
        lambda a, *rest: a if _is_masked(a) else fn(a, *rest),
        *trees, is_leaf=_is_masked)

  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  if s.mode == "separate" and tree_lib.is_concrete(s.gamma) and np.any(
      np.asarray(s.gamma) != 1.0):
    raise ValueError(
        'gamma decays old tasks only in mode="online", but a separate-mode '
        f"EWC state holds gamma={np.asarray(s.gamma).tolist()} (set with "
        "tree_set?); "
        "separate mode keeps every task at full weight: set gamma back to 1, "
        'or build the optimiser with ewc(lam, mode="online", gamma=...).')
  if s.mode == "online":
    curvature = leaves(lambda a, f: s.gamma * a + f32(f), s.curvature,
                       fisher)
    # A copy: the state must not alias the caller's params (donation).
    center = leaves(lambda c, p: jnp.array(p, jnp.float32, copy=True),
                    s.center, params)
    residual = jnp.zeros([], jnp.float32)
  else:
    def new_center(a, c, f, p):
      # c + F / (A + F) (p - c): exactly the anchor p for the first task.
      total = a + f32(f)
      share = f32(f) / jnp.where(total > 0, total, 1.0)
      return jnp.where(total > 0, c + share * (f32(p) - c), f32(p))

    def gap(a, c, f, p):
      # Combining A(x-c)^2 and F(x-p)^2 leaves A F / (A + F) (c - p)^2.
      total = a + f32(f)
      w = a * f32(f) / jnp.where(total > 0, total, 1.0)
      return jnp.sum(w * jnp.square(c - f32(p)))

    center = leaves(new_center, s.curvature, s.center, fisher, params)
    gaps = leaves(gap, s.curvature, s.center, fisher, params)
    residual = s.residual + sum(
        jax.tree.leaves(gaps), jnp.zeros([], jnp.float32))
    curvature = leaves(lambda a, f: a + f32(f), s.curvature, fisher)
  return s._replace(curvature=curvature, center=center, residual=residual,
                    num_tasks=s.num_tasks + 1)


def consolidate(opt_state: Any, params: Any, fisher: Any) -> Any:
  """Folds a finished task into every EWC state inside ``opt_state``.

  Separate mode adds the quadratic ``F (theta - params)^2`` to the past ones;
  online mode replaces the anchor with ``params`` and sets
  ``F* <- gamma F* + fisher`` (``gamma`` from the :class:`EWCState`). The EWC
  state is found wherever it sits (inside ``optax.chain``,
  ``optax.inject_hyperparams``, ``optax.masked``, ``optax.multi_transform``);
  shapes and dtypes never change, so a jitted step taking ``opt_state`` as an
  argument is not retraced. Can be called inside ``jax.jit`` (the value
  checks then need concrete values and are skipped).

  Example:
    >>> import jax.numpy as jnp, optax, ewc_jax
    >>> params = {'w': jnp.ones(3)}
    >>> opt = optax.chain(ewc_jax.ewc(1.0), optax.adam(1e-3))
    >>> state = opt.init(params)
    >>> state = ewc_jax.consolidate(state, params, {'w': jnp.ones(3)})
    >>> float(ewc_jax.penalty({'w': jnp.zeros(3)}, state, lam=1.0))
    1.5

  Args:
    opt_state: an optimiser state holding one or more :func:`ewc` states.
    params: the parameters at the end of the task (the anchor), a full tree.
    fisher: the task's diagonal Fisher, shaped like ``params`` (e.g. from
      :func:`ewc_jax.fisher_diagonal`); finite and >= 0.

  Returns:
    ``opt_state`` with the task folded in.

  Raises:
    ValueError: no EWC state in ``opt_state``; ``params`` or ``fisher`` not
      shaped like the regularised parameters (the path is named); non-floating
      dtypes; non-finite params (checked first: a diverged model makes its
      Fisher non-finite too); non-finite or negative Fisher values; a
      separate-mode state whose ``gamma`` is not 1 (set by ``tree_set``).

  Warns:
    UserWarning: when ``fisher`` is zero everywhere (the task adds nothing).
  """
  if not _find_states(opt_state):
    raise ValueError(
        "consolidate found no ewc_jax.ewc state in opt_state; build the "
        "optimiser with ewc_jax.ewc(...) (e.g. optax.chain(ewc_jax.ewc(lam), "
        "optax.adam(lr))).")
  tree_lib.check_same_structure("params", params, "fisher", fisher)
  tree_lib.check_floating("params", params)
  tree_lib.check_floating("fisher", fisher)
  tree_lib.check_finite(
      "params", params,
      hint="the anchor must be finite: did training diverge (lower the "
      "learning rate)?")
  tree_lib.check_finite("fisher", fisher, nonnegative=True)
  if tree_lib.all_zero(fisher):
    warnings.warn(
        "consolidate got a Fisher that is zero everywhere: this task adds no "
        "penalty (was the Fisher computed on the right data and model?).",
        stacklevel=2)
  return jax.tree.map(
      lambda s: _fold(s, params, fisher) if _is_state(s) else s,
      opt_state, is_leaf=_is_state)


def penalty(params: Any, opt_state: Any, lam: Any = None) -> jax.Array:
  r"""The current EWC penalty ``(lam/2) sum_k sum_i F_k (theta - theta*_k)^2``.

  Sums over every EWC state in ``opt_state``. For logging; the
  transformation itself adds the gradient of this value.

  Args:
    params: the current parameters.
    opt_state: an optimiser state holding one or more :func:`ewc` states.
    lam: lambda >= 0. By default the ``lam`` that
      ``optax.inject_hyperparams`` holds around each EWC state (that of the
      latest update, or as set by ``tree_set``); required when the
      optimiser was built with a constant ``ewc(lam)``, whose state holds no
      lambda.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: no EWC state in ``opt_state``; no ``lam`` given or injected;
      a ``lam`` (given, or injected and concrete) that is negative or not
      finite; ``params`` not shaped like the state (the path is named).
  """
  found = _states_with_lam(opt_state)
  if not found:
    raise ValueError("penalty found no ewc_jax.ewc state in opt_state.")
  if lam is not None:
    hyper_lib.check_lam(lam)
  total = jnp.zeros([], jnp.float32)
  for s, injected in found:
    tree_lib.check_same_structure(
        "the EWC state", s.curvature, "params", params, is_leaf=_is_masked)
    s_lam = injected if lam is None else lam
    if lam is None and injected is not None:
      hyper_lib.check_lam(injected)  # e.g. a negative lam set by tree_set
    if s_lam is None:
      raise ValueError(
          "penalty needs lam: ewc(lam) keeps lam as a constant of the "
          "transformation, not in opt_state. Pass penalty(params, opt_state, "
          "lam=...), or build the optimiser with optax.inject_hyperparams("
          "ewc_jax.ewc, static_args=('mode',))(lam=...) so that the state "
          "holds it.")
    terms = jax.tree.map(
        lambda a, c, p: jnp.zeros([]) if _is_masked(a) else jnp.sum(
            a * jnp.square(jnp.asarray(p, jnp.float32) - c)),
        s.curvature, s.center, params, is_leaf=_is_masked)
    quad = sum(jax.tree.leaves(terms), jnp.zeros([], jnp.float32))
    total = total + 0.5 * jnp.asarray(s_lam, jnp.float32) * (
        quad + s.residual)
  return total


def ewc_penalty(params: Any, anchor: Any, fisher: Any, lam: float) -> jax.Array:
  r"""The EWC penalty as a pure function, to add to a loss.

  .. math:: \frac{\lambda}{2} \sum_i F_i (\theta_i - \theta^*_i)^2

  For users who prefer the penalty-in-the-loss style; ``jax.grad`` of this
  equals the pull that :func:`ewc` adds to the updates. Outside ``jax.jit``
  the anchor and Fisher are checked as :func:`consolidate` checks them.

  Args:
    params: the current parameters ``theta``.
    anchor: the parameters ``theta*`` after the old task.
    fisher: the diagonal Fisher ``F``, shaped like ``params``; finite, >= 0.
    lam: lambda >= 0.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: trees of different structure or shapes (the path is named);
      a non-finite anchor; a non-finite or negative Fisher; a bad ``lam``.
  """
  tree_lib.check_same_structure("params", params, "anchor", anchor)
  tree_lib.check_same_structure("params", params, "fisher", fisher)
  hyper_lib.check_lam(lam)
  tree_lib.check_finite("anchor", anchor)
  tree_lib.check_finite("fisher", fisher, nonnegative=True)
  terms = jax.tree.map(
      lambda p, a, f: jnp.sum(
          jnp.asarray(f, jnp.float32)
          * jnp.square(jnp.asarray(p, jnp.float32)
                       - jnp.asarray(a, jnp.float32))),
      params, anchor, fisher)
  return 0.5 * jnp.asarray(lam, jnp.float32) * sum(
      jax.tree.leaves(terms), jnp.zeros([], jnp.float32))
