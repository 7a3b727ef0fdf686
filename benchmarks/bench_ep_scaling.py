"""Weak scaling of expert-parallel MoE GPT training, and the communication share of its step.

On GPUs (one process per GPU; benchmarks/nccl_multi_gpu.sh runs all of it):
    python benchmarks/bench_ep_scaling.py --device cuda --out $OUT                           # 1 GPU
    NCCL_NVLS_ENABLE=0 python -m tinymoe.distributed.launch --nproc 4 benchmarks/bench_ep_scaling.py \
        --device cuda --backend nccl [--ep-size 2] --out $OUT                                 # 4 GPUs
    python benchmarks/bench_ep_scaling.py --summarize --out $OUT                             # table, figure
Each configuration writes its row to scaling_w<W>_ep<ep_size>.json in --out (default
runs/bench_ep_scaling); --summarize tabulates every row there and draws ep_scaling.png.
On the CPU (the same code at toy sizes, to check the logic):
    python -m tinymoe.distributed.launch --nproc 4 benchmarks/bench_ep_scaling.py --tiny --ep-size 2

Weak scaling: every rank keeps the same work as the world grows. Each rank holds
`experts_per_rank` experts of its EP group (E = experts_per_rank x ep_size) and trains on
`batch_per_rank` sequences (the global batch is W x batch_per_rank), so with top-k routing
every expert sees about batch_per_rank x block x k / experts_per_rank tokens at any W. Ideal:
W times the tokens/s of one GPU. The one-GPU baseline is one process with the plain MoELayer
(E = experts_per_rank, no all-to-all), the model a user would otherwise train.

A step is the trainer's (tinymoe.step.make_step): forward (all-to-alls in the EP group),
backward, gradient all-reduces (dense over the world, experts over the DP group), clipping
by the global norm, AdamW. Per configuration, the slowest rank's numbers:
    step_s          the median step as it runs in training (no extra synchronization)
    timed_step_s    the mean step again with every collective synchronized before and after and
    all_to_all_s    timed: the mean time per step inside all-to-alls (counts and payload, forward
    all_reduce_s    and backward) and inside all-reduces (gradient buckets, the norm)
    comm_share      (all_to_all_s + all_reduce_s) / timed_step_s, all from the same timed steps
Random token ids: the throughput does not depend on the data.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

# per rank: the same at every world size
GPU = dict(model=dict(d_model=1024, n_layer=4, n_head=16, d_ff=2048, top_k=2, capacity_factor=1.25),
           experts_per_rank=2, batch_per_rank=16, block=256, warmup=3, reps=10)
TINY = dict(model=dict(d_model=16, n_layer=1, n_head=2, d_ff=16, top_k=2, capacity_factor=1.25),
            experts_per_rank=2, batch_per_rank=2, block=16, warmup=1, reps=3)


class CommTimer:
    """Wraps communicators; while `on`, all-to-alls and all-reduces are synchronized and timed."""

    def __init__(self, device):
        self.device, self.on = device, False
        self.seconds = {"all_to_all": 0.0, "all_reduce": 0.0}

    def wrap(self, comm):
        return _Timed(comm, self)

    def timed(self, kind, fn, *args, **kwargs):
        if not self.on:
            return fn(*args, **kwargs)
        from tinymoe.backend import synchronize
        synchronize(self.device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        synchronize(self.device)
        self.seconds[kind] += time.perf_counter() - start
        return out


class _Timed:
    def __init__(self, inner, timer):
        self.inner, self.timer = inner, timer

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def all_to_all_rows(self, *args, **kwargs):            # the EP layer's counts and payload
        return self.timer.timed("all_to_all", self.inner.all_to_all_rows, *args, **kwargs)

    def all_reduce(self, *args, **kwargs):                  # gradient buckets, the global norm
        return self.timer.timed("all_reduce", self.inner.all_reduce, *args, **kwargs)


def build(size, mesh, device, timer):
    """The MoE GPT (same seed on every rank), its optimizer, sharded over the mesh when there is one."""
    import tinymoe
    from tinymoe.distributed import training
    from tinymoe.models import build_model
    from tinymoe.train import TrainConfig, make_optimizer

    ep_size = mesh.ep_size if mesh is not None else 1
    config = dict(size["model"], num_experts=size["experts_per_rank"] * ep_size, block_size=size["block"])
    tinymoe.manual_seed(0)
    model = build_model("moe-gpt", **config).to(device)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4))  # before sharding, as the trainer
    if mesh is not None:
        for name in ("world", "ep", "dp"):                  # every collective of a step goes through the timer
            setattr(mesh, name, timer.wrap(getattr(mesh, name)))
        training.setup(model, optimizer, mesh)
    return model, optimizer, config


def measure(size, mesh, device):
    """Median step time, then the timed collectives; returns the row (the slowest rank's numbers)."""
    from tinymoe.backend import synchronize, to_device, to_numpy
    from tinymoe.step import make_step

    timer = CommTimer(device)
    model, optimizer, config = build(size, mesh, device, timer)
    rank, W = (mesh.rank, mesh.world_size) if mesh is not None else (0, 1)
    ids = np.random.default_rng(rank).integers(0, 256, (size["batch_per_rank"], size["block"] + 1))
    x, y = to_device(ids[:, :-1], device), to_device(ids[:, 1:], device)
    train_step = make_step(model, optimizer, grad_clip=1.0, comm=mesh)

    def steps(n):
        """Seconds of each of n steps, every one started together on all ranks."""
        out = []
        for _ in range(n):
            if mesh is not None:
                mesh.barrier()                              # all ranks start together (not an all-reduce here)
            synchronize(device)
            start = time.perf_counter()
            train_step(x, y)
            synchronize(device)
            out.append(time.perf_counter() - start)
        return out

    steps(size["warmup"])                                   # compilation, allocator, NCCL connections
    step_s = float(np.median(steps(size["reps"])))
    timer.on = True
    timed_s = float(np.mean(steps(size["reps"])))         # a mean, as the collectives' totals / reps
    a2a, ar = (timer.seconds[k] / size["reps"] for k in ("all_to_all", "all_reduce"))
    timer.on = False
    numbers = np.array([step_s, timed_s, a2a, ar])
    if mesh is not None:                                    # the slowest rank's
        numbers = to_numpy(mesh.all_reduce(numbers, op="max"))
    step_s, timed_s, a2a, ar = (float(v) for v in numbers)
    tokens = W * size["batch_per_rank"] * size["block"]
    return {"world_size": W, "ep_size": mesh.ep_size if mesh is not None else 1,
            "dp_size": mesh.dp_size if mesh is not None else 1,
            "backend": mesh.backend if mesh is not None else "single", "device": device_name(device),
            "model": config, "parameters": model.num_parameters(), "batch_per_rank": size["batch_per_rank"],
            "block": size["block"], "tokens_per_step": tokens, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "timed_step_s": timed_s, "all_to_all_s": a2a, "all_reduce_s": ar,
            "comm_share": (a2a + ar) / timed_s}


def device_name(device):
    if device != "cuda":
        return "cpu"
    import cupy
    return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()


def summarize(folder):
    """The table of every row in `folder`, efficiency against the one-process row; the figure."""
    paths = sorted(glob.glob(os.path.join(folder, "scaling_w*_ep*.json")))
    if not paths:
        raise FileNotFoundError(f"bench_ep_scaling --summarize: no scaling_w*_ep*.json rows in {folder}")
    rows = sorted((json.load(open(p)) for p in paths), key=lambda r: (r["world_size"], -r["ep_size"]))
    base = next((r for r in rows if r["world_size"] == 1), None)
    print(f"weak scaling, {rows[0]['device']}: per rank {rows[0]['batch_per_rank']} x {rows[0]['block']} tokens, "
          f"{rows[0]['model']['num_experts'] // rows[0]['ep_size']} experts, d_model {rows[0]['model']['d_model']}, "
          f"d_ff {rows[0]['model']['d_ff']}, {rows[0]['model']['n_layer']} layers")
    print(f"{'GPUs':>4} {'mesh':>9} {'E':>4} {'tokens/s':>11} {'speedup':>8} {'efficiency':>10} "
          f"{'step ms':>8} {'a2a ms':>7} {'allred ms':>9} {'comm share':>10}")
    for r in rows:
        speed = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        r["efficiency"] = speed / r["world_size"]
        print(f"{r['world_size']:>4} {str(r['ep_size']) + 'x' + str(r['dp_size']):>9} {r['model']['num_experts']:>4} "
              f"{r['tokens_per_s']:>11,.0f} {speed:>7.2f}x {r['efficiency']:>10.1%} {1e3 * r['step_s']:>8.1f} "
              f"{1e3 * r['all_to_all_s']:>7.1f} {1e3 * r['all_reduce_s']:>9.1f} {r['comm_share']:>10.1%}")
    plot(rows, folder)
    return rows


def plot(rows, folder):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(folder, exist_ok=True)
    pure = [r for r in rows if r["dp_size"] == 1]           # ep_size = W: the scaling line
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    W = [r["world_size"] for r in pure]
    ax[0].plot(W, [r["tokens_per_s"] for r in pure], "o-", label="EP over all GPUs")
    for r in rows:
        if r["dp_size"] > 1:
            ax[0].plot(r["world_size"], r["tokens_per_s"], "s", label=f"{r['ep_size']} EP x {r['dp_size']} DP")
    if pure and pure[0]["world_size"] == 1:
        ax[0].plot(W, [w * pure[0]["tokens_per_s"] for w in W], "k--", lw=0.8, label="ideal")
    ax[0].set(yscale="log", xlabel="GPUs", ylabel="tokens / s", title=f"weak scaling, {rows[0]['device']}")
    ax[0].set_xscale("log", base=2)
    ax[0].set_xticks(W, [str(w) for w in W])
    ax[0].minorticks_off()
    ax[0].legend(fontsize=7)
    names = [f"{r['world_size']} ({r['ep_size']}x{r['dp_size']})" for r in rows]
    a2a = [1e3 * r["all_to_all_s"] for r in rows]
    ar = [1e3 * r["all_reduce_s"] for r in rows]
    rest = [1e3 * r["timed_step_s"] - a - b for r, a, b in zip(rows, a2a, ar)]
    ax[1].bar(names, rest, label="compute")
    ax[1].bar(names, a2a, bottom=rest, label="all-to-all")
    ax[1].bar(names, ar, bottom=[a + b for a, b in zip(rest, a2a)], label="all-reduce")
    ax[1].set(xlabel="GPUs (EP x DP)", ylabel="ms per step (collectives synchronized)", title="where a step goes")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "ep_scaling.png"), dpi=80)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", choices=["toy", "mpi", "nccl"], default=None,
                   help="default: from the launcher; none: one process (the baseline)")
    p.add_argument("--ep-size", type=int, default=None, help="ranks per expert-parallel group (default: all)")
    p.add_argument("--tiny", action="store_true", help="toy sizes (checking the logic on the CPU)")
    p.add_argument("--out", default="runs/bench_ep_scaling",
                   help="folder for the rows (scaling_w<W>_ep<ep>.json) and ep_scaling.png (default %(default)s)")
    p.add_argument("--summarize", action="store_true", help="tabulate the rows in --out instead of measuring")
    a = p.parse_args(argv)
    if a.summarize:
        return summarize(a.out)
    import tinymoe.distributed as dist
    from tinymoe.distributed.mesh import Mesh

    world = dist.init(a.backend)
    mesh = Mesh(world, a.ep_size) if world.world_size > 1 else None
    row = measure(TINY if a.tiny else GPU, mesh, a.device)
    if world.rank == 0:
        print(json.dumps(row))
        save_row(row, a.out)
    return row


def save_row(row, folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"scaling_w{row['world_size']}_ep{row['ep_size']}.json"), "w") as f:
        json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
