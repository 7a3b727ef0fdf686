"""The expert x data parallel mesh == one process: groups, one step's gradients, a training run.

4 toy ranks as 2 EP x 2 DP, 4 x 1 and 1 x 4, and 8 as 4 x 2 (and every other shape of 4 and 8
in the groups check); under MPI with mpiexec -n 4. float64, a dropless tiny MoE GPT without the
load-balancing loss, so that W ranks compute what one process computes on the global batch.
"""
import dataclasses
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from test_train_distributed import CLI, MODEL, RUN, _assert_same_run, _run_files
from tinymoe.distributed import ToyPool, selftest
from tinymoe.distributed.communicator import SingleProcess
from tinymoe.distributed.mesh import Mesh, as_mesh
from tinymoe.train import TrainConfig, train
from tinymoe.train_config import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pools():
    made = {}

    def get(W):
        if W not in made:
            made[W] = ToyPool(W, timeout=60)
        return made[W]
    yield get
    for p in made.values():
        p.close()


@pytest.mark.parametrize("W", [4, 8])
def test_groups_are_rows_and_columns(pools, W):
    pools(W).run(selftest.check_mesh_groups)        # every divisor of W as ep_size


@pytest.mark.parametrize("W, ep_size", [(4, 2), (4, 4), (4, 1), (8, 4)], ids=["2x2", "4x1", "1x4", "4x2"])
def test_one_step_equals_one_process(pools, W, ep_size):
    # gradients (dense and each rank's experts), global norm, AdamW step, gathered experts: to 1e-12
    worst = pools(W).run(selftest.check_mesh_training, [ep_size])
    assert all(w[ep_size] < 1e-12 for w in worst)


def _world_of(W, rank=0):
    comm = SingleProcess()
    comm.rank, comm.world_size = rank, W      # no collective runs: the mesh of a plain world is made locally
    return comm


def test_a_plain_communicator_is_the_mesh_of_one_ep_group():
    world = _world_of(4, rank=3)
    mesh = as_mesh(world)
    assert (mesh.ep_size, mesh.dp_size, mesh.ep, mesh.dp.world_size) == (4, 1, world, 1)
    assert as_mesh(mesh) is mesh and (mesh.rank, mesh.world_size) == (3, 4)
    data = Mesh(world, 1)                      # plain data parallelism: every rank holds every expert
    assert (data.ep.world_size, data.dp, data.dp_rank, data.ep_rank) == (1, world, 3, 0)


@pytest.mark.parametrize("ep_size", [3, 0, 8, 2.0])
def test_ep_size_must_divide_the_world(ep_size):
    with pytest.raises(ValueError, match=rf"mesh: ep_size={ep_size!r} must be a positive divisor of the world "
                                         r"size 4 \(--ep-size"):
        Mesh(_world_of(4), ep_size)


def test_experts_must_split_over_the_ep_group_not_the_world():
    cfg = TrainConfig(**RUN8, model_config={**MODEL, "num_experts": 4}, expert_parallel=True, ep_size=4)
    validate_config(cfg, 8)                                  # 4 experts over groups of 4 of the 8 ranks
    with pytest.raises(ValueError, match=r"--experts must be a multiple of the 8 ranks of an expert-parallel "
                                         r"group .*got 4"):
        validate_config(dataclasses.replace(cfg, ep_size=None), 8)


def test_group_needs_this_rank_and_distinct_ranks():
    world = _world_of(4, rank=1)
    with pytest.raises(ValueError, match=r"single group: rank 1 asks for group \[0, 2\], which it is not in"):
        world.group([0, 2])
    with pytest.raises(ValueError, match=r"ranks \[1, 1\] must be distinct ranks of a world of 4"):
        world.group([1, 1])


def test_local_rank_from_any_launcher(monkeypatch):
    # NCCL ranks pick their GPU by their rank on the host: ranks 8-15 of two hosts are GPUs 0-7
    from tinymoe.distributed.launch import LOCAL_RANK_ENV, local_rank

    for name in LOCAL_RANK_ENV:
        monkeypatch.delenv(name, raising=False)
    assert local_rank(11) == 11                              # no launcher said it: the default
    monkeypatch.setenv("SLURM_LOCALID", "5")
    assert local_rank(11) == 5
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")    # Open MPI's mpirun
    assert local_rank(11) == 3
    monkeypatch.setenv("MPI_LOCALRANKID", "2")               # MPICH's mpiexec
    assert local_rank(11) == 2


def test_ep_size_needs_expert_parallel(tmp_path):
    with pytest.raises(ValueError, match=r"train: --ep-size 2 needs --expert-parallel"):
        train(TrainConfig(**RUN, ep_size=2, out_dir=str(tmp_path)))


# ---------------------------------------------------------------- training runs
RUN8 = {**RUN, "batch_size": 8}               # 8 rows: one per rank of 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    words = np.random.default_rng(0).choice(["def ", "class ", "return ", "x", "y", " = ", "(", ")", ":\n    "], 3000)
    path.write_text("".join(words))
    return str(path)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one"))
    train(TrainConfig(**RUN8, data=corpus, out_dir=out, model_config=MODEL))
    return _run_files(os.path.join(out, "moe-gpt"))


def _train_rank(comm, **kw):
    train(TrainConfig(**kw))


def test_train_on_4x2_then_resume_on_2x2_equals_one_process(pools, corpus, reference, tmp_path):
    # 2 steps on 8 ranks as 4 EP x 2 DP (checkpoint at step 2: experts gathered within each EP
    # group), then resume to 3 on 4 ranks as 2 EP x 2 DP (the full checkpoint sliced again)
    kw = dict(data=corpus, out_dir=str(tmp_path), model_config=MODEL, expert_parallel=True)
    pools(8).run(_train_rank, **{**RUN8, "steps": 2}, ep_size=4, **kw)
    pools(4).run(_train_rank, **RUN8, ep_size=2, resume=True, **kw)
    tensors, log = _run_files(str(tmp_path / "moe-gpt"))         # steps 0-2 from 8 ranks, 3 from 4
    ref_tensors, ref_log = reference
    assert sorted(tensors) == sorted(ref_tensors)
    for name, ref in ref_tensors.items():
        if name.startswith(("model.", "optim.")):
            assert np.abs(tensors[name] - ref).max() < 1e-8, name
    assert [r["step"] for r in log] == [r["step"] for r in ref_log] == [0, 1, 2, 3]
    for rec, ref in zip(log, ref_log):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in ref:
                assert abs(rec[key] - ref[key]) < 1e-8, (rec["step"], key, rec[key], ref[key])


def test_experts_that_do_not_split_over_the_ep_group_are_refused_before_training(pools, corpus, tmp_path):
    with pytest.raises(RuntimeError, match=r"--experts must be a multiple of the 2 ranks of an expert-parallel "
                                           r"group .*got 3"):
        pools(4).run(_train_rank, **RUN8, data=corpus, out_dir=str(tmp_path), expert_parallel=True,
                     model_config={**MODEL, "num_experts": 3}, ep_size=2)
    assert not (tmp_path / "moe-gpt").exists()


def test_cli_ep_size_under_the_launcher(corpus, tmp_path):
    # 2 ranks as 1 EP x 2 DP: every rank holds every expert, the experts' gradients all-reduced
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "tinymoe.distributed.launch", "--nproc", "2", "-m", "tinymoe",
                          "train", "--expert-parallel", "--ep-size", "1", "--quick", "--steps", "2", "--experts", "4",
                          "--data", corpus, "--out-dir", str(tmp_path), "--no-progress"],
                         capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on 2 ranks (toy: experts sharded, batch split, 1 EP x 2 DP)" in out.stdout
    assert (tmp_path / "moe-gpt" / "ckpt.safetensors").exists()


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ep_scaling", os.path.join(ROOT, "benchmarks",
                                                                                   "bench_ep_scaling.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_rank(comm, out, ep_size):
    return _bench().main(["--tiny", "--ep-size", str(ep_size), "--out", out])


def test_scaling_benchmark_on_toy_ranks(pools, tmp_path):
    # the logic of benchmarks/bench_ep_scaling.py (what nccl_multi_gpu.sh runs on GPUs), at toy sizes
    bench = _bench()
    bench.save_row(bench.measure(bench.TINY, None, "cpu"), str(tmp_path))    # one process: the baseline
    pools(4).run(_bench_rank, str(tmp_path), 2)
    one, mesh = bench.summarize(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["ep_scaling.png", "scaling_w1_ep1.json", "scaling_w4_ep2.json"]
    assert (one["world_size"], one["model"]["num_experts"], one["all_to_all_s"], one["efficiency"]) == (1, 2, 0.0, 1.0)
    assert (mesh["ep_size"], mesh["dp_size"], mesh["model"]["num_experts"]) == (2, 2, 4)   # 2 experts per rank
    assert mesh["tokens_per_step"] == 4 * one["tokens_per_step"] == 4 * 2 * 16
    assert mesh["all_to_all_s"] > 0 and mesh["all_reduce_s"] > 0 and 0 < mesh["comm_share"]
    assert mesh["efficiency"] == mesh["tokens_per_s"] / one["tokens_per_s"] / 4


@pytest.mark.gpu
def test_four_gpus_as_2x2_train_like_one_cpu_process(corpus, reference, tmp_path):
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 4:
        pytest.skip("needs 4 GPUs")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0",   # never NVLink multicast on shared machines
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cli = [("8" if prev == "--batch-size" else arg) for prev, arg in zip([None] + CLI, CLI)]   # RUN8
    out = subprocess.run([sys.executable, "-m", "tinymoe.distributed.launch", "--nproc", "4", "-m", "tinymoe",
                          "train", "--expert-parallel", "--backend", "nccl", "--device", "cuda", "--ep-size", "2",
                          "--data", corpus, "--out-dir", str(tmp_path)] + cli, capture_output=True, text=True,
                         timeout=240, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on 4 ranks (nccl: experts sharded, batch split, 2 EP x 2 DP)" in out.stdout
    _assert_same_run(_run_files(str(tmp_path / "moe-gpt")), reference, tol=1e-7)   # cuBLAS vs NumPy sums


@pytest.mark.mpi
def test_mesh_under_mpiexec_with_4_ranks():
    pytest.importorskip("mpi4py", reason="the dev extra installs mpi4py; without it there is no MPI to test")
    from test_distributed_comm import mpiexec

    assert mpiexec() is not None, "mpi4py is installed but no mpiexec was found (pip install mpich)"
    out = subprocess.run([mpiexec(), "-n", "4", sys.executable, "-m", "tinymoe.distributed.selftest", "--backend",
                          "mpi", "--only", "check_mesh_groups,check_mesh_training,check_mesh_zero"],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    for check in ("check_mesh_groups", "check_mesh_training", "check_mesh_zero"):
        assert f"selftest mpi x4: {check} ok" in out.stdout, out.stdout
