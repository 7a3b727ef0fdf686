"""`Embedding`: a lookup table, row `i` of `weight` is the vector of token `i`."""
from __future__ import annotations

from .. import backend
from . import functional as F
from .module import Module
from .parameter import Parameter


class Embedding(Module):
    """weight (num_embeddings, embedding_dim) ~ N(0, std^2); std=1 as in PyTorch
    (language models usually pass a smaller one, e.g. 0.02 as GPT-2)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float = 1.0,
                 device: str = "cpu", dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        dtype = dtype or backend.default_float_dtype()
        w = backend.rng(device).standard_normal((num_embeddings, embedding_dim), dtype=dtype)
        self.weight = Parameter(w * std)

    def forward(self, ids):
        # ids (...) int -> (..., embedding_dim):  out[...] = weight[ids[...]]
        return F.embedding(ids, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"
