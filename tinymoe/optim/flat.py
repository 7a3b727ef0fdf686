"""All of an optimizer's parameters (and their gradients) in one flat buffer.

    flat = FlatParams(groups)        groups: lists of Parameters, one per param group
    p.data, p.grad_buffer            views into flat.data, flat.grad: (a:b) of parameter i
    flat.ranges[g]                   (a, b): group g's elements, contiguous

A multi-tensor kernel then updates every parameter of a group in ONE launch over its range
(PyTorch's fused AdamW does the same with lists of pointers), and the global gradient norm
is one reduction over flat.grad. The autograd engine writes a leaf's first gradient into its
`grad_buffer` when it has one (tinymoe/autograd/engine.py), so the gradients land in the flat
buffer without a copy, and in the same place every step: what a captured CUDA graph needs.

Something may later replace `p.data` (load_state_dict, .to()): `attach()` copies the new
values into the flat buffer and points `p.data` back at its view.
"""
from __future__ import annotations

from .. import backend


class FlatParams:
    def __init__(self, groups):
        params = [p for group in groups for p in group]
        dtypes = {p.data.dtype for p in params}
        devices = {backend.device_of(p.data) for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"FlatParams: every parameter needs one dtype and one device, got "
                             f"{sorted(map(str, dtypes))} on {sorted(devices)}")
        xp = backend.array_module(params[0].data)
        self.params, self.dtype = params, dtypes.pop()
        total = sum(p.data.size for p in params)
        self.data = xp.empty(total, self.dtype)                           # (n,) every parameter
        self.grad = xp.zeros(total, self.dtype)                           # (n,) every gradient
        self.slices, self.ranges, start = [], [], 0
        for group in groups:
            first = start
            for p in group:
                self.slices.append(slice(start, start + p.data.size))
                start += p.data.size
            self.ranges.append((first, start))
        self.views = [self.data[s].reshape(p.shape) for s, p in zip(self.slices, params)]
        self.grad_views = [self.grad[s].reshape(p.shape) for s, p in zip(self.slices, params)]
        for p, view, grad in zip(params, self.views, self.grad_views):
            view[...] = p.data
            p.data, p.grad_buffer, p.flat_params = view, grad, self
        self._ids = {id(p) for p in params}

    def attached(self) -> bool:
        return all(p.data is view for p, view in zip(self.params, self.views))

    def attach(self) -> None:
        """Parameters whose data was replaced: copy it into the flat buffer, view it again."""
        for p, view, grad in zip(self.params, self.views, self.grad_views):
            if p.data is not view:
                view[...] = p.data
                p.data = view
            p.grad_buffer = grad

    def gradients_present(self) -> list:
        """Per parameter: has a gradient. A gradient not in the flat buffer (one that was
        set by hand, or averaged over ranks) is copied in."""
        present = []
        for p, buf in zip(self.params, self.grad_views):
            if p.grad is not None and p.grad is not buf:
                buf[...] = p.grad
                p.grad = buf
            present.append(p.grad is not None)
        return present

    def covers(self, params) -> bool:
        """True when `params` are exactly this buffer's parameters, each gradient in it."""
        params = list(params)
        return (len(params) == len(self.params) and {id(p) for p in params} == self._ids
                and all(p.grad is buf for p, buf in zip(self.params, self.grad_views)))


def flat_of(params):
    """The FlatParams holding exactly `params` and their gradients, or None."""
    params = list(params)
    flat = getattr(params[0], "flat_params", None) if params else None
    return flat if flat is not None and flat.covers(params) else None
