"""MambaLM: recurrent == parallel, training lowers the loss, checkpoints round-trip."""
import numpy as np
import pytest

import tinymoe
from tinymoe.checkpoint import load_checkpoint, save_checkpoint
from tinymoe.models.mamba import MambaConfig, MambaLM
from tinymoe.optim import AdamW


def tiny(**kw):
    cfg = dict(vocab_size=11, d_model=8, n_layer=2, d_state=3, d_conv=3)
    return MambaLM(MambaConfig(**{**cfg, **kw}))


def test_step_by_step_equals_forward():
    model = tiny().to(dtype=np.float64)
    ids = np.random.default_rng(0).integers(0, 11, (2, 7))
    logits, loss = model(ids)
    assert logits.shape == (2, 7, 11) and loss is None
    state = model.allocate_state(2)
    steps = np.stack([model.step(ids[:, t], state).data for t in range(7)], axis=1)
    np.testing.assert_allclose(steps, logits.data, rtol=1e-9, atol=1e-11)


def test_state_size_is_constant():
    model = tiny()
    state = model.allocate_state(1)
    sizes = sum(a.nbytes for layer in state for a in layer)
    model.generate(np.array([[1, 2]]), max_new_tokens=5)
    assert sizes == 2 * 16 * (3 + 3) * 4                          # n_layer * d_inner * (d_conv + N) * fp32


def test_training_lowers_the_loss():
    tinymoe.manual_seed(0)
    model = tiny()
    opt = AdamW(model.parameters(), lr=1e-2)
    ids = np.tile(np.arange(8), (4, 2))                          # a periodic sequence: learnable
    losses = []
    for _ in range(15):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_generate_and_checkpoint(tmp_path):
    model = tiny()
    out = model.generate(np.array([[1, 2, 3]]), max_new_tokens=4, temperature=0)
    assert out.shape == (1, 7) and (out[:, :3] == [1, 2, 3]).all()
    save_checkpoint(tmp_path / "m.safetensors", model)
    other = tiny()
    load_checkpoint(tmp_path / "m.safetensors", other)
    ids = np.array([[4, 5, 6]])
    np.testing.assert_array_equal(model(ids)[0].data, other(ids)[0].data)
    np.testing.assert_array_equal(other.generate(np.array([[1, 2, 3]]), 4, temperature=0), out)


def test_bad_input():
    with pytest.raises(ValueError, match="MambaLM: n_layer must be >= 1"):
        tiny(n_layer=0)
    with pytest.raises(ValueError, match=r"MambaLM: ids must be \(B, L\)"):
        tiny()(np.array([1, 2]))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        tiny().generate(np.array([[1]]), 2, temperature=-1)


def test_lti_mixer_baseline():
    model = tiny(mixer="s4d").to(dtype=np.float64)
    assert type(model.layers[0].mixer).__name__ == "S4DBlock"
    ids = np.random.default_rng(1).integers(0, 11, (2, 5))
    logits, loss = model(ids, ids)
    loss.backward()
    assert logits.shape == (2, 5, 11) and model.layers[1].mixer.ssm.log_dt.grad is not None
    with pytest.raises(ValueError, match="mixer must be 'mamba' or 's4d', got 'rnn'"):
        tiny(mixer="rnn")


@pytest.mark.gpu
def test_gpu_generation_replays_one_captured_graph_per_token():
    """On a GPU each token is one replay of the captured step (models/decode_graph.py): the
    same greedy tokens as eager GPU steps and as the CPU (float64), the graph reused across
    calls, following weights loaded in place, and recorded anew when the arrays are replaced."""
    model = tiny(n_layer=2).to(dtype=np.float64)
    prompt = np.random.default_rng(0).integers(0, 11, (3, 5))
    on_cpu = model.generate(prompt, 12, temperature=0)
    gpu = model.to("cuda")
    captured = gpu.generate(prompt, 12, temperature=0)
    decoder = gpu._decoders[3]
    assert gpu.generate(prompt, 12, temperature=0).tolist() == captured.tolist()
    assert gpu._decoders[3] is decoder                                   # reused, states reset
    gpu._capture_failed = True                                           # eager steps on the GPU
    eager = gpu.generate(prompt, 12, temperature=0)
    assert captured.tolist() == eager.tolist() == on_cpu.tolist()
    gpu._capture_failed = False
    other = tiny(n_layer=2).to(dtype=np.float64)                         # other weights, in place
    gpu.load_state_dict(other.state_dict())
    assert gpu.generate(prompt, 12, temperature=0).tolist() == other.generate(prompt, 12, temperature=0).tolist()
    gpu.to(dtype=np.float32)                                             # new arrays: a new graph
    gpu.generate(prompt, 2, temperature=0)
    assert gpu._decoders[3] is not decoder
