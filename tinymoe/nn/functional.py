"""tinymoe.nn.functional (import as F): the functional form of the layers' math.

Every function takes Tensors, NumPy/CuPy arrays or Python numbers, and returns a
Tensor. The derivatives live in the ops (tinymoe/autograd/ops/).
"""
from __future__ import annotations

from ..autograd.function import op_error
from ..autograd.ops import (
    Conv1dCausal,
    CrossEntropy,
    Dropout,
    Embedding,
    Gelu,
    LayerNorm,
    LinearFunction,
    LogSoftmax,
    RMSNorm,
    Relu,
    Sigmoid,
    Silu,
    Softmax,
    Softplus,
    Tanh,
    gather,
    index_add,
    masked_fill,
    one_hot,
    pad,
    split,
    topk,
)
from ..autograd.ops import scatter_add_op as scatter_add
from ..autograd.tensor import Tensor

__all__ = [
    "softmax", "log_softmax", "cross_entropy", "layer_norm", "rms_norm", "gelu", "silu",
    "softplus", "relu", "sigmoid", "tanh", "embedding", "dropout", "conv1d_causal",
    "linear", "gather", "scatter_add", "index_add", "topk", "one_hot", "pad",
    "masked_fill", "split",
]


def _data(x):
    return x.data if isinstance(x, Tensor) else x


def softmax(x, axis=-1):
    return Softmax.apply(x, axis=axis)


def log_softmax(x, axis=-1):
    return LogSoftmax.apply(x, axis=axis)


def cross_entropy(logits, targets, ignore_index: int = -100, reduction: str = "mean"):
    """Mean (or sum, or per-row) -log softmax(logits)[target]; logits (..., C), targets (...)."""
    targets = _data(targets)
    if reduction not in ("mean", "sum", "none"):
        raise op_error("cross_entropy", f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise op_error("cross_entropy", f"logits {tuple(logits.shape)} need targets of shape {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    if targets.dtype.kind not in "iu":
        raise op_error("cross_entropy", f"targets must be integer class ids, got {targets.dtype}", TypeError)
    return CrossEntropy.apply(logits, targets, ignore_index=ignore_index, reduction=reduction)


def layer_norm(x, weight, bias=None, eps: float = 1e-5):
    return LayerNorm.apply(x, weight, bias, eps=eps)


def rms_norm(x, weight, eps: float = 1e-5):
    return RMSNorm.apply(x, weight, eps=eps)


def gelu(x, approximate: str = "none"):
    """GELU; approximate="tanh" for the GPT-2 form."""
    return Gelu.apply(x, approximate=approximate)


def silu(x):
    return Silu.apply(x)


def softplus(x):
    return Softplus.apply(x)


def relu(x):
    return Relu.apply(x)


def sigmoid(x):
    return Sigmoid.apply(x)


def tanh(x):
    return Tanh.apply(x)


def embedding(ids, weight):
    """weight[ids]: ids (...) ints, weight (V, D) -> (..., D)."""
    return Embedding.apply(weight, _data(ids))


def dropout(x, p: float = 0.1, training: bool = True):
    """Zero each entry with probability p and scale the rest by 1/(1-p) (when training)."""
    if not 0 <= p < 1:
        raise op_error("dropout", f"p must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    return Dropout.apply(x, p=p)


def conv1d_causal(x, weight, bias=None):
    """Causal depthwise conv: x (B, C, L), weight (C, 1, K), bias (C,) -> (B, C, L)."""
    return Conv1dCausal.apply(x, weight, bias)


def linear(x, weight, bias=None):
    """x @ weight.T + bias with weight (out, in), as in PyTorch."""
    return LinearFunction.apply(x, weight, bias)
