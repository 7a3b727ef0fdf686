"""Dynamic loss scaling for float16 training (Micikevicius et al. 2018, sec. 3.2).

float16's smallest normal number is 2^-14 (6.1e-5, subnormals to 6e-8): gradients of a
language model are often smaller and would flush to zero. So the loss is multiplied by a
scale S before the backward (every gradient is S times larger, lifted into range) and the
gradients divided by S (in float32, on the master copies) before the update. Too large an
S overflows float16's 65504: some gradient becomes inf or NaN. The scale is then adapted:

    overflow (a gradient not finite):  skip the update,  S = S * backoff (1/2),  clean = 0
    otherwise:                         clean = clean + 1;  if clean == N:  S = S * growth (2), clean = 0

(torch.amp.GradScaler's rules and defaults: S = 2^16, N = 2000.) bfloat16 has float32's
range and needs none of this. Every quantity is a 0-d array on the device and every update
is array arithmetic: a step never reads the scale on the host (a captured CUDA graph may
not), and `state_dict` (checkpoints, logs) is the one place that does.
"""
from __future__ import annotations

import numpy as np

from .. import backend


class DynamicLossScaler:
    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, device: str = "cpu"):
        if not init_scale > 0 or not growth_factor > 1 or not 0 < backoff_factor < 1:
            raise ValueError(f"DynamicLossScaler: need init_scale > 0, growth_factor > 1 and "
                             f"0 < backoff_factor < 1, got {init_scale}, {growth_factor}, "
                             f"{backoff_factor}")
        if not (isinstance(growth_interval, int) and growth_interval >= 1):
            raise ValueError(f"DynamicLossScaler: growth_interval must be an integer >= 1, "
                             f"got {growth_interval!r}")
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = growth_interval
        xp = backend.module_for(device)
        self.scale = xp.full((), init_scale, np.float32)          # S
        self.growth_tracker = xp.zeros((), np.int32)              # clean steps since S changed

    def scale_loss(self, loss):
        """loss * S (a Tensor): its backward gives S times the gradients."""
        return loss * self.scale

    def inv_scale(self):
        """1 / S as a 0-d float32 array (multiply the float32 gradients by it)."""
        return (1 / self.scale).astype(np.float32)

    def update(self, found_inf) -> None:
        """After a step: found_inf (0-d bool array) true -> S *= backoff and the count
        restarts; false -> one more clean step, and S *= growth after growth_interval."""
        xp = backend.array_module(self.scale)
        clean = self.growth_tracker + 1
        grow = clean >= self.growth_interval
        new_scale = xp.where(found_inf, self.scale * np.float32(self.backoff_factor),
                             xp.where(grow, self.scale * np.float32(self.growth_factor), self.scale))
        self.growth_tracker[...] = xp.where(found_inf | grow, 0, clean)
        self.scale[...] = new_scale                   # in place: the arrays keep their addresses

    def state_dict(self) -> dict:
        """JSON data (reads the scale: one host transfer)."""
        return {"scale": float(self.scale), "growth_tracker": int(self.growth_tracker),
                "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval}

    def load_state_dict(self, state: dict) -> None:
        self.scale[...] = state["scale"]
        self.growth_tracker[...] = state["growth_tracker"]
        self.growth_factor = float(state.get("growth_factor", self.growth_factor))
        self.backoff_factor = float(state.get("backoff_factor", self.backoff_factor))
        self.growth_interval = int(state.get("growth_interval", self.growth_interval))
