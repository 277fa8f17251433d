"""Continual fine-tuning with EWC in one call (the PyTorch snippet's shape).

``continual_fine_tune(loss_fn, params, old_data, new_data, lam=...)``
computes the importance of each parameter on the old data, then trains on
the new data with ``optax.chain(ewc_jax.ewc(lam), optimizer)``, and returns
a :class:`FineTuneResult` whose ``opt_state`` chains a further data set.
"""

from ewc_jax._src.continual import DEFAULT_OPTIMIZER
from ewc_jax._src.continual import FineTuneResult
from ewc_jax._src.continual import continual_fine_tune

__all__ = [
    "DEFAULT_OPTIMIZER",
    "FineTuneResult",
    "continual_fine_tune",
]
