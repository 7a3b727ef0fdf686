"""tinymoe's own safetensors reader and writer (tinymoe/safetensors_file.py) against the
`safetensors` library: each reads what the other writes, for every dtype both know, empty
and 0-d tensors, a strided view, and metadata; bad tensors, bad metadata and byte ranges that do not add up are
refused with the tensor named."""
import json

import numpy as np
import pytest
import safetensors.numpy

from tinymoe import safetensors_file
from tinymoe.dtypes import bfloat16


def _tensors():
    rng = np.random.default_rng(0)
    out = {"w": rng.standard_normal((3, 5)).astype(np.float32),
           "b64": rng.standard_normal(7),
           "h": rng.standard_normal((2, 3)).astype(np.float16),
           "steps": np.arange(4, dtype=np.int64), "small": np.arange(-3, 3, dtype=np.int8),
           "i32": np.arange(5, dtype=np.int32), "i16": np.arange(3, dtype=np.int16),
           "mask": np.array([True, False, True]), "u8": np.arange(9, dtype=np.uint8),
           "empty": np.zeros((0, 4), np.float32), "scalar": np.array(2.5, np.float32),
           "strided": rng.standard_normal((4, 6)).astype(np.float32)[:, ::2]}
    return out


def _same(got, want):
    assert set(got) == set(want)
    for name, a in want.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape, name
        np.testing.assert_array_equal(got[name], a, err_msg=name)


def test_the_library_reads_what_tinymoe_writes(tmp_path):
    path = tmp_path / "t.safetensors"
    safetensors_file.save(path, _tensors(), {"format": "pt", "step": "3"})
    _same(safetensors.numpy.load_file(str(path)), _tensors())
    with safetensors.safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "pt", "step": "3"}


def test_tinymoe_reads_what_the_library_writes(tmp_path):
    path = tmp_path / "t.safetensors"
    safetensors.numpy.save_file({k: np.asarray(v, order="C") for k, v in _tensors().items()},
                                str(path), metadata={"a": "b"})
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    assert header["__metadata__"] == {"a": "b"}
    _same(safetensors_file.tensors_from(header, data, 8 + n), _tensors())


def test_every_tensor_starts_at_a_multiple_of_its_item_size(tmp_path):
    path = tmp_path / "t.safetensors"
    safetensors_file.save(path, _tensors())
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert n % 8 == 0
    for name, info in json.loads(data[8:8 + n]).items():
        assert info["data_offsets"][0] % np.dtype(safetensors_file.DTYPES[info["dtype"]]).itemsize == 0, name


@pytest.mark.skipif(bfloat16 is None, reason="ml_dtypes is not installed")
def test_bfloat16_round_trips_through_tinymoe(tmp_path):
    path = tmp_path / "t.safetensors"
    a = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4).astype(bfloat16)
    safetensors_file.save(path, {"a": a})
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    assert header["a"]["dtype"] == "BF16"
    got = safetensors_file.tensors_from(header, data, 8 + n)["a"]
    assert got.dtype == a.dtype
    np.testing.assert_array_equal(got.view(np.uint16), a.view(np.uint16))


def test_bad_tensors_and_metadata_are_refused(tmp_path):
    with pytest.raises(TypeError, match=r"tensor 'c' has dtype complex128"):
        safetensors_file.save(tmp_path / "x", {"c": np.zeros(2, complex)})
    with pytest.raises(TypeError, match="metadata must map strings to strings"):
        safetensors_file.save(tmp_path / "x", {"w": np.zeros(2)}, {"step": 3})


def test_byte_ranges_that_do_not_add_up_are_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    safetensors_file.save(path, {"a": np.zeros(4, np.float32), "b": np.ones(2, np.float32)})
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    cases = {
        "a wrong shape": ({**header, "a": {**header["a"], "shape": [5]}}, data),
        "an unknown dtype": ({**header, "a": {**header["a"], "dtype": "F8"}}, data),
        "a gap": ({**header, "b": {**header["b"], "data_offsets": [20, 28]}}, data + bytes(4)),
        "bytes left over": (header, data + bytes(4)),
    }
    for what, (bad, raw) in cases.items():
        with pytest.raises(ValueError, match=r"tensor '[ab]'|cover"):
            safetensors_file.tensors_from(bad, raw, 8 + n)
