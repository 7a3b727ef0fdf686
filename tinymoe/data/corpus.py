"""Corpora as byte arrays, and a seeded sampler of (input, target) batches.

The default corpus is on every machine with no download: the Python standard
library's own .py sources (no site-packages, no tests). Files are read in sorted
order and split into train / validation by a hash of their path, so the split is
the same on every run and every machine with the same Python.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass

import numpy as np

# Folders of the standard library that are not "ordinary Python code" or are huge tests.
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                 "turtledemo", "__pycache__", "ensurepip", "pydoc_data", "encodings"}


@dataclass
class Corpus:
    """Train and validation token streams (uint8 bytes = token ids) and where they came from."""
    train: np.ndarray   # (N_train,) uint8
    val: np.ndarray     # (N_val,)   uint8
    source: str

    def __repr__(self):
        return (f"Corpus({self.source!r}, train={len(self.train):,} bytes, "
                f"val={len(self.val):,} bytes)")


def stdlib_files(root: str | None = None) -> list[str]:
    """Sorted paths of the standard library's .py files, without tests and site-packages."""
    root = root or sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS
                             and not d.startswith("test"))
        paths += [os.path.join(dirpath, f) for f in filenames
                  if f.endswith(".py") and not f.startswith("test_")]
    return sorted(paths)


def _is_val(relpath: str, val_fraction: float) -> bool:
    """Deterministic split: the first 4 bytes of md5(path) as a number in [0, 1)."""
    h = int.from_bytes(hashlib.md5(relpath.encode()).digest()[:4], "little")
    return h / 2**32 < val_fraction


def load_files(paths, root: str, val_fraction: float = 0.05, max_bytes: int | None = None,
               source: str | None = None) -> Corpus:
    """Files read in the given order (until max_bytes), each put whole into train or val
    by a hash of its path relative to `root`."""
    train, val, total = [], [], 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            continue
        (val if _is_val(os.path.relpath(path, root), val_fraction) else train).append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    if not train or not val:
        raise RuntimeError(f"load_files: found too few non-empty files under {root} "
                           f"({len(train)} train, {len(val)} validation)")
    return Corpus(np.frombuffer(b"".join(train), np.uint8),
                  np.frombuffer(b"".join(val), np.uint8), source or root)


def load_stdlib(max_bytes: int = 16_000_000, val_fraction: float = 0.05) -> Corpus:
    """The default corpus: stdlib sources, read in sorted order until `max_bytes`."""
    root = sysconfig.get_paths()["stdlib"]
    return load_files(stdlib_files(root), root, val_fraction, max_bytes,
                      f"python stdlib ({root})")


def load_text_file(path: str, val_fraction: float = 0.1) -> Corpus:
    """Any text file: the first (1 - val_fraction) of its bytes train, the rest validate."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data: file {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"--data: {path!r} is a directory, expected a text file")
    with open(path, "rb") as f:
        data = np.frombuffer(f.read(), np.uint8)
    if len(data) == 0:
        raise ValueError(f"--data: file {path!r} is empty")
    n_val = max(int(len(data) * val_fraction), 1)
    return Corpus(data[:-n_val], data[-n_val:], path)  # check_length(corpus, L) before use


def load_corpus(data: str | None = None, max_bytes: int = 16_000_000) -> Corpus:
    """`data=None`: the stdlib corpus; otherwise the text file at that path."""
    return load_stdlib(max_bytes) if data is None else load_text_file(data)


def check_length(corpus: Corpus, block_size: int) -> None:
    """Both splits must hold at least one window of block_size + 1 bytes."""
    for name, split in (("train", corpus.train), ("validation", corpus.val)):
        if len(split) < block_size + 1:
            raise ValueError(
                f"corpus {corpus.source!r}: the {name} split has {len(split)} bytes, too short "
                f"for context length {block_size} (needs at least {block_size + 1}); use a "
                f"longer file or a smaller --block-size")


class BatchSampler:
    """Random windows of a byte stream: x = data[i : i+L], y = data[i+1 : i+L+1].

    Draws from its own seeded generator, so a run is reproducible and resumable.
    """

    def __init__(self, data: np.ndarray, batch_size: int, block_size: int, seed: int = 0):
        if len(data) < block_size + 1:
            raise ValueError(f"BatchSampler: data has {len(data)} tokens, needs at least "
                             f"block_size + 1 = {block_size + 1}")
        self.data, self.batch_size, self.block_size = data, batch_size, block_size
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        """-> x, y: (B, L) int64 each."""
        L = self.block_size
        starts = self.rng.integers(0, len(self.data) - L, size=self.batch_size)  # (B,)
        idx = starts[:, None] + np.arange(L + 1)                                  # (B, L+1)
        window = self.data[idx].astype(np.int64)
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]


def eval_batches(data: np.ndarray, batch_size: int, block_size: int, max_batches: int):
    """Fixed, evenly spaced validation windows, the same every evaluation: yields (x, y)."""
    L = block_size
    n_windows = min(max_batches * batch_size, max((len(data) - 1) // L, 1))
    starts = np.linspace(0, len(data) - L - 1, n_windows).astype(np.int64)
    for i in range(0, n_windows, batch_size):
        idx = starts[i:i + batch_size, None] + np.arange(L + 1)
        window = data[idx].astype(np.int64)
        yield window[:, :-1], window[:, 1:]
