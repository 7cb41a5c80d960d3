"""Launch configs (configs/accelerate/*.yaml), the launch scripts (scripts/*.sh) and MPI discovery.

The accelerate configs are read by accelerate's own launcher code (the same path `accelerate
launch --config_file` takes) and turned into the FSDP / DeepSpeed plugin objects the Trainer gets,
so a misspelt key or a setting accelerate reads differently fails here, without GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from taxfree.distributed import accelerate_env, discover_mpi, launched_by_mpi
from taxfree.errors import TaxfreeError

ACCEL = REPO / "configs" / "accelerate"
SCRIPTS = REPO / "scripts"
NAMES = ["single_gpu", "ddp", "fsdp", "fsdp1", "zero2", "zero3", "multinode_zero3"]


def _plugin_env(name: str) -> dict:
    env = accelerate_env(str(ACCEL / f"{name}.yaml"))
    assert env.get("ACCELERATE_MIXED_PRECISION", "no") == "no", "precision belongs to the experiment config"
    return env


def test_every_launch_config_is_there_and_documented():
    assert {p.stem for p in ACCEL.glob("*.yaml")} == set(NAMES)
    readme = (ACCEL / "README.md").read_text(encoding="utf-8")
    for name in NAMES:
        assert f"{name}.yaml" in readme


@pytest.mark.parametrize("name", NAMES)
def test_accelerate_reads_the_config(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ACCEL / f"{name}.yaml"))  # unknown keys raise here
    expected = {"single_gpu": "NO", "ddp": "MULTI_GPU", "fsdp": "FSDP", "fsdp1": "FSDP"}.get(name, "DEEPSPEED")
    assert cfg.distributed_type.value == expected
    assert cfg.num_processes == (1 if name == "single_gpu" else 16 if name == "multinode_zero3" else 8)
    assert cfg.mixed_precision in (None, "no")


def test_fsdp2_config_is_full_shard_wrapped_by_layer():
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment

    with patch_environment(**_plugin_env("fsdp")):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FULL_SHARD
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.transformer_cls_names_to_wrap is None  # -> the model's _no_split_modules
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.activation_checkpointing is False
    assert type(plugin.cpu_offload).__name__ == "OffloadPolicy"  # not CPUOffloadPolicy: no offloading


def test_fsdp1_config_keeps_original_parameters():
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment

    env = _plugin_env("fsdp1")
    assert env["FSDP_SYNC_MODULE_STATES"] == "true"
    env["FSDP_SYNC_MODULE_STATES"] = "false"  # broadcasting needs a GPU to build the plugin here
    with patch_environment(**env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1
    assert plugin.sharding_strategy.name == "FULL_SHARD"
    assert plugin.use_orig_params is True  # the online merging optimizers pair parameters by name
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3), ("multinode_zero3", 3)])
def test_deepspeed_configs_point_at_the_json_files(name, stage):
    from accelerate.utils import DeepSpeedPlugin, patch_environment

    env = _plugin_env(name)
    ds_file = Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
    assert ds_file == REPO / "configs" / "deepspeed" / f"zero{stage}.json" and ds_file.is_file()
    with patch_environment(**env):
        plugin = DeepSpeedPlugin()  # raises if a setting is given both here and in the JSON
    assert plugin.zero_stage == stage
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == stage
    assert plugin.zero3_init_flag is (stage == 3)


def test_multinode_config_launches_deepspeed_over_the_hostfile():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    cfg = load_config_from_file(str(ACCEL / "multinode_zero3.yaml"))
    assert cfg.num_machines == 2 and cfg.deepspeed_config["deepspeed_hostfile"]
    assert cfg.deepspeed_config["deepspeed_multinode_launcher"] == "pdsh"
    args = launch_command_parser().parse_args(["--config_file", str(ACCEL / "multinode_zero3.yaml"), "-m", "taxfree",
                                               "align", "exp.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    cmd, _ = prepare_deepspeed_cmd_env(args)
    assert cmd[:3] == ["deepspeed", "--hostfile", "configs/accelerate/hostfile"]
    assert cmd[cmd.index("--num_gpus") + 1] == "8"
    assert cmd[-4:] == ["--module", "taxfree", "align", "exp.yaml"]
    assert "slots=" in (ACCEL / "hostfile.example").read_text(encoding="utf-8")


def test_accelerate_env_errors_are_one_line(tmp_path):
    with pytest.raises(TaxfreeError, match="accelerate config not found"):
        accelerate_env(str(tmp_path / "missing.yaml"))


# -- scripts --------------------------------------------------------------------------------

def _sh(args, env=None, cwd=REPO):
    full = dict(os.environ, **(env or {}))
    return subprocess.run(["bash", *map(str, args)], cwd=cwd, env=full, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("stage", ["sft", "rm", "align", "ama"])
def test_train_scripts_wrap_accelerate_launch(stage, tmp_path):
    script = SCRIPTS / f"train_{stage}.sh"
    assert os.access(script, os.X_OK)
    config = tmp_path / "exp.yaml"
    config.write_text("name: x\n", encoding="utf-8")
    out = _sh([script, config, "configs/accelerate/zero2.yaml", "--set", "align.lr=5e-7", "--force"],
              env={"DRY_RUN": "1"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    assert words[0].endswith("accelerate") and words[1] == "launch"
    assert words[2:4] == ["--config_file", str(ACCEL / "zero2.yaml")]
    assert words[4:] == ["-m", "taxfree", stage, str(config), "--set", "align.lr=5e-7", "--force"]
    # Default launch config, extra accelerate flags from the environment.
    out = _sh([script, config], env={"DRY_RUN": "1", "ACCELERATE_ARGS": "--num_processes 4"}, cwd=tmp_path)
    words = out.stdout.split()
    assert words[2:6] == ["--config_file", str(ACCEL / "single_gpu.yaml"), "--num_processes", "4"]


@pytest.mark.parametrize("args, message", [
    ([], "usage: "),
    (["--force"], "usage: "),
    (["missing.yaml"], "error: missing.yaml: experiment config not found"),
    (["configs/experiments/demo.yaml", "configs/accelerate/nope.yaml"], "error: configs/accelerate/nope.yaml: accelerate config not found"),
])
def test_train_script_bad_arguments_exit_2(args, message):
    out = _sh([SCRIPTS / "train_align.sh", *args])
    assert out.returncode == 2 and message in out.stderr and out.stdout == ""


def test_launch_script_refuses_unknown_stage():
    out = _sh([SCRIPTS / "launch.sh", "algin", "configs/experiments/demo.yaml"])
    assert out.returncode == 2 and "error: unknown stage 'algin'" in out.stderr


def _dry_run_commands(script: str, env=None) -> list[list[str]]:
    out = _sh([SCRIPTS / script], env={"DRY_RUN": "1", **(env or {})})
    assert out.returncode == 0, out.stderr
    return [line[2:].split() for line in out.stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script, presets", [
    ("reproduce_online_merging.sh", {"online_merging_qwen1.5_1.8b": "ddp", "online_merging_qwen1.5_7b": "fsdp",
                                     "online_merging_llama3_8b": "fsdp"}),
    ("reproduce_ama.sh", {"ama_openllama_3b_hh": "zero2"}),
    ("reproduce_exo.sh", {"exo_tldr_pythia_2.8b": "zero2", "exo_hh_pythia_2.8b": "zero2", "exo_imdb_gpt2_large": "ddp"}),
])
def test_reproduce_scripts_run_every_stage_of_every_preset(script, presets):
    import yaml

    cmds = [c for c in _dry_run_commands(script, {"ALLOW_CODE_EXECUTION": "1"}) if "download_data.sh" not in c[0]]
    for name, accel in presets.items():
        config = f"configs/experiments/{name}.yaml"
        mine = [c for c in cmds if config in c]
        stages = yaml.safe_load((REPO / config).read_text(encoding="utf-8"))["stages"]
        assert mine[0][-3:] == ["taxfree", "validate", config]
        ran = []
        for c in mine[1:]:
            if c[0] == "scripts/launch.sh":
                stage, launch = c[1], c[3]
                assert stage in ("sft", "rm", "align", "ama")
                assert launch == ("configs/accelerate/single_gpu.yaml" if stage == "ama" else f"configs/accelerate/{accel}.yaml")
            else:
                assert c[-4:-2] == ["run", config] and c[-2] == "--stages"
                stage = c[-1]
                assert stage not in ("sft", "rm", "align", "ama")
            ran.append(stage)
        assert ran == stages, name  # every stage, in the preset's order


def test_reproduce_scripts_take_a_subset_and_refuse_bad_input():
    cmds = _dry_run_commands("reproduce_exo.sh", {"PRESETS": "exo_hh_pythia_2.8b"})
    assert cmds and all("exo_hh_pythia_2.8b.yaml" in " ".join(c) or "download_data.sh" in c[0] for c in cmds)
    out = _sh([SCRIPTS / "reproduce_exo.sh"], env={"DRY_RUN": "1", "PRESETS": "exo_nope"})
    assert out.returncode == 2 and "error: PRESETS: 'exo_nope' is not a preset of this paper" in out.stderr
    out = _sh([SCRIPTS / "reproduce_ama.sh", "stray"], env={"DRY_RUN": "1"})
    assert out.returncode == 2 and "error: unexpected argument 'stray'" in out.stderr
    env = {k: v for k, v in os.environ.items() if k != "ALLOW_CODE_EXECUTION"}
    out = subprocess.run(["bash", str(SCRIPTS / "reproduce_online_merging.sh")], cwd=REPO, env={**env, "DRY_RUN": "1"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "ALLOW_CODE_EXECUTION=1" in out.stderr and out.stdout == ""


def test_reproduce_passes_overrides_to_validate_and_options_to_stages():
    out = _sh([SCRIPTS / "reproduce_ama.sh", "--set", "align.lr=5e-7", "--force"], env={"DRY_RUN": "1"})
    assert out.returncode == 0, out.stderr
    cmds = [line[2:].split() for line in out.stdout.splitlines() if line.startswith("+ ")]
    validate = next(c for c in cmds if "validate" in c)
    assert validate[-2:] == ["--set", "align.lr=5e-7"]  # validate takes no --force
    for c in cmds:
        if "validate" not in c and "download_data.sh" not in c[0]:
            assert c[-3:] == ["--set", "align.lr=5e-7", "--force"], c


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_targets_call_the_reproduce_scripts():
    for target, script in (("reproduce-online-merging", "reproduce_online_merging.sh"),
                           ("reproduce-ama", "reproduce_ama.sh"), ("reproduce-exo", "reproduce_exo.sh")):
        out = subprocess.run(["make", "-n", target, "ARGS=--force"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"scripts/{script} --force" in out.stdout


# -- MPI discovery ----------------------------------------------------------------------------

def test_mpi_discovery_is_a_no_op_outside_mpi():
    env = {"PATH": "/usr/bin"}
    assert launched_by_mpi(env) is False and discover_mpi(environ=env) is None and env == {"PATH": "/usr/bin"}
    assert launched_by_mpi({"PMI_SIZE": "1"}) is False
    assert launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "4"}) is True
    # torchrun / accelerate / DeepSpeed's launcher set the variables already: leave them alone.
    assert launched_by_mpi({"PMI_SIZE": "2", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) is False


def _mpiexec() -> str | None:
    venv = Path(sys.executable).parent / "mpiexec"
    return str(venv) if venv.is_file() else shutil.which("mpiexec")


@pytest.mark.dist
@pytest.mark.skipif(_mpiexec() is None, reason="no MPI launcher (mpiexec)")
def test_mpi_discovery_gives_each_rank_its_place(tmp_path):
    pytest.importorskip("mpi4py")
    code = ("import json, os, sys; from taxfree.distributed import discover_mpi; v = discover_mpi(); "
            "open(os.path.join(sys.argv[1], v['RANK'] + '.json'), 'w').write(json.dumps(dict(v, env_rank=os.environ['RANK'])))")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", code, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    for r, v in enumerate(ranks):
        assert v["RANK"] == v["env_rank"] == str(r) and v["WORLD_SIZE"] == "2"
        assert v["LOCAL_RANK"] == str(r) and v["LOCAL_WORLD_SIZE"] == "2"  # both on this host
    assert ranks[0]["MASTER_ADDR"] == ranks[1]["MASTER_ADDR"] == "127.0.0.1"
    assert ranks[0]["MASTER_PORT"] == ranks[1]["MASTER_PORT"] == "29500"


def test_launch_mpi_script_dry_run_and_errors(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost:2\n", encoding="utf-8")
    out = _sh([SCRIPTS / "launch_mpi.sh", hostfile, "x", "sft", "configs/experiments/demo.yaml"])
    assert out.returncode == 2 and "NUM_PROCESSES must be a positive integer" in out.stderr
    out = _sh([SCRIPTS / "launch_mpi.sh", hostfile, "2"])
    assert out.returncode == 2 and out.stderr.startswith("usage: ")
    if _mpiexec() is None:
        pytest.skip("no MPI launcher (mpiexec)")
    pytest.importorskip("mpi4py")
    out = _sh([SCRIPTS / "launch_mpi.sh", hostfile, "16", "align", "configs/experiments/demo.yaml",
               "configs/accelerate/zero3.yaml", "--force"],
              env={"DRY_RUN": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    assert "-n" in words and words[words.index("-n") + 1] == "16" and str(hostfile) in words
    assert "ACCELERATE_USE_DEEPSPEED=true" in words and "ACCELERATE_DEEPSPEED_ZERO3_INIT=true" in words
    assert f"ACCELERATE_DEEPSPEED_CONFIG_FILE={REPO}/configs/deepspeed/zero3.json" in words
    assert words[-5:] == ["-m", "taxfree", "align", str(REPO / "configs/experiments/demo.yaml"), "--force"]
