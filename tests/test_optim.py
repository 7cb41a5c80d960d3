"""The online merging optimizers against the invariants of docs/algorithms.md 1.5."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from taxfree.errors import TaxfreeError
from taxfree.optim import OnDAREAdamW, OnTIESAdamW
from taxfree.optim.reference import ReferenceOnlineMergingAdamW
from taxfree.optim import cpu_kernel
from taxfree.optim.adamw_math import AdamCoefficients
from taxfree.optim.sparsify import bernoulli_positions, radix_kth_largest, take_top_k, topk_positions

SHAPES = {"embed.weight": (50, 16), "layer.weight": (24, 16), "layer.bias": (24,), "head.weight": (7, 24)}


def make_params(seed: int = 0, shapes=SHAPES) -> dict[str, nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {n: nn.Parameter(torch.randn(s, generator=g)) for n, s in shapes.items()}


def clone(params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    return {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}


def perturbed(params, scale=0.05, seed=1) -> dict[str, torch.Tensor]:
    """A 'ref' state dict: params plus a random task vector."""
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=g) for n, p in params.items()}


def set_grads(params: dict[str, nn.Parameter], step: int, skip=()) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for n, p in params.items():
        grad = torch.randn(p.shape, generator=g)
        p.grad = None if n in skip else grad


def state_dict_of(params) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def run(opt, params, steps, skip_fn=lambda step: ()):
    for step in range(steps):
        set_grads(params, step, skip=skip_fn(step))
        opt.step()


HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


# ----- invariant 1: nothing merged == torch.optim.AdamW ---------------------------------------


@pytest.mark.parametrize("cls", [OnDAREAdamW, OnTIESAdamW])
@pytest.mark.parametrize("online_step", [1, 3])
def test_nothing_merged_equals_adamw(cls, online_step):
    params = make_params()
    mine, theirs = clone(params), clone(params)
    opt = cls(mine.items(), **HP, online_step=online_step)
    opt.init_ref_param_diff(params, params)  # tau = 0
    adamw = torch.optim.AdamW(theirs.values(), **HP, foreach=True)
    skip = lambda step: ("layer.bias",) if step % 4 == 1 else ()  # noqa: E731
    run(opt, mine, 60, skip)
    run(adamw, theirs, 60, skip)
    for n in params:
        if online_step == 1:  # same rounding steps: bit for bit
            assert torch.equal(mine[n], theirs[n]), n
        else:  # revert + re-add at merge steps rounds differently
            torch.testing.assert_close(mine[n], theirs[n], rtol=1e-6, atol=1e-6)
    # parameters without a gradient are skipped like AdamW skips them: fewer steps counted
    assert opt.state[mine["layer.bias"]]["step"].item() == 60 - 15
    assert adamw.state[theirs["layer.bias"]]["step"].item() == 60 - 15


# ----- invariant 2: OnDARE q=1 merge == AdamW + alpha*tau - alpha*D ----------------------------


@pytest.mark.parametrize("sparse_tau", [False, True])
def test_ondare_full_keep_merge_formula(sparse_tau):
    alpha, hp = 0.3, dict(HP, weight_decay=0.0)
    params = make_params()
    ref = perturbed(params)
    mine, theirs = clone(params), clone(params)
    opt = OnDAREAdamW(mine.items(), **hp, reserve_p=1.0, alpha=alpha, use_merge=True,
                      sparse_tau=sparse_tau)
    opt.init_ref_param_diff(ref, params)
    adamw = torch.optim.AdamW(theirs.values(), **hp)
    offset = {n: torch.zeros_like(p) for n, p in params.items()}
    for step in range(10):
        before = state_dict_of(theirs)
        set_grads(mine, step)
        set_grads(theirs, step)
        opt.step()
        adamw.step()
        for n in params:  # moments see the same grads, so D is AdamW's increment each step
            tau = ref[n] - params[n]
            offset[n] += alpha * tau - alpha * (theirs[n] - before[n])
            torch.testing.assert_close(mine[n], theirs[n] + offset[n], rtol=0, atol=2e-6)


def test_ondare_full_keep_merge_with_weight_decay_one_step():
    alpha = 0.25
    params = make_params()
    ref = perturbed(params)
    mine, theirs = clone(params), clone(params)
    opt = OnDAREAdamW(mine.items(), **HP, alpha=alpha, use_merge=True)
    opt.init_ref_param_diff(ref, params)
    adamw = torch.optim.AdamW(theirs.values(), **HP)
    set_grads(mine, 0)
    set_grads(theirs, 0)
    opt.step()
    adamw.step()
    for n in params:
        decayed = params[n] * (1 - HP["lr"] * HP["weight_decay"])
        d = theirs[n] - decayed
        expected = theirs[n] + alpha * (ref[n] - params[n]) - alpha * d
        torch.testing.assert_close(mine[n], expected, rtol=0, atol=1e-6)


# ----- invariant 3: OnDARE q<1 keeps ~q of D, each kept entry D/q ------------------------------


def test_ondare_dropout_density_and_scale():
    q = 0.1
    shapes = {"a": (300, 200), "b": (1000,), "c": (77, 13)}
    params = make_params(shapes=shapes)
    mine, theirs = clone(params), clone(params)
    opt = OnDAREAdamW(mine.items(), **HP, reserve_p=q, seed=3)
    opt.init_ref_param_diff(params, params)
    adamw = torch.optim.AdamW(theirs.values(), **HP)
    n_total = sum(p.numel() for p in params.values())
    kept_masks = []
    for step in range(3):
        start = state_dict_of(mine)
        set_grads(mine, step)
        set_grads(theirs, step)
        for n in theirs:  # AdamW from the same point gives D
            theirs[n].data.copy_(start[n])
        opt.step()
        adamw.step()
        kept = 0
        masks = []
        for n in params:
            decayed = start[n] * (1 - HP["lr"] * HP["weight_decay"])
            applied = mine[n] - decayed
            d = theirs[n] - decayed
            nonzero = applied != 0
            kept += int(nonzero.sum())
            masks.append(nonzero.flatten())
            torch.testing.assert_close(applied[nonzero], d[nonzero] / q, rtol=1e-4, atol=4e-6)
            # dropped entries got exactly the decay and nothing else
            assert torch.equal(mine[n][~nonzero], decayed[~nonzero])
        sd = math.sqrt(n_total * q * (1 - q))
        assert abs(kept - q * n_total) < 5 * sd
        kept_masks.append(torch.cat(masks))
    # a new mask every step: two masks overlap on about q of the kept entries
    overlap = (kept_masks[0] & kept_masks[1]).sum().item()
    assert abs(overlap - q * q * n_total) < 5 * math.sqrt(n_total * q * q)


def test_ondare_rescale_keeps_l1_norm():
    q = 0.2
    params = make_params(shapes={"w": (200, 50)})
    mine, theirs = clone(params), clone(params)
    opt = OnDAREAdamW(mine.items(), lr=1e-3, reserve_p=q, rescale=True)
    opt.init_ref_param_diff(params, params)
    adamw = torch.optim.AdamW(theirs.values(), lr=1e-3, weight_decay=0.0)
    set_grads(mine, 0)
    set_grads(theirs, 0)
    opt.step()
    adamw.step()
    applied = mine["w"] - params["w"]
    d = theirs["w"] - params["w"]
    assert abs((applied != 0).float().mean().item() - q) < 0.03
    l1 = d.abs().sum()
    expected_scale = l1 / ((d[applied != 0] / q).abs().sum() + 1e-8)
    torch.testing.assert_close(applied[applied != 0], d[applied != 0] / q * expected_scale)


def test_ondare_task_vector_is_dropped_rescaled_and_clipped():
    q, clip = 0.25, 0.08
    params = make_params(shapes={"w": (400, 100)})
    ref = perturbed(params, scale=0.05)
    opt = OnDAREAdamW(params.items(), reserve_p=q, clip_tau=clip)
    opt.init_ref_param_diff(ref, params)
    tau = opt.tau_dense(params["w"])
    diff = ref["w"] - params["w"]
    kept = tau != 0
    assert abs(kept.float().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / diff.numel())
    torch.testing.assert_close(tau[kept], (diff[kept] / q).clamp(-clip, clip))
    assert tau.abs().max().item() == pytest.approx(clip)
    assert "tau_index" in opt.state[params["w"]]  # density 0.25: stored sparse


def test_bernoulli_positions_is_bernoulli():
    g = torch.Generator().manual_seed(0)
    n, q = 200_000, 0.03
    counts = []
    for _ in range(20):
        pos = bernoulli_positions(n, q, g)
        assert bool((pos[1:] > pos[:-1]).all()) and int(pos[0]) >= 0 and int(pos[-1]) < n
        counts.append(pos.numel())
    mean = sum(counts) / len(counts)
    assert abs(mean - n * q) < 5 * math.sqrt(n * q * (1 - q) / 20)
    # uniform over the range: each tenth holds about a tenth
    tenths = torch.bincount(pos * 10 // n, minlength=10).float()
    assert (tenths - pos.numel() / 10).abs().max() < 5 * math.sqrt(pos.numel() / 10)
    # same seed, same positions
    a = bernoulli_positions(n, q, torch.Generator().manual_seed(7))
    b = bernoulli_positions(n, q, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(bernoulli_positions(5, 1.0, g), torch.arange(5))


# ----- top-k --------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k,sample", [(300_000, 3000, 65536), (1000, 10, 65536), (5000, 500, 16), (20_000, 7, 2048)])
def test_topk_positions_exact(n, k, sample):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).abs()
    positions = topk_positions(x, k, sample_size=sample)
    expected = torch.topk(x, k).indices.sort().values
    assert torch.equal(positions, expected)


def test_topk_positions_keeps_exactly_k_ties_by_lowest_index():
    x = torch.tensor([0.0, 3.0, 1.0, 3.0, 0.0, 2.0])
    assert topk_positions(x, 1).tolist() == [1]  # 3.0 twice: the first
    assert topk_positions(x, 2).tolist() == [1, 3]
    assert topk_positions(x, 4).tolist() == [1, 2, 3, 5]
    assert topk_positions(x, 5).tolist() == [0, 1, 2, 3, 5]  # zeros too, the first one
    assert topk_positions(torch.zeros(4), 2).tolist() == [0, 1]
    # large and tied everywhere (the sampled bound then admits every entry): the first k
    tied = torch.full((100_000,), 0.5)
    assert torch.equal(topk_positions(tied, 1234), torch.arange(1234))
    # a few levels, each heavily tied: all of the higher levels, then the lowest positions
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 5, (200_000,), generator=g).float()
    for k in (1, 999, 40_000, 123_456):
        got = topk_positions(levels, k)
        order = torch.sort(levels, descending=True, stable=True).indices[:k].sort().values
        assert got.numel() == k and torch.equal(got, order)


def test_take_top_k_edges():
    x = torch.tensor([2.0, 1.0, 2.0])
    assert take_top_k(x, 0).tolist() == []
    assert take_top_k(x, 3).tolist() == [0, 1, 2]
    assert take_top_k(x, 1).tolist() == [0]
    with pytest.raises(ValueError):
        take_top_k(x, 4)


# ----- invariant 4: OnTIES sign election ------------------------------------------------------


def test_onties_never_applies_a_disagreeing_sign():
    """First step with eps = 1: D = -lr * g / (|g| + 1), known by hand."""
    lr, q = 0.1, 0.5
    base = {"w": torch.zeros(8)}
    tau = torch.tensor([0.04, -0.04, 0.0, -0.01, 0.0, 0.0, 0.0, 0.03])  # 4 = k non-zeros
    grad = torch.tensor([1.0, 3.0, -0.5, -4.0, 2.0, 0.2, -1.0, 6.0])
    d = -lr * grad / (grad.abs() + 1)  # [-.05, -.075, .0333, .08, -.0667, -.0167, .05, -.0857]
    d_k = d * torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])  # the 4 largest |D|
    elected = torch.where(tau + d_k >= 0, 1.0, -1.0)
    for use_merge, alpha in [(False, 0.0), (True, 1.0), (True, 0.4)]:
        for sparse_tau in (False, True):
            p = nn.Parameter(torch.zeros(8))
            opt = OnTIESAdamW([("w", p)], lr=lr, eps=1.0, reserve_p=q, use_merge=use_merge,
                              alpha=alpha, sparse_tau=sparse_tau)
            opt.init_ref_param_diff({"w": tau}, base)
            assert torch.equal(opt.tau_dense(p), tau)  # top-4 of a 4-sparse tau is itself
            p.grad = grad.clone()
            opt.step()
            tau_part = torch.where(torch.sign(tau) == elected, tau, 0.0)
            d_part = torch.where(torch.sign(d_k) == elected, d_k, 0.0)
            w_tau, w_d = (alpha, 1 - alpha) if use_merge else (0.0, 1.0)
            torch.testing.assert_close(p.detach(), w_tau * tau_part + w_d * d_part)
            if not use_merge:
                # entry 1: -.075 agrees with tau -.04; 3: .08 beats tau -.01; 4: -.0667 alone;
                # 7: -.0857 beats tau .03: every kept D entry is on the elected side
                torch.testing.assert_close(p.detach(), d_k)
            if alpha == 1.0:
                # tau survives only where it agrees: entries 3 (-.01) and 7 (.03) lose
                torch.testing.assert_close(
                    p.detach(), torch.tensor([0.04, -0.04, 0, 0, 0, 0, 0, 0])
                )


@pytest.mark.parametrize("online_step", [1, 3])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("q", [0.3, 1.0])
def test_onties_matches_the_reference_loop(online_step, rescale, q):
    params = make_params()
    ref = perturbed(params)
    mine, theirs = clone(params), clone(params)
    # eps 0.1: on the first step AdamW's |D| ~ lr*|g|/(|g|+eps) must not be all ties at
    # rounding level, or top-k would pick between rounding noise of two implementations
    kw = dict(HP, eps=0.1, reserve_p=q, alpha=0.3, use_merge=True, rescale=rescale,
              online_step=online_step)
    opt = OnTIESAdamW(mine.items(), **kw)
    opt.init_ref_param_diff(ref, params)
    oracle = ReferenceOnlineMergingAdamW(theirs.values(), "onties", **kw)
    for n in params:
        oracle.set_tau(theirs[n], opt.tau_dense(mine[n]))
    run(opt, mine, 12)
    run(oracle, theirs, 12)
    for n in params:
        torch.testing.assert_close(mine[n], theirs[n], rtol=1e-5, atol=1e-6)


def test_onties_task_vector_is_topk_with_rescale():
    params = make_params(shapes={"w": (40, 25)})
    ref = perturbed(params)
    diff = (ref["w"] - params["w"]).flatten()
    for rescale in (False, True):
        opt = OnTIESAdamW(params.items(), reserve_p=0.1, rescale=rescale)
        opt.init_ref_param_diff(ref, params)
        tau = opt.tau_dense(params["w"]).flatten()
        top = diff.abs().topk(100).indices
        assert set(torch.nonzero(tau).flatten().tolist()) == set(top.tolist())
        scale = diff.abs().sum() / diff[top].abs().sum() if rescale else 1.0
        torch.testing.assert_close(tau[top], diff[top] * scale)


# ----- exactly k at every step, ties by lowest flat index ----------------------------------------


@pytest.mark.parametrize("scale,eps", [(1e-4, 1e-8), (1e-2, 1e-8), (1.0, 1e-8), (1e-2, 0.0)])
@pytest.mark.parametrize("rescale", [False, True])
def test_onties_first_step_keeps_exactly_k(scale, eps, rescale):
    """Adam's first step: |D| = lr*|g|/(|g|+eps) is lr up to rounding when |g| >> eps, so
    thousands of entries tie with the k-th largest. Exactly k = int(q*n) entries move, and they
    are the largest |D| (checked against D in float64)."""
    lr, q, shape = 1e-2, 0.01, (1024, 1024)
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(shape, generator=g) * scale
    p = nn.Parameter(torch.zeros(shape))
    opt = OnTIESAdamW([("w", p)], lr=lr, eps=eps, reserve_p=q, rescale=rescale)
    opt.init_ref_param_diff({"w": torch.zeros(shape)}, {"w": torch.zeros(shape)})
    p.grad = grad.clone()
    opt.step()
    k = int(q * p.numel())
    assert k == 10485
    moved = p.detach().flatten() != 0
    assert int(moved.sum()) == k
    g64 = grad.double().flatten()
    d = (lr * g64.abs()) / (g64.abs() + eps)  # m/bc1 = g, sqrt(v/bc2) = |g|
    assert d[moved].min() >= d[~moved].max() * (1 - 1e-6)
    if rescale:  # one factor restores |D|_1: each kept entry ~ D * n/k, about 100x here
        torch.testing.assert_close(p.detach().abs().sum().double(), d.sum(), rtol=1e-5, atol=0)


def test_onties_exact_ties_keep_the_lowest_flat_indices():
    """Every |g| equal: every |D| is the same number, so the rule alone picks the entries."""
    shape, q = (300, 70), 0.05
    sign = torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    for eps in (1e-8, 0.0):
        p = nn.Parameter(torch.zeros(shape))
        opt = OnTIESAdamW([("w", p)], lr=1e-2, eps=eps, reserve_p=q)
        opt.init_ref_param_diff({"w": torch.zeros(shape)}, {"w": torch.zeros(shape)})
        p.grad = 0.37 * sign
        opt.step()
        k = int(q * p.numel())
        moved = torch.nonzero(p.detach().flatten()).squeeze(1)
        assert torch.equal(moved, torch.arange(k))


@pytest.mark.parametrize("eps", [1e-8, 0.0])
@pytest.mark.parametrize("sparse_tau", [False, True])
def test_onties_first_steps_with_ties_equal_the_reference_loop(eps, sparse_tau, monkeypatch):
    """With ties everywhere the kept set is decided by the tie rule: the optimizer's torch path
    (whose D is AdamW's, rounding included) and the per-parameter loop (a stable sort) keep the
    same entries, so they agree exactly. (The fused CPU pass rounds sqrt correctly, torch does
    not always: its ties are checked against its own D below.)"""
    monkeypatch.setenv("TAXFREE_CPU_KERNEL", "0")
    params = make_params(shapes={"a": (200, 64), "b": (64,), "c": (33, 17)})
    ref = perturbed(params)
    mine, theirs = clone(params), clone(params)
    kw = dict(lr=1e-2, eps=eps, reserve_p=0.1, alpha=0.3, use_merge=True)
    opt = OnTIESAdamW(mine.items(), **kw, sparse_tau=sparse_tau)
    opt.init_ref_param_diff(ref, params)
    oracle = ReferenceOnlineMergingAdamW(theirs.values(), "onties", **kw)
    for n in params:
        oracle.set_tau(theirs[n], opt.tau_dense(mine[n]))
    for step in range(3):
        for n in params:
            grad = torch.randn(params[n].shape, generator=torch.Generator().manual_seed(step)) * 1e-2
            mine[n].grad, theirs[n].grad = grad.clone(), grad.clone()
        opt.step()
        oracle.step()
        for n in params:
            torch.testing.assert_close(mine[n], theirs[n], rtol=1e-6, atol=1e-7, msg=f"{step} {n}")


@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_onties_fused_pass_keeps_the_top_k_of_its_own_update(eps):
    """The fused CPU pass finds the top k in its update pass (sampled bound, candidates): the
    kept entries are exactly take_top_k of its D, computed densely by the kernel from the same
    state, at the first step (ties everywhere) and at later ones."""
    kern = cpu_kernel.kernel()
    if kern is None:
        pytest.skip("the fused CPU pass is not available (no C compiler, or TAXFREE_CPU_KERNEL=0)")
    shape, q, lr = (512, 300), 0.01, 1e-2
    p = nn.Parameter(torch.zeros(shape))
    opt = OnTIESAdamW([("w", p)], lr=lr, eps=eps, reserve_p=q)
    opt.init_ref_param_diff({"w": torch.zeros(shape)}, {"w": torch.zeros(shape)})
    k = int(q * p.numel())
    for step in range(3):
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(step)) * 1e-2
        state = opt.state[p]
        m = state["exp_avg"].clone().flatten() if "exp_avg" in state else torch.zeros(p.numel())
        v = state["exp_avg_sq"].clone().flatten() if "exp_avg" in state else torch.zeros(p.numel())
        c = AdamCoefficients(-lr / (1 - 0.9 ** (step + 1)), (1 - 0.999 ** (step + 1)) ** 0.5, eps,
                             w1=1 - 0.9, b2=0.999, c2=1 - 0.999)
        d = torch.empty(p.numel())
        kern.update(None, grad.flatten(), m, v, c, d_out=d)
        before = p.detach().clone().flatten()
        p.grad = grad
        opt.step()
        applied = p.detach().flatten() - before
        kept = take_top_k(d.abs(), k)
        assert torch.equal(torch.nonzero(applied).squeeze(1), kept), step
        assert torch.equal(opt.state[p]["exp_avg"].flatten(), m)
        assert torch.equal(opt.state[p]["exp_avg_sq"].flatten(), v)
        torch.testing.assert_close(applied[kept], d[kept], rtol=1e-6, atol=0)


# ----- invariant 5: online_step K > 1 ----------------------------------------------------------


@pytest.mark.parametrize("cls", [OnDAREAdamW, OnTIESAdamW])
def test_online_step_moves_every_parameter_every_step(cls):
    params = make_params()
    ref = perturbed(params)
    opt = cls(params.items(), **HP, reserve_p=0.5, alpha=0.5, use_merge=True, online_step=3)
    opt.init_ref_param_diff(ref, params)
    for step in range(7):
        before = state_dict_of(params)
        set_grads(params, step)
        opt.step()
        for n, p in params.items():
            assert not torch.equal(p.detach(), before[n]), (step, n)


def test_ondare_online_step_matches_reference_when_fully_kept():
    params = make_params()
    ref = perturbed(params)
    mine, theirs = clone(params), clone(params)
    kw = dict(HP, reserve_p=1.0, alpha=0.2, use_merge=True, rescale=True, online_step=4)
    opt = OnDAREAdamW(mine.items(), **kw)
    opt.init_ref_param_diff(ref, params)
    oracle = ReferenceOnlineMergingAdamW(theirs.values(), "ondare", **kw)
    for n in params:
        oracle.set_tau(theirs[n], opt.tau_dense(mine[n]))
    run(opt, mine, 13)
    run(oracle, theirs, 13)
    for n in params:
        torch.testing.assert_close(mine[n], theirs[n], rtol=1e-5, atol=1e-6)


def test_online_step_caches_plain_adamw_between_merges():
    """Between merges the parameter follows AdamW exactly; a merge step reverts the cache."""
    params = make_params()
    mine, theirs = clone(params), clone(params)
    opt = OnDAREAdamW(mine.items(), **HP, reserve_p=0.2, online_step=4)
    opt.init_ref_param_diff(params, params)
    adamw = torch.optim.AdamW(theirs.values(), **HP)
    for step in range(3):
        set_grads(mine, step)
        set_grads(theirs, step)
        opt.step()
        adamw.step()
        for n in params:
            assert torch.equal(mine[n], theirs[n])
    cache = opt.state[mine["layer.weight"]]["cached_update"]
    assert cache.abs().sum() > 0
    set_grads(mine, 3)
    opt.step()
    assert torch.count_nonzero(cache) == 0  # merged and cleared at step 4


# ----- errors -----------------------------------------------------------------------------------


def test_step_before_task_vector_is_an_error():
    params = make_params()
    opt = OnDAREAdamW(params.items())
    set_grads(params, 0)
    with pytest.raises(TaxfreeError, match="init_ref_param_diff.*'embed.weight'"):
        opt.step()


def test_task_vector_name_and_shape_errors():
    params = make_params()
    ref = perturbed(params)
    opt = OnTIESAdamW(params.items())
    missing = {k: v for k, v in ref.items() if k != "layer.bias"}
    with pytest.raises(TaxfreeError, match="ref state dict has no tensor named 'layer.bias'"):
        opt.init_ref_param_diff(missing, params)
    with pytest.raises(TaxfreeError, match="base state dict has no tensor named 'layer.bias'"):
        opt.init_ref_param_diff(ref, missing)
    bad = dict(ref, **{"head.weight": torch.zeros(7, 23)})
    with pytest.raises(TaxfreeError, match=r"'head.weight'.*\(7, 24\).*\(7, 23\)"):
        opt.init_ref_param_diff(bad, params)


def test_param_name_map_for_plain_parameters():
    params = make_params()
    ref = perturbed(params)
    names = list(params)
    plain = OnDAREAdamW(list(params.values()))
    with pytest.raises(TaxfreeError, match="param_name_map"):
        plain.init_ref_param_diff(ref, params)
    mapped = OnDAREAdamW(list(params.values()), param_name_map={(0, i): n for i, n in enumerate(names)})
    mapped.init_ref_param_diff(ref, params)
    for n in names:
        torch.testing.assert_close(mapped.tau_dense(params[n]), (ref[n] - params[n]).clamp(-1, 1))


@pytest.mark.parametrize("kw,match", [
    (dict(reserve_p=0.0), "reserve_p"), (dict(reserve_p=1.5), "reserve_p"),
    (dict(alpha=-0.1), "alpha"), (dict(online_step=0), "online_step"),
    (dict(lr=-1.0), "lr"), (dict(clip_tau=0.0), "clip_tau"),
])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(TaxfreeError, match=match):
        OnDAREAdamW(make_params().items(), **kw)


def test_dtype_of_task_vector():
    params = {n: nn.Parameter(p.detach().to(torch.bfloat16)) for n, p in make_params().items()}
    ref = perturbed(params)
    opt = OnTIESAdamW(params.items())
    opt.init_ref_param_diff(ref, params)
    assert opt.tau_dense(params["layer.weight"]).dtype == torch.bfloat16
    opt = OnTIESAdamW(params.items(), tau_dtype=torch.float32)
    opt.init_ref_param_diff(ref, params)
    assert opt.tau_dense(params["layer.weight"]).dtype == torch.float32


def test_radix_kth_largest_and_large_ties():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3_000_000, generator=g).abs()
    x[::7] = 0.25  # a heavy tie
    for k in (1, 1000, 428_572, 2_000_000):
        assert radix_kth_largest(x, k).item() == torch.kthvalue(x, x.numel() - k + 1).values.item()
        got = take_top_k(x, k)  # the radix path (more than 2^20 entries)
        expected = torch.sort(x, descending=True, stable=True).indices[:k].sort().values
        assert torch.equal(got, expected), k
