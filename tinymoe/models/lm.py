"""What every language model of tinymoe shares, outside its layers.

- Token ids come as a Tensor, a NumPy or a CuPy array: `ids_on(ids, device)` gives the
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
from ..autograd.tensor import Tensor


def ids_on(ids, device: str):
    """Token ids (Tensor, NumPy or CuPy array) as an array on `device`."""
    return backend.to_device(ids.data if isinstance(ids, Tensor) else ids, device)


def host_ids(ids):
    """Token ids (Tensor, NumPy or CuPy array) as an int64 NumPy array, at least (1, L)."""
    ids = np.asarray(backend.to_numpy(ids.data if isinstance(ids, Tensor) else ids), dtype=np.int64)
    return ids[None] if ids.ndim == 1 else ids


class RemembersLastLoss:
    """Mixin for language models: `_remember_ce(loss)` in forward, `last_ce` to read."""

    _last_ce = math.nan

    @property
    def last_ce(self) -> float:
        """The last forward's mean cross-entropy alone (without auxiliary losses)."""
        return float(self._last_ce)

    def _remember_ce(self, loss) -> None:
        self._last_ce = loss.data                                  # 0-d array, no sync
