"""`profile()`: record every op of a forward and backward pass.

    with tinymoe.profile.profile(model) as prof:
        logits, loss = model(ids, targets)
        loss.backward()
    print(prof.table(by="op"))          # FLOPs, bytes, intensity, time per op type
    print(prof.table(by="module", depth=2))

Each forward and backward of a `Function` reaches the profiler through the autograd
op hook (`tinymoe.autograd.function.add_op_hook`); the profiler turns it into a
`Record`: op, phase, module, FLOPs, bytes read and written, seconds.

Module attribution: inside the `with`, `Module.__call__` is wrapped so a stack of the
running modules' dotted names is kept; a forward op belongs to the innermost one.
Backward ops run outside any module call: the forward tags the node's Context with its
module (`ctx.profiled_module`), and the node's backward reads the tag back.

Time: on the CPU, the hook's wall time of the op. On the GPU, kernels run
asynchronously, so a CUDA event is recorded at every hook and an op's time is the
GPU time between the previous event and its own (read after a synchronize at exit).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from .. import backend
from ..autograd import function as _function
from .flops import intensity, op_bytes, op_flops


@dataclass
class Record:
    op: str
    phase: str             # "forward" or "backward"
    module: str            # dotted name of the module that ran it ("" = outside any)
    flops: int | None      # None: no FLOP rule for this op
    bytes_read: int
    bytes_written: int
    seconds: float

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


class Profiler:
    """Context manager recording every op (see the module docstring)."""

    def __init__(self, model=None):
        self.model = model
        self.records: list[Record] = []
        self._names = {}
        self._stack = []
        self._events = []                       # (record, cuda event) on the GPU
        self._start_event = None

    # ------------------------------------------------------------------ hooks
    def __enter__(self):
        from ..nn.module import Module

        if self.model is not None:
            self._names = {id(m): name or type(m).__name__ for name, m in self.model.named_modules()}
        self._module_cls = Module
        self._original_call = Module.__call__
        profiler = self

        def call(module, *args, **kwargs):           # Module.__call__, named on a stack
            profiler._stack.append(profiler._names.get(id(module), type(module).__name__))
            try:
                return profiler._original_call(module, *args, **kwargs)
            finally:
                profiler._stack.pop()

        Module.__call__ = call
        if backend.cuda_available():                 # GPU ops are timed from here on
            self._start_event = backend.cupy().cuda.Event()
            self._start_event.record()
        self._handle = _function.add_op_hook(self._on_op)
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self._module_cls.__call__ = self._original_call
        self.wall_seconds = time.perf_counter() - self._wall
        if self._events:
            self._events[-1][1].synchronize()
            previous = self._start_event
            for record, event in self._events:
                record.seconds = backend.cupy().cuda.get_elapsed_time(previous, event) / 1e3
                previous = event
            self._events = []
        return False

    def _on_op(self, event):
        if event.phase == "forward":
            module = self._stack[-1] if self._stack else ""
            event.ctx.profiled_module = module          # read back by this node's backward,
            event.ctx.profiled_params = event.params    # with the forward's keyword params
            params = event.params
        else:
            module = getattr(event.ctx, "profiled_module", "")
            params = getattr(event.ctx, "profiled_params", {})
        flops = op_flops(event.op, event.phase, event.inputs, event.outputs, params)
        read, written = op_bytes(event.op, event.phase, event.inputs, event.outputs)
        record = Record(event.op, event.phase, module, flops, read, written, event.seconds)
        self.records.append(record)
        arrays = [a for a in event.outputs if backend.is_cupy_array(a)]
        if arrays and self._start_event is not None:
            gpu_event = backend.cupy().cuda.Event()
            gpu_event.record()
            self._events.append((record, gpu_event))

    # ------------------------------------------------------------- summaries
    @property
    def total_flops(self) -> int:
        return sum(r.flops or 0 for r in self.records)

    def flops(self, phase=None) -> int:
        return sum(r.flops or 0 for r in self.records if phase in (None, r.phase))

    def summary(self, by: str = "op", depth: int | None = None, phase: str | None = None) -> list[dict]:
        """One row per op type (by="op"), module (by="module", names cut to `depth`
        parts), or (op, phase) (by="op_phase"); sorted by time, largest first."""
        if by not in ("op", "module", "op_phase"):
            raise ValueError(f"Profiler.summary: by must be 'op', 'module' or 'op_phase', got {by!r}")
        rows = {}
        for r in self.records:
            if phase is not None and r.phase != phase:
                continue
            if by == "op":
                key = r.op
            elif by == "op_phase":
                key = f"{r.op} ({'fwd' if r.phase == 'forward' else 'bwd'})"
            else:
                key = ".".join(r.module.split(".")[:depth]) if depth else r.module
                key = key or "(outside modules)"
            row = rows.setdefault(key, {"name": key, "calls": 0, "flops": 0, "unknown_flops": 0,
                                        "bytes": 0, "seconds": 0.0})
            row["calls"] += 1
            row["bytes"] += r.bytes
            row["seconds"] += r.seconds
            if r.flops is None:
                row["unknown_flops"] += 1
            else:
                row["flops"] += r.flops
        out = sorted(rows.values(), key=lambda row: -row["seconds"])
        for row in out:
            row["intensity"] = intensity(row["flops"], row["bytes"])
            row["flop_per_s"] = row["flops"] / row["seconds"] if row["seconds"] > 0 else 0.0
        return out

    def table(self, by: str = "op", depth: int | None = None, phase: str | None = None) -> str:
        """The summary as aligned text (FLOPs marked '?' where some calls had no rule)."""
        rows = self.summary(by, depth, phase)
        total_s = sum(r["seconds"] for r in rows) or 1.0
        head = (f"{'name':<36}{'calls':>6}{'FLOPs':>10}{'bytes':>10}{'FLOP/B':>8}"
                f"{'ms':>9}{'%time':>7}{'FLOP/s':>9}")
        lines = [head, "-" * len(head)]
        for r in rows:
            mark = "?" if r["unknown_flops"] else " "
            lines.append(
                f"{r['name'][:35]:<36}{r['calls']:>6}{_eng(r['flops']):>9}{mark}{_eng(r['bytes']):>10}"
                f"{r['intensity']:>8.2f}{r['seconds'] * 1e3:>9.2f}"
                f"{100 * r['seconds'] / total_s:>7.1f}{_eng(r['flop_per_s']):>9}"
            )
        lines.append("-" * len(head))
        fl = sum(r["flops"] for r in rows)
        nb = sum(r["bytes"] for r in rows)
        lines.append(f"{'total':<36}{sum(r['calls'] for r in rows):>6}{_eng(fl):>9} {_eng(nb):>10}"
                     f"{intensity(fl, nb):>8.2f}{total_s * 1e3:>9.2f}{100.0:>7.1f}{_eng(fl / total_s):>9}")
        return "\n".join(lines)


def _eng(x: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def profile(model=None) -> Profiler:
    """`with profile(model) as prof:` records every op (model: names the modules)."""
    return Profiler(model)
