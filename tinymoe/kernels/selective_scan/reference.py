"""The selective scan, as a loop over time: the spec every faster version must match.

Mamba (Gu & Dao 2023, Algorithm 2 and Sec. 3.2), per batch b, channel d, state n:

    delta'_t = softplus(delta_t + delta_bias)     (or delta_t + delta_bias)
    dA_t     = exp(delta'_t A)                    # ZOH discretization of A   (eq. 4)
    dBu_t    = delta'_t B_t u_t                   # simplified (Euler) B_bar u
    h_t      = dA_t h_{t-1} + dBu_t               # the recurrence            (eq. 2a)
    y_t      = C_t . h_t + D u_t                  # read-out                  (eq. 2b)
    out_t    = y_t * silu(z_t)                    # output gate (Mamba block)

Shapes: u, delta, z, out: (batch, d_inner, L); A: (d_inner, N); B, C: (batch, N, L);
D, delta_bias: (d_inner,). Works on NumPy and CuPy arrays alike (array_module).

The backward recomputes the states instead of storing all of them, which would be a
(batch, d_inner, L, N) tensor: the forward keeps h only at chunk boundaries, then each
chunk is recomputed (chunk, batch, d_inner, N) and walked in reverse.
"""
from __future__ import annotations

from ...backend import array_module

CHUNK = 64  # time steps whose states are held at once in the backward


def effective_delta(delta, delta_bias=None, delta_softplus=False):
    """delta' = softplus(delta + bias) or delta + bias, and d delta'/d delta."""
    xp = array_module(delta)
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]                      # (b, d, L)
    if not delta_softplus:
        return delta, None
    # softplus(x) = log(1 + e^x) = max(x, 0) + log(1 + e^-|x|) (no overflow); its
    # derivative is sigmoid(x)
    softplus = xp.maximum(delta, 0) + xp.log1p(xp.exp(-xp.abs(delta)))
    return softplus, 1.0 / (1.0 + xp.exp(-delta))


def silu(z):
    return z / (1.0 + array_module(z).exp(-z))


def _step(h, t, delta, A, B, u):
    """h_t = exp(delta'_t A) h_{t-1} + delta'_t B_t u_t, for all (b, d, n) at once."""
    dA = array_module(h).exp(delta[:, :, t, None] * A)           # (b, d, N)
    dBu = (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]  # (b, d, N)
    return dA * h + dBu


def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False):
    """out (batch, d_inner, L): the recurrence above, one time step at a time."""
    xp = array_module(u)
    delta, _ = effective_delta(delta, delta_bias, delta_softplus)
    batch, d_inner, L = u.shape
    h = xp.zeros((batch, d_inner, A.shape[1]), dtype=u.dtype)    # (b, d, N)
    y = xp.empty_like(u)                                         # (b, d, L)
    for t in range(L):
        h = _step(h, t, delta, A, B, u)
        y[:, :, t] = xp.einsum("bdn,bn->bd", h, C[:, :, t])      # y_t = C_t . h_t
    if D is not None:
        y = y + D[:, None] * u
    return y * silu(z) if z is not None else y


def selective_scan_bwd(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); None for absent inputs.

    With g_t = dL/dh_t (all paths), the reverse recurrence is
        g_t = dA_{t+1} g_{t+1} + dy_t C_t
    and, from h_t = dA_t h_{t-1} + delta'_t B_t u_t,
        dL/d delta'_t = sum_n g_t (A dA_t h_{t-1} + B_t u_t)
        dL/dA        += sum_{b,t} g_t delta'_t dA_t h_{t-1}
        dL/dB_t       = sum_d g_t delta'_t u_t,   dL/dC_t = sum_d dy_t h_t
        dL/du_t       = sum_n g_t delta'_t B_t + dy_t D
    """
    xp = array_module(u)
    delta_eff, ddelta_eff_ddelta = effective_delta(delta, delta_bias, delta_softplus)
    batch, d_inner, L = u.shape
    N = A.shape[1]

    # Gate: out = y * silu(z), silu'(z) = s (1 + z (1 - s)) with s = sigmoid(z).
    dz = None
    dy = dout
    if z is not None:
        y = selective_scan_fwd(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
        s = 1.0 / (1.0 + xp.exp(-z))
        dz = dout * y * s * (1.0 + z * (1.0 - s))
        dy = dout * z * s

    du = dy * D[:, None] if D is not None else xp.zeros_like(u)
    dD = (dy * u).sum(axis=(0, 2)) if D is not None else None
    ddelta = xp.zeros_like(u)
    dA = xp.zeros_like(A)
    dB = xp.zeros_like(B)
    dC = xp.zeros_like(C)

    # Forward pass keeping h only at chunk starts: h_start[c] = h_{c*CHUNK - 1}.
    starts = list(range(0, L, CHUNK))
    h_start = []
    h = xp.zeros((batch, d_inner, N), dtype=u.dtype)
    for t in range(L):
        if t % CHUNK == 0:
            h_start.append(h)
        h = _step(h, t, delta_eff, A, B, u)

    g_next = xp.zeros((batch, d_inner, N), dtype=u.dtype)        # dA_{t+1} g_{t+1}
    for c in reversed(range(len(starts))):
        t0, t1 = starts[c], min(starts[c] + CHUNK, L)
        hs = [h_start[c]]                                        # h_{t0-1}, h_t0, ...
        for t in range(t0, t1):
            hs.append(_step(hs[-1], t, delta_eff, A, B, u))
        for t in reversed(range(t0, t1)):
            h_prev, h_t = hs[t - t0], hs[t - t0 + 1]             # (b, d, N) each
            dA_t = xp.exp(delta_eff[:, :, t, None] * A)          # (b, d, N)
            g = g_next + dy[:, :, t, None] * C[:, None, :, t]    # g_t (b, d, N)
            dC[:, :, t] = xp.einsum("bd,bdn->bn", dy[:, :, t], h_t)
            g_dA_h = g * dA_t * h_prev                           # dL/d(dA_t) * dA_t
            ddelta[:, :, t] = (g_dA_h * A).sum(axis=2) + u[:, :, t] * xp.einsum(
                "bdn,bn->bd", g, B[:, :, t])
            dA += (g_dA_h * delta_eff[:, :, t, None]).sum(axis=0)
            dB[:, :, t] = xp.einsum("bdn,bd->bn", g, delta_eff[:, :, t] * u[:, :, t])
            du[:, :, t] += delta_eff[:, :, t] * xp.einsum("bdn,bn->bd", g, B[:, :, t])
            g_next = g * dA_t

    if ddelta_eff_ddelta is not None:                            # softplus' = sigmoid
        ddelta = ddelta * ddelta_eff_ddelta
    ddelta_bias = ddelta.sum(axis=(0, 2)) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                           dt_softplus=False):
    """One recurrent step, for generation. Updates `state` in place, returns out.

    state: (batch, d_inner, N); x, dt, z, out: (batch, d_inner); B, C: (batch, N).
    Same equations as the scan with L = 1, starting from `state` instead of zeros.
    """
    xp = array_module(x)
    dt, _ = effective_delta(dt[:, :, None], dt_bias, dt_softplus)
    dt = dt[:, :, 0]                                             # (b, d)
    dA = xp.exp(dt[:, :, None] * A)                              # (b, d, N)
    dBx = (dt * x)[:, :, None] * B[:, None, :]                   # (b, d, N)
    state[...] = dA * state + dBx                                # h_t = dA h_{t-1} + dB x
    y = (state * C[:, None, :]).sum(axis=-1)                     # y_t = C_t . h_t (no BLAS:
                                                                 # a CUDA graph can record it)
    if D is not None:
        y = y + D * x
    return y * silu(z) if z is not None else y
