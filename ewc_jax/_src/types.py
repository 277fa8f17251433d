"""Names the library accepts, as ``Literal`` types for type checkers.

Each alias has a tuple of its values beside it, for validation at run time
(``typing.get_args`` of the alias), so the two can never disagree.
"""

from typing import Literal, get_args

import jax

# How the diagonal Fisher is estimated (see ewc_jax.fisher_diagonal):
# "exact" sums over all classes weighted by the model's p(y|x), "sampled"
# draws y from p(.|x), "empirical" uses the data label, "predicted" the
# model's own argmax label (van de Ven & Tolias 2019), "batched" squares a
# mini-batch mean gradient.
Estimator = Literal["exact", "sampled", "empirical", "predicted", "batched"]
ESTIMATOR_NAMES: tuple[str, ...] = get_args(Estimator)

# How ewc_jax.consolidate folds a finished task in: "separate" keeps one
# quadratic per past task (summed), "online" decays the old Fisher by gamma
# and anchors a single quadratic at the latest parameters.
Mode = Literal["separate", "online"]
MODE_NAMES: tuple[str, ...] = get_args(Mode)


@jax.tree_util.register_static
class StaticStr(str):
  """A string that pytrees carry as static data (in the treedef), not a leaf.

  :class:`EWCState` holds its mode this way: ``consolidate`` branches on it
  in Python, and jit sees it as part of the state's structure.
  """
