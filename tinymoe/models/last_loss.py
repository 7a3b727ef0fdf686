"""`model.last_ce`: the last forward's cross-entropy, for the trainer's logs.

The forward keeps the loss as an array (on a GPU: still on the device) and the float is
made only when somebody reads it, so that the forward never waits for the GPU: a read
at the end of a step finds the queue already full of the step's work."""
import math


class RemembersLastLoss:
    """Mixin for language models: `_remember_ce(loss)` in forward, `last_ce` to read."""

    _last_ce = math.nan

    @property
    def last_ce(self) -> float:
        """The last forward's mean cross-entropy alone (without auxiliary losses)."""
        return float(self._last_ce)

    def _remember_ce(self, loss) -> None:
        self._last_ce = loss.data                                  # 0-d array, no sync
