import numpy as np
import pytest

from tinymoe.data.tasks import IGNORE_INDEX, induction_heads, selective_copying, token_accuracy


def test_selective_copying_layout():
    x, y = selective_copying(5, seq_len=12, num_tokens=4, vocab_size=6, rng=0)
    assert x.shape == y.shape == (5, 16) and x.dtype == np.int64
    for row_x, row_y in zip(x, y):
        data = row_x[:12][row_x[:12] != 0]
        assert len(data) == 4 and ((1 <= data) & (data <= 4)).all()   # data tokens only
        assert (row_x[12:] == 5).all()                                 # markers
        np.testing.assert_array_equal(row_y[12:], data)               # in order
        assert (row_y[:12] == IGNORE_INDEX).all()


def test_selective_copying_positions_vary_and_are_reproducible():
    a, _ = selective_copying(64, 20, 3, rng=1)
    b, _ = selective_copying(64, 20, 3, rng=1)
    np.testing.assert_array_equal(a, b)
    assert len({tuple(np.flatnonzero(r[:20])) for r in a}) > 30
    x, _ = selective_copying(2, seq_len=3, num_tokens=3, rng=2)        # every slot is data
    assert (x[:, :3] != 0).all()


def test_induction_heads_layout():
    x, y = induction_heads(50, seq_len=10, vocab_size=5, rng=0)
    assert x.shape == y.shape == (50, 10)
    for row_x, row_y in zip(x, y):
        where = np.flatnonzero(row_x[:-1] == 4)
        assert len(where) == 1 and row_x[-1] == 4
        assert row_y[-1] == row_x[where[0] + 1] and (row_y[:-1] == IGNORE_INDEX).all()


def test_token_accuracy():
    y = np.array([[IGNORE_INDEX, 1, 2]])
    logits = np.zeros((1, 3, 3))
    logits[0, 1, 1] = logits[0, 2, 0] = 1.0
    assert token_accuracy(logits, y) == 0.5
    with pytest.raises(ValueError, match="no scored position"):
        token_accuracy(logits, np.full((1, 3), IGNORE_INDEX))


@pytest.mark.parametrize("kw,match", [
    (dict(vocab_size=2), "vocab_size must be >= 3"),
    (dict(num_tokens=0), "need 1 <= num_tokens <= seq_len"),
    (dict(seq_len=4, num_tokens=5), "num_tokens=5, seq_len=4"),
])
def test_selective_copying_bad_args(kw, match):
    with pytest.raises(ValueError, match=match):
        selective_copying(2, **kw)


def test_induction_heads_bad_args():
    with pytest.raises(ValueError, match="seq_len must be >= 4"):
        induction_heads(2, seq_len=3)
