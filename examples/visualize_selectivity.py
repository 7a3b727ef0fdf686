"""What does a selective SSM select? Plot Mamba's step size Delta and output gate over
one Selective Copying sequence.

Delta_t = softplus(dt_proj(x_t)) is the per-token step: a large Delta resets the state
towards the current input (h_t ~ B_t x_t, "remember this"), a small Delta leaves the state
unchanged (exp(Delta A) ~ 1, "ignore this"). A trained model should open up on the data
tokens and stay shut on the noise between them.

    python examples/visualize_selectivity.py             # trains ~500 steps, then plots
    python examples/visualize_selectivity.py --out docs/img  # refreshes the figure of docs/ssm.md

The plot goes to runs/visualize_selectivity/selectivity.png (or under --out).
"""
import argparse
import os

import numpy as np

import tinymoe
from tinymoe.autograd.grad_mode import no_grad
from tinymoe.data.tasks import selective_copying, token_accuracy
from tinymoe.models.mamba import MambaConfig, MambaLM
from tinymoe.optim import AdamW

# ---- knobs (those of examples/selective_copying.py)
SEQ_LEN, NUM_TOKENS, VOCAB = 32, 4, 10
D_MODEL, N_LAYER, BATCH, LR = 32, 2, 32, 3e-3
STEPS = 500
SEED = 0


def train(steps, device="cpu"):
    tinymoe.manual_seed(SEED)
    model = MambaLM(MambaConfig(vocab_size=VOCAB, d_model=D_MODEL, n_layer=N_LAYER)).to(device)
    opt = AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    rng = np.random.default_rng(SEED)
    for step in range(steps):
        x, y = selective_copying(BATCH, SEQ_LEN, NUM_TOKENS, VOCAB, rng)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def selectivity(model, x, layer=0):
    """Delta (d_inner, L) and the gate silu(z) (d_inner, L) of `layer` for one sequence."""
    device = tinymoe.backend.device_of(model.embedding.weight.data)
    with no_grad():
        h = model.embedding(tinymoe.backend.to_device(x, device))
        for block in model.layers[:layer]:
            h = block(h)
        mixer = model.layers[layer].mixer
        _, dt, _, _, z = mixer.selection(model.layers[layer].norm(h))
        dt, z, bias = dt.numpy(), z.numpy(), mixer.dt_proj.bias.numpy()
        delta = np.logaddexp(0, dt + bias[:, None])                          # softplus
        gate = z / (1 + np.exp(-z))
    return delta[0], gate[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--out", default="runs/visualize_selectivity",
                   help="folder for selectivity.png (created; default %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    model = train(args.steps, args.device)
    x_eval, y_eval = selective_copying(256, SEQ_LEN, NUM_TOKENS, VOCAB, rng=1)
    with no_grad():
        acc = token_accuracy(model(x_eval)[0].numpy(), y_eval)
    print(f"trained {args.steps} steps: selective-copying accuracy {acc:.3f}")

    x = x_eval[:1]
    delta, gate = selectivity(model, x)
    data = (x[0] > 0) & (x[0] < VOCAB - 1)
    noise = x[0] == 0
    marker = x[0] == VOCAB - 1
    for name, where in (("data", data), ("noise", noise), ("marker", marker)):
        print(f"mean Delta on {name:6s} tokens: {delta[:, where].mean():.4f}   "
              f"mean gate: {gate[:, where].mean():.3f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, 1, figsize=(7, 5.2), dpi=100, sharex=True,
                             gridspec_kw={"height_ratios": [1, 2.2, 1]})
    t = np.arange(x.shape[1])
    colors = np.where(data, "tab:red", np.where(marker, "tab:blue", "lightgray"))
    axes[0].bar(t, np.ones_like(t), color=colors)
    for i in np.flatnonzero(data | marker):
        axes[0].text(i, 0.5, str(x[0, i]) if data[i] else "M", ha="center", va="center",
                     fontsize=7, color="white")
    axes[0].set_yticks([])
    axes[0].set_title("input: noise (gray), data tokens (red), markers (blue)", fontsize=9)
    im = axes[1].imshow(np.log10(delta), aspect="auto", cmap="viridis", interpolation="nearest")
    axes[1].set_ylabel("channel")
    axes[1].set_title("log10 Delta per channel (layer 0)", fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.03, pad=0.01)
    axes[2].plot(t, delta.mean(axis=0), label="mean Delta", color="tab:green")
    axes[2].plot(t, gate.mean(axis=0), label="mean gate silu(z)", color="tab:purple")
    axes[2].set_xlabel("position")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "selectivity.png")
    fig.savefig(path)
    print("plot:", path)


if __name__ == "__main__":
    main()
