"""The training loop of the CLI and the examples: every knob is a field of TrainConfig.

    summary = train(TrainConfig(model="moe-gpt", steps=1500))

The recipe, top to bottom: check the whole configuration; plan the run folder (never
overwrite a run unless asked: tinymoe/run_folder.py); build the model, optimizer, data and
the step object (how a step runs: tinymoe/step/); then loop: batch, step, log, checkpoint.

Each run writes to runs/<name>/: ckpt.safetensors (model + optimizer + step + RNG) and
ckpt.prev.safetensors (the one before), log.jsonl (one JSON object per logged step, only
appended), config.json, loss.png, expert_load.png, sample.txt. Loss is in nats per byte
(the tokens are bytes); bits per byte = nats / ln 2. A non-finite step is skipped and
counted; `max_bad_steps` in a row stop the run (DivergenceError) with its last good
checkpoint kept. SIGTERM or Ctrl-C finishes the step, saves, and returns exit code 143 or
130 in the summary; `resume=True` continues from the checkpoint. docs/reliability.md.

`expert_parallel=True` trains on every rank of the world this process was started in
(the toy launcher, mpiexec, or GPUs with backend="nccl"): the experts spread over the
ranks, the global batch split between them; see tinymoe/distributed/training.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np

from . import backend
from .autograd.grad_mode import no_grad
from .checkpoint import load_checkpoint, save_checkpoint
from .data import BatchSampler, check_length, decode, eval_batches, load_corpus, prompt_ids
from .distributed import training as ep
from .distributed.communicator import SingleProcess
from .distributed.mesh import Mesh
from .models import build_model, load_model
from .nn import functional as F
from .nn.moe import MoELayer
from .optim import AdamW, WarmupCosine
from .optim.master import float32_weights
from .precision import get_precision
from .run_folder import plan_run, start_run
from .run_log import append_record, plot_run, read_log
from .signals import StopSignals
from .step import DivergenceGuard, make_step
from .train_config import TrainConfig, flag, validate_config

__all__ = ["TrainConfig", "train", "load_model", "read_log", "plot_run", "evaluate", "make_optimizer"]


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


def _world(cfg: TrainConfig):
    """The communicator of an expert-parallel run; None for a plain one-process run."""
    import tinymoe.distributed as dist

    if not cfg.expert_parallel:
        for name in ("backend", "ep_size"):
            if getattr(cfg, name) is not None:
                raise ValueError(f"train: {flag(name)} {getattr(cfg, name)} needs --expert-parallel "
                                 f"(expert_parallel=True)")
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
    the global batch of cfg.batch_size rows is split over the ranks; rank 0 writes the files.
    Nothing on disk changes until the whole configuration has been checked."""
    comm = _world(cfg)                                  # None: one process
    W = comm.world_size if comm is not None else 1
    lead = comm is None or comm.rank == 0               # prints and writes files
    validate_config(cfg, W)
    corpus = load_corpus(cfg.data, cfg.max_corpus_bytes)
    check_length(corpus, cfg.block_size)
    plan = plan_run(run_dir(cfg), cfg.resume, cfg.overwrite)
    if plan.resume_step is not None and plan.resume_step >= cfg.steps:
        if lead:
            print(f"train: {plan.checkpoint} is at step {plan.resume_step} and --steps is {cfg.steps}: "
                  f"nothing to train, nothing changed (give a larger --steps to train on)")
        return {"step": plan.resume_step, "interrupted": False, "exit_code": 0, "nothing_to_do": True,
                "checkpoint": plan.checkpoint, "run_dir": plan.folder, "world_size": W}

    backend.manual_seed(cfg.seed)                       # the same on every rank: the same init
    if cfg.threads is not None:
        backend.set_blas_threads(cfg.threads)
    model = build_model(cfg.model, block_size=cfg.block_size, **cfg.model_config).to(cfg.device, dtype=cfg.dtype)
    optimizer = make_optimizer(model, cfg)              # before sharding: the one-process parameter order
    sampler = BatchSampler(corpus.train, cfg.batch_size, cfg.block_size, seed=cfg.seed)
    guard = DivergenceGuard(cfg.max_bad_steps)
    if lead:
        start_run(plan)                                 # the first change on disk

    step = 0
    if plan.resume_step is not None:                   # every rank reads the (full) checkpoint
        info = load_checkpoint(plan.checkpoint, model, optimizer)
        step = info["step"]
        sampler.load_state_dict(info["extra"]["sampler"])
        guard.load_state_dict(info["extra"].get("guard", {"skipped": 0, "streak": 0}))
    if lead:
        sharded = "experts sharded, " if any(isinstance(m, MoELayer) for m in model.modules()) else ""
        layout = f", {comm.layout}" if comm is not None and comm.dp_size > 1 else ""
        where = f" on {W} rank{'s' * (W > 1)} ({comm.backend}: {sharded}batch split{layout})" if comm is not None else ""
        resumed = f" | resumed at step {step}" if step else ""
        print(f"{cfg.model}: {model.num_parameters():,} parameters{where} | {corpus} | run dir {plan.folder}{resumed}")
        if plan.resume_step is None:
            with open(os.path.join(plan.folder, "config.json"), "w") as f:
                json.dump({"train": dataclasses.asdict(cfg),
                           "model": dataclasses.asdict(model.config)}, f, indent=1)
    # the precision: a 16-bit model gets float32 master weights (from the float32 weights just
    # built or loaded) and, in fp16, a loss scale; TF32 for float32 matmuls (tinymoe/precision)
    optimizer, precision = get_precision(cfg.precision).apply(model, optimizer)
    if comm is not None:
        ep.setup(model, optimizer, comm)                # shard the experts, broadcast the rest
    run_step = make_step(model, optimizer, grad_clip=cfg.grad_clip, comm=comm, cuda_graph=cfg.cuda_graph,
                         precision=precision)
    if plan.resume_step is not None:
        run_step.load_state_dict(info["extra"].get("step_state", {}))
    if lead and run_step.reason:
        print(f"train: the step runs eagerly: {run_step.reason}")
    scheduler = WarmupCosine(optimizer, min(cfg.warmup_steps, cfg.steps), cfg.steps, cfg.min_lr_ratio,
                             start_step=step)

    def save():
        """The whole model in one file; on W ranks the experts are gathered first (collective)."""
        guard.check()                                   # never save the state of a diverged run
        extra = {"model_name": cfg.model, "sampler": sampler.state_dict(), "guard": guard.state_dict(),
                 "step_state": run_step.state_dict(), "train_config": dataclasses.asdict(cfg)}
        if comm is None:
            with float32_weights(optimizer):            # the masters: resumable in any precision
                save_checkpoint(plan.checkpoint, model, optimizer, step, extra=extra)
            return
        ep.check_in_sync(model, comm)
        with ep.full_experts(model, optimizer, comm):
            if lead:
                save_checkpoint(plan.checkpoint, model, optimizer, step, extra=extra)

    def log(record):
        if lead:
            append_record(plan.log, record)

    first_val = evaluate(model, corpus.val, cfg, comm) if step == 0 else None
    val, val_step = first_val, (0 if first_val is not None else None)
    if first_val is not None:
        log({"step": 0, "val_loss": first_val, "val_bpb": first_val / math.log(2)})
    bar = _progress(cfg, step, lead)
    start, tokens = time.time(), 0
    with StopSignals() as signals:
        try:
            while step < cfg.steps:
                t0 = time.time()
                x, y = sampler()                                          # (B, L): the global batch
                if comm is not None:                                      # (B/W, L): this rank's rows
                    x, y = ep.local_rows(x, comm), ep.local_rows(y, comm)
                result = run_step(x, y)                                   # host ids: the step copies them
                scheduler.step()
                step += 1
                guard.record(step, result.finite)
                tokens += x.size * W
                tok_s = x.size * W / max(time.time() - t0, 1e-9)
                if step % cfg.log_interval == 0 or step == cfg.steps:
                    guard.check()                                         # stops a diverged run
                    record = {"step": step, **ep.step_stats(model, result.loss, comm or SingleProcess()),
                              "lr": scheduler.get_last_lr()[0], "grad_norm": float(result.grad_norm),
                              "skipped_steps": guard.skipped, "tokens_per_s": tok_s,
                              "elapsed_s": time.time() - start}
                    if precision.loss_scale is not None:                  # fp16's loss scale S
                        record["loss_scale"] = float(precision.loss_scale)
                    if step % cfg.eval_interval == 0 or step == cfg.steps:
                        val, val_step = evaluate(model, corpus.val, cfg, comm), step
                        record.update(val_loss=val, val_bpb=val / math.log(2))
                    log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", val=f"{val:.3f}" if val else "-",
                                    tok_s=f"{tok_s:,.0f}")     # at log steps: read from the device then
                if step % cfg.checkpoint_interval == 0:
                    save()
                bar.update(1)
                signum, over = _stop_now(cfg, signals.signum, time.time() - start, comm)
                if signum:
                    signals.signum = signum                               # on every rank: the same exit
                    break
                if over:
                    if lead:
                        print(f"\ntime limit of {cfg.time_limit:.0f} s reached at step {step}")
                    break
        finally:
            bar.close()
        save()
    if signals.signum:
        if lead:
            print(f"\nstopped by signal {signals.signum} at step {step}: saved {plan.checkpoint}; "
                  f"continue with --resume")
        return {"step": step, "interrupted": True, "exit_code": signals.exit_code,
                "checkpoint": plan.checkpoint, "run_dir": plan.folder, "model": model, "world_size": W}

    if val_step != step:
        val = evaluate(model, corpus.val, cfg, comm)
        log({"step": step, "val_loss": val, "val_bpb": val / math.log(2)})
    elapsed = time.time() - start
    summary = {"step": step, "first_val_loss": first_val, "val_loss": val,
               "val_bpb": val / math.log(2), "train_seconds": elapsed,
               "tokens_per_s": tokens / max(elapsed, 1e-9), "checkpoint": plan.checkpoint,
               "run_dir": plan.folder, "sample": None, "interrupted": False, "exit_code": 0,
               "skipped_steps": guard.skipped, "model": model, "world_size": W}
    if not lead:
        return summary
    # on W ranks the model is sharded: rank 0 samples from the full model of the checkpoint
    sampling_model = model if comm is None else load_model(plan.checkpoint, cfg.device)
    sample = decode(sampling_model.generate(prompt_ids(cfg.sample_prompt)[None], cfg.sample_tokens,
                                            temperature=cfg.sample_temperature, top_k=cfg.sample_top_k)[0])
    with open(os.path.join(plan.folder, "sample.txt"), "w") as f:
        f.write(sample)
    if cfg.plots:
        plot_run(plan.log, plan.folder)
    summary["sample"] = sample
    print(f"step {step}: val loss {val:.3f} nats/byte ({val / math.log(2):.3f} bits/byte), "
          f"{elapsed:.0f} s, {summary['tokens_per_s']:,.0f} tokens/s\n--- sample ---\n{sample}")
    return summary


def _stop_now(cfg, signum: int, elapsed: float, comm) -> tuple[int, bool]:
    """(signal to stop for, time limit reached), agreed by every rank: a signal to any rank
    stops all of them (the largest signal number wins), and rank 0's clock decides the time
    limit. One small all-reduce per step on W ranks; nothing to agree on alone."""
    over = cfg.time_limit is not None and elapsed > cfg.time_limit
    if comm is None:
        return signum, over
    flags = np.array([signum, over if comm.rank == 0 else 0], np.float64)
    signum, over = backend.to_numpy(comm.all_reduce(flags, op="max"))
    return int(signum), bool(over)


def _progress(cfg, initial, lead=True):
    if cfg.progress and lead:
        from tqdm import tqdm
        return tqdm(total=cfg.steps, initial=initial, dynamic_ncols=True, desc="train")

    class _Silent:
        def update(self, n): pass
        def set_postfix(self, **values): pass
        def close(self): pass
    return _Silent()
