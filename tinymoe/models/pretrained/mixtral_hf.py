"""MixtralForCausalLM (e.g. mistralai/Mixtral-8x7B-v0.1) <-> tinymoe's GPT with Mixtral's options:
RoPE, RMSNorm, grouped-query attention, an MoE in every block (softmax router, top-k,
renormalized over the k, dropless) of SwiGLU experts, an untied head.

Two rows are not the same array: tinymoe fuses q, k, v into one projection (GroupedQKV), and
stacks the experts' weights transposed, (E, in, out), where the checkpoint has one nn.Linear
(out, in) per expert (ExpertsStacked). The checkpoint's experts are `w1` (gate), `w3` (up) and
`w2` (down): FFN(x) = w2(silu(w1 x) * w3 x), the names tinymoe's Experts use too.
"""
from __future__ import annotations

from ..gpt import GPT, GPTConfig
from .hf_config import UnsupportedCheckpoint, need, refuse, require
from .mapping import ExpertsStacked, GroupedQKV, Row

ARCHITECTURE = "MixtralForCausalLM"
MODEL = GPT
LAYER = "model.layers.{i}"
MOE = "model.layers.{i}.block_sparse_moe"


def table(cfg: GPTConfig):
    qkv = GroupedQKV(cfg.n_head, cfg.n_kv_head or cfg.n_head)
    experts = ExpertsStacked(cfg.num_experts)
    # tinymoe name                      Hugging Face name(s)                              layout
    rows = [
        Row("wte.weight",                ("model.embed_tokens.weight",)),
        Row("blocks.{i}.ln1.weight",     (f"{LAYER}.input_layernorm.weight",)),
        Row("blocks.{i}.attn.qkv.weight", (f"{LAYER}.self_attn.q_proj.weight",
                                          f"{LAYER}.self_attn.k_proj.weight",
                                          f"{LAYER}.self_attn.v_proj.weight"),         qkv),
        Row("blocks.{i}.attn.proj.weight", (f"{LAYER}.self_attn.o_proj.weight",)),
        Row("blocks.{i}.ln2.weight",     (f"{LAYER}.post_attention_layernorm.weight",)),
        Row("blocks.{i}.moe.gate.gate.weight", (f"{MOE}.gate.weight",)),
        Row("blocks.{i}.moe.experts.w1", (f"{MOE}.experts.{{e}}.w1.weight",),           experts),
        Row("blocks.{i}.moe.experts.w3", (f"{MOE}.experts.{{e}}.w3.weight",),           experts),
        Row("blocks.{i}.moe.experts.w2", (f"{MOE}.experts.{{e}}.w2.weight",),           experts),
        Row("ln_f.weight",               ("model.norm.weight",)),
    ]
    return rows if cfg.tie_embeddings else rows + [Row("lm_head.weight", ("lm_head.weight",))]


TIED_COPY = ("lm_head.weight", "model.embed_tokens.weight")


def num_experts(cfg: GPTConfig) -> int:
    return cfg.num_experts


def rope_base(hf: dict) -> float:
    """rope_theta, from transformers 5's rope_parameters or 4's top-level keys."""
    arch = ARCHITECTURE
    params = hf.get("rope_parameters") or {}
    require(params, "rope_type", "default", "default", arch, "plain RoPE, no scaling of the angles")
    require(hf, "rope_scaling", None, None, arch, "plain RoPE, no scaling of the angles")
    return float(params.get("rope_theta", hf.get("rope_theta", 1e6)))


def config_from_hf(hf: dict) -> GPTConfig:
    arch = ARCHITECTURE
    d_model, n_head = need(hf, "hidden_size", arch), need(hf, "num_attention_heads", arch)
    if hf.get("head_dim") not in (None, d_model // n_head):
        raise UnsupportedCheckpoint(
            f"config.json: head_dim={hf['head_dim']} is not supported by tinymoe's {arch} "
            f"(its heads are hidden_size / num_attention_heads = {d_model // n_head} wide)")
    require(hf, "sliding_window", None, None, arch, "tinymoe's attention sees every earlier position")
    require(hf, "hidden_act", "silu", "silu", arch, "the experts are SwiGLU")
    require(hf, "router_jitter_noise", 0.0, 0.0, arch, "the router has no jitter")
    for key in ("attention_bias", "mlp_bias"):
        require(hf, key, False, False, arch, "the projections have no bias")
    return GPTConfig(
        vocab_size=need(hf, "vocab_size", arch), block_size=hf.get("max_position_embeddings", 4096 * 32),
        n_layer=need(hf, "num_hidden_layers", arch), n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads", n_head), d_model=d_model,
        d_ff=need(hf, "intermediate_size", arch), activation="swiglu", bias=False,
        num_experts=need(hf, "num_local_experts", arch), top_k=hf.get("num_experts_per_tok", 2),
        router="topk", moe_every=1, capacity_factor=None, eval_capacity_factor=None,
        aux_loss_weight=hf.get("router_aux_loss_coef", 0.001), z_loss_weight=0.0,
        position="rope", rope_base=rope_base(hf), norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", False))


# GPT options that MixtralForCausalLM fixes: option -> the value it needs
FIXED = {"position": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False,
         "router": "topk", "moe_every": 1, "num_shared_experts": 0, "eval_capacity_factor": None}


def config_to_hf(cfg: GPTConfig) -> dict:
    for option, supported in FIXED.items():
        if getattr(cfg, option) != supported:
            raise refuse("GPTConfig", option, getattr(cfg, option), ARCHITECTURE, supported)
    if cfg.num_experts < 1:
        raise UnsupportedCheckpoint("save_pretrained: a dense GPT (num_experts=0) has no "
                                    f"equivalent in {ARCHITECTURE}, whose blocks are all MoE")
    return {
        "architectures": [ARCHITECTURE], "model_type": "mixtral",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "head_dim": cfg.d_model // cfg.n_head, "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "sliding_window": None, "attention_dropout": 0.0,
        "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
        "router_aux_loss_coef": cfg.aux_loss_weight, "router_jitter_noise": 0.0,
        "output_router_logits": False, "tie_word_embeddings": cfg.tie_embeddings,
    }
