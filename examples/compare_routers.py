"""The routers side by side at equal active compute: validation loss, expert load, drops.

Every model has the same attention and the same active FFN width per token (F = 128):
top-2 routers get experts of width 64, top-1 routers width 128, the dense softmax gate
(all E experts active) width F / E. After training, the dropped fraction of routed slots
is measured on validation batches at capacity factors 1.0, 1.25 and 2.0.

    python examples/compare_routers.py --quick      # a few minutes on a laptop CPU
    python examples/compare_routers.py --out docs/img   # refreshes the figures of docs/moe.md

The figures go to --out (default runs/compare_routers/); the training runs and results.json
to runs/compare_routers/ always.
"""
import argparse
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from tinymoe.autograd.grad_mode import no_grad
from tinymoe.data import eval_batches, load_corpus
from tinymoe.train import TrainConfig, read_log, train

ROUTERS = {  # name -> (top_k, expert width) at F = 128 active hidden units per token
    "dense": (4, 32), "topk": (2, 64), "switch": (1, 128), "gshard": (2, 64),
    "noisy-topk": (2, 64), "expert-choice": (2, 64), "base": (1, 128),
}
E = 4
FACTORS = (1.0, 1.25, 2.0)


def dropped_at(model, val, factors, block_size):
    """Mean dropped fraction over MoE layers and validation batches, per capacity factor."""
    out = {}
    model.train()                                        # the training capacity path
    for cf in factors:
        for layer in model.moe_layers():
            layer.capacity_factor = cf
        drops = []
        with no_grad():
            for x, _ in eval_batches(val, 16, block_size, 4):
                model(x)
                drops += [s["dropped_fraction"] for s in model.stats().values()]
        out[cf] = float(np.mean(drops))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default="runs/compare_routers",
                   help="folder for compare_routers_{loss,load}.png (created; default %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    steps = args.steps or (150 if args.quick else 600)
    base = dict(steps=steps, batch_size=8, block_size=64, lr=3e-3, warmup_steps=20,
                eval_interval=max(steps // 6, 1), eval_batches=4, log_interval=10,
                checkpoint_interval=10**9, sample_tokens=0, plots=False, progress=False,
                device=args.device,
                out_dir="runs/compare_routers", overwrite=True,   # each run of the script starts over
                max_corpus_bytes=4_000_000)
    val = load_corpus(None, base["max_corpus_bytes"]).val
    results = {}
    for name, (k, width) in ROUTERS.items():
        model_config = dict(n_layer=2, d_model=64, n_head=4, num_experts=E, top_k=k, d_ff=width,
                            router=name, capacity_factor=1.25)
        s = train(TrainConfig(model="moe-gpt", name=name, model_config=model_config, **base))
        log = read_log(os.path.join(s["run_dir"], "log.jsonl"))
        loads = [r["expert_load"] for r in log if "expert_load" in r]
        results[name] = {
            "val": [(r["step"], r["val_loss"]) for r in log if "val_loss" in r],
            "final_val": s["val_loss"],
            "load": np.mean([list(l.values()) for l in loads[-5:]], axis=(0, 1)).tolist(),
            "dropped": dropped_at(s["model"], val, FACTORS, base["block_size"]),
            "params": s["model"].num_parameters(),
        }
        print(f"{name:14s} val {s['val_loss']:.3f}  dropped "
              + "  ".join(f"cf={cf}: {d:.3f}" for cf, d in results[name]["dropped"].items()))

    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=100)
    for name, r in results.items():
        ax.plot(*zip(*r["val"][1:]), "o-", ms=3, label=f"{name} ({r['final_val']:.2f})")
    ax.set(xlabel="step", ylabel="validation loss (nats/byte)",
           title=f"routers at equal active compute (E={E})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "compare_routers_loss.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    grid = np.array([r["load"] for r in results.values()])
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(0.5, grid.max()))
    ax.set(yticks=range(len(results)), yticklabels=list(results), xlabel="expert",
           xticks=range(E), title="share of routed slots (last steps)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "compare_routers_load.png"))
    plt.close(fig)

    print("\n| router | k | expert width | params | val loss | dropped @1.0 | @1.25 | @2.0 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        k, width = ROUTERS[name]
        d = r["dropped"]
        print(f"| {name} | {k} | {width} | {r['params']:,} | {r['final_val']:.3f} | "
              f"{d[1.0]:.3f} | {d[1.25]:.3f} | {d[2.0]:.3f} |")
    with open(os.path.join("runs/compare_routers", "results.json"), "w") as f:
        json.dump({k: {kk: vv for kk, vv in v.items()} for k, v in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
