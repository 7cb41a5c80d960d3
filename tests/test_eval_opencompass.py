"""OpenCompass driver: config generation, parsing its real output layout, surfacing failures."""

import ast
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from taxfree.errors import TaxfreeError
from taxfree.eval.opencompass import (
    OpenCompassDataset,
    OpenCompassModel,
    collect_opencompass_results,
    parse_opencompass_summary,
    render_opencompass_config,
    run_opencompass,
    transformers4_view,
    write_opencompass_config,
)

FIXTURES = Path(__file__).parent / "fixtures" / "opencompass"


def model_dir(tmp_path, name="sft"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def test_config_imports_opencompass_datasets_and_lists_models(tmp_path):
    sft, aligned = model_dir(tmp_path, "sft"), model_dir(tmp_path, "aligned")
    text = render_opencompass_config(
        [OpenCompassModel("sft", str(sft)), OpenCompassModel("aligned_w0.5", str(aligned), kind="base", batch_size=4)],
        ["math401", OpenCompassDataset("opencompass.configs.datasets.gsm8k.gsm8k_gen", "gsm8k_datasets")],
        work_dir=tmp_path / "oc",
    )
    tree = ast.parse(text)
    with_block = next(n for n in tree.body if isinstance(n, ast.With))
    assert ast.unparse(with_block.items[0].context_expr) == "read_base()"
    imports = {(n.module, n.names[0].name) for n in with_block.body}
    assert imports == {
        ("opencompass.configs.datasets.math401.math401_gen", "math401_datasets"),
        ("opencompass.configs.datasets.gsm8k.gsm8k_gen", "gsm8k_datasets"),
    }
    assigns = {n.targets[0].id: n.value for n in tree.body if isinstance(n, ast.Assign)}
    assert ast.unparse(assigns["datasets"]) == "[*math401_datasets, *gsm8k_datasets]"
    entries = [{k.arg: k.value for k in call.keywords} for call in assigns["models"].elts]
    assert [ast.unparse(e["type"]) for e in entries] == ["HuggingFacewithChatTemplate", "HuggingFaceBaseModel"]
    assert [ast.literal_eval(e["abbr"]) for e in entries] == ["sft", "aligned_w0.5"]
    assert ast.literal_eval(entries[0]["path"]) == str(sft.resolve())
    assert ast.literal_eval(entries[1]["batch_size"]) == 4
    assert ast.literal_eval(assigns["work_dir"]) == str((tmp_path / "oc").resolve())
    path = write_opencompass_config(tmp_path / "cfg.py", [OpenCompassModel("sft", str(sft))], ["ds1000"])
    assert "ds1000_gen_cbc84f import ds1000_datasets" in path.read_text()


def test_config_refuses_bad_input(tmp_path):
    sft = model_dir(tmp_path)
    with pytest.raises(TaxfreeError, match="opencompass dataset 'math23k' is not known"):
        render_opencompass_config([OpenCompassModel("sft", str(sft))], ["math23k"])
    with pytest.raises(TaxfreeError, match="abbrs must be unique"):
        render_opencompass_config([OpenCompassModel("a", str(sft)), OpenCompassModel("a", str(sft))], ["math401"])
    with pytest.raises(TaxfreeError, match="no such model directory"):
        render_opencompass_config([OpenCompassModel("a", str(tmp_path / "missing"))], ["math401"])
    with pytest.raises(TaxfreeError, match="abbr 'a b'"):
        render_opencompass_config([OpenCompassModel("a b", str(sft))], ["math401"])
    with pytest.raises(TaxfreeError, match="not a module path"):
        render_opencompass_config([OpenCompassModel("a", str(sft))], [OpenCompassDataset("os; import x", "y")])


def test_parse_recorded_summary():
    rows = parse_opencompass_summary(FIXTURES / "success_run/20261121_054059/summary/summary_20261121_054059.csv")
    assert [(r.dataset, r.version, r.metric, r.mode, r.scores) for r in rows] == [
        ("math401", "ab5f39", "accuracy", "gen", {"tiny": 0.0})
    ]
    assert collect_opencompass_results(FIXTURES / "multi_model_run/20250601_093012") == {
        "sft": {"math401": {"accuracy": 41.15}, "ds1000_Pandas": {"accuracy": 12.03}, "ds1000_Numpy": {"accuracy": 20.45}},
        "aligned_w0.5": {"math401": {"accuracy": 43.89}, "ds1000_Pandas": {"accuracy": 11.68}, "ds1000_Numpy": {"accuracy": 21.36}},
    }


def test_a_dash_is_an_error_naming_the_failing_log():
    run = FIXTURES / "failed_run/20261121_053839"
    rows = parse_opencompass_summary(run / "summary/summary_20261121_053839.csv")
    assert rows[0].scores == {"tiny": None}
    with pytest.raises(TaxfreeError, match=r"no score for math401 on tiny; see .*logs/infer/tiny/math401\.out$"):
        collect_opencompass_results(run)


def test_malformed_summary_is_refused(tmp_path):
    (tmp_path / "s.csv").write_text("name,score\nx,1\n")
    with pytest.raises(TaxfreeError, match="not an OpenCompass summary"):
        parse_opencompass_summary(tmp_path / "s.csv")
    (tmp_path / "t.csv").write_text("dataset,version,metric,mode,m\nx,v,acc,gen,high\n")
    with pytest.raises(TaxfreeError, match="'high' for m is not a number"):
        parse_opencompass_summary(tmp_path / "t.csv")


FAKE_OPENCOMPASS = """#!{python}
# Stands in for `opencompass CONFIG --work-dir DIR ...`: records its argv, copies a recorded run.
import json, os, shutil, sys
argv = sys.argv[1:]
work = argv[argv.index("--work-dir") + 1]
with open(os.path.join(work, "argv.json"), "w") as f:
    json.dump(argv, f)
print("fake opencompass: starting")
src = os.environ.get("FAKE_OC_RUN")
if src:
    shutil.copytree(src, os.path.join(work, os.path.basename(src)))
sys.exit(int(os.environ.get("FAKE_OC_RC", "0")))
"""


@pytest.fixture
def fake_opencompass(tmp_path, monkeypatch):
    exe = tmp_path / "venv dir" / "bin" / "opencompass"
    exe.parent.mkdir(parents=True)
    exe.write_text(FAKE_OPENCOMPASS.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    config = tmp_path / "my config.py"
    config.write_text("# config\n")

    def run(run_fixture=None, rc=0):
        monkeypatch.setenv("FAKE_OC_RC", str(rc))
        if run_fixture is None:
            monkeypatch.delenv("FAKE_OC_RUN", raising=False)
        else:
            monkeypatch.setenv("FAKE_OC_RUN", str(FIXTURES / run_fixture))
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        return run_opencompass(config, work, executable=exe, data_dir=tmp_path / "data"), work

    run.config = config
    return run


def test_run_parses_results_and_passes_an_argument_list(fake_opencompass, tmp_path):
    results, work = fake_opencompass("success_run/20261121_054059")
    assert results == {"tiny": {"math401": {"accuracy": 0.0}}}
    argv = json.loads((work / "argv.json").read_text())
    assert argv[:3] == [str(fake_opencompass.config.resolve()), "--work-dir", str(work.resolve())]  # spaces intact
    assert "fake opencompass: starting" in (work / "opencompass_driver.log").read_text()


def test_run_failure_names_the_driver_log(fake_opencompass):
    with pytest.raises(TaxfreeError, match=r"opencompass failed \(exit 3\); see .*opencompass_driver\.log"):
        fake_opencompass(rc=3)


def test_run_with_failed_task_names_the_task_log(fake_opencompass):
    with pytest.raises(TaxfreeError, match=r"no score for math401 on tiny; see .*20261121_053839/logs/infer/tiny/math401\.out"):
        fake_opencompass("failed_run/20261121_053839")


def test_run_without_output_names_the_driver_log(fake_opencompass):
    with pytest.raises(TaxfreeError, match=r"no run directory under .*; see .*opencompass_driver\.log"):
        fake_opencompass()


def test_missing_environment_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TAXFREE_OPENCOMPASS_VENV", str(tmp_path / "nowhere"))
    (tmp_path / "c.py").write_text("")
    with pytest.raises(TaxfreeError, match="make opencompass-env"):
        run_opencompass(tmp_path / "c.py", tmp_path / "work")


def test_transformers4_view_keeps_rope_base_and_tokenizer_loadable(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "model_type": "llama", "dtype": "bfloat16",
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
    }))
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend", "eos_token": "</s>"}))
    (src / "model.safetensors").write_bytes(b"weights")
    view = transformers4_view(src, tmp_path / "view")
    cfg = json.loads((view / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert cfg["torch_dtype"] == "bfloat16"
    tok = json.loads((view / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast" and tok["model_input_names"] == ["input_ids", "attention_mask"]
    assert (view / "model.safetensors").is_symlink() and (view / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((src / "config.json").read_text()).get("rope_theta") is None  # source untouched


def _opencompass_venv():
    return Path(os.environ.get("TAXFREE_OPENCOMPASS_VENV", Path(__file__).parent.parent / ".opencompass-venv"))


@pytest.mark.slow
@pytest.mark.skipif(not (_opencompass_venv() / "bin" / "opencompass").is_file(), reason="no OpenCompass env (make opencompass-env)")
def test_real_opencompass_on_a_tiny_model(tmp_path):
    """About a minute on CPU: the real OpenCompass reads our config and we read its summary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from taxfree.models import tiny_llama

    words = "<unk> <pad> </s> <s> Q: A: Calculate The answer is 1 2 3 4 5 6 7 8 9 0".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tiny_llama(len(words), seed=0, pad_token_id=1, eos_token_id=2, bos_token_id=3).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    view = transformers4_view(tmp_path / "model", tmp_path / "view")
    data = tmp_path / "cache" / "data" / "math401"
    data.mkdir(parents=True)
    (data / "cloze_en.jsonl").write_text('{"question": "1+2", "answer": "3"}\n{"question": "2*3", "answer": "6"}\n')
    cfg = write_opencompass_config(
        tmp_path / "cfg.py",
        [OpenCompassModel("tiny", str(view), max_out_len=8, max_seq_len=128, batch_size=2, num_gpus=0)],
        ["math401"],
    )
    results = run_opencompass(cfg, tmp_path / "work", executable=_opencompass_venv() / "bin" / "opencompass",
                              data_dir=tmp_path / "cache", timeout_s=600)
    assert set(results) == {"tiny"} and 0.0 <= results["tiny"]["math401"]["accuracy"] <= 100.0
