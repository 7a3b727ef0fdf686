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
