"""The elastic pull of EWC as an optax gradient transformation."""

import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from ewc_jax._src import states as states_lib
from ewc_jax._src import tree as tree_lib
from ewc_jax._src import validate
from ewc_jax._src.types import MODE_NAMES
from ewc_jax._src.types import Mode
from ewc_jax._src.types import mode_tag

MODES = MODE_NAMES
_STATIC_ARGS = "('mode', 'gamma')"


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
    mode: ``"separate"`` or ``"online"``: a leafless tag that equals the
      string (static: part of the state's structure, kept by every pytree
      serialiser, ``flax.serialization`` and orbax included).
  """

  curvature: Any
  center: Any
  residual: jax.Array
  gamma: jax.Array
  num_tasks: jax.Array
  mode: Any


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
  gamma0 = states_lib.check_mode_and_gamma(mode, MODES, gamma,
                                           "EWCState.gamma", _STATIC_ARGS)
  validate.check_lam(lam)

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
        mode=mode_tag(mode),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # e.g. value=loss, meant for other transformations
    if params is None:
      raise ValueError(states_lib.no_params_message("ewc_jax.ewc"))
    lam_f32 = jnp.asarray(lam, jnp.float32)

    def pull(u, a, c, p):
      if tree_lib.is_masked(a):  # left out by optax.masked
        return u
      f32 = u.astype(jnp.float32) + lam_f32 * a * (p.astype(jnp.float32) - c)
      return f32.astype(u.dtype)

    try:  # shapes are static: checked once per trace under jit
      tree_lib.check_same_structure("the EWC state", state.curvature,
                                    "params", params)
      return tree_lib.map_by_path(
          pull, ("updates", "the EWC state", "the EWC state", "params"),
          updates, state.curvature, state.center, params), state
    except ValueError as e:
      raise ValueError(
          f"ewc update got params unlike those given to init: {e}") from e

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  if mask is not None:
    return optax.masked(tx, mask)
  return tx


def _fold(s: EWCState, params, fisher) -> EWCState:
  """Folds one finished task (anchor ``params``, Fisher ``fisher``) in."""
  names = ("the EWC state", "params", "fisher")
  gamma = tree_lib.value(s.gamma)
  f32 = states_lib.f32
  if s.mode == "online":
    ok = validate.gamma_ok(gamma)  # under jit: a bad gamma poisons
    curvature = tree_lib.map_by_path(
        lambda a, p, f: states_lib.poison(
            ok, states_lib.rounded(gamma * a) + f32(f)), names,
        s.curvature, params, fisher, extra_ok=True)
    center = tree_lib.map_by_path(
        lambda c, p, f: states_lib.copy_f32(p), names, s.center, params,
        fisher, extra_ok=True)
    residual = jnp.zeros([], jnp.float32)
  else:
    center = tree_lib.map_by_path(
        lambda a, c, p, f: states_lib.fold_centre(a, c, f, p),
        ("the EWC state",) + names, s.curvature, s.center, params, fisher,
        extra_ok=True)
    gaps = tree_lib.map_by_path(
        lambda a, c, p, f: states_lib.fold_gap(a, c, f, p),
        ("the EWC state",) + names, s.curvature, s.center, params, fisher,
        extra_ok=True)
    residual = tree_lib.value(s.residual) + sum(
        jax.tree.leaves(gaps), jnp.zeros([], jnp.float32))
    curvature = tree_lib.map_by_path(
        lambda a, p, f: a + f32(f), names, s.curvature, params, fisher,
        extra_ok=True)
  return s._replace(
      curvature=curvature, center=center,
      residual=tree_lib.rewrap(s.residual, residual),
      num_tasks=tree_lib.rewrap(s.num_tasks,
                                tree_lib.value(s.num_tasks) + 1))


_fold_jit = jax.jit(_fold)


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
  if not tree_lib.find(opt_state, EWCState):
    raise ValueError(
        "consolidate found no ewc_jax.ewc state in opt_state; build the "
        "optimiser with ewc_jax.ewc(...) (e.g. optax.chain(ewc_jax.ewc(lam), "
        "optax.adam(lr))).")
  states_lib.check_params(params)
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
  for s in tree_lib.find(opt_state, EWCState):  # before jit: values needed
    validate.check_state_gamma(tree_lib.value(s.gamma), "EWCState.gamma",
                               s.mode == "separate")
  # One compiled fold per state layout (not one small program per leaf).
  return states_lib.replace_states(opt_state, EWCState,
                                   lambda s: _fold_jit(s, params, fisher))


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
  found = states_lib.with_lam(opt_state, EWCState)
  if not found:
    raise ValueError("penalty found no ewc_jax.ewc state in opt_state.")
  states_lib.check_params(params)
  if lam is not None:
    validate.check_lam(lam)
  total = jnp.zeros([], jnp.float32)
  for s, injected in found:
    terms = tree_lib.map_by_path(
        lambda a, c, p: jnp.sum(a * jnp.square(jnp.asarray(p, jnp.float32)
                                               - c)),
        ("the EWC state", "the EWC state", "params"), s.curvature, s.center,
        params, extra_ok=True)
    s_lam = injected if lam is None else lam
    if lam is None and injected is not None:
      validate.check_lam(injected)  # e.g. a negative lam set by tree_set
    if s_lam is None:
      raise ValueError(
          "penalty needs lam: ewc(lam) keeps lam as a constant of the "
          "transformation, not in opt_state. Pass penalty(params, opt_state, "
          "lam=...), or build the optimiser with optax.inject_hyperparams("
          "ewc_jax.ewc, static_args=('mode',))(lam=...) so that the state "
          "holds it.")
    quad = tree_lib.sum_leaves(terms)
    total = total + 0.5 * jnp.asarray(s_lam, jnp.float32) * (
        quad + tree_lib.value(s.residual))
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
  validate.check_lam(lam)
  tree_lib.check_finite("anchor", anchor)
  tree_lib.check_finite("fisher", fisher, nonnegative=True)
  terms = tree_lib.map_by_path(
      lambda p, a, f: jnp.sum(
          jnp.asarray(f, jnp.float32)
          * jnp.square(jnp.asarray(p, jnp.float32)
                       - jnp.asarray(a, jnp.float32))),
      ("params", "anchor", "fisher"), params, anchor, fisher)
  return 0.5 * jnp.asarray(lam, jnp.float32) * tree_lib.sum_leaves(terms)
