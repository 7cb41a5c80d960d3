"""The DPOTrainer example of docs/optimizers.md, run exactly as printed there."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "optimizers.md"


def example_code() -> str:
    """The python block that follows the `<!-- tested by tests/test_optim_trl.py -->` marker."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"<!-- tested by tests/test_optim_trl.py -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/optimizers.md lost its tested example"
    return match.group(1)


def test_dpo_trainer_example_runs_with_the_online_merging_optimizer():
    namespace: dict = {}
    exec(compile(example_code(), str(DOC), "exec"), namespace)
    trainer, optimizer = namespace["trainer"], namespace["optimizer"]
    policy, ref, base = namespace["policy"], namespace["ref"], namespace["base"]
    assert trainer.state.global_step == 4
    assert optimizer.param_groups[0]["group_step"] == 4  # our step() ran on every step
    assert any("loss" in entry for entry in trainer.state.log_history)
    # each step adds alpha * tau: the policy moved from ref along tau = ref - base
    moved = torch.cat([(p - r).detach().flatten() for p, r in zip(policy.parameters(), ref.parameters())])
    tau = torch.cat([optimizer.tau_dense(p).flatten() for p in policy.parameters()])
    assert moved.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(moved, tau, dim=0) > 0.1
    # the task vector was built from ref and base, at density reserve_p
    full = torch.cat([(r - b).detach().flatten() for r, b in zip(ref.parameters(), base.parameters())])
    assert abs((tau != 0).float().mean().item() - 0.1 * (full != 0).float().mean().item()) < 0.01
