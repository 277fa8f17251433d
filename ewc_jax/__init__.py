"""ewc_jax: Elastic Weight Consolidation for JAX and optax.

Diagonal and Kronecker-factored Fisher estimators on any params pytree, and
the EWC pull as optax gradient transformations.
"""

from ewc_jax import continual
from ewc_jax._src.fisher import ESTIMATORS
from ewc_jax._src.empirical import empirical_fisher
from ewc_jax._src.fisher import fisher_diagonal
from ewc_jax._src.hyperparams import set_hyperparams
from ewc_jax._src.importance import SIState
from ewc_jax._src.importance import mas_importance
from ewc_jax._src.importance import si_importance
from ewc_jax._src.importance import si_reset
from ewc_jax._src.importance import synaptic_intelligence
from ewc_jax._src.jaxpr.kronecker import DenseLayer
from ewc_jax._src.kfac.consolidate import kfac_consolidate
from ewc_jax._src.kfac.fisher import KFACCurvature
from ewc_jax._src.kfac.fisher import KroneckerFactors
from ewc_jax._src.kfac.fisher import dense_layers
from ewc_jax._src.kfac.fisher import kfac_fisher
from ewc_jax._src.kfac.penalty import kfac_penalty
from ewc_jax._src.kfac.state import KFACEWCState
from ewc_jax._src.kfac.transform import kfac_ewc
from ewc_jax._src.transform import EWCState
from ewc_jax._src.transform import consolidate
from ewc_jax._src.transform import ewc
from ewc_jax._src.transform import ewc_penalty
from ewc_jax._src.transform import penalty
from ewc_jax._src.types import Estimator
from ewc_jax._src.types import Mode

__version__ = "0.2.0"

__all__ = [
    "DenseLayer",
    "ESTIMATORS",
    "EWCState",
    "Estimator",
    "KFACCurvature",
    "KFACEWCState",
    "KroneckerFactors",
    "Mode",
    "SIState",
    "consolidate",
    "continual",
    "dense_layers",
    "empirical_fisher",
    "ewc",
    "ewc_penalty",
    "fisher_diagonal",
    "kfac_consolidate",
    "kfac_ewc",
    "kfac_fisher",
    "kfac_penalty",
    "mas_importance",
    "penalty",
    "set_hyperparams",
    "si_importance",
    "si_reset",
    "synaptic_intelligence",
]
