"""Byte tokenizer, stdlib corpus split, --data files and the batch sampler."""
import numpy as np
import pytest

from tinymoe.data import (BatchSampler, check_length, decode, encode, eval_batches, load_corpus,
                          load_text_file, stdlib_files)


def test_tokenizer_roundtrip_any_text():
    text = "def f(x):\n    return 'héllo → ∑'  # ✓"
    ids = encode(text)
    assert ids.dtype == np.int64 and ids.max() < 256 and len(ids) == len(text.encode())
    assert decode(ids) == text
    assert decode([0xFF]) == "\ufffd"  # invalid UTF-8 does not crash generation
    with pytest.raises(ValueError, match=r"decode: token ids must lie in \[0, 256\)"):
        decode([300])
    with pytest.raises(TypeError, match="encode: expected str"):
        encode(b"bytes")


def test_stdlib_files_exclude_tests_and_site_packages():
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert not any("site-packages" in f or "/test/" in f or "/tests/" in f for f in files)


def test_stdlib_corpus_split_is_deterministic_and_disjoint():
    a = load_corpus(None, max_bytes=400_000)
    b = load_corpus(None, max_bytes=400_000)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    assert len(a.val) > 0 and len(a.train) > 10 * len(a.val) // 2
    assert b"def " in a.train.tobytes()


def test_data_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_file(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_text_file(str(empty))
    short = tmp_path / "short.txt"
    short.write_text("x" * 50)
    corpus = load_text_file(str(short))
    with pytest.raises(ValueError, match="too short for context length 64"):
        check_length(corpus, 64)


def test_sampler_shifts_targets_and_is_seeded(tmp_path):
    data = np.arange(100, dtype=np.uint8)
    x, y = BatchSampler(data, 4, 7, seed=3)()
    assert x.shape == y.shape == (4, 7)
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    x2, _ = BatchSampler(data, 4, 7, seed=3)()
    np.testing.assert_array_equal(x, x2)
    batches = list(eval_batches(data, 4, 7, max_batches=2))
    assert len(batches) == 2 and batches[0][0].shape == (4, 7)
    with pytest.raises(ValueError, match="needs at least block_size \\+ 1 = 101"):
        BatchSampler(data, 2, 100)
