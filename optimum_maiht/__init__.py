"""optimum-maiht: one-shot pruning of causal LMs with mAIHT, an Optimum plugin."""

from .configuration import MAIHTConfig
from .pruner import MAIHTPruner
from .solver import SolverResult, maiht_prune

__version__ = "0.1.0"

__all__ = ["MAIHTConfig", "MAIHTPruner", "SolverResult", "maiht_prune", "__version__"]
