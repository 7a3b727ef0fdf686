"""Measured memory: the bytes that arrays really occupy, to check the estimators.

    with track_memory("cpu") as mem:
        model = build_model(...)          # allocations from here on are counted
        step()                            # warm-up: optimizer states now exist
        mem.reset_peak()
        step()
    print(mem.peak)                       # highest total bytes during the second step

CPU: NumPy reports its array buffers to Python's `tracemalloc`, so the traced total
is the arrays (plus small Python objects made meanwhile). GPU: CuPy's memory pools
call a `cupy.cuda.MemoryHook` on every malloc; the hook reads the pools' `used_bytes()`
(bytes handed out to live arrays) and `total_bytes()` (those plus the cached free blocks
the pool holds for reuse). Two peaks, then:

    mem.peak        bytes in use: what the arrays of the step need (compare estimates with it)
    mem.peak_held   bytes the pools hold: in use + cached free blocks (what nvidia-smi sees)

A captured step (tinymoe/step/cuda_graph.py :: CapturedStep) allocates from a pool of its
own; `mem.watch(step.pool)` counts it too (its in-use bytes are the graph's arrays).
"""
from __future__ import annotations

import tracemalloc

from .. import backend


def _pool_peak_hook(pools):
    """A cupy MemoryHook (defined here: cupy is optional) keeping the maximum of the pools'
    bytes in use and held, summed; `pools` is a list the caller may extend."""
    cp = backend.cupy()

    class PoolPeak(cp.cuda.MemoryHook):
        name = "tinymoe_peak"

        def __init__(self):
            super().__init__()
            self.pools = pools
            self.reset()

        def reset(self):
            self.peak, self.peak_held = self.used(), self.held()

        def used(self):
            return sum(p.used_bytes() for p in self.pools)

        def held(self):
            return sum(p.total_bytes() for p in self.pools)

        def malloc_postprocess(self, **kwargs):
            self.peak = max(self.peak, self.used())
            self.peak_held = max(self.peak_held, self.held())

    return PoolPeak()


def _import_cpu_kernels():
    """Import the Numba kernels that ops load on first use. tracemalloc counts every Python
    allocation, and importing Numba (and loading a compiled kernel) allocates some 50 MB once
    per process: without this, whichever measured step first used GELU or the selective
    scan would report it as training memory."""
    from ..kernels import gelu_cpu  # noqa: F401
    from ..kernels.selective_scan import numba_cpu  # noqa: F401


class track_memory:
    """Context manager: `.current` and `.peak` bytes of arrays allocated inside it; on a GPU
    also `.peak_held` (the pools' cached blocks included) and `watch(pool)`."""

    def __init__(self, device: str = "cpu"):
        self.device = backend.check_device(device)

    def __enter__(self):
        if self.device == "cpu":
            _import_cpu_kernels()
            if tracemalloc.is_tracing():
                raise RuntimeError("track_memory: tracemalloc is already tracing; "
                                   "nested or concurrent measurements are not supported")
            tracemalloc.start()
        else:
            cp = backend.cupy()
            cp.cuda.Stream.null.synchronize()
            self._hook = _pool_peak_hook([cp.get_default_memory_pool()])
            self._start, self._start_held = self._hook.used(), self._hook.held()
            self._hook.__enter__()
        return self

    def watch(self, pool):
        """Count a CuPy memory pool of its own too (a CapturedStep's `.pool`), from now on:
        its bytes so far count as allocated inside (a new pool holds none)."""
        if self.device == "cpu":
            raise ValueError("track_memory.watch: CPU memory has no pools to watch")
        self._hook.pools.append(pool)
        self._hook.peak += pool.used_bytes()
        self._hook.peak_held += pool.total_bytes()

    def __exit__(self, *exc):
        self._final = self.current, self.peak, self.peak_held
        if self.device == "cpu":
            tracemalloc.stop()
        else:
            self._hook.__exit__(*exc)
        self._closed = True
        return False

    @property
    def current(self) -> int:
        if getattr(self, "_closed", False):
            return self._final[0]
        if self.device == "cpu":
            return tracemalloc.get_traced_memory()[0]
        return self._hook.used() - self._start

    @property
    def peak(self) -> int:
        """The most bytes in use at once."""
        if getattr(self, "_closed", False):
            return self._final[1]
        if self.device == "cpu":
            return tracemalloc.get_traced_memory()[1]
        return self._hook.peak - self._start

    @property
    def peak_held(self) -> int:
        """The most bytes the pools held at once (GPU; on the CPU, the peak in use)."""
        if getattr(self, "_closed", False):
            return self._final[2]
        if self.device == "cpu":
            return self.peak
        return self._hook.peak_held - self._start_held

    def reset_peak(self):
        """From now on, the peaks start at the current totals."""
        if self.device == "cpu":
            tracemalloc.reset_peak()
        else:
            backend.cupy().cuda.Stream.null.synchronize()
            self._hook.reset()


def memory_breakdown(model, batch: int, seq_len: int, precision: str = "fp32",
                     device: str = "cpu", mem: track_memory | None = None) -> list:
    """(part, bytes) rows of a GPT training step's estimate (accounting.memory ::
    gpt_training_step_bytes, the activations by part), then the total, and, with `mem` (a
    track_memory around the step), the measured peaks: in use, and held by the pools."""
    from ..accounting.memory import gpt_activation_bytes, gpt_training_step_bytes

    step = gpt_training_step_bytes(model, batch, seq_len, precision, device)
    act = gpt_activation_bytes(model.config, batch, seq_len, precision, device)
    rows = [(name, v) for name, v in step.items() if name not in ("activations", "total") and v]
    rows += [(f"activations: {name}", v) for name, v in act.items()
             if isinstance(v, int) and v and name not in ("total", "attention_scores_per_layer")]
    rows.append(("estimate", step["total"]))
    if mem is not None:
        rows += [("measured peak in use", mem.peak), ("measured peak held", mem.peak_held)]
    return rows


def print_memory_breakdown(model, batch: int, seq_len: int, precision: str = "fp32",
                           device: str = "cpu", mem: track_memory | None = None) -> None:
    """memory_breakdown as a table in MiB, with estimate / measured in use."""
    rows = memory_breakdown(model, batch, seq_len, precision, device, mem)
    print(f"memory of a training step ({precision}, {device}, batch {batch} x {seq_len}):")
    for name, v in rows:
        print(f"  {name:<32s} {v / 2**20:10,.1f} MiB")
    if mem is not None and mem.peak:
        print(f"  estimate / measured in use: {rows[-3][1] / mem.peak:.3f}")
