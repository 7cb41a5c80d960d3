"""Config validation: one line naming file and key, nothing written."""

import subprocess
import sys

import pytest
import yaml

from taxfree.errors import ConfigError
from taxfree.pipeline.config import load_config
from conftest import REPO, TINY_EXPERIMENT, write_config


def _write(tmp_path, data):
    return write_config(tmp_path, data)


def test_demo_config_validates():
    cfg = load_config(REPO / "configs/experiments/demo.yaml")
    assert cfg.name == "demo"
    assert cfg.enabled_stages()[:3] == ["world", "pretrain", "sft"]
    assert cfg.sft.optimizer.name == "adamw"


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"sft": {"lrr": 1e-5}}, "sft.lrr: unknown key (did you mean lr?)"),
        ({"sft": {"optimizer": {"nmae": "adamw"}}}, "sft.optimizer.nmae: unknown key (did you mean name?)"),
        ({"sfft": {}}, "sfft: unknown key (did you mean sft?)"),
        ({"sft": {"epochs": "many"}}, "sft.epochs: expected a number, got 'many'"),
        ({"sft": {"batch_size": 2.5}}, "sft.batch_size: expected an integer, got 2.5"),
        ({"sft": {"completion_only_loss": "yes"}}, "sft.completion_only_loss: expected true or false"),
        ({"sft": {"optimizer": {"name": "ondaree"}}}, "sft.optimizer.name: 'ondaree' is not one of adamw, ondare, onties (did you mean ondare?)"),
        ({"sft": {"optimizer": {"name": "adamw", "reserve_p": 0.0}}}, "sft.optimizer.reserve_p: 0.0 is outside (0, 1]"),
        ({"sft": {"optimizer": {"alpha": 1.5}}}, "sft.optimizer.alpha: 1.5 is outside [0, 1]"),
        ({"sft": {"lr": -1}}, "sft.lr: must be > 0"),
        ({"data": {"sft_train": "/nonexistent/sft.jsonl"}}, "data.sft_train: file not found: /nonexistent/sft.jsonl"),
        ({"models": {"base": "./no/such/model"}}, "models.base: model directory not found: ./no/such/model"),
        ({"stages": ["world", "pretrian"]}, "stages: unknown stage 'pretrian' (did you mean pretrain?)"),
        ({"sft": {"optimizer": {"name": "ondare"}}}, "sft.optimizer.ref: ondare in sft needs optimizer.ref and optimizer.base"),
    ],
)
def test_bad_config_errors_name_file_and_key(tmp_path, data, expected):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ")
    assert expected in msg
    assert "\n" not in msg


def test_model_dir_without_config_json(tmp_path):
    (tmp_path / "m").mkdir()
    path = _write(tmp_path, {"models": {"base": str(tmp_path / "m")}})
    with pytest.raises(ConfigError, match=r"models.base: .* has no config.json"):
        load_config(path)


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nsft: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+: invalid YAML"):
        load_config(p)


def test_set_overrides_are_typed_and_validated(tmp_path):
    path = _write(tmp_path, dict(TINY_EXPERIMENT))
    cfg = load_config(path, ["sft.lr=3e-4", "sft.optimizer.betas=[0.8, 0.9]", "name=other"])
    assert cfg.sft.lr == pytest.approx(3e-4)
    assert cfg.sft.optimizer.betas == (0.8, 0.9)
    assert cfg.name == "other"
    with pytest.raises(ConfigError, match="sft.lrx: unknown key"):
        load_config(path, ["sft.lrx=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ["sft.lr"])


def test_cli_validate_error_is_one_line_exit_2_and_writes_nothing(tmp_path):
    data = dict(TINY_EXPERIMENT, run_dir=str(tmp_path / "runs"))
    data["sft"] = dict(data["sft"], lerning_rate=1)
    path = _write(tmp_path, data)
    for cmd in (["validate"], ["run"], ["sft"]):
        r = subprocess.run([sys.executable, "-m", "taxfree", *cmd, str(path)], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert lines == [f"error: {path}: sft.lerning_rate: unknown key"], r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_validate_ok(tmp_path):
    path = _write(tmp_path, dict(TINY_EXPERIMENT, run_dir=str(tmp_path / "runs")))
    r = subprocess.run([sys.executable, "-m", "taxfree", "validate", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "stages world, pretrain, sft" in r.stdout
    assert not (tmp_path / "runs").exists()


def test_cli_help_lists_every_stage_with_its_declared_help():
    from taxfree.pipeline.stages import all_stages

    r = subprocess.run([sys.executable, "-m", "taxfree", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # argparse wraps long help lines
    for word in ["validate", "run"]:
        assert word in r.stdout
    for declared in all_stages():
        if declared.name == "merge":  # also the standalone merge command, with that command's help
            assert "merge merge checkpoints" in text
            continue
        assert f"{declared.name} {declared.help}" in text, declared.name


def test_missing_config_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "taxfree", "run", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: file not found"
