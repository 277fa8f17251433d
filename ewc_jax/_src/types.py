"""Names the library accepts, and the static mode tags its states carry.

Each ``Literal`` alias has a tuple of its values beside it, for validation
at run time (``typing.get_args`` of the alias), so the two never disagree.
The estimators' Literal lives with their table (``estimators.py``).
"""

import collections
from typing import Any, Literal, get_args

from ewc_jax._src.estimators import EstimatorName

Estimator = EstimatorName

# How ewc_jax.consolidate folds a finished task in: "separate" keeps one
# quadratic per past task (summed), "online" decays the old Fisher by gamma
# and anchors a single quadratic at the latest parameters.
Mode = Literal["separate", "online"]
MODE_NAMES: tuple[str, ...] = get_args(Mode)


# A state's mode must be static (``consolidate`` branches on it in Python;
# ``jit`` sees it in the state's tree structure), and a namedtuple without
# fields is what every pytree serialiser keeps: ``flax.serialization`` and
# orbax restore it from the target's structure. Each tag equals its string.
SeparateMode = collections.namedtuple("SeparateMode", [])
OnlineMode = collections.namedtuple("OnlineMode", [])


def _stands_for(cls: type, name: str) -> None:
  def eq(self, other):
    return isinstance(other, (str, SeparateMode, OnlineMode)) and (
        str(other) == name)

  for attr, fn in {"__eq__": eq, "__ne__": lambda s, o: not eq(s, o),
                   "__hash__": lambda s: hash(name),
                   "__str__": lambda s: name,
                   "__repr__": lambda s: repr(name)}.items():
    setattr(cls, attr, fn)
  cls.__doc__ = f'``mode="{name}"`` as static pytree structure (no leaves).'


_stands_for(SeparateMode, "separate")
_stands_for(OnlineMode, "online")


def mode_tag(mode: str) -> Any:
  """The static tag of ``mode`` (``"separate"`` or ``"online"``)."""
  return SeparateMode() if mode == "separate" else OnlineMode()
