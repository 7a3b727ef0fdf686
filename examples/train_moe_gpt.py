"""The main job as a script: train a small MoE GPT on the Python standard library (CPU).

    python examples/train_moe_gpt.py            # the same run as `python -m tinymoe train`
    python examples/train_moe_gpt.py --quick    # a 30-step smoke run

Expert + data parallel (the experts spread over the ranks, the batch split between them):

    python -m tinymoe.distributed.launch --nproc 4 examples/train_moe_gpt.py --expert-parallel
    mpiexec -n 2 python examples/train_moe_gpt.py --expert-parallel --backend mpi
    python -m tinymoe.distributed.launch --nproc 2 examples/train_moe_gpt.py --expert-parallel --backend nccl

Every knob is below; change one, run again with --overwrite (or a new TRAIN name, to keep both
runs), compare runs/<name>/loss.png. --resume continues the run; SIGTERM or Ctrl-C saves a
checkpoint and exits 143 or 130, as `python -m tinymoe train` does.
"""
import argparse

from tinymoe.train import TrainConfig, train

# ---- model: a 4-block GPT whose FFNs are MoE layers of 8 experts, 2 active per token
MODEL = dict(
    n_layer=4, d_model=128, n_head=4, n_kv_head=None,   # attention: MHA (n_kv_head=1: MQA)
    num_experts=8, top_k=2, d_ff=256,                   # each expert: 128 -> 256 -> 128
    router="topk",                                      # dense | topk | switch | gshard | noisy-topk | expert-choice | base
    capacity_factor=1.25, eval_capacity_factor=None,    # None = dropless
    num_shared_experts=0, moe_every=1,
    aux_loss_weight=1e-2, z_loss_weight=1e-3,
    activation="gelu",
)
# ---- training: the defaults of TrainConfig, spelled out
TRAIN = dict(
    model="moe-gpt", data=None,                         # None = the Python stdlib sources
    steps=TrainConfig.steps, batch_size=TrainConfig.batch_size,
    block_size=TrainConfig.block_size, lr=TrainConfig.lr,
    warmup_steps=TrainConfig.warmup_steps, weight_decay=TrainConfig.weight_decay,
    grad_clip=TrainConfig.grad_clip, eval_interval=TrainConfig.eval_interval,
    checkpoint_interval=TrainConfig.checkpoint_interval, seed=0,
    time_limit=TrainConfig.time_limit, name="moe-gpt-example",
)
QUICK = dict(steps=30, batch_size=4, block_size=32, eval_interval=15, eval_batches=2,
             sample_tokens=60, max_corpus_bytes=300_000)

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps")
    p.add_argument("--expert-parallel", action="store_true", help="train on every rank of the launch")
    p.add_argument("--backend", choices=["toy", "mpi", "nccl"], default=None,
                   help="default: from the launcher (toy) or mpiexec (mpi); nccl trains on the GPUs")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cpu, or cuda with --backend nccl")
    p.add_argument("--resume", action="store_true", help="continue runs/moe-gpt-example/ from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete runs/moe-gpt-example/'s run and start over")
    p.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto",
                   help="replay the step as one CUDA graph where the model allows (docs/cuda_graphs.md)")
    args = p.parse_args()
    model = dict(MODEL, n_layer=2, d_model=32, n_head=2, d_ff=64) if args.quick else MODEL
    run = {**TRAIN, **(QUICK if args.quick else {})}
    if args.steps is not None:
        run["steps"] = args.steps
    run["device"] = args.device or ("cuda" if args.backend == "nccl" else "cpu")
    run.update(resume=args.resume, overwrite=args.overwrite, cuda_graph=args.cuda_graph)
    if args.expert_parallel:   # E = 8 experts: 1, 2, 4 or 8 ranks
        run.update(expert_parallel=True, backend=args.backend)
    raise SystemExit(train(TrainConfig(**run, model_config=model))["exit_code"])
