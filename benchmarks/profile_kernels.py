"""Where a tinymoe step's GPU time goes, kernel by kernel (GPU only).

    python benchmarks/profile_kernels.py [--what train,moe] [--precision bf16] [--top 25]

Records the kernels of a few steps with PyTorch's profiler, which reads CUDA's activity
trace (CUPTI) for the whole process: CuPy's, Numba's, cuBLAS's and tinymoe's own kernels
are all in it, though PyTorch launches none of them. Prints, per kernel name, the GPU time
per step and its share, the launches per step, and the sum against the step's wall time
(what is left is the GPU waiting for the host). Two subjects:

  train   the larger MoE GPT's training step (bench_train.py --precisions' model: d_model
          512, 8 layers, d_ff 2048, 8 experts, top-2, batch 16 x 512), as the trainer
          steps it (make_step, the precision's policy)
  moe     the MoE layer forward + backward of bench_moe.py (16384 tokens, d 512, f 2048,
          8 experts, top-2, dropless)
"""
import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tinymoe  # noqa: E402
from tinymoe.models import build_model  # noqa: E402

cp = tinymoe.backend.cupy()
BIG_MOE = dict(d_model=512, n_layer=8, n_head=8, d_ff=2048, num_experts=8, top_k=2)


def train_step(a):
    from tinymoe.precision import get_precision
    from tinymoe.profile.memory import print_memory_breakdown, track_memory
    from tinymoe.step import make_step
    tinymoe.manual_seed(0)
    mem = track_memory("cuda").__enter__()            # measured from here to the last step
    model = build_model("moe-gpt", block_size=512, **BIG_MOE).to("cuda")
    opt = tinymoe.optim.AdamW(model.parameters(), lr=1e-4)
    opt, prec = get_precision(a.precision).apply(model, opt)
    step = make_step(model, opt, grad_clip=1.0, cuda_graph=a.cuda_graph, precision=prec)
    if getattr(step, "pool", None) is not None:
        mem.watch(step.pool)                          # the captured graph's own pool
    print(f"train step: {type(step).__name__}, reason: {step.reason}")
    ids = cp.random.default_rng(0).integers(0, 256, (16, 513))
    x, y = ids[:, :-1], ids[:, 1:]

    def memory():
        mem.__exit__(None, None, None)
        print_memory_breakdown(model, 16, 512, a.precision, "cuda", mem)
    run = lambda: step(x, y)  # noqa: E731
    run.memory = memory
    return run, 16 * 512


def moe_step(a):
    from tinymoe.nn.moe import MoELayer
    from tinymoe.precision import get_precision
    tinymoe.manual_seed(0)
    policy = get_precision(a.precision)
    layer = MoELayer(512, 2048, 8, 2, capacity_factor=None, dispatch_impl="cupy",
                     aux_loss_weight=0.0, z_loss_weight=0.0).to("cuda", dtype=policy.dtype)
    from tinymoe.precision import set_tf32
    set_tf32(policy.tf32)
    x = tinymoe.randn(16384, 512, device="cuda").astype(policy.dtype).requires_grad_()
    g = cp.random.default_rng(1).standard_normal((16384, 512), dtype=cp.float32).astype(x.dtype)

    def step():
        layer.zero_grad()
        x.grad = None
        layer(x).backward(g)
    return step, 16384


def profile(name, step, tokens, a):
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile
    for _ in range(4):                      # compile, allocate, capture
        step()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    cp.cuda.Device().synchronize()
    wall = (time.perf_counter() - t0) / a.steps
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            step()
        cp.cuda.Device().synchronize()
        torch.cuda.synchronize()
    per_kernel = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type.name == "CUDA":
            per_kernel[e.name][0] += e.device_time_total / a.steps
            per_kernel[e.name][1] += 1 / a.steps
    busy = sum(t for t, _ in per_kernel.values())
    print(f"\n== {name} ({a.precision}): wall {wall * 1e3:.2f} ms/step ({tokens / wall:,.0f} tokens/s), "
          f"GPU busy {busy / 1e3:.2f} ms/step, {sum(n for _, n in per_kernel.values()):.0f} kernels/step")
    if hasattr(step, "memory"):
        step.memory()
    print(f"{'us/step':>9s} {'share':>6s} {'n/step':>7s}  kernel")
    for k, (t, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:a.top]:
        print(f"{t:9.1f} {t / busy:6.1%} {n:7.1f}  {k[:110]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--what", default="train,moe")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--cuda-graph", default="auto")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    for what in a.what.split(","):
        step, tokens = {"train": train_step, "moe": moe_step}[what](a)
        profile(what, step, tokens, a)
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
