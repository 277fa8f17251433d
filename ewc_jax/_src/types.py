"""Names the library accepts, and the static mode tags its states carry.

Each ``Literal`` alias has a tuple of its values beside it, for validation
at run time (``typing.get_args`` of the alias), so the two never disagree.
The estimators' Literal lives with their table (``estimators.py``).
"""

from typing import Literal, NamedTuple, get_args

from ewc_jax._src.estimators import EstimatorName

Estimator = EstimatorName

# How ewc_jax.consolidate folds a finished task in: "separate" keeps one
# quadratic per past task (summed), "online" decays the old Fisher by gamma
# and anchors a single quadratic at the latest parameters.
Mode = Literal["separate", "online"]
MODE_NAMES: tuple[str, ...] = get_args(Mode)


def _tag_methods(name: str) -> dict:
  def eq(self, other):
    return isinstance(other, (str, SeparateMode, OnlineMode)) and (
        str(other) == name)
  return {"__eq__": eq, "__ne__": lambda self, other: not eq(self, other),
          "__hash__": lambda self: hash(name), "__str__": lambda self: name,
          "__repr__": lambda self: repr(name)}


class SeparateMode(NamedTuple):
  """``mode="separate"`` as pytree structure: a node with no leaves.

  A state's mode must be static (``consolidate`` branches on it in Python;
  ``jit`` sees it in the state's tree structure), and a leafless NamedTuple
  is what every pytree serialiser keeps: ``flax.serialization`` and orbax
  restore it from the target's structure. It equals the string
  ``"separate"``.
  """
  locals().update(_tag_methods("separate"))


class OnlineMode(NamedTuple):
  """``mode="online"`` as pytree structure (see :class:`SeparateMode`)."""
  locals().update(_tag_methods("online"))


def mode_tag(mode: str):
  """The static tag of ``mode`` (``"separate"`` or ``"online"``)."""
  return SeparateMode() if mode == "separate" else OnlineMode()
