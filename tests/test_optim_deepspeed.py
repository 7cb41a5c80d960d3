"""The online merging optimizers under DeepSpeed ZeRO-1/2/3, 2 CPU processes on gloo.

One 2-process world per ZeRO stage runs every scenario (spawning and importing DeepSpeed is the
slow part): against a single-process run of the same optimizer, the ZeRO run must give the same
parameters (OnDARE with reserve_p 1, OnTIES also with reserve_p < 1: its top-k is exact across
ranks), tau must be each rank's partition of the unsharded tau, OnDARE with reserve_p < 1 must
keep the density and scaling invariants per original tensor, and a run resumed from a DeepSpeed
checkpoint must continue exactly as the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from taxfree.errors import TaxfreeError
from taxfree.optim import OnDAREAdamW, OnTIESAdamW
from taxfree.optim.sharded import FlatLayout, kth_largest, take_top_k_across_ranks

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
CLASSES = {"ondare": OnDAREAdamW, "onties": OnTIESAdamW}
LR = 1e-2


def make_model(seed: int) -> nn.Module:
    """2661 parameters: the ZeRO-1/2 partition boundary falls inside '2.weight', and ZeRO-3
    splits every tensor (the 5-entry bias as 3 + 2)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 36), nn.Tanh(), nn.Linear(36, 5))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch on both ranks: the averaged gradient is then the single process's."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 24, generator=g), torch.randn(8, 5, generator=g)


def ds_config(stage: int) -> dict:
    """configs/deepspeed/zero<stage>.json with the Trainer's "auto" values filled in."""
    config = json.loads((REPO / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    filled = {"train_batch_size": 8 * WORLD, "train_micro_batch_size_per_gpu": 8,
              "gradient_accumulation_steps": 1, "gradient_clipping": 0.0}
    for key, value in filled.items():
        assert config[key] == "auto", key
        config[key] = value
    config["bf16"] = {"enabled": False}
    config["fp16"] = {"enabled": False}
    config["zero_optimization"] = {k: v for k, v in config["zero_optimization"].items() if v != "auto"}
    assert config["zero_optimization"]["stage"] == stage
    return config


def single_process(name: str, kw: dict, steps: int, ref_seed: int = 1) -> tuple[dict, dict]:
    """(parameters, tau) of the plain one-process run (ref_seed 0: ref = base, tau = 0)."""
    base, ref, policy = make_model(0), make_model(ref_seed), make_model(1)
    opt = CLASSES[name](policy.named_parameters(), lr=LR, **kw)
    opt.init_ref_param_diff(ref, base)
    tau = {n: opt.tau_dense(p).clone() for n, p in policy.named_parameters()}
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(policy(x), y).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in policy.named_parameters()}, tau


# ----- inside the 2-process world ----------------------------------------------------------------


def _engine(stage: int, name: str, kw: dict, defer: bool | str | None, ref_seed: int = 1):
    """defer: False (tau built over whole tensors, cut into the partitions at the first step),
    True (built at the first step, piece by piece), "after" (init_ref_param_diff called once
    DeepSpeed holds the parameters), None (no tau source at all: it must come from a checkpoint)."""
    import deepspeed

    base, ref, policy = make_model(0), make_model(ref_seed), make_model(1)
    opt = CLASSES[name](policy.named_parameters(), lr=LR, **kw)
    if defer in (False, True):
        opt.init_ref_param_diff(ref, base, defer=defer)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=opt, config=ds_config(stage))
    if defer == "after":
        opt.init_ref_param_diff(ref.state_dict(), base.state_dict())
    return engine, opt


def _train(engine, start: int, stop: int) -> None:
    for step in range(start, stop):
        x, y = batch(step)
        engine.backward(nn.functional.mse_loss(engine(x), y))
        engine.step()


def _full_params(engine) -> dict[str, torch.Tensor]:
    """The fp32 master weights gathered from the partitions (a collective: every rank calls)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}


def _partitions(engine) -> list[torch.Tensor]:
    zero = engine.optimizer
    groups = getattr(zero, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    return list(groups) if groups is not None else list(zero.single_partition_of_fp32_groups)


def _tau_pieces(engine, opt) -> dict:
    """This rank's tau, cut back into (tensor name, offset in the tensor, values) pieces."""
    pieces, stored, partition = [], 0, 0
    for flat in _partitions(engine):
        layout: FlatLayout = opt._layouts[flat]
        tau = opt.tau_dense(flat)
        state = opt.state[flat]
        stored += sum(state[k].numel() for k in ("tau", "tau_value") if k in state)
        partition += flat.numel()
        for seg in layout.segments:
            values = tau[seg.start : seg.start + seg.numel].clone()
            pieces.append((layout.names[seg.tensor], seg.offset, values))
    return {"pieces": pieces, "stored": stored, "partition": partition}


def _scenarios(stage: int, tmp: str) -> dict:
    import deepspeed

    out = {}
    # exactness against the single-process run (OnTIES also with q < 1: exact top-k across ranks)
    exact = {
        "ondare": dict(reserve_p=1.0, alpha=0.2, use_merge=True, rescale=True, weight_decay=0.1),
        "onties": dict(reserve_p=0.3, alpha=0.2, use_merge=True, rescale=True, weight_decay=0.1),
    }
    for name, kw in exact.items():
        engine, opt = _engine(stage, name, kw, defer=True if name == "onties" else "after")
        _train(engine, 0, 4)
        out[f"exact/{name}"] = {"params": _full_params(engine), **_tau_pieces(engine, opt)}
    # OnTIES when |D| ties at the k-th largest across the ranks' pieces (Adam's first steps, eps 0)
    for sid, (kw, steps, ref_seed) in TIES.items():
        engine, _ = _engine(stage, "onties", kw, defer=True, ref_seed=ref_seed)
        _train(engine, 0, steps)
        out[f"ties/{sid}"] = _full_params(engine)
    # OnDARE q < 1: one step from the start, no merge: the applied update is dropout(D)
    for rescale in (False, True):
        engine, _ = _engine(stage, "ondare", dict(reserve_p=0.3, rescale=rescale), defer=False)
        _train(engine, 0, 1)
        out[f"dare/{rescale}"] = _full_params(engine)
    # resume from a DeepSpeed checkpoint: the next steps equal the uninterrupted run's
    resume = {
        "ondare": dict(reserve_p=0.3, alpha=0.2, use_merge=True, online_step=2),
        "onties": dict(reserve_p=0.3, alpha=0.2, use_merge=True, rescale=True, online_step=3),
    }
    for name, kw in resume.items():
        ckpt = os.path.join(tmp, f"ckpt-{name}")
        engine, opt = _engine(stage, name, kw, defer=False)
        _train(engine, 0, 4)  # onties stops mid online_step cycle (4 % 3 == 1)
        engine.save_checkpoint(ckpt, tag="step4")
        saved_tau = _tau_pieces(engine, opt)
        _train(engine, 4, 7)
        uninterrupted = _full_params(engine)
        engine, opt = _engine(stage, name, kw, defer=None)  # tau can only come from the checkpoint
        engine.load_checkpoint(ckpt, tag="step4")
        _train(engine, 4, 7)
        out[f"resume/{name}"] = {
            "uninterrupted": uninterrupted,
            "resumed": _full_params(engine),
            "saved_tau": saved_tau,
            "loaded_tau": _tau_pieces(engine, opt),
        }
    deepspeed.comm.barrier()
    return out


# Adam's first step with eps 0 has |D| = lr up to rounding everywhere, so the tie rule decides the
# kept entries: {id: (kwargs, steps, ref seed)}; ref seed 0 gives tau = 0, so that without merging
# the moved entries are exactly the kept ones.
TIES = {
    "first-step": (dict(reserve_p=0.5, eps=0.0), 1, 0),
    "merge": (dict(reserve_p=0.5, eps=0.0, alpha=0.2, use_merge=True, rescale=True, weight_decay=0.1), 3, 1),
}


def _worker(rank: int, stage: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed
    import deepspeed.ops

    # DeepSpeed would JIT-compile its shared-memory all-reduce for the CPU (minutes on 2 cores);
    # marking no op compatible makes it fall back to gloo's.
    deepspeed.ops.__compatible_ops__ = {}
    deepspeed.init_distributed(dist_backend="gloo")
    torch.save(_scenarios(stage, tmp), os.path.join(tmp, f"rank{rank}.pt"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda s: f"zero{s}")
def world(request, tmp_path_factory):
    """Both ranks' results of every scenario under one ZeRO stage."""
    pytest.importorskip("deepspeed")
    stage = request.param
    tmp = tmp_path_factory.mktemp(f"zero{stage}")
    mp.spawn(_worker, args=(stage, free_port(), str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return stage, ranks


def assemble(ranks_pieces: list[dict], shapes: dict) -> dict[str, torch.Tensor]:
    """Full tensors from every rank's pieces; each entry must be covered exactly once."""
    full = {n: torch.full((math.prod(s),), float("nan")) for n, s in shapes.items()}
    for pieces in ranks_pieces:
        for name, offset, values in pieces["pieces"]:
            target = full[name][offset : offset + values.numel()]
            assert torch.isnan(target).all(), (name, offset)
            target.copy_(values.float())
    return {n: t.view(shapes[n]) for n, t in full.items()}


# ----- the tests ---------------------------------------------------------------------------------


@pytest.mark.dist
@pytest.mark.parametrize("name", ["ondare", "onties"])
def test_zero_equals_single_process(world, name):
    """OnDARE q=1 with rescale (the L1 norms summed over ranks); OnTIES q=0.3 with rescale (the
    top-k threshold and L1 norms of split tensors found across ranks)."""
    stage, ranks = world
    kw = dict(reserve_p=1.0 if name == "ondare" else 0.3, alpha=0.2, use_merge=True, rescale=True,
              weight_decay=0.1)
    expected, expected_tau = single_process(name, kw, steps=4)
    start = make_model(1).state_dict()
    for rank in ranks:
        got = rank[f"exact/{name}"]["params"]
        for n, value in expected.items():
            assert not torch.equal(value, start[n])
            torch.testing.assert_close(got[n], value, rtol=1e-5, atol=1e-6, msg=f"{stage} {name} {n}")
    # tau lives in each rank's partition layout, and the pieces are the unsharded tau's
    shapes = {n: tuple(t.shape) for n, t in expected_tau.items()}
    results = [rank[f"exact/{name}"] for rank in ranks]
    total = sum(t.numel() for t in expected_tau.values())
    for result in results:
        assert result["partition"] < total
        assert result["stored"] <= result["partition"]
    tau = assemble(results, shapes)
    for n in expected_tau:
        assert torch.equal(tau[n], expected_tau[n].float()), (stage, name, n)


@pytest.mark.dist
@pytest.mark.parametrize("sid", list(TIES))
def test_zero_onties_keeps_exactly_k_with_ties_across_ranks(world, sid):
    """Ties at the k-th largest |D| are taken by lowest flat index in the whole tensor, whichever
    rank holds them: exactly k entries per tensor, the same as one process."""
    stage, ranks = world
    kw, steps, ref_seed = TIES[sid]
    expected, _ = single_process("onties", kw, steps, ref_seed)
    for rank in ranks:
        got = rank[f"ties/{sid}"]
        for n, value in expected.items():
            torch.testing.assert_close(got[n], value, rtol=1e-5, atol=1e-6, msg=f"{stage} {sid} {n}")
    if sid == "first-step":
        start = make_model(1).state_dict()
        for n, value in start.items():
            k = int(kw["reserve_p"] * value.numel())
            assert int((ranks[0][f"ties/{sid}"][n] != value).sum()) == k, (stage, n)


@pytest.mark.dist
@pytest.mark.parametrize("rescale", [False, True])
def test_zero_ondare_dropout_invariants_per_tensor(world, rescale):
    """docs/algorithms.md 1.5.3 per original tensor: about q of the entries get an update, each D/q;
    with rescale one factor per tensor (across its pieces on both ranks) restores |D|_1."""
    stage, ranks = world
    q = 0.3
    policy = make_model(1)
    adamw = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.0)
    x, y = batch(0)
    nn.functional.mse_loss(policy(x), y).backward()
    start = {n: p.detach().clone() for n, p in policy.named_parameters()}
    adamw.step()
    got = ranks[0][f"dare/{rescale}"]
    assert all(torch.equal(got[n], ranks[1][f"dare/{rescale}"][n]) for n in got)
    kept_total = n_total = 0
    for n, p in policy.named_parameters():
        d = p.detach() - start[n]
        applied = got[n] - start[n]
        nonzero = applied != 0
        kept, numel = int(nonzero.sum()), applied.numel()
        kept_total, n_total = kept_total + kept, n_total + numel
        assert abs(kept - q * numel) <= 5 * math.sqrt(numel * q * (1 - q)) + 1, (stage, n, kept)
        ratio = applied[nonzero] / (d[nonzero] / q)
        if rescale and kept:  # (a 5-entry bias may keep nothing: then nothing to rescale)
            torch.testing.assert_close(ratio, torch.full_like(ratio, ratio.mean().item()), rtol=1e-4, atol=0)
            torch.testing.assert_close(applied.abs().sum(), d.abs().sum(), rtol=1e-4, atol=0)
        else:
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=1e-4, atol=1e-6)
    assert abs(kept_total - q * n_total) <= 5 * math.sqrt(n_total * q * (1 - q))


@pytest.mark.dist
@pytest.mark.parametrize("name", ["ondare", "onties"])
def test_zero_checkpoint_resume_continues_exactly(world, name):
    stage, ranks = world
    for rank in ranks:
        result = rank[f"resume/{name}"]
        for n, value in result["uninterrupted"].items():
            assert torch.equal(result["resumed"][n], value), (stage, name, n)
        saved, loaded = result["saved_tau"], result["loaded_tau"]
        assert len(saved["pieces"]) == len(loaded["pieces"]) > 0
        for (n1, o1, v1), (n2, o2, v2) in zip(saved["pieces"], loaded["pieces"]):
            assert (n1, o1) == (n2, o2) and torch.equal(v1, v2)


# ----- a stage-like transformers Trainer under ZeRO-3 ------------------------------------------


TRAINER_MODEL = dict(hidden_size=32, num_layers=2, num_heads=2)
# eps 0.1: on the first steps AdamW's |D| ~ lr*|g|/(|g|+eps) must not be ties at rounding level, or
# top-k would pick between the rounding noise of the 2-rank and the 1-process gradient averages
TRAINER_OPT = dict(reserve_p=0.3, alpha=0.2, use_merge=True, rescale=True, eps=0.1)


def _trainer(out: str, policy, resume_dir: str | None = None):
    """What the sft/align stages do: build_optimizer from checkpoint paths, the Trainer, then
    hand_optimizer_to_trainer (the same code with and without DeepSpeed)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from taxfree.optim import build_optimizer
    from taxfree.optim.trainer import hand_optimizer_to_trainer

    ids = list(range(3, 19))  # every example the same: the batch is the same however it is split
    data = Dataset.from_list([{"input_ids": ids, "labels": ids}] * 16)
    args = TrainingArguments(
        output_dir=f"{out}/run", max_steps=4, per_device_train_batch_size=2, learning_rate=LR,
        lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="steps",
        save_steps=2, logging_steps=1, disable_tqdm=True, seed=0,
    )
    opt = build_optimizer(policy, "onties", lr=LR, ref=f"{out}/ref", base=f"{out}/base",
                          defer_tau=True, **TRAINER_OPT)
    trainer = Trainer(model=policy, args=args, train_dataset=data)
    hand_optimizer_to_trainer(trainer, opt)
    trainer.train(resume_from_checkpoint=resume_dir)
    return trainer, opt


def _trainer_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
        # what `accelerate launch --config_file configs/accelerate/zero3.yaml` sets
        ACCELERATE_USE_DEEPSPEED="true",
        ACCELERATE_DEEPSPEED_CONFIG_FILE=str(REPO / "configs" / "deepspeed" / "zero3.json"),
    )
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}  # no JIT build of the shm all-reduce (see _worker)
    from deepspeed.utils import safe_get_full_fp32_param

    from taxfree.models import tiny_llama

    result = {}
    for run, resume in (("uninterrupted", None), ("resumed", f"{out}/run/checkpoint-2")):
        trainer, opt = _trainer(out, tiny_llama(64, seed=1, **TRAINER_MODEL), resume)
        zero = trainer.model_wrapped.optimizer
        result[run] = {
            "params": {n: safe_get_full_fp32_param(p).detach().clone()
                       for n, p in trainer.model.named_parameters()},
            "ours": zero.optimizer is opt and type(zero).__name__ == "DeepSpeedZeroOptimizer_Stage3",
            "group_step": opt.param_groups[0]["group_step"],
            "partitions": len(opt._layouts),
        }
    torch.save(result, os.path.join(out, f"trainer{rank}.pt"))


@pytest.mark.dist
def test_trainer_under_zero3_runs_our_optimizer_and_resumes(tmp_path):
    pytest.importorskip("deepspeed")
    from taxfree.models import tiny_llama

    tiny_llama(64, seed=0, **TRAINER_MODEL).save_pretrained(tmp_path / "base")
    tiny_llama(64, seed=1, **TRAINER_MODEL).save_pretrained(tmp_path / "ref")
    mp.spawn(_trainer_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"trainer{r}.pt", weights_only=False) for r in range(WORLD)]
    for rank in ranks:
        for run in ("uninterrupted", "resumed"):
            assert rank[run]["ours"], run  # not the AdamW transformers builds under DeepSpeed
            assert rank[run]["partitions"] >= 1
        assert rank["uninterrupted"]["group_step"] == 4
        assert rank["resumed"]["group_step"] == 4  # restored at 2 from the checkpoint, then 2 more
        for n, value in rank["uninterrupted"]["params"].items():
            assert torch.equal(rank["resumed"]["params"][n], value), n
    # the same Trainer code without DeepSpeed, in this process: the same parameters
    policy = tiny_llama(64, seed=1, **TRAINER_MODEL)
    (tmp_path / "single").mkdir()
    for name in ("ref", "base"):
        (tmp_path / "single" / name).symlink_to(tmp_path / name)
    trainer, _ = _trainer(str(tmp_path / "single"), policy)
    start = tiny_llama(64, seed=1, **TRAINER_MODEL).state_dict()
    for n, p in trainer.model.named_parameters():
        assert not torch.equal(p.detach(), start[n])
        torch.testing.assert_close(ranks[0]["uninterrupted"]["params"][n], p.detach(), rtol=1e-5, atol=1e-6,
                                   msg=n)


# ----- single-process parts ------------------------------------------------------------------


def _one_rank_layout(numels: list[int]) -> FlatLayout:
    return FlatLayout(names=[f"t{i}" for i in range(len(numels))], numels=numels,
                      shapes=[(n,) for n in numels], shared=[True] * len(numels), segments=[],
                      process_group=None, rank=0, world=1, dtype=torch.float32,
                      device=torch.device("cpu"), seed_key=(0,))


def test_kth_largest_radix_select_is_exact(monkeypatch):
    """The byte-by-byte selection gives kthvalue's k-th largest, ties and zeros included (one
    rank: the all-reduce is the identity; the 2-rank case is the ZeRO tests' OnTIES run)."""
    import taxfree.optim.sharded as sharded

    calls = []
    monkeypatch.setattr(sharded, "_all_reduce", lambda tensor, group: calls.append(tensor.shape))
    g = torch.Generator().manual_seed(0)
    values = {
        0: torch.randn(5000, generator=g).abs(),
        1: torch.tensor([0.0, 3.0, 1.0, 3.0, 0.0, 2.0]),
        2: torch.zeros(7),
        3: (torch.randint(0, 4, (1000,), generator=g).float() * 0.25),  # heavy ties
        4: torch.rand(300, generator=g) * 1e-30,  # tiny (subnormal-range) magnitudes
    }
    for ks in ({0: 50, 1: 1, 2: 3, 3: 400, 4: 300}, {0: 5000, 1: 6, 2: 1, 3: 1, 4: 1}):
        got = kth_largest(_one_rank_layout([v.numel() for v in values.values()]), ks, values)
        for t, k in ks.items():
            v = values[t]
            assert got[t].item() == torch.kthvalue(v, v.numel() - k + 1).values.item(), (t, k)
    assert len(calls) == 8 and calls[0] == (5, 256)  # 4 rounds, one all-reduce each, all tensors at once
    assert kth_largest(_one_rank_layout([3]), {}, {}) == {}


def test_take_top_k_across_ranks_on_one_rank_is_take_top_k(monkeypatch):
    """With one rank (the all-reduce the identity) the cross-rank selection is the unsharded
    rule: exactly k, ties by lowest position; an offset does not change which ties a lone rank
    takes (no other rank's ties lie before it)."""
    import taxfree.optim.sharded as sharded
    from taxfree.optim.sparsify import take_top_k

    monkeypatch.setattr(sharded, "_all_reduce", lambda tensor, group: None)
    g = torch.Generator().manual_seed(0)
    values = {0: torch.randint(0, 4, (1000,), generator=g).float(), 1: torch.full((50,), 2.0),
              2: torch.randn(300, generator=g).abs()}
    ks = {0: 333, 1: 7, 2: 300}
    got = take_top_k_across_ranks(_one_rank_layout([1000, 50, 300]), ks, values, {0: 0, 1: 12, 2: 5})
    for t, k in ks.items():
        assert got[t].numel() == k
        assert torch.equal(got[t], take_top_k(values[t], k)), t


@pytest.mark.parametrize("cls,kw", [
    (OnDAREAdamW, dict(reserve_p=0.3, alpha=0.2, use_merge=True)),
    (OnTIESAdamW, dict(reserve_p=0.3, alpha=0.2, use_merge=True, rescale=True)),
])
def test_deferred_tau_equals_eager_without_deepspeed(cls, kw):
    """defer=True builds the same tau at the first step, so the run is bit for bit the same."""
    runs = []
    for defer in (False, True):
        base, ref, policy = make_model(0), make_model(1), make_model(1)
        opt = cls(policy.named_parameters(), lr=LR, **kw)
        opt.init_ref_param_diff(ref.state_dict(), base, defer=defer)
        assert all(not opt.state[p] for p in policy.parameters()) == defer
        for step in range(3):
            x, y = batch(step)
            opt.zero_grad()
            nn.functional.mse_loss(policy(x), y).backward()
            opt.step()
        runs.append({n: p.detach().clone() for n, p in policy.named_parameters()})
    for n in runs[0]:
        assert torch.equal(runs[0][n], runs[1][n]), n


def test_deferred_tau_reports_a_missing_tensor_at_the_first_step():
    base, ref, policy = make_model(0), make_model(1), make_model(1)
    opt = OnDAREAdamW(policy.named_parameters(), lr=LR)
    partial = {n: t for n, t in ref.state_dict().items() if n != "2.bias"}
    opt.init_ref_param_diff(partial, base, defer=True)
    x, y = batch(0)
    nn.functional.mse_loss(policy(x), y).backward()
    with pytest.raises(TaxfreeError, match="ref state dict has no tensor named '2.bias'"):
        opt.step()


def test_hand_optimizer_to_trainer():
    from types import SimpleNamespace

    from taxfree.optim.trainer import hand_optimizer_to_trainer

    opt = OnDAREAdamW(make_model(0).named_parameters())

    def trainer(deepspeed_config=None, fsdp_version=None):
        state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=deepspeed_config),
                                fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version))
        return SimpleNamespace(is_deepspeed_enabled=deepspeed_config is not None,
                               is_fsdp_enabled=fsdp_version is not None, optimizer_cls_and_kwargs=None,
                               accelerator=SimpleNamespace(state=state))

    for t in (trainer(), trainer({"zero_optimization": {"stage": 2}}), trainer(fsdp_version=2)):
        hand_optimizer_to_trainer(t, opt)
        factory, kwargs = t.optimizer_cls_and_kwargs
        assert factory()(make_model(1), **kwargs) is opt  # how Trainer.create_optimizer calls it
    untouched = trainer()
    hand_optimizer_to_trainer(untouched, None)  # adamw: the Trainer's own
    assert untouched.optimizer_cls_and_kwargs is None
    with pytest.raises(TaxfreeError, match='"optimizer" section \\(AdamW\\).*OnDAREAdamW'):
        hand_optimizer_to_trainer(trainer({"optimizer": {"type": "AdamW"}}), opt)
    # FSDP1: the factory binds the optimizer to the wrapped model it is handed; a model with no
    # FSDP1 unit over the optimizer's parameters is an error, not a silent whole-tensor step.
    fsdp1 = trainer(fsdp_version=1)
    hand_optimizer_to_trainer(fsdp1, opt)
    factory, kwargs = fsdp1.optimizer_cls_and_kwargs
    with pytest.raises(TaxfreeError, match="under FSDP1: none of its parameters is managed by an FSDP1 unit"):
        factory()(make_model(1), **kwargs)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_configs_leave_the_optimizer_to_us(stage):
    config = json.loads((REPO / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    assert "optimizer" not in config and "scheduler" not in config  # the Trainer's are used
    assert config["zero_allow_untested_optimizer"] is True
    assert config["gradient_clipping"] == "auto" and config["train_micro_batch_size_per_gpu"] == "auto"


def test_fsdp1_shard_pieces_without_binding_get_a_clear_error():
    """FSDP1 with use_orig_params and a sharding strategy exposes 1-D pieces (a 7x6 weight as 42
    entries on one rank): unbound, tau cannot be paired, and the error says to bind."""
    base, ref = make_model(0), make_model(1)
    piece = nn.Parameter(torch.zeros(42))
    opt = OnTIESAdamW([("_fsdp_wrapped_module.0.weight", piece)], lr=LR)
    with pytest.raises(TaxfreeError, match=r"'_fsdp_wrapped_module.0.weight': parameter shape \(42,\), "
                       r"ref \(40, 24\).*call optimizer.bind_fsdp1\(fsdp_model\) after wrapping"):
        opt.init_ref_param_diff(ref, base)


def test_a_zero3_partitioned_ref_model_is_refused_clearly():
    """ZeRO-3 leaves empty placeholders in the model (the data is in ds_tensor): tau cannot be
    read from it, and the error says what to pass instead."""
    base, ref, policy = make_model(0), make_model(1), make_model(1)
    ref[4].bias.data = torch.empty(0)
    ref[4].bias.ds_id = 5
    opt = OnDAREAdamW(policy.named_parameters(), lr=LR)
    with pytest.raises(TaxfreeError, match="ref model is partitioned by DeepSpeed ZeRO-3 "
                                           r"\('4.bias' is empty here\): pass its checkpoint path"):
        opt.init_ref_param_diff(ref, base)


# ----- accelerate's FSDP2 preparation (the Trainer path under configs/accelerate/fsdp.yaml) -----


def _fsdp2_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = {}
        for name, defer in (("ondare", False), ("onties", True)):
            base, ref, policy = make_model(0), make_model(1), make_model(1)
            opt = CLASSES[name](policy.named_parameters(), lr=LR, **FSDP2_KW)
            opt.init_ref_param_diff(ref, base, defer=defer)  # before sharding, as the Trainer does
            unsharded = dict(policy.named_parameters())
            for layer in (policy[0], policy[2], policy[4]):
                fully_shard(layer)
            fully_shard(policy)
            sharded = dict(policy.named_parameters())
            # what accelerate's prepare does next: the sharded tensors take the old ones' places
            fsdp2_switch_optimizer_parameters(opt, {p.data_ptr: sharded[n] for n, p in unsharded.items()})
            for step in range(4):
                x, y = batch(step)
                opt.zero_grad()
                nn.functional.mse_loss(policy(x), y).backward()
                opt.step()
            result[name] = {n: p.full_tensor().detach().clone() for n, p in policy.named_parameters()}
            result[name + "/tau_numel"] = sum(opt.tau_dense(p).numel() for p in policy.parameters())
        torch.save(result, os.path.join(out, f"fsdp{rank}.pt"))
    finally:
        dist.destroy_process_group()


FSDP2_KW = dict(reserve_p=1.0, alpha=0.2, use_merge=True, weight_decay=0.1)


@pytest.mark.dist
def test_fsdp2_as_accelerate_prepares_it_equals_single_process(tmp_path):
    """accelerate swaps the optimizer's tensors for sharded DTensors after the optimizer (and
    tau) exist: the optimizer adopts them, tau re-sharded, and the run is the unsharded one."""
    mp.spawn(_fsdp2_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"fsdp{r}.pt", weights_only=True) for r in range(WORLD)]
    total = sum(p.numel() for p in make_model(0).parameters())
    for name in CLASSES:
        expected, _ = single_process(name, FSDP2_KW, steps=4)
        assert ranks[0][name + "/tau_numel"] + ranks[1][name + "/tau_numel"] == total  # sharded
        for rank in ranks:
            for n, value in expected.items():
                torch.testing.assert_close(rank[name][n], value, rtol=1e-5, atol=1e-6, msg=f"{name} {n}")
