"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

    lr(t) = max_lr * (t + 1) / warmup_steps                       t < warmup_steps
    lr(t) = min_lr + (max_lr - min_lr) * (1 + cos(pi * s)) / 2    otherwise,
            s = (t - warmup_steps) / (total_steps - warmup_steps), clipped to [0, 1]

Warmup keeps the first steps small while Adam's second-moment estimate is still
noisy; the cosine spends most steps at a high rate and anneals at the end.
"""
from __future__ import annotations

import math


def lr_at(step: int, max_lr: float, warmup_steps: int, total_steps: int,
          min_lr: float = 0.0) -> float:
    """The learning rate of step `step` (0-based)."""
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(
            f"lr_at: need 0 <= warmup_steps <= total_steps, got "
            f"warmup_steps={warmup_steps}, total_steps={total_steps}"
        )
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    s = min((step - warmup_steps) / span, 1.0)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * s))


class WarmupCosine:
    """Sets every group's lr from `lr_at`; each group's peak is the lr it had when the
    scheduler was made (kept as group["initial_lr"]), its floor that times min_lr_ratio.

        sched = WarmupCosine(opt, warmup_steps=100, total_steps=5000)
        for step in range(5000):
            ...; opt.step(); sched.step()      # sched.step() sets the next step's lr

    To resume after `n` finished steps, make it with `start_step=n`.
    """

    def __init__(self, optimizer, warmup_steps: int, total_steps: int,
                 min_lr_ratio: float = 0.1, start_step: int = 0):
        self.optimizer = optimizer
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.min_lr_ratio = min_lr_ratio
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.current_step = start_step
        self._apply()

    def _apply(self):
        for group in self.optimizer.param_groups:
            peak = group["initial_lr"]
            group["lr"] = lr_at(self.current_step, peak, self.warmup_steps,
                                self.total_steps, peak * self.min_lr_ratio)

    def step(self):
        self.current_step += 1
        self._apply()

    def get_last_lr(self) -> list:
        return [group["lr"] for group in self.optimizer.param_groups]
