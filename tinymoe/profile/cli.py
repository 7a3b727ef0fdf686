"""`python -m tinymoe profile`: one training step of a model, counted op by op.

    python -m tinymoe profile --model gpt --batch 8 --seq-len 64
    python -m tinymoe profile --model moe-gpt --set num_experts=8 --set top_k=2 --out runs/prof
    python -m tinymoe profile --model gpt --peak-flops 1e12 --bandwidth 5e10   # given roof

Prints FLOPs, bytes, arithmetic intensity and time per op type (forward and backward)
and per module, the measured peak memory beside the estimate (dense GPT), and writes
roofline.png and modules.png to --out.
"""
from __future__ import annotations

import argparse
import math
import os


def _value(text):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def _assignment(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), _value(value.strip())


def add_arguments(p):
    p.add_argument("--model", default="gpt", help="a name of tinymoe.models.MODELS")
    p.add_argument("--set", dest="config", action="append", default=[], type=_assignment,
                   metavar="KEY=VALUE", help="a model config field (repeatable)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--depth", type=int, default=2, help="module names cut to this many parts")
    p.add_argument("--peak-flops", type=float, default=None, help="FLOP/s of the roof (default: measured)")
    p.add_argument("--bandwidth", type=float, default=None, help="bytes/s of the roof (default: measured)")
    p.add_argument("--out", default=os.path.join("runs", "profile"), help="folder for the plots")


def run(args) -> int:
    import numpy as np

    from .. import backend
    from ..accounting.memory import counted_exactly, gpt_training_step_bytes
    from ..models import build_model
    from ..optim import AdamW
    from .memory import track_memory
    from .profiler import profile
    from .roofline import measure_peaks, plot_roofline

    for name, value in (("batch", args.batch), ("seq-len", args.seq_len), ("depth", args.depth)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    for name, value in (("peak-flops", args.peak_flops), ("bandwidth", args.bandwidth)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name} must be a finite number > 0, got {value}")
    config = dict(args.config)
    config.setdefault("block_size", args.seq_len)
    backend.manual_seed(0)
    _check_fits(build_model(args.model, **config), args)
    with track_memory(args.device) as mem:
        model = build_model(args.model, **config).to(args.device)
        opt = AdamW(model.parameters(), lr=1e-3)
        V = model.config.vocab_size
        rng = np.random.default_rng(0)
        xp = backend.module_for(args.device)
        ids = xp.asarray(rng.integers(0, V, (args.batch, args.seq_len)))
        targets = xp.asarray(rng.integers(0, V, (args.batch, args.seq_len)))

        def step():
            opt.zero_grad()
            _, loss = model(ids, targets)
            loss.backward()
            opt.step()

        step()                                       # warm up: optimizer states exist
        mem.reset_peak()
        with profile(model) as prof:
            step()
        peak = mem.peak
    n = model.num_parameters()
    print(f"{args.model}: {n:,} parameters, batch {args.batch} x {args.seq_len} tokens, "
          f"{args.device}; one training step, {prof.wall_seconds * 1e3:.1f} ms wall")
    print("\nper op (forward and backward)")
    print(prof.table(by="op_phase"))
    print(f"\nper module (depth {args.depth})")
    print(prof.table(by="module", depth=args.depth))
    flops_fwd, flops_all = prof.flops("forward"), prof.flops()
    print(f"\nFLOPs: forward {flops_fwd:.3e}, forward+backward {flops_all:.3e} "
          f"(backward / forward = {(flops_all - flops_fwd) / max(flops_fwd, 1):.2f}; 6ND rule: "
          f"{6 * n * args.batch * args.seq_len:.3e})")
    print(f"peak memory of the step (measured): {peak / 1e6:.2f} MB")
    if counted_exactly(model.config):
        est = gpt_training_step_bytes(model, args.batch, args.seq_len, "fp32", args.device)
        print("estimate: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in est.items())
              + f"  (estimate / measured = {est['total'] / peak:.3f})")

    if args.peak_flops is not None and args.bandwidth is not None:
        roof = {"flop_per_s": args.peak_flops, "bytes_per_s": args.bandwidth}
    else:
        roof = measure_peaks(args.device)
        print(f"measured roof: {roof['flop_per_s'] / 1e9:.1f} GFLOP/s (matmul), "
              f"{roof['bytes_per_s'] / 1e9:.1f} GB/s (copy)")
    os.makedirs(args.out, exist_ok=True)
    path = plot_roofline(prof.summary(by="op"), roof["flop_per_s"], roof["bytes_per_s"],
                         os.path.join(args.out, "roofline.png"),
                         title=f"{args.model}, one training step ({args.device})")
    modules = _plot_modules(prof.summary(by="module", depth=args.depth),
                            os.path.join(args.out, "modules.png"))
    print(f"wrote {path} and {modules}")
    return 0


def _check_fits(model, args) -> None:
    """Refuse, before allocating, a step whose estimated memory exceeds what the device has free."""
    from ..accounting.memory import available_bytes, rough_training_step_bytes

    need = rough_training_step_bytes(model, args.batch, args.seq_len, "fp32", args.device)
    have = available_bytes(args.device)
    if need > have:
        raise ValueError(f"one training step of {args.model} at --batch {args.batch} --seq-len {args.seq_len} "
                         f"needs about {need / 1e9:.1f} GB (estimate), more than the {have / 1e9:.1f} GB "
                         f"free on {args.device}; lower --seq-len or --batch")


def _plot_modules(rows, path):
    """Horizontal bars: FLOPs and time per module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["name"])
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(8, 0.3 * len(rows) + 1.2), dpi=100, sharey=True)
    axes[0].barh(names, [r["flops"] for r in rows])
    axes[0].set_xlabel("FLOPs (forward + backward)")
    axes[1].barh(names, [r["seconds"] * 1e3 for r in rows], color="tab:orange")
    axes[1].set_xlabel("time (ms)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
