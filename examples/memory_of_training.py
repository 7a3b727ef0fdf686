"""Memory of training, from the lecture's formulas to a measured tinymoe step.

    python examples/memory_of_training.py [--device cuda]

1. model states per parameter: mixed-precision Adam (2 + 2 + 12 = 16 bytes), ZeRO
   stages for a 7.5B model on 64 GPUs (ZeRO's Figure 1);
2. activations per layer as the sequence grows (Korthikanti et al.: s b h (34 + 5 a s / h));
3. the KV cache of generation, MHA vs GQA vs MQA, and Mamba's constant state;
4. tinymoe's own GPT: the estimate beside the peak that tracemalloc measures;
5. recomputation: the same step keeping the softmax's log-normalizer instead of the
   attention probabilities (selective), and with every block recomputed in the backward
   (full, tinymoe.nn.recompute): the memory each saves and the time it costs, side by side;
6. mixed precision: the bytes per parameter of a real --precision fp32 and bf16 run,
   counted from the arrays' dtypes, next to the lecture's 4 + 4 + 8 and 2 + 2 + 12.
Change the knobs below and run again.
"""
import argparse
import time

import numpy as np

from tinymoe.accounting import (
    MIXED_PRECISION_ADAM, kv_cache_bytes, mamba_state_bytes, model_state_bytes,
    transformer_activation_bytes,
)
from tinymoe.accounting.memory import (
    gpt_activation_bytes, gpt_training_step_bytes, layout_for, measured_state_bytes,
)
from tinymoe.backend import synchronize
from tinymoe.models import build_model
from tinymoe.optim import AdamW
from tinymoe.precision import get_precision
from tinymoe.step import make_step
from tinymoe.profile.memory import track_memory

PSI, GPUS = 7.5e9, 64                               # ZeRO's example
GPT3_LAYER = dict(d_model=12288, n_heads=96)        # one GPT-3 175B layer
SMALL_GPT = dict(vocab_size=256, n_layer=4, n_head=4, d_model=128, d_ff=512)
BATCH, SEQ = 8, 128
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where parts 4 and 5 train (memory: tracemalloc / CuPy's pool)")
DEVICE = parser.parse_args().device

print("1. model states, 7.5B parameters, mixed-precision Adam, 64 data-parallel GPUs")
for stage, name in enumerate(["baseline", "ZeRO-1 (P_os)", "ZeRO-2 (P_os+g)", "ZeRO-3 (P_os+g+p)"]):
    gb = model_state_bytes(PSI, MIXED_PRECISION_ADAM, stage, GPUS) / 1e9
    print(f"   {name:<20} {gb:8.1f} GB per GPU")

print("\n2. activations of one GPT-3 layer (16-bit), batch 1")
for s in (512, 2048, 8192):
    full = transformer_activation_bytes(s, 1, **GPT3_LAYER) / 2**30
    sel = transformer_activation_bytes(s, 1, **GPT3_LAYER, recompute="selective") / 2**30
    print(f"   L={s:>5}: {full:7.2f} GiB, with selective recomputation {sel:6.2f} GiB")

print("\n3. generation state for 32 layers, 32 heads of 128, fp16, 4096 tokens")
for name, kv in (("MHA", 32), ("GQA-8", 8), ("MQA", 1)):
    print(f"   KV cache {name:<6} {kv_cache_bytes(32, kv, 128, 4096) / 2**30:6.2f} GiB")
print(f"   Mamba state (d_inner 8192, N 16), any length: "
      f"{mamba_state_bytes(32, 8192, 16, 4) / 2**20:.1f} MiB")

print(f"\n4. tinymoe GPT {SMALL_GPT}, batch {BATCH} x {SEQ}, AdamW, float32 ({DEVICE})")
with track_memory(DEVICE) as mem:
    model = build_model("gpt", block_size=SEQ, **SMALL_GPT).to(DEVICE)
    train_step = make_step(model, AdamW(model.parameters(), lr=1e-3), grad_clip=1.0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, SMALL_GPT["vocab_size"], (BATCH, SEQ))
    for step in range(3):
        if step == 2:
            mem.reset_peak()                         # measure the third step only
        train_step(ids, ids)
    synchronize(DEVICE)
    peak = mem.peak
est = gpt_training_step_bytes(model, BATCH, SEQ, "fp32", DEVICE)
act = gpt_activation_bytes(model.config, BATCH, SEQ, "fp32", DEVICE)
for k, v in est.items():
    print(f"   {k:<12} {v / 1e6:8.2f} MB")
print(f"   measured peak {peak / 1e6:6.2f} MB   (estimate / measured = {est['total'] / peak:.3f})")
print(f"   of the activations, attention scores B H L^2: "
      f"{model.config.n_layer * act['attention_scores_per_layer'] / act['total']:.0%}")


print("\n5. recomputation: selective (the attention probabilities) and full (whole blocks)")
for name, flags in (("stored", {}), ("selective", {"recompute_attention": True}),
                    ("full", {"recompute": True})):
    model = build_model("gpt", block_size=SEQ, **flags, **SMALL_GPT).to(DEVICE)
    opt = AdamW(model.parameters(), lr=1e-3)
    with track_memory(DEVICE) as mem:
        for step in range(3):
            if step == 2:
                mem.reset_peak()                     # the third step, timed
                start = time.perf_counter()
            opt.zero_grad()
            before = mem.current
            _, loss = model(ids, ids)
            kept = mem.current - before              # what the forward leaves for the backward
            loss.backward()
            opt.step()
        synchronize(DEVICE)                          # a GPU runs the step asynchronously
        seconds = time.perf_counter() - start
    print(f"   {name:<9}  kept after forward {kept / 1e6:6.2f} MB   "
          f"step peak {mem.peak / 1e6:6.2f} MB   step {seconds * 1e3:6.0f} ms")


print("\n6. mixed precision: model states per parameter, from the arrays' dtypes (after a backward)")
for name in ("fp32", "bf16"):
    model = build_model("gpt", block_size=SEQ, **SMALL_GPT).to(DEVICE)
    opt, precision = get_precision(name).apply(model, AdamW(model.parameters(), lr=1e-3))
    make_step(model, opt, grad_clip=1.0, precision=precision)(ids, ids)   # the moments exist now
    model.zero_grad()
    precision.scale(model(ids, ids)[1]).backward()     # the 16-bit gradients, before the update
    n = model.num_parameters()
    got = {k: v / n for k, v in measured_state_bytes(model, opt).items()}
    want = layout_for(name)
    print(f"   {name}: params {got['params']:.2f} + grads {got['grads']:.2f} + optimizer "
          f"{got['optimizer']:.2f} = {sum(got.values()):.2f} bytes/parameter   (lecture: "
          f"{want.params:g} + {want.grads:g} + {want.optimizer:g} = {want.total:g})")
