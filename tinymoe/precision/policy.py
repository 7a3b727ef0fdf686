"""The precision policy of a training run: `--precision {fp32,tf32,bf16,fp16}`.

    policy = get_precision("bf16")
    optimizer, precision = policy.apply(model, optimizer)   # after any checkpoint is loaded
    step = make_step(model, optimizer, grad_clip, precision=precision)

Three dtypes are three different things (docs/precision.md):
  storage and compute   the model's weights, activations and gradients: float32, or 16 bits
                        (bfloat16, float16), in which matmuls, attention, the experts and
                        the scan's inputs run (on tensor cores, summing in float32);
  accumulation          every sum: softmax, norms, losses, router probabilities, means,
                        the scan's state: float32 (the ops do this for 16-bit inputs);
  optimizer             float32 master weights and moments (optim/master.py).

    name   model dtype   float32 matmuls   master weights   loss scaling
    fp32   float32       exact (float32)   -                -
    tf32   float32       TF32              -                -
    bf16   bfloat16      TF32              float32          -
    fp16   float16       TF32              float32          dynamic (loss_scaler.py)

`apply` changes the run in place: it sets cuBLAS's float32 math mode, wraps the optimizer in
MasterWeights (copying the float32 weights) and then narrows the model. Where the policy
lives: autograd/ and kernels/ know dtypes only (16-bit in, float32 sums inside, the input's
dtype out); nn/ and models/ know nothing of precision (their activations take the weights'
dtype); the policy, the master weights and the loss scale belong to training: this package,
optim/master.py, and the step (tinymoe/step/), which scales the loss and unscales gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..dtypes import as_dtype, is_half
from ..optim.master import MasterWeights
from .loss_scaler import DynamicLossScaler
from .tf32 import set_tf32


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: str            # the model's weights, activations and gradients
    tf32: bool            # float32 matmuls on tensor cores (cuBLAS TF32 mode)
    loss_scaling: bool    # dynamic loss scaling (float16's small range)

    @property
    def master_weights(self) -> bool:
        """16-bit models keep float32 master weights in the optimizer."""
        return is_half(as_dtype(self.dtype))

    def apply(self, model, optimizer):
        """Put the run in this precision: (optimizer, StepPrecision). Call it with the model
        and optimizer in float32 (fresh, or just loaded from a checkpoint)."""
        set_tf32(self.tf32)
        if self.master_weights:
            optimizer = MasterWeights(optimizer)     # copies the float32 weights first
            model.to(dtype=self.dtype)
        device = next(iter(model.parameters())).device
        scaler = DynamicLossScaler(device=device) if self.loss_scaling else None
        return optimizer, StepPrecision(optimizer, scaler)


PRECISIONS = {
    "fp32": Precision("fp32", "float32", tf32=False, loss_scaling=False),
    "tf32": Precision("tf32", "float32", tf32=True, loss_scaling=False),
    "bf16": Precision("bf16", "bfloat16", tf32=True, loss_scaling=False),
    "fp16": Precision("fp16", "float16", tf32=True, loss_scaling=True),
}


def get_precision(name) -> Precision:
    """The policy called `name` (fp32, tf32, bf16, fp16), or a Precision as is."""
    if isinstance(name, Precision):
        return name
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


class StepPrecision:
    """What a training step does differently in a precision (all of it device-side):

        loss' = loss * S                    scale (fp16; S = 1 otherwise: loss' = loss)
        g32 = float32(g) / S                the gradients the step measures, clips, updates
        S, clean = update(S, clean, found_inf)

    With master weights `gradients` returns the masters (their gradients filled); without,
    the parameters themselves (unscaled in place if there is a scaler)."""

    def __init__(self, optimizer=None, scaler=None):
        self.master = optimizer if isinstance(optimizer, MasterWeights) else None
        self.scaler = scaler

    def scale(self, loss):
        return loss if self.scaler is None else self.scaler.scale_loss(loss)

    def gradients(self, params) -> list:
        inv = None if self.scaler is None else self.scaler.inv_scale()
        if self.master is not None:
            return self.master.grads_to_master(inv)
        if inv is not None:
            for p in params:
                if p.grad is not None:
                    p.grad *= inv.astype(p.grad.dtype)
        return params

    def update(self, found_inf) -> None:
        if self.scaler is not None:
            self.scaler.update(found_inf)

    @property
    def loss_scale(self):
        """The current scale S (a 0-d device array), or None without loss scaling."""
        return None if self.scaler is None else self.scaler.scale

    def state_dict(self) -> dict:
        return {} if self.scaler is None else {"loss_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])
