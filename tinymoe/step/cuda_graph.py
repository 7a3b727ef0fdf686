"""The training step as one CUDA graph: record it once, replay it every step.

A small model's eager step is bound by the host: every op is a Python call and a kernel
launch (~10-35 us each), while the GPU finishes most kernels in a few us. CUDA graphs
record the launches of one whole step (forward, backward, norm, clip, AdamW) once, and a
replay sends them all to the GPU in one call.

    step = CapturedStep(model, optimizer, grad_clip=1.0)
    result = step(x, y)          # x, y: (B, L) token ids, NumPy (checked here) or device

How (the rules of capture, and what tinymoe does about each):
- Fixed addresses: the batch is copied into static input buffers (the replay reads them);
  the parameters, gradients and AdamW's moments live in one flat buffer each (optim/flat.py,
  the engine writes gradients there); every array made during capture comes from a memory
  pool private to the graph (nothing else can reuse, and overwrite, its addresses).
- cuBLAS: CuPy refuses cuBLAS calls during a capture, so the products go through
  kernels/blas.py then (cuBLAS called directly, with a fixed workspace).
- No host synchronization: nothing may read a device value on the host while capturing
  (`.item()`, `float()`, a `.get()`, a Python `if` on a device value, a size that depends on
  data, a Thrust sort). The step's numbers stay on the device (norm, finite flag, AdamW's
  lr, step count and found_inf: kernels/optim.py); the MoE uses static dispatch (C rows per
  expert) and a top-k kernel; the checks that read data (token ids in range) are done here on
  the host before the copy, and skipped inside (backend.is_capturing()).
- Host inputs that change every step enter through device buffers written before a replay:
  the batch, and the learning rate of the schedule (optimizer.load_lr(): one small copy).
- Randomness (dropout, noisy routers) comes from a counter-based generator on the device
  (kernels/random, Philox): the step number it reads lives in device memory and the step
  advances it at its start (recorded in the graph), so no two replays draw the same noise.
- Warm-up: the first `warmup` steps run eagerly on the capture stream with the private pool
  (compiling kernels, creating cuBLAS's workspace, filling the pool); the next is captured on
  that stream and replayed from then on (on the caller's stream).
- Mixed precision (tinymoe/precision) is recorded with the rest: the loss scale S and its
  clean-step count are 0-d device arrays updated in place, and a 16-bit model's
  MasterWeights converts gradients and rounds weights between two flat buffers (one kernel
  each way) whose addresses never change.
- What cannot be captured runs eagerly, and `reason` says why once: a model that breaks a
  rule (capture_blocker names the rule), or a capture that failed (the CUDA error). A batch
  of another shape is refused; an optimizer whose state was loaded anew is recorded anew.
The replayed step launches the same kernels as the eager one in the same order, so eager
and captured training give the same numbers (tests/test_cuda_graph.py).
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..models.lm import check_token_ids
from .eager import EagerStep, StepResult


def capture_blocker(model, optimizer, comm=None) -> str | None:
    """Why this model's step cannot be captured (a sentence), or None when it can."""
    from ..nn.moe import MoELayer
    from ..nn.moe.routers import BaseRouter, ExpertChoiceRouter
    from ..nn.ssm.mamba import MambaBlock
    from ..optim import AdamW
    from ..optim.master import MasterWeights

    if isinstance(optimizer, MasterWeights):        # a 16-bit model: the masters' optimizer
        optimizer = optimizer.optimizer
    params = list(model.parameters())
    if not params or not backend.is_cupy_array(params[0].data):
        return "the model is not on a GPU (CUDA graphs record GPU work)"
    if comm is not None:
        return "the step runs on several processes (its all-reduce is not captured)"
    if not isinstance(optimizer, AdamW) or optimizer.fused is False:
        return (f"the optimizer ({type(optimizer).__name__}) is not a fused AdamW: its update "
                "takes the learning rate and step count from the host")
    if len({p.data.dtype for p in params}) != 1:
        return "the parameters have several dtypes (the fused optimizer needs one flat buffer)"
    for name, m in model.named_modules():
        if isinstance(m, MoELayer):
            if m.capacity_factor is None and not m.experts.reads_bounds_on_device(params[0].data.dtype):
                return (f"{name}: dropless MoE (capacity_factor=None) in {params[0].data.dtype}: the "
                        "experts' matmuls need the group sizes on the host (16-bit experts read "
                        "them on the device)")
            if m.static_dispatch is False:
                return f"{name}: static_dispatch=False (the dynamic plan reads its row bounds on the host)"
            if isinstance(m.gate, BaseRouter):
                return f"{name}: the BASE router solves its assignment on the host"
            if isinstance(m.gate, ExpertChoiceRouter):
                return f"{name}: expert-choice routing sorts with Thrust, which waits for the GPU"
        if isinstance(m, MambaBlock) and m.impl == "numba_cuda":
            return f"{name}: the Numba scan kernels launch on Numba's stream, not the captured one"
    return None


class CapturedStep:
    def __init__(self, model, optimizer, grad_clip: float | None = 1.0, comm=None, warmup: int = 2,
                 precision=None):
        from ..optim.master import MasterWeights
        self.eager = EagerStep(model, optimizer, grad_clip=grad_clip, comm=comm, precision=precision)
        self.model = model
        # the fused AdamW whose flat buffers the graph reads and writes (a 16-bit model's
        # MasterWeights wraps it: its masters, gradients and moments are the float32 buffers)
        self.optimizer = optimizer.optimizer if isinstance(optimizer, MasterWeights) else optimizer
        self.warmup = warmup
        self.reason = capture_blocker(model, optimizer, comm)
        self.graph = None
        self.error = None           # the exception of a failed capture
        self.fused_state = None     # the optimizer's flat buffers the graph was recorded with
        self.steps = 0              # steps taken by this object (eager warm-up included)
        self.vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if self.reason is None:
            cp = backend.cupy()
            self.stream = cp.cuda.Stream(non_blocking=True)
            self.pool = cp.cuda.MemoryPool()            # the graph's own: nothing else allocates here

    # ------------------------------------------------------------------ the step
    def __call__(self, x, y) -> StepResult:
        if self.reason is not None:
            return self.eager(x, y)
        self._check(x, y)
        self.steps += 1
        if self.graph is not None and (tuple(x.shape) != self.x.shape or tuple(y.shape) != self.y.shape):
            raise ValueError(f"CapturedStep: batch shapes x {tuple(x.shape)}, y {tuple(y.shape)} differ "
                             f"from the captured {self.x.shape}; the graph replays fixed shapes (make "
                             "a new step object, or cuda_graph='off')")
        if self.graph is not None and self.optimizer._flat is not self.fused_state:
            self.graph = None                            # the optimizer's buffers were rebuilt
        if self.graph is not None:                       # (load_state_dict): record anew
            return self._replay(x, y)
        if self.fused_state is not None:
            return self._capture(x, y)
        if self.steps <= self.warmup:
            return self._on_stream(lambda: self.eager(x, y))
        return self._capture(x, y)

    def _check(self, x, y):
        """Token ids in [0, vocab): on the host, before the copy (the graph cannot check)."""
        for name, a in (("x", x), ("y", y)):
            if backend.is_cupy_array(a) or self.vocab is None:
                continue                # device ids: checked by the eager ops of the warm-up only
            check_token_ids(np.asarray(a), self.vocab, f"CapturedStep: {name}")

    def _on_stream(self, fn):
        """fn() on the capture stream with the graph's pool, ordered after the caller's stream."""
        cp = backend.cupy()
        caller = cp.cuda.get_current_stream()
        self.stream.wait_event(caller.record())
        with cp.cuda.using_allocator(self.pool.malloc), self.stream:
            out = fn()
        caller.wait_event(self.stream.record())
        return out

    def _capture(self, x, y):
        from ..kernels import blas
        cp = backend.cupy()
        self.optimizer.load_lr()                          # builds the flat state if not yet
        blas.prepare()                                    # cuBLAS handle + workspace: not in capture
        backend.device_random().counter()                 # the RNG's step number: made, not recorded
        self.x = cp.asarray(x).copy()                     # the static input buffers (B, L)
        self.y = cp.asarray(y).copy()

        def record():
            self.stream.begin_capture()
            backend.set_capturing(True)
            try:
                r = self.eager(self.x, self.y)
                # the step's numbers in one buffer that every replay refills: (loss, norm, finite)
                packed = cp.stack([r.loss.astype(cp.float64), r.grad_norm.astype(cp.float64),
                                   r.finite.astype(cp.float64)])
            finally:
                backend.set_capturing(False)
                graph = self.stream.end_capture()        # raises if the capture was invalidated
            return packed, graph

        try:
            packed, graph = self._on_stream(record)
        except Exception as err:                         # a rule broken: run eagerly from now on
            self.error = err                             # (its traceback names the op)
            self.reason = f"the capture failed ({type(err).__name__}: {err})"
            print(f"CapturedStep: {self.reason}; the step runs eagerly")
            self.model.zero_grad()
            return self.eager(x, y)
        self.graph, self.packed = graph, packed
        self.fused_state = self.optimizer._flat           # the buffers the graph reads and writes
        return self._launch()                             # the capture only recorded: run it

    def _launch(self) -> StepResult:
        cp = backend.cupy()
        self.graph.launch(stream=cp.cuda.get_current_stream())
        out = self.packed.copy()                          # this step's own copy (the guard keeps it)
        return StepResult(loss=out[0], grad_norm=out[1], finite=out[2] > 0)

    def _replay(self, x, y):
        self.optimizer.load_lr()      # the schedule's lr, one small copy (re-attaches replaced params)
        for buf, a in ((self.x, x), (self.y, y)):
            if backend.is_cupy_array(a):
                buf[...] = a
            else:
                buf.set(np.ascontiguousarray(a, dtype=buf.dtype))
        return self._launch()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return self.eager.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.eager.load_state_dict(state)
