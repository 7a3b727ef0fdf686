"""`python -m tinymoe train|generate`: smoke runs and error messages."""
import subprocess
import sys

import pytest

from tinymoe.cli import COMMANDS, main


def test_train_quick_then_generate(tmp_path, capsys):
    out = str(tmp_path)
    assert main(["train", "--quick", "--no-progress", "--out-dir", out, "--router", "switch",
                 "--experts", "3", "--top-k", "1", "--capacity-factor", "none"]) == 0
    ckpt = tmp_path / "moe-gpt" / "ckpt.safetensors"
    assert ckpt.exists()
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "import ",
                 "--max-new-tokens", "10"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("import ")


def test_python_dash_m_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tinymoe", "train", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--router" in r.stdout and "--top-k" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--top-k", "9"], "error: --top-k must be <= --experts (8), got 9"),
    (["--capacity-factor", "0"], "error: --capacity-factor must be a finite number > 0 (or none: dropless), got 0.0"),
    (["--data", "/nonexistent/x.txt"], "--data: file '/nonexistent/x.txt' does not exist"),
    (["--recompute"], "GPT: recompute=True needs a dense model (num_experts=0)"),
])
def test_train_errors(tmp_path, capsys, args, message):
    assert main(["train", "--quick", "--no-progress", "--out-dir", str(tmp_path)] + args) == 2
    assert message in capsys.readouterr().err


def test_unknown_router_lists_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--router", "soft"])
    err = capsys.readouterr().err
    assert "invalid choice: 'soft'" in err and "expert-choice" in err and "base" in err


def test_generate_with_checkpoint_of_another_shape(tmp_path, capsys):
    out = str(tmp_path)
    main(["train", "--quick", "--no-progress", "--out-dir", out, "--steps", "1"])
    assert main(["train", "--quick", "--no-progress", "--out-dir", out, "--resume",
                 "--d-model", "64"]) == 2
    assert "mis-shaped keys" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "nope.safetensors")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_commands_table_is_extensible():
    assert {"train", "generate"} <= set(COMMANDS)


def test_quick_mamba_gets_only_its_own_config_fields(tmp_path, capsys):
    # --quick's GPT sizes (n_head, d_ff) and an explicit --n-head are not Mamba fields
    assert main(["train", "--model", "mamba", "--quick", "--no-progress", "--out-dir", str(tmp_path),
                 "--steps", "2", "--n-head", "4", "--sample-tokens", "4"]) == 0
    assert "n_head not in the mamba config: ignored" in capsys.readouterr().err
    import json
    config = json.loads((tmp_path / "mamba" / "config.json").read_text())["model"]
    assert config["n_layer"] == 2 and config["d_model"] == 32 and "n_head" not in config
