"""`python -m tinymoe profile`: tables, the memory estimate and the plots."""
import pytest

from tinymoe.cli import main

TINY = ["--set", "vocab_size=32", "--set", "n_layer=1", "--set", "n_head=2", "--set", "d_model=16",
        "--set", "d_ff=32", "--batch", "2", "--seq-len", "8", "--peak-flops", "1e11",
        "--bandwidth", "1e10"]


def test_profile_command_prints_tables_and_writes_plots(tmp_path, capsys):
    assert main(["profile", "--model", "gpt", *TINY, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "LinearFunction (fwd)" in out and "LinearFunction (bwd)" in out
    assert "blocks.0" in out                                  # per-module table
    assert "estimate / measured" in out
    for name in ("roofline.png", "modules.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_profile_command_on_moe_prints_the_moe_estimate(tmp_path, capsys):
    assert main(["profile", "--model", "moe-gpt", "--set", "num_experts=4", *TINY,
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "GroupedLinear" in out and "estimate / measured" in out


def test_bad_set_argument_is_reported(capsys):
    with pytest.raises(SystemExit):
        main(["profile", "--set", "n_layer"])
    assert "--set expects key=value, got 'n_layer'" in capsys.readouterr().err
