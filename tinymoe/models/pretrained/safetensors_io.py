"""Reading and writing a model folder's tensors: `model.safetensors`, or shards listed in
`model.safetensors.index.json`. Data only: nothing in the files is ever executed.

A safetensors file is  [8 bytes: n, little endian] [n bytes: JSON header] [raw data]; the header
maps each name to {"dtype", "shape", "data_offsets": [begin, end]} within the raw data
(tinymoe/safetensors_file.py writes it). This reader memory-maps the data, so a published
model is not read twice, and widens bfloat16 (the usual dtype of published LLMs) to float32:
a bfloat16 is the top 16 bits of a float32.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...safetensors_file import DTYPES, save

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9                 # Hugging Face's historical default, 5 GB


def read_safetensors(path: Path) -> dict:
    """name -> array (memory-mapped where the dtype allows; bfloat16 widened to float32)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if path.stat().st_size > 8 + n \
        else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        data = raw[begin:end]
        if info["dtype"] == "BF16":
            array = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in DTYPES:
            array = data.view(DTYPES[info["dtype"]])
        else:
            raise ValueError(f"{path.name}: tensor {name!r} has dtype {info['dtype']}, which "
                             f"tinymoe does not read (it reads {', '.join(sorted({'BF16', *DTYPES}))})")
        tensors[name] = array.reshape(info["shape"])
    return tensors


def read_folder(folder: Path) -> dict:
    """Every tensor of a model folder, from its single file or its sharded index."""
    if (folder / INDEX).exists():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).exists():
                raise FileNotFoundError(f"{folder}: {INDEX} lists the shard {shard}, which is missing")
            tensors.update(read_safetensors(folder / shard))
        return tensors
    if (folder / SINGLE).exists():
        return read_safetensors(folder / SINGLE)
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = (f" (it has {', '.join(others)}: pickles, which can run code when loaded; tinymoe reads "
            f"safetensors only)" if others else "")
    raise FileNotFoundError(f"{folder}: no {SINGLE} or {INDEX}{hint}")


def write_folder(folder: Path, tensors: dict, max_shard_bytes: int | None = None) -> list:
    """Write tensors (name -> contiguous NumPy array) as one file, or as shards of at most
    max_shard_bytes each (a larger tensor gets a shard of its own) with an index. Returns the
    file names written."""
    limit = DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    shards, size = [{}], 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    for stale in [folder / SINGLE, folder / INDEX, *folder.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save(folder / SINGLE, shards[0], metadata={"format": "pt"})
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save(folder / name, shard, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
             "weight_map": {t: name for name, shard in zip(names, shards) for t in shard}}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX]
