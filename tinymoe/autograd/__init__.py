"""The autograd engine: Tensor, Function, the ops, no_grad, gradcheck."""
from .tensor import Tensor  # noqa: I001  (first: the other modules import it)
from .function import Context, Function, add_op_hook, op_error
from .grad_mode import enable_grad, is_grad_enabled, no_grad
from .gradcheck import GradcheckError, gradcheck
from . import ops
from .ops import sum_to_shape

__all__ = [
    "Tensor", "Function", "Context", "add_op_hook", "op_error", "no_grad", "enable_grad",
    "is_grad_enabled", "gradcheck", "GradcheckError", "ops", "sum_to_shape",
]
