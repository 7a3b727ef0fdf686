"""Train a small Mamba language model on the default corpus (Python's standard library
source, bytes as tokens) and sample from it with the recurrent step.

    python examples/train_mamba.py                  # a few CPU minutes
    python examples/train_mamba.py --steps 50       # a quick look

Generation runs MambaLM.step: each new token updates per layer a conv state
(B, d_inner, d_conv) and an SSM state (B, d_inner, N), so its cost does not grow with
the length of the text (a transformer's KV cache does).
"""
import argparse
import time

import numpy as np

import tinymoe
from tinymoe.autograd.grad_mode import no_grad
from tinymoe.data import BatchSampler, decode, encode, eval_batches, load_corpus
from tinymoe.models.mamba import MambaConfig, MambaLM
from tinymoe.optim import AdamW, WarmupCosine
from tinymoe.step import make_step

# ---- knobs
D_MODEL = 128
N_LAYER = 4
D_STATE = 16
BLOCK = 128            # training context (the model itself has no maximum length)
BATCH = 16
STEPS = 300
LR = 3e-3
WARMUP = 30
MAX_BYTES = 2_000_000  # of the corpus
SEED = 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--data", default=None, help="a text file (default: the stdlib corpus)")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto",
                   help="replay the step as one CUDA graph on a GPU (docs/cuda_graphs.md)")
    args = p.parse_args()

    tinymoe.manual_seed(SEED)
    corpus = load_corpus(args.data, max_bytes=MAX_BYTES)
    model = MambaLM(MambaConfig(vocab_size=256, d_model=D_MODEL, n_layer=N_LAYER,
                                d_state=D_STATE)).to(args.device)
    print(f"{model.num_parameters() / 1e6:.2f}M parameters; corpus {corpus}")
    opt = AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    schedule = WarmupCosine(opt, min(WARMUP, args.steps), args.steps)
    sample = BatchSampler(corpus.train, BATCH, BLOCK, seed=SEED)
    # forward, backward, clip to norm 1, AdamW: eagerly, or replayed as one CUDA graph
    train_step = make_step(model, opt, grad_clip=1.0, cuda_graph=args.cuda_graph)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = sample()
        result = train_step(x, y)
        schedule.step()
        if step % 25 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {float(result.loss):.3f}  ({time.perf_counter() - start:.0f} s)",
                  flush=True)

    with no_grad():
        val = [model(x, y)[1].item() for x, y in eval_batches(corpus.val, BATCH, BLOCK, 4)]
    print(f"validation loss {np.mean(val):.3f} (bits per byte {np.mean(val) / np.log(2):.2f})")
    ids = model.generate(encode(args.prompt)[None], max_new_tokens=200, temperature=0.8,
                         top_k=40)
    print("---- sample (recurrent mode) ----")
    print(decode(ids[0]))


if __name__ == "__main__":
    main()
