"""Hugging Face checkpoints in and out: `from_pretrained(path_or_repo_id)` and
`save_pretrained(model, path)` (also `model.save_pretrained(path)`).

A model folder is config.json + model.safetensors (or shards and model.safetensors.index.json).
config.json's `architectures` picks the table (mamba_hf.py, mixtral_hf.py); the config becomes
tinymoe's config dataclass, refusing by name the options tinymoe does not implement; each row of
the table turns the checkpoint's tensors into one tinymoe parameter. Nothing is executed: JSON
and raw tensor data only. See docs/pretrained.md.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ... import backend
from ..gpt import GPT
from ..mamba import MambaLM
from . import mamba_hf, mixtral_hf
from .hf_config import UnsupportedCheckpoint
from .hub import HubTokenizer, load_tokenizer, resolve_folder
from .mapping import expand
from .safetensors_io import read_folder, write_folder

ARCHITECTURES = {mamba_hf.ARCHITECTURE: mamba_hf, mixtral_hf.ARCHITECTURE: mixtral_hf}
DTYPES = {"float32": np.float32, "float64": np.float64}
WIDENED = ("bfloat16", "float16")              # NumPy computes these as float32


def architecture_of(hf: dict, folder):
    names = hf.get("architectures") or []
    known = [n for n in names if n in ARCHITECTURES]
    if not known:
        raise UnsupportedCheckpoint(
            f"{folder}: config.json's architectures {names} are not supported; tinymoe loads "
            f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[known[0]]


def choose_dtype(dtype, hf: dict):
    """The dtype asked for, else the checkpoint's (bfloat16 and float16 become float32)."""
    name = dtype if dtype is not None else hf.get("dtype", hf.get("torch_dtype", "float32"))
    name = np.dtype(name).name if not isinstance(name, str) else name
    if dtype is None and name in WIDENED:
        return np.float32
    if name not in DTYPES:
        raise UnsupportedCheckpoint(f"from_pretrained: dtype {name} is not supported; "
                                    f"use {' or '.join(DTYPES)}")
    return DTYPES[name]


def to_ours(arch, cfg, tensors: dict, model_state: dict, folder) -> dict:
    """The tinymoe state dict from the checkpoint's tensors, after checking that the
    checkpoint holds exactly the tensors of this config, with their shapes."""
    rows = expand(arch.table(cfg), cfg.n_layer, arch.num_experts(cfg))
    wanted = [name for _, names, _ in rows for name in names]
    missing = [name for name in wanted if name not in tensors]
    if missing:
        raise UnsupportedCheckpoint(
            f"{folder}: tensor {missing[0]!r} is missing from the checkpoint ({len(missing)} "
            f"missing in all) that {arch.ARCHITECTURE} with this config.json needs")
    head, embeddings = arch.TIED_COPY
    extra = sorted(set(tensors) - set(wanted) - ({head} if cfg.tie_embeddings else set()))
    if extra:
        raise UnsupportedCheckpoint(
            f"{folder}: tensor {extra[0]!r} in the checkpoint ({len(extra)} unused in all) has no "
            f"place in tinymoe's {arch.ARCHITECTURE} with this config.json")
    if cfg.tie_embeddings and head in tensors and not np.array_equal(tensors[head], tensors[embeddings]):
        raise UnsupportedCheckpoint(
            f"{folder}: config.json ties the head to the embeddings (tie_word_embeddings), but "
            f"tensor {head!r} differs from {embeddings!r}")
    state = {}
    for ours, names, layout in rows:
        expected = [a.shape for a in layout.to_theirs(model_state[ours])]
        for name, shape in zip(names, expected):
            if tensors[name].shape != shape:
                raise UnsupportedCheckpoint(
                    f"{folder}: tensor {name!r} has shape {tensors[name].shape} in the checkpoint, "
                    f"but config.json makes it {shape} (tinymoe's {ours})")
        state[ours] = layout.to_ours([tensors[name] for name in names])
    unmapped = set(model_state) - set(state)
    if unmapped:                                   # a table that forgot a parameter: a bug here
        raise RuntimeError(f"the {arch.ARCHITECTURE} table has no row for {sorted(unmapped)}")
    return state


def from_pretrained(path_or_repo_id, dtype=None, device: str = "cpu"):
    """A tinymoe model with a Hugging Face checkpoint's weights, in eval mode.

    path_or_repo_id: a local folder, or a Hub repo id (downloaded; needs the `hub` extra).
    dtype: "float32" / "float64" (None: the checkpoint's, bfloat16 and float16 as float32)."""
    folder = resolve_folder(path_or_repo_id)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"from_pretrained: {folder} has no config.json")
    hf = json.loads((folder / "config.json").read_text())
    arch = architecture_of(hf, folder)
    cfg = arch.config_from_hf(hf)
    dtype = choose_dtype(dtype, hf)
    tensors = read_folder(folder)
    model = arch.MODEL(cfg).to(dtype=dtype)
    model.load_state_dict(to_ours(arch, cfg, tensors, model.state_dict(), folder))
    return model.to(device).eval()


def architecture_for(model):
    for arch in ARCHITECTURES.values():
        if type(model) is arch.MODEL:
            return arch
    raise UnsupportedCheckpoint(
        f"save_pretrained: no Hugging Face architecture for {type(model).__name__}; "
        f"{', '.join(f'{a.MODEL.__name__} -> {name}' for name, a in ARCHITECTURES.items())}")


def save_pretrained(model, path, max_shard_bytes: int | None = None) -> list:
    """Write `model` as a Hugging Face folder that transformers' from_pretrained loads:
    config.json, and model.safetensors (or shards of at most max_shard_bytes, default 5 GB,
    and model.safetensors.index.json). Returns the files written."""
    arch = architecture_for(model)
    cfg = model.config
    hf = arch.config_to_hf(cfg)
    state = {k: backend.to_numpy(v) for k, v in model.state_dict().items()}
    hf["dtype"] = np.dtype(state[arch.table(cfg)[0].ours].dtype).name
    tensors = {}
    for ours, names, layout in expand(arch.table(cfg), cfg.n_layer, arch.num_experts(cfg)):
        for name, array in zip(names, layout.to_theirs(state[ours])):
            tensors[name] = np.ascontiguousarray(array)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return ["config.json"] + write_folder(folder, tensors, max_shard_bytes)


__all__ = ["from_pretrained", "save_pretrained", "load_tokenizer", "HubTokenizer",
           "UnsupportedCheckpoint", "ARCHITECTURES"]
