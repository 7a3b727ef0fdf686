"""The training loop of the CLI and the examples: every knob is a field of TrainConfig.

    summary = train(TrainConfig(model="moe-gpt", steps=1500))

Each run writes to runs/<name>/: ckpt.safetensors (model + optimizer + step + RNG),
log.jsonl (one JSON object per logged step), loss.png, expert_load.png, sample.txt.
Loss is in nats per byte (the tokens are bytes); bits per byte = nats / ln 2.
Ctrl-C saves a checkpoint and returns; `resume=True` continues from it.

`expert_parallel=True` trains on every rank of the world this process was started in
(the toy launcher, mpiexec, or GPUs with backend="nccl"): the experts spread over the
ranks (or over groups of `ep_size` ranks, a mesh), the global batch split between them;
see tinymoe/distributed/training.py and mesh.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import backend
from .autograd.grad_mode import no_grad
from .checkpoint import load_checkpoint, save_checkpoint
from .data import BatchSampler, check_length, decode, encode, eval_batches, load_corpus
from .models import build_model
from .nn import functional as F
from .nn.moe import MoELayer
from .distributed import training as ep
from .distributed.communicator import SingleProcess
from .distributed.mesh import Mesh
from .distributed.data_parallel import all_reduce_gradients
from .distributed.data_parallel import clip_grad_norm_ as global_clip_grad_norm_
from .optim import AdamW, WarmupCosine, clip_grad_norm_


@dataclass
class TrainConfig:
    model: str = "moe-gpt"
    model_config: dict = field(default_factory=dict)   # overrides of the model's config
    data: str | None = None           # a text file; None = the Python stdlib sources
    out_dir: str = "runs"
    name: str | None = None           # run folder name (default: the model name)
    device: str = "cpu"
    threads: int | None = 1           # BLAS threads (None: leave as is); see set_blas_threads
    seed: int = 0
    steps: int = 1000
    batch_size: int = 16
    block_size: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 200
    eval_batches: int = 8
    log_interval: int = 10
    checkpoint_interval: int = 200
    time_limit: float | None = 540.0  # seconds; stop (and save) when exceeded
    sample_prompt: str = "class "
    sample_tokens: int = 400
    sample_temperature: float = 1.0   # lower temperatures get stuck in runs of indentation
    sample_top_k: int | None = 10
    resume: bool = False
    expert_parallel: bool = False     # train on all ranks: experts sharded, batch split (data parallel)
    ep_size: int | None = None        # expert-parallel group size (W = ep_size x dp_size); None: all ranks
    backend: str | None = None        # toy | mpi | nccl; None: from the launcher (one process if none)
    dtype: str | None = None          # None: the model's own (float32); "float64" for exact checks
    max_corpus_bytes: int = 16_000_000
    progress: bool = True             # tqdm bar
    plots: bool = True


def set_blas_threads(n: int) -> bool:
    """Use n threads in NumPy's BLAS (OpenBLAS). Its idle threads busy-wait, so on a machine
    where other processes run, 2 threads made a training step 5-8x *slower* than 1 thread
    (docs/moe.md). Returns False when the BLAS library was not found (nothing changed)."""
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n, user_api="blas")
        return True
    except ImportError:
        pass
    import ctypes
    import glob
    for path in glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs",
                                       "*openblas*")):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(ctypes.c_int(n))
                return True
    return False


def run_dir(cfg: TrainConfig) -> str:
    return os.path.join(cfg.out_dir, cfg.name or cfg.model)


def make_optimizer(model, cfg: TrainConfig):
    """AdamW with weight decay on matrices only (not on norms, biases)."""
    params = list(model.parameters())
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def evaluate(model, data, cfg: TrainConfig, comm=None) -> float:
    """Mean cross-entropy (nats per byte) over fixed validation windows, in eval mode.

    On W ranks (`comm`) every rank takes its share of each batch: an expert-parallel forward
    needs every rank. A batch of fewer rows than ranks is run whole by all, counted by rank 0."""
    W, r = (comm.world_size, comm.rank) if comm is not None else (1, 0)
    model.eval()
    total = np.zeros(2)                                        # (sum of window losses, windows)
    with no_grad():
        for x, y in eval_batches(data, cfg.batch_size, cfg.block_size, cfg.eval_batches):
            rows = np.array_split(np.arange(len(x)), W)[r] if len(x) >= W else np.arange(len(x))
            xr, yr = backend.to_device(x[rows], cfg.device), backend.to_device(y[rows], cfg.device)
            logits, _ = model(xr)
            if len(x) >= W or r == 0:
                total += [float(F.cross_entropy(logits, yr).item()) * len(rows), len(rows)]
    model.train()
    if comm is not None:
        total = backend.to_numpy(comm.all_reduce(total))
    return float(total[0] / max(total[1], 1))


def train_step(model, optimizer, x, y, grad_clip: float | None = 1.0, comm=None):
    """One step: forward, backward, clip, update. Returns (loss Tensor, grad norm).
    With `comm` (W ranks, x and y this rank's rows): the gradients are averaged over the
    ranks before clipping, and clipping uses the whole model's norm."""
    _, loss = model(x, y)
    model.zero_grad()
    loss.backward()
    if comm is None:
        grad_norm = clip_grad_norm_(model.parameters(), grad_clip) if grad_clip else None
    else:
        all_reduce_gradients(model.parameters(), comm)         # g = (1/W) sum_r dL_r/dtheta
        grad_norm = global_clip_grad_norm_(model.parameters(), grad_clip, comm) if grad_clip else None
    optimizer.step()
    return loss, grad_norm


def _world(cfg: TrainConfig):
    """The communicator of an expert-parallel run; None for a plain one-process run."""
    import tinymoe.distributed as dist

    if not cfg.expert_parallel:
        for name in ("backend", "ep_size"):
            if getattr(cfg, name) is not None:
                raise ValueError(f"train: {name}={getattr(cfg, name)!r} needs expert_parallel=True (--expert-parallel)")
        launched = max(int(os.environ.get(v, 1)) for v in ("TINYMOE_WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
        if launched > 1:
            raise RuntimeError(f"train: this process is one of {launched} started by a launcher, but "
                               "expert_parallel is off: every rank would train alone and write the same "
                               "files; pass --expert-parallel")
        return None
    comm = dist.init(cfg.backend)
    if comm.backend == "nccl" and cfg.device != "cuda":
        raise ValueError("train: backend 'nccl' trains on GPUs (one per rank): use device='cuda' (--device cuda)")
    return Mesh(comm, cfg.ep_size)                      # the world, with its EP and DP groups


def train(cfg: TrainConfig) -> dict:
    """Train; returns a summary dict (steps, losses, time, paths, and the trained model).

    With cfg.expert_parallel every rank of the world calls it: the experts are sharded and
    the global batch of cfg.batch_size rows is split over the ranks; rank 0 writes the files."""
    comm = _world(cfg)                                  # None: one process
    W = comm.world_size if comm is not None else 1
    lead = comm is None or comm.rank == 0               # prints and writes files
    out = run_dir(cfg)
    ckpt_path = os.path.join(out, "ckpt.safetensors")
    log_path = os.path.join(out, "log.jsonl")
    if lead:
        os.makedirs(out, exist_ok=True)
    backend.manual_seed(cfg.seed)                       # the same on every rank: the same init
    if cfg.threads is not None:
        set_blas_threads(cfg.threads)
    corpus = load_corpus(cfg.data, cfg.max_corpus_bytes)
    check_length(corpus, cfg.block_size)
    model = build_model(cfg.model, block_size=cfg.block_size, **cfg.model_config).to(cfg.device, dtype=cfg.dtype)
    if comm is not None:
        ep.check_shapes(model, cfg.batch_size, comm)    # batch over the ranks, experts over the EP group
    optimizer = make_optimizer(model, cfg)              # before sharding: the one-process parameter order
    sampler = BatchSampler(corpus.train, cfg.batch_size, cfg.block_size, seed=cfg.seed)

    step = 0
    if cfg.resume:                                      # every rank reads the (full) checkpoint
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"train: --resume, but there is no checkpoint at {ckpt_path}")
        info = load_checkpoint(ckpt_path, model, optimizer)
        step = info["step"]
        sampler.load_state_dict(info["extra"]["sampler"])
    elif lead:
        open(log_path, "w").close()
    if lead:
        sharded = "experts sharded, " if any(isinstance(m, MoELayer) for m in model.modules()) else ""
        layout = f", {comm.layout}" if comm is not None and comm.dp_size > 1 else ""
        where = f" on {W} rank{'s' * (W > 1)} ({comm.backend}: {sharded}batch split{layout})" if comm is not None else ""
        print(f"{cfg.model}: {model.num_parameters():,} parameters{where} | {corpus} | run dir {out}")
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"train": dataclasses.asdict(cfg),
                       "model": dataclasses.asdict(model.config)}, f, indent=1)
    if comm is not None:
        ep.setup(model, optimizer, comm)                # shard the experts, broadcast the rest
    scheduler = WarmupCosine(optimizer, min(cfg.warmup_steps, cfg.steps), cfg.steps, cfg.min_lr_ratio,
                             start_step=step)

    def save():
        """The whole model in one file; on W ranks the experts are gathered first (collective)."""
        extra = {"model_name": cfg.model, "sampler": sampler.state_dict(),
                 "train_config": dataclasses.asdict(cfg)}
        if comm is None:
            save_checkpoint(ckpt_path, model, optimizer, step, extra=extra)
            return
        ep.check_in_sync(model, comm)
        with ep.full_experts(model, optimizer, comm):
            if lead:
                save_checkpoint(ckpt_path, model, optimizer, step, extra=extra)

    def log(record):
        if lead:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    first_val = evaluate(model, corpus.val, cfg, comm) if step == 0 else None
    val, val_step = first_val, (0 if first_val is not None else None)
    if first_val is not None:
        log({"step": 0, "val_loss": first_val, "val_bpb": first_val / math.log(2)})
    bar = _progress(cfg, step, lead)
    start, tokens, interrupted = time.time(), 0, False
    try:
        while step < cfg.steps:
            t0 = time.time()
            x, y = sampler()                                          # (B, L): the global batch
            if comm is not None:                                      # (B/W, L): this rank's rows
                x, y = ep.local_rows(x, comm), ep.local_rows(y, comm)
            x, y = backend.to_device(x, cfg.device), backend.to_device(y, cfg.device)
            loss, grad_norm = train_step(model, optimizer, x, y, cfg.grad_clip, comm)
            scheduler.step()
            step += 1
            tokens += x.size * W
            tok_s = x.size * W / max(time.time() - t0, 1e-9)
            if step % cfg.log_interval == 0 or step == cfg.steps:
                record = {"step": step, **ep.step_stats(model, loss, comm or SingleProcess()),
                          "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                          "tokens_per_s": tok_s, "elapsed_s": time.time() - start}
                if step % cfg.eval_interval == 0 or step == cfg.steps:
                    val, val_step = evaluate(model, corpus.val, cfg, comm), step
                    record.update(val_loss=val, val_bpb=val / math.log(2))
                log(record)
            if step % cfg.checkpoint_interval == 0:
                save()
            bar.update(1)
            if cfg.progress and lead:                                 # reading last_ce waits for a GPU
                bar.set_postfix(loss=f"{model.last_ce:.3f}", val=f"{val:.3f}" if val else "-",
                                tok_s=f"{tok_s:,.0f}")
            over = cfg.time_limit is not None and time.time() - start > cfg.time_limit
            if comm is not None:
                over = ep.rank0_says(over, comm)                      # one clock decides for all
            if over:
                if lead:
                    print(f"\ntime limit of {cfg.time_limit:.0f} s reached at step {step}")
                break
    except KeyboardInterrupt:
        if W > 1:
            raise  # the ranks are out of step: no collective save (the last checkpoint stays)
        interrupted = True
        print(f"\ninterrupted at step {step}: saving {ckpt_path}")
    finally:
        bar.close()
    save()
    if interrupted:
        return {"step": step, "interrupted": True, "checkpoint": ckpt_path, "model": model}

    if val_step != step:
        val = evaluate(model, corpus.val, cfg, comm)
        log({"step": step, "val_loss": val, "val_bpb": val / math.log(2)})
    elapsed = time.time() - start
    summary = {"step": step, "first_val_loss": first_val, "val_loss": val,
               "val_bpb": val / math.log(2), "train_seconds": elapsed,
               "tokens_per_s": tokens / max(elapsed, 1e-9), "checkpoint": ckpt_path,
               "run_dir": out, "sample": None, "interrupted": False, "model": model, "world_size": W}
    if not lead:
        return summary
    # on W ranks the model is sharded: rank 0 samples from the full model of the checkpoint
    sampling_model = model if comm is None else load_model(ckpt_path, cfg.device)
    sample = decode(sampling_model.generate(encode(cfg.sample_prompt)[None], cfg.sample_tokens,
                                            temperature=cfg.sample_temperature, top_k=cfg.sample_top_k)[0])
    with open(os.path.join(out, "sample.txt"), "w") as f:
        f.write(sample)
    if cfg.plots:
        plot_run(log_path, out)
    summary["sample"] = sample
    print(f"step {step}: val loss {val:.3f} nats/byte ({val / math.log(2):.3f} bits/byte), "
          f"{elapsed:.0f} s, {summary['tokens_per_s']:,.0f} tokens/s\n--- sample ---\n{sample}")
    return summary


def _progress(cfg, initial, lead=True):
    if cfg.progress and lead:
        from tqdm import tqdm
        return tqdm(total=cfg.steps, initial=initial, dynamic_ncols=True, desc="train")

    class _Silent:
        def update(self, n): pass
        def close(self): pass
    return _Silent()


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
    train_pts = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val_pts = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
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

    loads = [r for r in records if "expert_load" in r]
    if not loads:
        return
    layers = list(loads[0]["expert_load"])
    fig, axes = plt.subplots(1, len(layers), figsize=(2.4 * len(layers) + 1, 2.8), dpi=100,
                             squeeze=False, constrained_layout=True)
    steps = [r["step"] for r in loads]
    for ax, layer in zip(axes[0], layers):
        grid = np.array([r["expert_load"][layer] for r in loads]).T            # (E, n_logs)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower", interpolation="nearest",
                       extent=(steps[0], max(steps[-1], steps[0] + 1), -0.5, grid.shape[0] - 0.5),
                       vmin=0, vmax=max(2.0 / grid.shape[0], float(grid.max())))
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("expert")
    fig.colorbar(im, ax=axes[0].tolist(), label="fraction of slots")
    fig.savefig(os.path.join(out_dir, "expert_load.png"))
    plt.close(fig)


def load_model(checkpoint_path, device: str = "cpu"):
    """The model saved by `train` in a checkpoint, rebuilt from its config, in eval mode."""
    info = load_checkpoint(checkpoint_path, restore_rng=False, map_device=device)
    name = (info["extra"] or {}).get("model_name")
    if name is None:
        raise ValueError(f"load_model: {checkpoint_path} was not written by tinymoe.train "
                         f"(no model name in its metadata)")
    model = build_model(name, **info["config"]).to(device)
    model.load_state_dict(info["model_state"])
    return model.eval()
