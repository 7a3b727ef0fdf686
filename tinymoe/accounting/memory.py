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
- tinymoe: everything float32: parameters (4) + gradients (4) + AdamW m, v (8).
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
