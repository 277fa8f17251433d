"""Folding a finished task into every :func:`ewc_jax.kfac_ewc` state."""

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax._src import states as states_lib
from ewc_jax._src import tree as tree_lib
from ewc_jax._src import validate
from ewc_jax._src.kfac import fisher as fisher_lib
from ewc_jax._src.kfac import packing
from ewc_jax._src.kfac.state import KFACEWCState


def _factors_for(s: KFACEWCState, curvature) -> list:
  """The curvature's factors of each layer the state holds, in order.

  The one place where the state's layers meet the curvature's.
  """
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


def _diagonal_leaf(fd, path, shape):
  f = fd.get(path)
  if f is None or tree_lib.is_masked(f):
    raise ValueError(
        f"the kfac_ewc state keeps a diagonal Fisher at params{path}, but "
        f"curvature.diagonal{path} is "
        f"{'missing' if f is None else 'a Kronecker block leaf'}; build "
        "kfac_ewc with this curvature's layers.")
  if jnp.shape(f) != shape:
    raise ValueError(f"curvature.diagonal{path} has shape {jnp.shape(f)};"
                     f" the kfac_ewc state's has {shape}.")
  return states_lib.f32(f)


def _param_leaf(p, path, shape):
  if path not in p or jnp.shape(p[path]) != shape:
    got = "missing" if path not in p else jnp.shape(p[path])
    raise ValueError(f"params{path} is {got}; the kfac_ewc state was "
                     f"initialised with shape {shape}.")
  return states_lib.copy_f32(p[path])  # no alias (donation)


def _fold(s: KFACEWCState, params, curvature) -> KFACEWCState:
  """Folds one finished task (anchor ``params``) into ``s``."""
  factors = _factors_for(s, curvature)
  p = tree_lib.leaves_by_path(params)
  fd = tree_lib.leaves_by_path(curvature.diagonal, is_leaf=tree_lib.is_masked)
  online = s.kfac_mode == "online"
  gamma = tree_lib.value(s.kfac_gamma)
  decay = gamma if online else jnp.float32(1.0)
  matrices = [packing.matrix(ly, p) for ly in s.layers.layers]
  a, g, weight, task_anchor, ok = s.layers.store.fold(s, factors, matrices,
                                                      decay)
  if online:  # a bad gamma under jit: poisoned, never a plausible pull
    good = validate.gamma_ok(gamma)
    ok = good if ok is None else ok & good
    a = tuple(states_lib.poison(good, x) for x in a)
  diag, anchor = [], []
  d_pairs, d_def = _pairs(s.diagonal)
  c_pairs, c_def = _pairs(s.anchor)
  for (path, fs), (_, c) in zip(d_pairs, c_pairs):
    if tree_lib.is_masked(c):  # left out by optax.masked
      diag.append(fs)
      anchor.append(c)
      continue
    theta = _param_leaf(p, path, c.shape)
    if tree_lib.is_masked(fs):  # a held layer's leaf
      diag.append(fs)
      anchor.append(theta)
      continue
    f = _diagonal_leaf(fd, path, fs.shape)
    anchor.append(theta if online else states_lib.fold_centre(fs, c, f,
                                                              theta))
    diag.append(states_lib.poison(ok, decay * fs + f))
  return s._replace(
      a=a, g=g, weight=weight, task_anchor=task_anchor,
      diagonal=d_def.unflatten(diag), anchor=c_def.unflatten(anchor),
      kfac_num_tasks=s.kfac_num_tasks + 1)


def _pairs(tree):
  pl, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=tree_lib.is_masked)
  return [(tree_lib.path_str(q), x) for q, x in pl], treedef


def kfac_consolidate(opt_state: Any, params: Any,
                     curvature: fisher_lib.KFACCurvature) -> Any:
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
  found = tree_lib.find(opt_state, KFACEWCState)
  if not found:
    raise ValueError(
        "kfac_consolidate found no ewc_jax.kfac_ewc state in opt_state; build "
        "the optimiser with optax.chain(ewc_jax.kfac_ewc(lam, layers), ...).")
  for s in found:
    capacity = s.layers.store.capacity
    if capacity is not None and tree_lib.is_concrete(s.kfac_num_tasks):
      done = int(np.max(np.asarray(jax.device_get(s.kfac_num_tasks))))
      if done >= capacity:
        raise ValueError(
            f"kfac_consolidate: the kfac_ewc state already holds {done} "
            f"tasks, its max_tasks={capacity}; another would not fit. Build "
            "kfac_ewc with a larger max_tasks (memory and step time grow "
            'linearly with it), or use mode="online" with max_tasks=None '
            "(pooled factors, constant memory).")
    if s.kfac_mode == "online":  # separate mode ignores it (weight 1)
      validate.check_state_gamma(tree_lib.value(s.kfac_gamma),
                                 "KFACEWCState.kfac_gamma", False)
  states_lib.check_params(params)
  fisher_lib.check_curvature(curvature, params)
  tree_lib.check_floating("params", params)
  tree_lib.check_finite("params", params)
  tree_lib.check_finite("curvature", curvature.factors)
  tree_lib.check_finite("curvature.diagonal", jax.tree.leaves(
      curvature.diagonal), nonnegative=True)
  if tree_lib.all_zero((curvature.factors, jax.tree.leaves(
      curvature.diagonal))):
    warnings.warn("kfac_consolidate got a curvature that is zero everywhere: "
                  "this task adds no penalty.", stacklevel=2)
  return states_lib.replace_states(
      opt_state, KFACEWCState, lambda s: _fold(s, params, curvature))
