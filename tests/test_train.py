"""The training loop: files it writes, logging, resume, Ctrl-C, data errors."""
import json
import os

import numpy as np
import pytest

from tinymoe.checkpoint import load_checkpoint
from tinymoe.train import TrainConfig, load_model, read_log, train

TINY_MODEL = dict(n_layer=1, d_model=16, n_head=2, d_ff=16, num_experts=4)


def tiny(tmp_path, **kw):
    base = dict(steps=12, batch_size=2, block_size=16, eval_interval=6, eval_batches=1,
                log_interval=3, checkpoint_interval=6, sample_tokens=20, out_dir=str(tmp_path),
                max_corpus_bytes=200_000, progress=False, model_config=TINY_MODEL)
    return TrainConfig(**{**base, **kw})


def test_train_writes_everything_and_lowers_loss(tmp_path):
    s = train(tiny(tmp_path, steps=24, lr=1e-2))
    run = tmp_path / "moe-gpt"
    for name in ("ckpt.safetensors", "log.jsonl", "loss.png", "expert_load.png", "sample.txt",
                 "config.json"):
        assert (run / name).exists(), name
    assert s["val_loss"] < s["first_val_loss"] and s["step"] == 24
    log = read_log(run / "log.jsonl")
    assert log[0]["step"] == 0 and "val_loss" in log[0]
    assert {"loss", "tokens_per_s", "expert_load", "dropped_fraction"} <= set(log[1])
    assert abs(log[-1]["val_bpb"] - log[-1]["val_loss"] / np.log(2)) < 1e-9
    assert s["sample"].startswith("class ")
    model = load_model(run / "ckpt.safetensors")
    assert model.config.num_experts == 4 and not model.training


def test_resume_continues_where_it_stopped(tmp_path):
    train(tiny(tmp_path, steps=12, time_limit=0.0))           # stops after one step, saves
    first = read_log(tmp_path / "moe-gpt" / "log.jsonl")
    s = train(tiny(tmp_path, steps=12, resume=True))
    log = read_log(tmp_path / "moe-gpt" / "log.jsonl")
    assert s["step"] == 12 and len(log) > len(first)
    assert [r["step"] for r in log if "loss" in r] == [3, 6, 9, 12]


def test_ctrl_c_finishes_the_step_saves_and_returns_130(tmp_path, monkeypatch):
    import signal

    import tinymoe.data.corpus as corpus

    calls = {"n": 0}
    original = corpus.BatchSampler.__call__

    def interrupt_at_step_5(self):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)     # Ctrl-C while step 5 draws its batch
        return original(self)

    monkeypatch.setattr(corpus.BatchSampler, "__call__", interrupt_at_step_5)
    s = train(tiny(tmp_path))
    assert s["interrupted"] and s["step"] == 5 and s["exit_code"] == 130
    assert load_checkpoint(s["checkpoint"])["step"] == 5


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data: file .*missing.txt' does not exist"):
        train(tiny(tmp_path, data=str(tmp_path / "missing.txt")))
    short = tmp_path / "short.txt"
    short.write_text("print('hi')\n")
    with pytest.raises(ValueError, match="too short for context length 16"):
        train(tiny(tmp_path, data=str(short)))
    with pytest.raises(FileNotFoundError, match="--resume, but there is no checkpoint"):
        train(tiny(tmp_path, name="fresh", resume=True))
    train(tiny(tmp_path, name="small", steps=1))
    with pytest.raises(RuntimeError, match="mis-shaped keys: wte.weight: checkpoint \\(256, 16\\) vs model \\(256, 32\\)"):
        train(tiny(tmp_path, name="small", resume=True, model_config={**TINY_MODEL, "d_model": 32}))


def test_text_file_corpus(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 200)
    s = train(tiny(tmp_path, data=str(text), steps=3, model="gpt",
                   model_config=dict(n_layer=1, d_model=16, n_head=2, d_ff=16)))
    assert s["step"] == 3
    cfg = json.load(open(tmp_path / "gpt" / "config.json"))
    assert cfg["model"]["num_experts"] == 0 and not (tmp_path / "gpt" / "expert_load.png").exists()
