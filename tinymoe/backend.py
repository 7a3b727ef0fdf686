"""Array backends: NumPy on the CPU, CuPy on an NVIDIA GPU.

Every op asks `array_module(x)` for the module that owns its data, so the same code
runs on both devices (the Chainer idea). Devices have two names: "cpu" and "cuda".
"""
from __future__ import annotations

import os

import numpy as np

try:  # CuPy is an optional extra (tinymoe[cuda12] / tinymoe[cuda13]).
    import cupy as _cupy
except Exception:  # ImportError, or a CuPy that finds no CUDA driver.
    _cupy = None

DEVICES = ("cpu", "cuda")


def cuda_available() -> bool:
    """True when CuPy is installed and sees at least one GPU."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def cupy():
    """The cupy module, or a clear error naming the extra to install."""
    if _cupy is None:
        raise RuntimeError(
            "device 'cuda' needs CuPy: pip install 'tinymoe[cuda12]' or 'tinymoe[cuda13]'"
        )
    return _cupy


def is_cupy_array(x) -> bool:
    return _cupy is not None and isinstance(x, _cupy.ndarray)


def array_module(x):
    """numpy for NumPy arrays (and Python scalars), cupy for CuPy arrays."""
    return _cupy if is_cupy_array(x) else np


def device_of(x) -> str:
    """'cuda' for a CuPy array, 'cpu' for anything else."""
    return "cuda" if is_cupy_array(x) else "cpu"


def check_device(device) -> str:
    if device is None:
        return "cpu"
    device = str(device)
    if device.startswith("cuda"):
        return "cuda"
    if device != "cpu":
        raise ValueError(f"unknown device {device!r}: expected one of {DEVICES}")
    return device


def synchronize(device: str = "cpu") -> None:
    """Wait until the device has run all queued work (timing on a GPU); nothing on the CPU."""
    if check_device(device) == "cuda":
        cupy().cuda.Device().synchronize()


# ---------------------------------------------------------------- CUDA graph capture
# True while tinymoe/step/cuda_graph.py records a step: code that would read a device value
# on the host (a range check, a count) skips it then; the step checked its inputs on the
# host before copying them in.
_capturing = False


def is_capturing() -> bool:
    """True while a CUDA graph of a training step is being captured."""
    return _capturing


def set_capturing(on: bool) -> None:
    global _capturing
    _capturing = bool(on)


def module_for(device: str):
    """The array module that holds data on `device`."""
    return cupy() if check_device(device) == "cuda" else np


def to_device(array, device: str):
    """Copy `array` to `device` ("cpu" or "cuda"); no copy when it is already there."""
    device = check_device(device)
    if device == "cuda":
        return cupy().asarray(array)
    if is_cupy_array(array):
        return _cupy.asnumpy(array)
    return np.asarray(array)


def to_numpy(array) -> np.ndarray:
    return to_device(array, "cpu")


# ---------------------------------------------------------------- random numbers
# One generator per device, both seeded by manual_seed, so parameter init and
# dropout masks are reproducible on either device.
#
# The CPU generator's state is plain data (saved in checkpoints as is). CuPy's
# generator state cannot be read out, so the GPU generator is instead re-keyed from
# (seed, epoch) every time the state is saved: a run that saves and goes on, and a
# run resumed from that save, continue from the same freshly keyed generator.
_cpu_rng = np.random.default_rng(0)
_gpu_rng = None
_seed = 0
_gpu_epoch = 0


def manual_seed(seed: int) -> None:
    """Seed tinymoe's generators on every device (init, dropout, noisy routing)."""
    global _cpu_rng, _gpu_rng, _seed, _gpu_epoch
    _seed = int(seed)
    _cpu_rng = np.random.default_rng(_seed)
    _gpu_rng = None  # re-created lazily from (seed, epoch)
    _gpu_epoch = 0
    global _device_random
    _device_random = None


def rng(device: str = "cpu"):
    """The generator for `device`: numpy.random.Generator or cupy.random.Generator."""
    global _gpu_rng
    if check_device(device) == "cpu":
        return _cpu_rng
    if _gpu_rng is None:
        key = int(np.random.SeedSequence([_seed, _gpu_epoch]).generate_state(1)[0])
        _gpu_rng = cupy().random.default_rng(key)
    return _gpu_rng


class DeviceRandom:
    """The state of the GPU's counter-based draws (kernels/random, Philox4x32-10): a key from
    the seed, the step number in device memory (so a captured step reads it there), and the
    number of draws so far in this step (a host int: the same at every replay)."""

    def __init__(self, seed: int):
        k = np.random.SeedSequence([int(seed), 0x7068696C]).generate_state(2)      # "phil"
        self.key = (int(k[0]), int(k[1]))
        self.draw = 0
        self._step = None                       # (1,) uint32 on the GPU, made on first use
        self._start = 0                         # the step number until then

    def counter(self):
        """The device array holding the step number (made before a capture: CapturedStep)."""
        if self._step is None:
            self._step = cupy().full(1, self._start, dtype=np.uint32)
        return self._step

    def next_draw(self) -> int:
        d, self.draw = self.draw, self.draw + 1
        return d

    def advance(self) -> None:
        """A new step: draws restart at 0 under the next step number (one tiny kernel)."""
        self.draw = 0
        if self._step is None:
            self._start += 1                    # no device array yet: count on the host
        else:
            self._step += 1

    def state(self) -> dict:
        return {"step": int(self._step[0]) if self._step is not None else self._start, "draw": self.draw}

    def load(self, state: dict) -> None:
        self.draw, self._start = int(state["draw"]), int(state["step"])
        if self._step is not None:
            self._step[...] = self._start


_device_random = None


def device_random() -> DeviceRandom:
    """The GPU's counter-based generator state (seeded by manual_seed)."""
    global _device_random
    if _device_random is None:
        _device_random = DeviceRandom(_seed)
    return _device_random


def get_rng_state() -> dict:
    """The generators' state as plain JSON-able data (for checkpoints).

    Side effect: the GPU generator is re-keyed (see above), so that resuming from
    this state reproduces what the running process draws next, on both devices."""
    global _gpu_rng, _gpu_epoch
    _gpu_epoch += 1
    _gpu_rng = None
    return {"seed": _seed, "gpu_epoch": _gpu_epoch, "bit_generator": _cpu_rng.bit_generator.state,
            "philox": device_random().state()}


def set_rng_state(state: dict) -> None:
    global _seed, _gpu_rng, _gpu_epoch
    _seed = int(state["seed"])
    _gpu_epoch = int(state.get("gpu_epoch", 0))
    _gpu_rng = None
    _cpu_rng.bit_generator.state = state["bit_generator"]
    global _device_random
    _device_random = DeviceRandom(_seed)
    if "philox" in state:
        _device_random.load(state["philox"])


def default_float_dtype():
    return np.float32


def set_blas_threads(n: int) -> bool:
    """Use n threads in NumPy's BLAS (OpenBLAS). Its idle threads busy-wait, so on a machine
    where other processes run, 2 threads made a training step 5-8x *slower* than 1 thread
    (docs/moe.md). Returns False when the BLAS library was not found (nothing changed)."""
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n, user_api="blas")
        return True
    except ImportError:
        pass
    import ctypes
    import glob
    for path in glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs",
                                       "*openblas*")):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(ctypes.c_int(n))
                return True
    return False
