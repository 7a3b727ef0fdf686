"""Costs around training, not in it: the optimizer step and the checkpoint.

    python benchmarks/bench_nn.py [--params 4e6] [--repeat 5] [--out docs/img]

1. AdamW.step() on P float32 parameters, tinymoe (in-place updates) vs the same
   formula written with NumPy temporaries, side by side; and vs torch.optim.AdamW
   (foreach) when torch is importable.
2. save_checkpoint / load_checkpoint of a model with P parameters (+ AdamW state):
   seconds, MB/s, and the share spent on the SHA-256 checksum.
3. Plots for docs/nn.md: the warmup + cosine schedule, and XOR training curves, written to
   runs/bench_nn/{nn_lr_schedule,nn_xor}.png (or under --out: --out docs/img refreshes them).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

import tinymoe
from tinymoe import checkpoint
from tinymoe.autograd import Tensor
from tinymoe.nn import F, Linear, Module, Sequential
from tinymoe.optim import SGD, AdamW, lr_at


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def naive_adamw_step(p, g, m, v, t, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.01):
    """The update as written on the slide, every line a new array."""
    p = p - lr * wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def bench_optimizer(n_params, repeat):
    rng = np.random.default_rng(0)
    shapes = [(n_params // 4,), (n_params // 4,), (n_params // 2,)]  # a few tensors
    params = [Tensor(rng.standard_normal(s).astype(np.float32), requires_grad=True) for s in shapes]
    for p in params:
        p.grad = rng.standard_normal(p.shape).astype(np.float32)
    opt = AdamW(params)
    opt.step()  # allocate the state
    ours = best_of(opt.step, repeat)

    state = [(p.data.copy(), p.grad, np.zeros_like(p.data), np.zeros_like(p.data)) for p in params]

    def naive():
        for i, (p, g, m, v) in enumerate(state):
            p, m, v = naive_adamw_step(p, g, m, v, t=2)
            state[i] = (p, g, m, v)

    naive_t = best_of(naive, repeat)
    rows = [("tinymoe AdamW (in place)", ours), ("NumPy, one temporary per line", naive_t)]
    try:
        import torch

        tparams = [torch.tensor(p.data, requires_grad=True) for p in params]
        for tp, p in zip(tparams, params):
            tp.grad = torch.tensor(p.grad)
        topt = torch.optim.AdamW(tparams, foreach=True)
        topt.step()
        rows.append(("torch.optim.AdamW (foreach)", best_of(topt.step, repeat)))
    except ImportError:
        pass
    sgd = SGD(params, lr=1e-3, momentum=0.9)
    sgd.step()
    rows.append(("tinymoe SGD momentum", best_of(sgd.step, repeat)))
    print(f"\noptimizer step on {n_params / 1e6:.1f}M float32 parameters (best of {repeat}):")
    for name, sec in rows:
        print(f"  {name:32s} {sec * 1e3:8.2f} ms   {sec / ours:5.2f}x tinymoe AdamW")


class Wide(Module):
    def __init__(self, n_params):
        super().__init__()
        d = int(np.sqrt(n_params / 4))
        self.layers = Sequential(*[Linear(d, d, bias=False) for _ in range(4)])


def bench_checkpoint(n_params, repeat):
    model = Wide(n_params)
    opt = AdamW(model.parameters())
    for p in model.parameters():
        p.grad = np.ones_like(p.data)
    opt.step()
    n = model.num_parameters()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.safetensors")
        save = best_of(lambda: checkpoint.save_checkpoint(path, model, opt, step=1), repeat)
        size = os.path.getsize(path)
        load = best_of(lambda: checkpoint.load_checkpoint(path, model, opt), repeat)
        tensors, metadata = checkpoint.read_safetensors(path)
        digest = best_of(lambda: checkpoint._checksum(tensors, metadata), repeat)
    mb = size / 1e6
    print(f"\ncheckpoint of {n / 1e6:.2f}M parameters + AdamW state = {mb:.1f} MB (best of {repeat}):")
    print(f"  save  {save * 1e3:8.1f} ms  {mb / save:7.0f} MB/s  (incl. fsync)")
    print(f"  load  {load * 1e3:8.1f} ms  {mb / load:7.0f} MB/s")
    print(f"  SHA-256 checksum alone {digest * 1e3:.1f} ms = {digest / load:.0%} of a load")


def plot_schedule(out):
    import matplotlib.pyplot as plt

    steps = np.arange(1000)
    lrs = [lr_at(int(t), 3e-4, 100, 1000, 3e-5) for t in steps]
    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=100)
    ax.plot(steps, lrs)
    ax.axvline(100, color="gray", ls=":", lw=1)
    ax.set(xlabel="step", ylabel="learning rate",
           title="lr_at: 100 warmup steps, cosine to 10% at 1000")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "nn_lr_schedule.png"))
    plt.close(fig)


def plot_xor(out):
    import matplotlib.pyplot as plt

    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    y = np.array([0, 1, 1, 0])

    class Tanh(Module):
        def forward(self, h):
            return F.tanh(h)

    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=100)
    for name, make in [("SGD lr 0.5", lambda p: SGD(p, lr=0.5)),
                       ("SGD lr 0.5, momentum 0.9", lambda p: SGD(p, lr=0.5, momentum=0.9)),
                       ("AdamW lr 0.05", lambda p: AdamW(p, lr=0.05, weight_decay=0.0))]:
        tinymoe.manual_seed(0)
        mlp = Sequential(Linear(2, 8), Tanh(), Linear(8, 2))
        opt, losses = make(mlp.parameters()), []
        for _ in range(300):
            loss = F.cross_entropy(mlp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        ax.semilogy(losses, label=name)
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="2-8-2 tanh MLP on XOR")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "nn_xor.png"))
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=4e6)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="runs/bench_nn",
                        help="folder for nn_lr_schedule.png and nn_xor.png (created; default %(default)s)")
    args = parser.parse_args()
    bench_optimizer(int(args.params), args.repeat)
    bench_checkpoint(int(args.params), args.repeat)
    os.makedirs(args.out, exist_ok=True)
    plot_schedule(args.out)
    plot_xor(args.out)
    print(f"\nplots written to {args.out}/nn_lr_schedule.png and nn_xor.png")
