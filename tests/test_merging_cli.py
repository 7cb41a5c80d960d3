"""`taxfree merge` command line: both forms, and every refusal with its message and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from taxfree.merging.cli import main
from taxfree.merging.layers import classify, count_layers, layer_index
from taxfree.errors import TaxfreeError
from tests.test_merging import make_model, save


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "a": save(make_model("llama", 0), root / "a"),
        "b": save(make_model("llama", 1), root / "b"),
        "tied": save(make_model("llama", 2, tied=True), root / "tied"),
        "vocab": save(make_model("llama", 3, vocab=40), root / "vocab"),
        "qwen": save(make_model("qwen2", 4), root / "qwen"),
        "bf16": save(make_model("llama", 5), root / "bf16", dtype=torch.bfloat16),
    }


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_two_model_cli_writes_the_weighted_average(models, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--sft", str(models["a"]), "--aligned", str(models["b"]), "--aligned-weight", "0.25",
               "--blocks", "1-:0.75", "--head-weight", "1", "--out", str(out), "--max-shard-size", "20KB"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["aligned_weight_by_layer"] == [0.25, 0.75] and summary["head_aligned_weight"] == 1.0
    ta, tb = {}, {}
    for d, t in ((models["a"], ta), (models["b"], tb)):
        for f in d.glob("*.safetensors"):
            t.update(load_file(f))
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    n0, n1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[n0], 0.75 * ta[n0] + 0.25 * tb[n0])
    torch.testing.assert_close(merged[n1], 0.25 * ta[n1] + 0.75 * tb[n1])
    assert torch.equal(merged["lm_head.weight"], tb["lm_head.weight"])  # head weight 1: the aligned head
    torch.testing.assert_close(merged["model.embed_tokens.weight"],
                               0.75 * ta["model.embed_tokens.weight"] + 0.25 * tb["model.embed_tokens.weight"])


def test_n_model_cli(models, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--model", f"{models['a']}:3", "--model", f"{models['b']}:1", "--normalize", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == [0.75, 0.25]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_mixed_dtypes_take_the_first_models_dtype(models, tmp_path):
    out = tmp_path / "out"
    assert main(["--model", f"{models['bf16']}:0.5", "--model", f"{models['a']}:0.5", "--out", str(out)]) == 0
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())


@pytest.mark.parametrize("case,argv,message", [
    ("names", ["--sft", "{a}", "--aligned", "{tied}", "--aligned-weight", "0.5"],
     "tensor 'lm_head.weight' is in sft ({a}) but not in aligned ({tied})"),
    ("shapes", ["--sft", "{a}", "--aligned", "{vocab}", "--aligned-weight", "0.5"],
     "tensor 'model.embed_tokens.weight' has shape [48, 32] in sft ({a}) but [40, 32] in aligned ({vocab})"),
    ("arch", ["--model", "{a}:0.5", "--model", "{qwen}:0.5"], "different architectures: {a} is llama, {qwen} is qwen2"),
    ("range", ["--sft", "{a}", "--aligned", "{b}", "--aligned-weight", "1.2"],
     "--aligned-weight = 1.2 is outside [0, 1] (pass --allow-extrapolation to allow it)"),
    ("block-range", ["--sft", "{a}", "--aligned", "{b}", "--aligned-weight", "0.5", "--blocks", "0:-0.1"],
     "--blocks 0-0 weight = -0.1 is outside [0, 1]"),
    ("sum", ["--model", "{a}:0.5", "--model", "{b}:0.6"], "model weights sum to 1.1, not 1"),
    ("model-range", ["--model", "{a}:1.5", "--model", "{b}:-0.5"], "weight of model 1 = 1.5 is outside [0, 1]"),
    ("same-dir", ["--model", "{a}:0.5", "--model", "{b}:0.5", "--out", "{a}"], "output directory {a} is one of the inputs"),
    ("missing", ["--sft", "{a}", "--aligned", "{a}/nope", "--aligned-weight", "0.5"], "{a}/nope: no such checkpoint directory"),
    ("forms", ["--sft", "{a}", "--model", "{b}:1"], "--sft cannot be combined with --model"),
    ("blocks-beyond", ["--sft", "{a}", "--aligned", "{b}", "--aligned-weight", "0.5", "--blocks", "5-:0.1"],
     "--blocks 5-: the model has layers 0-1 only"),
])
def test_refusals_name_the_problem_and_write_nothing(models, tmp_path, capsys, case, argv, message):
    fmt = {k: str(v) for k, v in models.items()}
    out = tmp_path / "out"
    rc = main([a.format(**fmt) for a in argv] + ([] if "--out" in argv else ["--out", str(out)]))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and message.format(**fmt) in err and err.count("\n") == 1
    assert not out.exists() and leftovers(tmp_path) == []


def test_existing_output_is_refused_then_replaced_with_force(models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = ["--model", f"{models['a']}:0.5", "--model", f"{models['b']}:0.5", "--out", str(out)]
    assert main(argv) == 2
    assert "output directory exists and is not empty" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    assert main(argv + ["--force"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert leftovers(tmp_path) == []


def test_unreadable_and_pickle_inputs(models, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((models["a"] / "config.json").read_text())
    (broken / "pytorch_model.bin").write_bytes(b"pickle")
    out = tmp_path / "out"
    assert main(["--model", f"{models['a']}:0.5", "--model", f"{broken}:0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no model.safetensors or model.safetensors.index.json (found pytorch_model.bin" in err
    (broken / "model.safetensors").write_bytes(b"\xff" * 4)
    assert main(["--model", f"{models['a']}:0.5", "--model", f"{broken}:0.5", "--out", str(out)]) == 2
    assert "not a safetensors file (too short)" in capsys.readouterr().err
    assert not out.exists()


def test_module_entry_point_exits_2_on_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "taxfree.merging.cli", "--model", f"{tmp_path}/x:1", "--model",
                           f"{tmp_path}/y:0", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path}/x: no such checkpoint directory"


@pytest.mark.parametrize("name,part", [
    ("model.layers.12.self_attn.q_proj.weight", ("layer", 12)),
    ("transformer.h.3.attn.c_attn.bias", ("layer", 3)),
    ("gpt_neox.layers.7.mlp.dense_h_to_4h.weight", ("layer", 7)),
    ("model.decoder.layers.5.fc1.weight", ("layer", 5)),
    ("transformer.blocks.0.ffn.up_proj.weight", ("layer", 0)),
    ("model.embed_tokens.weight", ("embed", None)),
    ("transformer.wte.weight", ("embed", None)),
    ("transformer.wpe.weight", ("embed", None)),
    ("gpt_neox.embed_in.weight", ("embed", None)),
    ("model.decoder.embed_positions.weight", ("embed", None)),
    ("transformer.word_embeddings_layernorm.weight", ("embed", None)),
    ("embed_out.weight", ("head", None)),
    ("lm_head.weight", ("head", None)),
    ("model.norm.weight", ("head", None)),
    ("transformer.ln_f.bias", ("head", None)),
    ("gpt_neox.final_layer_norm.weight", ("head", None)),
])
def test_classify_common_namings(name, part):
    assert tuple(classify(name)) == part


def test_count_layers_requires_contiguous_indices():
    assert count_layers(["model.layers.0.a", "model.layers.1.a", "lm_head.weight"]) == 2
    assert layer_index("lm_head.weight") is None
    with pytest.raises(TaxfreeError, match="decoder layer 1 has no tensors"):
        count_layers(["model.layers.0.a", "model.layers.2.a"])
