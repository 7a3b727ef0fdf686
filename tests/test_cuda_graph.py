"""The training step as a CUDA graph (tinymoe/step/cuda_graph.py): on a GPU, 20 captured
steps of the default MoE GPT and Mamba LM equal 20 eager steps (parameters after every step,
losses, router statistics), and a run resumed after captured steps continues as the run
that did not stop; everywhere, make_step says why a step is not captured."""
import numpy as np
import pytest

import tinymoe
from tinymoe import backend
from tinymoe.models import build_model
from tinymoe.optim import AdamW, WarmupCosine
from tinymoe.step import EagerStep, make_step
from tinymoe.step.cuda_graph import CapturedStep, capture_blocker

B, L, STEPS = 4, 32, 20


def setup(name, device="cuda", seed=0, **config):
    tinymoe.manual_seed(seed)
    model = build_model(name, block_size=L, **config).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                lr=3e-3, betas=(0.9, 0.95))
    return model, opt, WarmupCosine(opt, 5, STEPS)


def batches(n, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, (n, B, L + 1))
    return [(i[:, :-1], i[:, 1:]) for i in ids]


def host_params(model):
    return [backend.to_numpy(p.data).copy() for p in model.parameters()]


# ------------------------------------------------------------------------------- CPU
def test_make_step_on_the_cpu_runs_eagerly_and_has_nothing_to_say():
    model, opt, _ = setup("moe-gpt", device="cpu", n_layer=1, d_model=16, n_head=2, d_ff=16)
    step = make_step(model, opt, cuda_graph="auto")
    assert isinstance(step, EagerStep) and step.reason is None
    assert "not on a GPU" in capture_blocker(model, opt)
    with pytest.raises(ValueError, match="cuda_graph='on'.*not on a GPU"):
        make_step(model, opt, cuda_graph="on")
    with pytest.raises(ValueError, match="cuda_graph must be one of"):
        make_step(model, opt, cuda_graph="yes")
    assert isinstance(make_step(model, opt, cuda_graph="off"), EagerStep)


# ------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["moe-gpt", "mamba"])
def test_captured_steps_equal_eager_steps(name):
    data = batches(STEPS)
    runs = {}
    for mode in ("off", "on"):
        model, opt, sched = setup(name)
        step = make_step(model, opt, grad_clip=1.0, cuda_graph=mode)
        assert isinstance(step, CapturedStep if mode == "on" else EagerStep)
        params, losses, stats = [], [], []
        for x, y in data:
            r = step(x, y)
            sched.step()
            losses.append(float(r.loss))
            assert bool(r.finite)
            params.append(host_params(model))
            stats.append(model.stats())
        runs[mode] = params, losses, stats
        if mode == "on":
            assert step.graph is not None and step.reason is None
    (p_e, l_e, s_e), (p_c, l_c, s_c) = runs["off"], runs["on"]
    np.testing.assert_allclose(l_c, l_e, rtol=1e-5)
    worst = 0.0
    for t, (pe, pc) in enumerate(zip(p_e, p_c)):
        for a, b in zip(pe, pc):
            worst = max(worst, float(np.max(np.abs(a - b))))
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=f"step {t + 1}")
    print(f"{name}: largest parameter difference eager vs captured over {STEPS} steps: {worst:.3g}")
    for se, sc in zip(s_e, s_c):
        assert se.keys() == sc.keys()
        for layer in se:
            assert se[layer]["tokens_per_expert"] == sc[layer]["tokens_per_expert"]
            for key in ("dropped_fraction", "padding_fraction", "router_entropy", "loss_load_balance"):
                assert sc[layer][key] == pytest.approx(se[layer][key], rel=1e-5, abs=1e-7), key


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name,config", [("moe-gpt", {}), ("moe-gpt", {"capacity_factor": None}),
                                         ("mamba", {})], ids=["moe-gpt", "moe-gpt-dropless", "mamba"])
def test_captured_16_bit_steps_follow_eager_steps(name, config, precision):
    """Mixed precision inside the graph: 16-bit model, float32 masters (two flat buffers),
    fp16's loss scale; a dropless MoE too (its experts read their row bounds on the device).
    The captured run follows the eager one within 16-bit rounding (an atomic's order can flip
    one rounding, which the next steps carry along)."""
    from tinymoe.precision import get_precision
    data = batches(10)
    runs = {}
    for mode in ("off", "on"):
        model, opt, sched = setup(name, **config)
        opt, prec = get_precision(precision).apply(model, opt)
        step = make_step(model, opt, grad_clip=1.0, cuda_graph=mode, precision=prec)
        losses = []
        for x, y in data:
            r = step(x, y)
            sched.step()
            losses.append(float(r.loss))
        if mode == "on":
            assert step.graph is not None and step.reason is None
        masters = [backend.to_numpy(m.data) for _, m in opt.pairs]
        runs[mode] = losses, masters, step.state_dict()
    (l_e, m_e, s_e), (l_c, m_c, s_c) = runs["off"], runs["on"]
    np.testing.assert_allclose(l_c, l_e, atol=2e-2)
    assert s_c == s_e                                        # the loss scale took the same path
    for a, b in zip(m_e, m_c):
        np.testing.assert_allclose(b, a, atol=2e-3)


@pytest.mark.gpu
def test_resume_after_captured_steps_continues_the_run(tmp_path):
    from tinymoe.checkpoint import load_checkpoint, save_checkpoint
    data = batches(12, seed=2)
    model, opt, sched = setup("moe-gpt")
    step = make_step(model, opt, cuda_graph="on")
    for x, y in data[:6]:
        step(x, y)
        sched.step()
    save_checkpoint(tmp_path / "c.safetensors", model, opt, 6)
    for x, y in data[6:]:
        step(x, y)
        sched.step()
    straight = host_params(model)

    model2, opt2, _ = setup("moe-gpt", seed=5)                          # other init: all must load
    load_checkpoint(tmp_path / "c.safetensors", model2, opt2)
    sched2 = WarmupCosine(opt2, 5, STEPS, start_step=6)
    step2 = make_step(model2, opt2, cuda_graph="on")
    for x, y in data[6:]:
        step2(x, y)
        sched2.step()
    for a, b in zip(straight, host_params(model2)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_dropless_moe_runs_eagerly_and_says_why():
    model, opt, _ = setup("moe-gpt", capacity_factor=None)
    step = make_step(model, opt, cuda_graph="auto")
    assert isinstance(step, EagerStep) and "dropless" in step.reason and "float32" in step.reason
    x, y = batches(1)[0]
    assert bool(step(x, y).finite)


@pytest.mark.gpu
def test_captured_step_checks_token_ids_on_the_host():
    model, opt, _ = setup("mamba")
    step = make_step(model, opt, cuda_graph="on")
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 256\)"):
        step(x, np.full_like(y, 256))


@pytest.mark.gpu
def test_the_trainer_runs_captured_steps(tmp_path):
    from tinymoe.train import TrainConfig, train
    cfg = TrainConfig(model="moe-gpt", device="cuda", steps=30, batch_size=4, block_size=32,
                      eval_interval=15, eval_batches=2, log_interval=5, checkpoint_interval=15,
                      out_dir=str(tmp_path), sample_tokens=8, progress=False, plots=False,
                      model_config={"n_layer": 2, "d_model": 64, "n_head": 4, "d_ff": 64},
                      cuda_graph="on")
    summary = train(cfg)
    assert summary["step"] == 30 and np.isfinite(summary["val_loss"])
    assert summary["val_loss"] < summary["first_val_loss"]


@pytest.mark.gpu
def test_a_loaded_optimizer_is_recorded_anew_and_other_shapes_are_refused():
    model, opt, _ = setup("mamba")
    step = make_step(model, opt, cuda_graph="on")
    data = batches(5)
    for x, y in data[:3]:
        step(x, y)
    graph = step.graph
    assert graph is not None
    x, y = data[3]
    with pytest.raises(ValueError, match="differ from the captured"):
        step(x[:2], y[:2])
    arrays, meta = opt.state_dict()
    opt.load_state_dict(arrays, meta)                 # new flat buffers: the old graph is stale
    before = host_params(model)
    r = step(x, y)
    assert bool(r.finite) and step.graph is not None and step.graph is not graph
    assert any(not np.array_equal(a, b) for a, b in zip(before, host_params(model)))  # it trained
