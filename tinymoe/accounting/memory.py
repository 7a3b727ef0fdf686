"""Memory of training and generation, in bytes.

Training holds four things (Rajbhandari et al. 2020, "ZeRO", Section 3):
- model states: parameters, gradients and optimizer states, per parameter;
- activations saved by the forward for the backward, per layer, growing with
  batch x sequence (and with sequence^2 for the attention matrix);
- temporary buffers, and fragmentation.
Generation holds the parameters and the KV cache.

Per-parameter layouts:
- mixed-precision Adam (ZeRO's analysis): fp16 parameters (2) + fp16 gradients (2)
  + fp32 master parameters, momentum and variance (4 + 4 + 4 = K = 12): 16 bytes;
  tinymoe's --precision bf16 / fp16 (tinymoe/precision, optim/master.py) is this layout;
- tinymoe --precision fp32 / tf32: parameters (4) + gradients (4) + AdamW m, v (8).
`layout_for(precision)` picks one; `measured_state_bytes(model, optimizer)` counts what the
arrays of a real run occupy, by their real dtypes.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StateLayout:
    """Bytes per parameter of each model state."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


MIXED_PRECISION_ADAM = StateLayout(params=2, grads=2, optimizer=12)
FP32_ADAM = StateLayout(params=4, grads=4, optimizer=8)     # tinymoe AdamW
FP32_SGD_MOMENTUM = StateLayout(params=4, grads=4, optimizer=4)
FP32_SGD = StateLayout(params=4, grads=4, optimizer=0)


def layout_for(precision: str) -> StateLayout:
    """AdamW's bytes per parameter in a tinymoe precision (fp32, tf32, bf16, fp16)."""
    layouts = {"fp32": FP32_ADAM, "tf32": FP32_ADAM, "bf16": MIXED_PRECISION_ADAM,
               "fp16": MIXED_PRECISION_ADAM}
    if precision not in layouts:
        raise ValueError(f"layout_for: precision must be one of {', '.join(layouts)}, got {precision!r}")
    return layouts[precision]


def measured_state_bytes(model, optimizer) -> dict:
    """Bytes the model states occupy now, from the arrays: the model's parameters and
    gradients, and the optimizer's own arrays (its state: moments; with MasterWeights also
    the float32 masters). Each counted by its dtype's itemsize (bfloat16: 2)."""
    params = list(model.parameters())
    inner = getattr(optimizer, "optimizer", optimizer)          # MasterWeights wraps one
    own = {id(p) for p in params}
    masters = [p for g in inner.param_groups for p in g["params"] if id(p) not in own]
    state = [v for st in inner.state.values() for v in st.values() if hasattr(v, "nbytes")]
    return {
        "params": sum(int(p.data.nbytes) for p in params),
        "grads": sum(int(p.grad.nbytes) for p in params if p.grad is not None),
        "optimizer": sum(int(m.data.nbytes) for m in masters) + sum(int(v.nbytes) for v in state),
    }


def model_state_bytes(n_params: float, layout: StateLayout = MIXED_PRECISION_ADAM,
                      zero_stage: int = 0, data_parallel: int = 1) -> float:
    """Bytes of model states on one GPU, with ZeRO partitioning over `data_parallel` GPUs.

    stage 0 (plain data parallel): (2 + 2 + K) Psi
    stage 1 (P_os, optimizer states split):   2 Psi + 2 Psi + K Psi / N_d
    stage 2 (P_os+g, + gradients split):      2 Psi + (2 + K) Psi / N_d
    stage 3 (P_os+g+p, + parameters split):   (2 + 2 + K) Psi / N_d
    ZeRO's Figure 1: Psi = 7.5B, N_d = 64 gives 120, 31.4, 16.6 and 1.9 GB.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"model_state_bytes: zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if data_parallel < 1:
        raise ValueError(f"model_state_bytes: data_parallel must be >= 1, got {data_parallel}")
    split = [0.0, 0.0, 0.0]                 # which of (params, grads, optimizer) are split
    for i in range(zero_stage):
        split[2 - i] = 1.0
    parts = (layout.params, layout.grads, layout.optimizer)
    per_param = sum(b / data_parallel if s else b for b, s in zip(parts, split))
    return n_params * per_param


def transformer_activation_bytes(seq_len: int, batch: int, d_model: int, n_heads: int,
                                 recompute: str = "none") -> float:
    """Activations of one transformer layer in 16-bit training (Korthikanti et al. 2022,
    "Reducing Activation Recomputation", Eq. 1): s b h (34 + 5 a s / h) bytes.

    34 s b h: the inputs of the linear layers, norms, GeLU and dropout masks;
    5 a s^2 b: the attention scores, softmax output (2 bytes each) and dropout mask
    (1 byte) -- the O(L^2) term FlashAttention removes.
    recompute="selective" drops the 5 a s / h term (recomputed in the backward);
    recompute="full" keeps only the layer input: 2 s b h.
    """
    s, b, h, a = seq_len, batch, d_model, n_heads
    if recompute == "none":
        return s * b * h * (34 + 5 * a * s / h)
    if recompute == "selective":
        return 34.0 * s * b * h
    if recompute == "full":
        return 2.0 * s * b * h
    raise ValueError(f"transformer_activation_bytes: recompute must be 'none', 'selective' "
                     f"or 'full', got {recompute!r}")


def kv_cache_bytes(n_layers: int, n_kv_heads: int, d_head: int, seq_len: int, batch: int = 1,
                   bytes_per_value: int = 2) -> float:
    """Keys and values of every past token in every layer: 2 * layers * kv_heads * d_head
    * seq_len * batch values. MQA (1 kv head) and GQA shrink it by n_heads / n_kv_heads."""
    return 2.0 * n_layers * n_kv_heads * d_head * seq_len * batch * bytes_per_value


def mamba_state_bytes(n_layers: int, d_inner: int, d_state: int, d_conv: int,
                      batch: int = 1, bytes_per_value: int = 2) -> float:
    """What Mamba carries between generated tokens: the SSM state (d_inner, N) and the
    last d_conv - 1 inputs of the convolution, per layer; independent of the length."""
    return float(n_layers * batch * d_inner * (d_state + d_conv - 1) * bytes_per_value)


def tinymoe_gpt_activation_bytes(config, batch: int, seq_len: int, bytes_per_value: int = 4,
                                device: str = "cpu") -> dict:
    """Activations a training step of tinymoe's dense GPT keeps for the backward, in bytes.

    `config` is a `tinymoe.models.GPTConfig` (any object with its fields). Counted from
    what the ops keep: every op's input Tensors (the graph holds them) and its saved
    arrays. With T = batch * seq_len tokens, per block:
      residual input x, LayerNorm xhat and output (x2)               3 T d
      qkv projection (H + 2 Hkv) d_head                              T w_qkv
      attention probabilities P (the O(L^2) term)                    B H L^2
        (recompute_attention: the softmax's log-normalizer instead       B H L)
      attention output, its head-merged copy, projection output      3 T d
      residual sum, LayerNorm xhat and output                        3 T d
      MLP: fc1 output and GELU output (SwiGLU: fc1, sigmoid, silu,
      fc3, product)                                                  2 T f  (5 T f)
      fc2 output                                                     T d
      LayerNorm 1 / rstd (x2)                                        2 T
    plus the embeddings (token lookup T d, positions L d), the last residual, final
    LayerNorm (2 T d), logits and log-probabilities (2 T V).

    device="cuda" counts the fused GPU LayerNorm (tinymoe/kernels/norm.py): it keeps the
    per-row mean and rstd (2 T) instead of xhat and rstd (T d + T), and reads x, which
    the graph holds anyway.
    """
    c = config
    if getattr(c, "num_experts", 0):
        raise ValueError("tinymoe_gpt_activation_bytes: MoE layers are not modeled; "
                         f"got num_experts={c.num_experts} (use a dense config)")
    if c.activation not in ("gelu", "swiglu"):
        raise ValueError(f"tinymoe_gpt_activation_bytes: activation must be 'gelu' or "
                         f"'swiglu', got {c.activation!r}")
    B, L, d, f, V = batch, seq_len, c.d_model, c.d_ff, c.vocab_size
    T = B * L
    H = c.n_head
    Hkv = H if c.n_kv_head is None else c.n_kv_head
    w_qkv = (H + 2 * Hkv) * (d // H)
    mlp = (5 if c.activation == "swiglu" else 2) * T * f
    dropout = 2 * 2 * T * d if c.dropout > 0 else 0          # mask scale + output, 2 sites
    scores = B * H * L if getattr(c, "recompute_attention", False) else B * H * L * L
    fused_norm = str(device).startswith("cuda")
    norm_saved = 2 * T if fused_norm else T * d + T    # one LayerNorm: (mean, rstd) or (xhat, rstd)
    per_layer = 8 * T * d + 2 * norm_saved + T * w_qkv + scores + mlp + dropout
    head = T * d + L * d + T * d + T * d + (2 * T if fused_norm else T * d) + 2 * T * V
    return {
        "per_layer": per_layer * bytes_per_value,
        "attention_scores_per_layer": scores * bytes_per_value,
        "layers": c.n_layer * per_layer * bytes_per_value,
        "embeddings_and_head": head * bytes_per_value,
        "total": (c.n_layer * per_layer + head) * bytes_per_value,
    }


def training_step_bytes(n_params: int, activation_bytes: float,
                        layout: StateLayout = FP32_ADAM) -> dict:
    """Peak memory of one training step, estimated as model states + activations."""
    parts = {
        "params": n_params * layout.params,
        "grads": n_params * layout.grads,
        "optimizer": n_params * layout.optimizer,
        "activations": activation_bytes,
    }
    parts["total"] = sum(parts.values())
    return parts


def rough_training_step_bytes(model, batch: int, seq_len: int, bytes_per_value: int = 4) -> float:
    """An estimate of one training step's peak memory for ANY tinymoe language model, to refuse
    a run that cannot fit before it starts (`profile`). The dense GPT uses the exact count
    above; other models: 16 bytes per parameter (weights, gradients, Adam's two moments) plus
    about 24 saved values per token and channel per layer, the (L, L) attention scores of
    every attention layer, and the logits with their log-probabilities (2 T V)."""
    c, n_params = model.config, model.num_parameters()
    if getattr(c, "num_experts", 1) == 0 and hasattr(c, "n_head") and c.activation in ("gelu", "swiglu"):
        act = tinymoe_gpt_activation_bytes(c, batch, seq_len, bytes_per_value)["total"]
        return training_step_bytes(n_params, act)["total"]
    T, d, layers = batch * seq_len, c.d_model, c.n_layer
    width = d * getattr(c, "expand", 1)
    attention_layers = sum(map(c.is_attention_layer, range(layers))) if hasattr(c, "is_attention_layer") \
        else (layers if hasattr(c, "n_head") else 0)
    scores = attention_layers * batch * getattr(c, "n_head", 0) * seq_len * seq_len
    values = layers * 24 * T * width + scores + 2 * T * c.vocab_size
    return 16 * n_params + values * bytes_per_value


def available_bytes(device: str) -> int:
    """Memory free for a new allocation now: the GPU's free memory, or the host's available RAM."""
    if str(device).startswith("cuda"):
        from ..backend import cupy
        return int(cupy().cuda.runtime.memGetInfo()[0])
    import os
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):   # not POSIX: no check
        return 1 << 62
