"""docs/extending.md as printed: a loss, an optimizer, a stage and a benchmark, each one module
(or file) that the registries pick up with no other edit.

Each example's code is copied from the doc into a scratch directory that a child process adds to
the package's search path (`taxfree.losses.__path__`, ...), so the package itself is never
written to; the stage example also takes the doc's STAGE_ORDER line.
"""

import copy
import importlib.util
import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_EXPERIMENT, write_config

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "extending.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"<!-- (file|order|config): ([^ ]+) -->\n```[a-z]*\n(.*?)```", re.S)
BLOCKS = {name: code for _, name, code in BLOCK.findall(DOC)}
ENV_KEYS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# The child process: put the scratch modules on the packages' paths, take the doc's stage order,
# then run the command line (argv) or a script (`-c CODE`).
BOOT = textwrap.dedent("""
    import json, os, runpy, sys
    scratch = os.environ["TAXFREE_SCRATCH"]
    import taxfree.losses, taxfree.optim, taxfree.stages
    for pkg in (taxfree.losses, taxfree.optim, taxfree.stages):
        pkg.__path__.append(os.path.join(scratch, pkg.__name__.split(".")[-1]))
    order = os.environ.get("TAXFREE_STAGE_ORDER")
    if order:
        import taxfree.pipeline.stages as st
        st.STAGE_ORDER[:] = json.loads(order)
    if sys.argv[1] == "-c":
        exec(sys.argv[2])
    else:
        from taxfree.cli import main
        sys.exit(main(sys.argv[1:]))
""")


def test_every_example_is_found():
    assert set(BLOCKS) == {"taxfree/losses/plackett_luce.py", "taxfree/optim/ondare_dense_tau.py",
                           "taxfree/stages/token_count.py", "STAGE_ORDER", "capitals.jsonl", "evaluate"}


def scratch_with(tmp_path: Path, *files: str) -> Path:
    scratch = tmp_path / "scratch"
    for name in files:
        sub = scratch / Path(name).parent.name
        sub.mkdir(parents=True, exist_ok=True)
        (sub / Path(name).name).write_text(BLOCKS[name], encoding="utf-8")
    return scratch


def child(scratch: Path, *args: str, order: list[str] | None = None, cwd: Path | None = None):
    import os

    env = dict(os.environ, **ENV_KEYS, TAXFREE_SCRATCH=str(scratch))
    if order is not None:
        env["TAXFREE_STAGE_ORDER"] = json.dumps(order)
    return subprocess.run([sys.executable, "-c", BOOT, *args], capture_output=True, text=True, env=env,
                          cwd=cwd or REPO, timeout=600)


def doc_module(tmp_path: Path, name: str):
    path = tmp_path / Path(name).name
    path.write_text(BLOCKS[name], encoding="utf-8")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- a loss ---------------------------------------------------------------------------------------

def test_loss_example_by_hand(tmp_path):
    from taxfree.losses import contrastive_loss

    loss = doc_module(tmp_path, "taxfree/losses/plackett_luce.py").plackett_luce_loss
    z = torch.tensor([[0.3, -0.2, 1.0]], dtype=torch.float64)
    r = torch.tensor([[0.0, 2.0, 1.0]], dtype=torch.float64)  # ranking: completion 1, then 2, then 0
    b = 0.5
    s1, s2, s0 = b * -0.2, b * 1.0, b * 0.3
    by_hand = -(s1 - math.log(math.exp(s1) + math.exp(s2) + math.exp(s0))) - (s2 - math.log(math.exp(s2) + math.exp(s0)))
    assert loss(z, r, pl_beta=b).item() == pytest.approx(by_hand, rel=1e-12)
    # Two completions: the Plackett-Luce likelihood is DPO's.
    z2, r2 = torch.tensor([[0.4, 1.5], [2.0, -1.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    assert torch.allclose(loss(z2, r2, pl_beta=b), contrastive_loss("dpo-pref", z2, r2, beta_pi=b))


def tiny_config(tmp_path: Path, name: str = "exp.yaml", **sections) -> Path:
    data = copy.deepcopy(TINY_EXPERIMENT)
    data["run_dir"] = str(tmp_path / "runs")
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return write_config(tmp_path, data, name=name)


def test_loss_example_is_a_method_of_the_config_the_help_and_the_trainer(tmp_path):
    scratch = scratch_with(tmp_path, "taxfree/losses/plackett_luce.py")
    help_text = child(scratch, "align", "--help")
    assert help_text.returncode == 0 and "plackett-luce" in help_text.stdout and "[pl_beta]" in help_text.stdout
    ok = child(scratch, "validate", str(tiny_config(tmp_path, align={"methods": ["plackett-luce"], "pl_beta": 0.5})))
    assert ok.returncode == 0, ok.stderr
    assert "sample" in ok.stdout  # it trains on samples: the sample stage joins the run
    bad = child(scratch, "validate", str(tiny_config(tmp_path, "bad.yaml", align={"methods": ["plackett-luce"], "pl_beta": 0})))
    assert bad.returncode == 2 and bad.stderr.strip().endswith("align.pl_beta: must be > 0"), bad.stderr
    # ContrastiveTrainer computes the declared loss with the declared setting.
    script = textwrap.dedent("""
        import json, datasets, torch, sys
        sys.path.insert(0, "tests")
        from helpers_tokenizer import char_tokenizer
        from taxfree.models import tiny_llama
        from taxfree.trainers import ContrastiveConfig, ContrastiveTrainer
        from plackett_luce import plackett_luce_loss
        tok = char_tokenizer()
        records = [{"prompt": "2+2=", "completions": ["4", "5", "22"], "rewards": [1.0, 0.0, -1.0]},
                   {"prompt": "hi ", "completions": ["hello", "x", "yo"], "rewards": [0.5, 1.0, 0.0]}]
        args = ContrastiveConfig(output_dir=sys.argv[3], loss_type="plackett-luce", loss_params={"pl_beta": 0.5},
                                 report_to="none", use_cpu=True, per_device_train_batch_size=2)
        trainer = ContrastiveTrainer(model=tiny_llama(len(tok), seed=0, hidden_size=32),
                                     ref_model=tiny_llama(len(tok), seed=1, hidden_size=32), args=args,
                                     train_dataset=datasets.Dataset.from_list(records), processing_class=tok)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        got = trainer.compute_loss(trainer.model, batch).item()
        z = trainer.completion_logratios(trainer.model, batch)
        print(json.dumps({"trainer": got, "direct": plackett_luce_loss(z, batch["rewards"], pl_beta=0.5).item(),
                          "at_default": plackett_luce_loss(z, batch["rewards"]).item()}))
    """)
    r = child(scratch, "-c", f"import sys; sys.path.insert(0, {str(scratch / 'losses')!r}); " + script.replace("sys.argv[3]", repr(str(tmp_path / "out"))))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["trainer"] == pytest.approx(got["direct"], rel=1e-6)
    assert got["trainer"] != pytest.approx(got["at_default"], rel=1e-3)  # pl_beta = 0.5 reached the loss


# -- an optimizer ---------------------------------------------------------------------------------

def test_optimizer_example_is_one_module(tmp_path):
    scratch = scratch_with(tmp_path, "taxfree/optim/ondare_dense_tau.py")
    help_text = child(scratch, "align", "--help")
    assert "ondare-dense-tau" in help_text.stdout
    ok = child(scratch, "validate", str(tiny_config(tmp_path, align={"optimizers": ["adamw", "ondare-dense-tau"]})))
    assert ok.returncode == 0, ok.stderr
    script = textwrap.dedent("""
        import json, torch
        from taxfree.models import tiny_llama
        from taxfree.optim import build_optimizer
        base, ref = tiny_llama(40, seed=0, hidden_size=16), tiny_llama(40, seed=1, hidden_size=16)
        policy, twin = tiny_llama(40, seed=1, hidden_size=16), tiny_llama(40, seed=1, hidden_size=16)
        lr, alpha = 1e-2, 0.3
        opt = build_optimizer(policy, "ondare-dense-tau", lr, ref=ref, base=base, reserve_p=1.0, alpha=alpha,
                              use_merge=True)
        adamw = torch.optim.AdamW(twin.parameters(), lr=lr, weight_decay=0.0)
        for model in (policy, twin):
            model(torch.arange(8).view(1, 8), labels=torch.arange(8).view(1, 8)).loss.backward()
        before = {n: p.detach().clone() for n, p in policy.named_parameters()}
        opt.step(); adamw.step()
        worst, dense = 0.0, True
        refs, bases = dict(ref.named_parameters()), dict(base.named_parameters())
        for (n, p), q in zip(policy.named_parameters(), twin.parameters()):
            tau = (refs[n] - bases[n]).detach().clamp(-1, 1)
            dense &= bool(torch.equal(opt.tau_dense(p), tau))
            d = q.detach() - before[n]  # AdamW's update D
            worst = max(worst, (p.detach() - (before[n] + d + alpha * tau - alpha * d)).abs().max().item())
        print(json.dumps({"worst": worst, "dense": dense}))
    """)
    r = child(scratch, "-c", script)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["dense"]  # tau keeps every entry of clamp(ref - base)
    assert got["worst"] < 1e-6  # p_new = p + D + alpha*tau - alpha*D, as OnDARE at reserve_p = 1


# -- a stage --------------------------------------------------------------------------------------

def doc_stage_order() -> list[str]:
    return json.loads(BLOCKS["STAGE_ORDER"].split("=", 1)[1].strip().replace("'", '"'))


def test_stage_example_is_one_module_and_one_entry(tmp_path):
    from taxfree.pipeline.stages import STAGE_ORDER

    order = doc_stage_order()
    assert [s for s in order if s != "token_count"] == STAGE_ORDER  # the doc's line is today's order plus one
    scratch = scratch_with(tmp_path, "taxfree/stages/token_count.py")
    path = tiny_config(tmp_path, token_count={"max_records": 20})
    listed = child(scratch, "--help", order=order)
    assert "token_count" in listed.stdout and "count the tokens of the SFT training data" in listed.stdout
    bad = child(scratch, "validate", str(tiny_config(tmp_path, "bad.yaml", token_count={"max_records": 0})), order=order)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("token_count.max_records: must be >= 1"), bad.stderr
    r = child(scratch, "run", str(path), "--stages", "world,token_count", order=order)
    assert r.returncode == 0, r.stderr
    root = tmp_path / "runs" / "t"
    result = json.loads((root / "token_count" / "tokens.json").read_text())
    manifest = json.loads((root / "token_count" / "stage.json").read_text())
    from taxfree.data.records import read_jsonl
    from taxfree.models.load import load_tokenizer

    tok = load_tokenizer(str(root / "world" / "data" / "tokenizer"))
    records = read_jsonl(root / "world" / "data" / "sft_train.jsonl", "sft")[:20]
    expected = sum(len(tok(m["content"], add_special_tokens=False)["input_ids"]) for rec in records for m in rec["messages"])
    assert result == {"records": 20, "tokens": expected} and manifest["metrics"]["tokens"] == expected
    assert manifest["config"] == {"token_count": {"max_records": 20}}
    again = child(scratch, "run", str(path), "--stages", "world,token_count", order=order)
    assert again.returncode == 0 and "token_count: up to date" in again.stderr


# -- a benchmark ----------------------------------------------------------------------------------

def test_benchmark_example_scores_like_the_model_by_hand(tmp_path):
    from taxfree.eval.lm_eval_runner import run_lm_eval
    from taxfree.eval.local_tasks import LocalTaskSpec, write_local_tasks
    from taxfree.models import tiny_llama
    from taxfree.pipeline.config import load_config
    from helpers_tokenizer import char_tokenizer

    (tmp_path / "capitals.jsonl").write_text(BLOCKS["capitals.jsonl"], encoding="utf-8")
    data = copy.deepcopy(TINY_EXPERIMENT)
    data.update(yaml.safe_load(BLOCKS["evaluate"]))
    path = write_config(tmp_path, data)
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)  # config paths are relative to where the command runs
    try:
        cfg = load_config(path)
        task = cfg.evaluate.local_tasks[0]
        include = write_local_tasks(tmp_path / "tasks", [LocalTaskSpec(task.name, task.kind, task.data)])
    finally:
        os.chdir(cwd)
    assert cfg.evaluate.benchmarks == ["capitals"]
    tok = char_tokenizer()
    model = tiny_llama(len(tok), seed=3, hidden_size=32).eval()
    got = run_lm_eval(model, tok, ["capitals"], include_path=include, batch_size=2)["capitals"]["acc"]

    def logprob(context, continuation):
        ctx, ids = tok(context)["input_ids"], tok(context + continuation)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        return sum(logp[t - 1, ids[t]].item() for t in range(len(ctx), len(ids)))

    items = [json.loads(line) for line in BLOCKS["capitals.jsonl"].splitlines()]
    hits = [max(range(3), key=lambda k: logprob(it["query"], " " + it["choices"][k])) == it["gold"] for it in items]
    assert got == pytest.approx(sum(hits) / len(items))
