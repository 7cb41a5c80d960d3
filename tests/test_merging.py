"""Streaming merges against plain torch arithmetic, on several architectures' tensor naming."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from taxfree.errors import TaxfreeError
from taxfree.merging import checkpoint as ckpt
from taxfree.merging.checkpoint import Checkpoint, InMemoryCheckpoint, ShardedWriter, TensorInfo, parse_size
from taxfree.merging.merge import merge_checkpoints, write_merged
from taxfree.merging.plan import PartwiseWeights, parse_blocks
from taxfree.models import tiny_llama

VOCAB = 48


def make_model(arch: str, seed: int, tied: bool = False, vocab: int = VOCAB, layers: int = 2):
    torch.manual_seed(seed)
    if arch == "llama":
        return tiny_llama(vocab, seed=seed, hidden_size=32, num_layers=layers, num_heads=2, tie_word_embeddings=tied)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                            num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64,
                                            tie_word_embeddings=tied))
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=2, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
    if arch == "neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers,
                                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                                tie_word_embeddings=tied))
    raise ValueError(arch)


def save(model, path: Path, shard: str | None = "12KB", dtype=torch.float32) -> Path:
    model.to(dtype).save_pretrained(path, max_shard_size=shard or "1GB")
    return path


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir with the safetensors library (the reference reader)."""
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


# Embedding / head tensor names as each architecture's checkpoint stores them (by hand).
PARTS = {
    "llama": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "qwen2": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "gpt2": ({"transformer.wte.weight", "transformer.wpe.weight"}, {"transformer.ln_f.weight", "transformer.ln_f.bias"}),
    "neox": ({"gpt_neox.embed_in.weight"}, {"gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias",
                                            "embed_out.weight"}),
}
LAYER_PREFIX = {"llama": "model.layers.", "qwen2": "model.layers.", "gpt2": "transformer.h.", "neox": "gpt_neox.layers."}


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False), ("gpt2", True), ("neox", False)])
def test_partwise_merge_equals_torch_arithmetic(tmp_path, arch, tied):
    sft = save(make_model(arch, 0, tied, layers=3), tmp_path / "sft")
    aligned = save(make_model(arch, 1, tied, layers=3), tmp_path / "aligned")
    assert len(list(sft.glob("*.safetensors"))) > 2  # the inputs really are sharded
    partwise = PartwiseWeights(aligned_weight=0.5, blocks=tuple(parse_blocks("0:0.25,2-:0.875")),
                               embed_weight=0.125, head_weight=0.625)
    summary = merge_checkpoints([sft, aligned], tmp_path / "out", partwise=partwise, max_shard_size="10KB")
    assert summary["aligned_weight_by_layer"] == [0.25, 0.5, 0.875]
    assert summary["shards"] > 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()

    a, b, out = load_dir(sft), load_dir(aligned), load_dir(tmp_path / "out")
    assert set(out) == set(a)
    embed, head = PARTS[arch]
    layer_weight = {f"{LAYER_PREFIX[arch]}{i}.": w for i, w in enumerate([0.25, 0.5, 0.875])}
    for name, x in out.items():
        if name in embed or (tied and name == "lm_head.weight"):
            w = 0.125
        elif name in head:
            w = 0.625
        else:
            (w,) = [w for prefix, w in layer_weight.items() if name.startswith(prefix)]
        expected = (1 - w) * a[name] + w * b[name]
        torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-7, msg=name)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    state = model.state_dict()
    for name, x in out.items():  # loaded names may be renamed (neox embed_out -> lm_head); compare by value set
        assert any(torch.equal(x, y) for y in state.values()), name
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (tmp_path / "out" / "generation_config.json").is_file()
    assert json.loads((tmp_path / "out" / "merge.json").read_text())["embed_aligned_weight"] == 0.125


def test_linear_merge_of_three_bf16_models_normalized(tmp_path):
    dirs = [save(make_model("llama", s), tmp_path / f"m{s}", shard=None, dtype=torch.bfloat16) for s in range(3)]
    assert (dirs[0] / "model.safetensors").is_file()  # unsharded input
    summary = merge_checkpoints(dirs, tmp_path / "out", weights=[1, 2, 1], normalize=True)
    assert summary["weights"] == [0.25, 0.5, 0.25]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()  # one shard: no index, as HF does
    ins = [load_dir(d) for d in dirs]
    out = load_dir(tmp_path / "out")
    for name, x in out.items():
        assert x.dtype == torch.bfloat16
        expected = (0.25 * ins[0][name].float() + 0.5 * ins[1][name].float() + 0.25 * ins[2][name].float())
        # float32 arithmetic then one rounding to bf16: at most one bf16 ulp away
        torch.testing.assert_close(x.float(), expected.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6, msg=name)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16


def test_extrapolation_when_allowed(tmp_path):
    a, b = save(make_model("qwen2", 0), tmp_path / "a"), save(make_model("qwen2", 1), tmp_path / "b")
    merge_checkpoints([a, b], tmp_path / "out", partwise=PartwiseWeights(aligned_weight=1.5), allow_extrapolation=True)
    ta, tb, out = load_dir(a), load_dir(b), load_dir(tmp_path / "out")
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(out[name], -0.5 * ta[name] + 1.5 * tb[name])


def test_chunked_streaming_reads_bounded_slices_and_matches_one_shot(tmp_path, monkeypatch):
    a, b = save(make_model("llama", 0), tmp_path / "a"), save(make_model("llama", 1), tmp_path / "b")
    merge_checkpoints([a, b], tmp_path / "whole", weights=[0.3, 0.7])
    largest = max(t.numel() for t in load_dir(a).values())
    reads = []
    original = Checkpoint.read_flat

    def recording(self, name, start, stop, out=None):
        reads.append(stop - start)
        return original(self, name, start, stop, out)

    monkeypatch.setattr(Checkpoint, "read_flat", recording)
    merge_checkpoints([a, b], tmp_path / "chunked", weights=[0.3, 0.7], chunk_bytes=4 * 100)
    assert max(reads) == 100 < largest  # never a whole large tensor, only 100-element slices
    whole, chunked = load_dir(tmp_path / "whole"), load_dir(tmp_path / "chunked")
    assert all(torch.equal(whole[n], chunked[n]) for n in whole)


def test_writer_shards_by_size_and_safetensors_reads_them(tmp_path):
    tensors = {f"t{i}": torch.arange(i * 100, dtype=torch.float32).reshape(i, 100) for i in range(1, 6)}
    tensors["empty"] = torch.zeros(0, 3)
    tensors["ints"] = torch.arange(7, dtype=torch.int64)
    infos = [TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with ShardedWriter(tmp_path, infos, max_shard_size=1000) as writer:
        for name, t in tensors.items():
            flat = t.reshape(-1)
            for start in range(0, flat.numel(), 37):  # uneven slices
                writer.append(name, flat[start:start + 37])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    # t1=400 B, t2=800 B: they cannot share a 1000 B shard; t5=2000 B exceeds it and gets its own.
    assert index["weight_map"]["t1"] != index["weight_map"]["t2"]
    loaded = load_dir(tmp_path)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_writer_refuses_out_of_order_or_incomplete_tensors(tmp_path):
    infos = [TensorInfo("a", torch.float32, (4,)), TensorInfo("b", torch.float32, (2,))]
    writer = ShardedWriter(tmp_path, infos)
    with pytest.raises(RuntimeError, match="expected a"):
        writer.append("b", torch.zeros(2))
    writer.append("a", torch.zeros(4))
    with pytest.raises(RuntimeError, match="before tensor b"):
        writer.close()


def test_reader_reads_slices_and_rejects_corrupt_files(tmp_path):
    t = torch.randn(5, 7).to(torch.bfloat16)
    (tmp_path / "config.json").write_text("{}")
    save_file({"x": t, "y": torch.ones(3)}, tmp_path / "model.safetensors")
    with Checkpoint(tmp_path) as c:
        assert c.tensors["x"].shape == (5, 7) and c.tensors["x"].dtype == torch.bfloat16
        assert torch.equal(c.read_flat("x", 3, 20), t.reshape(-1)[3:20])
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(TaxfreeError, match="header is not JSON"):
        Checkpoint(tmp_path)


def test_integer_tensors_are_copied_when_equal_and_refused_when_not(tmp_path):
    a = InMemoryCheckpoint({"w": torch.ones(3), "pos": torch.arange(4)})
    b = InMemoryCheckpoint({"w": torch.zeros(3), "pos": torch.arange(4)})
    write_merged([a, b], {"w": (0.25, 0.75), "pos": (0.25, 0.75)}, tmp_path)
    out = load_dir(tmp_path)
    assert torch.equal(out["pos"], torch.arange(4)) and torch.allclose(out["w"], torch.full((3,), 0.25))
    c = InMemoryCheckpoint({"w": torch.zeros(3), "pos": torch.arange(4) + 1})
    with pytest.raises(TaxfreeError, match="non-float tensor 'pos' differs"):
        write_merged([a, c], {"w": (0.5, 0.5), "pos": (0.5, 0.5)}, tmp_path / "x")


def test_parse_size_and_blocks():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("200KiB") == 204800 and parse_size(123) == 123
    with pytest.raises(TaxfreeError, match="cannot read size"):
        parse_size("lots")
    blocks = parse_blocks("0-10:0.4, 11-20:0.3,21-:0.2,22:1")
    assert [(b.first, b.last, b.aligned_weight) for b in blocks] == [(0, 10, 0.4), (11, 20, 0.3), (21, None, 0.2), (22, 22, 1.0)]
    pw = PartwiseWeights(blocks=tuple(parse_blocks("0-1:0.4,2-:0.2")), embed_weight=0.1, head_weight=0.9)
    assert pw.layer_weights(4) == [0.4, 0.4, 0.2, 0.2]
    with pytest.raises(TaxfreeError, match="both cover layer 1"):
        PartwiseWeights(0.5, tuple(parse_blocks("0-1:0.4,1-:0.2"))).layer_weights(4)
    with pytest.raises(TaxfreeError, match="leave layer 3 without a weight"):
        PartwiseWeights(blocks=tuple(parse_blocks("0-2:0.4"))).layer_weights(4)
    with pytest.raises(TaxfreeError, match="has layers 0-3 only"):
        PartwiseWeights(0.5, tuple(parse_blocks("2-4:0.4"))).layer_weights(4)
    with pytest.raises(TaxfreeError, match="cannot read '0-x:1'"):
        parse_blocks("0-x:1")
    with pytest.raises(TaxfreeError, match="--embed-weight is required"):
        PartwiseWeights(blocks=tuple(parse_blocks("0-:0.4"))).validate()


def test_reader_lists_tensors_in_file_order(tmp_path):
    save(make_model("gpt2", 0), tmp_path / "m")
    c = Checkpoint(tmp_path / "m")
    order = [(str(i.path), i.offset) for i in c.tensors.values()]
    assert order == sorted(order)
    assert ckpt.INDEX_NAME in os.listdir(tmp_path / "m")
