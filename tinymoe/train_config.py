"""TrainConfig: every knob of a training run, and its validation.

`validate_config(cfg, world_size)` checks the whole run (training and model options) before
anything is created or changed on disk, and names the command-line flag in each error:

    train: --batch-size must be >= 1, got 0
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


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
    warmup_steps: int = 50            # min(warmup_steps, steps) are warmup (the CLI refuses a
                                      # --warmup-steps given larger than --steps)
    weight_decay: float = 0.1
    grad_clip: float = 1.0            # 0: no clipping
    eval_interval: int = 200
    eval_batches: int = 8
    log_interval: int = 10
    checkpoint_interval: int = 200
    max_bad_steps: int = 5            # stop after this many non-finite steps in a row
    time_limit: float | None = 540.0  # seconds; stop (and save) when exceeded
    sample_prompt: str = "class "
    sample_tokens: int = 400
    sample_temperature: float = 1.0   # lower temperatures get stuck in runs of indentation
    sample_top_k: int | None = 10
    resume: bool = False              # continue the run in the run folder
    overwrite: bool = False           # start over, deleting the run folder's run
    expert_parallel: bool = False     # train on all ranks: experts sharded, batch split (data parallel)
    ep_size: int | None = None        # ranks per expert-parallel group (W = ep_size x dp_size); None: all
    backend: str | None = None        # toy | mpi | nccl; None: from the launcher (one process if none)
    dtype: str | None = None          # None: the model's own (float32); "float64" for exact checks
    precision: str = "fp32"           # fp32 | tf32 | bf16 | fp16 (tinymoe/precision, docs/precision.md)
    cuda_graph: str = "auto"          # auto | on | off: replay the step as a CUDA graph (tinymoe/step)
    max_corpus_bytes: int = 16_000_000
    progress: bool = True             # tqdm bar
    plots: bool = True


# the train command's options that become fields of the model config (argparse dest -> field)
MODEL_OPTIONS = {
    "n_layer": "n_layer", "d_model": "d_model", "n_head": "n_head", "n_kv_head": "n_kv_head",
    "d_ff": "d_ff", "activation": "activation", "dropout": "dropout", "experts": "num_experts",
    "top_k": "top_k", "router": "router", "moe_every": "moe_every",
    "capacity_factor": "capacity_factor", "eval_capacity_factor": "eval_capacity_factor",
    "shared_experts": "num_shared_experts", "aux_loss_weight": "aux_loss_weight",
    "z_loss_weight": "z_loss_weight", "recompute": "recompute",
    "recompute_attention": "recompute_attention",
}
_FLAG_OF_FIELD = {field: dest for dest, field in MODEL_OPTIONS.items()}


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig or model config field (num_experts -> --experts)."""
    return "--" + _FLAG_OF_FIELD.get(name, name).replace("_", "-")


def _need(ok: bool, name: str, rule: str, value) -> None:
    if not ok:
        raise ValueError(f"train: {flag(name)} must be {rule}, got {value!r}")


def validate_config(cfg: TrainConfig, world_size: int = 1) -> None:
    """Raise a ValueError naming the flag for the first option out of range."""
    at_least = {"steps": 1, "batch_size": 1, "block_size": 1, "eval_interval": 1, "eval_batches": 1,
                "log_interval": 1, "checkpoint_interval": 1, "max_bad_steps": 1, "sample_tokens": 0,
                "warmup_steps": 0, "max_corpus_bytes": 1, "seed": 0}
    for name, low in at_least.items():
        value = getattr(cfg, name)
        _need(isinstance(value, int) and value >= low, name, f"an integer >= {low}", value)
    for name in ("lr", "weight_decay", "grad_clip", "sample_temperature"):
        value = getattr(cfg, name)
        _need(math.isfinite(value) and value >= 0, name, "a finite number >= 0", value)
    _need(cfg.lr > 0, "lr", "> 0", cfg.lr)
    _need(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]", cfg.min_lr_ratio)
    _need(cfg.threads is None or cfg.threads >= 1, "threads", ">= 1", cfg.threads)
    _need(cfg.time_limit is None or cfg.time_limit >= 0, "time_limit", ">= 0 seconds (or none)", cfg.time_limit)
    _need(cfg.sample_top_k is None or cfg.sample_top_k >= 1, "sample_top_k", ">= 1", cfg.sample_top_k)
    _need(cfg.precision in ("fp32", "tf32", "bf16", "fp16"), "precision",
          "one of fp32, tf32, bf16, fp16", cfg.precision)
    if cfg.precision in ("bf16", "fp16") and cfg.dtype not in (None, "float32"):
        raise ValueError(f"train: --precision {cfg.precision} trains a 16-bit model with float32 "
                         f"master weights; --dtype {cfg.dtype} asks for another: give one of them")
    if cfg.precision in ("bf16", "fp16") and cfg.expert_parallel:
        raise ValueError(f"train: --precision {cfg.precision} with --expert-parallel is not "
                         f"supported yet (the experts' master weights are not sharded); use fp32 "
                         f"or tf32 there")
    _need(cfg.ep_size is None or (isinstance(cfg.ep_size, int) and cfg.ep_size >= 1), "ep_size",
          "an integer >= 1 (or none: every rank)", cfg.ep_size)
    _need(cfg.cuda_graph in ("auto", "on", "off"), "cuda_graph", "one of auto, on, off", cfg.cuda_graph)
    if cfg.cuda_graph == "on" and (cfg.device != "cuda" or cfg.expert_parallel):
        raise ValueError("train: --cuda-graph on records the step of one process on a GPU: it needs "
                         "--device cuda and no --expert-parallel (auto captures where it can)")
    if cfg.resume and cfg.overwrite:
        raise ValueError("train: --resume continues the run, --overwrite deletes it: give one of them")
    if cfg.name is not None and (not cfg.name or cfg.name in (".", "..") or "/" in cfg.name):
        raise ValueError(f"train: --name must be a folder name (no '/'), got {cfg.name!r}")
    if cfg.expert_parallel and cfg.batch_size % world_size:
        raise ValueError(f"train: --batch-size {cfg.batch_size} cannot be split evenly over {world_size} "
                         f"ranks; use a multiple of {world_size}")
    validate_model_config(cfg.model, {**cfg.model_config, "block_size": cfg.block_size},
                          (cfg.ep_size or world_size) if cfg.expert_parallel else 1)   # the experts' ranks


def validate_model_config(model: str, options: dict, world_size: int = 1) -> None:
    """The model options a user can give: sizes >= 1, fractions in range, experts split evenly
    (world_size: the ranks the experts spread over, an expert-parallel group of the mesh)."""
    from .models import MODELS

    if model not in MODELS:
        raise ValueError(f"train: --model must be one of {', '.join(sorted(MODELS))}, got {model!r}")
    config_cls, defaults = MODELS[model][1], MODELS[model][2]
    known = config_cls.__dataclass_fields__
    c = {k: f.default for k, f in known.items() if not callable(f.default)}
    c.update(defaults)
    c.update({k: v for k, v in options.items() if k in known})
    for name in ("n_layer", "d_model", "n_head", "d_ff", "top_k", "moe_every", "d_state", "d_conv",
                 "expand", "block_size"):
        if name in c:
            _need(isinstance(c[name], int) and c[name] >= 1, name, "an integer >= 1", c[name])
    for name in ("num_experts", "num_shared_experts", "attn_every"):
        if name in c:
            _need(isinstance(c[name], int) and c[name] >= 0, name, "an integer >= 0", c[name])
    if c.get("n_kv_head") is not None:
        _need(c["n_kv_head"] >= 1 and c["n_head"] % c["n_kv_head"] == 0, "n_kv_head",
              f"a divisor of --n-head ({c['n_head']})", c["n_kv_head"])
    if "n_head" in c and "d_model" in c:
        _need(c["d_model"] % c["n_head"] == 0, "d_model", f"a multiple of --n-head ({c['n_head']})", c["d_model"])
    if "dropout" in c:
        _need(0 <= c["dropout"] < 1, "dropout", "in [0, 1)", c["dropout"])
    for name in ("capacity_factor", "eval_capacity_factor"):
        if c.get(name) is not None:
            _need(math.isfinite(c[name]) and c[name] > 0, name, "a finite number > 0 (or none: dropless)", c[name])
    for name in ("aux_loss_weight", "z_loss_weight"):
        if name in c:
            _need(math.isfinite(c[name]) and c[name] >= 0, name, "a finite number >= 0", c[name])
    experts = c.get("num_experts", 0)
    if experts and "top_k" in c:
        _need(c["top_k"] <= experts, "top_k", f"<= --experts ({experts})", c["top_k"])
    if experts and world_size > 1:
        _need(experts % world_size == 0, "num_experts",
              f"a multiple of the {world_size} ranks of an expert-parallel group (each rank holds experts/ranks "
              "experts)", experts)
