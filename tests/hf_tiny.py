"""Tiny Hugging Face checkpoints, written the way transformers writes them (its tensor names and
config.json keys) but by hand, with random weights: what tests/test_pretrained*.py and the
example's test load. Independent of tinymoe's own writer, so a bug there cannot hide here."""
import json

import numpy as np
from safetensors.numpy import save_file

VOCAB = 256                     # bytes: the CLI and the example read text as bytes


def mamba_config(**overrides):
    cfg = {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "vocab_size": VOCAB,
           "hidden_size": 16, "num_hidden_layers": 2, "state_size": 4, "conv_kernel": 3,
           "expand": 2, "intermediate_size": 32, "time_step_rank": 2, "layer_norm_epsilon": 1e-5,
           "hidden_act": "silu", "use_bias": False, "use_conv_bias": True,
           "residual_in_fp32": True, "tie_word_embeddings": True, "pad_token_id": 0,
           "bos_token_id": 0, "eos_token_id": 0, "initializer_range": 0.1, "dtype": "float32",
           "time_step_min": 0.001, "time_step_max": 0.1, "use_cache": True}
    return {**cfg, **overrides}


def mixtral_config(**overrides):
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": VOCAB,
           "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": None,
           "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
           "sliding_window": None, "attention_dropout": 0.0, "num_local_experts": 4,
           "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
           "output_router_logits": False, "tie_word_embeddings": False, "bos_token_id": 1,
           "eos_token_id": 2, "dtype": "float32", "use_cache": True}
    return {**cfg, **overrides}


def _normal(rng, dtype, *shape, std=0.3, mean=0.0):
    return (mean + std * rng.standard_normal(shape)).astype(dtype)


def mamba_tensors(cfg, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    d, E, N, K, R, V = (cfg["hidden_size"], cfg["intermediate_size"], cfg["state_size"],
                        cfg["conv_kernel"], cfg["time_step_rank"], cfg["vocab_size"])
    t = {"backbone.embeddings.weight": _normal(rng, dtype, V, d, std=1.0),
         "backbone.norm_f.weight": _normal(rng, dtype, d, std=0.1, mean=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"backbone.layers.{i}."
        t[p + "norm.weight"] = _normal(rng, dtype, d, std=0.1, mean=1.0)
        t[p + "mixer.in_proj.weight"] = _normal(rng, dtype, 2 * E, d)
        t[p + "mixer.conv1d.weight"] = _normal(rng, dtype, E, 1, K)
        t[p + "mixer.conv1d.bias"] = _normal(rng, dtype, E, std=0.1)
        t[p + "mixer.x_proj.weight"] = _normal(rng, dtype, R + 2 * N, E)
        t[p + "mixer.dt_proj.weight"] = _normal(rng, dtype, E, R)
        t[p + "mixer.dt_proj.bias"] = _normal(rng, dtype, E, std=0.5, mean=-3.0)
        t[p + "mixer.A_log"] = (np.log(np.arange(1, N + 1))[None] + _normal(rng, np.float64, E, N, std=0.1)).astype(dtype)
        t[p + "mixer.D"] = _normal(rng, dtype, E, std=0.1, mean=1.0)
        t[p + "mixer.out_proj.weight"] = _normal(rng, dtype, d, E, std=0.2)
    if not cfg.get("tie_word_embeddings", True):
        t["lm_head.weight"] = _normal(rng, dtype, V, d)
    return t


def mixtral_tensors(cfg, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    d, f, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, Hkv, E = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_local_experts"]
    dh = d // H
    t = {"model.embed_tokens.weight": _normal(rng, dtype, V, d, std=1.0),
         "model.norm.weight": _normal(rng, dtype, d, std=0.1, mean=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = _normal(rng, dtype, d, std=0.1, mean=1.0)
        t[p + "post_attention_layernorm.weight"] = _normal(rng, dtype, d, std=0.1, mean=1.0)
        t[p + "self_attn.q_proj.weight"] = _normal(rng, dtype, H * dh, d)
        t[p + "self_attn.k_proj.weight"] = _normal(rng, dtype, Hkv * dh, d)
        t[p + "self_attn.v_proj.weight"] = _normal(rng, dtype, Hkv * dh, d)
        t[p + "self_attn.o_proj.weight"] = _normal(rng, dtype, d, H * dh)
        t[p + "block_sparse_moe.gate.weight"] = _normal(rng, dtype, E, d, std=1.0)
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            t[q + "w1.weight"] = _normal(rng, dtype, f, d)
            t[q + "w3.weight"] = _normal(rng, dtype, f, d)
            t[q + "w2.weight"] = _normal(rng, dtype, d, f)
    if not cfg.get("tie_word_embeddings", False):
        t["lm_head.weight"] = _normal(rng, dtype, V, d)
    return t


def write(folder, config, tensors, shards=1):
    """config.json and model.safetensors, or `shards` files and model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


def write_bf16(path, tensors):
    """A safetensors file of bfloat16 tensors, written byte by byte (NumPy has no bfloat16):
    each float32 is cut to its top 16 bits."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, a in tensors.items():
        raw = (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(chunks))


def checkpoint(kind, folder, seed=0, shards=1, dtype=np.float32, **overrides):
    """Write a tiny `kind` ("mamba" | "mixtral") checkpoint into folder; return (config, tensors)."""
    config = (mamba_config if kind == "mamba" else mixtral_config)(**overrides)
    if dtype == np.float64:
        config["dtype"] = "float64"
    tensors = (mamba_tensors if kind == "mamba" else mixtral_tensors)(config, seed, dtype)
    write(folder, config, tensors, shards)
    return config, tensors
