"""Methods, optimizers and stages are declared once; config, checks, routing, help and the
Makefile read the declarations (docs/extending.md)."""

import ast
import copy
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_EXPERIMENT, write_config
from taxfree.errors import ConfigError, TaxfreeError
from taxfree.losses.methods import align_method, method_params, methods
from taxfree.optim.registry import all_hyperparameters, optimizer_spec, optimizers
from taxfree.pipeline.config import load_config
from taxfree.pipeline.stages import STAGE_ORDER, all_stages, model_stages

REPO = Path(__file__).resolve().parents[1]


def config(tmp_path, name="exp.yaml", **sections):
    data = copy.deepcopy(TINY_EXPERIMENT)
    data["run_dir"] = str(tmp_path / "runs")
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return load_config(write_config(tmp_path, data, name=name))


# -- methods ----------------------------------------------------------------------------------

def test_align_section_holds_every_methods_settings_with_their_declared_defaults(tmp_path):
    cfg = config(tmp_path)
    for name, p in method_params().items():
        assert getattr(cfg.align, name) == p.default, name
    fields = {f.name for f in dataclasses.fields(cfg.align)}
    assert set(method_params()) <= fields
    for m in methods().values():  # every setting a method reads is a key of the section
        assert {p.name for p in m.params} <= fields, m.name


@pytest.mark.parametrize("key, value, message", [
    ("beta_pi", 0, "align.beta_pi: must be > 0"),
    ("pref_eps", 0.5, "align.pref_eps: 0.5 is outside (0, 0.5)"),
    ("label_smoothing", -0.1, "align.label_smoothing: -0.1 is outside [0, 0.5)"),
])
def test_method_settings_are_checked_by_their_declared_range(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        config(tmp_path, align={key: value})


def test_a_variant_depends_on_its_own_methods_settings_only(tmp_path):
    from taxfree.stages.align import variant_config

    base = config(tmp_path, align={"methods": ["dpo", "exo-pref"]})
    other_beta_pi = config(tmp_path, "b.yaml", align={"methods": ["dpo", "exo-pref"], "beta_pi": 0.7})
    other_beta = config(tmp_path, "c.yaml", align={"methods": ["dpo", "exo-pref"], "beta": 0.3})
    dpo = variant_config(base, "dpo", "adamw")
    assert variant_config(other_beta_pi, "dpo", "adamw") == dpo  # beta_pi is exo-pref's, not dpo's
    assert variant_config(other_beta, "dpo", "adamw") != dpo
    assert variant_config(other_beta_pi, "exo-pref", "adamw") != variant_config(base, "exo-pref", "adamw")
    assert variant_config(other_beta, "exo-pref", "adamw") == variant_config(base, "exo-pref", "adamw")
    assert dpo["align"]["beta"] == 0.1 and "beta_pi" not in dpo["align"]
    # An optimizer's own hyperparameters only: adamw's variant has no merging settings.
    assert set(dpo["align"]["optimizer"]) == {"name", "weight_decay", "betas", "eps"}
    onties = variant_config(base, "dpo", "onties")["align"]["optimizer"]
    assert set(onties) == {"name", "ref", "base", *(p.name for p in optimizer_spec("onties").all_hyperparameters)}


def test_trl_methods_get_their_settings_under_trls_argument_names(tmp_path):
    from taxfree.stages.align import _args

    cfg = config(tmp_path, align={"methods": ["exo-pair", "dpo"], "pref_eps": 0.01, "beta": 0.2,
                                  "label_smoothing": 0.1})
    exo_pair = _args(cfg, "exo-pair", tmp_path / "v1")
    assert exo_pair.loss_type == ["exo_pair"] and exo_pair.label_smoothing == 0.01 and exo_pair.beta == 0.2
    dpo = _args(cfg, "dpo", tmp_path / "v2")
    assert dpo.loss_type == ["sigmoid"] and dpo.label_smoothing == 0.1
    exo_pref = _args(cfg, "exo-pref", tmp_path / "v3")
    assert exo_pref.loss_type == "exo-pref" and exo_pref.pref_eps == 0.01
    assert exo_pref.method_settings() == {"beta_pi": 0.1, "pref_eps": 0.01}


def test_methods_that_train_on_samples_bring_the_sample_stage(tmp_path):
    for name, m in methods().items():
        # AMA sampling the aligned models itself: only the method can need the sample stage.
        cfg = config(tmp_path, f"{name}.yaml", align={"methods": [name]}, ama={"collect_from": "aligned"})
        assert ("sample" in cfg.enabled_stages()) == m.needs_samples, name
    assert {n for n, m in methods().items() if m.needs_samples} == {"exo-rw", "dpo-rw"}
    # AMA's collected data come from the sample stage by default.
    assert "sample" in config(tmp_path, "x.yaml", align={"methods": ["dpo"]}).enabled_stages()


# -- optimizers -------------------------------------------------------------------------------

def test_every_optimizer_class_and_the_reference_take_every_declared_hyperparameter():
    from taxfree.optim.reference import ReferenceOnlineMergingAdamW

    reference = set(inspect.signature(ReferenceOnlineMergingAdamW).parameters)
    params = [torch.nn.Parameter(torch.zeros(3))]
    for spec in optimizers().values():
        if spec.cls is None:  # adamw: torch's own
            torch.optim.AdamW(params, lr=1e-3, **{p.name: p.value(p.default) for p in spec.all_hyperparameters})
            continue
        opt = spec.cls(params, lr=1e-3, **{p.name: p.value(p.default) for p in spec.all_hyperparameters})
        assert isinstance(opt, torch.optim.Optimizer)
        if spec.merging:  # the oracle the tests compare the fast optimizers with takes them too
            assert {p.name for p in spec.all_hyperparameters} <= reference, spec.name


def test_storage_and_election_knobs_are_settable_from_yaml_and_reach_the_optimizer(tmp_path):
    from taxfree.models import tiny_llama
    from taxfree.stages.common import build_stage_optimizer

    cfg = config(tmp_path, align={"optimizers": ["onties"], "optimizer": {
        "tau_dtype": "bfloat16", "sparse_tau": False, "weighted_election": True, "reserve_p": 0.5}})
    section = dataclasses.replace(cfg.align, optimizer=dataclasses.replace(cfg.align.optimizer, name="onties"))
    model, ref, base = (tiny_llama(40, seed=s, hidden_size=16) for s in (1, 1, 0))
    opt = build_stage_optimizer(model, section, ref=ref, base=base)
    assert opt.tau_dtype == torch.bfloat16 and opt.sparse_tau is False
    assert all(g["weighted_election"] is True and g["reserve_p"] == 0.5 for g in opt.param_groups)
    p = next(model.parameters())
    assert opt.tau_dense(p).dtype == torch.bfloat16


def test_optimizer_section_checks_and_factory_hints(tmp_path):
    with pytest.raises(ConfigError, match=r"align\.optimizer\.tau_dtype: 'float64' is not one of float32, bfloat16"):
        config(tmp_path, align={"optimizer": {"tau_dtype": "float64"}})
    from taxfree.models import tiny_llama
    from taxfree.optim import build_optimizer

    model = tiny_llama(40, hidden_size=16)
    with pytest.raises(TaxfreeError, match=r"unknown hyperparameter 'reserve' \(did you mean reserve_p\?\)"):
        build_optimizer(model, "ondare", 1e-3, ref=model, base=model, reserve=0.1)
    assert set(all_hyperparameters()) == {
        "weight_decay", "betas", "eps", "reserve_p", "alpha", "use_merge", "rescale", "online_step", "clip_tau",
        "tau_dtype", "sparse_tau", "weighted_election"}


# -- stages -----------------------------------------------------------------------------------

def test_every_stage_in_the_order_declares_itself_and_its_section(tmp_path):
    cfg = config(tmp_path)
    for declared in all_stages():
        if declared.config is not None:  # its section is a key of the experiment, with its defaults
            assert isinstance(getattr(cfg, declared.name), declared.config)
    assert [s.name for s in all_stages()] == STAGE_ORDER
    assert model_stages() == ["align", "merge", "ama"]


def test_the_makefile_has_a_target_per_stage_of_the_order():
    out = subprocess.run(["make", "-pn", "-f", str(REPO / "Makefile")], cwd=REPO, capture_output=True, text=True)
    line = next(l for l in out.stdout.splitlines() if l.startswith("STAGES :="))
    assert line.split(":=", 1)[1].split() == STAGE_ORDER


def test_the_pipeline_imports_no_stage():
    """pipeline/ reaches stages only by name through the stage registry, never by import."""
    for path in sorted((REPO / "taxfree" / "pipeline").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("taxfree.stages") for n in names), f"{path.name} imports {names}"
    code = "import sys, taxfree.pipeline.runner; print(sorted(m for m in sys.modules if m.startswith('taxfree.stages')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
