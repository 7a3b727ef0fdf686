"""Synthetic tasks of the Mamba paper (Sec. 4.1): where time-invariant models fail.

Selective Copying: a few data tokens scattered at random positions among noise
tokens must be reproduced, in order, after the sequence. Where they sit varies, so
a fixed convolution kernel (an LTI SSM) cannot pick them out; a selective model
can decide per token what to keep.

    inputs : 0 0 7 0 0 0 3 0 5 0 0 0 | M M M        (0 = noise, M = marker)
    targets: . . . . . . . . . . . . | 7 3 5        (. = ignore_index, not scored)

Induction Heads: after "... s t ... s", predict t: recall the token that followed
the earlier occurrence of the trigger s (an associative recall, the mechanism of
in-context learning). Train at one length, evaluate at longer ones.

    inputs : 4 2 9 s 6 1 3 8 ... 2 s                 targets: . . . . ... . 6

All functions return (inputs, targets): int64 arrays (B, T), targets = ignore_index
where nothing is scored.
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def _rng(rng):
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def selective_copying(batch_size: int, seq_len: int = 64, num_tokens: int = 8,
                      vocab_size: int = 10, rng=None):
    """(inputs, targets) of shape (B, seq_len + num_tokens).

    Token 0 is noise, token vocab_size - 1 the marker, data tokens are 1..vocab_size-2.
    num_tokens data tokens are placed at distinct random positions of the first
    seq_len steps; the marker then repeats num_tokens times, and at marker i the
    target is the i-th data token."""
    if vocab_size < 3:
        raise ValueError(f"selective_copying: vocab_size must be >= 3 (noise, marker, data), "
                         f"got {vocab_size}")
    if not 1 <= num_tokens <= seq_len:
        raise ValueError(f"selective_copying: need 1 <= num_tokens <= seq_len, got "
                         f"num_tokens={num_tokens}, seq_len={seq_len}")
    rng = _rng(rng)
    marker = vocab_size - 1
    data = rng.integers(1, marker, (batch_size, num_tokens))               # (B, k)
    # distinct sorted positions per row: the first k of a random permutation
    pos = np.sort(np.argsort(rng.random((batch_size, seq_len)), axis=1)[:, :num_tokens], axis=1)
    inputs = np.zeros((batch_size, seq_len + num_tokens), np.int64)
    np.put_along_axis(inputs, pos, data, axis=1)
    inputs[:, seq_len:] = marker
    targets = np.full_like(inputs, IGNORE_INDEX)
    targets[:, seq_len:] = data
    return inputs, targets


def induction_heads(batch_size: int, seq_len: int = 64, vocab_size: int = 16, rng=None):
    """(inputs, targets) of shape (B, seq_len).

    Token vocab_size - 1 is the trigger s, the others are random. s appears once at a
    random position p < seq_len - 2, followed by the answer t, and again as the last
    token; only the last position is scored, with target t."""
    if vocab_size < 3:
        raise ValueError(f"induction_heads: vocab_size must be >= 3, got {vocab_size}")
    if seq_len < 4:
        raise ValueError(f"induction_heads: seq_len must be >= 4, got {seq_len}")
    rng = _rng(rng)
    trigger = vocab_size - 1
    inputs = rng.integers(0, trigger, (batch_size, seq_len))
    rows = np.arange(batch_size)
    p = rng.integers(0, seq_len - 3, batch_size)                            # first trigger
    inputs[rows, p] = trigger
    answer = inputs[rows, p + 1]
    inputs[:, -1] = trigger
    targets = np.full_like(inputs, IGNORE_INDEX)
    targets[:, -1] = answer
    return inputs.astype(np.int64), targets.astype(np.int64)


def token_accuracy(logits, targets, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of scored positions (targets != ignore_index) where argmax(logits) is right."""
    logits = np.asarray(logits)
    scored = targets != ignore_index
    if not scored.any():
        raise ValueError("token_accuracy: no scored position (all targets are ignore_index)")
    return float((logits.argmax(axis=-1)[scored] == targets[scored]).mean())
