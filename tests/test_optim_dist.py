"""DDP, FSDP2 (DTensor parameters) and FSDP1 with 2 CPU processes on gloo (docs/algorithms.md 1.5 inv. 6)."""

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


def _run_one(rank, mode, name, kw, steps, ref_seed=1):
    base, ref, policy = make_model(0), make_model(ref_seed), make_model(1)
    if mode in ("ddp", "ddp_same"):
        model = nn.parallel.DistributedDataParallel(policy)
        opt = CLASSES[name](model.named_parameters(), lr=1e-2, **kw)  # "module." names
        opt.init_ref_param_diff(ref, base)
        train(model, opt, steps, rank, same_data_on_ranks=mode == "ddp_same")
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


def _worker(rank, init_file, mode, scenarios, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {f"{sid}/{name}": _run_one(rank, mode, name, kw, steps, ref_seed)
                   for sid, (names, kw, steps, ref_seed) in scenarios.items() for name in names}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_world(tmp_path, mode, scenarios):
    """Every scenario {id: (optimizer names, kwargs, steps, ref seed)} in one 2-process world (one spawn:
    it is the slow part)."""
    mp.spawn(
        _worker,
        args=(str(tmp_path / "init"), mode, scenarios, str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process(name, kw, steps, ref_seed=1):
    base, ref, policy = make_model(0), make_model(ref_seed), make_model(1)
    opt = CLASSES[name](policy.named_parameters(), lr=1e-2, **kw)
    opt.init_ref_param_diff(ref, base)
    train(policy, opt, steps, 0, same_data_on_ranks=True)
    return {n: p.detach() for n, p in policy.named_parameters()}


def assert_exactly_k_moved(result: dict, q: float) -> None:
    """One step from make_model(1) with tau = 0 (ref = base): the moved entries are the kept
    ones (a tau would still elect signs, and drop kept entries, without use_merge)."""
    start = make_model(1).state_dict()
    for n, value in start.items():
        k = int(q * value.numel())
        moved = int((result[n] != value).sum())
        assert moved == (k if k >= 1 else value.numel()), (n, moved, k)


# Scenarios shared by the FSDP1 and FSDP2 tests: {id: (optimizers, kwargs, steps, ref seed)};
# ref seed 0 makes ref = base, so tau = 0.
SHARDED = {
    "nothing-dropped": (list(CLASSES), dict(reserve_p=1.0, alpha=0.2, use_merge=True, weight_decay=0.1), 4, 1),
    # OnTIES at q < 1: its top-k and L1 rescale are reduced exactly across ranks (OnDARE's random
    # masks are per piece, so it is not compared at q < 1)
    "top-k-and-rescale": (["onties"], dict(reserve_p=0.3, alpha=0.2, use_merge=True, rescale=True), 4, 1),
    # Adam's first step with eps 0: |D| = lr up to rounding everywhere, so the kept entries are
    # decided by the tie rule; at q 0.5 the ties taken lie on both ranks (FSDP2: '2.weight' takes
    # all 7 of rank 0's ties at the k-th |D| and 6 of rank 1's 7)
    "ties-first-step": (["onties"], dict(reserve_p=0.5, eps=0.0), 1, 0),
    "ties-merge": (["onties"], dict(reserve_p=0.5, eps=0.0, alpha=0.2, use_merge=True, rescale=True), 3, 1),
}


def test_ddp_ranks_hold_identical_results(tmp_path):
    """Random masks (q < 1) too: they are seeded from (seed, step), not the global RNG."""
    kw = dict(reserve_p=0.3, alpha=0.2, use_merge=True, online_step=2)
    rank0, rank1 = run_world(tmp_path, "ddp", {"ddp": (list(CLASSES), kw, 5, 1)})
    start = make_model(1).state_dict()
    for name in CLASSES:
        for n in rank0[f"ddp/{name}"]:
            assert torch.equal(rank0[f"ddp/{name}"][n], rank1[f"ddp/{name}"][n]), (name, n)
            assert not torch.equal(rank0[f"ddp/{name}"][n], start[n]), (name, n)


def test_ddp_equals_single_process_bit_for_bit(tmp_path):
    """Both ranks see the batch one process sees: DDP's averaged gradient is that process's
    gradient exactly, and so is every step of both optimizers (at q < 1 too: masks are seeded by
    step and by the parameter's name without DDP's "module." prefix)."""
    kw = dict(reserve_p=0.3, alpha=0.1, use_merge=True)
    rank0, rank1 = run_world(tmp_path, "ddp_same", {"ddp": (list(CLASSES), kw, 5, 1)})
    for name in CLASSES:
        one = single_process(name, kw, 5)
        for n, value in one.items():
            assert torch.equal(rank0[f"ddp/{name}"][n], value), (name, n)
            assert torch.equal(rank1[f"ddp/{name}"][n], value), (name, n)


def test_fsdp2_equals_single_process(tmp_path):
    """FSDP2 shards dim 0 unevenly (7 rows -> 4 + 3): with nothing dropped both optimizers equal
    one process; OnTIES at q < 1 too (its top-k, ties included, and rescale across ranks)."""
    ranks = run_world(tmp_path, "fsdp", SHARDED)
    for sid, (names, kw, steps, ref_seed) in SHARDED.items():
        for name in names:
            rank0, rank1 = ranks[0][f"{sid}/{name}"], ranks[1][f"{sid}/{name}"]
            expected = single_process(name, kw, steps, ref_seed)
            full_numel = torch.tensor([p.numel() for p in expected.values()])
            assert torch.equal(rank0.pop("__tau_numel__") + rank1.pop("__tau_numel__"), full_numel)
            for n, value in expected.items():
                torch.testing.assert_close(rank0[n], value, rtol=1e-5, atol=1e-6, msg=f"{sid} {name} {n}")
                torch.testing.assert_close(rank1[n], value, rtol=1e-5, atol=1e-6, msg=f"{sid} {name} {n}")
            if sid == "ties-first-step":
                assert_exactly_k_moved(rank0, kw["reserve_p"])
                assert_exactly_k_moved(expected, kw["reserve_p"])


def _run_fsdp1(rank, name, kw, steps, ref_seed, bind_before_tau):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

    base, ref, policy = make_model(0), make_model(ref_seed), make_model(1)
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


def _fsdp1_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {f"{sid}/{name}-{order}": _run_fsdp1(rank, name, kw, steps, ref_seed, order == "before")
                   for sid, (names, kw, steps, ref_seed) in SHARDED.items()
                   for name in names for order in ("before", "after")}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp1_use_orig_params_equals_single_process(tmp_path):
    """FSDP1 hands the optimizer 1-D pieces (FULL_SHARD over 2 ranks splits tensors between them):
    with bind_fsdp1 the result equals one process. At reserve_p 1 for both optimizers; at
    reserve_p < 1 for OnTIES (its top-k, ties included, and L1 rescale are reduced exactly across
    ranks; OnDARE's random masks are per piece, as under FSDP2)."""
    mp.spawn(_fsdp1_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for sid, (names, kw, steps, ref_seed) in SHARDED.items():
        for name in names:
            expected = single_process(name, kw, steps, ref_seed)
            full_numel = sum(p.numel() for p in expected.values())
            for order in ("before", "after"):
                rank0, rank1 = ranks[0][f"{sid}/{name}-{order}"], ranks[1][f"{sid}/{name}-{order}"]
                assert int((rank0.pop("__tau_numel__") + rank1.pop("__tau_numel__")).sum()) == full_numel
                for n, value in expected.items():
                    msg = f"{sid} {name} {order} {n}"
                    torch.testing.assert_close(rank0[n], value, rtol=1e-5, atol=1e-6, msg=msg)
                    torch.testing.assert_close(rank1[n], value, rtol=1e-5, atol=1e-6, msg=msg)
                if sid == "ties-first-step":
                    assert_exactly_k_moved(rank0, kw["reserve_p"])
    start = make_model(1).state_dict()
    assert not torch.equal(ranks[0]["top-k-and-rescale/onties-after"]["0.weight"], start["0.weight"])
