"""Expert dispatch / combine in NumPy (or CuPy): the spec every fast kernel is tested against.

A token t picks k experts, expert_index[t, j] for j = 0..k-1; each (t, j) is a *slot*.
Dispatch groups the slots by expert into one permuted buffer of R rows, so expert e
owns rows offsets[e] : offsets[e+1] and runs one dense matmul over them; combine
brings the rows back, weighted by the gates. Memory is O(T k d), not the
O(T E C) of the one-hot einsum form (GShard; see tinymoe/nn/moe/einsum.py).

Capacity: an expert keeps at most `capacity` slots (None = keep all, "dropless").
Priority is choice-major, then token order: all first choices in token order, then all
second choices, ... (GShard, Alg. 1), so dropping is deterministic and the rows of an
expert are in this priority order. A dropped slot has slot_row = -1 and contributes
nothing to combine: the token passes through the residual connection only.

A negative expert index marks an empty slot (e.g. a GShard second choice not kept, or
a token no expert chose under expert-choice routing): it is never dispatched.

Static plans (`make_static_plan`, for a captured CUDA graph): every expert owns exactly C =
capacity rows, rows e*C : (e+1)*C, so R = E*C and the row bounds are known on the host
without reading the data. Expert e's kept slots fill its first counts[e] rows in the same
priority order; the rest are padding rows (row_token = row_slot = -1), which permute fills
with zeros, the experts map to zeros (no biases; act(0) = 0), and combine never reads. The
same slots are kept and dropped as in the dynamic plan with that capacity.

A dropless static plan (capacity None) keeps every slot: R = T*k rows, the real ones first,
grouped by expert as in the dynamic plan; rows offsets[E] : R are padding (one per empty
slot). Its offsets are data, so they stay on the device (bounds None): the experts read them
there (kernels/grouped_gemm.py), and the layer still has no shape that depends on routing.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...backend import array_module, to_numpy
from ...dtypes import accumulation_dtype, is_half


@dataclass
class DispatchPlan:
    counts: object      # (E,)   int64  tokens kept per expert (<= capacity)
    offsets: object     # (E+1,) int64  first row of each expert in the permuted buffer
    slot_row: object    # (T, k) int64  row of slot (t, j) in the permuted buffer, -1 if dropped
    row_token: object   # (R,)   int64  source token of each permuted row
    row_slot: object    # (R,)   int64  flat slot index t*k + j of each row
    num_experts: int
    capacity: int | None
    bounds: tuple | None  # (E+1,) offsets as Python ints, fetched once with the plan, so that
                          # the expert matmuls read row ranges without a device sync; None for
                          # a dropless static plan (the offsets are only on the device)
    static: bool = False  # R fixed by the shapes: rows e*C : (e+1)*C per expert (capacity C),
                          # or T*k rows (dropless); padding rows marked -1

    @property
    def padding_rows(self):
        """Rows that carry no slot (0-d array; 0 for a dynamic plan)."""
        return self.num_rows - self.counts.sum()

    @property
    def num_rows(self) -> int:
        return int(self.row_token.shape[0])


def check_expert_index(expert_index, num_experts, capacity, op="make_dispatch_plan",
                       check_range=True):
    """Shared argument checks for every implementation. check_range=False skips the one
    that reads the data (a device sync on a GPU): the caller checks the maximum itself."""
    if expert_index.ndim != 2:
        raise ValueError(f"{op}: expert_index must be (T, k), got shape {tuple(expert_index.shape)}")
    if expert_index.dtype.kind not in "iu":
        raise TypeError(f"{op}: expert_index must be integer, got {expert_index.dtype}")
    if num_experts < 1:
        raise ValueError(f"{op}: num_experts must be >= 1, got {num_experts}")
    if check_range and expert_index.size:
        check_max_expert(int(expert_index.max()), num_experts, op)
    if capacity is not None and capacity < 0:
        raise ValueError(f"{op}: capacity must be >= 0 or None, got {capacity}")


def check_static(expert_index, num_experts, capacity, op="make_static_plan"):
    """The checks of a static plan: none reads the data (an index >= num_experts is dropped
    by the kernels instead of raising)."""
    check_expert_index(expert_index, num_experts, None, op, check_range=False)
    if capacity is not None and (int(capacity) != capacity or capacity < 1):
        raise ValueError(f"{op}: capacity must be an int >= 1 or None (dropless), got {capacity!r}")


def check_max_expert(max_index, num_experts, op="make_dispatch_plan"):
    if max_index >= num_experts:
        raise ValueError(f"{op}: expert index {max_index} out of range for "
                         f"num_experts={num_experts}")


def make_dispatch_plan(expert_index, num_experts: int, capacity: int | None = None) -> DispatchPlan:
    """expert_index (T, k) int -> DispatchPlan (see the module docstring)."""
    xp = array_module(expert_index)
    check_expert_index(expert_index, num_experts, capacity)
    T, k = expert_index.shape
    # Slots in priority order p = j*T + t (choice-major, then token order).
    expert_p = expert_index.T.reshape(-1).astype(xp.int64)                  # (k*T,)
    slot_p = (xp.arange(T)[None, :] * k + xp.arange(k)[:, None]).reshape(-1)  # (k*T,) t*k + j
    real = expert_p >= 0                                                      # empty slots out
    expert_p, slot_p = expert_p[real], slot_p[real]

    # A stable sort by expert keeps priority order inside each expert's group.
    order = xp.argsort(expert_p, kind="stable")
    expert_s, slot_s = expert_p[order], slot_p[order]                        # (S,)
    wanted = xp.bincount(expert_s, minlength=num_experts)                    # (E,) before capacity
    group_start = xp.concatenate([xp.zeros(1, xp.int64), xp.cumsum(wanted)[:-1]])
    rank = xp.arange(expert_s.shape[0]) - group_start[expert_s]              # place in its expert

    counts = wanted if capacity is None else xp.minimum(wanted, capacity)    # (E,)
    offsets = xp.concatenate([xp.zeros(1, xp.int64), xp.cumsum(counts)])     # (E+1,)
    keep = rank < counts[expert_s]
    rows = offsets[expert_s[keep]] + rank[keep]                              # (R,) ascending

    slot_row = xp.full(T * k, -1, dtype=xp.int64)
    slot_row[slot_s[keep]] = rows
    bounds = tuple(int(o) for o in to_numpy(offsets))
    row_slot = xp.empty(bounds[-1], dtype=xp.int64)
    row_slot[rows] = slot_s[keep]
    return DispatchPlan(counts=counts.astype(xp.int64), offsets=offsets.astype(xp.int64),
                        slot_row=slot_row.reshape(T, k), row_token=row_slot // k,
                        row_slot=row_slot, num_experts=num_experts, capacity=capacity,
                        bounds=bounds)


def make_static_plan(expert_index, num_experts: int, capacity: int | None) -> DispatchPlan:
    """The plan with capacity C = `capacity` rows per expert, or dropless with T*k rows
    (capacity None); see the module docstring."""
    xp = array_module(expert_index)
    check_static(expert_index, num_experts, capacity)
    T, k = expert_index.shape
    real = (expert_index >= 0) & (expert_index < num_experts)     # out of range: dropped, as
    plan = make_dispatch_plan(xp.where(real, expert_index, -1), num_experts, capacity)  # kernels do
    if capacity is None:                                       # dropless: padding rows at the end
        row_slot = xp.full(T * k, -1, dtype=xp.int64)
        row_slot[:plan.num_rows] = plan.row_slot
        return DispatchPlan(counts=plan.counts, offsets=plan.offsets, slot_row=plan.slot_row,
                            row_token=xp.where(row_slot >= 0, row_slot // k, -1), row_slot=row_slot,
                            num_experts=num_experts, capacity=None, bounds=None, static=True)
    E, C = num_experts, capacity
    rows = xp.arange(plan.num_rows)                                            # dynamic rows
    expert_of_row = xp.searchsorted(plan.offsets, rows, side="right") - 1      # (R,)
    static_row = expert_of_row * C + (rows - plan.offsets[expert_of_row])      # e*C + rank
    row_slot = xp.full(E * C, -1, dtype=xp.int64)
    row_slot[static_row] = plan.row_slot
    kept = plan.slot_row >= 0
    slot_row = xp.full((T, k), -1, dtype=xp.int64)
    slot_row[kept] = static_row[plan.slot_row[kept]]
    return DispatchPlan(counts=plan.counts, offsets=xp.arange(E + 1, dtype=xp.int64) * C,
                        slot_row=slot_row, row_token=xp.where(row_slot >= 0, row_slot // k, -1),
                        row_slot=row_slot, num_experts=E, capacity=C,
                        bounds=tuple(range(0, E * C + 1, C)), static=True)


def permute(x, plan: DispatchPlan):
    """x (T, d) -> xs (R, d): xs[r] = x[row_token[r]]  (gather into expert-contiguous order);
    padding rows (row_token -1) are zeros."""
    if not plan.static:
        return x[plan.row_token]
    xp = array_module(x)
    real = plan.row_token >= 0
    return x[xp.where(real, plan.row_token, 0)] * real[:, None].astype(x.dtype)


def _gather_slots(ys, plan: DispatchPlan):
    """ys (R, d) -> (T, k, d): the row of every slot, zeros for dropped slots."""
    xp = array_module(ys)
    kept = plan.slot_row >= 0                                                 # (T, k)
    g = ys[xp.where(kept, plan.slot_row, 0)] if ys.shape[0] else \
        xp.zeros(plan.slot_row.shape + ys.shape[1:], ys.dtype)
    return g * kept[..., None].astype(ys.dtype)


def permute_backward(dxs, plan: DispatchPlan, num_tokens: int):
    """dxs (R, d) -> dx (T, d): dx[t] = sum of dxs[r] over the rows r of token t (scatter-add).

    Each slot has at most one row, so the scatter-add is a gather over slot_row summed over k.
    """
    if plan.slot_row.shape[0] != num_tokens:
        raise ValueError(f"permute_backward: plan has {plan.slot_row.shape[0]} tokens, "
                         f"num_tokens={num_tokens}")
    acc = accumulation_dtype(dxs.dtype)                      # float32 sums for 16-bit rows
    return _gather_slots(dxs, plan).sum(axis=1, dtype=acc).astype(dxs.dtype, copy=False)


def combine(ys, weights, plan: DispatchPlan):
    """ys (R, d), weights (T, k) -> out (T, d): out[t] = sum_j weights[t, j] * ys[slot_row[t, j]]."""
    xp = array_module(ys)
    if weights.shape != plan.slot_row.shape:
        raise ValueError(f"combine: weights shape {tuple(weights.shape)} != expert_index shape "
                         f"{tuple(plan.slot_row.shape)}")
    if ys.shape[0] != plan.num_rows:
        raise ValueError(f"combine: ys has {ys.shape[0]} rows, plan has {plan.num_rows}")
    if is_half(ys.dtype):                  # 16-bit rows: summed in float32, out in 16 bits
        out = xp.einsum("tk,tkd->td", weights.astype("float32"),
                        _gather_slots(ys, plan).astype("float32"))
        return out.astype(ys.dtype)
    dtype = xp.result_type(ys.dtype, weights.dtype)
    return xp.einsum("tk,tkd->td", weights.astype(dtype), _gather_slots(ys, plan).astype(dtype))


def combine_backward(dout, ys, weights, plan: DispatchPlan):
    """-> dys (R, d), dweights (T, k).

    dys[r]        = weights[t, j] * dout[t]         where r = slot_row[t, j]
    dweights[t,j] = dout[t] . ys[slot_row[t, j]]    (0 for a dropped slot)
    """
    xp = array_module(dout)
    real = plan.row_slot >= 0                                                 # (R,) not padding
    w_row = weights.reshape(-1)[xp.where(real, plan.row_slot, 0)] * real      # (R,) 0 on padding
    dys = dout[xp.where(real, plan.row_token, 0)] * w_row[:, None]
    acc = xp.result_type(accumulation_dtype(dout.dtype), accumulation_dtype(ys.dtype))
    dweights = xp.einsum("td,tkd->tk", dout.astype(acc, copy=False),
                         _gather_slots(ys, plan).astype(acc, copy=False))
    return dys.astype(ys.dtype), dweights.astype(weights.dtype)
