"""Float32 master weights for a model trained in a 16-bit format (Micikevicius et al. 2018).

    opt = MasterWeights(AdamW(model.parameters(), lr=3e-4))   # while the model is float32
    model.to(dtype="bfloat16")                                # then narrow the model
    ...backward...
    masters = opt.grads_to_master(inv_scale)   # float32 gradients (unscaled), 16-bit ones freed
    opt.step(found_inf)                        # update the masters, round them into the model

The model holds 16-bit weights (2 bytes per parameter) and gets 16-bit gradients (2 bytes);
the wrapped optimizer updates float32 copies, the master weights (4 bytes), and keeps its
moments beside them in float32 (Adam: 4 + 4 bytes): the lecture's 2P + 2P + 12P = 16 bytes
per parameter (ZeRO, Rajbhandari et al. 2020, sec. 3.1). Updates smaller than a 16-bit
weight's spacing (bfloat16: 1/128 of it) would round away if applied to the 16-bit copy;
on the float32 master they accumulate until they show.

The wrapped optimizer is any tinymoe optimizer: its groups are given the masters in place of
the model's parameters, so its state_dict is the same as in a float32 run (a checkpoint made
in one precision resumes in another), and a scheduler that sets group["lr"] works unchanged.

Flat buffers (on a GPU, with the fused AdamW): the fused optimizer keeps the masters and
their gradients in one float32 buffer (optim/flat.py); MasterWeights keeps the 16-bit
parameters and their gradients in one 16-bit buffer laid out the same way, so that both
conversions of a step are one kernel each, whatever the number of parameters:

    master.grad[:] = float32(model.grad) * inv_scale       grads_to_master
    model.data[:]  = round16(master.data)                   step

(the same fixed addresses every step: what a captured CUDA graph replays). Before the
optimizer has made its buffer (the first step), or with an optimizer that keeps none (SGD,
AdamW(fused=False), the CPU's default), the same is done per parameter.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import numpy as np

from .. import backend

from ..nn.parameter import Parameter
from .flat import FlatParams


class MasterWeights:
    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.pairs = []                                   # (model parameter, float32 master)
        for group in optimizer.param_groups:
            masters = []
            for p in group["params"]:
                m = Parameter(p.data.astype(np.float32))  # a copy: the master owns its data
                state = optimizer.state.pop(id(p), None)  # moments already there move along
                if state is not None:
                    optimizer.state[id(m)] = {k: v.astype(np.float32) if hasattr(v, "dtype") else v
                                              for k, v in state.items()}
                self.pairs.append((p, m))
                masters.append(m)
            group["params"] = masters
        self.model_flat = None                            # the 16-bit FlatParams (made on first use)

    # the optimizer's face: groups (learning rates), state, checkpoints
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, arrays, meta):
        self.optimizer.load_state_dict(arrays, meta)

    def zero_grad(self):
        for p, m in self.pairs:
            p.grad = m.grad = None

    def grads_to_master(self, inv_scale=None) -> list:
        """Each master's gradient = its parameter's 16-bit gradient in float32, times
        `inv_scale` (a 0-d array: 1 / the loss scale) if given; the 16-bit gradient is freed.
        Returns the masters (what the step measures, clips and updates)."""
        flats = self._flats()
        if flats is not None:
            model_flat, master_flat = flats
            present = model_flat.gradients_present()         # stray gradients copied in
            xp = backend.array_module(model_flat.grad)
            if inv_scale is None:
                master_flat.grad[...] = model_flat.grad      # (n,) 16 bits -> float32, one kernel
            else:
                xp.multiply(model_flat.grad, inv_scale, out=master_flat.grad)
            for (p, m), has, view in zip(self.pairs, present, master_flat.grad_views):
                m.grad, p.grad = (view if has else None), None
            return [m for _, m in self.pairs]
        for p, m in self.pairs:
            if p.grad is None:
                m.grad = None
                continue
            g = p.grad.astype(np.float32)                 # (shape of p), a new float32 array
            if inv_scale is not None:
                g *= inv_scale
            m.grad, p.grad = g, None
        return [m for _, m in self.pairs]

    def step(self, found_inf=None):
        """Update the masters (nothing where found_inf is true), then round each into its
        model parameter, in place (the parameters keep their arrays)."""
        self.optimizer.step(found_inf=found_inf)
        flats = self._flats()
        if flats is not None:
            model_flat, master_flat = flats
            model_flat.data[...] = master_flat.data       # (n,) float32 -> 16 bits, one kernel
            return
        for p, m in self.pairs:
            p.data[...] = m.data                          # float32 -> 16 bits, nearest even

    def _flats(self):
        """(16-bit FlatParams of the model, float32 FlatParams of the masters) when the
        optimizer keeps its masters in one buffer (the fused AdamW, after its first step), in
        the same order; else None (the per-parameter path)."""
        masters = [m for _, m in self.pairs]
        master_flat = getattr(masters[0], "flat_params", None) if masters else None
        if (master_flat is None or len(master_flat.params) != len(masters)
                or any(a is not b for a, b in zip(master_flat.params, masters))
                or not master_flat.attached()):
            return None
        if self.model_flat is None:
            groups, i = [], 0
            for group in self.optimizer.param_groups:
                groups.append([p for p, _ in self.pairs[i:i + len(group["params"])]])
                i += len(group["params"])
            self.model_flat = FlatParams(groups)          # same order, sizes and ranges
        elif not self.model_flat.attached():
            self.model_flat.attach()                      # a parameter's data was replaced
        return self.model_flat, master_flat

    @contextmanager
    def float32_model(self):
        """For the duration, the model's parameters hold the float32 masters (a checkpoint
        saved inside keeps full precision, and resumes in any precision)."""
        held = [p.data for p, _ in self.pairs]
        for p, m in self.pairs:
            p.data = m.data
        try:
            yield
        finally:
            for (p, _), data in zip(self.pairs, held):
                p.data = data


def float32_weights(optimizer):
    """MasterWeights.float32_model() for a MasterWeights, a context that does nothing else."""
    if isinstance(optimizer, MasterWeights):
        return optimizer.float32_model()
    return nullcontext()
