"""`python -m taxfree.data.cli` and scripts/download_data.sh as a user runs them (no network)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from taxfree.data.cli import add_data_subcommands, run_data
from taxfree.data.converters import download
from taxfree.data.records import read_jsonl
from taxfree.errors import TaxfreeError

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ROOT / "tests" / "fixtures" / "upstream"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "taxfree.data.cli", *map(str, args)],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=60,
    )


def assert_one_error_line(proc, expected_substring):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert expected_substring in lines[0]
    assert "Traceback" not in proc.stderr


def test_convert_then_validate_round_trip(tmp_path):
    out = tmp_path / "hh"
    proc = cli("convert", "hh_rlhf", f"train={UPSTREAM / 'hh_rlhf' / 'train.jsonl.gz'}",
               f"test={UPSTREAM / 'hh_rlhf' / 'test.jsonl.gz'}", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"hh_rlhf: 6 upstream rows -> {out}",
        "  kto_train.jsonl               6",
        "  pref_train.jsonl              3",
        "  rw_train.jsonl                3",
        "  sft_train.jsonl               3",
        "  kto_test.jsonl                2",
        "  pref_test.jsonl               1",
        "  rw_test.jsonl                 1",
        "  sft_test.jsonl                1",
        "  skipped 1: chosen and rejected replies are identical",
        "  skipped 1: empty final reply",
    ]
    for kind in ("pref", "sft", "kto", "rw"):
        proc = cli("validate", kind, out / f"{kind}_train.jsonl")
        assert proc.returncode == 0, proc.stderr
        n = {"pref": 3, "sft": 3, "kto": 6, "rw": 3}[kind]
        assert proc.stdout == f"{out / f'{kind}_train.jsonl'}: {n} {kind} records ok\n"


def test_validate_names_the_first_bad_line(tmp_path):
    path = tmp_path / "rw.jsonl"
    path.write_text(
        '{"prompt": "Q", "completions": ["a", "b"], "rewards": [1, 0]}\n'
        '{"prompt": "Q", "completions": ["a", "b"], "rewards": [1, Infinity]}\n'
    )
    assert_one_error_line(cli("validate", "rw", path), f"{path}:2: 'rewards[1]' is not finite (inf)")


def test_validate_wrong_kind_for_file_exits_2(tmp_path):
    path = tmp_path / "pref.jsonl"
    path.write_text('{"prompt": "Q", "chosen": "a", "rejected": "b"}\n')
    assert_one_error_line(cli("validate", "kto", path), f"{path}:1: kto record is missing 'completion'")
    assert_one_error_line(cli("validate", "prefs", path), "unknown record kind 'prefs'")


def test_convert_bad_input_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "x"}\n{"chosen": 1}\n')
    assert_one_error_line(cli("convert", "hh_rlhf", bad, tmp_path / "out"), f"{bad}:2: hh_rlhf: 'chosen' must be str")
    assert not (tmp_path / "out").exists()
    assert_one_error_line(
        cli("convert", "imdb", f"train={UPSTREAM / 'imdb' / 'train.jsonl'}", UPSTREAM / "imdb" / "train.jsonl",
            tmp_path / "out"),
        "give every input a split (train=PATH, test=PATH) or none of them",
    )
    assert_one_error_line(cli("convert", "imdb", tmp_path / "missing.jsonl", tmp_path / "out"), "missing.jsonl: no such file")


def test_download_script_usage_and_unknown_name_exit_2():
    script = ROOT / "scripts" / "download_data.sh"
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=ENV, timeout=60)
    assert usage.returncode == 2
    assert usage.stderr.startswith("usage: ")
    unknown = subprocess.run(["bash", str(script), "hh"], capture_output=True, text=True, env=ENV, timeout=60)
    assert_one_error_line(unknown, "unknown data source 'hh' (choose from hh_rlhf, ultrafeedback_binarized, imdb, tldr, sharegpt, chitchat)")


def test_add_data_subcommands_plugs_into_a_parent_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="taxfree")
    data = parser.add_subparsers(dest="command").add_parser("data")
    add_data_subcommands(data.add_subparsers(dest="data_command"))
    args = parser.parse_args(["data", "convert", "imdb", str(UPSTREAM / "imdb" / "train.jsonl"), str(tmp_path / "i"),
                              "--test-fraction", "0", "--seed", "3"])
    assert (args.command, args.data_command, args.source) == ("data", "convert", "imdb")
    assert run_data(args) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "  prompt_train.jsonl            2",
        "  sft_train.jsonl               2",
        "  text_train.jsonl              2",
        "  skipped 1: review shorter than 9 words",
    ]
    summary = json.loads((tmp_path / "i" / "conversion.json").read_text())
    assert (summary["test_fraction"], summary["seed"]) == (0.0, 3)


def test_download_maps_hub_splits_without_network(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    upstream = [json.loads(line) for line in (UPSTREAM / "tldr" / "batch3.json").read_text().splitlines()]
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(upstream[:2] if split.startswith("train") else upstream[2:])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = download("tldr", tmp_path / "tldr", limit=10)
    assert calls == [
        ("openai/summarize_from_feedback", "comparisons", "train[:10]"),
        ("openai/summarize_from_feedback", "comparisons", "validation[:10]"),
    ]
    assert result.counts() == {"kto_train.jsonl": 4, "pref_train.jsonl": 2, "rw_train.jsonl": 2, "sft_train.jsonl": 2}
    assert dict(result.skipped) == {"not a Reddit post (CNN/DM article)": 1,
                                    "chosen and rejected summaries are identical": 1}
    assert read_jsonl(tmp_path / "tldr" / "pref_train.jsonl", kind="pref")[1]["chosen"] == (
        " Roommate ignores my requests to wash dishes.")
    summary = json.loads((tmp_path / "tldr" / "conversion.json").read_text())
    assert summary["hub_id"] == "openai/summarize_from_feedback" and summary["limit"] == 10


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nsecond line of detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TaxfreeError) as err:
        download("imdb", tmp_path / "imdb")
    assert str(err.value) == "stanfordnlp/imdb [train]: download failed: Couldn't reach the Hub"
    assert not (tmp_path / "imdb").exists()
