"""Reverse-mode differentiation: walk the graph from the output back to the leaves.

The walk is iterative (an explicit stack, no recursion), so a chain of 20,000 ops
backpropagates without hitting Python's recursion limit.
"""
from __future__ import annotations

import time

from . import function
from .tensor import Tensor


def _topological_order(root_ctx):
    """Graph nodes (Contexts) reachable from `root_ctx`, each after all its parents."""
    order = []
    visited = set()  # expanded nodes; marked when expanded, not when pushed, so that a
    stack = [(root_ctx, False)]  # node reached twice still lands after all its consumers
    while stack:
        ctx, parents_done = stack.pop()
        if parents_done:
            order.append(ctx)
            continue
        if id(ctx) in visited:
            continue
        visited.add(id(ctx))
        if ctx.freed:
            raise RuntimeError(
                f"backward: the graph through {ctx.fn.__name__} was already freed by an "
                "earlier backward(); call backward(retain_graph=True) the first time to "
                "backpropagate through it twice"
            )
        stack.append((ctx, True))
        for x in ctx.inputs:
            if isinstance(x, Tensor) and x._ctx is not None and id(x._ctx) not in visited:
                stack.append((x._ctx, False))
    return order


def _accumulate_leaf(leaf: Tensor, grad):
    if grad.shape != leaf.data.shape:
        raise RuntimeError(
            f"backward: gradient of shape {grad.shape} for a tensor of shape {leaf.shape}"
        )
    if leaf.grad is None:
        buffer = getattr(leaf, "grad_buffer", None)  # a fixed home (tinymoe/optim/flat.py)
        if buffer is not None and buffer.dtype == grad.dtype:
            buffer[...] = grad
            leaf.grad = buffer
        else:
            leaf.grad = grad.copy()  # own it: op backwards may hand out shared arrays
    else:
        leaf.grad += grad


def backward(root: Tensor, grad, retain_graph: bool = False):
    """Fill `.grad` of every leaf that `root` depends on (and requires grad)."""
    if root._ctx is None:  # a leaf: d root / d root = 1
        _accumulate_leaf(root, grad)
        return
    order = _topological_order(root._ctx)
    # Output gradients of every node, accumulated as its consumers are processed.
    pending = {id(root._ctx): [None] * root._ctx.n_outputs}
    pending[id(root._ctx)][root._out_index] = grad
    for ctx in reversed(order):
        out_grads = pending.pop(id(ctx), None)
        if out_grads is None:  # no path from the root reaches this node's outputs
            continue
        if ctx.n_outputs > 1 and any(g is None for g in out_grads):
            out_grads = _fill_missing(ctx, out_grads)
        start = time.perf_counter() if function._op_hooks else 0.0
        in_grads = ctx.fn.backward(ctx, *out_grads)
        if not isinstance(in_grads, tuple):
            in_grads = (in_grads,)
        if function._op_hooks:
            function._run_hooks(
                ctx.fn.__name__, "backward", tuple(out_grads),
                tuple(g for g in in_grads if g is not None), {}, time.perf_counter() - start,
                ctx,
            )
        inputs = ctx.inputs
        if len(in_grads) != len(inputs):
            raise RuntimeError(
                f"{ctx.fn.__name__}.backward returned {len(in_grads)} gradients "
                f"for {len(inputs)} inputs"
            )
        if not retain_graph:
            ctx.saved = None
            ctx.inputs = None
            ctx.freed = True
        for x, g in zip(inputs, in_grads):
            if g is None or not isinstance(x, Tensor) or not x.requires_grad:
                continue
            if g.dtype != x.data.dtype:  # a gradient has its tensor's dtype (mixed precision:
                g = g.astype(x.data.dtype)  # a float32 softmax's gradient into bfloat16 logits)
            if x._ctx is None:
                _accumulate_leaf(x, g)
            else:
                slots = pending.setdefault(id(x._ctx), [None] * x._ctx.n_outputs)
                i = x._out_index
                slots[i] = g if slots[i] is None else slots[i] + g


def _fill_missing(ctx, out_grads):
    """Outputs nobody used get a zero gradient (ops with several outputs, e.g. split)."""
    shapes = ctx.output_shapes
    dtypes = ctx.output_dtypes
    xp = ctx.xp
    return [
        xp.zeros(shape, dtype) if g is None else g
        for g, shape, dtype in zip(out_grads, shapes, dtypes)
    ]
