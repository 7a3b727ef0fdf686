"""A checkpoint layout as a table: one row per tinymoe parameter, naming the Hugging Face
tensors it is made of and the layout that turns one into the other, both ways.

    Row("blocks.{i}.attn.proj.weight", ["model.layers.{i}.self_attn.o_proj.weight"], SAME)

"{i}" stands for the layer, "{e}" for the expert. Layouts:
    SAME            the same array
    ExpertsStacked  E nn.Linear weights (out, in), one per expert  <->  one (E, in, out) stack
    GroupedQKV      q_proj, k_proj, v_proj  <->  one qkv weight whose rows run per K/V group:
                    the G query heads of the group, then its key head, then its value head
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class Same:
    """theirs = ours."""

    def to_ours(self, arrays):
        return arrays[0]

    def to_theirs(self, array):
        return [array]

    def __repr__(self):
        return "same"


SAME = Same()


@dataclass(frozen=True)
class ExpertsStacked:
    """W_e (out, in) for e < E (an nn.Linear per expert)  <->  stack_e W_e^T  (E, in, out)."""
    num_experts: int

    def to_ours(self, arrays):
        return np.stack([w.T for w in arrays])                         # (E, in, out)

    def to_theirs(self, array):
        return [array[e].T for e in range(self.num_experts)]           # E x (out, in)


@dataclass(frozen=True)
class GroupedQKV:
    """q (H dh, d), k, v (Hkv dh, d)  <->  qkv ((H + 2 Hkv) dh, d) in rows (Hkv, G + 2, dh):
    query head h = j G + r belongs to K/V head j (transformers' repeat_kv), G = H / Hkv."""
    n_heads: int
    n_kv_heads: int

    def to_ours(self, arrays):
        q, k, v = arrays
        Hkv, G, d = self.n_kv_heads, self.n_heads // self.n_kv_heads, q.shape[1]
        dh = q.shape[0] // self.n_heads
        groups = [q.reshape(Hkv, G, dh, d), k.reshape(Hkv, 1, dh, d), v.reshape(Hkv, 1, dh, d)]
        return np.concatenate(groups, axis=1).reshape(-1, d)

    def to_theirs(self, array):
        Hkv, G, d = self.n_kv_heads, self.n_heads // self.n_kv_heads, array.shape[1]
        rows = array.reshape(Hkv, G + 2, -1, d)                        # (Hkv, G + 2, dh, d)
        dh = rows.shape[2]
        return [rows[:, :G].reshape(Hkv * G * dh, d), rows[:, G].reshape(Hkv * dh, d),
                rows[:, G + 1].reshape(Hkv * dh, d)]


@dataclass(frozen=True)
class Row:
    ours: str
    theirs: tuple
    layout: object = SAME


def expand(table, n_layer: int, num_experts: int = 0):
    """The rows for every layer (and expert): [(our name, [their names], layout)]."""
    out = []
    for row in table:
        for i in range(n_layer) if "{i}" in row.ours else [None]:
            names = []
            for pattern in row.theirs:
                for e in range(num_experts) if "{e}" in pattern else [None]:
                    names.append(pattern.format(i=i, e=e))
            out.append((row.ours.format(i=i), names, row.layout))
    return out
