"""Decoding one token as one CUDA graph: a Mamba LM's recurrent step, replayed per token.

Generation is launch-bound, as a small model's training step is (docs/cuda_graphs.md): one
token through mamba-130m's 24 layers is a few hundred small kernels, each launched from
Python, for a few microseconds of GPU work each. So the step is recorded once per
(model, batch size) and replayed for every token:

    ids (B,)  --copy-->  static ids buffer  --graph: model.step-->  static logits (B, V)
                                             states (conv, SSM) updated in place

The capture rules are the training step's: static buffers (the ids in, the logits out, the
recurrent states, which the graph updates in place), a private memory pool, no host read
inside (the token ids are checked on the host before they are copied in). A graph reads the
weights where they lie: it sees in-place updates (load_state_dict, training) as they happen,
and is recorded anew when a parameter's array is replaced (model.to(...)).
"""
from __future__ import annotations

from .. import backend


class CapturedDecoder:
    """decode(ids_t (B,) host ints) -> logits (B, V) device array, one graph launch per token."""

    def __init__(self, model, batch: int):
        from ..kernels import blas

        cp = backend.cupy()
        self.model, self.batch = model, batch
        self.key = _weights_key(model)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.pool = cp.cuda.MemoryPool()                  # the graph's own memory
        blas.prepare()                                    # cuBLAS handle + workspace: not in capture
        caller = cp.cuda.get_current_stream()
        self.stream.wait_event(caller.record())
        with cp.cuda.using_allocator(self.pool.malloc), self.stream:
            self.ids = cp.zeros(batch, cp.int64)
            self.state = model.allocate_state(batch)
            model.step(self.ids, model.allocate_state(batch))   # warm-up: every kernel compiled
            self.stream.begin_capture()
            backend.set_capturing(True)
            try:
                self.logits = model.step(self.ids, self.state).data   # (B, V)
            finally:
                backend.set_capturing(False)
                self.graph = self.stream.end_capture()
        caller.wait_event(self.stream.record())

    def reset(self) -> None:
        """Zero the recurrent states: a new batch of sequences starts."""
        for conv_state, ssm_state in self.state:
            conv_state[...] = 0
            ssm_state[...] = 0

    def __call__(self, ids_t):
        cp = backend.cupy()
        self.ids[...] = cp.asarray(ids_t)
        self.graph.launch(stream=cp.cuda.get_current_stream())
        return self.logits.copy()


def _weights_key(model) -> tuple:
    """Where every parameter's array lies: a replaced array invalidates a recorded graph."""
    return tuple(p.data.data.ptr for p in model.parameters())


def captured_decoder(model, batch: int):
    """The model's decoder for `batch` sequences (recorded once, reset to zero states), or None
    where decoding runs eagerly: on the CPU, or when the capture failed (said once)."""
    if not backend.is_cupy_array(model.embedding.weight.data) or getattr(model, "_capture_failed", False):
        return None
    decoders = model.__dict__.setdefault("_decoders", {})
    decoder = decoders.get(batch)
    if decoder is None or decoder.key != _weights_key(model):
        try:
            decoder = decoders[batch] = CapturedDecoder(model, batch)
        except Exception as err:                          # a rule broken: decode eagerly
            model._capture_failed = True
            print(f"generate: decoding runs eagerly: the CUDA graph capture failed "
                  f"({type(err).__name__}: {err})")
            return None
    decoder.reset()
    return decoder
