"""Every example script runs end to end, at its smallest settings, writing its plots under
runs/<script>/ (the default of --out) and nothing into docs/img/.

Each runs in a fresh folder that holds a copy of docs/img/, as a user's repository root
does; the copy and the repository's own docs/img/ must be byte-identical afterwards.
"""
import ast
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script, arguments, files it must write under runs/<script>/
EXAMPLES = [
    ("train_moe_gpt.py", ["--quick"], []),   # its run folder is TrainConfig's: runs/moe-gpt-example/
    ("moe_specialization.py", ["--quick"], ["moe_specialization.png"]),
    ("branch_train_merge.py", ["--quick"], ["branch_train_merge.png"]),
    ("expert_parallel.py", ["--steps", "3", "--nproc", "2"], ["expert_parallel.png"]),
    ("selective_copying.py", ["--steps", "3"], ["selective_copying.png"]),
    ("induction_heads.py", ["--steps", "3"], ["induction_heads.png"]),
    ("visualize_selectivity.py", ["--steps", "3"], ["selectivity.png"]),
    ("ssm_car.py", [], ["ssm_car.png"]),
    ("train_mamba.py", ["--steps", "3"], []),
    ("attention_vs_scan.py", [], []),
    ("memory_of_training.py", [], []),
    pytest.param("compare_routers.py", ["--quick"],
                 ["compare_routers_loss.png", "compare_routers_load.png"], marks=pytest.mark.slow),
    pytest.param("scaling_experts.py", ["--quick"], ["scaling_experts.png"], marks=pytest.mark.slow),
]


IDS = [(e.values if hasattr(e, "values") else e)[0] for e in EXAMPLES]
# expert_parallel.py takes its device from the backend (NCCL: the GPUs), not from --device;
# ssm_car.py has no --device (2 x 2 systems)
ON_GPU = [e for e, name in zip(EXAMPLES, IDS) if name not in ("expert_parallel.py", "ssm_car.py")]


def folder_digest(folder):
    """SHA-256 over every file's relative path and bytes under `folder`."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def run_script(path, args, cwd, timeout=400):
    env = dict(os.environ, MPLBACKEND="Agg",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, str(path)] + list(args), cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


def run_in_a_repo_like_folder(path, args, outputs, tmp_path, out=None):
    """Run `path` from tmp_path, which holds a copy of docs/img/; `outputs` must appear under
    `out` (default runs/<script>/), and neither docs/img/ may change."""
    shutil.copytree(ROOT / "docs" / "img", tmp_path / "docs" / "img")
    before = folder_digest(ROOT / "docs" / "img")
    assert folder_digest(tmp_path / "docs" / "img") == before
    run_script(path, args, tmp_path)
    assert folder_digest(tmp_path / "docs" / "img") == before, f"{path.name} wrote into docs/img/"
    assert folder_digest(ROOT / "docs" / "img") == before, f"{path.name} wrote into the repo's docs/img/"
    out = tmp_path / (out or Path("runs") / path.stem)
    for name in outputs:
        assert (out / name).stat().st_size > 0, f"{path.name} did not write {name} under {out}"


@pytest.mark.parametrize("script,args,outputs", EXAMPLES, ids=IDS)
def test_example_runs(script, args, outputs, tmp_path):
    run_in_a_repo_like_folder(ROOT / "examples" / script, args, outputs, tmp_path)


def test_out_names_the_folder_and_creates_it(tmp_path):
    run_in_a_repo_like_folder(ROOT / "examples" / "ssm_car.py", ["--out", "new/folder"],
                              ["ssm_car.png"], tmp_path, out="new/folder")
    assert not (tmp_path / "runs").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("script,args,outputs", ON_GPU,
                         ids=[(e.values if hasattr(e, "values") else e)[0] for e in ON_GPU])
def test_example_runs_on_the_gpu(script, args, outputs, tmp_path):
    run_in_a_repo_like_folder(ROOT / "examples" / script, args + ["--device", "cuda"], outputs,
                              tmp_path)


# --------------------------------------------------------------------------- benchmarks

# the benchmarks that run on a CPU in seconds at these sizes; the others (GPU, MPI, ptxas)
# get the static check below
BENCHMARKS = [
    ("bench_nn.py", ["--params", "1e4", "--repeat", "1"], ["nn_lr_schedule.png", "nn_xor.png"]),
    ("bench_attention_vs_scan.py", ["--lengths", "64", "128", "--repeats", "1"],
     ["attention_vs_scan.png"]),
]


@pytest.mark.parametrize("script,args,outputs", BENCHMARKS, ids=[b[0] for b in BENCHMARKS])
def test_benchmark_writes_under_runs(script, args, outputs, tmp_path):
    run_in_a_repo_like_folder(ROOT / "benchmarks" / script, args, outputs, tmp_path)


# --------------------------------------------------------------------------- every script, statically

SCRIPTS = sorted((ROOT / "examples").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
WRITERS = {"savefig", "write_text", "write_bytes"}


def writes_files(tree):
    """Whether the script saves a figure, writes a text, or opens a file for writing itself."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Attribute) and node.func.attr in WRITERS:
            return True
        if (isinstance(node.func, ast.Name) and node.func.id == "open" and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant) and "w" in str(node.args[1].value)):
            return True
    return False


def out_default(tree):
    """The default of the script's `--out` option (None when it has none)."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument" and node.args
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == "--out"):
            return next((k.value.value for k in node.keywords if k.arg == "default"), None)
    return None


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_script_that_writes_takes_out_defaulting_to_runs(path):
    source = path.read_text()
    tree = ast.parse(source)
    doc = ast.get_docstring(tree) or ""
    code = source.splitlines()[tree.body[0].end_lineno if doc else 0:]    # the lines after the docstring
    assert not [line for line in code if "docs/img" in line], f"{path.name} names docs/img outside its docstring"
    if writes_files(tree):
        assert out_default(tree) == f"runs/{path.stem}", f"{path.name}: --out must default to runs/{path.stem}"
        assert "--out" in doc, f"{path.name}: the docstring should say where the files go (--out)"
    else:
        assert out_default(tree) is None, f"{path.name} takes --out but writes nothing itself"
