import numpy as np
import pytest

import tinymoe
from tinymoe import backend


def test_array_module_and_devices():
    a = np.zeros(3)
    assert backend.array_module(a) is np
    assert backend.device_of(a) == "cpu"
    assert backend.to_device(a, "cpu") is a or np.shares_memory(backend.to_device(a, "cpu"), a)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        backend.check_device("tpu")
    assert tinymoe.tensor([1.0]).device == "cpu"
    assert backend.check_device("cuda:0") == "cuda"


def test_cuda_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", None)
    assert not tinymoe.cuda_available()
    with pytest.raises(RuntimeError, match=r"needs CuPy: pip install 'tinymoe\[cuda12\]'"):
        tinymoe.zeros(2, device="cuda")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_rng_state_round_trip_reproduces_the_next_draws(device):
    tinymoe.manual_seed(11)
    tinymoe.randn(5, device=device)
    state = backend.get_rng_state()
    going_on = tinymoe.randn(7, device=device).numpy()
    tinymoe.manual_seed(999)  # another process, or the same one later
    tinymoe.randn(3, device=device)
    backend.set_rng_state(state)
    np.testing.assert_array_equal(tinymoe.randn(7, device=device).numpy(), going_on)
