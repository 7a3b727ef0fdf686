"""Counting what the lectures count: parameters, FLOPs, memory, compute-optimal training.

Pure functions of model shapes (no arrays): see arithmetic.py (parameters and FLOPs
per token, 6ND, T5 vs Switch), chinchilla.py (20 tokens per parameter, GPU-years,
the loss fit and GPT-3's waste), memory.py (model states, ZeRO, activations, KV cache).
"""
from .arithmetic import (
    FlopCount, MambaShape, ParamCount, T5Shape, TransformerShape, mamba_flops_per_token,
    mamba_params, switch_table, t5_flops_per_sequence, t5_params, training_flops,
    transformer_flops_per_token, transformer_params,
)
from .chinchilla import (
    CHINCHILLA, LossFit, gpu_seconds, gpu_years, optimal_params_for_compute, optimal_tokens,
    params_for_loss, waste_factor,
)
from .memory import (
    FP32_ADAM, FP32_SGD, FP32_SGD_MOMENTUM, MIXED_PRECISION_ADAM, StateLayout, kv_cache_bytes,
    layout_for, mamba_state_bytes, measured_state_bytes, model_state_bytes,
    transformer_activation_bytes,
)
