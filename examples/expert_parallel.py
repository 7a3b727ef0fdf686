"""Expert parallelism, watched step by step: tokens per rank and bytes on the wire.

    python examples/expert_parallel.py                      # 4 toy ranks (started here)
    python -m tinymoe.distributed.launch --nproc 4 examples/expert_parallel.py
    mpiexec -n 4 python examples/expert_parallel.py --backend mpi
    python examples/expert_parallel.py --out docs/img       # refreshes the figure of docs/distributed.md

One MoE layer with E experts, E / W on each of W ranks, learns a task where each token
belongs to one of E clusters and the right answer is a cluster-specific linear map: the
router has to learn to send every cluster to "its" expert, wherever that expert lives.
Every rank draws its own tokens; expert weights are trained by expert parallelism, the
gate by data parallelism (gradient all-reduce). Rank 0 plots, per step,
  - how many token slots each rank's experts processed (the load each rank carries),
  - how many bytes each rank sent through the all-to-alls (there and back),
  - the loss,
into runs/expert_parallel/expert_parallel.png (or under --out).
"""
from __future__ import annotations

import argparse
import os

import numpy as np

import tinymoe
import tinymoe.distributed as dist
from tinymoe.backend import to_numpy
from tinymoe.distributed.data_parallel import all_reduce_gradients
from tinymoe.distributed.expert_parallel import ExpertParallelMoE
from tinymoe.nn.moe import MoELayer
from tinymoe.optim import AdamW

# ---- knobs
D_MODEL, D_FF, EXPERTS_PER_RANK, TOP_K = 32, 64, 2, 2
TOKENS_PER_RANK, STEPS, LR, CAPACITY_FACTOR = 256, 60, 3e-3, 1.25
SKEW = 1.5          # cluster popularity ~ 1 / (rank of cluster)^SKEW: some experts are hot


def task(num_clusters, seed=0):
    """Cluster centres and one random linear map per cluster (the same on every rank)."""
    g = np.random.default_rng(seed)
    centres = 3 * g.standard_normal((num_clusters, D_MODEL))
    maps = g.standard_normal((num_clusters, D_MODEL, D_MODEL)) / np.sqrt(D_MODEL)
    popularity = 1.0 / np.arange(1, num_clusters + 1) ** SKEW
    return centres, maps, popularity / popularity.sum()


def batch(g, centres, maps, popularity):
    c = g.choice(len(centres), TOKENS_PER_RANK, p=popularity)                 # (T,) cluster of each token
    x = centres[c] + g.standard_normal((TOKENS_PER_RANK, D_MODEL))            # (T, d)
    y = np.einsum("td,tde->te", x, maps[c])                                   # (T, d) target
    return x.astype(np.float32), y.astype(np.float32)


def train(comm, steps=STEPS):
    W, r = comm.world_size, comm.rank
    E = EXPERTS_PER_RANK * W
    device = "cuda" if comm.backend == "nccl" else "cpu"                     # NCCL: each rank's GPU
    tinymoe.manual_seed(0)                                                    # same init on every rank
    layer = ExpertParallelMoE(MoELayer(D_MODEL, D_FF, num_experts=E, top_k=TOP_K,
                                       capacity_factor=CAPACITY_FACTOR), comm).to(device)
    opt = AdamW(layer.parameters(), lr=LR, weight_decay=0.0)
    centres, maps, popularity = task(E)
    g = np.random.default_rng(1000 + r)                                      # own data on every rank
    log = []
    for step in range(steps):
        x, y = batch(g, centres, maps, popularity)
        out = layer(tinymoe.tensor(x, device=device))
        loss = ((out - tinymoe.tensor(y, device=device)) ** 2).mean() + layer.aux_loss
        opt.zero_grad()
        loss.backward()
        all_reduce_gradients(layer.parameters(), comm)
        opt.step()
        st = layer.last_stats
        mine = np.array([sum(st["rows_received"]), 2 * st["bytes_sent"], loss.item(), st["dropped_fraction"]])
        everyone = np.zeros((W, 4))
        everyone[r] = mine
        log.append(to_numpy(comm.all_reduce(everyone)))                       # (W, 4) on every rank
    return np.stack(log)                                                      # (steps, W, 4)


def plot(log, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps, W, _ = log.shape
    fig, ax = plt.subplots(1, 3, figsize=(11, 3.2))
    for r in range(W):
        ax[0].plot(log[:, r, 0], label=f"rank {r}")
        ax[1].plot(log[:, r, 1] / 1e3, label=f"rank {r}")
    ax[0].axhline(TOKENS_PER_RANK * TOP_K, color="k", ls=":", lw=1, label="balanced")
    ax[0].set(xlabel="step", ylabel="token slots processed", title="load per rank (its experts)")
    ax[1].set(xlabel="step", ylabel="kB sent (there and back)", title="all-to-all bytes per rank")
    ax[2].plot(log[:, :, 2].mean(1), label="loss")
    ax[2].plot(log[:, :, 3].mean(1), label="dropped fraction")
    ax[2].set(xlabel="step", title=f"{W} ranks, {EXPERTS_PER_RANK * W} experts, top-{TOP_K}", yscale="log")
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def report(log, out):
    steps, W, _ = log.shape
    print(f"{W} ranks: loss {log[0, :, 2].mean():.3f} -> {log[-1, :, 2].mean():.3f}; "
          f"last step token slots per rank {log[-1, :, 0].astype(int).tolist()}, "
          f"kB sent per rank {(log[-1, :, 1] / 1e3).round(1).tolist()}, dropped {log[-1, :, 3].mean():.1%}")
    os.makedirs(out, exist_ok=True)
    plot(log, os.path.join(out, "expert_parallel.png"))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=4, help="toy ranks to start when not launched")
    p.add_argument("--backend", default=None, help="toy / mpi / nccl (default: from the launcher)")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--out", default="runs/expert_parallel",
                   help="folder for expert_parallel.png (created; default %(default)s)")
    a = p.parse_args()
    if a.backend is None and dist._detect_backend() == "single":  # not launched: start the toy ranks here
        report(dist.spawn(train, a.nproc, a.steps)[0], a.out)
        return
    comm = dist.init(a.backend)
    log = train(comm, a.steps)
    if comm.rank == 0:
        report(log, a.out)


if __name__ == "__main__":
    main()
