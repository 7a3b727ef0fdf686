"""How one training step runs: one owner, so that the trainer reads like a recipe.

    step = make_step(model, optimizer, grad_clip=1.0, comm=None, precision=None)
    result = step(x, y)        # forward, backward, (all-reduce), clip, guarded update
    result.loss, result.grad_norm, result.finite      # 0-d arrays, still on the device

A step object knows how the step runs (eagerly op by op, or replayed as a captured CUDA
graph; one process or W ranks; in which precision); the trainer only calls it and reads
its results at log time. `step.reason` says why a step that could have been captured runs
eagerly (None when there is nothing to say). `step.state_dict()` is JSON data that the
trainer keeps in the checkpoint, so a resumed run continues exactly.
"""
from .. import backend
from .eager import EagerStep, StepResult
from .guard import DivergenceError, DivergenceGuard


CUDA_GRAPH = ("auto", "on", "off")


def make_step(model, optimizer, grad_clip: float | None = 1.0, comm=None, cuda_graph: str = "auto",
              precision=None):
    """The step object for this model and run. cuda_graph: "auto" captures the step as a CUDA
    graph when the model allows it (a GPU, one process, static shapes: see
    cuda_graph.capture_blocker) and runs eagerly otherwise, saying why in `reason` when the
    model is on a GPU; "on" raises instead of running eagerly; "off" always runs eagerly.
    precision: the StepPrecision of tinymoe.precision's Precision.apply (None: float32); its
    loss scaling and master weights are part of the step, captured or not."""
    from .cuda_graph import CapturedStep, capture_blocker

    if cuda_graph not in CUDA_GRAPH:
        raise ValueError(f"make_step: cuda_graph must be one of {CUDA_GRAPH}, got {cuda_graph!r}")
    if cuda_graph == "off":
        return EagerStep(model, optimizer, grad_clip=grad_clip, comm=comm, precision=precision)
    blocker = capture_blocker(model, optimizer, comm)
    if blocker is None:
        return CapturedStep(model, optimizer, grad_clip=grad_clip, comm=comm, precision=precision)
    if cuda_graph == "on":
        raise ValueError(f"cuda_graph='on' (--cuda-graph on): this step cannot be captured: {blocker}")
    step = EagerStep(model, optimizer, grad_clip=grad_clip, comm=comm, precision=precision)
    on_gpu = any(backend.is_cupy_array(p.data) for p in model.parameters())
    step.reason = f"no CUDA graph: {blocker}" if on_gpu else None
    return step


__all__ = ["make_step", "CUDA_GRAPH", "EagerStep", "StepResult", "DivergenceGuard", "DivergenceError"]
