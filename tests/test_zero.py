"""ZeRO-1: AdamW's states partitioned over data-parallel ranks, training unchanged."""
import numpy as np
import pytest

import tinymoe
from tinymoe import nn
from tinymoe.distributed import ToyPool, selftest
from tinymoe.distributed.communicator import SingleProcess
from tinymoe.distributed.zero import ZeroAdamW
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
