"""Do experts specialize? Train a small MoE GPT on a synthetic mixture of four "tasks",
then show which experts each task's tokens are routed to.

Tasks (one per sequence, each a different kind of byte string):
    digits   counting:        "4 5 6 7 8 9 0 1 ..."
    words    lowercase words: "the cat sat on a mat ..."
    upper    repeated motifs: "QXZQXZQXZ..."
    brackets nested brackets: "([{}])(()){}..."

    python examples/moe_specialization.py --quick   # -> runs/moe_specialization/moe_specialization.png
    python examples/moe_specialization.py --out docs/img    # refreshes the figure of docs/moe.md
"""
import argparse
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from tinymoe import manual_seed, optim
from tinymoe.autograd.grad_mode import no_grad
from tinymoe.models import build_model
from tinymoe.step import EagerStep

WORDS = "the cat sat on a mat and dog ran to big red sun we go up".split()


def sample_task(task, length, rng):
    if task == "digits":
        start = rng.integers(10)
        text = " ".join(str((start + i) % 10) for i in range(length))
    elif task == "words":
        text = " ".join(rng.choice(WORDS, length))
    elif task == "upper":
        motif = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), rng.integers(2, 5)))
        text = motif * length
    else:  # brackets
        text = "".join(rng.choice(["()", "[]", "{}", "([])", "{()}", "[{}]"], length))
    return np.frombuffer(text.encode()[:length + 1], np.uint8).astype(np.int64)


TASKS = ("digits", "words", "upper", "brackets")


def batch(tasks, length, rng):
    """x, y (B, L) with one task per row."""
    rows = np.stack([sample_task(t, length, rng) for t in tasks])
    return rows[:, :-1], rows[:, 1:]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="runs/moe_specialization",
                   help="folder for moe_specialization.png (created; default %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    steps = 150 if args.quick else 400
    manual_seed(0)
    rng = np.random.default_rng(0)
    E, L = 8, 48
    model = build_model("moe-gpt", n_layer=2, d_model=48, n_head=4, num_experts=E, top_k=1,
                        d_ff=96, router="switch", capacity_factor=None, block_size=L).to(args.device)
    train_step = EagerStep(model, optim.AdamW(model.parameters(), lr=3e-3), grad_clip=1.0)
    for step in range(steps):
        x, y = batch(rng.choice(TASKS, 16), L, rng)
        train_step(x, y)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {model.last_ce:.3f}")

    # Route 32 sequences of each task (eval mode, dropless) and count tokens per expert.
    model.eval()
    share = {}                                                  # layer -> (tasks, E)
    with no_grad():
        for task in TASKS:
            model(batch([task] * 32, L, rng)[0])
            for layer, s in model.stats().items():
                counts = np.array(s["tokens_per_expert"], float)
                share.setdefault(layer, []).append(counts / counts.sum())
    os.makedirs(args.out, exist_ok=True)
    fig, axes = plt.subplots(1, len(share), figsize=(4 * len(share) + 1, 2.6), dpi=100,
                             constrained_layout=True)
    for ax, (layer, rows) in zip(np.atleast_1d(axes), share.items()):
        grid = np.array(rows)
        im = ax.imshow(grid, cmap="magma", vmin=0, vmax=1)
        ax.set(yticks=range(len(TASKS)), yticklabels=TASKS, xticks=range(E), xlabel="expert",
               title=layer)
        # I(task; expert) = sum p(t, e) log2 p(e | t) / p(e), tasks equally likely (bits)
        joint = grid / len(TASKS)                               # p(t, e); rows of grid: p(e | t)
        p_e = joint.sum(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            mi = np.nansum(joint * np.log2(grid / p_e))
        print(f"{layer}: I(task; expert) = {mi:.2f} bits (max {np.log2(len(TASKS)):.2f}); "
              f"top expert share per task: " + ", ".join(
                  f"{t} {grid[i].max():.2f}" for i, t in enumerate(TASKS)))
    fig.colorbar(im, ax=np.atleast_1d(axes).tolist(), label="share of the task's tokens")
    fig.savefig(os.path.join(args.out, "moe_specialization.png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
