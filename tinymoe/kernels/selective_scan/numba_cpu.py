"""The selective scan on the CPU: NumPy for the elementwise math, Numba for the recurrence.

Time is cut into chunks of CHUNK steps. For each chunk, NumPy computes the discretized
dA = exp(delta' A) for (batch, d_inner, CHUNK, N) at once (its exp is vectorized; a
scalar exp inside the loop would cost most of the time), then a Numba kernel runs
the recurrence with one thread per (batch, channel) row:

    h_t = dA_t h_{t-1} + delta'_t B_t u_t,    y_t = C_t . h_t

The state h (batch, d_inner, N) is carried from chunk to chunk; no array spans
(batch, d_inner, L, N). The backward recomputes: a forward pass keeps h only at chunk
starts (L / CHUNK states, N / CHUNK of u's size), then the chunks are visited in
reverse; each recomputes its states in a (CHUNK + 1, N) buffer per row and walks
back with the gradient recurrence of reference.py:

    g_t = dA_{t+1} g_{t+1} + dy_t C_t          (g_t = dL/dh_t)

dB and dC sum over channels, so in the backward a thread owns a group of channels and
writes partial sums (batch, groups, L, N), added at the end: no two threads write the
same element, and the extra memory is `groups` (about the thread count) times dB.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .reference import effective_delta, silu

CHUNK = 64  # time steps discretized (and, in the backward, recomputed) at once


@njit(parallel=True, cache=True, fastmath=False)
def _forward_chunk(u, delta, dA, Bt, Ct, t0, h, y):
    """Steps t0 .. t0 + T - 1. u, delta, y: (b, d, L); dA: (b, d, T, N) for this chunk;
    Bt, Ct: (b, L, N); h: (b, d, N), the state before t0, updated in place."""
    batch, d_inner, T, N = dA.shape
    for row in prange(batch * d_inner):
        b, d = row // d_inner, row % d_inner
        h_row = h[b, d]                                           # (N,) view of the state
        for i in range(T):
            t = t0 + i
            dA_t, B_t, C_t = dA[b, d, i], Bt[b, t], Ct[b, t]      # (N,) views
            dBu = delta[b, d, t] * u[b, d, t]
            y_t = 0.0
            for n in range(N):
                h_row[n] = dA_t[n] * h_row[n] + dBu * B_t[n]      # h_t = dA_t h_{t-1} + delta' B_t u_t
                y_t += C_t[n] * h_row[n]                          # y_t = C_t . h_t
            y[b, d, t] = y_t


@njit(parallel=True, cache=True, fastmath=False)
def _backward_chunk(u, delta, dA, A, Bt, Ct, dy, t0, h_start, g_next, groups,
                    du, ddelta, dA_part, dB_part, dC_part):
    """Steps t0 + T - 1 down to t0. h_start (b, d, N): the state before t0.
    g_next (b, d, N): dA_{t+1} g_{t+1} from the chunk after, updated in place.
    Writes du, ddelta (b, d, L) for these steps (ddelta w.r.t. delta'), adds into
    dA_part (b, d, N) and into dB_part, dC_part (b, groups, L, N)."""
    batch, d_inner, T, N = dA.shape
    for job in prange(batch * groups):
        b, grp = job // groups, job % groups
        hs = np.empty((T + 1, N), dtype=h_start.dtype)            # h_{t0-1} .. h_{t0+T-1}
        for d in range(grp, d_inner, groups):
            hs[0] = h_start[b, d]
            for i in range(T):                                    # recompute the states
                dBu = delta[b, d, t0 + i] * u[b, d, t0 + i]
                dA_t, B_t = dA[b, d, i], Bt[b, t0 + i]
                for n in range(N):
                    hs[i + 1, n] = dA_t[n] * hs[i, n] + dBu * B_t[n]
            g_row, dA_row = g_next[b, d], dA_part[b, d]           # (N,) views
            for i in range(T - 1, -1, -1):                        # walk back in time
                t = t0 + i
                dt, ut, dy_t = delta[b, d, t], u[b, d, t], dy[b, d, t]
                dA_t, B_t, C_t = dA[b, d, i], Bt[b, t], Ct[b, t]
                dB_t, dC_t = dB_part[b, grp, t], dC_part[b, grp, t]
                h_prev, h_t = hs[i], hs[i + 1]
                du_t = 0.0
                dd = 0.0
                for n in range(N):
                    g = g_row[n] + dy_t * C_t[n]                  # g_t = dA_{t+1} g_{t+1} + dy_t C_t
                    g_dA_h = g * dA_t[n] * h_prev[n]              # dL/d(dA_t) dA_t
                    dd += g_dA_h * A[d, n] + g * B_t[n] * ut      # dL/d delta'_t
                    dA_row[n] += g_dA_h * dt                      # dL/dA
                    dB_t[n] += g * dt * ut                        # dL/dB_t
                    dC_t[n] += dy_t * h_t[n]                      # dL/dC_t
                    du_t += g * dt * B_t[n]                       # dL/du_t
                    g_row[n] = g * dA_t[n]
                ddelta[b, d, t] = dd
                du[b, d, t] = du_t


@njit(parallel=True, cache=True, fastmath=False)
def _delta_times_A(delta, A, t0, out):
    """out[b, d, i, n] = delta'[b, d, t0 + i] A[d, n]  (NumPy's broadcast is slow for small N)."""
    batch, d_inner, T, N = out.shape
    for row in prange(batch * d_inner):
        b, d = row // d_inner, row % d_inner
        for i in range(T):
            for n in range(N):
                out[b, d, i, n] = delta[b, d, t0 + i] * A[d, n]


def _discretize_chunk(delta, A, t0, t1, buf):
    """exp(delta'[:, :, t0:t1] A) (b, d, T, N), the ZOH of A, with NumPy's vectorized exp;
    written into `buf` (b, d, CHUNK, N), or a fresh contiguous array for a shorter last
    chunk (a sliced buffer would make Numba compile every kernel a second time)."""
    shape = buf.shape[:2] + (t1 - t0, buf.shape[3])
    out = buf if shape == buf.shape else np.empty(shape, buf.dtype)
    _delta_times_A(delta, A, t0, out)
    return np.exp(out, out=out)


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """Contiguous arrays of one float dtype; B, C as (b, L, N) so the N loop is contiguous;
    delta' (and d delta'/d delta) computed once, vectorized."""
    dtype = u.dtype if u.dtype in (np.float32, np.float64) else np.float64
    c = lambda x: np.ascontiguousarray(x, dtype=dtype)            # noqa: E731
    delta_eff, ddelta_eff = effective_delta(c(delta), None if delta_bias is None else
                                            c(delta_bias), delta_softplus)
    return (c(u), c(delta_eff), ddelta_eff, c(A), c(B.transpose(0, 2, 1)),
            c(C.transpose(0, 2, 1)))


def _scan(u, delta, A, Bt, Ct, h_starts=None):
    """y (b, d, L) = C . h without D or z; fills h_starts[c] with h before chunk c."""
    batch, d_inner, L = u.shape
    h = np.zeros((batch, d_inner, A.shape[1]), u.dtype)
    y = np.empty_like(u)
    buf = np.empty((batch, d_inner, min(CHUNK, L), A.shape[1]), u.dtype)
    for c, t0 in enumerate(range(0, L, CHUNK)):
        t1 = min(t0 + CHUNK, L)
        if h_starts is not None:
            h_starts[c] = h
        dA = _discretize_chunk(delta, A, t0, t1, buf)
        _forward_chunk(u, delta, dA, Bt, Ct, t0, h, y)
    return y


def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False):
    u_, delta_, _, A_, Bt, Ct = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    y = _scan(u_, delta_, A_, Bt, Ct)
    if D is not None:
        y += D[:, None].astype(y.dtype) * u_                      # y_t += D u_t
    return y * silu(z.astype(y.dtype)) if z is not None else y


def selective_scan_bwd(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False):
    u_, delta_, ddelta_eff, A_, Bt, Ct = _prepare(u, delta, A, B, C, delta_bias,
                                                  delta_softplus)
    batch, d_inner, L = u_.shape
    N = A_.shape[1]
    dtype = u_.dtype
    dout = np.asarray(dout, dtype)
    h_starts = np.empty(((L + CHUNK - 1) // CHUNK, batch, d_inner, N), dtype)
    y = _scan(u_, delta_, A_, Bt, Ct, h_starts)                    # C . h, no D, no z

    dz, dy, dD = None, dout, None
    if D is not None:
        D_ = D.astype(dtype)
        y += D_[:, None] * u_
    if z is not None:                                             # out = y silu(z)
        z_ = z.astype(dtype)
        s = 1.0 / (1.0 + np.exp(-z_))
        dz = dout * y * s * (1.0 + z_ * (1.0 - s))
        dy = dout * z_ * s
    dy = np.ascontiguousarray(dy)

    groups = max(1, min(d_inner, numba.get_num_threads()))
    du, ddelta = np.empty_like(u_), np.empty_like(u_)
    dA_part = np.zeros((batch, d_inner, N), dtype)
    dB_part = np.zeros((batch, groups, L, N), dtype)
    dC_part = np.zeros((batch, groups, L, N), dtype)
    g_next = np.zeros((batch, d_inner, N), dtype)
    buf = np.empty((batch, d_inner, min(CHUNK, L), N), dtype)
    for c in reversed(range(len(h_starts))):
        t0 = c * CHUNK
        t1 = min(t0 + CHUNK, L)
        dA = _discretize_chunk(delta_, A_, t0, t1, buf)
        _backward_chunk(u_, delta_, dA, A_, Bt, Ct, dy, t0, h_starts[c], g_next, groups,
                        du, ddelta, dA_part, dB_part, dC_part)

    if D is not None:
        du += dy * D_[:, None]                                    # y_t = ... + D u_t
        dD = (dy * u_).sum(axis=(0, 2))
    if ddelta_eff is not None:                                    # softplus' = sigmoid
        ddelta *= ddelta_eff
    ddelta_bias = ddelta.sum(axis=(0, 2)) if delta_bias is not None else None
    dB = np.ascontiguousarray(dB_part.sum(axis=1).transpose(0, 2, 1))  # (b, N, L)
    dC = np.ascontiguousarray(dC_part.sum(axis=1).transpose(0, 2, 1))
    return du, ddelta, dA_part.sum(axis=0), dB, dC, dD, dz, ddelta_bias
