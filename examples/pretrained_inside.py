"""Look inside real pretrained models: where a Mamba's step size Delta opens and shuts over a
real text, and which experts a Mixtral-architecture model sends each token to.

    python examples/pretrained_inside.py                        # state-spaces/mamba-130m-hf
    python examples/pretrained_inside.py --mamba PATH_OR_ID --mixtral PATH_OR_ID --out runs/x

Repo ids download through huggingface_hub (pip install -e ".[hub]"); local folders need no
network. A folder without tokenizer.json is read as bytes (its vocabulary must be 256).

Delta (Gu & Dao 2023, Sec. 3.5.2): Delta_t = softplus(dt_proj(dt_t) + bias), per channel. A large
Delta resets the channel's state toward the current token (h_t ~ B_t x_t: "take this one"), a
small Delta keeps the past (exp(Delta A) ~ 1: "ignore this token"). In a trained Mamba the
channels do not agree: each selects its own tokens.

Experts (Mixtral, Jiang et al. 2024, Sec. 2.1): each block's router keeps the top k of
softmax(x W_g) per token; the plot colours each (layer, token) by its first choice.
"""
import argparse
from pathlib import Path

import numpy as np

from tinymoe import backend, data
from tinymoe.autograd.grad_mode import no_grad
from tinymoe.models.pretrained import from_pretrained, load_tokenizer

# ---- knobs
MAMBA = "state-spaces/mamba-130m-hf"
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was "
        "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.")
MAX_TOKENS = 48                 # of TEXT, for readable plots
OUT = "runs/pretrained_inside"


def tokenizer_for(model, path):
    """The folder's own tokenizer, or bytes when it has none (and its vocabulary is bytes)."""
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        if model.config.vocab_size != data.VOCAB_SIZE:
            raise SystemExit(f"{path} has no tokenizer.json and a vocabulary of "
                             f"{model.config.vocab_size}, not bytes: add the model's tokenizer.json")
        tokenizer = data
    return tokenizer


def tokens(tokenizer, text):
    ids = tokenizer.encode(text)[:MAX_TOKENS]
    labels = [tokenizer.decode([i]).replace("\n", "\\n").replace(" ", "␣") or "?" for i in ids]
    return ids[None], labels                                              # (1, L)


def mamba_deltas(model, ids):
    """Delta of every layer: a list of (d_inner, L) arrays, run layer by layer as the model does."""
    out = []
    with no_grad():
        h = model.embedding(ids)                                          # (1, L, d)
        for layer in model.layers:
            _, dt, _, _, _ = layer.mixer.selection(layer.norm(h))         # dt (1, d_inner, L)
            bias = backend.to_numpy(layer.mixer.dt_proj.bias.data)[:, None]
            out.append(np.logaddexp(0.0, backend.to_numpy(dt.data)[0] + bias))   # softplus
            h = layer(h)
    return out


def expert_choices(model, ids):
    """Experts chosen per block: a list of (L, k) arrays, recorded by listening to each router."""
    choices = []
    for block in model.blocks:
        gate = block.moe.gate
        def record(x, capacity=None, route=gate.forward):
            routing = route(x, capacity)
            choices.append(backend.to_numpy(routing.expert_index))
            return routing
        gate.forward = record
    with no_grad():
        model(ids)
    return choices


def plot_mamba(deltas, labels, layer, path):
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.25 * len(labels)), 9),
                                      gridspec_kw={"height_ratios": [3, 2]})
    im = top.imshow(np.log10(deltas[layer]), aspect="auto", cmap="magma", interpolation="nearest")
    top.set(title=f"Delta per channel, layer {layer} (log10)", ylabel="channel")
    fig.colorbar(im, ax=top)
    means = np.stack([d.mean(axis=0) for d in deltas])                   # (layers, L)
    im = bottom.imshow(np.log10(means), aspect="auto", cmap="viridis", interpolation="nearest")
    bottom.set(title="mean Delta over the channels (log10)", ylabel="layer",
               yticks=range(0, len(deltas), max(1, len(deltas) // 8)))
    fig.colorbar(im, ax=bottom)
    for ax in (top, bottom):
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_experts(choices, labels, num_experts, path):
    import matplotlib.pyplot as plt
    first = np.stack([c[:, 0] for c in choices])                         # (layers, L)
    fig, ax = plt.subplots(figsize=(max(8, 0.3 * len(labels)), 1.5 + 0.45 * len(choices)))
    ax.imshow(first, aspect="auto", cmap="tab20", vmin=0, vmax=max(num_experts - 1, 1),
              interpolation="nearest")
    for (i, t), e in np.ndenumerate(first):
        ax.text(t, i, ",".join(str(x) for x in choices[i][t]), ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set(title="experts of each token (first choice coloured, all k written)", ylabel="layer",
           yticks=range(len(choices)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mamba", default=MAMBA, help="a MambaForCausalLM folder or repo id ('' skips)")
    p.add_argument("--mixtral", default="", help="a MixtralForCausalLM folder or repo id")
    p.add_argument("--text", default=TEXT)
    p.add_argument("--layer", type=int, default=None, help="Mamba layer to plot (default: middle)")
    p.add_argument("--out", default=OUT)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mamba:
        model = from_pretrained(args.mamba)
        ids, labels = tokens(tokenizer_for(model, args.mamba), args.text)
        deltas = mamba_deltas(model, ids)
        layer = len(deltas) // 2 if args.layer is None else args.layer
        plot_mamba(deltas, labels, layer, out / "mamba_delta.png")
        top = np.argsort(deltas[layer].mean(axis=0))[::-1][:5]
        print(f"Mamba layer {layer}: Delta is largest at "
              + ", ".join(f"{labels[t]!r} ({deltas[layer][:, t].mean():.3g})" for t in top)
              + f"; smallest mean {deltas[layer].mean(axis=0).min():.3g}")
        print(f"wrote {out / 'mamba_delta.png'}")
    if args.mixtral:
        model = from_pretrained(args.mixtral)
        ids, labels = tokens(tokenizer_for(model, args.mixtral), args.text)
        choices = expert_choices(model, ids)
        E = model.config.num_experts
        plot_experts(choices, labels, E, out / "mixtral_experts.png")
        for i, c in enumerate(choices):
            print(f"Mixtral layer {i}: tokens per expert {np.bincount(c.ravel(), minlength=E).tolist()}")
        print(f"wrote {out / 'mixtral_experts.png'}")


if __name__ == "__main__":
    main()
