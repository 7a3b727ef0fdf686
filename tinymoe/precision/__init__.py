"""Mixed precision: the policy (`--precision`), dynamic loss scaling, TF32 (docs/precision.md).

    from tinymoe.precision import get_precision
    optimizer, precision = get_precision("bf16").apply(model, optimizer)
"""
from .loss_scaler import DynamicLossScaler
from .policy import PRECISIONS, Precision, StepPrecision, get_precision
from .tf32 import set_tf32, tf32_enabled

__all__ = ["PRECISIONS", "Precision", "StepPrecision", "get_precision", "DynamicLossScaler",
           "set_tf32", "tf32_enabled"]
