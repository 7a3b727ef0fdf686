"""Selective Copying (Mamba paper, Sec. 4.1.1): a time-invariant SSM cannot do it, Mamba can.

Data tokens sit at random positions among noise; after the markers the model must
emit them in order. The same 2-layer network is trained with three sequence mixers:
  mamba      MambaBlock: Delta, B, C depend on the token (selective, S6)
  lti        S4DBlock:   the same block with a fixed (learned) Delta, B, C (S4D)
  attention  a 2-layer GPT of the same width
and the token accuracy on the copied tokens is plotted against the training step.

    python examples/selective_copying.py                # ~4 CPU minutes
    python examples/selective_copying.py --steps 100    # a quick look
    python examples/selective_copying.py --out docs/img # refreshes the figure of docs/ssm.md

The plot goes to runs/selective_copying/selective_copying.png (or under --out).
"""
import argparse
import json
import os
import time

import numpy as np

import tinymoe
from tinymoe.autograd.grad_mode import no_grad
from tinymoe.data.tasks import selective_copying, token_accuracy
from tinymoe.models.gpt import GPT, GPTConfig
from tinymoe.models.mamba import MambaConfig, MambaLM
from tinymoe.optim import AdamW

# ---- knobs
SEQ_LEN = 32          # positions holding noise and data
NUM_TOKENS = 4        # data tokens to copy
VOCAB = 10            # noise (0), 8 data tokens, marker (9)
D_MODEL = 32
N_LAYER = 2
BATCH = 32
STEPS = 600
LR = 3e-3
EVAL_EVERY = 50
SEED = 0


def build(kind):
    if kind == "attention":
        return GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ_LEN + NUM_TOKENS, n_layer=N_LAYER,
                             n_head=4, d_model=D_MODEL, d_ff=4 * D_MODEL))
    mixer = "mamba" if kind == "mamba" else "s4d"
    return MambaLM(MambaConfig(vocab_size=VOCAB, d_model=D_MODEL, n_layer=N_LAYER, d_state=16,
                               mixer=mixer))


def evaluate(model, x, y):
    with no_grad():
        logits, _ = model(x)
    return token_accuracy(logits.numpy(), y)


def train(kind, steps, device="cpu"):
    tinymoe.manual_seed(SEED)
    model = build(kind).to(device)
    opt = AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    rng = np.random.default_rng(SEED)
    x_eval, y_eval = selective_copying(512, SEQ_LEN, NUM_TOKENS, VOCAB, rng=12345)
    curve, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        x, y = selective_copying(BATCH, SEQ_LEN, NUM_TOKENS, VOCAB, rng)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % EVAL_EVERY == 0 or step == steps:
            acc = evaluate(model, x_eval, y_eval)
            curve.append((step, acc))
            print(f"{kind:9s} step {step:4d}  loss {loss.item():.3f}  eval accuracy {acc:.3f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return curve, time.perf_counter() - start, model.num_parameters()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--models", default="mamba,lti,attention")
    p.add_argument("--out", default="runs/selective_copying",
                   help="folder for selective_copying.png (created; default %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    results = {}
    for kind in args.models.split(","):
        curve, seconds, params = train(kind, args.steps, args.device)
        results[kind] = {"curve": curve, "seconds": round(seconds, 1), "parameters": params,
                         "final_accuracy": curve[-1][1]}
    print(json.dumps({k: {f: v[f] for f in ("final_accuracy", "seconds", "parameters")}
                      for k, v in results.items()}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for kind, r in results.items():
        steps, acc = zip(*r["curve"])
        ax.plot(steps, acc, marker="o", ms=3, label=f"{kind} ({r['parameters'] / 1e3:.0f}k params)")
    ax.axhline(1 / (VOCAB - 2), color="gray", ls=":", label="chance")
    ax.set_xlabel("training step")
    ax.set_ylabel("token accuracy (copied tokens)")
    ax.set_title(f"Selective Copying: L={SEQ_LEN}, {NUM_TOKENS} tokens")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "selective_copying.png")
    fig.savefig(path)
    print("plot:", path)


if __name__ == "__main__":
    main()
