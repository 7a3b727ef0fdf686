"""Hugging Face checkpoints in tinymoe (no torch needed): tiny folders written by hf_tiny.py in
transformers' layout are loaded, run, saved and loaded again bitwise; sharded and bfloat16
files; every refusal names its tensor or option; the CLI and the example on such folders."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hf_tiny
from tinymoe.cli import main
from tinymoe.models import GPT, HybridLM, MambaLM, build_model, from_pretrained
from tinymoe.models.pretrained import UnsupportedCheckpoint, load_tokenizer, save_pretrained
from tinymoe.models.pretrained.safetensors_io import read_folder, read_safetensors

ROOT = Path(__file__).resolve().parents[1]
IDS = np.array([[3, 250, 17, 99, 4, 1, 200], [8, 8, 9, 140, 2, 33, 7]])
CASES = [("mamba", {}), ("mamba", {"tie_word_embeddings": False}),
         ("mixtral", {}), ("mixtral", {"tie_word_embeddings": True, "num_key_value_heads": 1})]


def state_of(model):
    return {k: np.array(v) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind,overrides", CASES, ids=["mamba", "mamba-untied", "mixtral", "mixtral-tied-mqa"])
def test_load_run_save_load_again_bitwise(kind, overrides, tmp_path):
    config, tensors = hf_tiny.checkpoint(kind, tmp_path / "hf", **overrides)
    model = from_pretrained(tmp_path / "hf")
    assert type(model) is (MambaLM if kind == "mamba" else GPT) and not model.training
    logits, loss = model(IDS, IDS)
    assert logits.shape == (2, 7, hf_tiny.VOCAB) and np.isfinite(loss.item())
    assert logits.dtype == np.float32
    files = model.save_pretrained(tmp_path / "ours")
    assert files == ["config.json", "model.safetensors"]
    again = from_pretrained(tmp_path / "ours")
    a, b = state_of(model), state_of(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(again(IDS)[0].numpy(), model(IDS)[0].numpy())
    saved = read_safetensors(tmp_path / "ours" / "model.safetensors")       # the same file back
    assert saved.keys() == tensors.keys()
    assert all(np.array_equal(saved[k], tensors[k]) for k in tensors), files
    ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    for key in ("architectures", "vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings"):
        assert ours[key] == config[key], key


def test_a_loaded_mixtral_is_tinymoe_gpt_with_mixtral_options(tmp_path):
    hf_tiny.checkpoint("mixtral", tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    cfg = from_pretrained(tmp_path).config
    assert (cfg.position, cfg.norm, cfg.activation, cfg.router, cfg.num_experts, cfg.top_k,
            cfg.n_kv_head, cfg.capacity_factor, cfg.eval_capacity_factor, cfg.rope_base,
            cfg.tie_embeddings) == ("rope", "rmsnorm", "swiglu", "topk", 4, 2, 2, None, None, 500.0, False)


@pytest.mark.parametrize("kind", ["mamba", "mixtral"])
def test_sharded_folders_load_and_save(kind, tmp_path):
    hf_tiny.checkpoint(kind, tmp_path / "one")
    hf_tiny.checkpoint(kind, tmp_path / "three", shards=3)
    single, sharded = from_pretrained(tmp_path / "one"), from_pretrained(tmp_path / "three")
    assert all(np.array_equal(x, y) for x, y in zip(state_of(single).values(), state_of(sharded).values()))
    files = save_pretrained(sharded, tmp_path / "ours", max_shard_bytes=20_000)
    assert "model.safetensors.index.json" in files and len(files) > 3
    assert not (tmp_path / "ours" / "model.safetensors").exists()
    assert read_folder(tmp_path / "ours").keys() == read_folder(tmp_path / "one").keys()
    np.testing.assert_array_equal(from_pretrained(tmp_path / "ours")(IDS)[0].numpy(),
                                  single(IDS)[0].numpy())


def test_bfloat16_checkpoints_load_as_float32_and_float64_on_request(tmp_path):
    config, tensors = hf_tiny.checkpoint("mamba", tmp_path)
    cut = {k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32) for k, v in tensors.items()}
    hf_tiny.write_bf16(tmp_path / "model.safetensors", cut)
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    model = from_pretrained(tmp_path)
    assert model.embedding.weight.dtype == np.float32
    np.testing.assert_array_equal(model.embedding.weight.data, cut["backbone.embeddings.weight"])
    wide = from_pretrained(tmp_path, dtype="float64")
    assert wide.embedding.weight.dtype == np.float64
    np.testing.assert_allclose(wide(IDS)[0].numpy(), model(IDS)[0].numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(UnsupportedCheckpoint, match="dtype float16 is not supported"):
        from_pretrained(tmp_path, dtype="float16")


def edit(folder, config=None, drop=None, add=None, reshape=None):
    """Rewrite the tiny checkpoint in folder: config keys, a tensor dropped, added or reshaped."""
    cfg = json.loads((folder / "config.json").read_text())
    tensors = dict(read_safetensors(folder / "model.safetensors"))
    tensors = {k: np.array(v) for k, v in tensors.items() if k != drop}
    if add:
        tensors[add] = np.zeros(3, np.float32)
    if reshape:
        tensors[reshape] = np.zeros(tensors[reshape].shape[:-1] + (tensors[reshape].shape[-1] + 1,), np.float32)
    hf_tiny.write(folder, {**cfg, **(config or {})}, tensors)


REFUSALS = [
    ("mixtral", dict(config={"architectures": ["LlamaForCausalLM"]}), r"architectures \['LlamaForCausalLM'\] are not supported"),
    ("mixtral", dict(drop="model.layers.1.block_sparse_moe.experts.3.w2.weight"), r"tensor 'model.layers.1.block_sparse_moe.experts.3.w2.weight' is missing"),
    ("mamba", dict(add="backbone.layers.0.mixer.extra"), r"tensor 'backbone.layers.0.mixer.extra' in the checkpoint .* has no place"),
    ("mixtral", dict(reshape="model.layers.0.self_attn.k_proj.weight"), r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(8, 17\) in the checkpoint, but config.json makes it \(8, 16\)"),
    ("mamba", dict(reshape="backbone.layers.1.mixer.A_log"), r"tensor 'backbone.layers.1.mixer.A_log' has shape \(32, 5\)"),
    ("mixtral", dict(config={"sliding_window": 4096}), r"sliding_window=4096 is not supported"),
    ("mixtral", dict(config={"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}), r"rope_type='yarn' is not supported"),
    ("mixtral", dict(config={"rope_scaling": {"type": "linear"}}), r"rope_scaling=.* is not supported"),
    ("mixtral", dict(config={"head_dim": 8}), r"head_dim=8 is not supported"),
    ("mixtral", dict(config={"router_jitter_noise": 0.1}), r"router_jitter_noise=0.1 is not supported"),
    ("mixtral", dict(config={"hidden_act": "gelu"}), r"hidden_act='gelu' is not supported"),
    ("mamba", dict(config={"intermediate_size": 48}), r"intermediate_size=48 is not supported"),
    ("mamba", dict(config={"use_bias": True}), r"use_bias=True is not supported"),
    ("mamba", dict(config={"rms_norm": False}), r"rms_norm=False is not supported"),
]


@pytest.mark.parametrize("kind,change,message", REFUSALS, ids=[m[:40] for _, _, m in REFUSALS])
def test_refusals_name_the_tensor_or_the_option(kind, change, message, tmp_path):
    hf_tiny.checkpoint(kind, tmp_path)
    edit(tmp_path, **change)
    with pytest.raises(UnsupportedCheckpoint, match=message):
        from_pretrained(tmp_path)


def test_more_refusals(tmp_path):
    config, tensors = hf_tiny.checkpoint("mamba", tmp_path / "a")
    cfg = dict(config)
    del cfg["num_hidden_layers"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedCheckpoint, match="has no 'num_hidden_layers'"):
        from_pretrained(tmp_path / "a")
    hf_tiny.write(tmp_path / "b", config, {**tensors, "lm_head.weight": tensors["backbone.embeddings.weight"] + 1})
    with pytest.raises(UnsupportedCheckpoint, match="'lm_head.weight' differs from 'backbone.embeddings.weight'"):
        from_pretrained(tmp_path / "b")
    hf_tiny.write(tmp_path / "c", config, {**tensors, "lm_head.weight": tensors["backbone.embeddings.weight"]})
    from_pretrained(tmp_path / "c")                     # a tied head written out is accepted
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    (tmp_path / "d" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin: pickles"):
        from_pretrained(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="no folder"):
        from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is a file"):
        from_pretrained(tmp_path / "a" / "config.json")


def test_a_repo_id_without_the_hub_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)           # import fails
    with pytest.raises(RuntimeError, match=r"pip install -e '.\[hub\]'"):
        from_pretrained("state-spaces/mamba-130m-hf")


def test_saving_refuses_models_without_a_hugging_face_twin(tmp_path):
    with pytest.raises(UnsupportedCheckpoint, match="no Hugging Face architecture for HybridLM"):
        save_pretrained(HybridLM(), tmp_path)
    with pytest.raises(UnsupportedCheckpoint, match="position='learned' has no equivalent in MixtralForCausalLM"):
        build_model("moe-gpt", n_layer=1).save_pretrained(tmp_path)
    mixtral_but = dict(position="rope", norm="rmsnorm", activation="swiglu", n_layer=1)
    with pytest.raises(UnsupportedCheckpoint, match="router='switch'"):
        build_model("moe-gpt", **mixtral_but, router="switch", top_k=1).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedCheckpoint, match="num_experts=0"):
        build_model("gpt", **mixtral_but).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedCheckpoint, match="mixer='s4d'"):
        MambaLM(mixer="s4d", n_layer=1).save_pretrained(tmp_path)


def test_a_model_trained_from_scratch_goes_out_and_back(tmp_path):
    model = build_model("moe-gpt", n_layer=2, d_model=16, n_head=4, n_kv_head=2, d_ff=16,
                        block_size=32, position="rope", norm="rmsnorm", activation="swiglu",
                        tie_embeddings=False, num_experts=4, top_k=2).eval()
    model.save_pretrained(tmp_path)
    again = from_pretrained(tmp_path)
    np.testing.assert_array_equal(again(IDS % 256)[0].numpy(), model(IDS % 256)[0].numpy())


def test_cli_generates_from_a_pretrained_folder(tmp_path, capsys):
    hf_tiny.checkpoint("mamba", tmp_path / "m")
    assert main(["generate", "--pretrained", str(tmp_path / "m"), "--prompt", "def ",
                 "--max-new-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def ") and "byte tokenizer" in out.err
    hf_tiny.checkpoint("mixtral", tmp_path / "x")
    assert main(["generate", "--pretrained", str(tmp_path / "x"), "--prompt", "ab",
                 "--max-new-tokens", "3"]) == 0
    with pytest.raises(SystemExit):                       # exactly one of the two
        main(["generate", "--pretrained", str(tmp_path / "x"), "--checkpoint", "c.safetensors"])
    with pytest.raises(SystemExit):
        main(["generate"])
    hf_tiny.checkpoint("mamba", tmp_path / "v", vocab_size=300)
    assert main(["generate", "--pretrained", str(tmp_path / "v")]) == 2
    assert "its vocabulary of 300 is not bytes: add the model's tokenizer.json" in capsys.readouterr().err


def test_the_model_tokenizer_is_used_when_the_folder_has_one(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers", reason="the hub extra installs tokenizers")
    hf_tiny.checkpoint("mamba", tmp_path)
    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "sat", "on", "mat"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode("the cat sat").tolist() == [1, 2, 3]
    assert main(["generate", "--pretrained", str(tmp_path), "--prompt", "the cat",
                 "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("the cat") and "byte tokenizer" not in out.err


def test_example_looks_inside_tiny_pretrained_models(tmp_path):
    hf_tiny.checkpoint("mamba", tmp_path / "mamba")
    hf_tiny.checkpoint("mixtral", tmp_path / "mixtral")
    env = dict(os.environ, MPLBACKEND="Agg",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "pretrained_inside.py"),
                          "--mamba", str(tmp_path / "mamba"), "--mixtral", str(tmp_path / "mixtral"),
                          "--out", str(tmp_path / "out")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    for name in ("mamba_delta.png", "mixtral_experts.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert "layer" in run.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mamba", "mixtral"])
def test_a_loaded_model_runs_and_saves_on_the_gpu(kind, tmp_path):
    from tinymoe import backend
    hf_tiny.checkpoint(kind, tmp_path / "hf")
    cpu, gpu = from_pretrained(tmp_path / "hf"), from_pretrained(tmp_path / "hf", device="cuda")
    np.testing.assert_allclose(backend.to_numpy(gpu(IDS)[0].data), cpu(IDS)[0].numpy(), rtol=1e-4, atol=1e-4)
    assert gpu.generate(IDS[:, :3], 4, temperature=0).shape == (2, 7)
    gpu.save_pretrained(tmp_path / "back")
    back = state_of(from_pretrained(tmp_path / "back"))
    assert all(np.array_equal(back[k], v) for k, v in state_of(cpu).items())
