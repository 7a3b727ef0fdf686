"""Neural-network layers built from autograd ops (PyTorch names, NumPy axis words)."""
from . import functional
from . import functional as F
from .containers import ModuleList, Sequential
from .dropout import Dropout
from .embedding import Embedding
from .linear import Linear
from .module import Module
from .norm import LayerNorm, RMSNorm
from .parameter import Parameter
from .recompute import recompute

__all__ = [
    "F", "functional", "Module", "Parameter", "Linear", "Embedding", "LayerNorm",
    "RMSNorm", "Dropout", "Sequential", "ModuleList", "recompute",
]
