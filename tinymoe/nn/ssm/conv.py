"""`CausalConv1d`: Mamba's depthwise causal convolution over time, as a Module.

    y[b, c, t] = bias[c] + sum_k weight[c, 0, k] x[b, c, t - (K - 1) + k]

Each channel c has its own K taps (depthwise) and sees only the present and the
K - 1 past steps (causal). Weight (C, 1, K) as PyTorch's nn.Conv1d(groups=C).
"""
from __future__ import annotations

import math

from .. import functional as F
from ..linear import uniform
from ..module import Module
from ..parameter import Parameter


class CausalConv1d(Module):
    def __init__(self, channels: int, kernel_size: int, bias: bool = True, dtype=None):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"CausalConv1d: kernel_size (d_conv) must be >= 1, got {kernel_size}")
        self.channels, self.kernel_size = channels, kernel_size
        bound = 1.0 / math.sqrt(kernel_size)                       # PyTorch: fan_in = K (depthwise)
        self.weight = Parameter(uniform((channels, 1, kernel_size), bound, dtype=dtype))
        self.bias = Parameter(uniform((channels,), bound, dtype=dtype)) if bias else None

    def forward(self, x):
        # x (B, C, L) -> (B, C, L)
        return F.conv1d_causal(x, self.weight, self.bias)

    def step(self, x_t, conv_state):
        """One time step: x_t (B, C) array; conv_state (B, C, K) holds x_{t-K+1..t} after
        the call (updated in place). Returns y_t (B, C) array."""
        conv_state[:, :, :-1] = conv_state[:, :, 1:]               # shift the window left
        conv_state[:, :, -1] = x_t
        y = (conv_state * self.weight.data[:, 0, :]).sum(axis=-1)  # sum_k w_k x_{t-K+1+k}
        return y + self.bias.data if self.bias is not None else y

    def extra_repr(self):
        return f"{self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"
