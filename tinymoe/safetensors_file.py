"""The safetensors file format, written and read here in NumPy.

    8 bytes   N, the header length (little-endian uint64)
    N bytes   a JSON object: for each tensor {"dtype": "F32", "shape": [...],
              "data_offsets": [begin, end]} (bytes within the data), and "__metadata__",
              a dict of strings; padded with spaces to a multiple of 8 bytes
    the rest  the tensors' raw bytes, little-endian, C order, back to back

Nothing in a file is ever executed (no pickle): the header is JSON, the tensors raw numbers.
Writing orders the tensors by item size (largest first), then name, so that each starts at a
multiple of its item size, as the `safetensors` library does; `tests/test_safetensors_file.py`
checks that each side reads what the other writes. The format is this small, and tinymoe
already parses headers itself for its own error messages (checkpoint.py), so it does not
depend on the library's compiled extension: `tinymoe train` runs wherever NumPy does.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .dtypes import bfloat16

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
          **({"BF16": bfloat16} if bfloat16 is not None else {})}
NAMES = {np.dtype(t): name for name, t in DTYPES.items()}
METADATA = "__metadata__"


def save(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write tensors (name -> NumPy array) and metadata (str -> str) to `path`."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str)
                                        for k, v in metadata.items()):
        raise TypeError("safetensors: metadata must map strings to strings")
    arrays = {}
    for name, a in tensors.items():
        a = np.asarray(a, order="C")                   # (ascontiguousarray makes 0-d 1-d)
        if a.dtype.newbyteorder("<") not in NAMES:
            raise TypeError(f"safetensors: tensor {name!r} has dtype {a.dtype}, which the format "
                            f"has no name for here ({', '.join(DTYPES)})")
        arrays[name] = a.astype(a.dtype.newbyteorder("<"), copy=False)
    order = sorted(arrays, key=lambda name: (-arrays[name].itemsize, name))
    header, begin = {}, 0
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [begin, begin + a.nbytes]}
        begin += a.nbytes
    if metadata:
        header = {METADATA: metadata, **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)                                 # data starts 8-aligned
    with open(os.fspath(path), "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            f.write(arrays[name].reshape(-1).view(np.uint8))


def tensors_from(header: dict, data, start: int) -> dict:
    """name -> array (a copy) of a parsed header's tensors, whose raw bytes begin at `start`
    of `data` (the whole file's bytes). Raises ValueError on an unknown dtype, a byte range
    that does not hold its shape, or ranges that leave gaps, overlap or stop short of the end."""
    entries = sorted(((info["data_offsets"], name, info) for name, info in header.items()
                      if name != METADATA), key=lambda e: e[0][0])
    tensors, end = {}, 0
    for (begin, stop), name, info in entries:
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"tensor {name!r} has dtype {info.get('dtype')!r}, which is not one "
                             f"of {', '.join(DTYPES)}")
        shape = info.get("shape")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise ValueError(f"tensor {name!r} has shape {shape!r}")
        count = int(np.prod(shape, dtype=np.int64))
        if begin != end or stop - begin != count * np.dtype(dtype).itemsize:
            raise ValueError(f"tensor {name!r}: bytes {begin}..{stop} do not follow byte {end} "
                             f"or do not hold {info['dtype']}{tuple(shape)}")
        tensors[name] = np.frombuffer(data, dtype, count, start + begin).reshape(shape).copy()
        end = stop
    if start + end != len(data):
        raise ValueError(f"the tensors cover {end} bytes, the data has {len(data) - start}")
    return tensors
