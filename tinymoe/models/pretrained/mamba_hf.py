"""MambaForCausalLM (e.g. state-spaces/mamba-130m-hf) <-> tinymoe's MambaLM.

tinymoe's Mamba blocks already use the checkpoints' names (in_proj, conv1d, x_proj, dt_proj,
A_log, D, out_proj) and layouts, so every row is the same array under another prefix.
The head is tied to the embeddings unless tie_word_embeddings is false.
"""
from __future__ import annotations

import math

from ..mamba import MambaConfig, MambaLM
from .hf_config import need, refuse, require
from .mapping import Row

ARCHITECTURE = "MambaForCausalLM"
MODEL = MambaLM

# tinymoe name                               Hugging Face name                           layout
TABLE = [
    Row("embedding.weight",                  ("backbone.embeddings.weight",)),
    Row("layers.{i}.norm.weight",            ("backbone.layers.{i}.norm.weight",)),
    Row("layers.{i}.mixer.in_proj.weight",   ("backbone.layers.{i}.mixer.in_proj.weight",)),
    Row("layers.{i}.mixer.conv1d.weight",    ("backbone.layers.{i}.mixer.conv1d.weight",)),
    Row("layers.{i}.mixer.conv1d.bias",      ("backbone.layers.{i}.mixer.conv1d.bias",)),
    Row("layers.{i}.mixer.x_proj.weight",    ("backbone.layers.{i}.mixer.x_proj.weight",)),
    Row("layers.{i}.mixer.dt_proj.weight",   ("backbone.layers.{i}.mixer.dt_proj.weight",)),
    Row("layers.{i}.mixer.dt_proj.bias",     ("backbone.layers.{i}.mixer.dt_proj.bias",)),
    Row("layers.{i}.mixer.A_log",            ("backbone.layers.{i}.mixer.A_log",)),
    Row("layers.{i}.mixer.D",                ("backbone.layers.{i}.mixer.D",)),
    Row("layers.{i}.mixer.out_proj.weight",  ("backbone.layers.{i}.mixer.out_proj.weight",)),
    Row("norm_f.weight",                     ("backbone.norm_f.weight",)),
]
UNTIED_HEAD = Row("lm_head.weight",          ("lm_head.weight",))
# A tied checkpoint may still carry the head (some conversions write it): it must equal this.
TIED_COPY = ("lm_head.weight", "backbone.embeddings.weight")


def table(cfg: MambaConfig):
    return TABLE if cfg.tie_embeddings else TABLE + [UNTIED_HEAD]


def num_experts(cfg: MambaConfig) -> int:
    return 0


def config_from_hf(hf: dict) -> MambaConfig:
    arch = ARCHITECTURE
    d_model = need(hf, "hidden_size", arch)
    expand = hf.get("expand", 2)
    d_inner = hf.get("intermediate_size", expand * d_model)
    require(hf, "intermediate_size", expand * d_model, d_inner, arch,
            f"tinymoe's d_inner is expand * hidden_size = {expand} * {d_model}")
    require(hf, "hidden_act", "silu", "silu", arch, "the block's activations are SiLU")
    require(hf, "use_bias", False, False, arch, "in_proj and out_proj have no bias")
    require(hf, "use_conv_bias", True, True, arch, "conv1d has a bias")
    require(hf, "rms_norm", True, True, arch, "the residual blocks use RMSNorm")
    dt_rank = hf.get("time_step_rank", "auto")
    # residual_in_fp32 is accepted either way: tinymoe computes in float32 or float64, so the
    # residual stream is at least float32 already.
    return MambaConfig(
        vocab_size=need(hf, "vocab_size", arch), d_model=d_model,
        n_layer=need(hf, "num_hidden_layers", arch), d_state=hf.get("state_size", 16),
        d_conv=hf.get("conv_kernel", 4), expand=expand,
        dt_rank=math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank,
        rms_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True))


def config_to_hf(cfg: MambaConfig) -> dict:
    if cfg.mixer != "mamba":
        raise refuse("MambaConfig", "mixer", cfg.mixer, ARCHITECTURE, "mamba")
    return {
        "architectures": [ARCHITECTURE], "model_type": "mamba",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer, "state_size": cfg.d_state,
        "conv_kernel": cfg.d_conv, "expand": cfg.expand,
        "intermediate_size": cfg.expand * cfg.d_model,
        "time_step_rank": cfg.dt_rank or math.ceil(cfg.d_model / 16),
        "layer_norm_epsilon": cfg.rms_eps, "hidden_act": "silu",
        "use_bias": False, "use_conv_bias": True,
        "residual_in_fp32": False,        # tinymoe keeps the residual in the model's dtype
        "tie_word_embeddings": cfg.tie_embeddings,
    }
