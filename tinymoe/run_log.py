"""A run's log.jsonl: one JSON object per line, only ever appended; read and plotted.

Non-finite numbers (a diverging loss) are written as null, so every line stays valid JSON
(Python's json writes NaN, which JSON does not allow).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np


def finite_or_none(value):
    """The record with every NaN / infinity replaced by None (recursively)."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_record(log_path: str, record: dict) -> None:
    with open(log_path, "a") as f:
        f.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")


def read_log(log_path) -> list[dict]:
    with open(log_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(log_path, out_dir):
    """loss.png (train and validation loss vs step) and, for MoE models, expert_load.png
    (per MoE layer: fraction of slots per expert over steps, a heatmap)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train_pts = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val_pts = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    if train_pts:
        ax.plot(*zip(*train_pts), label="train", lw=1, alpha=0.8)
    if val_pts:
        ax.plot(*zip(*val_pts), "o-", label="validation", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"))
    plt.close(fig)

    loads = [r for r in records if r.get("expert_load")]
    if not loads:
        return
    layers = list(loads[0]["expert_load"])
    fig, axes = plt.subplots(1, len(layers), figsize=(2.4 * len(layers) + 1, 2.8), dpi=100,
                             squeeze=False, constrained_layout=True)
    steps = [r["step"] for r in loads]
    for ax, layer in zip(axes[0], layers):
        grid = np.array([r["expert_load"][layer] for r in loads], dtype=float).T    # (E, n_logs)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower", interpolation="nearest",
                       extent=(steps[0], max(steps[-1], steps[0] + 1), -0.5, grid.shape[0] - 0.5),
                       vmin=0, vmax=max(2.0 / grid.shape[0], float(np.nanmax(grid))))
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("expert")
    fig.colorbar(im, ax=axes[0].tolist(), label="fraction of slots")
    fig.savefig(os.path.join(out_dir, "expert_load.png"))
    plt.close(fig)
