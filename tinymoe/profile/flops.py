"""FLOPs and bytes of one op call, from the arrays an op hook sees.

Convention: one add, multiply, compare, or transcendental (exp, log, tanh, erf) is
one FLOP; a multiply-add is two. The counts below are the operations of the formula
each tinymoe op computes (its docstring), so for matmul, linear and elementwise
arithmetic they are exact:
    matmul (b, m, k) @ (b, k, n):  2 b m k n        forward
                                   2 b m k n        backward, per input gradient
    linear (M, in) -> (M, out):    2 M in out (+ M out for the bias)
    add / sub / mul / div:         one per output element

Backward events carry the upstream gradients (`inputs`) and the input gradients
(`outputs`, those that are not None), not the forward's arrays: a rule reads the
forward's shapes off the gradients, which have the same shapes.
Ops that only move data (reshape, transpose, indexing, concat, ...) count 0 FLOPs;
an op with no rule counts None ("?" in tables). `register_flops` adds a rule.
"""
from __future__ import annotations

import math

from ..backend import array_module


def _size(a) -> int:
    return int(a.size) if hasattr(a, "size") and hasattr(a, "shape") else 0


def _arrays(xs):
    return [x for x in xs if hasattr(x, "shape") and hasattr(x, "dtype")]


# -------------------------------------------------------------- elementwise
# FLOPs per output element of forward and (per input gradient) backward.
ELEMENTWISE = {
    #            forward  backward
    "Add":      (1, 0),     # dx = g
    "Sub":      (1, 0),     # dx = g, dy = -g (counted 0: a sign)
    "Mul":      (1, 1),     # dx = g y
    "Div":      (1, 1),     # dx = g / y   (dy = -g x / y^2: 3, see _div_backward)
    "Neg":      (1, 1),
    "Pow":      (1, 3),     # dx = g p x^(p-1)
    "Exp":      (1, 1),     # g y
    "Log":      (1, 1),     # g / x
    "Sqrt":     (1, 2),     # g / (2 y)
    "Abs":      (1, 2),     # g sign(x)
    "Relu":     (1, 2),     # g (x > 0)
    "Tanh":     (1, 3),     # g (1 - y^2)
    "Sigmoid":  (4, 3),     # 1 / (1 + exp(-x));  g s (1 - s)
    "Silu":     (5, 5),     # x s;  g (s (1 + x (1 - s)))
    "Softplus": (6, 5),     # max(x, 0) + log1p(exp(-|x|));  g sigmoid(x)
    "Dropout":  (3, 1),     # compare, scale the mask, multiply;  g * scale
}
GELU = {"none": (5, 10), "tanh": (9, 16)}

# Reductions over the input: FLOPs per input element (forward, backward).
REDUCTION = {
    "Sum":       (1, 0),    # n - 1 adds per output (exact below)
    "Mean":      (1, 1),
    "Max":       (1, 2),
    "Min":       (1, 2),
    "Var":       (4, 3),
    "LogSumExp": (4, 3),
    "Cumsum":    (1, 1),
    "Softmax":   (5, 4),    # max, subtract, exp, sum, divide;  p (g - sum(g p))
    "LogSoftmax": (5, 4),
    "CrossEntropy": (5, 2),
}
# Norms over the last axis, per element: forward; backward dx, dw (mul + sum), db (sum).
NORM = {
    "LayerNorm": (7, 8),    # mean, center, square, mean, scale, weight, (bias: +1)
    "RMSNorm":   (4, 6),    # square, mean, scale, weight
}

# Ops that move data and compute nothing (their backward scatters or sums: counted).
DATA_MOVEMENT = {
    "Reshape", "Transpose", "BroadcastTo", "Concat", "Stack", "Split", "Pad", "GetItem",
    "Gather", "Embedding", "ToDevice", "Cast", "Where", "TopK",
}
_SCATTER_IN_BACKWARD = {"GetItem", "Gather", "Embedding", "BroadcastTo", "Permute"}


def _matmul(phase, inputs, outputs, params):
    if phase == "forward":
        x, out = inputs[0], outputs[0]
        return 2 * _size(out) * x.shape[-1]
    (g,) = inputs                           # dL/dZ (..., m, n)
    total = 0
    for d in outputs:                       # dX (..., m, k) or dY (..., k, n)
        k = d.shape[-1] if d.shape[-2:-1] == g.shape[-2:-1] and d.ndim == g.ndim else d.shape[-2]
        total += 2 * _size(g) * k
    return total


def _linear(phase, inputs, outputs, params):
    if phase == "forward":
        w = inputs[1]
        bias = len(inputs) > 2 and inputs[2] is not None
        out = outputs[0]
        return 2 * _size(out) * w.shape[1] + (_size(out) if bias else 0)
    (g,) = inputs                           # (..., out)
    total = 0
    for d in outputs:
        if d.ndim == 1 and g.ndim > 1 and d.shape[0] == g.shape[-1]:
            total += _size(g)               # db: sum over rows
        else:
            total += 2 * _size(g) * d.shape[-1]     # dx = g W, dW = g^T x: 2 M out in
    return total


def _conv1d(phase, inputs, outputs, params):
    if phase == "forward":
        x, w = inputs[0], inputs[1]
        bias = len(inputs) > 2 and inputs[2] is not None
        return 2 * _size(x) * w.shape[-1] + (_size(x) if bias else 0)
    (g,) = inputs
    total = 0
    for d in outputs:
        if d.ndim == 3 and d.shape[1] == 1:         # dw (C, 1, K)
            total += 2 * _size(g) * d.shape[-1]
        elif d.ndim == 1:                           # db
            total += _size(g)
        else:                                       # dx: K taps per element
            total += 2 * _size(g) * _conv_k(outputs)
    return total


def _conv_k(outputs):
    for d in outputs:
        if d.ndim == 3 and d.shape[1] == 1:
            return d.shape[-1]
    return 1  # dw not requested: K is unknown from the gradients alone


def _elementwise(name):
    fwd, bwd = ELEMENTWISE[name]

    def rule(phase, inputs, outputs, params):
        if phase == "forward":
            return fwd * sum(_size(o) for o in outputs)
        (g,) = inputs[:1]
        total = 0
        for i, d in enumerate(outputs):
            per = 3 if (name == "Div" and i == 1) else bwd
            total += per * _size(g)
            if _size(d) < _size(g):                 # broadcast input: sum_to_shape
                total += _size(g) - _size(d)
        return total

    return rule


def _gelu(phase, inputs, outputs, params):
    # backward events carry no params: the exact (erf) form is assumed there
    fwd, bwd = GELU[params.get("approximate", "none")]
    return fwd * _size(outputs[0]) if phase == "forward" else bwd * _size(inputs[0])


def _reduction(name):
    fwd, bwd = REDUCTION[name]

    def rule(phase, inputs, outputs, params):
        if phase == "forward":
            n = _size(inputs[0])
            if name == "Sum":
                return n - _size(outputs[0])       # n - 1 adds per output
            return fwd * n
        return bwd * sum(_size(d) for d in outputs)

    return rule


def _norm(name):
    fwd, bwd_dx = NORM[name]

    def rule(phase, inputs, outputs, params):
        if phase == "forward":
            bias = len(inputs) > 2 and inputs[2] is not None
            return (fwd + bias) * _size(outputs[0])
        n = _size(inputs[0])
        total = 0
        vectors = 0                                 # dw then db, in input order
        for d in outputs:
            if d.shape == inputs[0].shape:
                total += bwd_dx * n
            else:
                total += (2 if vectors == 0 else 1) * n
                vectors += 1
        return total

    return rule


def _scatter_add(phase, inputs, outputs, params):
    return _size(inputs[-1]) if phase == "forward" else 0


def _data_movement(name):
    def rule(phase, inputs, outputs, params):
        if phase == "backward" and name in _SCATTER_IN_BACKWARD:
            return _size(inputs[0])                 # scatter-add / sum of the gradient
        return 0

    return rule


# ------------------------------------------------- tinymoe's model-level ops
def _causal_attention(phase, inputs, outputs, params):
    """softmax(Q K^T * scale + M) V: two matmuls over the (Lq, Lk) scores, 6 FLOPs per
    score for scale, max, subtract, exp, sum, divide. Backward (dQ, dK, dV all needed):
    dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q and 5 per score for dS; with
    keep_probs=False, P is first rebuilt: Q K^T again and 3 per score (scale, - lse, exp)."""
    if phase == "forward":
        q, k, out = inputs[0], inputs[1], outputs[0]
        scores = _size(out) // out.shape[-1] * k.shape[-2]
        return scores * (2 * q.shape[-1] + 2 * out.shape[-1] + 6)
    (g,) = inputs
    d, Lk = outputs[0].shape[-1], outputs[-1].shape[-2]
    scores = _size(g) // g.shape[-1] * Lk
    recompute = 0 if params.get("keep_probs", True) else 2 * d + 3
    return scores * (2 * g.shape[-1] * 2 + 2 * d * 2 + 5 + recompute)


def _selective_scan(phase, inputs, outputs, params):
    """7 FLOPs per (channel, state, step) and 8 per (channel, step), as counted in
    tinymoe.accounting.arithmetic; the backward recomputes the states (1x) and runs the
    reverse recurrence with its gradient sums (about 2x): counted as 3x the forward."""
    from ..accounting.arithmetic import SCAN_FLOPS_PER_CHANNEL, SCAN_FLOPS_PER_STATE

    u = inputs[0]
    if phase == "backward":                       # dout has u's shape; A's grad is (d, N)
        n_state = next((d.shape[-1] for d in outputs if d.ndim == 2), 16)
        return 3 * _size(u) * (SCAN_FLOPS_PER_STATE * n_state + SCAN_FLOPS_PER_CHANNEL)
    n_state = inputs[2].shape[-1]
    return _size(u) * (SCAN_FLOPS_PER_STATE * n_state + SCAN_FLOPS_PER_CHANNEL)


def _grouped_linear(phase, inputs, outputs, params):
    """Each expert's rows times its weight: 2 R in out, like one big linear."""
    if phase == "forward":
        xs, out = inputs[0], outputs[0]
        return 2 * _size(out) * xs.shape[-1]
    (g,) = inputs
    return sum(2 * _size(g) * (d.shape[-2] if d.ndim == 3 else d.shape[-1]) for d in outputs)


def _combine(phase, inputs, outputs, params):
    """out[t] = sum_j w[t, j] ys[row]: a multiply-add per (t, j, feature)."""
    if phase == "forward":
        weights, out = inputs[1], outputs[0]
        return 2 * _size(weights) * out.shape[-1]
    (g,) = inputs
    k = next((d.shape[-1] for d in outputs if d.ndim == 2 and d.shape[0] == g.shape[0]), 1)
    return 3 * _size(g) * k                       # dys = w g, dw = g . ys


RULES = {"MatMul": _matmul, "LinearFunction": _linear, "Conv1dCausal": _conv1d,
         "Gelu": _gelu, "ScatterAdd": _scatter_add, "IndexAdd": _scatter_add}
RULES.update({"CausalAttention": _causal_attention, "SelectiveScan": _selective_scan,
              "GroupedLinear": _grouped_linear, "Combine": _combine,
              "Permute": _data_movement("Permute"), "AllToAll": _data_movement("AllToAll")})
RULES.update({name: _elementwise(name) for name in ELEMENTWISE})
RULES.update({name: _reduction(name) for name in REDUCTION})
RULES.update({name: _norm(name) for name in NORM})
RULES.update({name: _data_movement(name) for name in DATA_MOVEMENT})


def register_flops(op: str, rule) -> None:
    """Teach the profiler an op: rule(phase, inputs, outputs, params) -> FLOPs."""
    if not callable(rule):
        raise TypeError(f"register_flops: rule for {op!r} must be callable, got {type(rule).__name__}")
    RULES[op] = rule


def op_flops(op, phase, inputs, outputs, params):
    """FLOPs of one forward or backward call, or None when no rule knows the op."""
    rule = RULES.get(op)
    if rule is None:
        return None
    return int(rule(phase, _arrays(inputs), _arrays(outputs), params or {}))


def op_bytes(op, phase, inputs, outputs):
    """(bytes read, bytes written) of one call.

    forward: every array input is read once, every output written once; an output
    that is a view of an input (reshape, transpose, basic slicing) moves nothing.
    backward: the upstream gradients are read, plus arrays the size of the input
    gradients (the saved inputs have those shapes); the input gradients are written
    (nothing when they are views of the upstream gradients).
    """
    ins, outs = _arrays(inputs), _arrays(outputs)
    if phase == "forward":
        moved = [o for o in outs if not any(_is_view(o, x) for x in ins)]
        if not moved:
            return 0, 0
        return sum(int(x.nbytes) for x in ins), sum(int(o.nbytes) for o in moved)
    moved = [d for d in outs if not any(_is_view(d, g) for g in ins)]
    if not moved:                                 # reshape / transpose of the gradient
        return 0, 0
    written = sum(int(d.nbytes) for d in moved)
    return sum(int(g.nbytes) for g in ins) + written, written


def _is_view(out, x) -> bool:
    xp = array_module(out)
    try:
        return bool(xp.may_share_memory(out, x))
    except (AttributeError, TypeError):
        return False


def intensity(flops, bytes_moved) -> float:
    """Arithmetic intensity, FLOPs per byte (inf when nothing moved)."""
    if not bytes_moved:
        return math.inf if flops else 0.0
    return flops / bytes_moved
