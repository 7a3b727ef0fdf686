"""Expert dispatch / combine: plain array functions behind one `impl=` choice.

    plan = make_dispatch_plan(expert_index, num_experts, capacity=None, impl=None)
    plan = make_static_plan(expert_index, num_experts, capacity, impl=None)   C rows per expert
    xs   = permute(x, plan)                     (T, d) -> (R, d)
    dx   = permute_backward(dxs, plan, T)       (R, d) -> (T, d)
    out  = combine(ys, weights, plan)           (R, d), (T, k) -> (T, d)
    dys, dweights = combine_backward(dout, ys, weights, plan)

`reference` (NumPy/CuPy array code) is the spec; GPU kernels register beside it.
"""
from __future__ import annotations

import importlib

from ...backend import device_of
from .reference import DispatchPlan

# impl name -> module implementing the five functions; imported on first use.
IMPLS = {
    "reference": "tinymoe.kernels.dispatch.reference",
    "numba_cuda": "tinymoe.kernels.dispatch.numba_cuda",
    "cupy": "tinymoe.kernels.dispatch.cupy_raw",
}
# What impl=None picks on each device.
DEFAULT_IMPL = {"cpu": "reference", "cuda": "cupy"}


def _impl(name, array):
    name = name or DEFAULT_IMPL[device_of(array)]
    if name not in IMPLS:
        raise ValueError(f"dispatch: unknown impl {name!r}; valid: {sorted(IMPLS)}")
    return importlib.import_module(IMPLS[name])


def make_dispatch_plan(expert_index, num_experts, capacity=None, impl=None) -> DispatchPlan:
    return _impl(impl, expert_index).make_dispatch_plan(expert_index, num_experts, capacity)


def make_static_plan(expert_index, num_experts, capacity, impl=None) -> DispatchPlan:
    """Every expert owns `capacity` rows (padding marked -1): static shapes, no host read."""
    return _impl(impl, expert_index).make_static_plan(expert_index, num_experts, capacity)


def permute(x, plan, impl=None):
    return _impl(impl, x).permute(x, plan)


def permute_backward(dxs, plan, num_tokens, impl=None):
    return _impl(impl, dxs).permute_backward(dxs, plan, num_tokens)


def combine(ys, weights, plan, impl=None):
    return _impl(impl, ys).combine(ys, weights, plan)


def combine_backward(dout, ys, weights, plan, impl=None):
    return _impl(impl, dout).combine_backward(dout, ys, weights, plan)


__all__ = ["DispatchPlan", "IMPLS", "DEFAULT_IMPL", "make_dispatch_plan", "make_static_plan", "permute",
           "permute_backward", "combine", "combine_backward"]
