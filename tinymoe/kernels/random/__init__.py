"""Random numbers on the GPU from a counter (Philox4x32-10): what dropout and the noisy
routers draw from on CuPy arrays, inside a CUDA graph or not.

    u = uniform(shape, dtype)           [0, 1)
    z = normal(shape, dtype)            N(0, 1)
    s = dropout_scale(shape, dtype, p)  (u >= p) / (1 - p): a dropout mask, one launch

Each call is the next `draw` of the current step of tinymoe.backend.device_random(): the
draw number is a kernel argument (the same at every replay of a captured step) and the step
number is read from device memory, which the step object advances at the start of every step
(inside the graph when captured), so two steps never draw the same numbers and a replayed
graph draws new ones. The spec is reference.py (NumPy).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ... import backend

SOURCE = Path(__file__).with_name("philox.cu")
_ARGS = "raw uint32 step, uint32 draw, uint32 k0, uint32 k1"
KERNELS = {   # name -> (inputs, output, body)
    "uniform": (_ARGS, "T u", "u = T(tinymoe_uniform(i, draw, step[0], k0, k1))"),
    "normal": (_ARGS, "T z", "z = T(tinymoe_normal(i, draw, step[0], k0, k1))"),
    "dropout": (_ARGS + ", float32 p, T scale", "T s",
                "s = tinymoe_uniform(i, draw, step[0], k0, k1) >= p ? scale : T(0)"),
}


@lru_cache(maxsize=None)
def _kernel(name):
    ins, out, body = KERNELS[name]
    return backend.cupy().ElementwiseKernel(ins, out, body, f"tinymoe_philox_{name}",
                                            preamble=SOURCE.read_text())


def _launch(name, shape, dtype, *extra):
    rng = backend.device_random()
    out = backend.cupy().empty(shape, dtype)
    k0, k1 = rng.key
    _kernel(name)(rng.counter(), np.uint32(rng.next_draw()), np.uint32(k0), np.uint32(k1), *extra, out)
    return out


def uniform(shape, dtype=np.float32):
    return _launch("uniform", shape, dtype)


def normal(shape, dtype=np.float32):
    return _launch("normal", shape, dtype)


def dropout_scale(shape, dtype, p: float):
    """(u >= p) / (1 - p) per element: multiply by it to drop with probability p."""
    dtype = np.dtype(dtype)
    return _launch("dropout", shape, dtype, np.float32(p), dtype.type(1 / (1 - p)))
