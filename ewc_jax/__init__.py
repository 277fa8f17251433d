"""ewc_jax: Elastic Weight Consolidation for JAX and optax.

Diagonal Fisher estimators on any params pytree, and the EWC pull as an optax
gradient transformation.
"""

from ewc_jax import continual
from ewc_jax._src.fisher import ESTIMATORS
from ewc_jax._src.fisher import empirical_fisher
from ewc_jax._src.fisher import fisher_diagonal
from ewc_jax._src.transform import EWCState
from ewc_jax._src.transform import consolidate
from ewc_jax._src.transform import ewc
from ewc_jax._src.transform import ewc_penalty
from ewc_jax._src.transform import penalty
from ewc_jax._src.types import Estimator
from ewc_jax._src.types import Mode

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS",
    "EWCState",
    "Estimator",
    "Mode",
    "consolidate",
    "continual",
    "empirical_fisher",
    "ewc",
    "ewc_penalty",
    "fisher_diagonal",
    "penalty",
]
