"""The selective scan on the CPU with Numba: one thread per (batch, channel) row.

Each (b, d) row is an independent recurrence over time with an N-vector state, so
the forward keeps h in a length-N local array and never builds the (batch, d_inner,
L, N) tensor. The backward recomputes states: a first pass stores h only at chunk
boundaries (L / CHUNK vectors), then each chunk is recomputed into a (CHUNK + 1, N)
buffer and walked in reverse with the gradient recurrence of reference.py:

    g_t = dA_{t+1} g_{t+1} + dy_t C_t          (g_t = dL/dh_t)

dB and dC sum over channels, so threads own groups of channels and write partial
sums (batch, groups, L, N) that are added at the end: no two threads write the same
element, and the extra memory is `groups` (about the thread count) times dB, not
d_inner times.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

CHUNK = 64  # time steps recomputed at once in the backward


@njit(cache=True, inline="always")
def _softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))           # log(1 + e^x), stable


@njit(cache=True, inline="always")
def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@njit(cache=True, inline="always")
def _step_size(delta, bias, softplus):
    x = delta + bias
    return _softplus(x) if softplus else x                       # delta'


@njit(parallel=True, cache=True, fastmath=False)
def _forward(u, delta, A, Bt, Ct, D, z, delta_bias, has_z, softplus, out):
    """u, delta, z, out: (b, d, L); A: (d, N); Bt, Ct: (b, L, N); D, delta_bias: (d,)."""
    batch, d_inner, L = u.shape
    N = A.shape[1]
    for row in prange(batch * d_inner):
        b, d = row // d_inner, row % d_inner
        h = np.zeros(N, dtype=u.dtype)                           # the state h_t (N,)
        for t in range(L):
            dt = _step_size(delta[b, d, t], delta_bias[d], softplus)
            ut = u[b, d, t]
            y = 0.0
            for n in range(N):
                h[n] = math.exp(dt * A[d, n]) * h[n] + dt * Bt[b, t, n] * ut  # h_t
                y += Ct[b, t, n] * h[n]                          # y_t = C_t . h_t
            y += D[d] * ut
            if has_z:
                y *= z[b, d, t] * _sigmoid(z[b, d, t])           # y * silu(z)
            out[b, d, t] = y


@njit(parallel=True, cache=True, fastmath=False)
def _backward(dout, u, delta, A, Bt, Ct, D, z, delta_bias, has_z, softplus, groups,
              du, ddelta, dz, dA_part, dB_part, dC_part, dD_part):
    """Writes du, ddelta, dz: (b, d, L); partial sums dA_part (b, d, N),
    dB_part, dC_part (b, groups, L, N), dD_part (b, d). Thread job = (b, group)."""
    batch, d_inner, L = u.shape
    N = A.shape[1]
    n_chunks = (L + CHUNK - 1) // CHUNK
    for job in prange(batch * groups):
        b, grp = job // groups, job % groups
        h_start = np.empty((n_chunks, N), dtype=u.dtype)         # h_{t0 - 1} per chunk
        hs = np.empty((CHUNK + 1, N), dtype=u.dtype)             # h_{t0-1} .. h_{t1-1}
        g_next = np.empty(N, dtype=u.dtype)                      # dA_{t+1} g_{t+1}
        for d in range(grp, d_inner, groups):
            # 1) forward, keeping h only at chunk starts
            h = hs[0]
            h[:] = 0.0
            for t in range(L):
                if t % CHUNK == 0:
                    h_start[t // CHUNK] = h
                dt = _step_size(delta[b, d, t], delta_bias[d], softplus)
                for n in range(N):
                    h[n] = math.exp(dt * A[d, n]) * h[n] + dt * Bt[b, t, n] * u[b, d, t]
            # 2) chunks in reverse: recompute their states, then walk back in time
            g_next[:] = 0.0
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * CHUNK
                t1 = min(t0 + CHUNK, L)
                hs[0] = h_start[c]
                for t in range(t0, t1):
                    dt = _step_size(delta[b, d, t], delta_bias[d], softplus)
                    for n in range(N):
                        hs[t - t0 + 1, n] = (math.exp(dt * A[d, n]) * hs[t - t0, n]
                                             + dt * Bt[b, t, n] * u[b, d, t])
                for t in range(t1 - 1, t0 - 1, -1):
                    i = t - t0 + 1                               # hs[i] = h_t
                    dt = _step_size(delta[b, d, t], delta_bias[d], softplus)
                    ut = u[b, d, t]
                    dy = dout[b, d, t]
                    if has_z:                                    # out = y silu(z)
                        y = D[d] * ut
                        for n in range(N):
                            y += Ct[b, t, n] * hs[i, n]
                        s = _sigmoid(z[b, d, t])
                        dz[b, d, t] = dy * y * s * (1.0 + z[b, d, t] * (1.0 - s))
                        dy = dy * z[b, d, t] * s
                    dD_part[b, d] += dy * ut
                    du_t = dy * D[d]
                    dd = 0.0
                    for n in range(N):
                        dA_n = math.exp(dt * A[d, n])
                        g = g_next[n] + dy * Ct[b, t, n]         # g_t
                        g_dA_h = g * dA_n * hs[i - 1, n]
                        dd += g_dA_h * A[d, n] + g * Bt[b, t, n] * ut
                        dA_part[b, d, n] += g_dA_h * dt
                        dB_part[b, grp, t, n] += g * dt * ut
                        dC_part[b, grp, t, n] += dy * hs[i, n]
                        du_t += g * dt * Bt[b, t, n]
                        g_next[n] = g * dA_n
                    if softplus:                                 # softplus' = sigmoid
                        dd *= _sigmoid(delta[b, d, t] + delta_bias[d])
                    ddelta[b, d, t] = dd
                    du[b, d, t] = du_t


def _prepare(u, delta, A, B, C, D, z, delta_bias):
    """Contiguous arrays of u's dtype; B, C as (b, L, N) so the N loop is contiguous."""
    dt = u.dtype if u.dtype in (np.float32, np.float64) else np.float64
    c = lambda x: np.ascontiguousarray(x, dtype=dt)             # noqa: E731
    d_inner = u.shape[1]
    D_ = c(D) if D is not None else np.zeros(d_inner, dt)
    bias = c(delta_bias) if delta_bias is not None else np.zeros(d_inner, dt)
    z_ = c(z) if z is not None else np.zeros((1, 1, 1), dt)
    return (c(u), c(delta), c(A), c(B.transpose(0, 2, 1)), c(C.transpose(0, 2, 1)),
            D_, z_, bias)


def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False):
    args = _prepare(u, delta, A, B, C, D, z, delta_bias)
    out = np.empty_like(args[0])
    _forward(*args, z is not None, bool(delta_softplus), out)
    return out


def selective_scan_bwd(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False):
    args = _prepare(u, delta, A, B, C, D, z, delta_bias)
    u_, A_ = args[0], args[2]
    batch, d_inner, L = u_.shape
    N = A_.shape[1]
    groups = max(1, min(d_inner, numba.get_num_threads()))
    dout_ = np.ascontiguousarray(dout, dtype=u_.dtype)
    du, ddelta = np.empty_like(u_), np.empty_like(u_)
    dz = np.empty_like(u_) if z is not None else np.zeros((1, 1, 1), u_.dtype)
    dA_part = np.zeros((batch, d_inner, N), u_.dtype)
    dB_part = np.zeros((batch, groups, L, N), u_.dtype)
    dC_part = np.zeros((batch, groups, L, N), u_.dtype)
    dD_part = np.zeros((batch, d_inner), u_.dtype)
    _backward(dout_, *args, z is not None, bool(delta_softplus), groups,
              du, ddelta, dz, dA_part, dB_part, dC_part, dD_part)
    dB = dB_part.sum(axis=1).transpose(0, 2, 1)                  # (b, N, L)
    dC = dC_part.sum(axis=1).transpose(0, 2, 1)
    return (du, ddelta, dA_part.sum(axis=0), np.ascontiguousarray(dB),
            np.ascontiguousarray(dC), dD_part.sum(axis=0) if D is not None else None,
            dz if z is not None else None,
            ddelta.sum(axis=(0, 2)) if delta_bias is not None else None)
