"""Measured memory: the bytes that arrays really occupy, to check the estimators.

    with track_memory("cpu") as mem:
        model = build_model(...)          # allocations from here on are counted
        step()                            # warm-up: optimizer states now exist
        mem.reset_peak()
        step()
    print(mem.peak)                       # highest total bytes during the second step

CPU: NumPy reports its array buffers to Python's `tracemalloc`, so the traced total
is the arrays (plus small Python objects made meanwhile). GPU: CuPy's memory pool
calls a `cupy.cuda.MemoryHook` on every malloc and free; the hook reads the pool's
`used_bytes()` (bytes handed out to live arrays, not the cached free blocks).
"""
from __future__ import annotations

import tracemalloc

from .. import backend


def _pool_peak_hook():
    """A cupy MemoryHook (defined here: cupy is optional) keeping used_bytes' maximum."""
    cp = backend.cupy()

    class PoolPeak(cp.cuda.MemoryHook):
        name = "tinymoe_peak"

        def __init__(self):
            super().__init__()
            self.pool = cp.get_default_memory_pool()
            self.peak = self.pool.used_bytes()

        def malloc_postprocess(self, **kwargs):
            self.peak = max(self.peak, self.pool.used_bytes())

    return PoolPeak()


def _import_cpu_kernels():
    """Import the Numba kernels that ops load on first use. tracemalloc counts every Python
    allocation, and importing Numba (and loading a compiled kernel) allocates some 50 MB once
    per process: without this, whichever measured step first used GELU or the selective
    scan would report it as training memory."""
    from ..kernels import gelu_cpu  # noqa: F401
    from ..kernels.selective_scan import numba_cpu  # noqa: F401


class track_memory:
    """Context manager: `.current` and `.peak` bytes of arrays allocated inside it."""

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
            self._pool = cp.get_default_memory_pool()
            self._start = self._pool.used_bytes()
            self._hook = _pool_peak_hook()
            self._hook.__enter__()
        return self

    def __exit__(self, *exc):
        self._final_current, self._final_peak = self.current, self.peak
        if self.device == "cpu":
            tracemalloc.stop()
        else:
            self._hook.__exit__(*exc)
        self._closed = True
        return False

    @property
    def current(self) -> int:
        if getattr(self, "_closed", False):
            return self._final_current
        if self.device == "cpu":
            return tracemalloc.get_traced_memory()[0]
        return self._pool.used_bytes() - self._start

    @property
    def peak(self) -> int:
        if getattr(self, "_closed", False):
            return self._final_peak
        if self.device == "cpu":
            return tracemalloc.get_traced_memory()[1]
        return self._hook.peak - self._start

    def reset_peak(self):
        """From now on, the peak starts at the current total."""
        if self.device == "cpu":
            tracemalloc.reset_peak()
        else:
            backend.cupy().cuda.Stream.null.synchronize()
            self._hook.peak = self._pool.used_bytes()
