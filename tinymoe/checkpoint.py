"""Checkpoints: model + optimizer + step + RNG state in ONE safetensors file.

The file format (safetensors) is:

    8 bytes   N, the header length (little-endian uint64)
    N bytes   JSON header: for every tensor its dtype, shape and byte range, plus
              "__metadata__", a dict of strings
    the rest  the raw tensor bytes

Tensors: "model.<name>" for the state dict, "optim.state.<i>.<key>" for the
optimizer's moments. Metadata (JSON strings): format, step, RNG state, the model's
config and class, the optimizer's groups and scalars, `extra`, and a SHA-256
checksum over all of it (metadata and tensor bytes), since the format itself
checks only the layout: a flipped bit in a weight would otherwise load silently.

Loading never runs code from the file (no pickle): the header is JSON and the
tensors are raw numbers.

Saving is atomic: write a temporary file in the same directory, fsync it, rename it
over the target (os.replace is atomic on POSIX and Windows), fsync the directory.
A crash at any moment leaves either the old checkpoint or the new one, never half.
The checkpoint being replaced is kept as `<name>.prev.safetensors` (a hard link made
before the rename), so a bad checkpoint can be rolled back by hand. A temporary file
is named after its writer's process id (`.<name>.tmp-<pid>`): a writer killed midway
(SIGKILL) leaves one, and the next save in that folder removes it. A model or
optimizer value that is not finite (NaN, inf) is refused before anything is written.

Loading tells three failures apart, each a `CheckpointError` (a ValueError):
`NotSafetensorsError` (the bytes are not a safetensors file at all: a pickle, random
data), `TruncatedCheckpointError` (a safetensors file cut short) and
`CorruptCheckpointError` (the layout is readable but inconsistent, or the checksum
does not match the bytes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct

import numpy as np

from . import backend, safetensors_file

FORMAT = "tinymoe-checkpoint-v1"
MAX_HEADER_BYTES = 100_000_000   # the safetensors library's limit on the JSON header


class CheckpointError(ValueError):
    """A file that cannot be loaded as a tinymoe checkpoint."""


class NotSafetensorsError(CheckpointError):
    """The bytes are not a safetensors file (a pickle, random bytes, a text file)."""


class TruncatedCheckpointError(CheckpointError):
    """A safetensors file cut short: its header promises more bytes than the file has."""


class CorruptCheckpointError(CheckpointError):
    """Readable layout, wrong content: an inconsistent header or a checksum mismatch."""


def prev_path(path: str) -> str:
    """Where the checkpoint replaced by the last save is kept: ckpt.safetensors ->
    ckpt.prev.safetensors."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


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
    _check_finite(tensors, path)
    metadata["checksum"] = _checksum(tensors, metadata)

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(directory)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        safetensors_file.save(tmp, tensors, metadata)
        with open(tmp, "rb+") as f:  # flush the new bytes to disk before the rename
            os.fsync(f.fileno())
        if os.path.exists(path):     # keep the checkpoint being replaced as .prev
            _link_over(path, prev_path(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)  # make the renames themselves durable


def _check_finite(tensors: dict, path: str) -> None:
    """Refuse to write a NaN or an infinity: a diverged run must not replace a good file."""
    for name, a in tensors.items():
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad = int(a.size - np.isfinite(a).sum())
            raise ValueError(f"save_checkpoint: {name} {a.shape} holds {bad} non-finite values; "
                             f"{path} was not written")


def _link_over(src: str, dst: str) -> None:
    """dst becomes a second name of src's bytes (atomically replacing dst); a copy where the
    file system has no hard links."""
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        os.link(src, tmp)
    except OSError:
        import shutil
        shutil.copyfile(src, tmp)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.remove(tmp)
        raise


def remove_stale_temporaries(directory: str) -> list[str]:
    """Remove the temporary files of saves whose writer is dead (killed mid-save); returns
    their paths. A live writer's file (another process saving now) is left alone."""
    removed = []
    for name in os.listdir(directory):
        head, sep, pid = name.rpartition(".tmp-")
        if not sep or not pid.isdigit() or not head:
            continue
        if int(pid) != os.getpid() and _alive(int(pid)):
            continue
        try:
            os.remove(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    return True


def load_checkpoint(path, model=None, optimizer=None, map_device: str = "cpu",
                    restore_rng: bool = True) -> dict:
    """Read `path`; load it into `model` and `optimizer` when given (each array goes
    to its parameter's device) and restore the RNG state. Returns a dict with
    step, config, model_class, extra, and model_state (name -> array on map_device).
    A corrupt, truncated or foreign file raises a ValueError naming the file."""
    path = os.fspath(path)
    tensors, metadata = read_safetensors(path)
    _check_format(metadata, path)
    if metadata.get("checksum") != _checksum(tensors, metadata):
        raise CorruptCheckpointError(f"load_checkpoint: {path} is corrupt (checksum mismatch: "
                                     f"its bytes changed after it was written)")

    try:
        fields = {k: json.loads(metadata[k]) for k in ("step", "config", "optimizer", "extra", "rng_state")}
    except (KeyError, ValueError) as err:
        raise CorruptCheckpointError(f"load_checkpoint: {path} is corrupt (metadata field {err})") from None
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optim_arrays = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
    optim_meta = fields["optimizer"]
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
        backend.set_rng_state(fields["rng_state"])
    return {
        "step": fields["step"],
        "config": fields["config"],
        "model_class": metadata.get("model_class"),
        "extra": fields["extra"],
        "model_state": {k: backend.to_device(v, map_device) for k, v in model_state.items()},
    }


def checkpoint_step(path) -> int:
    """The step a checkpoint holds, read from its JSON header alone: deciding what a run does
    (resume or not) needs no tensor; loading it reads them and checks the checksum."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read(8)
        if len(data) == 8:
            data += f.read(min(struct.unpack("<Q", data)[0], MAX_HEADER_BYTES))
    header, _ = _parse_header(data, path)
    metadata = header.get("__metadata__") or {}
    _check_format(metadata, path)
    try:
        return int(json.loads(metadata["step"]))
    except (KeyError, TypeError, ValueError):
        raise CorruptCheckpointError(f"load_checkpoint: {path} is corrupt (no step in its metadata)") from None


def _check_format(metadata: dict, path: str) -> None:
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"load_checkpoint: {path} is not a tinymoe checkpoint "
                              f"(format {metadata.get('format')!r}, expected {FORMAT!r})")


def read_safetensors(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; a missing file, a directory, a file that is
    not safetensors, a truncated and an inconsistent one each get their own clear error."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"load_checkpoint: {path} is a folder; give the checkpoint file "
                                f"(e.g. {os.path.join(path, 'ckpt.safetensors')})")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at {path}") from None
    header, body = _parse_header(data, path)
    _check_layout(header, body, path)
    try:
        tensors = safetensors_file.tensors_from(header, data, len(data) - body)
    except (ValueError, TypeError, KeyError) as err:  # dtypes, shapes, ranges that do not add up
        raise CorruptCheckpointError(f"load_checkpoint: {path} is corrupt ({err})") from None
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError(f"load_checkpoint: {path} is corrupt (metadata is not "
                                     f"a dict of strings)")
    return tensors, metadata


def _parse_header(data: bytes, path: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the number of bytes after it.

        bytes 0..7      N (little-endian uint64)
        bytes 8..8+N    a JSON object, starting with '{'
    Bytes that neither start nor end (a '}' or space padding at 8+N) like that are not
    safetensors; an impossible N is corruption;
    a file shorter than its header says is truncated."""
    if not data:
        raise TruncatedCheckpointError(f"load_checkpoint: {path} is truncated (empty: 0 bytes)")
    if len(data) < 8:
        raise TruncatedCheckpointError(f"load_checkpoint: {path} is truncated ({len(data)} bytes: "
                                       f"not even a header length)")
    (n,) = struct.unpack("<Q", data[:8])
    ends_like_a_header = 2 <= n <= len(data) - 8 and data[7 + n:8 + n] in (b"}", b" ")
    if data[8:9] not in (b"{", b"") and not ends_like_a_header:
        raise NotSafetensorsError(f"load_checkpoint: {path} is not a safetensors file (it does not "
                                  f"start with a header length and a JSON object)")
    if n < 2 or n > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(f"load_checkpoint: {path} is corrupt (header length {n})")
    if 8 + n > len(data):
        raise TruncatedCheckpointError(
            f"load_checkpoint: {path} is truncated (its header says {n} bytes, the file has "
            f"{len(data) - 8} after the length)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, ValueError):
        raise CorruptCheckpointError(f"load_checkpoint: {path} is corrupt (its header is not "
                                     f"valid JSON)") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"load_checkpoint: {path} is corrupt (its header is not a "
                                     f"JSON object)")
    return header, len(data) - 8 - n


def _check_layout(header: dict, body: int, path: str) -> None:
    """Every tensor's byte range inside the body; the body no longer than the ranges cover.
    A range past the end is a truncated file; anything else odd is corruption."""
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise CorruptCheckpointError(f"load_checkpoint: {path} is corrupt (tensor {name!r} "
                                         f"has no valid data_offsets)")
        end = max(end, offsets[1])
    if end > body:
        raise TruncatedCheckpointError(
            f"load_checkpoint: {path} is truncated (its tensors need {end} bytes, the file has "
            f"{body} after the header)")


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
