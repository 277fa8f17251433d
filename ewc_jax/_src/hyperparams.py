"""Setting lam and gamma in an optimiser state: one way, without retracing."""

from typing import Any, Optional

import jax
import jax.numpy as jnp

from ewc_jax._src import states as states_lib
from ewc_jax._src import tree as tree_lib
from ewc_jax._src import validate
from ewc_jax._src.kfac.state import KFACEWCState
from ewc_jax._src.transform import EWCState

_PULLS = (EWCState, KFACEWCState)
# Where each state keeps its decay: both names, so that tree_get/tree_set
# stay unambiguous in a chain that holds both.
_GAMMA_FIELD = {EWCState: "gamma", KFACEWCState: "kfac_gamma"}


def _holds_pull(tree) -> bool:
  return bool(tree_lib.find(tree, EWCState) or tree_lib.find(
      tree, KFACEWCState))


def _like(old, new):
  """``new`` as an array of ``old``'s dtype and shape (no retrace)."""
  old_value = tree_lib.value(old)
  return tree_lib.rewrap(old, jnp.broadcast_to(
      jnp.asarray(new, jnp.result_type(old_value)), jnp.shape(old_value)))


def set_hyperparams(opt_state: Any, *, lam: Optional[Any] = None,
                    gamma: Optional[Any] = None) -> Any:
  """Sets the EWC strength and decay in ``opt_state``, for every pull in it.

  ``lam`` is an update hyperparameter: it lives where
  ``optax.inject_hyperparams`` keeps it, around :func:`ewc_jax.ewc` or
  :func:`ewc_jax.kfac_ewc`. ``gamma`` is consolidation data: it lives in the
  states themselves (``EWCState.gamma``, ``KFACEWCState.kfac_gamma``). This
  helper knows both places; the values keep their dtype and shape, so a
  jitted step taking ``opt_state`` is not retraced, and a stacked state (a
  vmapped sweep, one member per row) takes one value per member.

  Example:
    >>> import jax.numpy as jnp, optax, ewc_jax
    >>> ewc = optax.inject_hyperparams(ewc_jax.ewc,
    ...                                static_args=("mode", "gamma"))
    >>> opt = optax.chain(ewc(lam=1.0, mode="online"), optax.sgd(0.1))
    >>> state = opt.init({'w': jnp.zeros(2)})
    >>> state = ewc_jax.set_hyperparams(state, lam=30.0, gamma=0.9)
    >>> float(optax.tree_utils.tree_get(state, "lam"))
    30.0

  Args:
    opt_state: an optimiser state holding ewc/kfac_ewc states.
    lam: the new strength (>= 0), or ``None`` to keep it.
    gamma: the new online decay (in [0, 1]), or ``None`` to keep it.

  Returns:
    ``opt_state`` with the values replaced.

  Raises:
    ValueError: no pull in ``opt_state``; ``lam`` given but no
      ``inject_hyperparams`` around a pull holds one (a constant
      ``ewc(lam)`` cannot be changed: rebuild it injectable); bad values.
  """
  if not _holds_pull(opt_state):
    raise ValueError("set_hyperparams found no ewc_jax.ewc or kfac_ewc state "
                     "in opt_state.")
  if lam is not None:
    if jnp.ndim(lam) == 0:
      validate.check_lam(lam)
    opt_state = _set_lam(opt_state, lam)
  if gamma is not None:
    if tree_lib.is_concrete(gamma) and not bool(jnp.all(
        validate.gamma_ok(jnp.asarray(gamma, jnp.float32)))):
      raise ValueError(f"gamma must be in [0, 1], got {gamma!r}.")
    for cls, field in _GAMMA_FIELD.items():
      opt_state = states_lib.replace_states(
          opt_state, cls,
          lambda s, f=field: s._replace(**{f: _like(getattr(s, f), gamma)}))
  return opt_state


def _set_lam(opt_state, lam):
  found = [False]
  inject = states_lib.INJECT_STATES

  def visit(node):
    if not isinstance(node, inject) or "lam" not in node.hyperparams or (
        not _holds_pull(node.inner_state)):
      return node
    found[0] = True
    hyper = dict(node.hyperparams)
    hyper["lam"] = _like(hyper["lam"], lam)
    return node._replace(hyperparams=hyper)

  out = jax.tree.map(visit, opt_state,
                     is_leaf=lambda x: isinstance(x, inject))
  if not found[0]:
    raise ValueError(
        "set_hyperparams(lam=...) found no injected lam: ewc_jax.ewc(lam) "
        "keeps lam as a constant of the transformation. Build it with "
        "optax.inject_hyperparams(ewc_jax.ewc, static_args=('mode', "
        "'gamma'))(lam=...) (kfac_ewc: static_args=('gamma', 'max_tasks')).")
  return out
