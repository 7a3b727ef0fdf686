"""Op accounting: FLOPs, bytes, time per op and per module, roofline plots.

`profile(model)` (profiler.py) records every op through the autograd op hook;
flops.py holds the FLOP and byte rules; roofline.py measures peaks and plots;
memory.py measures peak memory (tracemalloc / CuPy's pool); cli.py is
`python -m tinymoe profile`.
"""
from .flops import intensity, op_bytes, op_flops, register_flops
from .profiler import Profiler, Record, profile

__all__ = ["profile", "Profiler", "Record", "op_flops", "op_bytes", "intensity", "register_flops"]
