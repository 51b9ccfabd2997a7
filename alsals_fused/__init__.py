"""alsals-fused: the ALSALS optimizer (ADAM direction with momentum + stochastic Armijo line search)."""
from .backends import available_backends
from .backends.base import BackendUnavailable
from .config import VARIANTS
from .optimizer import ALSALS, StepInfo

__all__ = ["ALSALS", "StepInfo", "BackendUnavailable", "available_backends", "VARIANTS"]
__version__ = "0.1.0"
