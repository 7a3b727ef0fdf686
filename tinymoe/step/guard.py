"""The divergence guard: a run whose loss or gradient becomes NaN or infinite stops cleanly.

Every step reports `finite` (loss and gradient norm finite) on the device; a step that is
not finite was skipped by the optimizer (no update at all), so the weights stay the last
good ones. The guard collects those flags without reading them, and reads them all in one
transfer when the trainer checks it (at log and checkpoint steps: no per-step host
synchronization on a GPU). After `max_bad_steps` non-finite steps in a row it raises
DivergenceError naming the steps; the trainer then stops without saving, so the last
checkpoint (all finite, since save_checkpoint refuses anything else) is kept.
"""
from __future__ import annotations

import numpy as np

from .. import backend


class DivergenceError(RuntimeError):
    """Too many non-finite steps in a row: the run stopped, its last checkpoint kept."""


class DivergenceGuard:
    def __init__(self, max_bad_steps: int = 5):
        if max_bad_steps < 1:
            raise ValueError(f"DivergenceGuard: max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.skipped = 0            # non-finite (skipped) steps so far in the run
        self.streak = 0             # of which the last `streak` in a row
        self._pending = []          # (step, finite flag on the device), not read yet

    def record(self, step: int, finite) -> None:
        self._pending.append((step, finite))

    def check(self) -> None:
        """Read the recorded flags (one transfer); raise DivergenceError on a long bad streak."""
        if not self._pending:
            return
        steps = [s for s, _ in self._pending]
        xp = backend.array_module(self._pending[0][1])
        flags = np.asarray(backend.to_numpy(xp.stack([f for _, f in self._pending])), bool)
        self._pending = []
        for step, ok in zip(steps, flags):
            self.streak = 0 if ok else self.streak + 1
            self.skipped += int(not ok)
            if self.streak >= self.max_bad_steps:
                raise DivergenceError(
                    f"train: the loss or the gradient norm was not finite in {self.streak} steps in "
                    f"a row (steps {step - self.streak + 1}-{step}); every such step was skipped, and "
                    f"the run stops here without saving, so its last checkpoint (all finite) is kept. "
                    f"Try a lower --lr, --grad-clip > 0, or --max-bad-steps to allow more")

    def state_dict(self) -> dict:
        self.check()
        return {"skipped": self.skipped, "streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.streak = int(state["skipped"]), int(state["streak"])
