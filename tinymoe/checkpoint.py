"""Checkpoints: model + optimizer + step + RNG state in ONE safetensors file.

The file format (safetensors) is:

    8 bytes   N, the header length (little-endian uint64)
    N bytes   JSON header: for every tensor its dtype, shape and byte range, plus
              "__metadata__", a dict of strings
    the rest  the raw tensor bytes

Tensors: "model.<name>" for the state dict, "optim.state.<i>.<key>" for the
optimizer's moments. Metadata (JSON strings): format, step, RNG state, the model's
config and class, the optimizer's groups and scalars, `extra`, and a SHA-256
checksum over all of it (metadata and tensor bytes), since safetensors itself
checks only the layout: a flipped bit in a weight would otherwise load silently.

Loading never runs code from the file (no pickle): the header is JSON and the
tensors are raw numbers.

Saving is atomic: write a temporary file in the same directory, fsync it, rename it
over the target (os.replace is atomic on POSIX and Windows), fsync the directory.
A crash at any moment leaves either the old checkpoint or the new one, never half.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import tempfile

import numpy as np
import safetensors.numpy

from . import backend

FORMAT = "tinymoe-checkpoint-v1"


def save_checkpoint(path, model, optimizer=None, step: int = 0, extra: dict | None = None):
    """Write `model` (and `optimizer`, `step`, the RNG state, `extra`) to `path`."""
    path = os.fspath(path)
    tensors = {f"model.{k}": backend.to_numpy(v) for k, v in model.state_dict().items()}
    optim_meta = None
    if optimizer is not None:
        arrays, optim_meta = optimizer.state_dict()
        tensors.update({f"optim.{k}": v for k, v in arrays.items()})
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    try:
        metadata = {
            "format": FORMAT,
            "step": json.dumps(int(step)),
            "rng_state": json.dumps(backend.get_rng_state()),
            "model_class": type(model).__name__,
            "config": json.dumps(config),
            "optimizer": json.dumps(optim_meta),
            "extra": json.dumps(extra),
        }
    except TypeError as err:  # e.g. a NumPy float in `extra` or in the config
        raise TypeError(f"save_checkpoint: config and extra must be JSON data: {err}") from None
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    metadata["checksum"] = _checksum(tensors, metadata)

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        safetensors.numpy.save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp made it private (0600)
        with open(tmp, "rb+") as f:  # flush the new bytes to disk before the rename
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)  # make the rename itself durable


def load_checkpoint(path, model=None, optimizer=None, map_device: str = "cpu",
                    restore_rng: bool = True) -> dict:
    """Read `path`; load it into `model` and `optimizer` when given (each array goes
    to its parameter's device) and restore the RNG state. Returns a dict with
    step, config, model_class, extra, and model_state (name -> array on map_device).
    A corrupt, truncated or foreign file raises a ValueError naming the file."""
    path = os.fspath(path)
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"load_checkpoint: {path} is not a tinymoe checkpoint "
                         f"(format {metadata.get('format')!r}, expected {FORMAT!r})")
    if metadata.get("checksum") != _checksum(tensors, metadata):
        raise ValueError(f"load_checkpoint: {path} is corrupt (checksum mismatch)")

    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optim_arrays = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
    optim_meta = json.loads(metadata["optimizer"])
    if model is not None:
        try:
            model.load_state_dict(model_state)
        except RuntimeError as err:
            raise RuntimeError(f"load_checkpoint: {path}: {err}") from None
    if optimizer is not None:
        if optim_meta is None:
            raise ValueError(f"load_checkpoint: {path} holds no optimizer state")
        optimizer.load_state_dict(optim_arrays, optim_meta)
    if restore_rng:
        backend.set_rng_state(json.loads(metadata["rng_state"]))
    return {
        "step": json.loads(metadata["step"]),
        "config": json.loads(metadata["config"]),
        "model_class": metadata["model_class"],
        "extra": json.loads(metadata["extra"]),
        "model_state": {k: backend.to_device(v, map_device) for k, v in model_state.items()},
    }


def read_safetensors(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, with a clear error when it is
    missing, truncated or damaged."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at {path}") from None
    if len(data) < 8:
        raise ValueError(f"load_checkpoint: {path} is truncated ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])  # the first 8 bytes: header length
    if 8 + header_len > len(data):
        raise ValueError(
            f"load_checkpoint: {path} is truncated (header says {header_len} bytes, "
            f"file has {len(data) - 8} after the length)"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
        metadata = header.get("__metadata__") or {}
        tensors = safetensors.numpy.load(data)
    except Exception as err:  # JSON or safetensors' own layout checks
        raise ValueError(f"load_checkpoint: {path} is corrupt or truncated ({err})") from None
    return tensors, metadata


def _checksum(tensors: dict, metadata: dict) -> str:
    """SHA-256 over every metadata entry (but the checksum) and every tensor's name,
    dtype, shape and bytes, in sorted order."""
    h = hashlib.sha256()
    for key in sorted(metadata):
        if key != "checksum":
            h.update(f"{key}={metadata[key]}\n".encode())
    for name in sorted(tensors):
        a = tensors[name]
        h.update(f"{name}:{a.dtype.str}:{a.shape}\n".encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def _fsync_directory(directory: str):
    """Persist a rename (POSIX); Windows cannot open directories and needs no fsync."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
