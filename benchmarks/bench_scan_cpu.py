"""Selective scan on the CPU: tinymoe's Numba kernel vs the NumPy reference vs PyTorch.

PyTorch's baseline is Mamba's own `selective_scan_ref` (mamba_ssm/ops/selective_scan_interface.py):
exp(delta A) and delta B u materialized for all (B, D, L, N), then a Python loop over L;
its backward is autograd through that loop. One change: the per-step slices come from
`unbind(2)` instead of `deltaA[:, :, i]`, whose backward allocates a full (B, D, L, N)
zero gradient per step (that made the original 270x slower than tinymoe here, a
comparison with a strawman). All run side by side in one process, float32.

    python benchmarks/bench_scan_cpu.py                       # (4, 256, 1024, 16)
    python benchmarks/bench_scan_cpu.py --batch 2 --length 256 --repeats 3
    python benchmarks/bench_scan_cpu.py --memory              # tracemalloc peaks vs N x L

Memory: tracemalloc sees every NumPy allocation; the peak of forward + backward minus
the inputs, the output and the gradients is the scan's own working memory, reported
next to the size a stored (B, D, L, N) state tensor would have.
"""
import argparse
import statistics
import sys
import time
import tracemalloc

import numpy as np

from tinymoe.kernels.selective_scan import selective_scan_bwd, selective_scan_fwd


def inputs(batch, d_inner, L, N, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(dtype)           # noqa: E731
    return dict(u=f(batch, d_inner, L), delta=f(batch, d_inner, L) * 0.5,
                A=-np.exp(f(d_inner, N)), B=f(batch, N, L), C=f(batch, N, L), D=f(d_inner),
                z=f(batch, d_inner, L), delta_bias=f(d_inner) * 0.1)


def torch_ref(torch):
    def selective_scan_ref(u, delta, A, B, C, D, z, delta_bias):
        """Mamba's selective_scan_ref (real A; B, C of shape (batch, N, L)), slices by unbind."""
        delta = torch.nn.functional.softplus(delta + delta_bias[..., None])
        batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
        x = A.new_zeros((batch, dim, dstate))
        deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
        ys = []
        for dA_i, dBu_i, C_i in zip(deltaA.unbind(2), deltaB_u.unbind(2), C.unbind(2)):
            x = dA_i * x + dBu_i
            ys.append(torch.einsum("bdn,bn->bd", x, C_i))
        y = torch.stack(ys, dim=2)
        out = y + u * D[:, None]
        return out * torch.nn.functional.silu(z)
    return selective_scan_ref


def timed(fn, repeats):
    fn()                                                          # warm-up (Numba compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_speed(args):
    x = inputs(args.batch, args.d_inner, args.length, args.d_state)
    dout = np.ones_like(x["u"])
    rows = {}
    impls = ["numba", "reference"] + (["assoc"] if args.assoc else [])
    for impl in impls:
        fwd = lambda: selective_scan_fwd(**x, delta_softplus=True, impl=impl)  # noqa: E731
        both = lambda: (fwd(), selective_scan_bwd(dout, **x, delta_softplus=True, impl=impl))  # noqa: E731
        rows[f"tinymoe {impl}"] = (timed(fwd, args.repeats), timed(both, args.repeats))
    try:
        import torch
    except ImportError:
        print("torch not importable: PyTorch baseline skipped")
    else:
        ref = torch_ref(torch)
        names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]

        def torch_fwd(grad=False):
            t = [torch.tensor(x[k], requires_grad=grad) for k in names]
            return ref(*t)

        def torch_both():
            out = torch_fwd(True)
            out.backward(torch.ones_like(out))

        with torch.no_grad():
            t_fwd = timed(torch_fwd, args.repeats)
        rows[f"torch {torch.__version__} loop"] = (t_fwd, timed(torch_both, args.repeats))
        print(f"torch threads: {torch.get_num_threads()}")
    base = rows.get(next((k for k in rows if k.startswith("torch")), "tinymoe reference"))
    print(f"\nselective scan, (batch, d_inner, L, N) = ({args.batch}, {args.d_inner}, "
          f"{args.length}, {args.d_state}), float32, median of {args.repeats}")
    print(f"{'implementation':28s} {'forward':>10s} {'fwd+bwd':>10s} {'fwd speed-up':>13s} "
          f"{'fwd+bwd speed-up':>17s}   (vs {[k for k, v in rows.items() if v is base][0]})")
    for name, (f, b) in rows.items():
        print(f"{name:28s} {f * 1e3:8.1f}ms {b * 1e3:8.1f}ms {base[0] / f:12.1f}x {base[1] / b:16.1f}x")


def bench_memory(args):
    """Inputs exist before tracing starts, so the traced peak is the output, the
    gradients and whatever the scan allocates besides: its working memory."""
    mib = 2 ** 20
    print("\npeak memory of forward + backward beyond inputs, output and gradients "
          "(tinymoe numba, tracemalloc), MiB")
    print(f"{'L':>6s} {'N':>4s} {'inputs':>8s} {'working':>8s} {'(B,D,L,N) state':>16s}")
    for L in (256, 1024, 4096):
        for N in (4, 16, 64):
            x = inputs(args.batch, args.d_inner, L, N)
            dout = np.ones_like(x["u"])
            selective_scan_bwd(dout, **x, delta_softplus=True)       # compile outside the trace
            tracemalloc.start()
            out = selective_scan_fwd(**x, delta_softplus=True)
            grads = selective_scan_bwd(dout, **x, delta_softplus=True)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            results = out.nbytes + sum(g.nbytes for g in grads)
            state = args.batch * args.d_inner * L * N * 4
            print(f"{L:6d} {N:4d} {sum(a.nbytes for a in x.values()) / mib:8.1f} "
                  f"{(peak - results) / mib:8.1f} {state / mib:16.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--d-inner", type=int, default=256)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--assoc", action="store_true", help="also time the associative scan")
    p.add_argument("--memory", action="store_true", help="only the memory table")
    args = p.parse_args(argv)
    if args.memory:
        bench_memory(args)
    else:
        bench_speed(args)


if __name__ == "__main__":
    sys.exit(main())
