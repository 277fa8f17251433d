"""What the EWC-style transformations share: their states inside optax's.

:func:`ewc_jax.ewc` and :func:`ewc_jax.kfac_ewc` keep their curvature and
anchors in a state that sits anywhere in an optimiser's state (inside
``optax.chain``, ``inject_hyperparams``, ``masked``, ``multi_transform``, an
``nnx.Optimizer``); the helpers here find those states, the lam an
``inject_hyperparams`` holds for them, fold one task's diagonal quadratic
into the running one, and give the messages both transformations raise.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ewc_jax._src import tree as tree_lib
from ewc_jax._src import validate

# optax.inject_hyperparams' states: where an injected lam lives.
INJECT_STATES = (optax.InjectHyperparamsState,
                 optax.InjectStatefulHyperparamsState)


def no_params_message(name: str) -> str:
  return (f"{name} needs the current parameters: call "
          "`optimizer.update(grads, opt_state, params)`; params was None.")


def check_params(params: Any, name: str = "params") -> None:
  """Refuses an ``optax.LookaheadParams`` where one tree is needed.

  Under ``optax.lookahead`` the EWC state regularises the fast parameters
  (those the inner optimiser updates): consolidate with ``.fast`` (or
  ``.slow``, the synchronised ones), and the Fisher at the same.
  """
  if isinstance(params, optax.LookaheadParams):
    raise ValueError(
        f"{name} is an optax.LookaheadParams: pass .fast (the parameters "
        "the EWC pull acts on under optax.lookahead) or .slow (the "
        "synchronised ones), with the Fisher taken at the same.")


def check_mode_and_gamma(mode: Any, modes: tuple, gamma: Any, field: str,
                         static_args: str) -> float:
  """Checks a transformation's mode and initial gamma; the gamma as float."""
  validate.choice("mode", mode, modes)
  gamma0 = validate.check_gamma(gamma, field, static_args)
  if mode == "separate" and gamma0 != 1.0:
    raise ValueError(
        f'gamma decays old tasks only in mode="online"; got gamma={gamma!r} '
        'with mode="separate" (which keeps every task at full weight).')
  return gamma0


def with_lam(opt_state: Any, cls: type, lam: Any = None) -> list[tuple]:
  """``(state, lam)`` for each ``cls`` state; lam from the nearest injection.

  An ``inject_hyperparams`` around the transformation holds its ``lam`` in
  ``hyperparams``; a constant ``ewc(lam)`` holds none (``lam`` stays the
  default given here).
  """
  is_node = lambda x: isinstance(x, (cls,) + INJECT_STATES)  # noqa: E731
  found = []
  for node in jax.tree.leaves(opt_state, is_leaf=is_node):
    if isinstance(node, cls):
      found.append((node, lam))
    elif isinstance(node, INJECT_STATES):
      found += with_lam(node.inner_state, cls,
                        tree_lib.value(node.hyperparams.get("lam", lam)))
  return found


def replace_states(opt_state: Any, cls: type, fn) -> Any:
  """``opt_state`` with every ``cls`` state ``s`` replaced by ``fn(s)``."""
  return jax.tree.map(lambda s: fn(s) if isinstance(s, cls) else s,
                      opt_state, is_leaf=lambda x: isinstance(x, cls))


def f32(x: Any) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def copy_f32(x: Any) -> jax.Array:
  """A float32 copy: a state must never alias the caller's params
  (a donated train step would then free a buffer the state still uses)."""
  return jnp.array(x, jnp.float32, copy=True)


def rounded(x: jax.Array) -> jax.Array:
  """``x`` rounded to its dtype before it is added to anything.

  Inside ``jit`` XLA contracts ``c + a * b`` into a fused multiply-add,
  which rounds once where the op-by-op sum rounds twice, so the compiled
  fold would differ from the eager one in the last bit (and ten tasks of
  training turn that bit into another table). A select on the product
  keeps it whole; the value is ``x`` itself (nan stays nan).
  ``lax.optimization_barrier`` does not stop the contraction.
  """
  return jnp.where(x == x, x, jnp.nan)


def fold_centre(a: jax.Array, c: jax.Array, f: Any, p: Any) -> jax.Array:
  """The centre of ``A (x - c)^2 + F (x - p)^2``: ``c + F / (A + F) (p - c)``.

  Exactly the anchor ``p`` for the first task (and wherever ``A + F = 0``).
  """
  total = a + f32(f)
  share = f32(f) / jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, c + rounded(share * (f32(p) - c)), f32(p))


def fold_gap(a: jax.Array, c: jax.Array, f: Any, p: Any) -> jax.Array:
  """What no parameter value removes: ``sum A F / (A + F) (c - p)^2``."""
  total = a + f32(f)
  w = a * f32(f) / jnp.where(total > 0, total, 1.0)
  return jnp.sum(rounded(w * jnp.square(c - f32(p))))


def poison(ok: Any, x: jax.Array) -> jax.Array:
  """``x`` where ``ok``, else nan: under jit a refused state is never used
  silently (every later pull is nan, and the next check outside jit names
  the cause)."""
  if ok is None:
    return x
  return jnp.where(ok, x, jnp.nan)
