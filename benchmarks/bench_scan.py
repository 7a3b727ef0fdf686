"""Selective scan on the GPU: tinymoe's two fused kernels against the baselines.

    python benchmarks/bench_scan.py [--batch 8 --d-inner 1536 --L 2048 --N 16] [--sweep]
    python benchmarks/bench_scan.py --sweep --out docs/img    # refreshes docs/img/scan_bench_h200.png

All in one run, float32 (and bfloat16 inputs), Mamba's options (D, delta_bias, delta_softplus; no z):
- tinymoe `cupy` (CUDA C RawKernel) and `numba_cuda`, forward and forward+backward, as
  training runs them: the forward keeps each tile's starting state, the backward starts
  from them (the backward alone, recomputing them, is timed too), and the same with z
  (Mamba's gate, out = y silu(z): the block's real call; the backward recomputes y);
- both kernels with bfloat16 u, delta, B, C, dout (float32 A, D, delta_bias and state), with
  the error of their output against the float32 reference on the float32 inputs;
- tinymoe `reference` on CuPy (a Python loop over L, one set of CuPy ops per step);
- PyTorch: the same sequential loop in eager mode (autograd for the backward);
- JAX: `lax.associative_scan` over (a_t, b_t) pairs, jitted (jax.vjp for the backward).
The floor is the HBM traffic (each input read once, each output written once) over the
device-to-device copy bandwidth measured here; the table gives each time's fraction of it.
Timing: CUDA events around back-to-back calls after a warm-up; median of repeats.
A bar chart of the table goes to runs/bench_scan/scan_bench_<gpu>.png (<gpu>: h200, h100, ...;
or under --out).
"""
import argparse
import os
import re
import statistics
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with CuPy
os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")  # no host sync per launch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import tinymoe  # noqa: E402
from tinymoe.kernels.selective_scan import cupy_raw, numba_cuda, reference  # noqa: E402

cp = tinymoe.backend.cupy()
nan = float("nan")
# --sweep: launch shapes (items per lane, warps per block, states per chunk, min blocks/SM)
FWD_SWEEP = [(8, 8, 16, 4), (4, 16, 16, 2), (8, 16, 8, 2)]
BWD_SWEEP = [(8, 16, 16, 1), (8, 8, 8, 2), (8, 8, 16, 1), (4, 16, 16, 2)]
NUMBA_FWD_SWEEP = [(8, 8, 16, 4), (4, 16, 16, 2)]
NUMBA_BWD_SWEEP = [(8, 8, 2, 2), (4, 16, 4, 2), (8, 4, 8, 4)]


def gpu_ms(fn, reps=20, rounds=5, warmup=2):
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
    """Device-to-device copy, bytes read + written per second."""
    x = cp.empty(256 * 2**20, cp.float32)  # 1 GiB
    y = cp.empty_like(x)
    ms = gpu_ms(lambda: cp.copyto(y, x), reps=10)
    return 2 * x.nbytes / (ms * 1e-3)


def make(batch, d_inner, L, N, seed=0):
    rng = cp.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s, dtype=cp.float32)  # noqa: E731
    u, delta = f(batch, d_inner, L), f(batch, d_inner, L) * 0.5 - 1.0
    A = -cp.exp(f(d_inner, N) * 0.5)
    B, C = f(batch, N, L), f(batch, N, L)
    D, bias = f(d_inner), cp.abs(f(d_inner)) * 0.1
    dout = f(batch, d_inner, L)
    return dout, u, delta, A, B, C, D, bias


def torch_loop(args):
    """PyTorch eager, the sequential recurrence (the common readable recipe)."""
    import torch
    dout, u, delta, A, B, C, D, bias = (torch.as_tensor(x, device="cuda") for x in args)
    leaves = [x.requires_grad_() for x in (u, delta, A, B, C, D, bias)]

    def fwd():
        dt = torch.nn.functional.softplus(delta + bias[:, None])            # (b, d, L)
        h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], device="cuda")  # (b, d, N)
        ys = []
        for t in range(u.shape[2]):
            h = torch.exp(dt[:, :, t, None] * A) * h + \
                (dt[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
            ys.append((h * C[:, None, :, t]).sum(-1))
        return torch.stack(ys, -1) + D[:, None] * u

    def fwd_bwd():
        y = fwd()
        torch.autograd.grad((y * dout).sum(), leaves)

    with torch.no_grad():
        f_ms = gpu_ms(fwd, reps=1, rounds=3, warmup=1)
    fb_ms = gpu_ms(fwd_bwd, reps=1, rounds=3, warmup=1)
    del leaves
    torch.cuda.empty_cache()
    return f_ms, fb_ms


def jax_assoc(args):
    """JAX lax.associative_scan over (a_t, b_t), composing h -> a h + b; jitted."""
    import jax
    import jax.numpy as jnp
    dout, u, delta, A, B, C, D, bias = (jnp.asarray(cp.asnumpy(x)) for x in args)

    def scan(u, delta, A, B, C, D, bias):
        dt = jax.nn.softplus(delta + bias[:, None])                           # (b, d, L)
        a = jnp.exp(dt[..., None] * A[None, :, None, :])                       # (b, d, L, N)
        b = (dt * u)[..., None] * jnp.swapaxes(B, 1, 2)[:, None]               # (b, d, L, N)
        comb = lambda x, y: (x[0] * y[0], y[0] * x[1] + y[1])                 # noqa: E731
        _, h = jax.lax.associative_scan(comb, (a, b), axis=2)
        return jnp.einsum("bdln,bnl->bdl", h, C) + D[:, None] * u

    f = jax.jit(scan)
    g = jax.jit(lambda *xs: jax.vjp(scan, *xs)[1](dout))
    xs = (u, delta, A, B, C, D, bias)

    def timed(fn):
        import time
        fn(*xs)
        jax.block_until_ready(fn(*xs))
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*xs))
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    f_ms = timed(f)
    fb_ms = timed(lambda *a: (f(*a), g(*a)))
    return f_ms, fb_ms


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--d-inner", type=int, default=1536)
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--N", type=int, default=16)
    p.add_argument("--sweep", action="store_true", help="also time other launch shapes")
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--out", default="runs/bench_scan",
                   help="folder for scan_bench_<gpu>.png (created; default %(default)s)")
    a = p.parse_args()
    args = make(a.batch, a.d_inner, a.L, a.N)
    dout, u, delta, A, B, C, D, bias = args
    kw = dict(D=D, delta_bias=bias, delta_softplus=True)
    dev = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    bw = copy_bandwidth()
    big, small = u.nbytes, B.nbytes
    floor_f = (2 * big + 2 * small + big) / bw * 1e3           # u, delta, B, C in; y out
    floor_b = (3 * big + 2 * small + 2 * big + 2 * small) / bw * 1e3  # + dout in; du, ddelta, dB, dC out
    print(f"device {dev}; copy bandwidth {bw / 1e12:.2f} TB/s; sizes batch={a.batch} "
          f"d_inner={a.d_inner} L={a.L} N={a.N} float32")
    print(f"HBM floor: forward {floor_f:.3f} ms, backward {floor_b:.3f} ms")

    rows = []
    z = cp.random.default_rng(1).standard_normal(u.shape, dtype=cp.float32)  # (batch, d_inner, L)
    ref_out = reference.selective_scan_fwd(u, delta, A, B, C, D, None, bias, True)
    for name, mod in (("cupy", cupy_raw), ("numba_cuda", numba_cuda)):
        out, states = mod.selective_scan_fwd(u, delta, A, B, C, **kw, return_states=True)
        err = float(cp.linalg.norm(out - ref_out) / cp.linalg.norm(ref_out))
        f_ms = gpu_ms(lambda: mod.selective_scan_fwd(u, delta, A, B, C, **kw, return_states=True))
        b_ms = gpu_ms(lambda: mod.selective_scan_bwd(dout, u, delta, A, B, C, **kw, states=states))
        alone_ms = gpu_ms(lambda: mod.selective_scan_bwd(dout, u, delta, A, B, C, **kw))
        rows.append((f"tinymoe {name}", f_ms, f_ms + b_ms, b_ms, err))
        rows.append((f"  {name} bwd recomputing the states", nan, nan, alone_ms, nan))
        kz = dict(kw, z=z)
        _, states_z = mod.selective_scan_fwd(u, delta, A, B, C, **kz, return_states=True)
        fz_ms = gpu_ms(lambda: mod.selective_scan_fwd(u, delta, A, B, C, **kz, return_states=True))
        bz_ms = gpu_ms(lambda: mod.selective_scan_bwd(dout, u, delta, A, B, C, **kz, states=states_z))
        rows.append((f"  {name} with z", fz_ms, fz_ms + bz_ms, bz_ms, nan))
    # bfloat16 inputs (mamba_ssm's recipe: u, delta, B, C, z in 16 bits, A, D, delta_bias and
    # the state in float32): half the bytes in and out; error of the bf16 output vs the float32
    # reference on the float32 inputs (the rounding of the inputs included)
    from tinymoe.dtypes import bfloat16
    h = [x.astype(bfloat16) for x in (dout, u, delta, B, C)]
    for name, mod in (("cupy", cupy_raw), ("numba_cuda", numba_cuda)):
        hd, hu, hdelta, hB, hC = h
        out, states = mod.selective_scan_fwd(hu, hdelta, A, hB, hC, **kw, return_states=True)
        err = float(cp.linalg.norm(out.astype(cp.float32) - ref_out) / cp.linalg.norm(ref_out))
        f_ms = gpu_ms(lambda: mod.selective_scan_fwd(hu, hdelta, A, hB, hC, **kw, return_states=True))
        b_ms = gpu_ms(lambda: mod.selective_scan_bwd(hd, hu, hdelta, A, hB, hC, **kw, states=states))
        rows.append((f"tinymoe {name} bf16 inputs", f_ms, f_ms + b_ms, b_ms, err))
    if a.sweep:  # other launch shapes of the CUDA C kernels (nchunk shrinks to fit 48 KB)
        for items, warps, nchunk, mb in FWD_SWEEP:
            cfg = dict(items=items, warps=warps, nchunk=nchunk, min_blocks=mb)
            f_ms = gpu_ms(lambda: cupy_raw.selective_scan_fwd(u, delta, A, B, C, config=cfg, **kw))
            rows.append((f"  cupy fwd {items}/{warps}/{nchunk}/{mb}", f_ms, nan, nan, nan))
        for items, warps, nchunk, mb in BWD_SWEEP:
            cfg = dict(items=items, warps=warps, nchunk=nchunk, min_blocks=mb)
            _, st = cupy_raw.selective_scan_fwd(u, delta, A, B, C, config=dict(items=items), **kw,
                                     return_states=True)
            b_ms = gpu_ms(lambda: cupy_raw.selective_scan_bwd(dout, u, delta, A, B, C, config=cfg, **kw,
                                                            states=st))
            rows.append((f"  cupy bwd {items}/{warps}/{nchunk}/{mb}", nan, nan, b_ms, nan))
        for items, warps, nchunk, mb in NUMBA_FWD_SWEEP:
            cfg = dict(items=items, warps=warps, nchunk=nchunk, min_blocks=mb)
            f_ms = gpu_ms(lambda: numba_cuda.selective_scan_fwd(u, delta, A, B, C, config=cfg, **kw))
            rows.append((f"  numba fwd {items}/{warps}/{nchunk}/{mb}", f_ms, nan, nan, nan))
        for items, warps, nchunk, mb in NUMBA_BWD_SWEEP:
            cfg = dict(items=items, warps=warps, nchunk=nchunk, min_blocks=mb)
            _, st = numba_cuda.selective_scan_fwd(u, delta, A, B, C, config=dict(items=items), **kw,
                                     return_states=True)
            b_ms = gpu_ms(lambda: numba_cuda.selective_scan_bwd(dout, u, delta, A, B, C, config=cfg, **kw,
                                                            states=st))
            rows.append((f"  numba bwd {items}/{warps}/{nchunk}/{mb}", nan, nan, b_ms, nan))
    if not a.skip_baselines:
        f_ms = gpu_ms(lambda: reference.selective_scan_fwd(u, delta, A, B, C, D, None, bias, True),
                      reps=1, rounds=3, warmup=1)
        rows.append(("tinymoe reference (CuPy loop)", f_ms, float("nan"), float("nan"), 0.0))
        for name, fn in (("PyTorch eager loop", torch_loop), ("JAX associative_scan", jax_assoc)):
            try:
                f_ms, fb_ms = fn(args)
                rows.append((name, f_ms, fb_ms, fb_ms - f_ms, float("nan")))
            except Exception as e:  # a missing framework is reported, not fatal
                print(f"{name}: skipped ({type(e).__name__}: {e})")
    best_f = rows[0][1]
    print(f"\n{'implementation':34s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'bwd/fwd':>8s} "
          f"{'fwd floor%':>10s} {'vs cupy fwd':>11s} {'rel err':>9s}")
    for name, f, fb, b, err in rows:
        print(f"{name:34s} {f:9.3f} {fb:11.3f} {b / f:8.2f} {100 * floor_f / f:9.1f}% "
              f"{f / best_f:10.1f}x {err:9.1e}  bwd {b:.3f} ms")
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"scan_bench_{gpu_tag(dev)}.png")
    plot(rows, floor_f, floor_b, dev, path)
    print(f"wrote {path}")


def gpu_tag(name):
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100'; else the name in lower case."""
    model = re.search(r"\b[A-Z]\d{2,4}\b", name)
    return model.group(0).lower() if model else re.sub(r"\W+", "_", name.lower()).strip("_")


def plot(rows, floor_f, floor_b, dev, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if not r[0].startswith("  ")]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r[1] for r in rows], 0.4, label="forward")
    ax.barh(y + 0.2, [r[2] for r in rows], 0.4, label="forward + backward")
    ax.axvline(floor_f, color="k", ls="--", lw=1, label=f"HBM floor, forward ({floor_f:.2f} ms)")
    ax.axvline(floor_f + floor_b, color="gray", ls=":", lw=1, label="HBM floor, fwd + bwd")
    ax.set_yticks(y, [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms (log scale)")
    ax.set_title(f"selective scan, float32, {dev}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
