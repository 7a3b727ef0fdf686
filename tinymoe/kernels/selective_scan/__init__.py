"""The selective scan (Mamba's S6): plain array functions behind one `impl=` choice.

    out = selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, impl=None)
    out, states = selective_scan_fwd(..., return_states=True)      # for a backward
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = selective_scan_bwd(dout, u, ...,
                                                                     states=states)
    out = selective_state_update(state, x, dt, A, B, C, ...)   # one step, in place

u, delta, z, out: (batch, d_inner, L); A: (d_inner, N); B, C: (batch, N, L);
D, delta_bias: (d_inner,).

Formats: u, delta, B, C, z may be 16-bit (float16, bfloat16: mamba_ssm's mixed-precision
recipe), read as float32, with states and sums in float32 and out rounded to u's format;
A, D, delta_bias are used as float32 (or float64). Each gradient has its input's dtype. The
GPU kernels load 16 bits and widen; the CPU impls are run on float32 copies (exact: every
16-bit number is a float32) and their results rounded: slow, but the same numbers.

`reference` (a loop over L) is the spec; `assoc` is the
parallel associative-scan form; `numba` the fast CPU kernel; GPU kernels add a line
to IMPLS below.
"""
from __future__ import annotations

import importlib

from ...backend import array_module, device_of
from ...dtypes import is_half, upcast

# impl name -> module with selective_scan_fwd / selective_scan_bwd; imported on use.
IMPLS = {
    "reference": "tinymoe.kernels.selective_scan.reference",
    "assoc": "tinymoe.kernels.selective_scan.assoc",
    "numba": "tinymoe.kernels.selective_scan.numba_cpu",
    "numba_cuda": "tinymoe.kernels.selective_scan.numba_cuda",
    "cupy": "tinymoe.kernels.selective_scan.cupy_raw",
}
# Impls whose forward can hand its backward the states at tile starts (return_states=).
STATEFUL = {IMPLS["numba_cuda"], IMPLS["cupy"]}
# What impl=None tries on each device, fastest first (the first that imports wins).
DEFAULT_IMPLS = {"cpu": ("numba", "reference"), "cuda": ("cupy", "reference")}


def _module(name):
    if name not in IMPLS:
        raise ValueError(f"selective_scan: unknown impl {name!r}; valid: {sorted(IMPLS)}")
    return importlib.import_module(IMPLS[name])


def _impl(name, u):
    if name is not None:
        return _module(name)
    for candidate in DEFAULT_IMPLS[device_of(u)]:
        try:
            return _module(candidate)
        except (ValueError, ImportError):  # not registered, or its library is missing
            continue
    return _module("reference")


def _shape(x):
    return tuple(x.shape)


def check_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Raise a ValueError naming the argument whose shape does not fit the others."""
    def bad(msg):
        return ValueError(f"selective_scan: {msg}")

    if u.ndim != 3:
        raise bad(f"u must be (batch, d_inner, L), got shape {_shape(u)}")
    batch, d_inner, L = u.shape
    if _shape(delta) != _shape(u):
        raise bad(f"delta {_shape(delta)} must have the shape of u {_shape(u)}")
    if A.ndim != 2 or A.shape[0] != d_inner:
        raise bad(f"A must be (d_inner={d_inner}, N), got {_shape(A)}")
    N = A.shape[1]
    if N < 1:
        raise bad(f"d_state N must be >= 1, got A of shape {_shape(A)}")
    for name, x in (("B", B), ("C", C)):
        if _shape(x) != (batch, N, L):
            raise bad(f"{name} must be (batch, N, L) = {(batch, N, L)} for u {_shape(u)} "
                      f"and A {_shape(A)}, got {_shape(x)}")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and _shape(x) != (d_inner,):
            raise bad(f"{name} must be (d_inner,) = ({d_inner},), got {_shape(x)}")
    if z is not None and _shape(z) != _shape(u):
        raise bad(f"z {_shape(z)} must have the shape of u {_shape(u)}")
    if not delta_softplus:
        step = delta if delta_bias is None else delta + delta_bias[:, None]
        if L > 0 and bool(array_module(step).any(step <= 0)):
            raise bad("the step delta (+ delta_bias) must be > 0 without delta_softplus; "
                      f"its smallest value is {float(step.min())}")


def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, impl=None, return_states=False):
    """out (batch, d_inner, L) = the selective scan of u (see the module docstring).

    return_states: (out, states), where states is what this impl's backward can start
    from instead of recomputing (the GPU kernels: each tile's starting state), or None."""
    check_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    module = _impl(impl, u)
    if _widened(module, u):                               # a CPU impl on 16-bit inputs
        out = module.selective_scan_fwd(*upcast(u, delta, A, B, C, D, z, delta_bias),
                                        delta_softplus).astype(u.dtype)
        return (out, None) if return_states else out
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if not return_states:
        return module.selective_scan_fwd(*args)
    if module.__name__ in STATEFUL:
        return module.selective_scan_fwd(*args, return_states=True)
    return module.selective_scan_fwd(*args), None


def selective_scan_bwd(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, impl=None, states=None):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), None for inputs that are None.
    states: the forward's (return_states), if any."""
    check_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if _shape(dout) != _shape(u):
        raise ValueError(f"selective_scan: dout {_shape(dout)} must have the shape of u "
                         f"{_shape(u)}")
    module = _impl(impl, u)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    if _widened(module, u):                               # a CPU impl on 16-bit inputs
        grads = module.selective_scan_bwd(*upcast(dout, *inputs), delta_softplus)
    elif module.__name__ in STATEFUL:
        grads = module.selective_scan_bwd(dout, *inputs, delta_softplus, states=states)
    else:
        grads = module.selective_scan_bwd(dout, *inputs, delta_softplus)
    return tuple(None if g is None else g.astype(x.dtype, copy=False)   # each its input's dtype
                 for g, x in zip(grads, inputs))


def _widened(module, u):
    """True where 16-bit inputs run as float32 copies: the CPU impls (the GPU kernels load
    16 bits themselves)."""
    return is_half(u.dtype) and module.__name__ not in STATEFUL


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                           dt_softplus=False):
    """One recurrent step (generation): updates state (batch, d_inner, N) in place.

    x, dt, z, out: (batch, d_inner); B, C: (batch, N). Returns out (batch, d_inner).
    """
    if state.ndim != 3 or x.ndim != 2 or _shape(state)[:2] != _shape(x):
        raise ValueError(f"selective_state_update: state must be (batch, d_inner, N) and x "
                         f"(batch, d_inner); got state {_shape(state)}, x {_shape(x)}")
    batch, d_inner, N = state.shape
    for name, arr, want in (("dt", dt, (batch, d_inner)), ("A", A, (d_inner, N)),
                            ("B", B, (batch, N)), ("C", C, (batch, N)),
                            ("z", z, (batch, d_inner)), ("D", D, (d_inner,)),
                            ("dt_bias", dt_bias, (d_inner,))):
        if arr is not None and _shape(arr) != want:
            raise ValueError(f"selective_state_update: {name} must be {want} for state "
                             f"{_shape(state)}, got {_shape(arr)}")
    from .reference import selective_state_update as step
    if is_half(x.dtype):                                  # 16-bit inputs: float32 math, and
        out = step(state, *upcast(x, dt, A, B, C, D, z, dt_bias), dt_softplus)   # state
        return out.astype(x.dtype)
    return step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


__all__ = ["IMPLS", "STATEFUL", "DEFAULT_IMPLS", "check_inputs", "selective_scan_fwd",
           "selective_scan_bwd", "selective_state_update"]
