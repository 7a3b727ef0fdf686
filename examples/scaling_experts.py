"""Dense vs. MoE with 4, 8 and 16 experts at the same active FLOPs per token.

Switch routing (top-1) with experts as wide as the dense FFN: every model does the same
work per token, the MoE models just hold E times more FFN parameters. The Switch
Transformer finding (Fedus et al. 2021, Fig. 1 and 4): more experts, lower loss at the
same step. Also prints a table of parameters vs. FLOPs per token, like the lecture's
T5 / Switch table (tinymoe.accounting).

    python examples/scaling_experts.py --quick      # -> runs/scaling_experts/scaling_experts.png
    python examples/scaling_experts.py --out docs/img   # refreshes the figure of docs/moe.md

The figure goes to --out; the training runs to runs/scaling_experts/ always.
"""
import argparse
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tinymoe.accounting.arithmetic import (TransformerShape, transformer_flops_per_token,
                                           transformer_params)
from tinymoe.train import TrainConfig, read_log, train

EXPERTS = (0, 4, 8, 16)           # 0 = dense
# Small on purpose: the MoE advantage shows where a dense model is capacity-limited (many tokens
# per parameter). With d_model=64 and 1500 steps of 512 tokens the dense model was still
# optimization-limited and won (docs/moe.md).
SHAPE = dict(n_layer=2, d_model=32, n_head=2, d_ff=128)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default="runs/scaling_experts",
                   help="folder for scaling_experts.png (created; default %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    steps = args.steps or (1000 if args.quick else 3000)
    base = dict(steps=steps, batch_size=16, block_size=64, lr=3e-3, warmup_steps=20,
                eval_interval=max(steps // 8, 1), eval_batches=4, log_interval=10,
                checkpoint_interval=10**9, sample_tokens=0, plots=False, progress=False,
                device=args.device,
                out_dir="runs/scaling_experts", overwrite=True,   # each run of the script starts over
                max_corpus_bytes=4_000_000)
    curves, rows = {}, []
    for E in EXPERTS:
        name = "dense" if E == 0 else f"switch-{E}"
        cfg = dict(SHAPE, num_experts=E, top_k=1, router="switch", capacity_factor=1.25)
        s = train(TrainConfig(model="moe-gpt" if E else "gpt", name=name, model_config=cfg, **base))
        log = read_log(os.path.join(s["run_dir"], "log.jsonl"))
        curves[name] = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
        shape = TransformerShape(vocab_size=256, d_model=SHAPE["d_model"], n_layers=SHAPE["n_layer"],
                                 n_heads=SHAPE["n_head"], d_ff=SHAPE["d_ff"], norm_params=1,
                                 max_seq_len=base["block_size"], num_experts=E, top_k=1)
        params = transformer_params(shape)
        flops = transformer_flops_per_token(shape, base["block_size"])
        assert params.total == s["model"].num_parameters(), (params.total, s["model"].num_parameters())
        rows.append((name, params.total, params.active, flops.forward, s["val_loss"]))
        print(f"{name:10s} params {params.total:>9,}  active {params.active:>8,}  "
              f"FLOPs/token {flops.forward:>9,}  val {s['val_loss']:.3f}")

    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    for name, pts in curves.items():
        ax.plot(*zip(*pts[1:]), "o-", ms=3, label=name)
    ax.set(xlabel="step", ylabel="validation loss (nats/byte)",
           title="same FLOPs per token, more experts")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "scaling_experts.png"))
    plt.close(fig)
    print("\n| model | parameters | active parameters | forward FLOPs / token | val loss |")
    print("|---|---|---|---|---|")
    for name, total, active, flops, val in rows:
        print(f"| {name} | {total:,} | {active:,} | {flops:,} | {val:.3f} |")


if __name__ == "__main__":
    main()
