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

import math
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


# --------------------------------------------------------------- tinymoe's GPT, counted
# What one training step of tinymoe's GPT (dense or MoE) keeps for the backward, by the
# ops' real arrays and dtypes. Notation: B batch, L seq_len, T = B L tokens, d d_model,
# f d_ff, V vocab, H heads (Hkv key/value heads, dh = d / H), E experts, k top_k, R rows
# after dispatch; a = bytes of an activation (4: fp32/tf32; 2: bf16/fp16), 4 = float32
# (every sum: norms' statistics, softmax, router, loss), 8 = int64 (indices).
# On a GPU ("cuda") the norms and the attention softmax are fused kernels that save less
# (kernels/norm.py: the rows' mean and rstd; kernels/softmax.py), and SiLU saves only x.

ACTIVATION_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}
F32, I64 = 4, 8


def _value_bytes(precision: str) -> int:
    if precision not in ACTIVATION_BYTES:
        raise ValueError(f"precision must be one of {', '.join(ACTIVATION_BYTES)}, got {precision!r}")
    return ACTIVATION_BYTES[precision]


def _norm(c, T, a, cuda) -> int:
    """One LayerNorm / RMSNorm over (T, d): its output, and what it saves.
    GPU (fused): mean and rstd per row (RMSNorm: rstd)                (2 T or T) x 4
    CPU: xhat (T, d) and rstd (T,) in float32, and a 16-bit weight as a float32 copy (d,)."""
    d, rms = c.d_model, c.norm == "rmsnorm"
    if cuda:
        saved = (1 if rms else 2) * T * F32
    else:
        saved = T * d * F32 + T * F32 + (d * F32 if a < F32 else 0)
    return T * d * a + saved


def _attention(c, B, L, a, cuda) -> int:
    """Causal attention, ln1's output excluded:
    qkv (T, (H + 2 Hkv) dh) a; [RoPE: rotated q, k (T, (H + Hkv) dh) a];
    P (B, H, L, L) a, or with recompute_attention the softmax's lse (B, H, L) x 4;
    the output O, its heads merged, proj's output: 3 T d a; dropout: its scale and output 2 T d a."""
    T, d, H = B * L, c.d_model, c.n_head
    Hkv, dh = (H if c.n_kv_head is None else c.n_kv_head), c.d_model // c.n_head
    qkv = T * (H + 2 * Hkv) * dh * a
    rope = T * (H + Hkv) * dh * a if c.position == "rope" else 0
    scores = B * H * L * F32 if c.recompute_attention else B * H * L * L * a
    dropout = 2 * T * d * a if c.dropout > 0 else 0
    return qkv + rope + scores + 3 * T * d * a + dropout


def _ffn(rows, f, activation, a, cuda) -> int:
    """act(x W1) W2 over `rows` rows, its input excluded:
    gelu: x W1 and gelu's output (2 rows f a); relu: + its mask (rows f bytes);
    swiglu: x W1, silu, x W3, the product (4 rows f a), on the CPU silu's sigmoid too;
    W2's output (rows d a) is counted by the caller (it is the MLP's or the experts' output)."""
    if activation == "swiglu":
        return (4 + (0 if cuda else 1)) * rows * f * a
    if activation == "relu":
        return 2 * rows * f * a + rows * f
    return 2 * rows * f * a


def _router(c, T, a) -> int:
    """Top-k router, ln2's output excluded: 16-bit x and gate weight as float32 copies (the
    scores run in float32), logits and probabilities (T, E) x 4; z-loss: its softmax (T, E)
    and lse (T,) x 4; the top-k values (T, k) x 4 and indices (T, k) x 8; renormalized (k > 1):
    the sum (T,) and the weights (T, k) x 4; the load-balancing loss's f and scale (E,) x 4."""
    E, k, d = c.num_experts, c.top_k, c.d_model
    scores = (T * d + E * d) * F32 if a < F32 else 0
    z = (T * E + T) * F32 if c.z_loss_weight else 0
    renorm = (T + T * k) * F32 if k > 1 else 0
    return scores + 2 * T * E * F32 + z + T * k * (F32 + I64) + renorm + 2 * E * F32


def moe_rows(c, T: int, device: str = "cpu", static_dispatch: bool | None = None) -> int:
    """R, the rows the experts compute: T k dropless; with a capacity C = ceil(factor T k / E),
    a static plan (the GPU's, static_dispatch=None there) pads every expert to C rows: E C; a
    dynamic plan keeps at most T k of them (counted as T k: what is dropped depends on data)."""
    E, k = c.num_experts, c.top_k
    if c.capacity_factor is None:
        return T * k
    static = str(device).startswith("cuda") if static_dispatch is None else static_dispatch
    return E * max(math.ceil(c.capacity_factor * T * k / E), 1) if static else T * k


def _moe(c, T, a, cuda, R) -> dict:
    """An MoE FFN over T tokens, R rows: router; dispatch (the plan: slot_row (T, k), row_token
    and row_slot (R,) x 8, and the permuted rows (R, d) a); experts (their FFN over R rows and
    W2's output (R, d) a, plus a padded copy of the rows where the GPU batches small dynamic
    groups, experts.py); combine's output (T, d) a; shared experts (their FFN over T rows of
    width s f, its output and the sum, 2 T d a)."""
    d, f, E, k = c.d_model, c.d_ff, c.num_experts, c.top_k
    plan = (T * k + 2 * R + 2 * E + 1) * I64
    experts = _ffn(R, f, c.activation, a, cuda) + R * d * a + _expert_padding(c, R, a, cuda)
    s = c.num_shared_experts
    shared = _ffn(T, s * f, c.activation, a, cuda) + 2 * T * d * a if s else 0
    return {"router": _router(c, T, a), "dispatch": plan + R * d * a, "experts": experts,
            "combine": T * d * a, "shared_experts": shared}


def _expert_padding(c, R, a, cuda) -> int:
    """A dynamic plan's experts on a GPU, when each expert's product is small
    (M in out <= 2^27 with M = R / E, balanced routing assumed): one batched product over rows
    padded to M, whose padded copy (E M, in) is saved, W1's (and W3's) and W2's."""
    from ..nn.moe import experts
    if not cuda or c.capacity_factor is not None or R == 0:
        return 0
    E, d, f = c.num_experts, c.d_model, c.d_ff
    M = math.ceil(R / E)
    if M * d * f > experts.BATCHED_MAX_MACS or E * M > experts.BATCHED_MAX_PADDING * R:
        return 0
    return E * M * ((2 if c.activation == "swiglu" else 1) * d + f) * a


def _layer(c, i, B, L, a, cuda, R) -> dict:
    """Block i: x + attn(ln1(x)), then + ffn(ln2(x)); the residual sums 2 T d a."""
    T, d = B * L, c.d_model
    parts = {"norms": 2 * _norm(c, T, a, cuda), "attention": _attention(c, B, L, a, cuda),
             "residual": 2 * T * d * a}
    if c.is_moe_layer(i):
        parts.update(_moe(c, T, a, cuda, R))
    else:
        dropout = 2 * T * d * a if c.dropout > 0 else 0
        parts["mlp"] = _ffn(T, c.d_ff, c.activation, a, cuda) + T * d * a + dropout
    return parts


def _embeddings_and_head(c, B, L, a, cuda) -> dict:
    """Token rows (T, d) a; learned positions: their ids (L,) x 8, rows (L, d) a, the sum T d a;
    ln_f; the logits (T, V) a; the cross-entropy's float32 log-probabilities (T, V) x 4, safe
    targets (T,) x 8 and their mask (T,) x 1."""
    T, d, V = B * L, c.d_model, c.vocab_size
    positions = L * I64 + L * d * a + T * d * a if c.position == "learned" else 0
    return {"embeddings": T * d * a + positions, "final_norm": _norm(c, T, a, cuda),
            "logits": T * V * a, "loss": T * V * F32 + T * (I64 + 1)}


def gpt_activation_bytes(config, batch: int, seq_len: int, precision: str = "fp32",
                         device: str = "cpu", static_dispatch: bool | None = None) -> dict:
    """Bytes a training step of tinymoe's GPT (dense or MoE, `models/gpt.py`) keeps between
    its forward and its backward: every array the graph holds (the ops' inputs and saved
    arrays), by its real dtype (`precision`: fp32, tf32, bf16, fp16) and the ops the device
    runs (`device`: "cpu" or "cuda"). `config` is a GPTConfig; the MoE layers' router is the
    top-k router (GPT's default), and `static_dispatch` is the MoE layer's (None: static on a
    GPU when there is a capacity).

    Returns the parts summed over the layers ("norms", "attention", "residual", "mlp",
    "router", "dispatch", "experts", "combine", "shared_experts"; those of the embeddings and
    the head: "embeddings", "final_norm", "logits", "loss"), "per_layer" (a dict of parts per
    block), "attention_scores_per_layer" and "total"."""
    c = config
    if c.activation not in ("gelu", "swiglu", "relu"):
        raise ValueError(f"gpt_activation_bytes: activation must be 'gelu', 'swiglu' or 'relu', "
                         f"got {c.activation!r}")
    if c.num_experts and c.router != "topk":
        raise ValueError(f"gpt_activation_bytes: counts the 'topk' router, got {c.router!r}")
    if c.recompute:
        raise ValueError("gpt_activation_bytes: recompute=True keeps each block's input only; "
                         "not counted here")
    a, cuda = _value_bytes(precision), str(device).startswith("cuda")
    B, L = batch, seq_len
    R = moe_rows(c, B * L, device, static_dispatch) if c.num_experts else 0
    per_layer = [_layer(c, i, B, L, a, cuda, R) for i in range(c.n_layer)]
    parts = {}
    for layer in per_layer:
        for name, value in layer.items():
            parts[name] = parts.get(name, 0) + value
    parts.update(_embeddings_and_head(c, B, L, a, cuda))
    scores = B * c.n_head * L * (F32 if c.recompute_attention else L * a)
    return {**parts, "per_layer": per_layer, "attention_scores_per_layer": scores,
            "total": sum(parts.values())}


def gpt_num_parameters(config) -> int:
    """Parameters of tinymoe's GPT from its config (= GPT(config).num_parameters()):
    wte V d [+ wpe block d] [+ lm_head V d]; per block: two norms, qkv d (H + 2 Hkv) dh and
    proj d d, then an MLP (d f twice, SwiGLU three times) or an MoE (gate E d, E experts,
    shared experts of width s f); the final norm. Biases where config.bias."""
    c = config
    d, f, H = c.d_model, c.d_ff, c.n_head
    Hkv, dh = (H if c.n_kv_head is None else c.n_kv_head), d // H
    mats = 3 if c.activation == "swiglu" else 2
    bias = 1 if c.bias else 0
    norm = d * (1 + (bias if c.norm == "layernorm" else 0))
    attention = d * (H + 2 * Hkv) * dh + d * d + bias * ((H + 2 * Hkv) * dh + d)
    total = c.vocab_size * d * (1 if c.tie_embeddings else 2) + norm
    total += c.block_size * d if c.position == "learned" else 0
    for i in range(c.n_layer):
        total += 2 * norm + attention
        if c.is_moe_layer(i):
            total += c.num_experts * d + (c.num_experts + c.num_shared_experts) * mats * d * f
        else:
            total += mats * d * f + bias * ((mats - 1) * f + d)
    return total


def step_state_bytes(n_params: int, precision: str = "fp32", device: str = "cpu") -> dict:
    """Model states during a training step (make_step with AdamW), by the arrays that exist:
      params        P a (a = 4 fp32/tf32, 2 bf16/fp16)
      grads         the model's gradients: on a GPU the fused AdamW's flat buffer (MasterWeights:
                    a 16-bit one beside it), always there: P a; on the CPU the step frees them
                    after the forward, and the float32 run's previous ones are held through
                    it (16-bit runs: converted and freed): P a for fp32, 0 for 16 bits
      master_grads  16 bits: the masters' float32 gradients, held from one update to the
                    next (a flat buffer on a GPU): 4 P
      optimizer     AdamW's m and v, 8 P; 16 bits: + the float32 masters, 4 P
    fp32: 16 bytes per parameter; bf16/fp16: 2 + 2 + 4 + 12 = 20 on a GPU, 2 + 4 + 12 = 18 on
    the CPU (the lecture's 2 + 2 + 12 does not count the masters' gradients)."""
    a, P = _value_bytes(precision), n_params
    half, cuda = a < F32, str(device).startswith("cuda")
    return {"params": P * a, "grads": P * a if (cuda or not half) else 0,
            "master_grads": 4 * P if half else 0, "optimizer": (12 if half else 8) * P}


def step_transient_bytes(config, batch: int, seq_len: int, precision: str = "fp32",
                         device: str = "cpu", static_dispatch: bool | None = None) -> dict:
    """The largest temporaries on top of the activations, near the end of the forward and the
    start of the backward (where a step's memory peaks); the estimate takes the largest:
      loss       the log-softmax's shifted logits and their exponentials, (T, V) x 4 each
                 (in the backward: softmax - onehot, (T, V) x 4, and its 16-bit copy)
      ffn        the last block's FFN backward at its activation, in (rows, f) arrays: GELU
                 makes its result (a) on a GPU; on the CPU the Gaussian term and the result
                 in float32 (2 x 4), and float32 copies of x and the gradient for 16 bits
                 (4 x 4); SwiGLU's product gives two gradients (2 a); ReLU one (a). With the
                 weights' gradient (E f d a), which the CPU copies
      attention  the last block's attention backward: dP (B, H, L, L) a (CPU: and its float32
                 copy for 16 bits; recompute_attention: and the recomputed P)"""
    c, a, cuda = config, _value_bytes(precision), str(device).startswith("cuda")
    B, L, T, d, f = batch, seq_len, batch * seq_len, config.d_model, config.d_ff
    moe = c.is_moe_layer(c.n_layer - 1)
    rows, E = (moe_rows(c, T, device, static_dispatch), c.num_experts) if moe else (T, 1)
    weight_grad = E * f * d * a * (1 if cuda else 2)
    scores = B * c.n_head * L * L
    attention = scores * (a + (0 if cuda or a == F32 else F32)) * (2 if c.recompute_attention else 1)
    if c.activation == "gelu":
        hidden = rows * f * (a if cuda else (2 if a == F32 else 4) * F32)
    else:
        hidden = rows * f * a * (2 if c.activation == "swiglu" else 1)
    return {"loss": 2 * T * c.vocab_size * F32, "ffn": hidden + weight_grad,
            "attention": attention}


def _peak_transient(c, batch, seq_len, precision, device, static_dispatch, grads) -> int:
    """The largest temporary over the states and activations: the loss's, at the end of the
    forward, or one of the backward's; on the CPU the step frees the previous gradients between
    the two (make_step: zero_grad after the forward), so a backward temporary counts less them."""
    t = step_transient_bytes(c, batch, seq_len, precision, device, static_dispatch)
    freed = 0 if str(device).startswith("cuda") else grads
    return max(t["loss"], t["ffn"] - freed, t["attention"] - freed)


def gpt_training_step_bytes(model_or_config, batch: int, seq_len: int, precision: str = "fp32",
                            device: str = "cpu", static_dispatch: bool | None = None) -> dict:
    """Peak memory of one training step of tinymoe's GPT, by parts, in bytes:
        model states (step_state_bytes) + activations (gpt_activation_bytes)
        + the largest temporary (step_transient_bytes)
    `model_or_config`: a GPT or its GPTConfig. Compare with the measured peak of bytes in use
    (tinymoe.profile.memory.track_memory), not with what a memory pool holds (cached blocks)."""
    c = getattr(model_or_config, "config", model_or_config)
    act = gpt_activation_bytes(c, batch, seq_len, precision, device, static_dispatch)
    parts = step_state_bytes(gpt_num_parameters(c), precision, device)
    parts["activations"] = act["total"]
    parts["transient"] = _peak_transient(c, batch, seq_len, precision, device, static_dispatch,
                                         parts["grads"])
    parts["total"] = sum(parts.values())
    return parts


def counted_exactly(config) -> bool:
    """True for what gpt_activation_bytes counts: a GPT's config (dense or MoE with the top-k
    router, without full recomputation); not Mamba or hybrid models."""
    is_gpt = hasattr(config, "n_head") and hasattr(config, "is_moe_layer") \
        and not hasattr(config, "is_attention_layer")
    return is_gpt and not config.recompute and (not config.num_experts or config.router == "topk")


def rough_training_step_bytes(model, batch: int, seq_len: int, precision: str = "fp32",
                              device: str = "cpu") -> float:
    """An estimate of one training step's peak memory for ANY tinymoe language model, to refuse
    a run that cannot fit before it starts (`profile`). GPTs (dense or MoE, top-k router, no
    full recomputation) take the exact count, gpt_training_step_bytes; other models: the
    precision's bytes per parameter (step_state_bytes) plus about 24 saved values per token
    and channel per layer, the (L, L) attention scores of every attention layer, and the
    logits with their float32 log-probabilities (T V (a + 4))."""
    c, n_params = model.config, model.num_parameters()
    if counted_exactly(c):
        return gpt_training_step_bytes(c, batch, seq_len, precision, device)["total"]
    a = _value_bytes(precision)
    T, d, layers = batch * seq_len, c.d_model, c.n_layer
    width = d * getattr(c, "expand", 1)
    attention_layers = sum(map(c.is_attention_layer, range(layers))) if hasattr(c, "is_attention_layer") \
        else (layers if hasattr(c, "n_head") else 0)
    scores = attention_layers * batch * getattr(c, "n_head", 0) * seq_len * seq_len
    values = (layers * 24 * T * width + scores + T * c.vocab_size) * a + T * c.vocab_size * F32
    return sum(step_state_bytes(n_params, precision, device).values()) + values


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
