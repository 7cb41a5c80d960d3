"""The fused CPU pass (taxfree/optim/adam_kernel.c) against torch arithmetic, across builds and
thread counts, and the optimizers falling back to torch ops without it."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

from taxfree.optim import OnTIESAdamW, cpu_kernel
from taxfree.optim.adamw_math import AdamCoefficients
from taxfree.optim.sparsify import bernoulli_positions, take_top_k


def fused_kernel():
    """The kernel, or a skip where there is no compiler (a failure in CI, which has gcc)."""
    kern = cpu_kernel.kernel()
    if kern is None:
        if os.environ.get("CI") == "true" and os.environ.get("TAXFREE_CPU_KERNEL", "1") != "0":
            pytest.fail("the fused CPU pass did not build in CI (gcc is expected there)")
        pytest.skip("the fused CPU pass is not available (no C compiler, or TAXFREE_CPU_KERNEL=0)")
    return kern


def state(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, generator=g) * 1e-2
    m = torch.randn(n, generator=g) * 1e-3
    v = torch.rand(n, generator=g) * 1e-4
    p = torch.randn(n, generator=g)
    return p, grad, m, v


COEF = AdamCoefficients(-1e-3 / 0.271, (1 - 0.999**3) ** 0.5, 1e-8, w1=0.1, b2=0.999, c2=1e-3, decay=0.999)


def torch_reference(p, grad, m, v, c):
    """The kernel's arithmetic in torch: lerp and addcmul round as fma (checked against torch's
    own ops below); sqrt correctly rounded through float64 (torch's fp32 sqrt may err by an ulp)."""
    m = m.clone().lerp_(grad, c.w1)
    v = v.clone().mul_(c.b2).addcmul_(grad, grad, value=c.c2)
    sqrt = v.double().sqrt().float()
    d = (m * c.step_size) / (sqrt / c.bc2_sqrt + c.eps)
    return p * c.decay, m, v, d


def test_update_matches_torch_arithmetic_bit_for_bit():
    kern = fused_kernel()
    p, grad, m, v = state(10_007)
    want_p, want_m, want_v, want_d = torch_reference(p, grad, m, v, COEF)
    d = torch.empty_like(p)
    l1 = kern.update(p, grad, m, v, COEF, d_out=d, l1=True)
    assert torch.equal(m, want_m) and torch.equal(p, want_p)
    assert torch.equal(v, want_v) and torch.equal(d, want_d)
    assert l1 == pytest.approx(want_d.abs().double().sum().item(), rel=1e-6)
    # the positions read back: D at given positions, |D| densely, |D| before the update (peek)
    index = torch.tensor([0, 5, 77, 10_006])
    assert torch.equal(kern.at(m, v, index, COEF), want_d[index])
    assert torch.equal(kern.dense_abs(m, v, COEF, torch.empty_like(p)), want_d.abs())
    p2, grad2, m2, v2 = state(10_007)
    assert torch.equal(kern.peek(grad2, m2, v2, index, COEF), want_d[index].abs())


@pytest.mark.parametrize("lower_quantile", [0.0, 0.5, 0.98, 0.99999])
def test_update_collect_finds_exactly_the_entries_reaching_the_bound(lower_quantile):
    """The collect pass skips the square root and the divisions for most entries: it must still
    return exactly the entries whose rounded |D| >= lower (ascending), D there, and sum |D|."""
    kern = fused_kernel()
    p, grad, m, v = state(50_021, seed=1)
    v[::97] = 0.0  # entries whose |D| is decided by eps alone
    v[5::101] = 1e-38  # subnormal-range second moments
    _, want_m, want_v, want_d = torch_reference(p, grad, m, v, COEF)
    lower = 0.0 if lower_quantile == 0 else torch.quantile(want_d.abs(), lower_quantile).item()
    reach = torch.nonzero(want_d.abs() >= lower).squeeze(1)
    index, values, l1, complete = kern.update_collect(None, grad, m, v, COEF, lower, reach.numel(), l1=True)
    assert complete and torch.equal(index, reach) and torch.equal(values, want_d[reach])
    assert torch.equal(m, want_m) and torch.equal(v, want_v)
    assert l1 == pytest.approx(want_d.abs().double().sum().item(), rel=1e-6)
    # too little room: reported incomplete, the moments updated all the same
    _, grad3, m3, v3 = state(50_021, seed=1)
    v3[::97], v3[5::101] = 0.0, 1e-38
    if reach.numel() > 4000:
        *_, complete = kern.update_collect(None, grad3, m3, v3, COEF, lower, 1)
        assert not complete and torch.equal(m3, want_m) and torch.equal(v3, want_v)


def test_native_and_portable_builds_agree_bit_for_bit(tmp_path, monkeypatch):
    """-march=native (AVX-512 paths where the CPU has them) and the compiler's generic target."""
    fused_kernel()
    monkeypatch.setenv("TAXFREE_KERNEL_CACHE", str(tmp_path))
    builds = [cpu_kernel.AdamKernel(ctypes.CDLL(str(cpu_kernel.build(cpu_kernel.compiler(), native))))
              for native in (True, False)]
    results = []
    for kern in builds:
        p, grad, m, v = state(70_001, seed=2)
        index, values, l1, _ = kern.update_collect(p, grad, m, v, COEF, 1e-4, 70_001, l1=True)
        kept = bernoulli_positions(70_001, 0.05, torch.Generator().manual_seed(0))
        tau_index = bernoulli_positions(70_001, 0.05, torch.Generator().manual_seed(1)).int()
        tau_value = torch.randn(tau_index.numel(), generator=torch.Generator().manual_seed(2))
        p2, grad2, m2, v2 = state(70_001, seed=3)
        kern.update_apply(p2, grad2, m2, v2, COEF, kept, 0.05, 0.9, tau_index, tau_value, 0.3)
        p3 = p.clone()
        kern.ties_apply(p3, index, values, tau_index, tau_value, 0.9, 0.3, False, 0.3)
        results.append((p, m, v, index, values, l1, p2, m2, v2, p3, kern.take_top_k(values.abs(), 100)))
    for a, b in zip(*results):
        assert a == pytest.approx(b, rel=1e-6) if isinstance(a, float) else torch.equal(a, b)


def test_threads_split_the_pass_without_changing_it(monkeypatch):
    kern = fused_kernel()
    monkeypatch.setattr(cpu_kernel, "CHUNK", 1 << 12)  # many chunks on a small tensor
    outs = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            p, grad, m, v = state(100_003, seed=4)
            index, values, l1, complete = kern.update_collect(None, grad, m, v, COEF, 2e-3, 100_003)
            kept = bernoulli_positions(100_003, 0.02, torch.Generator().manual_seed(0))
            tau_index = bernoulli_positions(100_003, 0.02, torch.Generator().manual_seed(1)).int()
            kern.update_apply(p, grad, m.clone(), v.clone(), COEF, kept, 0.02, 1.0, tau_index,
                              torch.ones(tau_index.numel()), 0.5)
            outs.append((index, values, m, v, p))
        finally:
            torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_take_top_k_in_c_equals_the_stable_sort_rule():
    kern = fused_kernel()
    g = torch.Generator().manual_seed(5)
    for values in (torch.rand(10_000, generator=g), torch.randint(0, 7, (10_000,), generator=g).float(),
                   torch.full((300,), 2.0), torch.tensor([1.0, float("nan"), 0.5, 1.0])):
        for k in (1, 3, values.numel() // 2, values.numel()):
            expected = torch.sort(values.nan_to_num(float("inf")), descending=True, stable=True).indices[:k]
            assert torch.equal(kern.take_top_k(values, k), expected.sort().values), (values[:5], k)
            assert kern.kth_largest(values, k) == values.nan_to_num(float("inf")).sort(descending=True).values[k - 1]
    assert torch.equal(take_top_k(torch.tensor([3.0, 1.0, 3.0]), 1), torch.tensor([0]))


def test_optimizers_fall_back_to_torch_ops(monkeypatch):
    """TAXFREE_CPU_KERNEL=0 (or no compiler): the same optimizer, on torch ops, keeps exactly k."""
    monkeypatch.setenv("TAXFREE_CPU_KERNEL", "0")
    assert cpu_kernel.kernel() is None
    p = torch.nn.Parameter(torch.zeros(300, 200))
    opt = OnTIESAdamW([("w", p)], lr=1e-2, reserve_p=0.01)
    opt.init_ref_param_diff({"w": torch.zeros(300, 200)}, {"w": torch.zeros(300, 200)})
    p.grad = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    opt.step()
    assert int((p.detach() != 0).sum()) == 600
