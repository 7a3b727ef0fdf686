"""Mixed precision on the CPU: 16-bit ops against float32, the loss scaler's state machine,
float32 master weights, and bf16 / fp16 training that follows the float32 run.

Tolerances come from each format's epsilon (bfloat16 2^-7, float16 2^-10): a 16-bit op is
given 16-bit inputs and compared with the float32 op on the same (widened, exact) inputs,
so the only differences are the one rounding of the output (eps / 2 relative) and float32's
own summation order."""
import json

import numpy as np
import pytest

import tinymoe
from tinymoe import dtypes
from tinymoe.autograd.tensor import Tensor
from tinymoe.nn import functional as F
from tinymoe.optim import AdamW
from tinymoe.optim.master import MasterWeights
from tinymoe.precision import DynamicLossScaler, get_precision

HALF = [dtypes.float16, dtypes.bfloat16]


def test_formats():
    assert dtypes.eps("bfloat16") == 2.0**-7 and dtypes.eps("float16") == 2.0**-10
    assert dtypes.finfo("bfloat16").max > 3e38 and dtypes.finfo("float16").max == 65504
    assert dtypes.is_floating(dtypes.bfloat16) and dtypes.bfloat16.kind == "V"
    assert dtypes.accumulation_dtype("bf16") == np.float32
    assert dtypes.accumulation_dtype(np.float64) == np.float64
    t = Tensor(np.ones(3, dtypes.bfloat16), requires_grad=True)      # kind "V" is a float
    assert t.requires_grad


def _pair(shape, dtype, seed, scale=1.0):
    """A 16-bit array and its exact float32 widening."""
    x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)
    return x, x.astype(np.float32)


def _close(got, want, dtype, k=2.0):
    """|got - want| <= k eps(dtype) max|want| (one rounding, plus float32 noise)."""
    got = np.asarray(got, np.float32)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=k * dtypes.eps(dtype) * scale)


OPS = {
    "matmul": (lambda a, b: a @ b, [(5, 7), (7, 3)]),
    "linear": (lambda x, w, b: F.linear(x, w, b), [(2, 4, 6), (5, 6), (5,)]),
    "softmax": (lambda x: F.softmax(x, axis=-1), [(4, 9)]),
    "log_softmax": (lambda x: F.log_softmax(x, axis=-1), [(4, 9)]),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, w, b), [(3, 5, 16), (16,), (16,)]),
    "rms_norm": (lambda x, w: F.rms_norm(x, w), [(3, 16), (16,)]),
    "gelu": (lambda x: F.gelu(x), [(4, 33)]),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), [(4, 33)]),
    "silu": (lambda x: F.silu(x), [(4, 33)]),
    "softplus": (lambda x: F.softplus(x), [(4, 33)]),
    "sum": (lambda x: x.sum(axis=-1), [(3, 300)]),
    "mean": (lambda x: x.mean(), [(3, 300)]),
    "var": (lambda x: x.var(axis=0), [(50, 4)]),
    "logsumexp": (lambda x: x.logsumexp(axis=-1), [(4, 9)]),
}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_in_16_bits_matches_float32(name, dtype):
    fn, shapes = OPS[name]
    pairs = [_pair(s, dtype, i) for i, s in enumerate(shapes)]
    lo = [Tensor(a, requires_grad=True) for a, _ in pairs]
    hi = [Tensor(b, requires_grad=True) for _, b in pairs]
    y_lo, y_hi = fn(*lo), fn(*hi)
    assert y_lo.dtype == dtype, f"{name}: a 16-bit op returns its input's format"
    _close(y_lo.numpy(), y_hi.numpy(), dtype, k=4 if name in ("var", "layer_norm") else 2)
    g = np.random.default_rng(9).standard_normal(y_hi.shape).astype(dtype)
    y_lo.backward(g)
    y_hi.backward(g.astype(np.float32))
    for a, b in zip(lo, hi):
        assert a.grad.dtype == dtype, f"{name}: a gradient has its tensor's dtype"
        _close(a.grad, b.grad, dtype, k=8)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cross_entropy_of_16_bit_logits_is_float32(dtype):
    z, z32 = _pair((6, 11), dtype, 0, scale=3.0)
    t = np.array([0, 3, 10, 5, 5, 1])
    lo, hi = Tensor(z, requires_grad=True), Tensor(z32, requires_grad=True)
    loss_lo, loss_hi = F.cross_entropy(lo, t), F.cross_entropy(hi, t)
    assert loss_lo.dtype == np.float32                    # a loss is a float32 reduction
    assert abs(loss_lo.item() - loss_hi.item()) < 1e-6    # same (exact) inputs, float32 math
    loss_lo.backward()
    loss_hi.backward()
    assert lo.grad.dtype == dtype
    _close(lo.grad, hi.grad, dtype)


def test_sum_of_bfloat16_accumulates_in_float32():
    x = np.ones(4096, dtypes.bfloat16)                    # bfloat16 itself stops at 256 + ...
    assert float(Tensor(x).sum().item()) == 4096.0


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_attention_in_16_bits(dtype):
    from tinymoe.nn.attention import CausalAttention

    shapes = [(1, 2, 1, 6, 8), (1, 2, 1, 6, 8), (1, 2, 1, 6, 8)]
    for keep in (True, False):
        pairs = [_pair(s, dtype, i) for i, s in enumerate(shapes)]
        lo = [Tensor(a, requires_grad=True) for a, _ in pairs]
        hi = [Tensor(b, requires_grad=True) for _, b in pairs]
        y_lo = CausalAttention.apply(*lo, keep_probs=keep)
        y_hi = CausalAttention.apply(*hi, keep_probs=keep)
        assert y_lo.dtype == dtype
        _close(y_lo.numpy(), y_hi.numpy(), dtype, k=4)     # P rounded to 16 bits, then P V
        y_lo.sum().backward()
        y_hi.sum().backward()
        for a, b in zip(lo, hi):
            _close(a.grad, b.grad, dtype, k=16)


# ------------------------------------------------------------------ loss scaling
def test_loss_scaler_state_machine():
    s = DynamicLossScaler(init_scale=8.0, growth_interval=3)
    yes, no = np.bool_(True), np.bool_(False)
    s.update(yes)                                          # overflow: halve, restart the count
    assert float(s.scale) == 4.0 and int(s.growth_tracker) == 0
    s.update(no)
    s.update(no)
    assert float(s.scale) == 4.0 and int(s.growth_tracker) == 2
    s.update(no)                                           # the 3rd clean step: double
    assert float(s.scale) == 8.0 and int(s.growth_tracker) == 0
    s.update(no)
    s.update(yes)                                          # an overflow resets the count
    assert float(s.scale) == 4.0 and int(s.growth_tracker) == 0
    state = json.loads(json.dumps(s.state_dict()))         # JSON-able, for the checkpoint
    t = DynamicLossScaler()
    t.load_state_dict(state)
    assert float(t.scale) == 4.0 and t.growth_interval == 3
    assert float(s.inv_scale()) == 0.25
    loss = Tensor(np.float32(2.0), requires_grad=True)
    scaled = s.scale_loss(loss)
    scaled.backward()
    assert scaled.item() == 8.0 and loss.grad == 4.0


def test_loss_scaler_refuses_bad_settings():
    with pytest.raises(ValueError, match="backoff_factor"):
        DynamicLossScaler(backoff_factor=1.5)
    with pytest.raises(ValueError, match="growth_interval"):
        DynamicLossScaler(growth_interval=0)


# ------------------------------------------------------------------ master weights
def _tiny_model(dtype=None):
    tinymoe.manual_seed(0)
    model = tinymoe.nn.Linear(6, 4)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt


def test_master_weights_keep_float32_and_round_into_the_model():
    model, opt = _tiny_model()
    w32 = model.weight.data.copy()
    mw = MasterWeights(opt)
    model.to(dtype="bfloat16")
    masters = [m for _, m in mw.pairs]
    assert all(m.dtype == np.float32 for m in masters)
    np.testing.assert_array_equal(masters[0].data, w32)     # the unrounded float32 weights
    x = Tensor(np.random.default_rng(0).standard_normal((3, 6)).astype(dtypes.bfloat16))
    model(x).float().sum().backward()
    assert model.weight.grad.dtype == dtypes.bfloat16
    got = mw.grads_to_master(np.float32(0.5))
    assert model.weight.grad is None and got[0].grad.dtype == np.float32   # 16-bit grads freed
    mw.step(found_inf=np.bool_(True))                      # skipped: nothing changes
    np.testing.assert_array_equal(masters[0].data, w32)
    mw.step(found_inf=np.bool_(False))
    assert not np.array_equal(masters[0].data, w32)
    np.testing.assert_array_equal(model.weight.data, masters[0].data.astype(dtypes.bfloat16))
    state = opt.state[id(masters[0])]
    assert state["exp_avg"].dtype == np.float32 and state["exp_avg_sq"].dtype == np.float32
    with mw.float32_model():                                # checkpoints see the masters
        assert model.weight.dtype == np.float32
    assert model.weight.dtype == dtypes.bfloat16


def test_master_weights_state_dict_is_the_float32_runs():
    model, opt = _tiny_model()
    x = Tensor(np.ones((2, 6), np.float32))
    model(x).sum().backward()
    opt.step()
    arrays, meta = opt.state_dict()
    model2, opt2 = _tiny_model()
    mw = MasterWeights(opt2)
    mw.load_state_dict(arrays, meta)
    arrays2, meta2 = mw.state_dict()
    assert meta2 == meta and sorted(arrays2) == sorted(arrays)
    for k in arrays:
        np.testing.assert_array_equal(arrays2[k], arrays[k])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_master_weights_flat_path_equals_the_per_parameter_path(dtype):
    """With the fused AdamW (flat float32 masters), MasterWeights converts gradients and rounds
    weights through one 16-bit flat buffer (one kernel each way on a GPU): the same numbers as
    the per-parameter path, bit for bit, over steps with a loss scale, a skipped step and a
    parameter that gets no gradient."""
    runs = {}
    for fused in (False, True):
        tinymoe.manual_seed(0)
        model = tinymoe.nn.Sequential(tinymoe.nn.Linear(6, 5), tinymoe.nn.Linear(5, 4))
        unused = tinymoe.nn.Linear(3, 2)                       # in the optimizer, never in the loss
        params = list(model.parameters()) + list(unused.parameters())
        mw = MasterWeights(AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused))
        model.to(dtype=dtype)
        unused.to(dtype=dtype)
        rng = np.random.default_rng(1)
        for step in range(4):
            x = Tensor(rng.standard_normal((3, 6)).astype(np.float32).astype(dtypes.as_dtype(dtype)))
            mw.zero_grad()
            (model(x).float().sum() * 8.0).backward()
            masters = mw.grads_to_master(np.array(1 / 8.0, np.float32))
            assert all(m.grad is None for m in masters[-2:])          # unused: no gradient
            mw.step(found_inf=np.bool_(step == 2))
        assert (mw.model_flat is not None) == fused                   # the flat path was taken
        runs[fused] = [p.data.copy() for p in params] + [m.data.copy() for _, m in mw.pairs]
    for a, b in zip(runs[False], runs[True]):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a.astype(np.float32), b.astype(np.float32))


def test_precision_names():
    assert get_precision("bf16").master_weights and not get_precision("tf32").master_weights
    assert get_precision("fp16").loss_scaling and not get_precision("bf16").loss_scaling
    with pytest.raises(ValueError, match="fp32, tf32, bf16, fp16"):
        get_precision("fp8")


# ------------------------------------------------------------------ training
def _run(tmp_path, precision, steps=12, name=None, **kw):
    from tinymoe.train import TrainConfig, train

    cfg = TrainConfig(model="moe-gpt", model_config=dict(n_layer=1, d_model=32, n_head=2, d_ff=64,
                                                         num_experts=4),
                      steps=steps, batch_size=4, block_size=32, eval_interval=steps,
                      eval_batches=2, log_interval=2, checkpoint_interval=steps, progress=False,
                      plots=False, sample_tokens=8, max_corpus_bytes=200_000, warmup_steps=2,
                      out_dir=str(tmp_path), name=name or precision, precision=precision, **kw)
    return train(cfg)


def _losses(summary):
    from tinymoe.train import read_log

    return [r["loss"] for r in read_log(summary["run_dir"] + "/log.jsonl") if "loss" in r]


def test_bf16_and_fp16_training_follow_float32(tmp_path):
    """The same seed, batches and init: over 12 steps each logged loss stays within 0.05 nats
    (about 1%) of the float32 run's; bf16's rounding of the weights after every update is the
    larger of the two differences (its eps is 8x float16's)."""
    ref = _losses(_run(tmp_path, "fp32"))
    for precision in ("bf16", "fp16"):
        got = _losses(_run(tmp_path, precision))
        assert len(got) == len(ref)
        assert max(abs(a - b) for a, b in zip(got, ref)) < 0.05, (precision, got, ref)
        assert got[-1] < got[0] - 0.3                      # and it learns


def test_resume_across_precisions(tmp_path):
    """A bf16 run's checkpoint holds float32 master weights: fp16 and fp32 continue from it,
    and the model saved is float32."""
    from tinymoe.checkpoint import load_checkpoint

    _run(tmp_path, "bf16", steps=4, name="run")
    info = load_checkpoint(str(tmp_path / "run" / "ckpt.safetensors"), restore_rng=False)
    assert {v.dtype for v in info["model_state"].values()} == {np.dtype(np.float32)}
    s = _run(tmp_path, "fp16", steps=6, name="run", resume=True)
    assert s["step"] == 6
    extra = load_checkpoint(str(tmp_path / "run" / "ckpt.safetensors"), restore_rng=False)["extra"]
    assert extra["step_state"]["loss_scaler"]["scale"] == 2.0**16   # fp16's scale is saved
    s = _run(tmp_path, "fp32", steps=8, name="run", resume=True)
    assert s["step"] == 8 and np.isfinite(s["val_loss"])


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid:RuntimeWarning")
def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path):
    """A loss scale of 2^40 overflows float16's 65504 in the backward: those steps are
    skipped (nothing updated) and the scale halves each time, until the gradients fit."""
    from tinymoe.precision import loss_scaler
    from tinymoe.train import read_log

    init = loss_scaler.DynamicLossScaler.__init__.__defaults__
    loss_scaler.DynamicLossScaler.__init__.__defaults__ = (2.0**40,) + init[1:]
    try:
        s = _run(tmp_path, "fp16", steps=30, max_bad_steps=30)
    finally:
        loss_scaler.DynamicLossScaler.__init__.__defaults__ = init
    log = [r for r in read_log(s["run_dir"] + "/log.jsonl") if "loss_scale" in r]
    scales = [r["loss_scale"] for r in log]
    assert log[-1]["skipped_steps"] > 0 and scales[-1] < 2.0**40
    assert scales == sorted(scales, reverse=True)
    assert s["val_loss"] < s["first_val_loss"]


def test_train_config_refuses_mixed_precision_with_float64():
    from tinymoe.train_config import TrainConfig, validate_config

    with pytest.raises(ValueError, match="--precision bf16"):
        validate_config(TrainConfig(precision="bf16", dtype="float64"))
    with pytest.raises(ValueError, match="--precision"):
        validate_config(TrainConfig(precision="fp8"))


def test_cli_quick_fp16(tmp_path):
    """`python -m tinymoe train --quick --precision fp16` on the CPU."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "tinymoe", "train", "--quick", "--precision", "fp16",
                          "--no-progress", "--out-dir", str(tmp_path), "--sample-tokens", "8"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    log = [json.loads(line) for line in open(tmp_path / "moe-gpt" / "log.jsonl")]
    assert any("loss_scale" in r for r in log)


def test_measured_state_bytes_are_the_lectures():
    """After a backward, by the arrays' dtypes: fp32 4 + 4 + 8, bf16 2 + 2 + 12 bytes each."""
    from tinymoe.accounting.memory import layout_for, measured_state_bytes
    from tinymoe.models import build_model
    from tinymoe.step import make_step

    ids = np.random.default_rng(0).integers(0, 256, (2, 16))
    for name in ("fp32", "bf16"):
        tinymoe.manual_seed(0)
        model = build_model("gpt", block_size=16, n_layer=1, d_model=16, n_head=2, d_ff=32)
        opt, precision = get_precision(name).apply(model, AdamW(model.parameters(), lr=1e-3))
        make_step(model, opt, grad_clip=1.0, precision=precision)(ids, ids)
        precision.scale(model(ids, ids)[1]).backward()
        n, got, want = model.num_parameters(), measured_state_bytes(model, opt), layout_for(name)
        assert got == {"params": want.params * n, "grads": want.grads * n,
                       "optimizer": want.optimizer * n}, (name, got)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", ["moe-gpt", "mamba", "hybrid"])
def test_generation_from_a_16_bit_model(name, dtype):
    """Cached / recurrent generation runs in 16 bits (Mamba's SSM state kept in float32)
    and the next-token logits of the full forward agree with the float32 model's."""
    from tinymoe.models import build_model

    size = dict(n_layer=2, d_model=32) if name == "mamba" else dict(n_layer=2, d_model=32, n_head=2)
    ids = np.random.default_rng(0).integers(0, 256, (2, 12))
    tinymoe.manual_seed(0)
    model = build_model(name, block_size=32, **size).eval()
    with tinymoe.no_grad():
        want = model(ids)[0].numpy()
        model.to(dtype=dtype)
        got = model(ids)[0]
        out = model.generate(ids[:, :4], 5, temperature=0)
    assert got.dtype == dtype and out.shape == (2, 9)
    np.testing.assert_allclose(got.numpy().astype(np.float32), want,
                               atol=64 * dtypes.eps(dtype) * max(1.0, float(np.abs(want).max())))
