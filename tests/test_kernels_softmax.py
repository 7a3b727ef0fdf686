"""The fused causal softmax of attention (tinymoe/kernels/softmax.py, CUDA C in softmax.cu).

Without a GPU: softmax.cu compiles with nvcc (when the machine has one) for every dtype, with
no spills. On a GPU: CausalAttention with the kernels against its array-code spec (the same
op with the kernels switched off, the same inputs), forward and every gradient, keeping P or
recomputing it from lse, on odd shapes (Lq < Lk as in decoding with a cache, one key, rows
and keys not multiples of a warp, grouped heads), in float64, float32, float16 and bfloat16;
and the kernels' refusals."""
import re
import shutil
import subprocess

import numpy as np
import pytest

import tinymoe as tm
from tinymoe import backend
from tinymoe.dtypes import as_dtype, bfloat16
from tinymoe.kernels import softmax as softmax_kernels
from tinymoe.nn.attention import CausalAttention

NVCC = shutil.which("nvcc")
DTYPES = ["float64", "float32", "float16"] + (["bfloat16"] if bfloat16 is not None else [])
# relative to the result's scale: a few roundings of the format (float64: summation order)
TOL = {"float64": 1e-12, "float32": 2e-6, "float16": 4e-3, "bfloat16": 3e-2}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on this machine")
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cu_compiles_without_spills(dtype, tmp_path):
    out = tmp_path / "softmax.cubin"
    res = subprocess.run([NVCC, "-arch=sm_90", "-cubin", "-Werror", "all-warnings",
                          "-Xptxas", "-v", *softmax_kernels.nvcc_options(dtype), "-o", str(out),
                          str(softmax_kernels.SOURCE)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for kernel in ("causal_softmax_fwd", "causal_softmax_bwd"):
        after = res.stderr.split(f"Compiling entry function '{kernel}'")[1]
        assert int(re.search(r"(\d+) bytes spill stores", after).group(1)) == 0, res.stderr


def _attention(q, k, v, g, keep_probs):
    """out and (dq, dk, dv) of CausalAttention, as host float64 arrays."""
    qt, kt, vt = (tm.Tensor(a, requires_grad=True) for a in (q, k, v))
    out = CausalAttention.apply(qt, kt, vt, keep_probs=keep_probs)
    out.backward(g)
    return [backend.to_numpy(a).astype(np.float64) for a in (out.data, qt.grad, kt.grad, vt.grad)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep_probs", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 1, 37, 37, 16), (1, 2, 2, 5, 70, 8), (3, 1, 1, 1, 1, 4),
                                   (1, 1, 3, 64, 129, 32)])
def test_fused_attention_equals_the_array_spec(shape, keep_probs, dtype, monkeypatch):
    """shape: (B, Hkv, G, Lq, Lk, d)."""
    cp = backend.cupy()
    B, Hkv, G, Lq, Lk, d = shape
    rng = np.random.default_rng(sum(shape))
    dt = as_dtype(dtype)
    make = lambda *s: cp.asarray((2 * rng.standard_normal(s)).astype(np.float32).astype(dt))  # noqa: E731
    q, k, v = make(B, Hkv, G, Lq, d), make(B, Hkv, 1, Lk, d), make(B, Hkv, 1, Lk, d)
    g = make(B, Hkv, G, Lq, d)
    fused = _attention(q, k, v, g, keep_probs)
    monkeypatch.setattr(softmax_kernels, "supports", lambda *a: False)
    spec = _attention(q, k, v, g, keep_probs)
    # dq and dk are sums of terms of size |dP| |k| / sqrt(d) that cancel (with one key
    # dS = P (dP - sum P dP) is exactly 0): their rounding is relative to those terms.
    host = lambda a: np.abs(backend.to_numpy(a).astype(np.float64)).max()  # noqa: E731
    cancelling = host(g) * host(v) * max(host(q), host(k)) / np.sqrt(d)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fused, spec):
        scale = max(np.abs(b).max(), cancelling if name in ("dq", "dk") else 1e-30)
        assert np.abs(a - b).max() <= TOL[dtype] * scale, (name, np.abs(a - b).max(), scale)


@pytest.mark.gpu
def test_fused_softmax_rows_sum_to_one_and_the_future_is_zero():
    cp = backend.cupy()
    s = cp.asarray(np.random.default_rng(0).standard_normal((2, 7, 40)).astype(np.float32))
    p, lse = softmax_kernels.causal_softmax_forward(s, 0.5, keep_lse=True)
    p = cp.asnumpy(p)
    np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-6)
    offset = 40 - 7
    for i in range(7):
        assert (p[:, i, i + offset + 1:] == 0).all() and (p[:, i, :i + offset + 1] > 0).all()
    again = softmax_kernels.causal_softmax_recompute(cp.asarray(s), 0.5, lse)
    np.testing.assert_allclose(cp.asnumpy(again), p, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_fused_softmax_refuses_bad_input():
    cp = backend.cupy()
    with pytest.raises(ValueError, match=r"causal_softmax_forward: need Lq <= Lk.*\(4, 5, 3\)"):
        softmax_kernels.causal_softmax_forward(cp.zeros((4, 5, 3), cp.float32), 1.0)
    with pytest.raises(ValueError, match="causal_softmax_forward: expected a float32.*int32"):
        softmax_kernels.causal_softmax_forward(cp.zeros((4, 5), cp.int32), 1.0)
    p = cp.zeros((2, 3, 4), cp.float32)
    with pytest.raises(ValueError, match="causal_softmax_backward: expected dp, p"):
        softmax_kernels.causal_softmax_backward(p, p, cp.zeros((2, 3, 8), cp.float16),
                                                cp.zeros((2, 3, 8), cp.float32), 1.0)
    with pytest.raises(ValueError, match="causal_softmax_recompute: lse must be float32"):
        softmax_kernels.causal_softmax_recompute(p, 1.0, cp.zeros((2, 3), cp.float32))
