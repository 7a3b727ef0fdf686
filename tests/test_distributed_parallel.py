"""AllToAll as an autograd Function, expert parallelism == single-process MoE, data parallelism."""
import numpy as np
import pytest

import tinymoe
from tinymoe import nn
from tinymoe.distributed import ToyPool, selftest
from tinymoe.distributed.all_to_all import all_to_all
from tinymoe.distributed.communicator import SingleProcess
from tinymoe.distributed.data_parallel import all_reduce_gradients
from tinymoe.distributed.expert_parallel import ExpertParallelMoE, local_expert_range, source_to_expert_order
from tinymoe.nn.moe import MoELayer
from tinymoe.optim import SGD


@pytest.fixture(scope="module", params=[2, 4], ids=["toy2", "toy4"])
def pool(request):
    p = ToyPool(request.param, timeout=30)
    yield p
    p.close()


# ---------------------------------------------------------------- AllToAll
def test_all_to_all_gradcheck_in_a_world_of_one():
    x = tinymoe.tensor(np.random.default_rng(0).standard_normal((5, 3)), requires_grad=True)
    tinymoe.gradcheck(lambda x: all_to_all(x, [5], comm=SingleProcess())[0], [x])


def test_all_to_all_gradient_is_the_reverse_all_to_all(pool):
    pool.run(selftest.check_all_to_all_grad)


def test_all_to_all_bad_splits():
    x = tinymoe.tensor(np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"send_rows add up to 3 rows but x has shape \(4, 2\)"):
        all_to_all(x, [3], comm=SingleProcess())
    with pytest.raises(ValueError, match="send_rows has 2 entries but the world has 1 ranks"):
        all_to_all(x, [2, 2], comm=SingleProcess())


# ---------------------------------------------------------------- expert parallelism
@pytest.mark.parametrize("kw", [
    dict(),                                     # top-2, capacity 1.0: some slots dropped
    dict(router="switch", capacity_factor=0.5),  # top-1, many drops
    dict(capacity_factor=None, shared=1),       # dropless, with a shared expert
    dict(router="expert-choice"),
], ids=["top2", "switch-drops", "dropless-shared", "expert-choice"])
def test_expert_parallel_equals_single_process(pool, kw):
    stats = pool.run(selftest.check_expert_parallel, **kw)
    assert sum(sum(s["rows_sent"]) for s in stats) > 0


def test_expert_parallel_with_several_experts_per_rank(pool):
    # E = 3 W: the received rows must be regrouped from (source, expert) to (expert, source)
    pool.run(selftest.check_expert_parallel, E=3 * pool.world_size)


def test_source_to_expert_order():
    # 2 sources x 2 local experts; rows arrive as [s0e0 s0e0 | s0e1 | s1e0 | s1e1 s1e1]
    order = source_to_expert_order(np.array([[2, 1], [1, 2]]))
    assert order.tolist() == [0, 1, 3, 2, 4, 5]
    assert source_to_expert_order(np.zeros((3, 2), np.int64)).tolist() == []


def test_experts_not_divisible_by_world_size():
    assert local_expert_range(8, 4, 3) == (6, 8)
    with pytest.raises(ValueError, match="6 experts cannot be split evenly over 4 ranks"):
        local_expert_range(6, 4, 0)
    comm = SingleProcess()
    comm.world_size = 4
    with pytest.raises(ValueError, match="6 experts cannot be split evenly over 4 ranks"):
        ExpertParallelMoE(MoELayer(4, 3, num_experts=6, top_k=2), comm)


def test_expert_parallel_world_of_one_is_the_moe_layer():
    tinymoe.manual_seed(3)
    ref = MoELayer(4, 3, num_experts=4, top_k=2)
    tinymoe.manual_seed(3)
    ep = ExpertParallelMoE(MoELayer(4, 3, num_experts=4, top_k=2), SingleProcess())
    x = tinymoe.tensor(np.random.default_rng(1).standard_normal((2, 5, 4)).astype(np.float32))
    assert np.allclose(ep(x).data, ref(x).data, atol=1e-6)
    assert all(p.expert_parallel for p in ep.experts.parameters())


# ---------------------------------------------------------------- data parallelism
def test_data_parallel_ranks_stay_identical_and_match_one_process(pool):
    W, steps = pool.world_size, 3
    params = pool.run(selftest.check_data_parallel, steps)   # the check compares SHA-256 across ranks
    # one process, rank 0's init, every rank's batch at once: the same training
    tinymoe.manual_seed(100)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        batches = [np.random.default_rng([step, r]) for r in range(W)]
        pairs = [(g.standard_normal((5, 4)).astype(np.float32), g.standard_normal((5, 2)).astype(np.float32))
                 for g in batches]
        x, t = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
        loss = ((model(tinymoe.tensor(x)) - tinymoe.tensor(t)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        assert np.allclose(params[0][name], p.data, atol=1e-5), name


def test_expert_gradients_are_scaled_not_all_reduced():
    comm = SingleProcess()
    comm.world_size = 4  # only the 1/W matters here; no collective runs for expert parameters
    p = nn.Parameter(np.ones(3, np.float32))
    p.expert_parallel = True
    p.grad = np.full(3, 8.0, np.float32)
    all_reduce_gradients([p], comm)
    assert np.array_equal(p.grad, np.full(3, 2.0, np.float32))


def _gpt_losses(comm):
    from tinymoe.distributed.expert_parallel import shard_experts
    from tinymoe.models import build_model

    cfg = dict(vocab_size=32, d_model=16, n_layer=2, n_head=2, d_ff=24, block_size=8, num_experts=2 * comm.world_size)
    ids = np.random.default_rng(comm.rank).integers(0, 32, (2, 8))
    tinymoe.manual_seed(5)
    full = build_model("moe-gpt", **cfg)(ids, ids)[1].item()
    tinymoe.manual_seed(5)
    model = shard_experts(build_model("moe-gpt", **cfg), comm)
    return full, model(ids, ids)[1].item(), sorted(model.stats())


def test_shard_experts_in_a_gpt_keeps_its_loss(pool):
    for full, sharded, layers in pool.run(_gpt_losses):
        assert abs(full - sharded) < 1e-5 and layers == ["layer0", "layer1"]


def _clipped_norms(comm):
    from tinymoe.distributed.data_parallel import clip_grad_norm_

    shared, expert = nn.Parameter(np.ones(4)), nn.Parameter(np.ones(3))
    expert.expert_parallel = True
    shared.grad = np.full(4, 1.0)                         # equal on all ranks (after the all-reduce)
    expert.grad = np.full(3, float(comm.rank + 1))        # each rank holds other experts
    norm = clip_grad_norm_([shared, expert], 1.0, comm)
    return norm, shared.grad.copy()


def test_clip_grad_norm_uses_the_global_norm(pool):
    W = pool.world_size
    want = np.sqrt(4 + 3 * sum((r + 1) ** 2 for r in range(W)))
    out = pool.run(_clipped_norms)
    for norm, shared_grad in out:
        assert abs(norm - want) < 1e-9
        assert np.allclose(shared_grad, np.full(4, 1.0 / want), rtol=1e-5)   # scaled alike on all ranks
