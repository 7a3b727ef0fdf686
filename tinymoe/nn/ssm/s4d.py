"""`S4D`: a trainable diagonal LTI SSM layer (Gu et al. 2022, "On the Parameterization
and Initialization of Diagonal State Space Models"), the time-invariant baseline that
Mamba makes selective.

Each of H channels is an independent SISO system with a diagonal N x N state matrix:

    A = -exp(A_log)           (H, N), real and negative: a stable system (S4D-Real,
                              initialized to A_n = -(n + 1), as Mamba's A_log)
    Delta = exp(log_dt)       (H,), one step size per channel, log-uniform in [1e-3, 1e-1]
    A_bar = exp(Delta A),  B_bar = (A_bar - 1) / A * B        zero-order hold, diagonal
    h_t = A_bar h_{t-1} + B_bar x_t,  y_t = C . h_t + D x_t

The parameters do not depend on the input (that is what "time-invariant" means), so
the whole layer is one convolution with K_j = sum_n C_n B_bar_n A_bar_n^j: mode
"conv" builds K and multiplies by its (L, L) Toeplitz matrix; mode "recurrent" runs
the recurrence. Both give the same output.
"""
from __future__ import annotations

import math

import numpy as np

from ... import backend
from ...autograd.ops import stack
from ...autograd.tensor import Tensor
from .. import functional as F
from ..linear import Linear
from ..module import Module
from ..parameter import Parameter
from .conv import CausalConv1d


class S4D(Module):
    """x (B, L, H) -> y (B, L, H): H channels, each a diagonal LTI SSM with N states."""

    def __init__(self, d_model: int, d_state: int = 16, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, mode: str = "conv", dtype=None):
        super().__init__()
        if d_state < 1 or d_model < 1:
            raise ValueError(f"S4D: d_model and d_state must be >= 1, got {d_model}, {d_state}")
        if mode not in ("conv", "recurrent"):
            raise ValueError(f"S4D: mode must be 'conv' or 'recurrent', got {mode!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"S4D: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        dtype = dtype or backend.default_float_dtype()
        rng = backend.rng("cpu")
        H, N = d_model, d_state
        self.d_model, self.d_state, self.mode = H, N, mode
        self.A_log = Parameter(np.log(np.tile(np.arange(1, N + 1), (H, 1))).astype(dtype))
        self.B = Parameter(np.ones((H, N), dtype))
        self.C = Parameter((rng.standard_normal((H, N)) / math.sqrt(N)).astype(dtype))
        log_dt = rng.uniform(math.log(dt_min), math.log(dt_max), H)
        self.log_dt = Parameter(log_dt.astype(dtype))
        self.D = Parameter(np.ones(H, dtype))

    def discretize(self):
        """A_bar, B_bar (H, N) by zero-order hold."""
        A = -self.A_log.exp()                                     # (H, N), < 0
        dtA = self.log_dt.exp().unsqueeze(1) * A                  # Delta A  (H, N)
        A_bar = dtA.exp()                                         # exp(Delta A)
        B_bar = (A_bar - 1.0) / A * self.B                        # (exp(Delta A) - 1) / A B
        return A_bar, B_bar, dtA

    def kernel(self, L: int):
        """K (H, L): K_j = sum_n C_n B_bar_n A_bar_n^j."""
        _, B_bar, dtA = self.discretize()
        xp = backend.array_module(dtA.data)
        j = xp.arange(L, dtype=dtA.dtype)                         # (L,)
        powers = (dtA.unsqueeze(2) * j).exp()                     # A_bar^j = exp(j Delta A)  (H, N, L)
        return ((self.C * B_bar).unsqueeze(2) * powers).sum(axis=1)

    def forward(self, x):
        if x.ndim != 3 or x.shape[2] != self.d_model:
            raise ValueError(f"S4D: expected x (B, L, {self.d_model}), got {tuple(x.shape)}")
        x = x if isinstance(x, Tensor) else Tensor(x)
        return self._conv(x) if self.mode == "conv" else self._recurrent(x)

    def _conv(self, x):
        L = x.shape[1]
        K = self.kernel(L)                                        # (H, L)
        t, s = np.arange(L)[:, None], np.arange(L)[None, :]
        causal = backend.to_device((t >= s).astype(K.dtype), K.device)
        T = K[:, np.maximum(t - s, 0)] * causal                   # T[h, t, s] = K[h, t - s]  (H, L, L)
        y = T @ x.transpose(2, 1, 0)                              # sum_s K_{t-s} x_s  (H, L, B)
        return y.transpose(2, 1, 0) + x * self.D                  # (B, L, H)

    def _recurrent(self, x):
        A_bar, B_bar, _ = self.discretize()                       # (H, N)
        h = None
        ys = []
        for t in range(x.shape[1]):
            x_t = x[:, t, :].unsqueeze(2)                         # (B, H, 1)
            h = B_bar * x_t if h is None else A_bar * h + B_bar * x_t   # (B, H, N)
            ys.append((h * self.C).sum(axis=2))                   # C . h_t  (B, H)
        return stack(ys, axis=1) + x * self.D                     # (B, L, H)

    def extra_repr(self):
        return f"d_model={self.d_model}, d_state={self.d_state}, mode={self.mode!r}"


class S4DBlock(Module):
    """MambaBlock with the selection taken out: the same in_proj, causal conv, SiLU
    gate and out_proj around an S4D layer whose Delta, B, C do not depend on the
    input. The LTI baseline of the Selective Copying experiment (H3-like)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dtype=None):
        super().__init__()
        self.d_inner = d_inner = expand * d_model
        self.in_proj = Linear(d_model, 2 * d_inner, bias=False, dtype=dtype)
        self.conv1d = CausalConv1d(d_inner, d_conv, dtype=dtype)
        self.ssm = S4D(d_inner, d_state, dtype=dtype)
        self.out_proj = Linear(d_inner, d_model, bias=False, dtype=dtype)

    def forward(self, x):
        # x (B, L, d_model) -> (B, L, d_model)
        E = self.d_inner
        xz = self.in_proj(x)                                      # (B, L, 2E)
        x_c = F.silu(self.conv1d(xz[:, :, :E].transpose(0, 2, 1))).transpose(0, 2, 1)
        y = self.ssm(x_c) * F.silu(xz[:, :, E:])                  # (B, L, E)
        return self.out_proj(y)
