"""Checks of scalar arguments: one home for every error about a number.

Counts, choices, lam, gamma, SI's xi and PRNG keys. Each raises one line
that names the argument and says what is accepted; traced values (inside
``jax.jit``, or injected by ``optax.inject_hyperparams``) are checked for
type and shape only. Pytree checks that name a path live in ``tree.py``.
"""

import numbers
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax._src import tree as tree_lib


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def positive_int(name: str, value: Any) -> int:
  """``value`` as an int (NumPy integers accepted), else a ValueError."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
      value < 1):
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return int(value)


def positive_int_or_none(name: str, value: Any) -> Optional[int]:
  """``None``, or ``value`` as a positive int (else a ValueError)."""
  if value is None:
    return None
  try:
    return positive_int(name, value)
  except ValueError:
    raise ValueError(f"{name} must be None or a positive int, got "
                     f"{value!r}.") from None


def choice(name: str, value: Any, options: Sequence[str]) -> str:
  """``value`` if it is one of ``options``, else a ValueError naming them."""
  if not isinstance(value, str) or value not in options:
    raise ValueError(f"{name} must be one of {tuple(options)}, got "
                     f"{value!r}.")
  return value


def check_lam(lam: Any, transform: str = "ewc_jax.ewc",
              static_args: str = "('mode',)") -> None:
  """Raises a clear error unless ``lam`` is a finite real scalar >= 0.

  Args:
    lam: the value to check.
    transform: the transformation named in the schedule hint.
    static_args: its ``static_args`` for ``optax.inject_hyperparams``.

  Raises:
    TypeError: ``lam`` is not a real number or real scalar array.
    ValueError: ``lam`` is negative, nan, inf or not a scalar.
  """
  if callable(lam) and not _is_array(lam):
    raise TypeError(
        "lam must be a number >= 0, got a callable; for a schedule use "
        f"optax.inject_hyperparams({transform}, static_args={static_args})"
        "(lam=schedule).")
  is_number = isinstance(lam, numbers.Real) and not isinstance(lam, bool)
  is_real_array = ((_is_array(lam) or tree_lib.is_tracer(lam))
                   and (jnp.issubdtype(lam.dtype, jnp.floating)
                        or jnp.issubdtype(lam.dtype, jnp.integer)))
  if not (is_number or is_real_array):
    raise TypeError(
        f"lam must be a number >= 0 (float, int or a real scalar array), "
        f"got {lam!r} of type {type(lam).__name__}.")
  if jnp.ndim(lam) != 0:
    raise ValueError(f"lam must be a scalar, got shape {jnp.shape(lam)}.")
  if tree_lib.is_concrete(lam):
    value = float(np.asarray(lam))
    if not np.isfinite(value) or value < 0:
      raise ValueError(f"lam must be a finite number >= 0, got {value}.")


def check_gamma(gamma: Any, field: str = "EWCState.gamma",
                static_args: str = "('mode', 'gamma')") -> float:
  """``gamma`` (None: 1) as a float, or a clear error.

  Args:
    gamma: the value to check.
    field: the state field that holds it (named in the array hint).
    static_args: the ``static_args`` that hint suggests.

  Raises:
    TypeError: ``gamma`` is an array (say injected by
      ``optax.inject_hyperparams``) or not a number.
    ValueError: ``gamma`` is outside (0, 1].
  """
  if gamma is None:
    return 1.0
  if _is_array(gamma) or tree_lib.is_tracer(gamma):
    name = field.rsplit(".", 1)[-1]
    raise TypeError(
        "gamma arrived as an array: it is consolidation data kept in "
        f"{field}, not an update hyperparameter. With "
        "optax.inject_hyperparams list it as static (static_args="
        f"{static_args}); to change it later use "
        f"optax.tree_utils.tree_set(opt_state, {name}=...).")
  if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
    raise TypeError(f"gamma must be a number in (0, 1], got {gamma!r}.")
  if not 0.0 < float(gamma) <= 1.0:
    raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}.")
  return float(gamma)


def check_state_gamma(gamma: Any, field: str, separate: bool) -> None:
  """The decay a state holds (set by ``tree_set``?), before consolidation.

  Online mode needs a finite gamma in [0, 1] (a negative one would push the
  weights away from the anchor); separate mode keeps every task at full
  weight and needs exactly 1. Traced values are left to the state's own
  poisoning (see :func:`gamma_ok`).
  """
  if not tree_lib.is_concrete(gamma):
    return
  values = np.asarray(jax.device_get(gamma), np.float64)
  if separate and np.any(values != 1.0):
    raise ValueError(
        'gamma decays old tasks only in mode="online", but a separate-mode '
        f"state holds {field}={values.tolist()} (set with tree_set?); "
        "separate mode keeps every task at full weight: set it back to 1, "
        'or build the optimiser with mode="online" and gamma=....')
  if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(
      values > 1):
    raise ValueError(
        f"{field} must be a finite number in [0, 1] at consolidation, got "
        f"{values.tolist()} (set with tree_set?): it weighs the old "
        "curvature, and outside [0, 1] it would grow it or turn the pull "
        "away from the anchor.")


def gamma_ok(gamma: jax.Array) -> jax.Array:
  """True where ``gamma`` is a finite number in [0, 1] (works under jit)."""
  return jnp.isfinite(gamma) & (gamma >= 0) & (gamma <= 1)


def check_xi(xi: Any) -> None:
  """Raises a clear error unless ``xi`` is a finite real number > 0.

  Traced values are checked for dtype and shape only.
  """
  is_number = isinstance(xi, numbers.Real) and not isinstance(xi, bool)
  is_real_array = ((_is_array(xi) or tree_lib.is_tracer(xi))
                   and jnp.ndim(xi) == 0
                   and jnp.issubdtype(xi.dtype, jnp.floating))
  if not (is_number or is_real_array):
    raise ValueError(f"xi must be a number > 0, got {xi!r}.")
  if tree_lib.is_concrete(xi):
    value = float(np.asarray(xi))
    if not (np.isfinite(value) and value > 0):
      raise ValueError(f"xi must be a finite number > 0, got {value}.")


def check_sampling(estimator: Any, rng: Any, num_samples: Any) -> None:
  """An estimator that draws labels needs one PRNG key and a count."""
  if not estimator.needs_key:
    return
  if rng is None:
    raise ValueError(
        f'estimator="{estimator.name}" draws labels from the model and needs '
        "rng, a jax.random key.")
  check_key("rng", rng)
  positive_int("num_samples", num_samples)  # NumPy ints too


def check_key(name: str, key: Any) -> None:
  """Raises a clear error unless ``key`` is ONE ``jax.random`` key.

  Accepts a typed key (``jax.random.key(0)``) or a raw ``uint32`` key
  (``jax.random.PRNGKey(0)``); refuses ints and batches of keys.
  """
  dtype = getattr(key, "dtype", None)
  if dtype is None or not hasattr(key, "shape"):
    raise ValueError(
        f"{name} must be one jax.random key, e.g. jax.random.key(0); got "
        f"{type(key).__name__} {key!r}.")
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    ok = key.shape == ()
  else:
    ok = dtype == jnp.uint32 and len(key.shape) == 1
  if not ok:
    raise ValueError(
        f"{name} must be one jax.random key, e.g. jax.random.key(0); got an "
        f"array of dtype {dtype} and shape {tuple(key.shape)} (split keys "
        "are a batch: pass one of them).")
