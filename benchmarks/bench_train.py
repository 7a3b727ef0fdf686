"""Training throughput on the GPU: tinymoe eager and captured (one CUDA graph per step) vs
PyTorch eager and torch.compile, for the default MoE GPT, the Mamba LM and a larger MoE GPT.

    python benchmarks/bench_train.py [--batch 32 --seq 128 --steps 20 --models moe-gpt,mamba,moe-gpt-large
                                      --compile moe-gpt]
    python benchmarks/bench_train.py --precisions [--steps 3]

All in one run, float32, AdamW (clip 1.0), random token batches (throughput does not depend
on the data). The PyTorch twins below have the same architecture and sizes as the tinymoe
models (parameter counts printed side by side): the MoE GPT with the common per-expert loop,
and Mamba with the sequential scan loop (the readable PyTorch recipe). Reports tokens per
second (median of 3 rounds after warm-up), host time per step (the Python call alone, before
the GPU catches up: what bounds a launch-bound step), launches per step (tinymoe: the kernels
the step records in its CUDA graph = the eager step's launches; captured, the host launches
the graph plus a few copies), and peak GPU memory (tinymoe: CuPy's pools; PyTorch: max
reserved by its caching allocator, the same notion).

--precisions: the larger MoE GPT (d_model 512, 8 layers, d_ff 2048, 8 experts, top-2, 16 x
512) in every tinymoe precision (fp32, tf32, bf16, fp16: tinymoe/precision, the trainer's step
object, captured as one CUDA graph) against PyTorch eager float32, TF32 and bfloat16 autocast,
with tinymoe's peak memory next to the estimator's figure
(tinymoe.accounting.memory.gpt_training_step_bytes, by the precision's dtypes on "cuda"): the
peak held by CuPy's pools (the default one and the graph's own: what the GPU gives up) and the
peak in use (bytes of live arrays, tinymoe.profile.memory.track_memory; what the estimate
counts: held minus the pools' cached free blocks). PyTorch's rows: max reserved and max
allocated, the same two notions.
"""
import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import tinymoe  # noqa: E402
from tinymoe.models import build_model  # noqa: E402
from tinymoe.models.mamba import MambaLM  # noqa: E402

cp = tinymoe.backend.cupy()


def tokens_per_second(step, tokens, steps, sync, warmup=3):
    """(median tokens/s of 3 rounds, median host seconds per step call)."""
    for _ in range(warmup):  # compilation, allocator, capture
        step()
    sync()
    rates, host = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            h0 = time.perf_counter()
            step()
            host.append(time.perf_counter() - h0)
        sync()
        rates.append(tokens * steps / (time.perf_counter() - t0))
    return statistics.median(rates), statistics.median(host)


def graph_kernels(graph) -> int | None:
    """Kernel nodes of a captured cupy Graph (the driver's cuGraphGetNodes / cuGraphNodeGetType)."""
    import ctypes
    handle = getattr(graph, "graph", 0)
    if not handle:
        return None
    cuda = ctypes.CDLL("libcuda.so.1")
    n = ctypes.c_size_t(0)
    if cuda.cuGraphGetNodes(ctypes.c_void_p(handle), None, ctypes.byref(n)):
        return None
    nodes = (ctypes.c_void_p * n.value)()
    cuda.cuGraphGetNodes(ctypes.c_void_p(handle), nodes, ctypes.byref(n))
    kind = ctypes.c_int(0)
    kernels = 0
    for node in nodes:
        cuda.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(kind))
        kernels += kind.value == 0                               # CU_GRAPH_NODE_TYPE_KERNEL
    return kernels


def tinymoe_run(build, a, mode):
    """mode "off": the eager step; "on": the captured step (tinymoe.step.make_step)."""
    from tinymoe.optim import AdamW
    from tinymoe.step import make_step
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    tinymoe.manual_seed(0)
    model = build().to("cuda")
    opt = AdamW(model.parameters(), lr=1e-3)
    step_obj = make_step(model, opt, grad_clip=1.0, cuda_graph=mode)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (a.batch, a.seq + 1))
    x, y = ids[:, :-1], ids[:, 1:]                      # host ids: the step copies them in
    tps, host = tokens_per_second(lambda: step_obj(x, y), a.batch * a.seq, a.steps,
                                  cp.cuda.Device().synchronize)
    graph = getattr(step_obj, "graph", None)
    kernels = graph_kernels(graph) if graph is not None else None
    peak = pool.total_bytes() + (step_obj.pool.total_bytes() if graph is not None else 0)
    note = getattr(step_obj, "reason", None)
    return tps, host, kernels, peak, model.num_parameters(), note


# ---------------------------------------------------------------- PyTorch twins
def torch_models():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class MoE(nn.Module):
        """Top-2 softmax router, experts looped over (x[idx] -> MLP -> index_add_)."""
        def __init__(self, d, f, E, k):
            super().__init__()
            self.gate = nn.Linear(d, E, bias=False)
            self.w1 = nn.Parameter(torch.randn(E, d, f) * 0.02)
            self.w2 = nn.Parameter(torch.randn(E, f, d) * 0.02)
            self.k = k

        def forward(self, x):
            shape = x.shape
            x = x.reshape(-1, shape[-1])                                      # (T, d)
            probs = torch.softmax(self.gate(x), -1)                           # (T, E)
            w, e = probs.topk(self.k, -1)
            w = w / w.sum(-1, keepdim=True)
            out = torch.zeros_like(x)
            for i in range(self.w1.shape[0]):
                tok, j = torch.where(e == i)
                h = F.gelu(x[tok] @ self.w1[i]) @ self.w2[i]
                out.index_add_(0, tok, h * w[tok, j, None])
            return out.reshape(shape)

    class Block(nn.Module):
        def __init__(self, d, h, f, E, k):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
            self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
            self.h = h
            self.moe = MoE(d, f, E, k)

        def forward(self, x):
            B, L, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(B, L, d))
            return x + self.moe(self.ln2(x))

    class MoEGPT(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.wte = nn.Embedding(c.vocab_size, c.d_model)
            self.wpe = nn.Embedding(c.block_size, c.d_model)
            self.blocks = nn.ModuleList(Block(c.d_model, c.n_head, c.d_ff, c.num_experts, c.top_k)
                                        for _ in range(c.n_layer))
            self.ln_f = nn.LayerNorm(c.d_model, bias=False)

        def forward(self, ids, targets):
            x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
            for b in self.blocks:
                x = b(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    class MambaBlock(nn.Module):
        def __init__(self, d, N, K, expand):
            super().__init__()
            E, R = expand * d, math.ceil(d / 16)
            self.E, self.R, self.N = E, R, N
            self.in_proj = nn.Linear(d, 2 * E, bias=False)
            self.conv1d = nn.Conv1d(E, E, K, groups=E, padding=K - 1)
            self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
            self.dt_proj = nn.Linear(R, E)
            self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1.0).repeat(E, 1)))
            self.D = nn.Parameter(torch.ones(E))
            self.out_proj = nn.Linear(E, d, bias=False)

        def forward(self, x):
            B, L, _ = x.shape
            xi, z = self.in_proj(x).chunk(2, -1)                              # (B, L, E)
            xc = F.silu(self.conv1d(xi.transpose(1, 2))[..., :L]).transpose(1, 2)
            dt, Bm, Cm = self.x_proj(xc).split([self.R, self.N, self.N], -1)
            dt = F.softplus(self.dt_proj(dt))                                 # (B, L, E)
            A = -torch.exp(self.A_log)                                        # (E, N)
            h = x.new_zeros(B, self.E, self.N)
            ys = []
            for t in range(L):  # the sequential scan
                h = torch.exp(dt[:, t, :, None] * A) * h + \
                    (dt[:, t] * xc[:, t])[:, :, None] * Bm[:, t, None, :]
                ys.append((h * Cm[:, t, None, :]).sum(-1))
            y = (torch.stack(ys, 1) + xc * self.D) * F.silu(z)
            return self.out_proj(y)

    class Mamba(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.embedding = nn.Embedding(c.vocab_size, c.d_model)
            self.layers = nn.ModuleList(MambaBlock(c.d_model, c.d_state, c.d_conv, c.expand)
                                        for _ in range(c.n_layer))
            self.norms = nn.ModuleList(nn.RMSNorm(c.d_model, eps=c.rms_eps) for _ in range(c.n_layer))
            self.norm_f = nn.RMSNorm(c.d_model, eps=c.rms_eps)

        def forward(self, ids, targets):
            h = self.embedding(ids)
            for norm, layer in zip(self.norms, self.layers):
                h = h + layer(norm(h))
            logits = self.norm_f(h) @ self.embedding.weight.T
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    return MoEGPT, Mamba


def torch_run(model, a, compile_mode=None):
    """compile_mode None: eager; "default" / "reduce-overhead": torch.compile's modes."""
    import torch
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (a.batch, a.seq + 1), device="cuda")
    fwd = model if compile_mode is None else torch.compile(model, mode=compile_mode)

    def step():
        opt.zero_grad(set_to_none=True)
        fwd(ids[:, :-1], ids[:, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    tps, host = tokens_per_second(step, a.batch * a.seq, a.steps, torch.cuda.synchronize)
    return tps, host, None, torch.cuda.max_memory_reserved(), sum(p.numel() for p in model.parameters()), None


MODELS = {   # name -> (build the tinymoe model, batch, seq): None keeps --batch / --seq
    "moe-gpt": (lambda a: build_model("moe-gpt", block_size=a.seq), None, None),
    "mamba": (lambda a: MambaLM(), None, None),
    "moe-gpt-large": (lambda a: build_model("moe-gpt", block_size=512, d_model=512, n_layer=8,
                                            n_head=8, d_ff=2048, num_experts=8), 16, 512),
}


BIG_MOE = dict(d_model=512, n_layer=8, n_head=8, d_ff=2048, num_experts=8, top_k=2)


def tinymoe_precision_run(a, precision):
    """The big MoE GPT in one tinymoe precision, stepped as the trainer steps it:
    (tokens/s, peak bytes held by the pools, peak bytes in use, parameters, estimate)."""
    import gc
    from tinymoe.accounting.memory import gpt_training_step_bytes
    from tinymoe.precision import get_precision, set_tf32
    from tinymoe.profile.memory import track_memory
    from tinymoe.step import make_step

    gc.collect()
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    tinymoe.manual_seed(0)
    with track_memory("cuda") as mem:
        model = build_model("moe-gpt", block_size=a.seq, **BIG_MOE).to("cuda")
        opt = tinymoe.optim.AdamW(model.parameters(), lr=1e-4)
        opt, prec = get_precision(precision).apply(model, opt)
        step_fn = make_step(model, opt, grad_clip=1.0, precision=prec)      # captured, as train's
        if getattr(step_fn, "pool", None) is not None:
            mem.watch(step_fn.pool)                                         # the graph's own pool
        ids = cp.random.default_rng(0).integers(0, 256, (a.batch, a.seq + 1))
        x, y = ids[:, :-1], ids[:, 1:]
        tps, _ = tokens_per_second(lambda: step_fn(x, y), a.batch * a.seq, a.steps,
                                   cp.cuda.Device().synchronize)
    if getattr(step_fn, "graph", None) is None:
        print(f"tinymoe {precision}: not captured ({step_fn.reason})")
    estimate = gpt_training_step_bytes(model, a.batch, a.seq, precision, "cuda")["total"]
    set_tf32(False)
    return tps, mem.peak_held, mem.peak, model.num_parameters(), estimate


def torch_precision_run(MoEGPT, config, a, mode):
    import contextlib
    import torch
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if mode == "bf16" else \
        contextlib.nullcontext()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = MoEGPT(config).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (a.batch, a.seq + 1), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
    tps, _ = tokens_per_second(step, a.batch * a.seq, a.steps, torch.cuda.synchronize)
    torch.backends.cuda.matmul.allow_tf32 = False
    del model, opt
    return tps, torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()


def precisions(a):
    dev = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"device {dev}; MoE GPT {BIG_MOE}; batch={a.batch} seq={a.seq} AdamW")
    print(f"\n{'run':30s} {'params':>10s} {'tokens/s':>10s} {'held MiB':>9s} {'in use MiB':>10s} "
          f"{'estimate MiB':>12s} {'est/in use':>10s}", flush=True)
    rows = []

    def show(name, tps, held, in_use, params, est):          # each row as soon as it is measured
        rows.append((name, tps))
        print(f"{name:30s} {params:10d} {tps:10.0f} {held / 2**20:9.1f} {in_use / 2**20:10.1f} "
              f"{est / 2**20:12.1f} {est / in_use:10.2f}", flush=True)
    for p in ("fp32", "tf32", "bf16", "fp16"):
        try:
            show(f"tinymoe {p}", *tinymoe_precision_run(a, p))
        except Exception as e:                                # one failing precision, not all
            print(f"tinymoe {p}: failed ({type(e).__name__}: {e})", flush=True)
    try:
        MoEGPT, _ = torch_models()
        model = build_model("moe-gpt", block_size=a.seq, **BIG_MOE)
        for mode, name in (("fp32", "PyTorch eager fp32"), ("tf32", "PyTorch eager TF32"),
                           ("bf16", "PyTorch eager bf16 autocast")):
            show(name, *torch_precision_run(MoEGPT, model.config, a, mode), model.num_parameters(),
                 float("nan"))
    except ImportError as e:
        print(f"PyTorch: skipped ({e})")
    best = max([t for n, t in rows if n.startswith("PyTorch")] or [float("nan")])
    print("\ntokens/s vs the best PyTorch row: " +
          ", ".join(f"{n} {t / best:.2f}x" for n, t in rows if n.startswith("tinymoe")))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--models", default="moe-gpt,mamba,moe-gpt-large")
    p.add_argument("--compile", default="moe-gpt", help="models with torch.compile rows ('' for none)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--precisions", action="store_true",
                   help="the larger MoE GPT (16 x 512) in every precision, tinymoe and PyTorch")
    args = p.parse_args()
    if args.precisions:
        return precisions(argparse.Namespace(**{**vars(args), "batch": 16, "seq": 512,
                                                 "steps": min(args.steps, 5)}))
    dev = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"device {dev}; float32 AdamW, clip 1.0")
    rows = []
    for name in args.models.split(","):
        build, batch, seq = MODELS[name]
        a = argparse.Namespace(**{**vars(args), "batch": batch or args.batch, "seq": seq or args.seq})
        tag = f"{name} {a.batch}x{a.seq}"
        for mode, label in (("off", "tinymoe eager"), ("on", "tinymoe captured")):
            try:
                rows.append((tag, label, *tinymoe_run(lambda: build(a), a, mode)))
            except Exception as err:  # a failed capture is a result too
                rows.append((tag, label, 0, 0, None, 0, 0, f"{type(err).__name__}: {err}"[:120]))
        if args.no_torch:
            continue
        try:
            MoEGPT, Mamba = torch_models()
        except ImportError as e:
            print(f"PyTorch: skipped ({e})")
            continue
        twin = (lambda: Mamba(build(a).config)) if name == "mamba" else (lambda: MoEGPT(build(a).config))
        modes = [(None, "PyTorch eager")]
        if name in args.compile.split(","):
            modes += [("reduce-overhead", "torch.compile reduce-overhead"), ("default", "torch.compile default")]
        for mode, label in modes:
            try:
                rows.append((tag, label, *torch_run(twin(), a, mode)))
            except Exception as err:
                rows.append((tag, label, 0, 0, None, 0, 0, f"{type(err).__name__}: {err}"[:120]))
    print(f"\n{'model':22s} {'run':30s} {'params':>10s} {'tokens/s':>10s} {'host ms/step':>12s} "
          f"{'kernels/step':>12s} {'peak MiB':>9s}")
    for tag, label, tps, host, kernels, peak, params, note in rows:
        k = "-" if kernels is None else str(kernels)
        print(f"{tag:22s} {label:30s} {params:10d} {tps:10.0f} {host * 1e3:12.3f} {k:>12s} "
              f"{peak / 2**20:9.1f}" + (f"   ({note})" if note else ""))


if __name__ == "__main__":
    main()
