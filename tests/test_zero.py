"""ZeRO-1: AdamW's states partitioned over data-parallel ranks, training unchanged."""
import numpy as np
import pytest

import tinymoe
from tinymoe import nn
from tinymoe.distributed import ToyPool, selftest
from tinymoe.distributed.communicator import SingleProcess
from tinymoe.distributed.zero import MeshZeroAdamW, ZeroAdamW
from tinymoe.optim import AdamW


@pytest.fixture(scope="module", params=[2, 3], ids=["toy2", "toy3"])
def pool(request):
    p = ToyPool(request.param, timeout=30)
    yield p
    p.close()


def test_zero1_equals_adamw_on_the_global_batch_with_a_slice_of_the_states(pool):
    W, steps = pool.world_size, 3
    results = pool.run(selftest.check_zero, steps)          # the check compares SHA-256 across ranks
    # one process: rank 0's init, every rank's batch at once, plain AdamW with full states
    tinymoe.manual_seed(200)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)).to(dtype=np.float64)
    opt = AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for step in range(steps):
        pairs = [np.random.default_rng([step, r]) for r in range(W)]
        pairs = [(g.standard_normal((5, 4)), g.standard_normal((5, 3))) for g in pairs]
        x, t = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
        loss = ((model(tinymoe.tensor(x)) - tinymoe.tensor(t)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        np.testing.assert_allclose(results[0][0][name], p.data, rtol=1e-12, atol=1e-14, err_msg=name)
    P = results[0][2]
    assert P == sum(p.data.size for p in model.parameters()) == 4 * 8 + 8 + 8 * 3 + 3
    state = [r[1] for r in results]                         # m and v of each rank's slice
    assert sum(state) == 2 * 8 * P                          # together: the full states, once
    assert max(state) <= 2 * 8 * (P // W + 1)               # each rank: 1/W of them


def test_a_world_of_one_is_adamw():
    tinymoe.manual_seed(0)
    a = nn.Linear(3, 2).to(dtype=np.float64)
    b = nn.Linear(3, 2).to(dtype=np.float64)
    b.load_state_dict(a.state_dict())
    za, ob = ZeroAdamW(a.parameters(), SingleProcess(), lr=0.1), AdamW(b.parameters(), lr=0.1)
    x = tinymoe.tensor(np.random.default_rng(1).standard_normal((4, 3)))
    for _ in range(3):
        for model, opt in ((a, za), (b, ob)):
            opt.zero_grad()
            (model(x) ** 2).sum().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(pa.data, pb.data)
    za.param_groups[0]["lr"] = 0.5                          # a schedule reaches the inner AdamW
    assert za.inner.param_groups[0]["lr"] == 0.5


def test_zero_refuses_expert_parallel_parameters():
    layer = nn.Linear(2, 2)
    layer.weight.expert_parallel = True
    with pytest.raises(ValueError, match=r"ZeroAdamW: parameters \[0\] are expert-parallel"):
        ZeroAdamW(layer.parameters(), SingleProcess())


def test_parameter_groups_keep_their_settings():
    # weight decay on the matrix only, as the trainer's AdamW: the same steps as AdamW with those groups
    tinymoe.manual_seed(0)
    a, b = nn.Linear(3, 2).to(dtype=np.float64), nn.Linear(3, 2).to(dtype=np.float64)
    b.load_state_dict(a.state_dict())
    za = ZeroAdamW([{"params": [a.weight], "weight_decay": 0.5}, {"params": [a.bias], "weight_decay": 0.0}],
                   SingleProcess(), lr=0.1)
    ob = AdamW([{"params": [b.weight], "weight_decay": 0.5}, {"params": [b.bias], "weight_decay": 0.0}], lr=0.1)
    x = tinymoe.tensor(np.random.default_rng(1).standard_normal((4, 3)))
    for _ in range(3):
        for model, opt in ((a, za), (b, ob)):
            opt.zero_grad()
            (model(x) ** 2).sum().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        np.testing.assert_allclose(pa.data, pb.data, rtol=1e-14, atol=1e-15)
    assert [g["weight_decay"] for g in za.param_groups] == [0.5, 0.0]


@pytest.fixture(scope="module")
def pool4():
    p = ToyPool(4, timeout=30)
    yield p
    p.close()


@pytest.mark.parametrize("ep_size", [2, 4, 1], ids=["2x2", "4x1", "1x4"])
def test_zero1_on_the_mesh_equals_one_process(pool4, ep_size):
    # dense states over the world, each rank's experts' over its DP group: 2 steps of a tiny MoE GPT
    # as one process's AdamW (1e-12, float64), and each rank holds 1/W of the states
    out = pool4.run(selftest.check_mesh_zero, [ep_size])
    mine, whole = zip(*(o[ep_size] for o in out))
    assert sum(mine) == whole[0] and max(mine) * 4 == whole[0]


def test_mesh_zero_with_one_rank_is_adamw():
    from tinymoe.distributed.mesh import Mesh

    tinymoe.manual_seed(0)
    a, b = nn.Linear(3, 2).to(dtype=np.float64), nn.Linear(3, 2).to(dtype=np.float64)
    b.load_state_dict(a.state_dict())
    a.weight.expert_parallel = True                  # an expert: its states over the DP group (of one)
    za, ob = MeshZeroAdamW(a.parameters(), Mesh(SingleProcess()), lr=0.1), AdamW(b.parameters(), lr=0.1)
    x = tinymoe.tensor(np.random.default_rng(1).standard_normal((4, 3)))
    for _ in range(2):
        for model, opt in ((a, za), (b, ob)):
            opt.zero_grad()
            (model(x) ** 2).sum().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(pa.data, pb.data)
    assert len(za.parts) == 2 and len(za.param_groups) == 2
