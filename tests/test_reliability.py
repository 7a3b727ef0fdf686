"""No run is ever lost: every fault and bad input of docs/reliability.md, driven as a user does.

Each test asserts the exact behaviour: files unchanged (by hash), the exit code, the flag
named in the one-line error. Runs are tiny (--quick sizes, a few steps).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tinymoe.checkpoint import (CheckpointError, CorruptCheckpointError, NotSafetensorsError,
                                TruncatedCheckpointError, load_checkpoint, read_safetensors,
                                save_checkpoint)
from tinymoe.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--quick", "--no-progress", "--steps", "4", "--block-size", "16", "--batch-size", "2",
        "--log-interval", "2", "--eval-interval", "4", "--checkpoint-interval", "2",
        "--sample-tokens", "5"]


def cli(tmp_path, *args):
    return main(["train", *FAST, "--out-dir", str(tmp_path), *args])


def digest(folder) -> dict:
    """name -> SHA-256 of every file in a folder (the run's state on disk)."""
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(folder))}


def env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PYTHONUNBUFFERED="1", MPLBACKEND="Agg")


# ------------------------------------------------------------------ run folders
def test_a_second_run_never_overwrites_the_first(tmp_path, capsys):
    assert cli(tmp_path) == 0
    run = tmp_path / "moe-gpt"
    before = digest(run)
    assert cli(tmp_path, "--steps", "2") == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err and "--name" in err
    assert "\n" not in err
    assert digest(run) == before                                   # not a byte changed


def test_overwrite_starts_over_and_resume_appends(tmp_path):
    assert cli(tmp_path) == 0
    log = tmp_path / "moe-gpt" / "log.jsonl"
    first = log.read_text()
    assert cli(tmp_path, "--steps", "6", "--resume") == 0
    assert log.read_text().startswith(first)                       # only appended
    assert load_checkpoint(tmp_path / "moe-gpt" / "ckpt.safetensors")["step"] == 6
    assert cli(tmp_path, "--steps", "2", "--overwrite") == 0
    assert load_checkpoint(tmp_path / "moe-gpt" / "ckpt.safetensors")["step"] == 2
    assert not log.read_text().startswith(first)                  # a new run's log


def test_resume_of_a_finished_run_changes_nothing_and_says_so(tmp_path, capsys):
    assert cli(tmp_path) == 0
    before = digest(tmp_path / "moe-gpt")
    capsys.readouterr()
    assert cli(tmp_path, "--resume", "--steps", "3") == 0
    assert "is at step 4 and --steps is 3: nothing to train" in capsys.readouterr().out
    assert digest(tmp_path / "moe-gpt") == before


@pytest.mark.parametrize("args,flag", [
    (["--batch-size", "0"], "--batch-size"), (["--steps", "-5"], "--steps"), (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--block-size", "0"], "--block-size"),
    (["--log-interval", "0"], "--log-interval"), (["--checkpoint-interval", "0"], "--checkpoint-interval"),
    (["--eval-interval", "0"], "--eval-interval"), (["--eval-batches", "0"], "--eval-batches"),
    (["--warmup-steps", "9"], "--warmup-steps"), (["--grad-clip", "-1"], "--grad-clip"),
    (["--max-bad-steps", "0"], "--max-bad-steps"), (["--threads", "0"], "--threads"),
    (["--time-limit", "-1"], "--time-limit"), (["--sample-tokens", "-1"], "--sample-tokens"),
    (["--weight-decay", "-0.1"], "--weight-decay"), (["--experts", "-1"], "--experts"),
    (["--top-k", "0"], "--top-k"), (["--n-layer", "0"], "--n-layer"), (["--d-model", "31"], "--d-model"),
    (["--n-kv-head", "3"], "--n-kv-head"), (["--dropout", "1"], "--dropout"),
    (["--capacity-factor", "-2"], "--capacity-factor"), (["--moe-every", "0"], "--moe-every"),
    (["--resume", "--overwrite"], "--overwrite"), (["--name", "a/b"], "--name"),
    (["--model", "mamba", "--d-model", "0"], "--d-model"),
    (["--cuda-graph", "on"], "--cuda-graph"),                            # on the CPU
])
def test_bad_flags_are_refused_before_any_file_is_touched(tmp_path, capsys, args, flag):
    assert cli(tmp_path, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinymoe train: error:") and flag in err and "\n" not in err
    assert not os.path.exists(tmp_path / "moe-gpt") and not os.path.exists(tmp_path / "a")


def test_experts_that_do_not_divide_over_the_ranks_are_refused_early():
    from tinymoe.train_config import TrainConfig, validate_config

    cfg = TrainConfig(expert_parallel=True, batch_size=4, model_config={"num_experts": 3})
    with pytest.raises(ValueError, match=r"--experts must be a multiple of the 2 ranks .*got 3"):
        validate_config(cfg, world_size=2)
    with pytest.raises(ValueError, match=r"--batch-size 3 cannot be split evenly over 2 ranks"):
        validate_config(TrainConfig(expert_parallel=True, batch_size=3), world_size=2)


# ------------------------------------------------------------------ divergence
def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    args = ["--steps", "60", "--lr", "50", "--grad-clip", "0", "--warmup-steps", "0",
            "--log-interval", "1", "--checkpoint-interval", "1", "--eval-interval", "100"]
    assert cli(tmp_path, *args) == 3
    err = capsys.readouterr().err.strip()
    assert "not finite in 5 steps in a row" in err and "\n" not in err
    run = tmp_path / "moe-gpt"
    info = load_checkpoint(run / "ckpt.safetensors")               # loads: the checksum holds
    tensors, _ = read_safetensors(run / "ckpt.safetensors")
    assert all(np.isfinite(a).all() for a in tensors.values())
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]  # valid JSON
    assert [r for r in records if "skipped_steps" in r][-1]["skipped_steps"] == 4   # counted in the log
    assert info["step"] == records[-1]["step"]                     # not saved past the divergence:
    assert 0 < info["extra"]["guard"]["streak"] < 5                # bad steps skipped, weights good


def test_skipped_steps_change_nothing():
    """A non-finite step leaves the weights and AdamW's moments and step count alone."""
    from tinymoe import manual_seed
    from tinymoe.models import build_model
    from tinymoe.optim import AdamW
    from tinymoe.step import EagerStep

    manual_seed(0)
    model = build_model("gpt", n_layer=1, d_model=8, n_head=2, d_ff=16, block_size=8)
    opt = AdamW(model.parameters(), lr=1e-2)
    step = EagerStep(model, opt)
    x = np.random.default_rng(0).integers(0, 256, (2, 8))
    step(x, x)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    moments = {k: v.copy() for k, v in opt.state_dict()[0].items()}
    model.wte.weight.data[0, 0] = np.nan                           # the next loss is NaN
    result = step(x, x)
    assert not bool(result.finite)
    model.wte.weight.data[0, 0] = before["wte.weight"][0, 0]
    assert all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())
    arrays, meta = opt.state_dict()
    assert all(np.array_equal(v, moments[k]) for k, v in arrays.items())
    assert {s["step"] for s in meta["scalars"].values()} == {1}


def test_a_checkpoint_with_a_non_finite_value_is_never_written(tmp_path):
    from tinymoe import manual_seed
    from tinymoe.models import build_model

    manual_seed(0)
    model = build_model("gpt", n_layer=1, d_model=8, n_head=2, d_ff=16, block_size=8)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, step=1)
    before = path.read_bytes()
    model.wte.weight.data[3, 1] = np.inf
    with pytest.raises(ValueError, match=r"model.wte.weight \(256, 8\) holds 1 non-finite values"):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.safetensors"]


def test_the_previous_checkpoint_is_kept_and_dead_temporaries_are_removed(tmp_path):
    from tinymoe import manual_seed
    from tinymoe.models import build_model

    manual_seed(0)
    model = build_model("gpt", n_layer=1, d_model=8, n_head=2, d_ff=16, block_size=8)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, step=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                                    # a pid that no longer runs
    stale = tmp_path / f".ckpt.safetensors.tmp-{dead.pid}"
    stale.write_bytes(b"half a checkpoint")
    save_checkpoint(path, model, step=2)
    assert load_checkpoint(tmp_path / "ckpt.prev.safetensors")["step"] == 1
    assert load_checkpoint(path)["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt.prev.safetensors", "ckpt.safetensors"]


# ------------------------------------------------------------------ signals
def _start(tmp_path, *args):
    return subprocess.Popen([sys.executable, "-m", "tinymoe", "train", *FAST, "--out-dir", str(tmp_path),
                             "--log-interval", "1", *args], env=env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_log(path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and '"loss"' in open(path).read():
            return
        time.sleep(0.05)
    raise AssertionError(f"no training step logged in {path} within {timeout} s")


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_saves_and_exits_nonzero(tmp_path, signum, code):
    proc = _start(tmp_path, "--steps", "100000", "--checkpoint-interval", "100000", "--time-limit", "none")
    _wait_for_log(tmp_path / "moe-gpt" / "log.jsonl")
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, out
    step = load_checkpoint(tmp_path / "moe-gpt" / "ckpt.safetensors")["step"]
    assert step >= 1 and f"stopped by signal {int(signum)} at step {step}" in out
    assert [n for n in os.listdir(tmp_path / "moe-gpt") if ".tmp-" in n] == []


def test_chaos_kill_at_random_moments_and_resume(tmp_path):
    """SIGKILL or SIGTERM at random moments, resumed each time: the checkpoint always loads,
    holds only finite values, and its step never goes backwards (bounded: ~40 s)."""
    rng = random.Random(0)
    ckpt = tmp_path / "moe-gpt" / "ckpt.safetensors"
    last_step, started = 0, time.monotonic()
    for attempt in range(12):
        if time.monotonic() - started > 45:
            break
        resume = ["--resume"] if ckpt.exists() else ["--overwrite"]
        log = tmp_path / "moe-gpt" / "log.jsonl"
        logged = log.stat().st_size if log.exists() else 0
        proc = _start(tmp_path, "--steps", "100000", "--checkpoint-interval", "1", "--time-limit", "none",
                      *resume)
        _wait_for_growth(log, logged)                              # training has started (any load)
        time.sleep(rng.uniform(0.0, 0.5))                          # then a random moment in the loop
        proc.send_signal(rng.choice([signal.SIGKILL, signal.SIGTERM]))
        proc.communicate(timeout=60)
        if not ckpt.exists():
            continue                                               # killed before the first save
        info = load_checkpoint(ckpt)
        tensors, _ = read_safetensors(ckpt)
        assert all(np.isfinite(a).all() for a in tensors.values())
        assert info["step"] >= last_step, (attempt, info["step"], last_step)
        last_step = info["step"]
    assert last_step > 0


def _wait_for_growth(path, size: int, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path) > size:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} did not grow within {timeout} s")


def test_sigterm_to_one_rank_saves_once_and_stops_every_rank(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "tinymoe.distributed.launch", "--nproc", "2", "-m", "tinymoe",
                             "train", *FAST, "--out-dir", str(tmp_path), "--expert-parallel", "--log-interval", "1",
                             "--steps", "100000", "--checkpoint-interval", "100000", "--time-limit", "none"],
                            env=env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_log(tmp_path / "moe-gpt" / "log.jsonl", timeout=90)
    ranks = _children(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGTERM)                              # the scheduler hits rank 1 only
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 143, out
    assert out.count("stopped by signal 15") == 1                  # rank 0 saved, once
    assert load_checkpoint(tmp_path / "moe-gpt" / "ckpt.safetensors")["step"] >= 1


def _children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (from /proc), in start order."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return sorted(kids)


# ------------------------------------------------------------------ generation
@pytest.mark.parametrize("model", ["gpt", "moe-gpt", "mamba", "hybrid"])
def test_generate_from_every_model_from_file_or_folder(tmp_path, capsys, model):
    assert cli(tmp_path, "--model", model, "--steps", "2") == 0
    run = tmp_path / model
    for where in (run, run / "ckpt.safetensors"):
        for extra in ([], ["--no-cache"], ["--prompt", ""]):
            capsys.readouterr()
            assert main(["generate", "--checkpoint", str(where), "--max-new-tokens", "4", *extra]) == 0
            assert capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "nowhere"], "no checkpoint at nowhere"),
    (["--checkpoint", "{run}", "--top-k", "0"], "--top-k must be >= 1, got 0"),
    (["--checkpoint", "{run}", "--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    (["--checkpoint", "{run}", "--max-new-tokens", "-3"], "--max-new-tokens must be >= 0, got -3"),
    (["--checkpoint", "{pickle}"], "is not a safetensors file"),
    (["--checkpoint", "{cut}"], "is truncated"),
    (["--checkpoint", "{empty_dir}"], "empty/ckpt.safetensors"),
])
def test_generate_errors_are_one_line(tmp_path, capsys, args, message):
    import pickle
    assert cli(tmp_path, "--model", "gpt", "--steps", "2") == 0
    data = (tmp_path / "gpt" / "ckpt.safetensors").read_bytes()
    (tmp_path / "model.pkl").write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    (tmp_path / "empty").mkdir()
    paths = {"run": tmp_path / "gpt", "pickle": tmp_path / "model.pkl", "cut": tmp_path / "cut.safetensors",
             "empty_dir": tmp_path / "empty"}
    capsys.readouterr()
    assert main(["generate", *[a.format(**paths) for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinymoe generate: error:") and message in err and "\n" not in err


def test_models_name_bad_id_shapes():
    from tinymoe.models import build_model

    model = build_model("gpt", n_layer=1, d_model=8, n_head=2, d_ff=16, block_size=8)
    for ids in (np.zeros(3, np.int64), np.zeros((1, 2, 3), np.int64), np.zeros((1, 0), np.int64)):
        with pytest.raises(ValueError, match=r"GPT: ids must be \(B, L\) token ids"):
            model(ids)
    with pytest.raises(ValueError, match=r"generate: the prompt must be \(L,\) or \(B, L\)"):
        model.generate(np.zeros((1, 0), np.int64), 2)


def test_profile_refuses_what_cannot_fit(capsys):
    assert main(["profile", "--seq-len", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs about" in err and "--seq-len" in err and "\n" not in err
    assert main(["profile", "--batch", "0"]) == 2
    assert "--batch must be >= 1, got 0" in capsys.readouterr().err


# ------------------------------------------------------------------ the loader, fuzzed
@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    from tinymoe import manual_seed
    from tinymoe.models import build_model
    from tinymoe.optim import AdamW

    manual_seed(0)
    model = build_model("gpt", n_layer=1, d_model=4, n_head=1, d_ff=8, block_size=4, vocab_size=16)
    opt = AdamW(model.parameters())
    path = tmp_path_factory.mktemp("fuzz") / "ckpt.safetensors"
    save_checkpoint(path, model, opt, step=3)
    return path.read_bytes()


def _load_bytes(tmp_path, data: bytes):
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    try:
        load_checkpoint(path, restore_rng=False)
    except CheckpointError as err:
        return type(err)
    return None


def test_truncation_at_every_offset_is_reported_as_truncated(tmp_path, real_checkpoint):
    for n in range(len(real_checkpoint)):
        assert _load_bytes(tmp_path, real_checkpoint[:n]) is TruncatedCheckpointError, n


def test_foreign_files_are_not_safetensors(tmp_path):
    import pickle
    assert _load_bytes(tmp_path, pickle.dumps({"a": np.zeros(3).tolist()})) is NotSafetensorsError
    assert _load_bytes(tmp_path, b"# a text file\nhello\n" * 10) is NotSafetensorsError


def test_fuzz_random_bytes_and_mutated_headers(tmp_path, real_checkpoint):
    from hypothesis import HealthCheck, assume, given, settings
    from hypothesis import strategies as st

    n = int.from_bytes(real_checkpoint[:8], "little")
    header = json.loads(real_checkpoint[8:8 + n])
    body = real_checkpoint[8 + n:]
    names = [k for k in header if k != "__metadata__"]

    def rebuild(h: dict) -> bytes:
        text = json.dumps(h).encode()
        return len(text).to_bytes(8, "little") + text + body

    mutation = st.one_of(
        st.tuples(st.just("dtype"), st.sampled_from(["F16", "I8", "BOOL", "X9", "", "F64"])),
        st.tuples(st.just("shape"), st.lists(st.integers(-3, 2**40), max_size=4)),
        st.tuples(st.just("data_offsets"), st.lists(st.integers(-5, 2**62), max_size=3)),
        st.tuples(st.just("drop"), st.none()),
        st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
    )

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=300), st.sampled_from(names), mutation)
    def check(noise, name, change):
        assert _load_bytes(tmp_path, noise) in (None, NotSafetensorsError, TruncatedCheckpointError,
                                                CorruptCheckpointError)
        key, value = change
        h = json.loads(json.dumps(header))
        if key == "drop":
            del h[name]
            data = rebuild(h)
        elif key == "length":
            assume(value != n)
            data = value.to_bytes(8, "little") + real_checkpoint[8:]
        else:
            assume(h[name][key] != value)
            h[name][key] = value
            data = rebuild(h)
        assert _load_bytes(tmp_path, data) in (NotSafetensorsError, TruncatedCheckpointError,
                                               CorruptCheckpointError)

    check()
