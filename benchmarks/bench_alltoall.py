"""All-to-all bandwidth, and the compute/communication split of an expert-parallel step.

On this machine (CPU):
    python benchmarks/bench_alltoall.py cpu [--nproc 2] [--out docs/img]
  1. all-to-all bandwidth vs message size: toy backend (shared memory + pipes) and MPI
     (mpich, through mpiexec), with a plain memcpy of the same size for scale;
  2. one expert-parallel MoE step (forward + backward) on the toy backend, split into
     time inside all-to-alls and the rest, as the experts' hidden size grows.
On GPUs, one process per GPU (NCCL):
    NCCL_NVLS_ENABLE=0 python -m tinymoe.distributed.launch --nproc 2 benchmarks/bench_alltoall.py gpu
  3. the same all-to-all five ways, in the same processes, each size's rows one after another:
       nccl             tinymoe's single-buffer path, comm.all_to_all_rows (what AllToAll and the
                        expert-parallel layer call): checks, one allocation, one NCCL group
       nccl_list        tinymoe's list path, comm.all_to_all(chunks): W allocations
       cupy_raw         no tinymoe code: the same NCCL group through CuPy, preallocated buffers,
                        CuPy's current (legacy default) stream
       cupy_raw_stream  the same on a non-blocking stream of its own (torch's NCCL has its own)
       torch            torch.distributed.all_to_all_single, preallocated buffers
     Every call starts right after a device-level barrier (an NCCL all-reduce, then a device
     synchronize), so no row pays for the ranks arriving apart; per call: the time to
     completion (synchronized) and the host time alone (until the call returns, unsynchronized:
     the Python and library overhead). Then the expert-parallel split on the GPUs.
Every number is the median of repeated runs, the slowest rank's time, after a warm-up.
Rank 0 writes alltoall_{cpu,gpu}.json (the raw numbers) and alltoall_{cpu,gpu}.png to
runs/bench_alltoall/ (or under --out: --out docs/img refreshes the figures of docs/distributed.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CPU_SIZES = [2 ** k for k in range(10, 27, 2)]        # bytes per peer: 1 KiB .. 64 MiB
GPU_SIZES = [2 ** k for k in range(10, 29, 2)]        # 1 KiB .. 256 MiB


# ---------------------------------------------------------------- timing helpers
def sync(device):
    if device == "cuda":
        import cupy
        cupy.cuda.get_current_stream().synchronize()


def timed(comm, fn, device="cpu", min_time=0.2, min_reps=3):
    """Median seconds of fn() over repeats, the slowest rank's (all ranks repeat equally often)."""
    fn()
    sync(device)
    comm.barrier()
    times = []
    while True:
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        # every rank must agree on when to stop: decide on rank 0's clock
        done = len(times) >= min_reps and sum(times) >= min_time
        done = bool(np.asarray(comm.broadcast(np.array([done], np.int8), root=0)).item()) if device == "cpu" \
            else bool(comm.bootstrap.broadcast(np.array([done], np.int8), root=0).item())
        if done:
            break
    worst = comm.all_reduce(np.array([np.median(times)]), op="max")
    return float(np.asarray(worst.get() if hasattr(worst, "get") else worst)[0])


class TimedComm:
    """A communicator that adds up the wall time spent inside all_to_all (synchronizing the GPU)."""

    def __init__(self, comm, device):
        self.comm, self.device, self.seconds = comm, device, 0.0

    def __getattr__(self, name):
        return getattr(self.comm, name)

    def _timed(self, fn, *args, **kwargs):
        sync(self.device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        return out

    def all_to_all(self, *args, **kwargs):
        return self._timed(self.comm.all_to_all, *args, **kwargs)

    def all_to_all_rows(self, *args, **kwargs):   # what AllToAll and the EP layer call
        return self._timed(self.comm.all_to_all_rows, *args, **kwargs)


# ---------------------------------------------------------------- 1 + 3: bandwidth
def bandwidth(comm, sizes, device="cpu"):
    """Per rank: bytes sent to the other ranks / time. Chunks are float32, `size` bytes each."""
    from tinymoe.backend import module_for
    xp = module_for(device)
    rows = []
    for size in sizes:
        chunks = [xp.ones(size // 4, xp.float32) for _ in range(comm.world_size)]
        recv_rows = [size // 4] * comm.world_size
        t = timed(comm, lambda: comm.all_to_all(chunks, recv_rows=recv_rows), device)
        rows.append({"bytes_per_peer": size, "seconds": t, "GB_per_s": (comm.world_size - 1) * size / t / 1e9})
        progress(comm.rank, comm.backend, rows[-1])
    return rows


def progress(rank, what, row):
    if rank == 0:
        print(f"  {what}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)


def memcpy_bandwidth(sizes):
    rows = []
    for size in sizes:
        a, b = np.ones(size // 4, np.float32), np.empty(size // 4, np.float32)
        reps, start = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - start < 0.1:
            np.copyto(b, a)
            reps += 1
        t = (time.perf_counter() - start) / reps
        rows.append({"bytes_per_peer": size, "seconds": t, "GB_per_s": size / t / 1e9})
    return rows


# ---------------------------------------------------------------- 3: the GPU rows, one harness
GPU_SERIES = ("nccl", "nccl_list", "cupy_raw", "cupy_raw_stream", "torch")


def gpu_reps(size):
    return 200 if size <= 4 * 2 ** 20 else 50 if size <= 64 * 2 ** 20 else 20


def gpu_time(comm, fn, reps):
    """fn's time per call (median over reps; each call after a device-level barrier, timed to
    completion) and its host time per call (until fn returns, no synchronize), the slowest rank's;
    plus the time per call of reps calls back to back with one synchronize at the end."""
    import cupy
    flag = cupy.zeros(1, cupy.float32)
    dev = cupy.cuda.Device()

    def barrier():  # both GPUs finish one all-reduce, both hosts wait for it
        comm.all_reduce(flag)
        dev.synchronize()

    for _ in range(3):  # warm-up: connections, allocator, kernels
        fn()
    dev.synchronize()
    total, host = [], []
    for _ in range(reps):
        barrier()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        dev.synchronize()
        total.append(time.perf_counter() - t0)
        host.append(t1 - t0)
    barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    dev.synchronize()
    piped = (time.perf_counter() - t0) / reps
    worst = comm.all_reduce(np.array([np.median(total), np.median(host), piped]), op="max").get()
    return [float(v) for v in worst]


def gpu_bandwidth(comm, sizes):
    """Each size: the five rows of the module docstring, one after another, float32."""
    import cupy
    import torch
    import torch.distributed as td
    from cupy.cuda import nccl

    W, raw = comm.world_size, comm.comm                 # raw: CuPy's NcclCommunicator itself
    own = cupy.cuda.Stream(non_blocking=True)
    results = {k: [] for k in GPU_SERIES}
    for size in sizes:
        n = size // 4                                    # float32 per peer
        x = cupy.ones(W * n, cupy.float32)               # (W n,): rows for rank 0 | rank 1 | ...
        y = cupy.empty_like(x)
        rows = [n] * W
        chunks = [x[j * n:(j + 1) * n] for j in range(W)]
        tx = torch.ones(W * n, dtype=torch.float32, device="cuda")
        ty = torch.empty_like(tx)

        def raw_group(stream):
            def fn():                                    # no tinymoe code: pointers computed here
                s, sp, rp = stream.ptr, x.data.ptr, y.data.ptr
                nccl.groupStart()
                for p in range(W):
                    raw.send(sp + p * size, size, nccl.NCCL_UINT8, p, s)
                    raw.recv(rp + p * size, size, nccl.NCCL_UINT8, p, s)
                nccl.groupEnd()
            return fn

        fns = {"nccl": lambda: comm.all_to_all_rows(x, rows, rows),
               "nccl_list": lambda: comm.all_to_all(chunks, recv_rows=rows),
               "cupy_raw": raw_group(cupy.cuda.get_current_stream()),
               "cupy_raw_stream": raw_group(own),
               "torch": lambda: td.all_to_all_single(ty, tx)}
        for key, fn in fns.items():
            t, host, piped = gpu_time(comm, fn, gpu_reps(size))
            results[key].append({"bytes_per_peer": size, "seconds": t, "GB_per_s": (W - 1) * size / t / 1e9,
                                 "host_us": 1e6 * host, "pipelined_s": piped})
        if comm.rank == 0:
            print(f"  {size:>10} B/peer  " + "  ".join(
                f"{k} {results[k][-1]['GB_per_s']:.3g} GB/s ({results[k][-1]['host_us']:.0f} us host)"
                for k in GPU_SERIES), flush=True)
    if not np.array_equal(comm.all_to_all_rows(cupy.arange(4 * W, dtype=cupy.float32), [4] * W, [4] * W).get()[:4],
                          np.arange(4 * comm.rank, 4 * comm.rank + 4, dtype=np.float32)):
        raise AssertionError("all_to_all_rows moved the wrong rows")   # a last sanity check
    return results


def start_torch(rank, world):
    """torch.distributed over NCCL in the same processes (its own NCCL communicator)."""
    import torch
    import torch.distributed as td
    torch.cuda.set_device(rank % torch.cuda.device_count())
    if not td.is_initialized():
        td.init_process_group("nccl", init_method="tcp://127.0.0.1:29533", rank=rank, world_size=world)
    t = torch.ones(1, device="cuda")
    td.all_reduce(t)                                    # communicator made now, not inside a timing
    torch.cuda.synchronize()


def nccl_versions():
    """The NCCL each library calls (a different bundled NCCL could explain a gap), and the
    libnccl files mapped into this process."""
    import torch
    from cupy.cuda import nccl
    maps = set()
    try:
        with open("/proc/self/maps") as f:
            maps = {line.split()[-1] for line in f if "libnccl" in line}
    except OSError:
        pass
    v = torch.cuda.nccl.version()                       # (2, 27, 3) in recent torch
    c = nccl.get_version()                              # 22703 = 2.27.3
    return {"cupy_nccl": f"{c // 10000}.{c // 100 % 100}.{c % 100}" if c >= 10000 else str(c),
            "torch_nccl": ".".join(map(str, v)) if isinstance(v, tuple) else str(v),
            "libnccl_mapped": sorted(maps)}


# ---------------------------------------------------------------- 2: compute vs communication
def ep_split(comm, device, d_model, d_ffs, tokens, num_experts, dtype):
    """One EP MoE step (forward + backward): total time and the part inside all-to-alls."""
    import tinymoe
    from tinymoe.distributed.expert_parallel import ExpertParallelMoE
    from tinymoe.nn.moe import MoELayer

    rows = []
    for d_ff in d_ffs:
        tinymoe.manual_seed(0)
        timed_comm = TimedComm(comm, device)
        layer = MoELayer(d_model, d_ff, num_experts=num_experts, top_k=2, capacity_factor=1.25)
        ep = ExpertParallelMoE(layer.to(device, dtype=dtype), timed_comm)
        g = np.random.default_rng(comm.rank)
        x = tinymoe.tensor(g.standard_normal((tokens, d_model)).astype(dtype), requires_grad=True, device=device)

        def step():
            out = ep(x)
            (out * out).sum().backward()

        calls = [0]

        def counted():  # timed() calls once to warm up: that call's all-to-all time is not counted
            step()
            calls[0] += 1
            if calls[0] == 1:
                timed_comm.seconds = 0.0

        total = timed(comm, counted, device)
        comm_s = timed_comm.seconds / max(calls[0] - 1, 1)
        rows.append({"d_ff": d_ff, "step_s": total, "comm_s": comm_s, "comm_fraction": comm_s / total,
                     "bytes_sent_per_rank": ep.last_stats["bytes_sent"] * 2})   # there and back
        progress(comm.rank, "ep", rows[-1])
    return rows


# ---------------------------------------------------------------- entry points
def _toy_job(comm, sizes, ep_kw):
    return {"bandwidth": bandwidth(comm, sizes), "ep": ep_split(comm, "cpu", **ep_kw)}


def _mpi_main(sizes):
    import tinymoe.distributed as dist
    comm = dist.init("mpi")
    rows = bandwidth(comm, sizes)
    if comm.rank == 0:
        print(json.dumps(rows))


CPU_EP = dict(d_model=64, d_ffs=[16, 64, 256, 1024], tokens=512, num_experts=4, dtype=np.float32)


def run_cpu(args):
    from tinymoe.distributed import ToyPool
    results = {"nproc": args.nproc, "memcpy": memcpy_bandwidth(CPU_SIZES)}
    with ToyPool(args.nproc) as pool:
        toy = pool.run(_toy_job, CPU_SIZES, CPU_EP)[0]
    results["toy"], results["ep_toy"] = toy["bandwidth"], toy["ep"]
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    out = subprocess.run([mpiexec, "-n", str(args.nproc), sys.executable, __file__, "_mpi"],
                         capture_output=True, text=True, check=True)
    results["mpi"] = json.loads(out.stdout.strip().splitlines()[-1])
    report(results)
    save_json(results, args.out, "cpu")
    plot(results, args.out)


def run_gpu(args):
    import cupy

    import tinymoe.distributed as dist
    comm = dist.init("nccl")
    start_torch(comm.rank, comm.world_size)
    results = {"nproc": comm.world_size, "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
               "versions": nccl_versions()}
    if comm.rank == 0:
        print(f"NCCL: CuPy {cupy.__version__} calls {results['versions']['cupy_nccl']}, torch calls "
              f"{results['versions']['torch_nccl']}; mapped: {results['versions']['libnccl_mapped']}", flush=True)
    sections = {
        "bandwidth": lambda: gpu_bandwidth(comm, GPU_SIZES),
        "ep_nccl": lambda: ep_split(comm, "cuda", d_model=1024, d_ffs=[512, 2048, 8192], tokens=4096,
                                    num_experts=8, dtype=np.float32),
    }
    for name, section in sections.items():  # results are written after each section
        start = time.perf_counter()
        out = section()
        if name == "bandwidth":
            results.update(out)           # one list of rows per series: results["nccl"], ["torch"], ...
        else:
            results[name] = out
        if comm.rank == 0:
            print(f"[{name} done in {time.perf_counter() - start:.0f} s]", flush=True)
            save_json(results, args.out, "gpu")
    if comm.rank == 0:
        report(results, args.target)
        plot(results, args.out)


def save_json(results, folder, where):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"alltoall_{where}.json"), "w") as f:
        json.dump(results, f, indent=1)


LABELS = {"memcpy": "one memcpy", "nccl": "tinymoe (one buffer)", "nccl_list": "tinymoe (list)",
          "cupy_raw": "raw CuPy NCCL", "cupy_raw_stream": "raw CuPy NCCL, own stream", "torch": "torch.distributed"}


def report(results, target=0.9):
    series = [k for k in ("memcpy", "toy", "mpi") + GPU_SERIES if k in results]
    short = {"nccl": "1buf", "nccl_list": "list", "cupy_raw": "raw", "cupy_raw_stream": "raw_strm"}
    print(f"all-to-all, {results['nproc']} ranks: GB/s per rank (bytes sent to the others / time)")
    if "versions" in results:
        print(f"NCCL: CuPy's {results['versions']['cupy_nccl']}, torch's {results['versions']['torch_nccl']}")
    ratios = ("nccl", "nccl_list", "cupy_raw") if "torch" in results else ()
    print("bytes/peer " + "".join(f"{short.get(k, k):>10}" for k in series)
          + "".join(f"{short[k] + '/torch':>14}" for k in ratios))
    for i, row in enumerate(results[series[0]]):
        line = f"{row['bytes_per_peer']:>10} " + "".join(f"{results[k][i]['GB_per_s']:>10.3f}" for k in series)
        line += "".join(f"{results[k][i]['GB_per_s'] / results['torch'][i]['GB_per_s']:>13.2f}x" for k in ratios)
        print(line)
    if "torch" in results:
        print("\nhost time per call, us (until the call returns, not synchronized), and us per call back to back")
        print("bytes/peer " + "".join(f"{short.get(k, k) + ' host':>14}" for k in GPU_SERIES)
              + "".join(f"{short.get(k, k) + ' b2b':>14}" for k in GPU_SERIES))
        for i, row in enumerate(results["torch"]):
            print(f"{row['bytes_per_peer']:>10} " + "".join(f"{results[k][i]['host_us']:>14.1f}" for k in GPU_SERIES)
                  + "".join(f"{1e6 * results[k][i]['pipelined_s']:>14.1f}" for k in GPU_SERIES))
        # the target: at least `target` x torch where bandwidth matters (>= 1 MiB per peer)
        for k in ratios:
            r = [a["GB_per_s"] / b["GB_per_s"] for a, b in zip(results[k], results["torch"])
                 if a["bytes_per_peer"] >= 2 ** 20]
            print(f"{LABELS[k]} / torch at >= 1 MiB per peer: min {min(r):.2f}x, median {np.median(r):.2f}x"
                  + (f" (target >= {target}x): {'met' if min(r) >= target else 'NOT met'}" if k == "nccl" else ""))
    for key in ("ep_toy", "ep_nccl"):
        if key in results:
            print(f"\nexpert-parallel step ({key}): d_ff, step ms, all-to-all ms, communication share")
            for r in results[key]:
                print(f"{r['d_ff']:>6} {1e3 * r['step_s']:>9.2f} {1e3 * r['comm_s']:>9.2f} {r['comm_fraction']:>8.1%}")


def plot(results, folder):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(folder, exist_ok=True)
    gpu = "nccl" in results
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    for k in ("memcpy", "toy", "mpi") + GPU_SERIES:
        if k in results:
            ax[0].plot([r["bytes_per_peer"] for r in results[k]], [r["GB_per_s"] for r in results[k]], "o-",
                       label=LABELS.get(k, k), ms=3)
    ax[0].set(xscale="log", yscale="log", xlabel="bytes per peer", ylabel="GB/s per rank",
              title=f"all-to-all, {results['nproc']} ranks" + (f" ({results['device']})" if gpu else " (CPU)"))
    ax[0].legend(fontsize=7)
    ep = results["ep_nccl" if gpu else "ep_toy"]
    d = [str(r["d_ff"]) for r in ep]
    comm_ms = [1e3 * r["comm_s"] for r in ep]
    rest_ms = [1e3 * (r["step_s"] - r["comm_s"]) for r in ep]
    ax[1].bar(d, comm_ms, label="all-to-all")
    ax[1].bar(d, rest_ms, bottom=comm_ms, label="compute (route, experts, combine)")
    ax[1].set(xlabel="expert hidden size d_ff", ylabel="ms per step (fwd + bwd)",
              title="expert-parallel step: " + ("NCCL" if gpu else "toy"))
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    name = f"alltoall_gpu{results['nproc'] if results['nproc'] != 2 else ''}" if gpu else "alltoall_cpu"
    fig.savefig(os.path.join(folder, f"{name}.png"), dpi=80)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_mpi":
        return _mpi_main(CPU_SIZES)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("where", choices=["cpu", "gpu"])
    p.add_argument("--nproc", type=int, default=2, help="ranks for the CPU benchmark")
    p.add_argument("--out", default="runs/bench_alltoall",
                   help="folder for alltoall_{cpu,gpu}.png and .json (created; default %(default)s)")
    p.add_argument("--target", type=float, default=0.9,
                   help="GPU: the least tinymoe / torch bandwidth ratio at >= 1 MiB per peer (default %(default)s)")
    args = p.parse_args()
    run_cpu(args) if args.where == "cpu" else run_gpu(args)


if __name__ == "__main__":
    main()
