"""Command line: `python -m tinymoe <command> ...` (also installed as `tinymoe`).

    python -m tinymoe train                       # the default MoE GPT on the stdlib corpus (CPU)
    python -m tinymoe train --model gpt --steps 500 --data notes.txt
    python -m tinymoe train --router switch --experts 16 --top-k 1 --capacity-factor 1.0
    python -m tinymoe train --resume               # continue runs/moe-gpt (--overwrite: start over)
    python -m tinymoe generate --checkpoint runs/moe-gpt --prompt "def "
    python -m tinymoe generate --pretrained state-spaces/mamba-130m-hf --prompt "The"

Exit codes: 0 done; 2 a bad option or input (one line on stderr names it); 3 the run
diverged (its last good checkpoint kept); 130 / 143 stopped by SIGINT / SIGTERM after
saving a checkpoint (continue with --resume).
    python -m tinymoe.distributed.launch --nproc 2 -m tinymoe train --expert-parallel
    mpiexec -n 2 python -m tinymoe train --expert-parallel --backend mpi
    python -m tinymoe.distributed.launch --nproc 8 -m tinymoe train --expert-parallel --ep-size 4

Commands live in COMMANDS: name -> (help, add_arguments(parser), run(args)). To add one,
write those two functions and add a line (or call `register`).
"""
from __future__ import annotations

import argparse
import sys

from .profile import cli as profile_cli
from .train_config import MODEL_OPTIONS

# `--quick`: a smoke run in seconds (tests, trying the pipeline)
QUICK = dict(steps=30, batch_size=4, block_size=32, eval_interval=15, eval_batches=2,
             log_interval=5, checkpoint_interval=15, sample_tokens=60, max_corpus_bytes=300_000)
QUICK_MODEL = dict(n_layer=2, d_model=32, n_head=2, d_ff=64)


def _number_or_none(text):
    """A number, or 'none' (a dropless capacity factor, no time limit)."""
    return None if text.lower() in ("none", "dropless") else float(text)


def add_train_arguments(p):
    from .models import MODELS
    from .nn.moe import ROUTERS
    from .train import TrainConfig

    d = TrainConfig()
    m = p.add_argument_group("model (unset options keep the model's defaults)")
    m.argument_default = argparse.SUPPRESS  # absent unless given: "none" (None) stays distinct
    m.add_argument("--model", default=d.model, choices=sorted(MODELS))
    m.add_argument("--router", choices=list(ROUTERS))
    m.add_argument("--experts", type=int, help="number of experts (0: dense FFN)")
    m.add_argument("--top-k", type=int, help="experts per token")
    m.add_argument("--capacity-factor", type=_number_or_none, help="training capacity factor, or none")
    m.add_argument("--eval-capacity-factor", type=_number_or_none)
    m.add_argument("--shared-experts", type=int)
    m.add_argument("--moe-every", type=int, help="1: MoE in every block, 2: every other")
    m.add_argument("--aux-loss-weight", type=float)
    m.add_argument("--z-loss-weight", type=float)
    for name in ("n-layer", "d-model", "n-head", "n-kv-head", "d-ff"):
        m.add_argument(f"--{name}", type=int)
    m.add_argument("--activation", choices=["gelu", "swiglu", "relu"])
    m.add_argument("--dropout", type=float)
    m.add_argument("--recompute", action="store_true",
                   help="keep only each block's input, rerun the block in the backward (dense GPT, mamba)")
    m.add_argument("--recompute-attention", action="store_true",
                   help="keep the softmax's log-normalizer, not the (L, L) probabilities (GPT)")
    t = p.add_argument_group("training (unset options keep TrainConfig's defaults)")
    t.argument_default = argparse.SUPPRESS
    t.add_argument("--data", help="a text file (default: the Python stdlib sources)")
    t.add_argument("--device", choices=["cpu", "cuda"], help=f"default {d.device}")
    t.add_argument("--out-dir", help=f"default {d.out_dir}")
    t.add_argument("--name", help="run folder under --out-dir (default: the model)")
    for name, typ in (("steps", int), ("batch-size", int), ("block-size", int), ("lr", float),
                      ("warmup-steps", int), ("weight-decay", float), ("grad-clip", float),
                      ("eval-interval", int), ("eval-batches", int), ("log-interval", int),
                      ("checkpoint-interval", int), ("seed", int), ("time-limit", _number_or_none),
                      ("threads", int), ("max-bad-steps", int),
                      ("sample-tokens", int)):
        default = getattr(d, name.replace("-", "_"))
        t.add_argument(f"--{name}", type=typ, help=f"default {default}")
    t.add_argument("--resume", action="store_true", default=False,
                   help="continue from the run's checkpoint")
    t.add_argument("--overwrite", action="store_true", default=False,
                   help="delete the run folder's run (checkpoint, log) and start over")
    t.add_argument("--quick", action="store_true", default=False,
                   help="tiny model, few steps (smoke test)")
    t.add_argument("--no-progress", action="store_true", default=False)
    t.add_argument("--dtype", choices=["float32", "float64"], help="default: the model's (float32)")
    t.add_argument("--precision", choices=["fp32", "tf32", "bf16", "fp16"], default=argparse.SUPPRESS,
                   help="fp32 (default); tf32: float32 matmuls on tensor cores; bf16, fp16: a 16-bit "
                        "model with float32 master weights (fp16 with loss scaling); docs/precision.md")
    t.add_argument("--cuda-graph", choices=["auto", "on", "off"],
                   help="replay the training step as one CUDA graph (auto: where the model allows; "
                        "docs/cuda_graphs.md); default auto")
    e = p.add_argument_group("expert parallelism (start the ranks with the launcher or mpiexec)")
    e.add_argument("--expert-parallel", action="store_true", default=False,
                   help="train on every rank: experts sharded, the batch split between the ranks")
    e.add_argument("--backend", choices=["toy", "mpi", "nccl"], default=argparse.SUPPRESS,
                   help="default: from the launcher (toy) or mpiexec (mpi); nccl needs --device cuda")
    e.add_argument("--ep-size", type=int, default=argparse.SUPPRESS,
                   help="ranks per expert-parallel group (the world = ep-size x data-parallel replicas; "
                        "default: all ranks)")


def model_config_for(model: str, options: dict, quick: bool) -> dict:
    """The model options (config field -> value) that the chosen model's config has.
    --quick's sizes apply where they exist; given options the model lacks are dropped
    with a note (e.g. --n-head for mamba, whose config has no heads)."""
    from .models import MODELS

    fields = MODELS[model][1].__dataclass_fields__
    ignored = [k for k in options if k not in fields]
    if ignored:
        print(f"tinymoe train: {', '.join(ignored)} not in the {model} config: ignored", file=sys.stderr)
    chosen = {**QUICK_MODEL, **options} if quick else options
    return {k: v for k, v in chosen.items() if k in fields}


def run_train(args):
    from .train import TrainConfig, train

    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    options = {MODEL_OPTIONS[k]: v for k, v in vars(args).items() if k in MODEL_OPTIONS}
    model_config = model_config_for(args.model, options, args.quick)
    if args.quick:
        fields = {**QUICK, **fields}
    if "warmup_steps" in vars(args) and args.warmup_steps > fields.get("steps", TrainConfig.steps):
        raise ValueError(f"train: --warmup-steps must be <= --steps "
                         f"({fields.get('steps', TrainConfig.steps)}), got {args.warmup_steps}")
    fields["progress"] = not args.no_progress
    summary = train(TrainConfig(model_config=model_config, **fields))
    return summary["exit_code"]     # 0; 130 or 143 when a signal stopped (and saved) the run


def add_generate_arguments(p):
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint file, or the run folder holding it")
    source.add_argument("--pretrained", metavar="PATH_OR_ID",
                        help="a Hugging Face model folder or Hub repo id (docs/pretrained.md)")
    p.add_argument("--prompt", default="class ",
                   help="text to continue; empty: start from a newline (tinymoe.data.START_BYTE)")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=10, help="sample among the k likeliest bytes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix every token")


def run_generate(args):
    from .backend import manual_seed
    from .data import decode, prompt_ids
    from .models import load_model

    for name, value, low in (("max-new-tokens", args.max_new_tokens, 0), ("temperature", args.temperature, 0),
                             ("top-k", args.top_k, 1), ("seed", args.seed, 0)):
        if not value >= low:
            raise ValueError(f"--{name} must be >= {low}, got {value}")
    if args.pretrained:
        return run_generate_pretrained(args)
    model = load_model(args.checkpoint)
    manual_seed(args.seed)
    ids = model.generate(prompt_ids(args.prompt)[None], args.max_new_tokens, args.temperature,
                         args.top_k, use_cache=not args.no_cache)
    print(decode(ids[0]))
    return 0


def run_generate_pretrained(args):
    """generate --pretrained: the model and, where the folder has one, its own tokenizer."""
    from . import data
    from .backend import manual_seed
    from .models.pretrained import from_pretrained, load_tokenizer

    model = from_pretrained(args.pretrained)
    tokenizer = load_tokenizer(args.pretrained)
    if tokenizer is None:
        if model.config.vocab_size != data.VOCAB_SIZE:
            raise ValueError(f"{args.pretrained} has no tokenizer.json, and its vocabulary of "
                             f"{model.config.vocab_size} is not bytes: add the model's tokenizer.json")
        print(f"tinymoe generate: {args.pretrained} has no tokenizer.json; using the byte tokenizer",
              file=sys.stderr)
        encode, decode = data.prompt_ids, data.decode
    else:
        encode, decode = tokenizer.encode, tokenizer.decode
    manual_seed(args.seed)
    ids = model.generate(encode(args.prompt)[None], args.max_new_tokens, args.temperature,
                         args.top_k, use_cache=not args.no_cache)
    print(decode(ids[0]))
    return 0


COMMANDS = {
    "train": ("train a language model", add_train_arguments, run_train),
    "generate": ("sample text from a checkpoint", add_generate_arguments, run_generate),
    "profile": ("count FLOPs, bytes and time of one training step, per op and module",
                profile_cli.add_arguments, profile_cli.run),
}


def register(name, help, add_arguments, run):
    """Add a subcommand (e.g. `profile`)."""
    COMMANDS[name] = (help, add_arguments, run)


def build_parser():
    parser = argparse.ArgumentParser(prog="tinymoe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (help, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .step import DivergenceError

    try:
        return COMMANDS[args.command][2](args)
    except DivergenceError as err:                  # the run stopped; its last checkpoint is kept
        _error(args.command, err)
        return 3
    except (ValueError, TypeError, RuntimeError, OSError) as err:
        _error(args.command, err)
        return 2


def _error(command: str, err: Exception) -> None:
    """One line on stderr: 'tinymoe train: error: --batch-size must be >= 1, got 0'."""
    text = str(err).removeprefix(f"{command}: ")
    print(f"tinymoe {command}: error: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
