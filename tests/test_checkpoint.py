"""Checkpoints: round trip, damaged files, atomic saves, bit-for-bit resume."""
import dataclasses
import os
import struct

import numpy as np
import pytest
import safetensors.numpy

import tinymoe
from tinymoe import backend, safetensors_file
from tinymoe.checkpoint import load_checkpoint, save_checkpoint
from tinymoe.nn import F, Dropout, Embedding, LayerNorm, Linear, Module
from tinymoe.optim import AdamW, WarmupCosine, clip_grad_norm_


@dataclasses.dataclass
class TinyConfig:
    vocab: int = 11
    dim: int = 8
    dropout: float = 0.3


class TinyLM(Module):
    """Embedding -> dropout -> LayerNorm -> Linear: enough to exercise every piece."""

    def __init__(self, config=TinyConfig()):
        super().__init__()
        self.config = config
        self.emb = Embedding(config.vocab, config.dim, std=0.5)
        self.drop = Dropout(config.dropout)
        self.norm = LayerNorm(config.dim)
        self.head = Linear(config.dim, config.vocab)

    def forward(self, ids):
        # ids (B, L) -> logits (B, L, V)
        return self.head(self.norm(self.drop(self.emb(ids))))


def batch(step):
    """The batch of a step depends only on the step: data order is not under test."""
    rng = np.random.default_rng(1000 + step)
    ids = rng.integers(0, 11, size=(4, 6))
    return ids, (ids * 3 + 1) % 11  # a learnable mapping


def train(model, opt, sched, steps):
    losses = []
    for step in steps:
        ids, targets = batch(step)
        loss = F.cross_entropy(model(ids), targets)
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def fresh(seed, start_step=0):
    tinymoe.manual_seed(seed)
    model = TinyLM()
    opt = AdamW([
        {"params": [model.emb.weight, model.head.weight], "weight_decay": 0.1},
        {"params": [model.norm.weight, model.norm.bias, model.head.bias], "weight_decay": 0.0},
    ], lr=1e-2)
    return model, opt, WarmupCosine(opt, warmup_steps=2, total_steps=12, start_step=start_step)


@pytest.fixture
def saved(tmp_path):
    model, opt, sched = fresh(0)
    train(model, opt, sched, range(3))
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, opt, step=3, extra={"run": "test", "best": [1.5, 2]})
    return path, model, opt


# ----------------------------------------------------------------- round trip
def test_round_trip_restores_everything(saved):
    path, model, opt = saved
    other, other_opt, _ = fresh(1)
    meta = load_checkpoint(path, other, other_opt)
    assert meta["step"] == 3
    assert meta["config"] == {"vocab": 11, "dim": 8, "dropout": 0.3}
    assert meta["model_class"] == "TinyLM"
    assert meta["extra"] == {"run": "test", "best": [1.5, 2]}
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[name], value, err_msg=name)
        assert backend.device_of(meta["model_state"][name]) == "cpu"
    (a, ma), (b, mb) = opt.state_dict(), other_opt.state_dict()
    assert ma == mb and a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_file_is_plain_safetensors_with_json_metadata(saved):
    path, model, _ = saved
    tensors = safetensors.numpy.load_file(str(path))
    assert "model.head.weight" in tensors and "optim.state.0.exp_avg" in tensors
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        assert f.read(n).lstrip().startswith(b"{")  # a JSON header, nothing executable


def test_save_without_optimizer_then_asking_for_one(tmp_path):
    model, opt, _ = fresh(0)
    path = tmp_path / "model_only.safetensors"
    save_checkpoint(path, model)
    assert load_checkpoint(path, model)["step"] == 0
    with pytest.raises(ValueError, match="model_only.safetensors holds no optimizer state"):
        load_checkpoint(path, model, opt)


def test_extra_must_be_json(tmp_path):
    model, _, _ = fresh(0)
    with pytest.raises(TypeError, match="save_checkpoint: config and extra must be JSON data.*float32"):
        save_checkpoint(tmp_path / "x.safetensors", model, extra={"loss": np.float32(1.0)})
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_wrong_model_names_file_and_keys(saved):
    path, _, _ = saved

    class Other(Module):
        def __init__(self):
            super().__init__()
            self.head = Linear(8, 12)

    with pytest.raises(RuntimeError) as err:
        load_checkpoint(path, Other())
    msg = str(err.value)
    assert str(path) in msg and "head.weight: checkpoint (11, 8) vs model (12, 8)" in msg
    assert "unexpected keys: emb.weight, norm.bias, norm.weight" in msg


# -------------------------------------------------------------- damaged files
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_file_is_reported_with_its_name(saved, tmp_path):
    path, _, _ = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for n in (0, 5, 8, 100, len(data) // 2, len(data) - 1):
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match=r"cut\.safetensors is (truncated|corrupt)"):
            load_checkpoint(cut)


def test_every_flipped_byte_is_detected(tmp_path):
    tinymoe.manual_seed(0)
    model = Linear(3, 2)
    opt = AdamW(model.parameters())
    for p in model.parameters():
        p.grad = np.ones_like(p.data)
    opt.step()  # so the file holds optimizer moments too
    path = tmp_path / "small.safetensors"
    save_checkpoint(path, model, opt, step=1)
    data = bytearray(path.read_bytes())
    assert "optim.state.0.exp_avg" in safetensors.numpy.load(bytes(data))
    bad = tmp_path / "flipped.safetensors"
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        bad.write_bytes(flipped)
        with pytest.raises(ValueError, match=r"flipped\.safetensors is (truncated|corrupt)|not a tinymoe"):
            load_checkpoint(bad, restore_rng=False)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "foreign.safetensors"
    safetensors.numpy.save_file({"w": np.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="foreign.safetensors is not a tinymoe checkpoint"):
        load_checkpoint(path)


# ------------------------------------------------------------------- atomicity
def test_crash_during_save_keeps_previous_checkpoint(saved, monkeypatch):
    path, model, opt = saved
    before = path.read_bytes()

    def crash_half_way(filename, tensors, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(safetensors_file, "save", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, opt, step=99)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 3


def test_crash_before_rename_keeps_previous_checkpoint(saved, monkeypatch):
    path, model, opt = saved
    before = path.read_bytes()

    def no_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, opt, step=99)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]


# --------------------------------------------------------------------- resume
def test_resume_is_bit_for_bit(tmp_path):
    model, opt, sched = fresh(0)
    straight = train(model, opt, sched, range(10))

    model, opt, sched = fresh(0)
    first = train(model, opt, sched, range(5))
    save_checkpoint(tmp_path / "half.safetensors", model, opt, step=5)
    tinymoe.manual_seed(12345)  # disturb the RNG: the checkpoint must restore it

    model, opt, _ = fresh(1)   # fresh objects with other weights
    meta = load_checkpoint(tmp_path / "half.safetensors", model, opt)
    sched = WarmupCosine(opt, warmup_steps=2, total_steps=12, start_step=meta["step"])
    second = train(model, opt, sched, range(5, 10))
    assert first + second == straight  # exact float equality, not approx


def test_resume_without_rng_state_differs(tmp_path):
    """Control for the test above: dropout masks depend on the RNG state, so not
    restoring it changes the losses (the bit-for-bit test can fail)."""
    model, opt, sched = fresh(0)
    straight = train(model, opt, sched, range(8))
    model, opt, sched = fresh(0)
    train(model, opt, sched, range(4))
    save_checkpoint(tmp_path / "half.safetensors", model, opt, step=4)
    tinymoe.manual_seed(12345)
    model, opt, _ = fresh(1)
    load_checkpoint(tmp_path / "half.safetensors", model, opt, restore_rng=False)
    sched = WarmupCosine(opt, warmup_steps=2, total_steps=12, start_step=4)
    assert train(model, opt, sched, range(4, 8)) != straight[4:]


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cuda_available(), reason="needs an NVIDIA GPU and CuPy")
def test_gpu_model_round_trip(saved):
    path, model, opt = saved
    other, other_opt, _ = fresh(1)
    other.to("cuda")
    meta = load_checkpoint(path, other, other_opt, map_device="cuda")
    assert backend.device_of(meta["model_state"]["head.weight"]) == "cuda"
    assert all(p.device == "cuda" for p in other.parameters())
    np.testing.assert_array_equal(backend.to_numpy(other.head.weight.data), model.head.weight.data)
    state = other_opt.state[id(other.head.weight)]["exp_avg"]
    assert backend.device_of(state) == "cuda"
    save_checkpoint(path.parent / "from_gpu.safetensors", other, other_opt, step=4)
    assert load_checkpoint(path.parent / "from_gpu.safetensors")["step"] == 4
