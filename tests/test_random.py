"""The counter-based generator (Philox4x32-10): the NumPy spec against the Random123
known-answer vectors and basic statistics; on a GPU the kernels equal the spec, every step
draws new numbers, and a saved RNG state resumes the same draws."""
import shutil
import subprocess

import numpy as np
import pytest

import tinymoe
from tinymoe import backend
from tinymoe.kernels.random import reference as ref


@pytest.mark.parametrize("counter,key,expected", [
    ([0, 0, 0, 0], [0, 0], "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, "408f276d 41c83b0e a20bc7c6 6d5451fd"),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     "d16cfe09 94fdcceb 5001e420 24126ea1"),
])
def test_philox_matches_the_random123_known_answers(counter, key, expected):
    out = ref.philox4x32(np.array([counter], np.uint64), key)[0]
    assert " ".join(f"{v:08x}" for v in out) == expected


def test_uniform_and_normal_have_the_right_moments_and_depend_on_every_counter_word():
    key = (12345, 678)
    u = ref.uniform(200_003, key, draw=0, step=0)
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 5e-3 and abs(u.var() - 1 / 12) < 2e-3
    z = ref.normal(200_003, key, draw=0, step=0, dtype=np.float64)
    assert abs(z.mean()) < 1e-2 and abs(z.std() - 1) < 1e-2
    assert np.isfinite(z).all()
    for other in (ref.uniform(1000, key, 1, 0), ref.uniform(1000, key, 0, 1), ref.uniform(1000, (1, 678), 0, 0)):
        assert not np.array_equal(other, u[:1000])                       # draw, step, key matter
    np.testing.assert_array_equal(ref.uniform(7, key, 0, 0), u[:7])      # a prefix is a prefix


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_philox_cu_compiles(tmp_path):
    from tinymoe.kernels import random
    src = tmp_path / "philox.cu"
    src.write_text(random.SOURCE.read_text() + """
__global__ void all(float* u, double* z, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { u[i] = tinymoe_uniform(i, 1u, 2u, 3u, 4u); z[i] = tinymoe_normal(i, 1u, 2u, 3u, 4u); }
}
""")
    res = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-Werror", "all-warnings",
                          "-o", str(tmp_path / "k.cubin"), str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_the_rng_state_carries_the_device_counter():
    tinymoe.manual_seed(7)
    rng = backend.device_random()
    rng.next_draw()
    state = backend.get_rng_state()
    assert state["philox"] == {"step": 0, "draw": 1}
    state["philox"] = {"step": 41, "draw": 3}
    backend.set_rng_state(state)
    assert backend.device_random().state() == {"step": 41, "draw": 3}
    tinymoe.manual_seed(7)
    assert backend.device_random().key == rng.key


def test_steps_advance_before_the_device_counter_exists():
    # a resumed run makes its device array later than the run that saved: the step number
    # must count every step either way (found by the GPU resume test below)
    tinymoe.manual_seed(0)
    rng = backend.device_random()
    rng.advance()
    rng.advance()
    assert rng.state() == {"step": 2, "draw": 0}
    backend.set_rng_state({**backend.get_rng_state(), "philox": {"step": 4, "draw": 2}})
    backend.device_random().advance()
    assert backend.device_random().state() == {"step": 5, "draw": 0}


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_kernels_equal_the_numpy_spec(dtype):
    from tinymoe.kernels import random
    tinymoe.manual_seed(3)
    rng = backend.device_random()
    u = backend.to_numpy(random.uniform((5, 7, 3), dtype))       # step 0
    z = backend.to_numpy(random.normal((1001,), dtype))
    s = backend.to_numpy(random.dropout_scale((333,), dtype, 0.25))
    np.testing.assert_array_equal(u.reshape(-1), ref.uniform(105, rng.key, 0, 0, dtype))
    np.testing.assert_allclose(z, ref.normal(1001, rng.key, 1, 0, dtype), rtol=1e-6, atol=1e-6)
    keep = ref.uniform(333, rng.key, 2, 0) >= np.float32(0.25)
    np.testing.assert_array_equal(s, np.where(keep, dtype(1 / 0.75), 0).astype(dtype))
    rng.advance()                                # the next step: new numbers
    u2 = backend.to_numpy(random.uniform((5, 7, 3), dtype))
    np.testing.assert_array_equal(u2.reshape(-1), ref.uniform(105, rng.key, 0, 1, dtype))


@pytest.mark.gpu
def test_gpu_dropout_model_trains_the_same_after_a_resume(tmp_path):
    from tinymoe.checkpoint import load_checkpoint, save_checkpoint
    from tinymoe.models import build_model
    from tinymoe.optim import AdamW
    from tinymoe.step import make_step

    def make(seed):
        tinymoe.manual_seed(seed)
        m = build_model("gpt", block_size=16, n_layer=1, d_model=32, n_head=2, d_ff=32, dropout=0.2).to("cuda")
        return m, AdamW(m.parameters(), lr=1e-2)

    data = np.random.default_rng(0).integers(0, 256, (8, 2, 17))
    m, opt = make(0)
    step = make_step(m, opt, cuda_graph="on")
    for i in range(8):
        step(data[i, :, :-1], data[i, :, 1:])
        if i == 3:
            save_checkpoint(tmp_path / "c.safetensors", m, opt, 4)
    m2, opt2 = make(1)
    load_checkpoint(tmp_path / "c.safetensors", m2, opt2)
    step2 = make_step(m2, opt2, cuda_graph="on")
    for i in range(4, 8):
        step2(data[i, :, :-1], data[i, :, 1:])
    assert step.graph is not None and step2.graph is not None
    for p, q in zip(m.parameters(), m2.parameters()):
        np.testing.assert_allclose(backend.to_numpy(q.data), backend.to_numpy(p.data), rtol=1e-5, atol=1e-6)
