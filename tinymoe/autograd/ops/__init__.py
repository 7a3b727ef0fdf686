"""The ops, by family. Each is a `Function` with its derivative written out."""
from .arithmetic import Add, Div, Mul, Neg, Pow, Sub
from .device import Cast, ToDevice
from .index import (
    Gather,
    GetItem,
    IndexAdd,
    ScatterAdd,
    TopK,
    Where,
    argmax,
    argmin,
    argsort,
    gather,
    getitem,
    index_add,
    masked_fill,
    one_hot,
    scatter_add_op,
    topk,
    where,
)
from .layers import Conv1dCausal, Dropout, Embedding
from .linalg import LinearFunction, MatMul, matmul
from .norm import LayerNorm, RMSNorm
from .reduce import Cumsum, LogSumExp, Max, Mean, Min, Sum, Var
from .shape import (
    BroadcastTo,
    Concat,
    Pad,
    Reshape,
    Split,
    Stack,
    Transpose,
    concat,
    pad,
    reshape,
    split,
    squeeze,
    stack,
    swapaxes,
    transpose,
    unsqueeze,
)
from .softmax import CrossEntropy, LogSoftmax, Softmax
from .unary import Abs, Exp, Gelu, Log, Relu, Sigmoid, Silu, Softplus, Sqrt, Tanh
from ._util import sum_to_shape
