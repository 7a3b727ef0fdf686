"""Optimizers, learning-rate schedules and gradient clipping."""
from .adamw import AdamW
from .clip import clip_grad_norm_, grad_norm, scale_grads_
from .optimizer import Optimizer
from .schedule import WarmupCosine, lr_at
from .sgd import SGD

__all__ = ["Optimizer", "SGD", "AdamW", "lr_at", "WarmupCosine", "clip_grad_norm_", "grad_norm",
           "scale_grads_"]
