"""DDP and FSDP2 (DTensor parameters) with 2 CPU processes on gloo (docs/algorithms.md 1.5 inv. 6)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from taxfree.optim import OnDAREAdamW, OnTIESAdamW

pytestmark = pytest.mark.dist

WORLD = 2
CLASSES = {"ondare": OnDAREAdamW, "onties": OnTIESAdamW}


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # odd sizes: FSDP2 shards dim 0 unevenly (7 rows -> 4 + 3)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def train(model, opt, steps, rank, same_data_on_ranks):
    for step in range(steps):
        x, y = batch(step, 0 if same_data_on_ranks else rank)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _run_one(rank, mode, name, kw, steps):
    base, ref, policy = make_model(0), make_model(1), make_model(1)
    if mode == "ddp":
        model = nn.parallel.DistributedDataParallel(policy)
        opt = CLASSES[name](model.named_parameters(), lr=1e-2, **kw)  # "module." names
        opt.init_ref_param_diff(ref, base)
        train(model, opt, steps, rank, same_data_on_ranks=False)
        return {n: p.detach().clone() for n, p in policy.named_parameters()}
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    for layer in (policy[0], policy[2], policy[4]):
        fully_shard(layer)
    fully_shard(policy)
    opt = CLASSES[name](policy.named_parameters(), lr=1e-2, **kw)
    opt.init_ref_param_diff(ref, base)
    tau_numel = []
    for p in policy.parameters():
        assert isinstance(p, DTensor)
        tau = opt.tau_dense(p)
        assert tau.shape == p.to_local().shape  # kept sharded, never the full tensor
        tau_numel.append(tau.numel())
    train(policy, opt, steps, rank, same_data_on_ranks=True)
    result = {n: p.full_tensor().detach().clone() for n, p in policy.named_parameters()}
    result["__tau_numel__"] = torch.tensor(tau_numel)
    return result


def _worker(rank, init_file, mode, kw, steps, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {name: _run_one(rank, mode, name, kw, steps) for name in CLASSES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_world(tmp_path, mode, kw, steps):
    """Both optimizers in one 2-process world (one spawn: it is the slow part)."""
    mp.spawn(
        _worker,
        args=(str(tmp_path / "init"), mode, kw, steps, str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process(name, kw, steps):
    base, ref, policy = make_model(0), make_model(1), make_model(1)
    opt = CLASSES[name](policy.named_parameters(), lr=1e-2, **kw)
    opt.init_ref_param_diff(ref, base)
    train(policy, opt, steps, 0, same_data_on_ranks=True)
    return {n: p.detach() for n, p in policy.named_parameters()}


def test_ddp_ranks_hold_identical_results(tmp_path):
    """Random masks (q < 1) too: they are seeded from (seed, step), not the global RNG."""
    kw = dict(reserve_p=0.3, alpha=0.2, use_merge=True, online_step=2)
    rank0, rank1 = run_world(tmp_path, "ddp", kw, steps=5)
    start = make_model(1).state_dict()
    for name in CLASSES:
        for n in rank0[name]:
            assert torch.equal(rank0[name][n], rank1[name][n]), (name, n)
            assert not torch.equal(rank0[name][n], start[n]), (name, n)


def test_fsdp2_equals_single_process_when_nothing_is_dropped(tmp_path):
    kw = dict(reserve_p=1.0, alpha=0.2, use_merge=True, weight_decay=0.1)
    steps = 4
    ranks = run_world(tmp_path, "fsdp", kw, steps)
    for name in CLASSES:
        rank0, rank1 = ranks[0][name], ranks[1][name]
        expected = single_process(name, kw, steps)
        full_numel = torch.tensor([p.numel() for p in expected.values()])
        assert torch.equal(rank0.pop("__tau_numel__") + rank1.pop("__tau_numel__"), full_numel)
        for n, value in expected.items():
            torch.testing.assert_close(rank0[n], value, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(rank1[n], value, rtol=1e-5, atol=1e-6)


def _run_fsdp1(rank, name, kw, steps, bind_before_tau):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

    base, ref, policy = make_model(0), make_model(1), make_model(1)
    opt = None
    if bind_before_tau:  # tau built for the whole tensors first, then cut to the pieces at binding
        opt = CLASSES[name](policy.named_parameters(), lr=1e-2, **kw)
        opt.init_ref_param_diff(ref, base)
    wrapped = FSDP(policy, use_orig_params=True, device_id=torch.device("cpu"),
                   sharding_strategy=ShardingStrategy.FULL_SHARD)
    if opt is None:  # built on the pieces (names carry FSDP1's wrapper prefix), tau after binding
        opt = CLASSES[name](wrapped.named_parameters(), lr=1e-2, **kw)
        opt.bind_fsdp1(wrapped)
        opt.init_ref_param_diff(ref, base)
    else:
        opt.bind_fsdp1(wrapped)
    held = [opt.tau_dense(p).numel() for p in policy.parameters()]
    assert held == [p.numel() for p in policy.parameters()]  # tau cut to this rank's pieces
    train(wrapped, opt, steps, rank, same_data_on_ranks=True)
    with FSDP.summon_full_params(wrapped):
        result = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in wrapped.named_parameters()}
    result["__tau_numel__"] = torch.tensor(held)
    return result


def _fsdp1_worker(rank, init_file, kw, steps, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {f"{name}-{order}": _run_fsdp1(rank, name, kw, steps, order == "before")
                   for name in CLASSES for order in ("before", "after")}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kw", [dict(reserve_p=1.0, alpha=0.2, use_merge=True, weight_decay=0.1),
                                dict(reserve_p=0.3, alpha=0.2, use_merge=True, rescale=True)],
                         ids=["nothing-dropped", "onties-top-k-and-rescale"])
def test_fsdp1_use_orig_params_equals_single_process(tmp_path, kw):
    """FSDP1 hands the optimizer 1-D pieces (FULL_SHARD over 2 ranks splits tensors between them):
    with bind_fsdp1 the result equals one process. At reserve_p 1 for both optimizers; at
    reserve_p < 1 for OnTIES (its top-k threshold and L1 rescale are reduced exactly across ranks;
    OnDARE's random masks are per piece, as under FSDP2)."""
    steps = 4
    mp.spawn(_fsdp1_worker, args=(str(tmp_path / "init"), kw, steps, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    names = list(CLASSES) if kw["reserve_p"] == 1.0 else ["onties"]
    for name in names:
        expected = single_process(name, kw, steps)
        full_numel = sum(p.numel() for p in expected.values())
        for order in ("before", "after"):
            rank0, rank1 = ranks[0][f"{name}-{order}"], ranks[1][f"{name}-{order}"]
            assert int((rank0.pop("__tau_numel__") + rank1.pop("__tau_numel__")).sum()) == full_numel
            for n, value in expected.items():
                torch.testing.assert_close(rank0[n], value, rtol=1e-5, atol=1e-6, msg=f"{name} {order} {n}")
                torch.testing.assert_close(rank1[n], value, rtol=1e-5, atol=1e-6, msg=f"{name} {order} {n}")
    start = make_model(1).state_dict()
    assert not torch.equal(ranks[0]["onties-after"]["0.weight"], start["0.weight"])
