"""Check a backend end to end:  mpiexec -n 2 python -m tinymoe.distributed.selftest --backend mpi

(or `python -m tinymoe.distributed.launch --nproc 4 -m tinymoe.distributed.selftest`,
or `--backend nccl` on GPUs). Every check is a function of a communicator that raises
AssertionError on a wrong answer; the tests run the same checks on the toy backend.
Every rank can predict what it should receive, because each chunk's content is a
function of (seed, sender, receiver) alone.
"""
from __future__ import annotations

import argparse

import numpy as np

from tinymoe.backend import to_device, to_numpy


def _chunk(seed, sender, receiver, row_shape, dtype):
    """The chunk `sender` sends to `receiver`: 0 to 4 rows (zero rows happen often)."""
    g = np.random.default_rng([seed, sender, receiver])
    rows = int(g.integers(0, 5))
    return (g.standard_normal((rows, *row_shape)) * 100).astype(dtype)


def check_all_to_all(comm, seed=0, device="cpu"):
    for row_shape, dtype in [((3,), np.float32), ((), np.int64), ((2, 5), np.float64)]:
        send = [to_device(_chunk(seed, comm.rank, j, row_shape, dtype), device) for j in range(comm.world_size)]
        recv = comm.all_to_all(send)
        assert len(recv) == comm.world_size, f"got {len(recv)} chunks"
        for i, got in enumerate(recv):
            want = _chunk(seed, i, comm.rank, row_shape, dtype)
            got = to_numpy(got)
            assert got.dtype == want.dtype and got.shape == want.shape, \
                f"rank {comm.rank}: chunk from {i} is {got.dtype} {got.shape}, expected {want.dtype} {want.shape}"
            assert np.array_equal(got, want), f"rank {comm.rank}: wrong values from rank {i}"
        # the same exchange with the receive sizes given up front (counts already known)
        rows = [_chunk(seed, i, comm.rank, row_shape, dtype).shape[0] for i in range(comm.world_size)]
        again = comm.all_to_all(send, recv_rows=rows)
        assert all(np.array_equal(to_numpy(a), to_numpy(b)) for a, b in zip(again, recv))


def check_all_to_all_rows(comm, seed=0, device="cpu"):
    """all_to_all_rows (one buffer in, one out) == the list all_to_all, concatenated: uneven
    and zero row counts, a world whose chunks are all empty, recv_rows given or exchanged,
    a strided (non-contiguous) input, and the same bytes_sent; bad counts raise."""
    W, r = comm.world_size, comm.rank
    cases = [((3,), np.float32, seed), ((), np.int64, seed + 1), ((2, 5), np.float64, seed + 2)]
    for row_shape, dtype, s in cases:
        send = [to_device(_chunk(s, r, j, row_shape, dtype), device) for j in range(W)]
        rows = [_chunk(s, i, r, row_shape, dtype).shape[0] for i in range(W)]
        want = np.concatenate([to_numpy(c) for c in comm.all_to_all(send)])
        x = to_device(np.concatenate([to_numpy(c) for c in send]), device)
        send_rows = [c.shape[0] for c in send]
        before = comm.bytes_sent
        for got in (comm.all_to_all_rows(x, send_rows, rows), comm.all_to_all_rows(x, np.array(send_rows)),
                    comm.all_to_all_rows(to_device(np.repeat(to_numpy(x), 2, axis=0), device)[::2], send_rows, rows)):
            got = to_numpy(got)
            assert got.dtype == want.dtype and got.shape == want.shape, \
                f"rank {r}: all_to_all_rows gave {got.dtype} {got.shape}, expected {want.dtype} {want.shape}"
            assert np.array_equal(got, want), f"rank {r}: all_to_all_rows differs from the list all_to_all"
        sent = sum(c.nbytes for j, c in enumerate(send) if j != r)
        assert comm.bytes_sent - before == 3 * sent, f"rank {r}: bytes_sent grew by {comm.bytes_sent - before}"
        if comm.backend == "nccl":  # a contiguous CuPy array on the rank's GPU is used as it is
            assert comm._on_device(x) is x, "nccl: a contiguous CuPy input was copied"
    empty = to_device(np.zeros((0, 4), np.float32), device)                  # nobody sends anything
    got = comm.all_to_all_rows(empty, [0] * W, [0] * W)
    assert got.shape == (0, 4) and got.dtype == np.float32, f"rank {r}: empty exchange gave {got.shape}"
    assert to_numpy(comm.all_to_all_rows(empty, [0] * W)).shape == (0, 4)
    for bad, match in [(([1] * W, None), "add up to"), (([0] * (W + 1), None), "send_rows has"),
                       (([0] * W, [0] * (W + 1)), "recv_rows has"),
                       (([0] * W, [1 if i == r else 0 for i in range(W)]), "sends itself")]:
        try:
            comm.all_to_all_rows(empty, *bad)
        except ValueError as e:
            assert match in str(e), f"rank {r}: wrong error for {bad}: {e}"
        else:
            raise AssertionError(f"rank {r}: all_to_all_rows{bad} did not raise")


def check_large_messages(comm, device="cpu"):
    """Arrays past the toy backend's eager limit (through its mailboxes): mixed sizes, the
    mailbox growing, two all-to-alls back to back (the second must wait for "read")."""
    W, r = comm.world_size, comm.rank
    for rnd, rows in enumerate([20_000, 3_000, 50_000, 50_000]):           # float64 rows of 1: 24 KB .. 400 KB
        def chunk(sender, receiver):
            g = np.random.default_rng([rnd, sender, receiver])
            return g.standard_normal(int(g.integers(rows // 2, rows)))
        recv = comm.all_to_all([to_device(chunk(r, j), device) for j in range(W)])
        for i in range(W):
            assert np.array_equal(to_numpy(recv[i]), chunk(i, r)), f"rank {r}: round {rnd}, wrong chunk from {i}"
    big = to_device(np.arange(100_000, dtype=np.float32) * (r + 1), device)
    assert np.array_equal(to_numpy(comm.broadcast(big, root=0)), np.arange(100_000, dtype=np.float32))
    assert np.allclose(to_numpy(comm.all_reduce(big)), np.arange(100_000) * W * (W + 1) / 2)


def check_all_reduce(comm, device="cpu"):
    n, r = comm.world_size, comm.rank
    x = to_device(np.arange(6, dtype=np.float64).reshape(2, 3) + 10 * r, device)
    base = np.arange(6, dtype=np.float64).reshape(2, 3)
    want = {"sum": n * base + 10 * n * (n - 1) / 2, "mean": base + 10 * (n - 1) / 2,
            "max": base + 10 * (n - 1), "min": base}
    for op, w in want.items():
        got = to_numpy(comm.all_reduce(x, op=op))
        assert np.allclose(got, w), f"rank {r}: all_reduce {op} gave {got}, expected {w}"
    assert np.array_equal(to_numpy(x), base + 10 * r), "all_reduce changed its input"


def check_broadcast(comm, device="cpu"):
    root = comm.world_size - 1
    x = to_device(np.full((2, 2), comm.rank, np.float32), device)
    got = to_numpy(comm.broadcast(x, root=root))
    assert (got == root).all(), f"rank {comm.rank}: broadcast from {root} gave {got}"
    comm.barrier()


def check_all_to_all_grad(comm, eps=1e-6, device="cpu"):
    """AllToAll's backward (the reverse all-to-all) against finite differences of the
    global loss L = sum_r L_r. Ranks take turns: rank k perturbs each entry of its input
    while the others hold still (so all ranks run the same number of all-to-alls)."""
    import tinymoe
    from tinymoe.distributed.all_to_all import all_to_all

    W, r, R = comm.world_size, comm.rank, 4
    g = np.random.default_rng([7, r])
    send_rows = np.bincount(g.integers(0, W, R), minlength=W)               # uneven, zeros likely
    x = tinymoe.tensor(g.standard_normal((R, 3)), requires_grad=True, device=device)
    y, recv_rows = all_to_all(x, send_rows, comm)
    w = tinymoe.tensor(g.standard_normal(y.shape), device=device)
    (y * w).sum().backward()
    analytic, x0 = to_numpy(x.grad), to_numpy(x.data)

    def global_loss(xd):
        with tinymoe.no_grad():
            yd, _ = all_to_all(tinymoe.tensor(xd, device=device), send_rows, comm, recv_rows)
            local = (yd * w).sum().data.reshape(1)
        return float(to_numpy(comm.all_reduce(local))[0])

    for k in range(W):
        numeric = np.zeros_like(x0)
        for i in range(x0.size):
            plus, minus = x0.copy(), x0.copy()
            if r == k:
                plus.flat[i] += eps
                minus.flat[i] -= eps
            numeric.flat[i] = (global_loss(plus) - global_loss(minus)) / (2 * eps)
        if r == k:
            err = np.abs(numeric - analytic).max()
            assert err < 1e-7, f"rank {r}: AllToAll gradient differs from finite differences by {err:.2e}"


def _moe_layer(seed, E, router, capacity_factor, shared, device):
    import tinymoe
    from tinymoe.nn.moe import MoELayer

    tinymoe.manual_seed(seed)
    return MoELayer(6, 5, num_experts=E, top_k=2 if router != "switch" else 1, router=router,
                    capacity_factor=capacity_factor, num_shared_experts=shared).to(device, dtype=np.float64)


def check_expert_parallel(comm, E=None, router="topk", capacity_factor=1.0, shared=0, tol=1e-10, device="cpu"):
    """ExpertParallelMoE == MoELayer: outputs, token and gate gradients on each rank; expert
    gradients = the sum over ranks of the single-process ones (every rank's tokens meet them)."""
    import tinymoe
    from tinymoe.distributed.expert_parallel import ExpertParallelMoE

    W, r = comm.world_size, comm.rank
    E = E or 2 * W
    ref = _moe_layer(0, E, router, capacity_factor, shared, device)
    ep = ExpertParallelMoE(_moe_layer(0, E, router, capacity_factor, shared, device), comm)
    g = np.random.default_rng([11, r])
    T = 3 + 2 * r                                                           # uneven token counts
    xd, w = g.standard_normal((T, 6)), g.standard_normal((T, 6))
    results = []
    for layer in (ref, ep):
        x = tinymoe.tensor(xd, requires_grad=True, device=device)
        out = layer(x)
        loss = (out * tinymoe.tensor(w, device=device)).sum()
        if layer.aux_loss is not None:
            loss = loss + layer.aux_loss
        loss.backward()
        results.append((to_numpy(out.data), to_numpy(x.grad),
                        {n: to_numpy(p.grad) for n, p in layer.named_parameters() if p.grad is not None}))
    (out_ref, gx_ref, gp_ref), (out_ep, gx_ep, gp_ep) = results
    assert np.abs(out_ep - out_ref).max() < tol, f"rank {r}: outputs differ by {np.abs(out_ep - out_ref).max():.2e}"
    assert np.abs(gx_ep - gx_ref).max() < tol, f"rank {r}: input gradients differ"
    for name, grad in gp_ep.items():
        want = gp_ref[name]
        if name.startswith("experts."):
            want = to_numpy(comm.all_reduce(want))[ep.first:ep.last]        # sum_r dL_r/dW_e, my experts
        assert grad.shape == want.shape, f"rank {r}: {name} grad {grad.shape} vs {want.shape}"
        err = np.abs(grad - want).max()
        assert err < tol, f"rank {r}: gradient of {name} differs by {err:.2e}"
    return ep.last_stats


def check_data_parallel(comm, steps=3, device="cpu"):
    """Gradient all-reduce keeps the ranks' parameters identical (SHA-256 of the bytes),
    although every rank starts from its own random init (broadcast) and sees its own data."""
    import tinymoe
    from tinymoe import nn
    from tinymoe.distributed.data_parallel import all_reduce_gradients, broadcast_parameters, checksum
    from tinymoe.optim import SGD

    tinymoe.manual_seed(100 + comm.rank)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)).to(device)
    broadcast_parameters(model.parameters(), comm)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        g = np.random.default_rng([step, comm.rank])
        x, t = g.standard_normal((5, 4)).astype(np.float32), g.standard_normal((5, 2)).astype(np.float32)
        loss = ((model(tinymoe.tensor(x, device=device)) - tinymoe.tensor(t, device=device)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        all_reduce_gradients(model.parameters(), comm)
        opt.step()
    mine = checksum(model.parameters())
    root = bytes(to_numpy(comm.broadcast(np.frombuffer(mine.encode(), np.uint8).copy(), root=0))).decode()
    assert mine == root, f"rank {comm.rank}: parameters differ from rank 0's after {steps} steps"
    return {n: to_numpy(p.data).copy() for n, p in model.named_parameters()}


def check_zero(comm, steps=3, device="cpu"):
    """ZeRO-1 (optimizer states partitioned) keeps the ranks' parameters identical, and each
    rank holds the AdamW states of its slice alone. Returns rank's parameters and state size."""
    import tinymoe
    from tinymoe import nn
    from tinymoe.distributed.data_parallel import broadcast_parameters, checksum
    from tinymoe.distributed.zero import ZeroAdamW

    tinymoe.manual_seed(200 + comm.rank)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)).to(device, dtype=np.float64)
    broadcast_parameters(model.parameters(), comm)
    opt = ZeroAdamW(model.parameters(), comm, lr=0.05, weight_decay=0.1)
    for step in range(steps):
        g = np.random.default_rng([step, comm.rank])
        x, t = g.standard_normal((5, 4)), g.standard_normal((5, 3))
        loss = ((model(tinymoe.tensor(x, device=device)) - tinymoe.tensor(t, device=device)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    mine = checksum(model.parameters())
    root = bytes(to_numpy(comm.broadcast(np.frombuffer(mine.encode(), np.uint8).copy(), root=0))).decode()
    assert mine == root, f"rank {comm.rank}: ZeRO-1 parameters differ from rank 0's after {steps} steps"
    return {n: to_numpy(p.data).copy() for n, p in model.named_parameters()}, opt.state_bytes, opt.total


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def check_mesh_groups(comm, device="cpu"):
    """For every mesh shape of this world: each rank's EP group is its row of consecutive ranks,
    its DP group its column (all-reduce of the world ranks, a broadcast and an all-to-all inside
    each group, all groups at once)."""
    from tinymoe.distributed.mesh import Mesh

    W, r = comm.world_size, comm.rank
    for ep_size in _divisors(W):
        mesh = Mesh(comm, ep_size)
        d, e = divmod(r, ep_size)
        for name, group, members in (("ep", mesh.ep, [d * ep_size + i for i in range(ep_size)]),
                                     ("dp", mesh.dp, [i * ep_size + e for i in range(W // ep_size)])):
            where = f"rank {r}, {mesh.layout}, {name} group"
            assert group.world_size == len(members) and group.rank == members.index(r), \
                f"{where}: rank {group.rank} of {group.world_size}, expected {members.index(r)} of {len(members)}"
            got = to_numpy(group.all_reduce(to_device(np.array([float(r)]), device)))[0]
            assert got == sum(members), f"{where}: all-reduce of the world ranks gave {got}, expected {sum(members)}"
            root = to_numpy(group.broadcast(to_device(np.array([r], np.int64), device), root=group.world_size - 1))
            assert root[0] == members[-1], f"{where}: broadcast from its last rank gave {root[0]}"
            rows = [j + 1 for j in range(group.world_size)]                          # j + 1 rows to member j
            x = to_device(np.full((sum(rows), 2), float(r)), device)
            y = to_numpy(group.all_to_all_rows(x, rows, [group.rank + 1] * group.world_size))
            want = np.repeat(np.array(members, float), group.rank + 1)[:, None] * np.ones(2)
            assert np.array_equal(y, want), f"{where}: all-to-all gave {y[:, 0]}, expected {want[:, 0]}"
        mesh.close()


MESH_MODEL = dict(vocab_size=16, block_size=4, n_layer=1, n_head=2, d_model=8, d_ff=6, top_k=2,
                  capacity_factor=None, aux_loss_weight=0.0, z_loss_weight=1e-3)   # dropless, no group-wise loss


def _mesh_model(device, W):
    """The tiny MoE GPT of the mesh checks, 2 W experts (any EP group size of W divides them), float64."""
    from tinymoe.models import build_model

    return build_model("moe-gpt", **MESH_MODEL, num_experts=2 * W).to(device, dtype=np.float64)


def check_mesh_training(comm, ep_sizes=None, device="cpu", tol=1e-12):
    """On every mesh shape of this world (or those in ep_sizes), one training step of a tiny
    MoE GPT in float64 equals one process on the global batch: the gradients after the mesh's
    all-reduces (dense ones, and each rank's experts against the same rows of the full model's),
    the clipped global norm, the parameters after AdamW, and the experts gathered for a
    checkpoint. Returns {ep_size: the largest difference}."""
    import tinymoe
    from tinymoe.distributed import training
    from tinymoe.distributed.data_parallel import all_reduce_gradients, clip_grad_norm_
    from tinymoe.distributed.mesh import Mesh
    from tinymoe.optim import AdamW, clip_grad_norm_ as one_process_clip

    W, r = comm.world_size, comm.rank
    B = 2 * W                                                                 # the global batch: 2 rows per rank
    ids = np.random.default_rng(3).integers(0, MESH_MODEL["vocab_size"], (B, MESH_MODEL["block_size"] + 1))

    def step(model, x, y, reduce_and_clip):
        opt = AdamW(model.parameters(), lr=0.05, weight_decay=0.1)           # built on the full model
        return opt, lambda: (model(x, y)[1].backward(), reduce_and_clip())

    tinymoe.manual_seed(1)
    ref = _mesh_model(device, W)
    ref_opt, run = step(ref, to_device(ids[:, :-1], device), to_device(ids[:, 1:], device),
                        lambda: one_process_clip(ref.parameters(), 0.5))
    ref_norm = run()[1]
    ref_grads = {n: to_numpy(p.grad) for n, p in ref.named_parameters()}
    ref_opt.step()
    ref_after = {n: to_numpy(p.data) for n, p in ref.named_parameters()}

    worst = {}
    for ep_size in ep_sizes or _divisors(W):
        mesh = Mesh(comm, ep_size)
        tinymoe.manual_seed(1)
        model = _mesh_model(device, W)
        mine = ids[r * 2:(r + 1) * 2]                                         # this rank's rows
        opt, run = step(model, to_device(mine[:, :-1], device), to_device(mine[:, 1:], device),
                        lambda: (all_reduce_gradients(model.parameters(), mesh),
                                 clip_grad_norm_(model.parameters(), 0.5, mesh))[1])
        training.setup(model, opt, mesh)
        errors = [abs(run()[1] - ref_norm)]                                   # the global norm before clipping
        layers = {id(p): lay for lay in training.expert_layers(model) for p in lay.experts.parameters()}
        for n, p in model.named_parameters():
            want = ref_grads[n]
            if id(p) in layers:                                               # my experts' rows of the full gradient
                want = want[layers[id(p)].first:layers[id(p)].last]
            assert p.grad.shape == want.shape, f"rank {r}, {mesh.layout}: {n} grad {p.grad.shape} vs {want.shape}"
            errors.append(float(np.abs(to_numpy(p.grad) - want).max()))
        opt.step()
        training.check_in_sync(model, mesh)                                   # dense on all ranks, experts per DP group
        with training.full_experts(model, opt, mesh):                         # as a checkpoint sees them
            errors += [float(np.abs(to_numpy(p.data) - ref_after[n]).max()) for n, p in model.named_parameters()]
        worst[ep_size] = max(errors)
        assert worst[ep_size] < tol, f"rank {r}, {mesh.layout}: differs from one process by {worst[ep_size]:.2e}"
        mesh.close()
    return worst


def check_mesh_zero(comm, ep_sizes=None, steps=2, device="cpu", tol=1e-12):
    """ZeRO-1 on the mesh (MeshZeroAdamW: dense states split over the world, each rank's experts'
    over its DP group) trains like one process with AdamW (weight decay on matrices only, as the
    trainer), to 1e-12 in float64, and the ranks' states add up to one copy of AdamW's.
    Returns {ep_size: (this rank's state bytes, one process's)}."""
    import tinymoe
    from tinymoe.distributed import training
    from tinymoe.distributed.data_parallel import all_reduce_gradients, clip_grad_norm_
    from tinymoe.distributed.mesh import Mesh
    from tinymoe.distributed.zero import MeshZeroAdamW
    from tinymoe.optim import AdamW, clip_grad_norm_ as one_process_clip

    W, r = comm.world_size, comm.rank
    ids = np.random.default_rng(4).integers(0, MESH_MODEL["vocab_size"], (steps, 2 * W, MESH_MODEL["block_size"] + 1))

    def groups(model):                                                        # tinymoe.train.make_optimizer's
        params = list(model.parameters())
        return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]

    tinymoe.manual_seed(2)
    ref = _mesh_model(device, W)
    ref_opt = AdamW(groups(ref), lr=0.05, betas=(0.9, 0.95))
    for t in range(steps):
        ref_opt.zero_grad()
        ref(to_device(ids[t, :, :-1], device), to_device(ids[t, :, 1:], device))[1].backward()
        one_process_clip(ref.parameters(), 0.5)
        ref_opt.step()
    ref_bytes = sum(v.nbytes for s in ref_opt.state.values() for v in s.values() if hasattr(v, "nbytes"))

    out = {}
    for ep_size in ep_sizes or _divisors(W):
        mesh = Mesh(comm, ep_size)
        tinymoe.manual_seed(2)
        model = training.setup(_mesh_model(device, W), None, mesh)
        opt = MeshZeroAdamW(groups(model), mesh, lr=0.05, betas=(0.9, 0.95))
        for t in range(steps):
            mine = ids[t, r * 2:(r + 1) * 2]                                  # this rank's rows
            opt.zero_grad()
            model(to_device(mine[:, :-1], device), to_device(mine[:, 1:], device))[1].backward()
            all_reduce_gradients(model.parameters(), mesh)
            clip_grad_norm_(model.parameters(), 0.5, mesh)
            opt.step()
        training.check_in_sync(model, mesh)
        with training.full_experts(model, None, mesh):
            err = max(float(np.abs(to_numpy(p.data) - to_numpy(q.data)).max())
                      for p, q in zip(model.parameters(), ref.parameters()))
        assert err < tol, f"rank {r}, {mesh.layout}: ZeRO-1 on the mesh differs from one process by {err:.2e}"
        total = float(to_numpy(comm.all_reduce(np.array([float(opt.state_bytes)])))[0])
        assert total == ref_bytes, f"rank {r}, {mesh.layout}: the ranks hold {total:.0f} bytes of state, AdamW {ref_bytes}"
        out[ep_size] = (opt.state_bytes, ref_bytes)
        mesh.close()
    return out


CHECKS = [check_all_to_all, check_all_to_all_rows, check_large_messages, check_all_reduce, check_broadcast,
          check_all_to_all_grad, check_expert_parallel, check_data_parallel, check_zero, check_mesh_groups,
          check_mesh_training, check_mesh_zero]


def main(argv=None):
    import tinymoe.distributed as dist

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default=None, help="toy, mpi or nccl (default: from the launcher)")
    p.add_argument("--only", default=None, help="comma-separated check names (default: every check)")
    a = p.parse_args(argv)
    checks = CHECKS if not a.only else [c for c in CHECKS if c.__name__ in a.only.split(",")]
    if a.only and len(checks) != len(a.only.split(",")):
        p.error(f"--only: unknown check in {a.only!r}; the checks are {[c.__name__ for c in CHECKS]}")
    comm = dist.init(a.backend)
    device = "cuda" if comm.backend == "nccl" else "cpu"
    for check in checks:
        check(comm, device=device)
        comm.barrier()
        if comm.rank == 0:
            print(f"selftest {comm.backend} x{comm.world_size}: {check.__name__} ok", flush=True)
    comm.close()


if __name__ == "__main__":
    main()
