"""`python -m tinymoe train / generate / profile` driven as a user drives them: every model,
every train flag with a valid value (it must reach the run's config.json), every numeric
flag out of range (exit 2, one line naming the flag, nothing created), every choice flag with
a wrong choice; generation from each model's checkpoint file and run folder; profile of each
model. In-process through tinymoe.cli.main (fast); a few through a real `python -m tinymoe`
for the exit codes. Tiny sizes throughout (--quick, 2 steps of 2 x 16 bytes).

The tables below are checked against the parser: a flag added to tinymoe/cli.py without a
row here fails test_every_flag_is_in_the_tables.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tinymoe.distributed as dist
from tinymoe.checkpoint import load_checkpoint
from tinymoe.cli import build_parser, main
from tinymoe.backend import set_blas_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--quick", "--no-progress", "--steps", "2", "--block-size", "16", "--batch-size", "2",
        "--sample-tokens", "3"]
TEXT = "def add(a, b):\n    return a + b\n\n" * 60          # a --data file: 2,040 bytes


def command_actions(command: str) -> list[argparse.Action]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices[command]._actions if a.option_strings != ["-h", "--help"]]


def numeric_flags(command: str) -> set[str]:
    return {a.option_strings[0] for a in command_actions(command)
            if a.type is not None and a.type is not str and not a.choices and a.nargs is None
            and a.dest != "config"}


def train(tmp_path, *args) -> int:
    return main(["train", *TINY, "--out-dir", str(tmp_path / "out"), *args])


def saved_config(run) -> tuple[dict, dict]:
    config = json.loads((run / "config.json").read_text())
    return config["train"], config["model"]


def one_line_error(capsys, command: str, flag: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tinymoe {command}: error:") and "\n" not in err, err
    assert flag in err, err
    return err


# --------------------------------------------------------------------------- valid values
# model -> (flags, what config.json must then hold: {("train" | "model", field): value})
# Together the four runs give every train flag a valid value at least once.
MODEL_RUNS = {
    "gpt": (["--model", "gpt", "--name", "dense", "--data", "{corpus}", "--device", "cpu",
             "--n-layer", "1", "--d-model", "16", "--n-head", "2", "--n-kv-head", "1", "--d-ff", "24",
             "--activation", "relu", "--dropout", "0.1", "--recompute", "--recompute-attention",
             "--lr", "0.01", "--warmup-steps", "1", "--weight-decay", "0.05", "--grad-clip", "0.5",
             "--eval-interval", "1", "--eval-batches", "1", "--log-interval", "1",
             "--checkpoint-interval", "1", "--seed", "3", "--time-limit", "100", "--threads", "2",
             "--max-bad-steps", "2", "--dtype", "float64", "--cuda-graph", "off"],
            {("train", "model"): "gpt", ("train", "name"): "dense", ("train", "data"): "{corpus}",
             ("train", "device"): "cpu", ("model", "n_layer"): 1, ("model", "d_model"): 16,
             ("model", "n_head"): 2, ("model", "n_kv_head"): 1, ("model", "d_ff"): 24,
             ("model", "activation"): "relu", ("model", "dropout"): 0.1, ("model", "recompute"): True,
             ("model", "recompute_attention"): True, ("train", "lr"): 0.01, ("train", "warmup_steps"): 1,
             ("train", "weight_decay"): 0.05, ("train", "grad_clip"): 0.5, ("train", "eval_interval"): 1,
             ("train", "eval_batches"): 1, ("train", "log_interval"): 1, ("train", "checkpoint_interval"): 1,
             ("train", "seed"): 3, ("train", "time_limit"): 100.0, ("train", "threads"): 2,
             ("train", "max_bad_steps"): 2, ("train", "dtype"): "float64", ("train", "cuda_graph"): "off"}),
    "moe-gpt": (["--router", "gshard", "--experts", "4", "--top-k", "2", "--capacity-factor", "1.5",
                 "--eval-capacity-factor", "none", "--shared-experts", "1", "--moe-every", "2",
                 "--aux-loss-weight", "0.02", "--z-loss-weight", "0.0005", "--expert-parallel", "--ep-size", "1"],
                {("train", "model"): "moe-gpt", ("model", "router"): "gshard", ("model", "num_experts"): 4,
                 ("model", "top_k"): 2, ("model", "capacity_factor"): 1.5,
                 ("model", "eval_capacity_factor"): None, ("model", "num_shared_experts"): 1,
                 ("model", "moe_every"): 2, ("model", "aux_loss_weight"): 0.02,
                 ("model", "z_loss_weight"): 0.0005, ("train", "expert_parallel"): True, ("train", "ep_size"): 1}),
    "mamba": (["--model", "mamba", "--d-model", "16", "--time-limit", "none", "--precision", "bf16"],
              {("train", "model"): "mamba", ("model", "d_model"): 16, ("model", "n_layer"): 2,
               ("train", "time_limit"): None, ("train", "precision"): "bf16"}),
    "hybrid": (["--model", "hybrid", "--experts", "2", "--top-k", "1"],
               {("train", "model"): "hybrid", ("model", "num_experts"): 2, ("model", "top_k"): 1,
                ("model", "d_model"): 32}),
}
# the flags every run above gives (TINY and --out-dir), and those with tests of their own below
EVERY_RUN = {("train", "steps"): 2, ("train", "block_size"): 16, ("train", "batch_size"): 2,
             ("train", "sample_tokens"): 3, ("train", "progress"): False}
OWN_TESTS = {"--resume", "--overwrite", "--backend"}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.fixture
def restore_process_state():
    """--threads and --expert-parallel change this process: put them back for the next tests."""
    yield
    set_blas_threads(1)
    dist.set_world(None)


@pytest.mark.parametrize("model", list(MODEL_RUNS))
def test_each_model_trains_with_its_flags_then_generates_and_profiles(
        model, tmp_path, capsys, corpus, restore_process_state):
    flags, expected = MODEL_RUNS[model]
    assert train(tmp_path, *[f.format(corpus=corpus) for f in flags]) == 0
    run = tmp_path / "out" / (flags[flags.index("--name") + 1] if "--name" in flags else model)
    train_cfg, model_cfg = saved_config(run)
    for (where, field), value in {**EVERY_RUN, **expected}.items():
        got = (train_cfg if where == "train" else model_cfg)[field]
        assert got == (value.format(corpus=corpus) if isinstance(value, str) else value), (field, got)
    ckpt = run / "ckpt.safetensors"
    info = load_checkpoint(ckpt)
    assert info["step"] == 2
    dtype = np.dtype(np.float64 if "--dtype" in flags else np.float32)
    assert {a.dtype for a in info["model_state"].values() if a.dtype.kind == "f"} == {dtype}

    # generate: from the file and from the folder, greedy with and without the cache agree,
    # and a seeded sample is the same twice
    outputs = []
    for where in (ckpt, run):
        for extra in ([], ["--no-cache"]):
            capsys.readouterr()
            assert main(["generate", "--checkpoint", str(where), "--prompt", "def ", "--temperature", "0",
                         "--max-new-tokens", "6", *extra]) == 0
            outputs.append(capsys.readouterr().out)
    assert outputs[0].startswith("def ") and len(set(outputs)) == 1, outputs
    sampled = []
    for _ in range(2):
        assert main(["generate", "--checkpoint", str(run), "--prompt", "", "--temperature", "0.8",
                     "--top-k", "5", "--seed", "7", "--max-new-tokens", "5"]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] and sampled[0].startswith("\n")   # empty prompt: a newline

    # profile: the same kind of model, every profile flag
    sizes = {"gpt": ["n_layer=1", "d_model=16", "n_head=2", "d_ff=16"],
             "moe-gpt": ["n_layer=1", "d_model=16", "n_head=2", "d_ff=16", "num_experts=2", "top_k=1"],
             "mamba": ["n_layer=1", "d_model=16"], "hybrid": ["n_layer=2", "d_model=16"]}[model]
    prof = tmp_path / "prof"
    assert main(["profile", "--model", model, *[a for s in sizes for a in ("--set", s)], "--batch", "1",
                 "--seq-len", "8", "--device", "cpu", "--depth", "1", "--peak-flops", "1e9",
                 "--bandwidth", "1e9", "--out", str(prof)]) == 0
    out = capsys.readouterr().out
    assert f"{model}: " in out and "batch 1 x 8 tokens" in out and "per module (depth 1)" in out
    assert (prof / "roofline.png").stat().st_size > 0 and (prof / "modules.png").stat().st_size > 0


def test_resume_continues_and_overwrite_starts_over(tmp_path):
    run = tmp_path / "out" / "moe-gpt"
    assert train(tmp_path) == 0
    log = (run / "log.jsonl").read_text()
    assert train(tmp_path, "--resume", "--steps", "3") == 0
    assert load_checkpoint(run / "ckpt.safetensors")["step"] == 3
    assert (run / "log.jsonl").read_text().startswith(log)
    assert train(tmp_path, "--overwrite", "--seed", "1") == 0
    assert load_checkpoint(run / "ckpt.safetensors")["step"] == 2
    assert saved_config(run)[0]["seed"] == 1


def test_backend_through_the_launcher(tmp_path):
    """--expert-parallel --backend toy on 2 ranks started by the launcher: a real process tree."""
    r = subprocess.run([sys.executable, "-m", "tinymoe.distributed.launch", "--nproc", "2", "-m", "tinymoe",
                        "train", *TINY, "--out-dir", str(tmp_path), "--expert-parallel", "--backend", "toy"],
                       capture_output=True, text=True, timeout=180, cwd=tmp_path, env=_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "on 2 ranks (toy" in r.stdout
    assert saved_config(tmp_path / "moe-gpt")[0]["backend"] == "toy"


def test_every_flag_is_in_the_tables():
    given = {f for flags, _ in MODEL_RUNS.values() for f in flags if f.startswith("--")}
    given |= {f for f in TINY if f.startswith("--")} | {"--out-dir"} | OWN_TESTS
    flags = {a.option_strings[0] for a in command_actions("train")}
    assert flags - given == set(), "train flags without a valid-value case"
    assert numeric_flags("train") - set(OUT_OF_RANGE) == set(), "numeric train flags without a bad value"
    assert {a.option_strings[0] for a in command_actions("train") if a.choices} <= set(BAD_CHOICE)
    assert numeric_flags("generate") <= {f for f, _ in GENERATE_BAD}
    assert numeric_flags("profile") <= {f for f, _ in PROFILE_BAD}


# --------------------------------------------------------------------------- bad values
# every numeric train flag -> values out of its range (the flag must be named in the error)
OUT_OF_RANGE = {
    "--experts": ["-1"], "--top-k": ["0", "9"], "--capacity-factor": ["0", "inf"],
    "--eval-capacity-factor": ["-1", "inf"], "--shared-experts": ["-1"], "--moe-every": ["0"],
    "--aux-loss-weight": ["-0.1", "nan", "inf"], "--z-loss-weight": ["-1", "inf"], "--n-layer": ["0"],
    "--d-model": ["0", "33"], "--n-head": ["0"], "--n-kv-head": ["0", "3"], "--d-ff": ["0"],
    "--dropout": ["1", "-0.1", "nan"], "--steps": ["0", "-5"], "--batch-size": ["0"],
    "--block-size": ["0", "100000"], "--lr": ["0", "inf", "nan"], "--warmup-steps": ["-1", "3"],
    "--weight-decay": ["-0.1", "inf"], "--grad-clip": ["-1", "nan"], "--eval-interval": ["0"],
    "--eval-batches": ["0"], "--log-interval": ["0"], "--checkpoint-interval": ["0"], "--seed": ["-1"],
    "--time-limit": ["-1", "nan"], "--threads": ["0"], "--max-bad-steps": ["0"], "--sample-tokens": ["-1"],
    "--ep-size": ["0"],
}
# wrong words: (flag, value, text of the error); the error names the flag or the value given
BAD_WORDS = [
    ("--data", "{tmp}/nowhere.txt", "does not exist"), ("--data", "{tmp}/empty.txt", "is empty"),
    ("--name", "a/b", "folder name"), ("--out-dir", "{tmp}/a_file/runs", "is a file"),
    ("--resume", None, "no checkpoint"), ("--device", "cuda", "CuPy"),
    ("--backend", "toy", "--expert-parallel"), ("--cuda-graph", "on", "--device cuda"),
]


@pytest.mark.parametrize("flag,value", [(f, v) for f, vs in OUT_OF_RANGE.items() for v in vs])
def test_out_of_range_numbers_are_refused_before_any_file(tmp_path, capsys, flag, value):
    assert train(tmp_path, f"{flag}={value}") == 2
    one_line_error(capsys, "train", flag)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value,text", BAD_WORDS, ids=[f"{f}-{v}" for f, v, _ in BAD_WORDS])
def test_wrong_words_are_refused_before_any_file(tmp_path, capsys, flag, value, text):
    if flag == "--device":
        import tinymoe
        if tinymoe.cuda_available():
            pytest.skip("a GPU is here: --device cuda is valid")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "a_file").write_text("not a folder")
    args = [flag] if value is None else [flag, value.format(tmp=tmp_path)]
    assert train(tmp_path, *args) == 2
    err = one_line_error(capsys, "train", text)
    assert flag in err or args[-1] in err, err
    assert not (tmp_path / "out").exists()


BAD_CHOICE = {"--model": "bert", "--router": "soft", "--activation": "tanh", "--dtype": "float16",
              "--device": "tpu", "--backend": "gloo", "--precision": "fp8", "--cuda-graph": "always"}


@pytest.mark.parametrize("flag,value", list(BAD_CHOICE.items()) + [("--steps", "ten"), ("--lr", "fast")])
def test_wrong_choices_and_types_are_argparse_errors(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as stop:
        train(tmp_path, flag, value)
    assert stop.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


GENERATE_BAD = [("--max-new-tokens", "-1"), ("--temperature", "-1"), ("--temperature", "nan"),
                ("--top-k", "0"), ("--seed", "-1")]


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    assert main(["train", *TINY, "--model", "gpt", "--out-dir", str(out)]) == 0
    return out / "gpt"


@pytest.mark.parametrize("flag,value", GENERATE_BAD)
def test_generate_refuses_out_of_range_numbers(gpt_run, capsys, flag, value):
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(gpt_run), f"{flag}={value}"]) == 2
    one_line_error(capsys, "generate", flag)


PROFILE_BAD = [("--batch", "0"), ("--seq-len", "0"), ("--depth", "0"), ("--peak-flops", "-1"),
               ("--peak-flops", "inf"), ("--bandwidth", "0"), ("--bandwidth", "nan"),
               ("--seq-len", "100000")]


@pytest.mark.parametrize("flag,value", PROFILE_BAD)
def test_profile_refuses_out_of_range_numbers_before_any_file(tmp_path, capsys, flag, value):
    assert main(["profile", "--model", "gpt", "--set", "n_layer=1", "--set", "d_model=16", "--set", "n_head=2",
                 "--batch", "1", "--seq-len", "8", "--peak-flops", "1e9", "--bandwidth", "1e9",
                 "--out", str(tmp_path / "prof"), f"{flag}={value}"]) == 2
    one_line_error(capsys, "profile", flag)
    assert not (tmp_path / "prof").exists()


# --------------------------------------------------------------------------- real processes
def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), MPLBACKEND="Agg")


@pytest.mark.parametrize("argv,message", [
    (["train", *TINY, "--batch-size", "0"], "tinymoe train: error: --batch-size must be"),
    (["generate", "--checkpoint", "nowhere"], "tinymoe generate: error: load_checkpoint: no checkpoint at nowhere"),
    (["profile", "--seq-len", "0"], "tinymoe profile: error: --seq-len must be >= 1, got 0"),
    (["train", "--router", "soft"], "tinymoe train: error: argument --router: invalid choice: 'soft'"),
])
def test_python_dash_m_tinymoe_exits_2_with_the_error_last(tmp_path, argv, message):
    """Our errors are one line on stderr; argparse's come after its usage lines."""
    r = subprocess.run([sys.executable, "-m", "tinymoe", *argv], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=_env())
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(message), r.stderr
    assert len(lines) == 1 or lines[0].startswith("usage: tinymoe"), r.stderr
    assert os.listdir(tmp_path) == []                             # nothing written where it ran (runs/)


def test_python_dash_m_tinymoe_without_a_command_prints_help_and_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tinymoe"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=_env())
    assert r.returncode == 2 and r.stdout.startswith("usage: tinymoe") and "train" in r.stdout


@pytest.mark.parametrize("model", ["moe-gpt", "mamba"])
def test_train_and_generate_run_without_the_safetensors_package(tmp_path, model):
    """tinymoe writes and reads its checkpoints itself (tinymoe/safetensors_file.py): a machine
    without the `safetensors` package (which has a compiled extension) still trains, resumes and
    generates. The package is hidden from the process as if it were not installed."""
    def tinymoe_without_safetensors(*argv):
        code = ("import runpy, sys; sys.modules['safetensors'] = None; "
                f"sys.argv = ['tinymoe', *{list(argv)!r}]; runpy.run_module('tinymoe', run_name='__main__')")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env=_env())

    out = tmp_path / "out"
    r = tinymoe_without_safetensors("train", *TINY, "--model", model, "--out-dir", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / model / "ckpt.safetensors").exists()
    r = tinymoe_without_safetensors("train", *TINY, "--model", model, "--out-dir", str(out),
                                    "--resume", "--steps", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_checkpoint(out / model / "ckpt.safetensors", restore_rng=False)["step"] == 3
    r = tinymoe_without_safetensors("generate", "--checkpoint", str(out / model), "--prompt", "def ",
                                    "--max-new-tokens", "4")
    assert r.returncode == 0 and r.stdout.startswith("def "), r.stderr[-2000:]
