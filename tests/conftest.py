import os
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models on a loaded 2-core machine: one thread per process is faster and steadier.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# A world and models small enough for seconds of CPU per stage.
TINY_EXPERIMENT = {
    "name": "t",
    "seed": 0,
    "world": {
        "kind": "tiny",
        "tiny": {"num_entities": 24, "corpus_repeats": 2, "sft_examples": 96, "pref_pairs": 96, "eval_prompts": 8,
                 "eval_items": 24, "vocab_size": 256, "max_operand": 9},
    },
    "pretrain": {
        "model": {"hidden_size": 32, "num_layers": 3, "num_heads": 2, "intermediate_size": 64},
        "epochs": 4, "lr": 5.0e-3, "batch_size": 16, "max_length": 32, "logging_steps": 5, "save_steps": 1000,
    },
    "sft": {"epochs": 2, "lr": 2.0e-3, "batch_size": 8, "max_length": 48, "logging_steps": 5, "save_steps": 1000},
}


def write_config(dirpath: Path, data: dict, name: str = "exp.yaml") -> Path:
    dirpath.mkdir(parents=True, exist_ok=True)
    p = dirpath / name
    p.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return p


@pytest.fixture
def tiny_experiment(tmp_path):
    """(config path, run root) of a tiny-world experiment writing under tmp_path."""
    import copy

    data = copy.deepcopy(TINY_EXPERIMENT)
    data["run_dir"] = str(tmp_path / "runs")
    return write_config(tmp_path, data), tmp_path / "runs" / "t"
