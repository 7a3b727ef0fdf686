"""How one training step runs: one owner, so that the trainer reads like a recipe.

    step = make_step(model, optimizer, grad_clip=1.0, comm=None)
    result = step(x, y)        # forward, backward, (all-reduce), clip, guarded update
    result.loss, result.grad_norm, result.finite      # 0-d arrays, still on the device

A step object knows how the step runs (eagerly op by op, or replayed as a captured CUDA
graph; one process or W ranks; in which precision); the trainer only calls it and reads
its results at log time. `step.reason` says why a step that could have been captured runs
eagerly (None when there is nothing to say). `step.state_dict()` is JSON data that the
trainer keeps in the checkpoint, so a resumed run continues exactly.
"""
from .eager import EagerStep, StepResult
from .guard import DivergenceError, DivergenceGuard


def make_step(model, optimizer, grad_clip: float | None = 1.0, comm=None) -> EagerStep:
    """The step object for this model and run."""
    return EagerStep(model, optimizer, grad_clip=grad_clip, comm=comm)


__all__ = ["make_step", "EagerStep", "StepResult", "DivergenceGuard", "DivergenceError"]
