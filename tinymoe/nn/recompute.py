"""Activation recomputation ("gradient checkpointing"): trade compute for memory.

    y = recompute(block, x)

runs `block(x)` without recording its graph, so none of the block's intermediate
activations stay in memory: only its input x is kept. In the backward, the block runs
again from x, this time recording, and the gradient flows through that fresh graph:

    memory:  per block, one (B, L, d) input instead of everything the block's ops save
             (for a transformer block some 10 B L d + B H L^2 floats: see
             tinymoe/accounting/memory.py :: gpt_activation_bytes)
    compute: one more forward per block, about 1/3 more FLOPs per training step
             (forward 1, backward 2, recomputed forward 1)

This is the "full recomputation" of the memory-of-training lecture (Chen et al. 2016;
Korthikanti et al. 2022 recompute selectively, only the attention scores). Random draws
(dropout) replay exactly: the generators' state is saved before the forward and restored
for the recomputation, so both forwards see the same masks.

Parameters inside the block are not inputs of the recorded node: the recomputation's own
backward accumulates their `.grad`, as a direct backward through the block would.
"""
from __future__ import annotations

from .. import backend
from ..autograd.function import Function, op_error
from ..autograd.grad_mode import enable_grad, is_grad_enabled, no_grad
from ..autograd.tensor import Tensor


class Recompute(Function):
    """out = fn(*inputs), keeping only the inputs; backward = fn again, then its backward."""

    @staticmethod
    def forward(ctx, *arrays, fn):
        ctx.block = fn                                      # (ctx.fn is this Function)
        ctx.rng_state = backend.get_rng_state()            # replayed by the recomputation
        ctx.save(*arrays)
        with no_grad():
            out = fn(*(Tensor._make(a, False, None, 0) for a in arrays))
        if not isinstance(out, Tensor):
            raise op_error("recompute", f"the function must return one Tensor, got {type(out).__name__}",
                           TypeError)
        return out.data

    @staticmethod
    def backward(ctx, grad):
        inputs = [Tensor._make(a, needs, None, 0) for a, needs in zip(ctx.saved, ctx.needs_input_grad)]
        now = backend.get_rng_state()
        backend.set_rng_state(ctx.rng_state)
        try:
            with enable_grad():
                out = ctx.block(*inputs)                    # the same forward, recorded
        finally:
            backend.set_rng_state(now)
        if out.requires_grad:
            out.backward(grad)                              # parameters' .grad accumulate here
        return tuple(x.grad if x.requires_grad else None for x in inputs)


def recompute(fn, *inputs):
    """fn(*inputs) (Tensors in, one Tensor out), recomputed in the backward instead of
    stored. A plain call when no graph is recorded (under no_grad) or when no input needs
    a gradient (the node would have no backward to reach the parameters through)."""
    if not is_grad_enabled() or not any(isinstance(x, Tensor) and x.requires_grad for x in inputs):
        return fn(*inputs)
    return Recompute.apply(*inputs, fn=fn)
