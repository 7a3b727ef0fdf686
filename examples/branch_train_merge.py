"""Branch-Train-Merge (Li et al. 2022) on domains of the Python standard library.

1. Seed: train one LM on all domains for S0 steps.
2. Branch: copy it once per domain; train each copy on its own domain for S1 steps
   (independently: on a cluster these run on different machines with no communication).
3. Merge, two ways:
   - ensemble: p(x_t | x_<t) = sum_k post_k(t) p_k(x_t | x_<t), where post_k(t) is the
     Bayesian posterior of branch k given the tokens so far (prior uniform):
     post_k(t) ~ prod_{s<t} p_k(x_s | x_<s)   (the paper's domain posterior, sec. 4.1)
   - parameter averaging: one model whose weights are the mean of the branches'.
   Both live in tinymoe/models/btm.py (ensemble_log_probs, average_parameters).
Baseline: the seed trained on the mixture of all domains for D * S1 more steps, the same
total number of training steps.

    python examples/branch_train_merge.py --quick   # -> runs/branch_train_merge/branch_train_merge.png
    python examples/branch_train_merge.py --out docs/img    # refreshes the figure of docs/moe.md
"""
import argparse
import copy
import os
import sysconfig

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from tinymoe import manual_seed
from tinymoe.autograd.grad_mode import no_grad
from tinymoe.data import BatchSampler, eval_batches, load_files, stdlib_files
from tinymoe.models import build_model
from tinymoe.models.btm import average_parameters, ensemble_log_probs
from tinymoe.nn import functional as F
from tinymoe.optim import AdamW
from tinymoe.step import EagerStep

DOMAINS = {  # name -> top-level stdlib folders
    "asyncio": ("asyncio", "concurrent", "multiprocessing"),
    "email": ("email", "http", "urllib", "xmlrpc"),
    "tooling": ("unittest", "importlib", "distutils", "json", "logging"),
}
MODEL = dict(n_layer=2, d_model=64, n_head=4, d_ff=256, block_size=64)
B, L = 8, 64


def domain_corpora(max_bytes):
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_files(root)
    out = {}
    for name, dirs in DOMAINS.items():
        paths = [f for f in files if os.path.relpath(f, root).split(os.sep)[0] in dirs]
        out[name] = load_files(paths, root, val_fraction=0.15, max_bytes=max_bytes, source=name)
    return out


class Mixture:
    """Batches drawn from several samplers in turn."""
    def __init__(self, samplers):
        self.samplers, self.i = samplers, 0

    def __call__(self):
        self.i += 1
        return self.samplers[self.i % len(self.samplers)]()


def fit(model, sampler, steps, lr=3e-3):
    step = EagerStep(model, AdamW(model.parameters(), lr=lr), grad_clip=1.0)
    for _ in range(steps):
        step(*sampler())
    return model


def log_probs(model, x, y):
    """log p(y_t | x_<=t) per token: (B, L)."""
    logits, _ = model(x)
    logp = F.log_softmax(logits, axis=-1).numpy()
    return np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]


def evaluate(models, val, how):
    """Mean loss (nats/byte) on `val` of one model, or of an ensemble of several."""
    total, n = 0.0, 0
    with no_grad():
        for x, y in eval_batches(val, B, L, 8):
            lp = [log_probs(m.eval(), x, y) for m in models]                  # K x (B, L)
            mixed = ensemble_log_probs(lp) if how == "posterior" else lp[0]    # (B, L)
            total -= mixed.sum()
            n += mixed.size
    return total / n


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="runs/branch_train_merge",
                   help="folder for branch_train_merge.png (created; default %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    s0, s1 = (100, 100) if args.quick else (300, 300)
    manual_seed(0)
    corpora = domain_corpora(max_bytes=1_500_000)
    samplers = {d: BatchSampler(c.train, B, L, seed=i) for i, (d, c) in enumerate(corpora.items())}
    mixture = Mixture(list(samplers.values()))

    seed = fit(build_model("gpt", **MODEL).to(args.device), mixture, s0)
    branches = {d: fit(copy.deepcopy(seed), samplers[d], s1) for d in DOMAINS}
    baseline = fit(copy.deepcopy(seed), mixture, s1 * len(DOMAINS))
    averaged = average_parameters(list(branches.values()))

    ensemble = list(branches.values())
    rows = {
        "seed (S0 steps)": {d: evaluate([seed], c.val, "single") for d, c in corpora.items()},
        "one model, all data": {d: evaluate([baseline], c.val, "single") for d, c in corpora.items()},
        "own-domain branch (oracle)": {d: evaluate([branches[d]], c.val, "single")
                                       for d, c in corpora.items()},
        "BTM ensemble (posterior)": {d: evaluate(ensemble, c.val, "posterior")
                                     for d, c in corpora.items()},
        "BTM parameter average": {d: evaluate([averaged], c.val, "single")
                                  for d, c in corpora.items()},
    }
    print(f"\nS0 = {s0} seed steps, S1 = {s1} steps per branch, {len(DOMAINS)} domains; "
          f"validation loss (nats/byte)\n")
    print("| model | " + " | ".join(DOMAINS) + " | mean |")
    print("|---|" + "---|" * (len(DOMAINS) + 1))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[d]:.3f}" for d in DOMAINS)
              + f" | {np.mean(list(r.values())):.3f} |")

    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    width = 0.8 / len(rows)
    for i, (name, r) in enumerate(rows.items()):
        ax.bar(np.arange(len(DOMAINS)) + i * width, [r[d] for d in DOMAINS], width, label=name)
    ax.set(xticks=np.arange(len(DOMAINS)) + 0.4 - width / 2, xticklabels=list(DOMAINS),
           ylabel="validation loss (nats/byte)", title="Branch-Train-Merge")
    lo = min(min(r.values()) for r in rows.values())
    ax.set_ylim(lo * 0.9, None)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "branch_train_merge.png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
