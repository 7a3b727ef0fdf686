"""Byte-level tokenizer: a token is one UTF-8 byte, so the vocabulary is 256 and any text works.

Loss per token is then loss per byte, and bits/byte = nats/byte / ln 2.
"""
from __future__ import annotations

import numpy as np

VOCAB_SIZE = 256


def encode(text: str) -> np.ndarray:
    """str -> (n,) int64 token ids, the UTF-8 bytes of `text`."""
    if not isinstance(text, str):
        raise TypeError(f"encode: expected str, got {type(text).__name__}")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


START_BYTE = 10   # "\n": where a sample starts when the prompt is empty (a fresh line of text)


def prompt_ids(text: str) -> np.ndarray:
    """A prompt's ids (n,); an empty prompt starts from START_BYTE, a newline, since every
    model needs at least one token to condition on."""
    ids = encode(text)
    return ids if ids.size else np.array([START_BYTE], np.int64)


def decode(ids) -> str:
    """ids (any int sequence in [0, 256)) -> str; invalid UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
        raise ValueError(f"decode: token ids must lie in [0, {VOCAB_SIZE}), got range "
                         f"[{ids.min()}, {ids.max()}]")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
