"""Security (issue 9): no pickles, no remote code unless asked (and then said once), no shell,
and no path from a config that writes outside the run directory."""

from __future__ import annotations

import ast
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_EXPERIMENT, write_config
from taxfree.errors import ConfigError, TaxfreeError
from taxfree.pipeline.config import load_config

PACKAGE = REPO / "taxfree"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# -- (a) a scan of the package source ----------------------------------------------------------

def _dotted(node) -> str:
    """`torch.load` for Attribute(Name(torch), load); '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_text(node) -> bool:
    """A string built in place (literal, f-string, concatenation, format): a shell command line."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp):
        return _is_text(node.left) or _is_text(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("format", "join"):
        return _is_text(node.func.value)
    return False


SUBPROCESS_CALLS = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call",
                    "subprocess.check_output"}
FORBIDDEN_CALLS = {
    "pickle.load": "pickle", "pickle.loads": "pickle", "pickle.Unpickler": "pickle",
    "dill.load": "pickle", "dill.loads": "pickle", "cloudpickle.load": "pickle", "cloudpickle.loads": "pickle",
    "os.system": "a shell", "os.popen": "a shell", "subprocess.getoutput": "a shell",
    "subprocess.getstatusoutput": "a shell", "yaml.load": "yaml.load (use yaml.safe_load)",
    "yaml.unsafe_load": "yaml.unsafe_load", "marshal.loads": "marshal",
}


def scan_source(source: str, filename: str = "<src>") -> list[str]:
    """Every unsafe call in `source`, as `file:line: why`."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "cloudpickle"):
            if any(a.name in ("load", "loads", "Unpickler") for a in node.names):
                found.append(f"{filename}:{node.lineno}: imports a pickle loader")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        where = f"{filename}:{node.lineno}"
        if name in FORBIDDEN_CALLS:
            found.append(f"{where}: {name} ({FORBIDDEN_CALLS[name]})")
        if name == "torch.load" and not _is_true(kwargs.get("weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        if name.endswith(("numpy.load", "np.load")) and _is_true(kwargs.get("allow_pickle")):
            found.append(f"{where}: numpy load with allow_pickle=True")
        if _is_true(kwargs.get("trust_remote_code")):
            found.append(f"{where}: trust_remote_code=True")
        if _is_true(kwargs.get("shell")):
            found.append(f"{where}: shell=True")
        if name in SUBPROCESS_CALLS and node.args and _is_text(node.args[0]):
            found.append(f"{where}: {name} with a command string (pass an argument list)")
    return found


def test_the_scan_finds_what_it_looks_for():
    bad = (
        "import torch, pickle, os, subprocess, yaml\n"
        "torch.load('x')\n"
        "torch.load('x', weights_only=False)\n"
        "pickle.loads(b'')\n"
        "from pickle import load\n"
        "os.system('ls')\n"
        "subprocess.run('ls -l', shell=True)\n"
        "subprocess.Popen(f'opencompass {cfg}')\n"
        "AutoModel.from_pretrained('m', trust_remote_code=True)\n"
        "yaml.load(text)\n"
    )
    lines = sorted(int(f.split(":")[1]) for f in scan_source(bad))
    assert lines == [2, 3, 4, 5, 6, 7, 7, 8, 9, 10]
    good = (
        "torch.load('x', map_location='cpu', weights_only=True)\n"
        "subprocess.run([exe, cfg], check=False)\n"
        "AutoModel.from_pretrained('m', trust_remote_code=cfg.models.trust_remote_code)\n"
        "yaml.safe_load(text)\n"
    )
    assert scan_source(good) == []


def test_package_source_has_no_pickles_remote_code_or_shell():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 40  # the whole package, not an empty glob
    found = []
    for f in files:
        found += scan_source(f.read_text(encoding="utf-8"), str(f.relative_to(REPO)))
    assert found == []


def test_no_trust_remote_code_true_anywhere_in_text():
    """Also outside calls (a dict of kwargs, a default): the literal appears nowhere."""
    hits = [str(f.relative_to(REPO)) for f in PACKAGE.rglob("*.py")
            if "trust_remote_code=True" in f.read_text(encoding="utf-8").replace(" ", "")
            or '"trust_remote_code":True' in f.read_text(encoding="utf-8").replace(" ", "")]
    assert hits == []


# -- (b) trust_remote_code: off by default, said once when on ------------------------------------

def test_trust_remote_code_is_off_by_default(tmp_path):
    cfg = load_config(write_config(tmp_path, dict(TINY_EXPERIMENT)))
    assert cfg.models.trust_remote_code is False
    from taxfree.models import load as load_mod
    import inspect

    for fn in (load_mod.load_tokenizer, load_mod.load_causal_lm, load_mod.check_tokenizer):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False


def test_trust_remote_code_warns_once_on_the_command_line(tmp_path):
    data = dict(copy.deepcopy(TINY_EXPERIMENT), run_dir=str(tmp_path / "runs"))
    path = write_config(tmp_path, data)
    r = subprocess.run([sys.executable, "-m", "taxfree", "validate", str(path)], capture_output=True, text=True,
                       env=ENV, cwd=REPO, timeout=120)
    assert r.returncode == 0 and "trust_remote_code" not in r.stderr, r.stderr
    data["models"] = {"trust_remote_code": True}
    path = write_config(tmp_path, data)
    r = subprocess.run([sys.executable, "-m", "taxfree", "validate", str(path)], capture_output=True, text=True,
                       env=ENV, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning: ")]
    assert warnings == [f"warning: {path}: models.trust_remote_code is true: Python code shipped with the models and "
                        "tokenizers will run on this machine; use it only with sources you trust"]


def test_trust_remote_code_warns_once_however_many_loads(tmp_path, capsys, monkeypatch):
    from helpers_tokenizer import char_tokenizer
    from taxfree.models import load as load_mod
    from taxfree.models import tiny_llama

    monkeypatch.setattr(load_mod, "_warned_remote_code", False)
    tok = char_tokenizer()
    tok.save_pretrained(tmp_path / "m")
    tiny_llama(len(tok), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32).save_pretrained(tmp_path / "m")
    capsys.readouterr()
    for _ in range(2):
        load_mod.load_tokenizer(str(tmp_path / "m"), trust_remote_code=True)
        load_mod.load_causal_lm(str(tmp_path / "m"), trust_remote_code=True)
    err = capsys.readouterr().err
    assert err.count("trust_remote_code") == 1 and err.startswith("warning: models.trust_remote_code is true")
    load_mod.load_tokenizer(str(tmp_path / "m"))
    assert "trust_remote_code" not in capsys.readouterr().err


# -- (c) config paths stay inside the run directory ------------------------------------------

@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../up", "/etc", "x/../../y"])
def test_experiment_name_cannot_leave_the_run_directory(tmp_path, name):
    path = write_config(tmp_path, dict(TINY_EXPERIMENT, name=name))
    with pytest.raises(ConfigError, match="name: must be a plain directory name"):
        load_config(path)


def test_experiment_name_with_a_nul_byte_is_a_config_error(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text('name: "a\\0b"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="name: must be a plain directory name"):
        load_config(path)


@pytest.mark.parametrize("mid", ["../../x", "/tmp/x", "align/../../x", "sft/x", "align", "notastage/x", "align/"])
def test_evaluate_model_ids_cannot_escape(tmp_path, mid):
    from taxfree.stages import evaluate

    cfg = load_config(write_config(tmp_path, dict(TINY_EXPERIMENT, stages=["evaluate"])))
    cfg.evaluate.models = [mid]
    with pytest.raises(TaxfreeError, match="is not a model id of a run"):
        evaluate.preflight(cfg)
    cfg.evaluate.models = ["sft", "align/dpo-adamw", "merge/dpo-adamw-w0.5", "ama/dpo-adamw"]
    evaluate.preflight(cfg)


def test_a_stage_writes_only_below_run_dir(tmp_path):
    """Every output of a run lands in run_dir/<name>/, whatever the working directory."""
    from taxfree.cli import main

    runs = tmp_path / "runs"
    work = tmp_path / "cwd"
    work.mkdir()
    path = write_config(tmp_path / "cfg", dict(copy.deepcopy(TINY_EXPERIMENT), run_dir=str(runs)))
    before = {p for p in tmp_path.rglob("*")}
    old = os.getcwd()
    os.chdir(work)
    try:
        assert main(["run", str(path), "--stages", "world"]) == 0
    finally:
        os.chdir(old)
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p == runs or runs / "t" in [p, *p.parents] for p in new), sorted(map(str, new))
    assert list(work.iterdir()) == []


# -- (d) subprocesses get argument lists -------------------------------------------------------

def test_opencompass_gets_an_argument_list_with_hostile_paths_intact(tmp_path, monkeypatch):
    from taxfree.eval import opencompass

    evil = tmp_path / "a; touch pwned $(id) `id`"
    evil.mkdir()
    config = evil / "config.py"
    config.write_text("# config\n")
    exe = evil / "opencompass"
    exe.write_text("#!/bin/sh\n")
    seen = {}

    class Stop(Exception):
        pass

    def fake_run(cmd, **kwargs):
        seen["cmd"], seen["kwargs"] = cmd, kwargs
        raise Stop

    monkeypatch.setattr(opencompass.subprocess, "run", fake_run)
    with pytest.raises(Stop):
        opencompass.run_opencompass(config, evil / "work", executable=exe, extra_args=("--debug",))
    assert isinstance(seen["cmd"], list) and all(isinstance(a, str) for a in seen["cmd"])
    assert seen["cmd"][:2] == [str(exe), str(config.resolve())]
    assert not seen["kwargs"].get("shell", False)
    assert not (tmp_path / "pwned").exists()
