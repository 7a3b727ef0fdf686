import os

import numpy as np
import pytest

import tinymoe

os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config, items):
    if tinymoe.cuda_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CuPy (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    tinymoe.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(autouse=True)
def _float32_matmuls_after_each_test():
    """TF32 is a process-wide cuBLAS mode (tinymoe/precision/tf32.py): a test that trains in
    tf32 must not leave the next test's float32 products rounded to 10 mantissa bits."""
    yield
    from tinymoe.precision import set_tf32, tf32_enabled
    if tf32_enabled():
        set_tf32(False)
