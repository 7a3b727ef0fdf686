"""The selective scan as a parallel associative scan: O(log L) steps instead of L.

The recurrence h_t = a_t h_{t-1} + b_t is linear, so pairs (a, b) compose:

    (a1, b1) o (a2, b2) = (a1 a2,  a2 b1 + b2)        # "first step 1, then step 2"

and o is associative. Any parallel prefix-sum algorithm then computes every h_t. Here
Hillis-Steele: at round k every position t combines with position t - 2^k, so after
ceil(log2 L) rounds position t holds the composition of steps 0..t, i.e. h_t. This is
the idea behind Mamba's hardware-aware scan (Sec. 3.3.2; Blelloch 1990).

Unlike the reference, this form materializes the (batch, d_inner, L, N) tensors: it
trades memory for depth, which is exactly what a GPU kernel avoids by keeping them in
SRAM. Same shapes and results as reference.py.
"""
from __future__ import annotations

from ...backend import array_module
from .reference import effective_delta, silu


def associative_scan(a, b):
    """All h_t = a_t h_{t-1} + b_t (h_{-1} = 0) along axis 2, in ceil(log2 L) rounds."""
    xp = array_module(a)
    L = a.shape[2]
    offset = 1
    while offset < L:
        # position t <- (a, b)[t - offset] o (a, b)[t]; positions t < offset are done
        b_new = a[:, :, offset:] * b[:, :, :-offset] + b[:, :, offset:]
        a_new = a[:, :, offset:] * a[:, :, :-offset]
        b = xp.concatenate([b[:, :, :offset], b_new], axis=2)
        a = xp.concatenate([a[:, :, :offset], a_new], axis=2)
        offset *= 2
    return b


def _discretize(u, delta, A, B):
    """dA_t = exp(delta'_t A), dBu_t = delta'_t B_t u_t, both (b, d, L, N)."""
    xp = array_module(u)
    dA = xp.exp(delta[..., None] * A[None, :, None, :])
    dBu = (delta * u)[..., None] * B.transpose(0, 2, 1)[:, None]
    return dA, dBu


def _states(u, delta, A, B):
    dA, dBu = _discretize(u, delta, A, B)
    return dA, associative_scan(dA, dBu)                          # h: (b, d, L, N)


def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False):
    xp = array_module(u)
    delta, _ = effective_delta(delta, delta_bias, delta_softplus)
    _, h = _states(u, delta, A, B)
    y = xp.einsum("bdln,bnl->bdl", h, C)                          # y_t = C_t . h_t
    if D is not None:
        y = y + D[:, None] * u
    return y * silu(z) if z is not None else y


def selective_scan_bwd(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False):
    """Same gradients as reference.py; the reverse recurrence is a scan run backwards:
    g_t = dA_{t+1} g_{t+1} + dy_t C_t."""
    xp = array_module(u)
    delta_eff, ddelta_eff_ddelta = effective_delta(delta, delta_bias, delta_softplus)
    dA, h = _states(u, delta_eff, A, B)                           # (b, d, L, N)
    y = xp.einsum("bdln,bnl->bdl", h, C)
    if D is not None:
        y = y + D[:, None] * u

    dz, dy = None, dout
    if z is not None:
        s = 1.0 / (1.0 + xp.exp(-z))
        dz = dout * y * s * (1.0 + z * (1.0 - s))
        dy = dout * z * s

    # Reverse scan: flip time, coefficient of g_{t+1} is dA_{t+1} (none after the end).
    a_rev = xp.concatenate([dA[:, :, 1:], xp.ones_like(dA[:, :, :1])], axis=2)[:, :, ::-1]
    b_rev = (dy[..., None] * C.transpose(0, 2, 1)[:, None])[:, :, ::-1]
    g = associative_scan(a_rev, b_rev)[:, :, ::-1]               # g_t = dL/dh_t
    h_prev = xp.concatenate([xp.zeros_like(h[:, :, :1]), h[:, :, :-1]], axis=2)

    g_dA_h = g * dA * h_prev                                      # (b, d, L, N)
    Bt = B.transpose(0, 2, 1)[:, None]                            # (b, 1, L, N)
    ddelta = (g_dA_h * A[None, :, None, :]).sum(axis=3) + u * (g * Bt).sum(axis=3)
    dA_grad = (g_dA_h * delta_eff[..., None]).sum(axis=(0, 2))
    dB = xp.einsum("bdln,bdl->bnl", g, delta_eff * u)
    dC = xp.einsum("bdln,bdl->bnl", h, dy)
    du = delta_eff * (g * Bt).sum(axis=3)
    dD = None
    if D is not None:
        du = du + dy * D[:, None]
        dD = (dy * u).sum(axis=(0, 2))
    if ddelta_eff_ddelta is not None:
        ddelta = ddelta * ddelta_eff_ddelta
    ddelta_bias = ddelta.sum(axis=(0, 2)) if delta_bias is not None else None
    return du, ddelta, dA_grad, dB, dC, dD, dz, ddelta_bias
