"""MoE layer on the GPU: tinymoe (dispatch kernels + grouped matmul) vs PyTorch's per-expert loop.

    python benchmarks/bench_moe.py [--tokens 16384 --d 512 --f 2048 --experts 8 --top-k 2]

All in one run, float32, dropless top-k routing, forward + backward of the whole layer:
- tinymoe MoELayer with dispatch impl "cupy", "numba_cuda" and "reference"; and with "cupy"
  and the experts' matmuls forced to one batched matmul over padded groups (at these sizes
  GroupedLinear picks the loop over experts, see tinymoe/nn/moe/experts.py);
- PyTorch eager, the common recipe: a loop over experts, x[idx] -> MLP -> index_add_;
- dispatch + combine alone (plan, permute, combine and both backward passes) per impl,
  as a share of the layer's time, and permute's bandwidth as a fraction of the
  device-to-device copy bandwidth measured here;
- precision rows: tinymoe (dispatch "cupy") with TF32 float32 matmuls and in bfloat16
  (weights, activations, gradients; router in float32), and PyTorch's loop with TF32 and
  under bfloat16 autocast (docs/precision.md);
- bfloat16 dropless with the static plan (T*k rows, the experts' row bounds read on the
  device by the grouped kernels, kernels/grouped_gemm.py), eager and as one CUDA graph; its
  dispatch + combine share measured the same way (eager, and captured);
- the layer as a captured training step runs it (float32 and bfloat16): capacity factor
  1.25 with the static plan (every expert C rows, padding included), eager and recorded as
  one CUDA graph (docs/cuda_graphs.md). Not the dropless rows' work: tokens over capacity
  are dropped and the padding rows are computed.
Timing: CUDA events around back-to-back calls after a warm-up; median of rounds.
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")  # no host sync per launch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tinymoe  # noqa: E402
from tinymoe.kernels import dispatch  # noqa: E402
from tinymoe.nn.moe import experts  # noqa: E402
from tinymoe.nn.moe.layer import MoELayer  # noqa: E402
from tinymoe.dtypes import bfloat16  # noqa: E402
from tinymoe.precision import set_tf32  # noqa: E402

cp = tinymoe.backend.cupy()


def gpu_ms(fn, reps=10, rounds=5, warmup=2):
    """Median over rounds of (event time of `reps` back-to-back calls) / reps, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / reps)
    return statistics.median(times)


def copy_bandwidth():
    x = cp.empty(256 * 2**20, cp.float32)
    y = cp.empty_like(x)
    return 2 * x.nbytes / (gpu_ms(lambda: cp.copyto(y, x)) * 1e-3)


def tinymoe_layer(a, impl, dtype=None, capacity_factor=None, static=False):
    tinymoe.manual_seed(0)
    layer = MoELayer(a.d, a.f, a.experts, a.top_k, capacity_factor=capacity_factor, dispatch_impl=impl,
                     aux_loss_weight=0.0, z_loss_weight=0.0, static_dispatch=static)
    layer.to("cuda", dtype=dtype)
    x = tinymoe.randn(a.tokens, a.d, device="cuda").astype(dtype or "float32").requires_grad_()
    g = cp.random.default_rng(1).standard_normal((a.tokens, a.d), dtype=cp.float32).astype(x.dtype)

    def step():
        layer.zero_grad()
        x.grad = None
        out = layer(x)
        out.backward(g)
    return step


def captured(step):
    """`step` recorded once as a CUDA graph (as tinymoe/step/cuda_graph.py records a training
    step: its own stream and memory pool, two eager warm-up calls); returns the replay."""
    from tinymoe.kernels import blas
    blas.prepare()                                       # cuBLAS handle + workspace: not in capture
    stream, pool = cp.cuda.Stream(non_blocking=True), cp.cuda.MemoryPool()
    with cp.cuda.using_allocator(pool.malloc), stream:
        step()
        step()
        stream.synchronize()
        stream.begin_capture()
        tinymoe.backend.set_capturing(True)
        try:
            step()
        finally:
            tinymoe.backend.set_capturing(False)
            graph = stream.end_capture()
    return lambda: graph.launch(stream=cp.cuda.get_current_stream())


def torch_layer(a, mode="fp32"):
    import contextlib
    import torch
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if mode == "bf16" else \
        contextlib.nullcontext()
    torch.manual_seed(0)
    gate = torch.nn.Linear(a.d, a.experts, bias=False, device="cuda")
    w1 = torch.nn.Parameter(torch.randn(a.experts, a.f, a.d, device="cuda") / a.d ** 0.5)
    w2 = torch.nn.Parameter(torch.randn(a.experts, a.d, a.f, device="cuda") / a.f ** 0.5)
    x = torch.randn(a.tokens, a.d, device="cuda", requires_grad=True)
    g = torch.randn(a.tokens, a.d, device="cuda")

    def step():
        with autocast:
            probs = torch.softmax(gate(x), dim=-1)                   # (T, E)
            weights, experts = probs.topk(a.top_k, dim=-1)            # (T, k)
            weights = weights / weights.sum(-1, keepdim=True)
            out = torch.zeros_like(x)
            for e in range(a.experts):
                tok, j = torch.where(experts == e)
                h = torch.nn.functional.gelu(x[tok] @ w1[e].T) @ w2[e].T
                out.index_add_(0, tok, (h * weights[tok, j, None]).to(out.dtype))
        out.backward(g)
    return step


def dispatch_only(a, impl, bw, dtype="float32", static=False, graph=False):
    """plan + permute + combine + their backward passes, on the layer's shapes; with static,
    the dropless static plan (T*k rows, bounds on the device); with graph, as a CUDA graph."""
    rng = cp.random.default_rng(2)
    logits = rng.standard_normal((a.tokens, a.experts), dtype=cp.float32)
    ei = cp.argsort(-logits, axis=1)[:, :a.top_k]
    x = rng.standard_normal((a.tokens, a.d), dtype=cp.float32).astype(dtype)
    w = rng.random((a.tokens, a.top_k), dtype=cp.float32)

    def make_plan():
        if static:
            return dispatch.make_static_plan(ei, a.experts, None, impl=impl)
        return dispatch.make_dispatch_plan(ei, a.experts, impl=impl)

    def run():
        plan = make_plan()
        xs = dispatch.permute(x, plan, impl=impl)
        out = dispatch.combine(xs, w, plan, impl=impl)
        dys, dw = dispatch.combine_backward(out, xs, w, plan, impl=impl)
        dispatch.permute_backward(dys, plan, a.tokens, impl=impl)

    plan = make_plan()
    perm_ms = gpu_ms(lambda: dispatch.permute(x, plan, impl=impl), reps=20)
    plan_ms = gpu_ms(captured(make_plan) if graph else make_plan)
    perm_bw = 2 * plan.num_rows * a.d * x.itemsize / (perm_ms * 1e-3)
    return gpu_ms(captured(run) if graph else run), plan_ms, perm_ms, perm_bw / bw


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--f", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--bf16-only", action="store_true",
                   help="only the bfloat16 rows (and PyTorch's fp32 loop, the ratios' base)")
    a = p.parse_args()
    dev = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    bw = copy_bandwidth()
    flops = 3 * 2 * 2 * a.tokens * a.top_k * a.d * a.f  # fwd + bwd (3x) of two matmuls
    print(f"device {dev}; copy bandwidth {bw / 1e12:.2f} TB/s; tokens={a.tokens} d={a.d} "
          f"f={a.f} experts={a.experts} top-{a.top_k} float32, dropless")
    rows = []
    for impl in () if a.bf16_only else ("cupy", "numba_cuda", "reference"):
        layer_ms = gpu_ms(tinymoe_layer(a, impl), reps=3)
        dc_ms, plan_ms, perm_ms, perm_frac = dispatch_only(a, impl, bw)
        rows.append((f"tinymoe MoELayer, dispatch={impl}", layer_ms, dc_ms, plan_ms, perm_ms, perm_frac))
    limits = experts.BATCHED_MAX_PADDING, experts.BATCHED_MAX_MACS
    if not a.bf16_only:
        experts.BATCHED_MAX_PADDING, experts.BATCHED_MAX_MACS = float("inf"), float("inf")
        rows.insert(1, ("tinymoe MoELayer, cupy, batched experts", gpu_ms(tinymoe_layer(a, "cupy"), reps=3),
                        *[float("nan")] * 4))
        experts.BATCHED_MAX_PADDING, experts.BATCHED_MAX_MACS = limits
        set_tf32(True)
        rows.append(("tinymoe MoELayer, cupy, TF32", gpu_ms(tinymoe_layer(a, "cupy"), reps=3),
                     *[float("nan")] * 4))
        set_tf32(False)
    bf16_ms = gpu_ms(tinymoe_layer(a, "cupy", bfloat16), reps=3)
    rows.append(("tinymoe MoELayer, cupy, bf16", bf16_ms, *dispatch_only(a, "cupy", bw, bfloat16)))
    experts.BATCHED_MAX_PADDING, experts.BATCHED_MAX_MACS = float("inf"), float("inf")
    rows.append(("tinymoe MoELayer, cupy, bf16, batched", gpu_ms(tinymoe_layer(a, "cupy", bfloat16), reps=3),
                 *[float("nan")] * 4))
    experts.BATCHED_MAX_PADDING, experts.BATCHED_MAX_MACS = limits
    # dropless with the static plan: T*k rows, the experts' bounds read on the device by the
    # grouped kernels (kernels/grouped_gemm.py), so the whole layer can be one CUDA graph
    device_bounds = tinymoe_layer(a, "cupy", bfloat16, static=True)
    rows.append(("tinymoe bf16 dropless, device bounds", gpu_ms(device_bounds, reps=3),
                 *dispatch_only(a, "cupy", bw, bfloat16, static=True)))
    rows.append(("tinymoe bf16 dropless, CUDA graph", gpu_ms(captured(device_bounds), reps=3),
                 *dispatch_only(a, "cupy", bw, bfloat16, static=True, graph=True)))
    # what a captured training step runs: capacity 1.25, every expert C rows (static plan)
    for name, dtype in (("bf16", bfloat16),) if a.bf16_only else (("fp32", None), ("bf16", bfloat16)):
        static = tinymoe_layer(a, "cupy", dtype, capacity_factor=1.25, static=True)
        rows.append((f"tinymoe {name}, capacity 1.25, eager", gpu_ms(static, reps=3), *[float("nan")] * 4))
        rows.append((f"tinymoe {name}, capacity 1.25, CUDA graph", gpu_ms(captured(static), reps=3),
                     *[float("nan")] * 4))
    base = float("nan")
    for mode, name in (("fp32", "PyTorch eager per-expert loop"), ("tf32", "  PyTorch loop, TF32"),
                       ("bf16", "  PyTorch loop, bf16 autocast")):
        if a.bf16_only and mode == "tf32":
            continue
        try:
            rows.append((name, gpu_ms(torch_layer(a, mode), reps=3), *[float("nan")] * 4))
            base = rows[-1][1] if mode == "fp32" else base
        except Exception as e:
            print(f"PyTorch {mode}: skipped ({type(e).__name__}: {e})")
    print(f"\n{'implementation':40s} {'fwd+bwd ms':>10s} {'TFLOP/s':>8s} {'vs torch':>8s} "
          f"{'disp+comb ms':>12s} {'share':>6s} {'plan ms':>8s} {'permute ms':>10s} {'perm BW':>8s}")
    for name, ms, dc, plan, perm, frac in rows:
        print(f"{name:40s} {ms:10.3f} {flops / ms / 1e9:8.1f} {base / ms:7.2f}x {dc:12.3f} "
              f"{100 * dc / ms:5.1f}% {plan:8.3f} {perm:10.3f} {100 * frac:7.1f}%")


if __name__ == "__main__":
    main()
