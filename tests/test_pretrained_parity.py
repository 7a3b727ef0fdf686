"""Parity with transformers (the `parity` extra: CPU torch + transformers; skipped without them):
MambaForCausalLM and MixtralForCausalLM with the same random weights give the same float64
logits, max |diff| <= 1e-10, both ways: transformers' saved folder into tinymoe, and tinymoe's
saved folder into transformers.

transformers computes a few pieces in float32 whatever the model's dtype (RMSNorm's statistics,
the router's softmax, RoPE's angles, Mamba's scan inputs, through `.float()` and
`.to(torch.float32)`), which would cap the agreement at ~1e-7. `float64_throughout` keeps float64
tensors float64 through those casts, and recomputes RoPE's inverse frequencies in float64; the
formulas are transformers' own, untouched.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the parity extra installs torch (CPU)")
transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="the parity extra installs transformers 5")

import hf_tiny  # noqa: E402
from tinymoe.models import build_model, from_pretrained  # noqa: E402

TOL = 1e-10
IDS = np.array([[3, 250, 17, 99, 4, 1, 200, 31, 5], [8, 8, 9, 140, 2, 33, 7, 7, 60]])


@pytest.fixture
def float64_throughout(monkeypatch):
    to, to_float = torch.Tensor.to, torch.Tensor.float

    def keep_to(self, *args, **kwargs):
        if self.dtype == torch.float64:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
        return to(self, *args, **kwargs)

    def keep_float(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else to_float(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", keep_to)
    monkeypatch.setattr(torch.Tensor, "float", keep_float)


def exact_rope(model):
    """RoPE's inverse frequencies 1 / base^(2i/d) in float64 (transformers builds them in float32)."""
    rope = model.model.rotary_emb
    cfg = model.config
    dim = cfg.hidden_size // cfg.num_attention_heads
    base = cfg.rope_parameters["rope_theta"]
    rope.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return model


def hf_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def load_hf(folder, kind):
    if kind == "mamba":
        return transformers.MambaForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    return exact_rope(transformers.MixtralForCausalLM.from_pretrained(
        folder, dtype=torch.float64, attn_implementation="sdpa", experts_implementation="eager").eval())


@pytest.mark.parametrize("kind,overrides", [("mamba", {}), ("mamba", {"tie_word_embeddings": False}),
                                            ("mixtral", {}), ("mixtral", {"num_key_value_heads": 1})],
                         ids=["mamba", "mamba-untied", "mixtral-gqa", "mixtral-mqa"])
def test_transformers_folder_into_tinymoe(kind, overrides, tmp_path, float64_throughout):
    """transformers writes the folder (its from_pretrained of hf_tiny's file, then its own
    save_pretrained), tinymoe reads it."""
    hf_tiny.checkpoint(kind, tmp_path / "src", dtype=np.float64, **overrides)
    reference = load_hf(tmp_path / "src", kind)
    reference.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    assert ours.config.vocab_size == hf_tiny.VOCAB and next(iter(ours.state_dict().values())).dtype == np.float64
    diff = np.abs(ours(IDS)[0].numpy() - hf_logits(reference)).max()
    assert diff <= TOL, f"{kind}: max |diff| {diff:.3g}"


@pytest.mark.parametrize("kind", ["mamba", "mixtral"])
def test_tinymoe_folder_into_transformers(kind, tmp_path, float64_throughout):
    """tinymoe builds a model from scratch (its own random init), saves it; transformers loads it."""
    if kind == "mamba":
        model = build_model("mamba", vocab_size=hf_tiny.VOCAB, d_model=16, n_layer=2, d_state=4,
                            d_conv=3, tie_embeddings=False)
    else:
        model = build_model("moe-gpt", vocab_size=hf_tiny.VOCAB, n_layer=2, d_model=16, n_head=4,
                            n_kv_head=2, d_ff=24, num_experts=4, top_k=2, block_size=64,
                            position="rope", rope_base=10000.0, norm="rmsnorm", activation="swiglu",
                            tie_embeddings=False)
    model = model.to(dtype=np.float64).eval()
    model.save_pretrained(tmp_path)
    diff = np.abs(model(IDS)[0].numpy() - hf_logits(load_hf(tmp_path, kind))).max()
    assert diff <= TOL, f"{kind}: max |diff| {diff:.3g}"
