"""Induction Heads (Mamba paper, Sec. 4.1.2): recall the token that followed the trigger,
trained at one length, evaluated at longer ones.

After "... s t ... s" the model must output t. Mamba has no positions to run out of: it
is a recurrence, so a model trained at length 64 runs unchanged at 1024 (and its state
stays (d_inner, N) per layer). Whether it still *recalls* is the question this measures.

    python examples/induction_heads.py                  # a few CPU minutes
    python examples/induction_heads.py --steps 200
    python examples/induction_heads.py --out docs/img   # refreshes the figure of docs/ssm.md

The plot goes to runs/induction_heads/induction_heads.png (or under --out).
"""
import argparse
import json
import os
import time

import numpy as np

import tinymoe
from tinymoe.autograd.grad_mode import no_grad
from tinymoe.data.tasks import induction_heads, token_accuracy
from tinymoe.models.mamba import MambaConfig, MambaLM
from tinymoe.optim import AdamW

# ---- knobs
VOCAB = 16
TRAIN_LEN = 64
EVAL_LENS = (32, 64, 128, 256, 512, 1024)
D_MODEL, N_LAYER, D_STATE = 64, 2, 16
BATCH, LR = 32, 2e-3
STEPS = 800
SEED = 0


def evaluate(model, L, n=256):
    x, y = induction_heads(n, L, VOCAB, rng=1000 + L)
    with no_grad():
        return token_accuracy(model(x)[0].numpy(), y)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--out", default="runs/induction_heads",
                   help="folder for induction_heads.png (created; default %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    tinymoe.manual_seed(SEED)
    model = MambaLM(MambaConfig(vocab_size=VOCAB, d_model=D_MODEL, n_layer=N_LAYER,
                                d_state=D_STATE)).to(args.device)
    opt = AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    rng = np.random.default_rng(SEED)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = induction_heads(BATCH, TRAIN_LEN, VOCAB, rng)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.3f}  accuracy@{TRAIN_LEN} "
                  f"{evaluate(model, TRAIN_LEN):.3f}  ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    results = {L: evaluate(model, L) for L in EVAL_LENS}
    print(json.dumps({"train_length": TRAIN_LEN, "accuracy_by_length": results}))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(list(results), list(results.values()), marker="o", label="Mamba")
    ax.axvline(TRAIN_LEN, color="gray", ls="--", label="training length")
    ax.axhline(1 / (VOCAB - 1), color="gray", ls=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("recall accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Induction heads: train at 64, test longer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "induction_heads.png")
    fig.savefig(path)
    print("plot:", path)


if __name__ == "__main__":
    main()
