"""`Dropout` (Srivastava et al., 2014): in training, zero each entry with probability
p and scale the rest by 1/(1-p), so the expected value is unchanged; in eval, identity."""
from __future__ import annotations

from . import functional as F
from .module import Module


class Dropout(Module):
    def __init__(self, p: float = 0.1):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        # The mask is drawn from tinymoe.backend.rng, so manual_seed makes it reproducible.
        return F.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"
