"""Resume (state_dict round trip), the factory, and ref/base read from checkpoints."""

from __future__ import annotations

import io

import pytest
import torch

from taxfree.errors import TaxfreeError
from taxfree.models import tiny_llama
from taxfree.optim import OPTIMIZER_NAMES, OnDAREAdamW, OnTIESAdamW, build_optimizer
from test_optim import HP, clone, make_params, perturbed, set_grads


def roundtrip(state_dict):
    """Through bytes and back with weights_only=True: what a resumed run really loads."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    "cls,kw",
    [
        (OnDAREAdamW, dict(reserve_p=0.1, alpha=0.3, use_merge=True)),  # random masks, sparse tau
        (OnDAREAdamW, dict(reserve_p=0.5, alpha=0.3, use_merge=True, rescale=True, online_step=3)),
        (OnTIESAdamW, dict(reserve_p=0.2, alpha=0.3, use_merge=True, online_step=3)),
        (OnTIESAdamW, dict(reserve_p=1.0, alpha=0.1, use_merge=True, tau_dtype=torch.float64)),
    ],
)
def test_resume_gives_the_same_next_steps(cls, kw):
    params = make_params()
    ref = perturbed(params)
    first = clone(params)
    opt = cls(first.items(), **HP, **kw)
    opt.init_ref_param_diff(ref, params)
    for step in range(4):  # stops mid online_step cycle (4 % 3 == 1)
        set_grads(first, step)
        opt.step()
    saved_params = {n: p.detach().clone() for n, p in first.items()}
    saved = roundtrip(opt.state_dict())

    resumed = {n: torch.nn.Parameter(t.clone()) for n, t in saved_params.items()}
    opt2 = cls(resumed.items(), **HP, **kw)  # tau not built: it comes from the state dict
    opt2.load_state_dict(saved)
    for n in params:
        tau_a, tau_b = opt.tau_dense(first[n]), opt2.tau_dense(resumed[n])
        assert tau_a.dtype == tau_b.dtype == kw.get("tau_dtype", torch.float32)
        assert torch.equal(tau_a, tau_b)
    for step in range(4, 9):
        set_grads(first, step)
        set_grads(resumed, step)
        opt.step()
        opt2.step()
    for n in params:
        assert torch.equal(first[n], resumed[n]), n


def test_sparse_tau_costs_about_q_of_dense():
    q = 0.01
    params = make_params(shapes={"w": (500, 400)})
    ref = perturbed(params)
    opt = OnDAREAdamW(params.items(), reserve_p=q)
    opt.init_ref_param_diff(ref, params)
    state = opt.state[params["w"]]
    assert "tau" not in state
    assert state["tau_index"].dtype == torch.int32
    tau_bytes = sum(state[k].numel() * state[k].element_size() for k in ("tau_index", "tau_value"))
    dense_bytes = params["w"].numel() * 4
    assert tau_bytes < 3 * q * dense_bytes  # 8 bytes per kept entry vs 4 per entry


def test_lr_scheduler_drives_the_step():
    params = make_params()
    mine, theirs = clone(params), clone(params)
    opt = OnTIESAdamW(mine.items(), lr=1e-2)
    opt.init_ref_param_diff(params, params)
    adamw = torch.optim.AdamW(theirs.values(), lr=1e-2, weight_decay=0.0)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (opt, adamw)]
    for step in range(5):
        for ps, o, s in ((mine, opt, schedules[0]), (theirs, adamw, schedules[1])):
            set_grads(ps, step)
            o.step()
            s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 6)
    for n in params:
        assert torch.equal(mine[n], theirs[n])


# ----- factory ----------------------------------------------------------------------------------


def test_factory_names_and_errors():
    assert OPTIMIZER_NAMES == ("adamw", "ondare", "onties")
    model = tiny_llama(64, hidden_size=32)
    with pytest.raises(TaxfreeError, match="unknown optimizer 'adam'.*adamw, ondare, onties"):
        build_optimizer(model, "adam", lr=1e-3)
    with pytest.raises(TaxfreeError, match="reserve_p"):
        build_optimizer(model, "ondare", lr=1e-3, reserve_p=0.0, ref=model, base=model)
    with pytest.raises(TaxfreeError, match="alpha"):
        build_optimizer(model, "onties", lr=1e-3, alpha=2.0, ref=model, base=model)
    with pytest.raises(TaxfreeError, match="base not given"):
        build_optimizer(model, "onties", lr=1e-3, ref=model)
    with pytest.raises(TaxfreeError, match="does not exist"):
        build_optimizer(model, "ondare", lr=1e-3, ref="/nonexistent/ckpt", base=model)


def test_factory_only_trainable_parameters():
    model = tiny_llama(64, hidden_size=32)
    model.model.embed_tokens.weight.requires_grad_(False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adamw = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["param_names"] == trainable
    assert adamw.param_groups[0]["weight_decay"] == 0.1
    opt = build_optimizer(model, "ondare", lr=1e-3, ref=model, base=model, reserve_p=0.5)
    assert isinstance(opt, OnDAREAdamW)
    assert opt.param_groups[0]["param_names"] == trainable


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_factory_reads_ref_and_base_from_checkpoints(tmp_path, shard):
    base, ref, policy = (tiny_llama(64, hidden_size=32, seed=s) for s in (0, 1, 1))
    kwargs = {"max_shard_size": shard} if shard else {}
    ref.save_pretrained(tmp_path / "ref", **kwargs)
    base.save_pretrained(tmp_path / "base", **kwargs)
    if shard:
        assert (tmp_path / "ref" / "model.safetensors.index.json").is_file()
    from_disk = build_optimizer(
        policy, "onties", lr=1e-3, reserve_p=0.3, ref=tmp_path / "ref", base=str(tmp_path / "base")
    )
    in_memory = OnTIESAdamW(policy.named_parameters(), reserve_p=0.3)
    in_memory.init_ref_param_diff(ref.state_dict(), base)
    for name, p in policy.named_parameters():
        tau = from_disk.tau_dense(p)
        assert torch.equal(tau, in_memory.tau_dense(p))
        diff = ref.state_dict()[name] - base.state_dict()[name]
        assert int(torch.count_nonzero(tau)) == min(int(0.3 * p.numel()), int(torch.count_nonzero(diff)))


def test_wrapped_names_pair_with_plain_checkpoint_names():
    base, ref = tiny_llama(64, hidden_size=32, seed=0), tiny_llama(64, hidden_size=32, seed=1)
    wrapped = torch.nn.Module()
    wrapped.module = tiny_llama(64, hidden_size=32, seed=1)  # DDP-style "module." prefix
    opt = OnDAREAdamW(wrapped.named_parameters())
    opt.init_ref_param_diff(ref, base)
    p = wrapped.module.model.norm.weight
    expected = (ref.model.norm.weight - base.model.norm.weight).detach().clamp(-1, 1)
    torch.testing.assert_close(opt.tau_dense(p), expected)
