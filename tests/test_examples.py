"""Every example script runs end to end, at its smallest settings, writing its plots."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script, arguments (plots go to {out}), files it must write under {out}
EXAMPLES = [
    ("train_moe_gpt.py", ["--quick"], []),
    ("moe_specialization.py", ["--quick", "--out", "{out}"], ["moe_specialization.png"]),
    ("branch_train_merge.py", ["--quick", "--out", "{out}"], ["branch_train_merge.png"]),
    ("expert_parallel.py", ["--steps", "3", "--nproc", "2", "--plot", "{out}/ep.png"], ["ep.png"]),
    ("selective_copying.py", ["--steps", "3", "--plot", "{out}/sc.png"], ["sc.png"]),
    ("induction_heads.py", ["--steps", "3", "--plot", "{out}/ih.png"], ["ih.png"]),
    ("visualize_selectivity.py", ["--steps", "3", "--plot", "{out}/vs.png"], ["vs.png"]),
    ("train_mamba.py", ["--steps", "3"], []),
    ("attention_vs_scan.py", [], []),
    ("memory_of_training.py", [], []),
    pytest.param("compare_routers.py", ["--quick", "--out", "{out}"],
                 ["compare_routers_loss.png", "compare_routers_load.png"], marks=pytest.mark.slow),
    pytest.param("scaling_experts.py", ["--quick", "--out", "{out}"], ["scaling_experts.png"],
                 marks=pytest.mark.slow),
]


IDS = [(e.values if hasattr(e, "values") else e)[0] for e in EXAMPLES]
# expert_parallel.py takes its device from the backend (NCCL: the GPUs), not from --device
ON_GPU = [e for e, name in zip(EXAMPLES, IDS) if name != "expert_parallel.py"]


def _run(script, args, outputs, tmp_path, device_args=()):
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, MPLBACKEND="Agg",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(ROOT / "examples" / script)] + [a.format(out=out) for a in args]
    run = subprocess.run(cmd + list(device_args), cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    for name in outputs:
        assert (out / name).stat().st_size > 0, f"{script} did not write {name}"


@pytest.mark.parametrize("script,args,outputs", EXAMPLES, ids=IDS)
def test_example_runs(script, args, outputs, tmp_path):
    _run(script, args, outputs, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("script,args,outputs", ON_GPU,
                         ids=[name for name in IDS if name != "expert_parallel.py"])
def test_example_runs_on_the_gpu(script, args, outputs, tmp_path):
    _run(script, args, outputs, tmp_path, ["--device", "cuda"])
