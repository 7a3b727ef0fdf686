"""Decoding speed: tinymoe's recurrent Mamba step vs transformers' MambaForCausalLM.generate.

    python benchmarks/bench_decode.py                        # GPU, mamba-130m sizes, batch 1, 16
    python benchmarks/bench_decode.py --device cpu --small   # a tiny model, to check it runs

One run, one device, float32, the same random weights on both sides: tinymoe builds the model
(mamba-130m's configuration: 24 layers, d_model 768, vocab 50280), writes it with
save_pretrained, and transformers loads that folder (its PyTorch path: without the mamba_ssm
and causal_conv1d packages it runs the reference scan and a per-token step). Both decode
greedily from the same random prompt, with every new token's logits brought to the host to
pick the next (tinymoe's generate; transformers' greedy search does its argmax on the device).

Decoding tokens/s = batch * (N - 1) / (t(N) - t(1)), with t(n) the median time of a generate
call that makes n new tokens: the prompt's cost cancels, and what is left is the per-token
steps (tinymoe reads the prompt token by token, transformers in one parallel pass).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")      # everything is local: no hub kernels, no lookups
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import tinymoe  # noqa: E402
from tinymoe.models import build_model  # noqa: E402

# ---- knobs
MAMBA_130M = dict(vocab_size=50280, d_model=768, n_layer=24, d_state=16, d_conv=4, expand=2,
                  dt_rank=48)
SMALL = dict(vocab_size=256, d_model=64, n_layer=2, d_state=8, d_conv=4, expand=2)
PROMPT = 16                     # prompt tokens
NEW = 128                       # new tokens per generate call (--small: 16)
BATCHES = (1, 16)
REPEATS = 3


def median_seconds(fn, n, sync, repeats):
    fn(n)                                                     # warm-up: kernels, allocator
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(n)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_rate(fn, batch, new, sync, repeats):
    """Tokens per second of the steps alone: batch (new - 1) / (t(new) - t(1))."""
    t_new, t_one = median_seconds(fn, new, sync, repeats), median_seconds(fn, 1, sync, repeats)
    return batch * (new - 1) / (t_new - t_one), t_new


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--small", action="store_true", help="a tiny model and 16 new tokens")
    p.add_argument("--new-tokens", type=int, default=None, help=f"default {NEW} (--small: 16)")
    p.add_argument("--repeats", type=int, default=REPEATS)
    args = p.parse_args()
    import torch
    import transformers
    transformers.logging.set_verbosity_error()

    cfg = SMALL if args.small else MAMBA_130M
    new = args.new_tokens or (16 if args.small else NEW)
    tinymoe.manual_seed(0)
    ours = build_model("mamba", **cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        theirs = transformers.MambaForCausalLM.from_pretrained(folder).to(args.device).eval()
    ours.to(args.device)
    if args.device == "cuda":
        sync, name = torch.cuda.synchronize, torch.cuda.get_device_name()
        tinymoe_sync = lambda: (tinymoe.backend.synchronize("cuda"), sync())  # noqa: E731
    else:
        sync = tinymoe_sync = lambda: None  # noqa: E731
        name = "CPU"
    print(f"{name}; tinymoe {ours.num_parameters() / 1e6:.1f} M parameters {cfg}; float32; "
          f"torch {torch.__version__}, transformers {transformers.__version__}; prompt {PROMPT}, "
          f"{new} new tokens, greedy; median of {args.repeats}")

    rng = np.random.default_rng(0)
    rows = []
    for batch in BATCHES:
        ids = rng.integers(0, cfg["vocab_size"], (batch, PROMPT))
        ids_t = torch.tensor(ids, device=args.device)
        with torch.no_grad():
            reference = theirs(ids_t).logits.float().cpu().numpy()
        diff = np.abs(tinymoe.backend.to_numpy(ours(ids)[0].data) - reference).max()

        def ours_generate(n):
            return ours.generate(ids, n, temperature=0)

        def theirs_generate(n):
            with torch.no_grad():
                return theirs.generate(ids_t, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       pad_token_id=0)
        ours_rate, ours_t = decode_rate(ours_generate, batch, new, tinymoe_sync, args.repeats)
        theirs_rate, theirs_t = decode_rate(theirs_generate, batch, new, sync, args.repeats)
        a, b = ours_generate(new)[:, PROMPT:], theirs_generate(new).cpu().numpy()[:, PROMPT:]
        same = int((np.cumprod(a == b, axis=1)).sum(axis=1).min())    # tokens equal until a split
        rows.append((batch, ours_rate, theirs_rate, ours_t, theirs_t, diff, same))

    print(f"\n| batch | tinymoe tokens/s | transformers tokens/s | tinymoe / transformers "
          f"| generate({new}) s, tinymoe / transformers | prompt logits max diff | greedy tokens equal |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch, ours_rate, theirs_rate, ours_t, theirs_t, diff, same in rows:
        print(f"| {batch} | {ours_rate:,.0f} | {theirs_rate:,.0f} | {ours_rate / theirs_rate:.2f}x "
              f"| {ours_t:.3f} / {theirs_t:.3f} | {diff:.1e} | {same} of {new} |")


if __name__ == "__main__":
    main()
