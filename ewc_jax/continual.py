"""Continual fine-tuning with EWC, in the shape of the PyTorch snippet.

``continual_fine_tune(loss_fn, params, old_data, new_data, lam=...)``
computes the importance of each parameter on the old data, then trains on
the new data with ``optax.chain(ewc_jax.ewc(lam), optimizer)``.
"""

from ewc_jax._src.continual import DEFAULT_OPTIMIZER
from ewc_jax._src.continual import IMPORTANCE_ESTIMATORS
from ewc_jax._src.continual import compute_importance
from ewc_jax._src.continual import continual_fine_tune
from ewc_jax._src.continual import evaluate
from ewc_jax._src.continual import train

__all__ = [
    "DEFAULT_OPTIMIZER",
    "IMPORTANCE_ESTIMATORS",
    "compute_importance",
    "continual_fine_tune",
    "evaluate",
    "train",
]
