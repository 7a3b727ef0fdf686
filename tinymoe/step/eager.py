"""The eager training step: forward, backward, clip, update, one op after the other.

    loss = L(model(x), y)                     forward (cross-entropy + the MoE aux losses)
    g = d(loss * S)/dtheta                    backward (S: fp16's loss scale, else none)
    g = (1/W) sum_r g_r                       on W ranks: all-reduce (the dense parameters)
    g = float32(g) / S                        the precision's gradients: float32 masters for
                                              a 16-bit model (tinymoe/precision), unscaled
    n = ||g||                                 the global gradient norm, before clipping
    ok = isfinite(loss) and isfinite(n)       the divergence guard's flag
    g = g * min(1, c / n)                     clip to norm c (grad_clip; None or 0: no clip)
    theta = update(theta, g)  if ok           a non-finite step changes nothing at all
    S = update(S, ok)                         fp16: halve on overflow, grow after clean steps

Nothing here reads a device value on the host: n and ok stay on the device and the
optimizer takes `found_inf = not ok` from there, so on a GPU the step adds no
synchronization; the trainer reads the results in one transfer at log time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import backend
from ..optim.clip import grad_norm, scale_grads_
from ..precision.policy import StepPrecision


@dataclass
class StepResult:
    """What a step reports; every field a 0-d array on the model's device."""
    loss: Any        # the loss that was differentiated (cross-entropy + aux losses)
    grad_norm: Any   # ||g|| before clipping (over all ranks)
    finite: Any      # bool: loss and gradient norm finite, so the update was applied


class EagerStep:
    reason = None    # why the step is not captured (eager steps are the baseline: nothing to say)

    def __init__(self, model, optimizer, grad_clip: float | None = 1.0, comm=None, precision=None):
        if grad_clip is not None and grad_clip < 0:
            raise ValueError(f"EagerStep: grad_clip must be >= 0 (0 or None: no clipping), got {grad_clip}")
        self.model, self.optimizer, self.comm = model, optimizer, comm
        self.grad_clip = grad_clip or None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.precision = precision or StepPrecision()   # Precision.apply's; fp32: does nothing

    def __call__(self, x, y) -> StepResult:
        """One step on this rank's batch x, y (B, L) token ids (host or device arrays)."""
        backend.device_random().advance()           # a new step for the GPU's random draws
        _, loss = self.model(x, y)
        self.model.zero_grad()
        self.precision.scale(loss).backward()                              # d(loss * S)
        if self.comm is not None:
            from ..distributed.data_parallel import all_reduce_gradients, global_grad_norm
            all_reduce_gradients(self.params, self.comm)                    # g = (1/W) sum_r g_r
        params = self.precision.gradients(self.params)                      # float32, / S
        norm = grad_norm(params) if self.comm is None else global_grad_norm(params, self.comm)
        xp = backend.array_module(norm)
        finite = xp.isfinite(loss.data) & xp.isfinite(norm)                 # the guard's flag
        if self.grad_clip is not None:
            scale_grads_(params, norm, self.grad_clip)                      # g *= min(1, c / n)
        skip = ~finite
        self.optimizer.step(found_inf=skip)
        self.precision.update(skip)                                         # fp16: the loss scale
        return StepResult(loss=loss.data, grad_norm=norm, finite=finite)

    def state_dict(self) -> dict:
        """JSON data to resume this step exactly: the loss scale (fp16), else nothing."""
        return self.precision.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.precision.load_state_dict(state)
