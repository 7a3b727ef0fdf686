"""What every language model of tinymoe shares, outside its layers.

- Token ids come as a Tensor, a NumPy or a CuPy array: `ids_on(ids, device, owner)` gives the
  integer array on the model's device for a forward, `host_ids(ids)` the (B, L) int64
  NumPy array that generation appends sampled tokens to.
- `model.last_ce`: the last forward's cross-entropy, for the trainer's logs. The forward
  keeps the loss as an array (on a GPU: still on the device) and the float is made only
  when somebody reads it, so the forward never waits for the GPU: a read at the end of a
  step finds the queue already full of the step's work.
"""
import math

import numpy as np

from .. import backend
from ..autograd.grad_mode import no_grad
from ..autograd.tensor import Tensor


def ids_on(ids, device: str, owner: str, what: str = "ids"):
    """Token ids (Tensor, NumPy or CuPy array) of shape (B, L), as an array on `device`;
    `owner` (the model's name) and `what` name them in the error for any other shape."""
    ids = ids.data if isinstance(ids, Tensor) else ids
    shape = tuple(getattr(ids, "shape", ()))
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"{owner}: {what} must be (B, L) token ids with B, L >= 1, "
                         f"got shape {shape}")
    return backend.to_device(ids, device)


def check_token_ids(ids: np.ndarray, vocab: int, who: str) -> None:
    """Integer token ids in [0, vocab), checked on the host: a CUDA graph (a captured training
    step, a captured decoding step) does not check its inputs, so they are checked before the
    copy into its static buffer."""
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{who}: token ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"{who}: token ids in [{ids.min()}, {ids.max()}], outside the vocabulary [0, {vocab})")


def host_ids(ids):
    """Token ids (Tensor, NumPy or CuPy array) of shape (L,) or (B, L), L >= 1, as an int64
    (B, L) NumPy array: the prompt that generation appends to."""
    ids = np.asarray(backend.to_numpy(ids.data if isinstance(ids, Tensor) else ids), dtype=np.int64)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or 0 in ids.shape:
        raise ValueError(f"generate: the prompt must be (L,) or (B, L) token ids with B, L >= 1 "
                         f"(an empty text prompt: use tinymoe.data.prompt_ids), got shape {ids.shape}")
    return ids


class RemembersLastLoss:
    """Mixin for language models: `_remember_ce(loss)` in forward, `last_ce` to read."""

    _last_ce = math.nan

    @property
    def last_ce(self) -> float:
        """The last forward's mean cross-entropy alone (without auxiliary losses)."""
        return float(self._last_ce)

    def _remember_ce(self, loss) -> None:
        self._last_ce = loss.data                                  # 0-d array, no sync


def sample_next(logits, temperature, top_k, rng):
    """logits (B, V) -> (B,) ids: greedy at temperature 0, else softmax(z / T) over the top k."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits / temperature
    if top_k is not None:
        kth = np.sort(z, axis=-1)[:, -min(top_k, z.shape[-1])][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in p])


def generate_by_recompute(model, ids, max_new_tokens: int, temperature: float, top_k):
    """Sampling without a recurrent state, for models with no maximum length (Mamba, hybrid):
    the whole sequence goes through the parallel forward for every new token. O(L) per
    token; the reference that recurrent generation must agree with."""
    ids = host_ids(ids)                                                        # (B, L)
    was_training = model.training
    model.eval()
    rng = backend.rng("cpu")
    with no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(ids)                                             # (B, L, V)
            z = backend.to_numpy(logits.data[:, -1, :]).astype(np.float64)     # (B, V)
            ids = np.concatenate([ids, sample_next(z, temperature, top_k, rng)[:, None]], axis=1)
    model.train(was_training)
    return ids
