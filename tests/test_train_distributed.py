"""Training under expert + data parallelism == one process on the same global batches.

A tiny MoE GPT in float64, dropless and without the load-balancing loss (so each rank's
rows are not a routing group of their own): W ranks must end with the parameters, the
optimizer moments and the logged losses of one process, up to float rounding.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tinymoe.checkpoint import read_safetensors
from tinymoe.distributed import ToyPool
from tinymoe.train import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-8

MODEL = dict(n_layer=2, d_model=16, n_head=2, d_ff=24, num_experts=4, top_k=2, capacity_factor=None,
             aux_loss_weight=0.0, z_loss_weight=1e-3)
RUN = dict(model="moe-gpt", steps=3, batch_size=4, block_size=8, dtype="float64", lr=1e-2, warmup_steps=1,
           eval_interval=3, eval_batches=2, log_interval=1, checkpoint_interval=2, sample_tokens=4,
           time_limit=None, progress=False, plots=False)
# the same run as command-line options (for mpiexec)
CLI = ["--n-layer", "2", "--d-model", "16", "--n-head", "2", "--d-ff", "24", "--experts", "4", "--top-k", "2",
       "--capacity-factor", "none", "--aux-loss-weight", "0", "--z-loss-weight", "1e-3", "--steps", "3",
       "--batch-size", "4", "--block-size", "8", "--dtype", "float64", "--lr", "1e-2", "--warmup-steps", "1",
       "--eval-interval", "3", "--eval-batches", "2", "--log-interval", "1", "--checkpoint-interval", "2",
       "--sample-tokens", "4", "--time-limit", "none", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    words = np.random.default_rng(0).choice(["def ", "class ", "return ", "x", "y", " = ", "(", ")", ":\n    "], 3000)
    path.write_text("".join(words))
    return str(path)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One process, the whole global batch of 4 rows every step."""
    out = str(tmp_path_factory.mktemp("one"))
    train(TrainConfig(**RUN, data=corpus, out_dir=out, model_config=MODEL))
    return _run_files(os.path.join(out, "moe-gpt"))


@pytest.fixture(scope="module")
def pool():
    p = ToyPool(2, timeout=60)
    yield p
    p.close()


def _run_files(folder):
    tensors, _ = read_safetensors(os.path.join(folder, "ckpt.safetensors"))
    with open(os.path.join(folder, "log.jsonl")) as f:
        return tensors, [json.loads(line) for line in f]


def _train_rank(comm, **kw):
    from tinymoe.distributed.data_parallel import checksum

    summary = train(TrainConfig(**kw))
    return {"checksum": checksum(summary["model"].parameters()), "val_loss": summary["val_loss"]}


def _assert_same_run(got, want, tol=TOL):
    (tensors, log), (ref_tensors, ref_log) = got, want
    assert sorted(tensors) == sorted(ref_tensors)                 # the full model, gathered
    for name, ref in ref_tensors.items():
        assert tensors[name].shape == ref.shape, name
        err = np.abs(tensors[name] - ref).max()
        assert err < tol, f"{name} differs by {err:.2e}"
    assert [r["step"] for r in log] == [r["step"] for r in ref_log] == [0, 1, 2, 3]
    for rec, ref in zip(log, ref_log):
        for key in ("loss", "total_loss", "grad_norm", "val_loss"):
            if key in ref:
                assert abs(rec[key] - ref[key]) < tol, (rec["step"], key, rec[key], ref[key])
    assert log[-1]["expert_load"] == ref_log[-1]["expert_load"]   # summed over ranks


def test_two_toy_ranks_train_like_one_process(pool, corpus, reference, tmp_path):
    out = pool.run(_train_rank, **RUN, data=corpus, out_dir=str(tmp_path), model_config=MODEL,
                   expert_parallel=True)
    assert out[0]["checksum"] == out[1]["checksum"]                # the shared parameters, bit for bit
    assert out[0]["val_loss"] == out[1]["val_loss"]
    _assert_same_run(_run_files(str(tmp_path / "moe-gpt")), reference)
    assert (tmp_path / "moe-gpt" / "sample.txt").exists()


def test_resume_on_two_ranks_continues_the_run(pool, corpus, reference, tmp_path):
    # 2 steps (checkpoint at step 2), then resume to 3 from the gathered checkpoint
    pool.run(_train_rank, **{**RUN, "steps": 2}, data=corpus, out_dir=str(tmp_path), model_config=MODEL,
             expert_parallel=True)
    pool.run(_train_rank, **RUN, data=corpus, out_dir=str(tmp_path), model_config=MODEL,
             expert_parallel=True, resume=True)
    tensors, _ = _run_files(str(tmp_path / "moe-gpt"))
    for name, ref in reference[0].items():
        if name.startswith(("model.", "optim.")):
            assert np.abs(tensors[name] - ref).max() < TOL, name


def test_experts_not_divisible_by_ranks(pool, corpus, tmp_path):
    with pytest.raises(RuntimeError, match="--experts must be a multiple of the 2 ranks .*got 3"):
        pool.run(_train_rank, **RUN, data=corpus, out_dir=str(tmp_path), model_config={**MODEL, "num_experts": 3},
                 expert_parallel=True)
    with pytest.raises(RuntimeError, match="--batch-size 3 cannot be split evenly over 2 ranks"):
        pool.run(_train_rank, **{**RUN, "batch_size": 3}, data=corpus, out_dir=str(tmp_path), model_config=MODEL,
                 expert_parallel=True)


def test_backend_without_expert_parallel_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"train: --backend mpi needs --expert-parallel"):
        train(TrainConfig(**RUN, backend="mpi", out_dir=str(tmp_path)))


def test_launcher_runs_the_example_script(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "tinymoe.distributed.launch", "--nproc", "2",
                          os.path.join(ROOT, "examples", "train_moe_gpt.py"), "--expert-parallel", "--quick",
                          "--steps", "2"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on 2 ranks (toy: experts sharded, batch split)" in out.stdout and "step 2: val loss" in out.stdout
    assert (tmp_path / "runs" / "moe-gpt-example" / "ckpt.safetensors").exists()
    assert "leaked shared_memory" not in out.stderr


@pytest.mark.mpi
def test_two_mpi_ranks_train_like_one_process(corpus, reference, tmp_path):
    pytest.importorskip("mpi4py", reason="the dev extra installs mpi4py; without it there is no MPI to test")
    from test_distributed_comm import mpiexec

    assert mpiexec() is not None, "mpi4py is installed but no mpiexec was found (pip install mpich)"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-m", "tinymoe", "train", "--expert-parallel",
                          "--backend", "mpi", "--data", corpus, "--out-dir", str(tmp_path)] + CLI,
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on 2 ranks (mpi: experts sharded, batch split)" in out.stdout
    _assert_same_run(_run_files(str(tmp_path / "moe-gpt")), reference)


@pytest.mark.gpu
def test_two_gpus_nccl_train_like_one_cpu_process(corpus, reference, tmp_path):
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 GPUs")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0",   # never NVLink multicast on shared machines
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "tinymoe.distributed.launch", "--nproc", "2", "-m", "tinymoe",
                          "train", "--expert-parallel", "--backend", "nccl", "--device", "cuda", "--data", corpus,
                          "--out-dir", str(tmp_path)] + CLI, capture_output=True, text=True, timeout=240, cwd=ROOT,
                         env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on 2 ranks (nccl: experts sharded, batch split)" in out.stdout
    _assert_same_run(_run_files(str(tmp_path / "moe-gpt")), reference, tol=1e-7)   # cuBLAS vs NumPy sums
