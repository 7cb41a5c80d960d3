"""AMA: per-block weights, the live merged forward, its gradient, the regulariser, export, training."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from taxfree.errors import TaxfreeError
from taxfree.merging.ama import AdaptiveModelAverager, layer_regularizer_weight, parse_block_spec, split_layers
from taxfree.merging.ama_training import train_ama
from taxfree.merging.merged_modules import MergedLinearFunction
from test_merging import make_model

VOCAB = 48


def pair(arch="llama", tied=False, layers=4, dtype=torch.float32):
    """Two models of one architecture, in eval mode (GPT-2's dropout would make forwards differ)."""
    return (make_model(arch, 0, tied, layers=layers).to(dtype).eval(),
            make_model(arch, 1, tied, layers=layers).to(dtype).eval())


def layer_of(name: str) -> int | None:
    for prefix in ("model.layers.", "transformer.h.", "gpt_neox.layers."):
        if name.startswith(prefix):
            return int(name[len(prefix):].split(".")[0])
    return None


def plainly_merged(arch, tied, layers, sft, aligned, layer_weight, embed_weight, head_weight):
    """A fresh model whose weights are (1 - a) * sft + a * aligned by plain arithmetic (the reference)."""
    ref = make_model(arch, 7, tied, layers=layers).to(next(sft.parameters()).dtype).eval()
    s, a = sft.state_dict(), aligned.state_dict()
    state = {}
    for name in s:
        layer = layer_of(name)
        if layer is not None:
            w = layer_weight[layer]
        elif "embed_tokens" in name or "wte" in name or "wpe" in name or "embed_in" in name or (tied and "lm_head" in name):
            w = embed_weight
        else:
            w = head_weight
        state[name] = (1 - w) * s[name] + w * a[name]
    ref.load_state_dict(state)
    return ref


def set_logits(averager, values):
    with torch.no_grad():
        for p, v in zip(averager.block_logits, values):
            p.fill_(v)


def test_block_weights_keep_the_mean_and_the_bound():
    sft, aligned = pair(layers=6)
    ama = AdaptiveModelAverager(sft, aligned, blocks="block3")
    assert ama.block_layers == [[0, 1], [2, 3], [4, 5]]
    assert [w["sft_weight"] for w in ama.block_weights()] == pytest.approx([0.2] * 3)  # equal logits at init
    set_logits(ama, [1.3, -0.4, 2.2])
    s = ama.sft_weights()
    assert s.mean().item() == pytest.approx(0.2, abs=1e-7)
    sig = torch.sigmoid(torch.tensor([1.3, -0.4, 2.2])) + 0.2
    torch.testing.assert_close(s, 0.2 * 3 * sig / sig.sum())
    set_logits(ama, [40.0, -40.0, -40.0])  # the extreme: s_0 -> s0*B*(1+eps)/(1+B*eps) = 0.2*3*1.2/1.6
    assert ama.sft_weights()[0].item() == pytest.approx(0.45, abs=1e-6)
    weights = ama.block_weights()
    assert weights[0] == {"block": 0, "layers": [0, 1], "sft_weight": pytest.approx(0.45, abs=1e-6),
                          "aligned_weight": pytest.approx(0.55, abs=1e-6)}


def test_block_specs_and_refused_settings():
    assert split_layers(26, 3) == [list(range(0, 9)), list(range(9, 18)), list(range(18, 26))]
    assert parse_block_spec("layerwise", 3) == [[0], [1], [2]]
    assert parse_block_spec("block4", 4) == [[0], [1], [2], [3]]
    with pytest.raises(TaxfreeError, match="expected 'block3', 'blockN'"):
        parse_block_spec("thirds", 6)
    with pytest.raises(TaxfreeError, match="need 1 to 4 blocks"):
        parse_block_spec("block5", 4)
    sft, aligned = pair(layers=6)
    # 0.5 * 6 * 1.2 / (1 + 6 * 0.2) = 1.636 > 1
    with pytest.raises(TaxfreeError, match=r"weight reach 1\.636 > 1"):
        AdaptiveModelAverager(sft, aligned, blocks="layerwise", sft_mean=0.5)
    with pytest.raises(TaxfreeError, match="reg_weighting must be 'plain' or 'layer'"):
        AdaptiveModelAverager(sft, aligned, reg_weighting="l1")
    tied_sft, tied_aligned = pair(tied=True)
    with pytest.raises(TaxfreeError, match="head_block needs an untied LM head"):
        AdaptiveModelAverager(tied_sft, tied_aligned, head_block=True)
    other = make_model("llama", 3, vocab=40, layers=6)
    with pytest.raises(TaxfreeError, match="tensor 'model.embed_tokens.weight' has shape"):
        AdaptiveModelAverager(sft, other)


@pytest.mark.parametrize("arch,tied,head_block", [("llama", False, False), ("llama", True, False),
                                                  ("llama", False, True), ("gpt2", True, False), ("neox", False, True)])
def test_merged_forward_equals_plainly_merged_model(arch, tied, head_block):
    sft, aligned = pair(arch, tied, layers=4)
    ama = AdaptiveModelAverager(sft, aligned, blocks="block2", head_block=head_block,
                                embed_aligned_weight=0.3, head_aligned_weight=0.9)
    set_logits(ama, [0.7, -1.1, 2.0][: len(ama.block_logits)])
    a = ama.aligned_weights().tolist()
    head = a[2] if head_block else 0.9
    ref = plainly_merged(arch, tied, 4, sft, aligned, [a[0], a[0], a[1], a[1]], 0.3, head)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    out = ama(ids, attention_mask=mask, labels=ids)
    expected = ref(ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)


def test_gradient_equals_autograd_through_plainly_merged_weights():
    sft, aligned = pair(layers=4)
    ama = AdaptiveModelAverager(sft, aligned, blocks="block2", head_block=True)
    set_logits(ama, [0.3, -0.2, 0.5])
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    ama(ids, labels=ids).loss.backward()
    grads = torch.stack([p.grad for p in ama.block_logits])

    # Reference: the same objective written with torch.func.functional_call and plain autograd.
    logits = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    sig = torch.sigmoid(logits) + 0.2
    a = 1 - 0.2 * 3 * sig / sig.sum()
    shell = make_model("llama", 9, layers=4)
    s, al = sft.state_dict(), aligned.state_dict()
    params = {}
    for name in s:
        layer = layer_of(name)
        w = a[0] if layer in (0, 1) else a[1] if layer in (2, 3) else 0.8 if "embed" in name else a[2]
        params[name] = (1 - w) * s[name] + w * al[name]
    loss = torch.func.functional_call(shell, params, (ids,), {"labels": ids}).loss
    loss.backward()
    torch.testing.assert_close(grads, logits.grad, rtol=1e-4, atol=1e-7)


def test_merged_linear_function_gradcheck():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    w1, w2 = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, a: MergedLinearFunction.apply(x, a, w1, w2), (x, a))


def test_logits_are_live_and_a_step_moves_blocks_differently():
    sft, aligned = pair(layers=6)
    ama = AdaptiveModelAverager(sft, aligned, blocks="block3")
    params = ama.trainable_parameters()
    assert len(params) == 3 and len({id(p) for p in params}) == 3
    assert [n for n, p in ama.named_parameters() if p.requires_grad] == ["block_logits.0", "block_logits.1", "block_logits.2"]
    optimizer = torch.optim.SGD(params, lr=50.0)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 3  # each logit given once
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    before = ama(ids, labels=ids)
    (before.loss + ama.regularizer()).backward()
    grads = [p.grad.item() for p in params]
    assert len({round(g, 12) for g in grads}) == 3  # every block gets its own gradient
    optimizer.step()
    s = [w["sft_weight"] for w in ama.block_weights()]
    assert len({round(v, 9) for v in s}) == 3 and sum(s) / 3 == pytest.approx(0.2, abs=1e-7)
    after = ama(ids, labels=ids)  # the next forward uses the new weights, not a stale copy
    a = ama.aligned_weights().tolist()
    ref = plainly_merged("llama", False, 6, sft, aligned, [a[0], a[0], a[1], a[1], a[2], a[2]], 0.8, 0.8)
    torch.testing.assert_close(after.logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after.logits, before.logits)


def test_regularizer_values_by_hand():
    sft, aligned = pair(layers=4)  # 7 Linears per Llama layer
    plain = AdaptiveModelAverager(sft, aligned, blocks="block2", reg=0.5)
    assert plain.regularizer().item() == 0.0  # all s_b = s0 at init
    set_logits(plain, [1.0, -1.0])
    s = plain.sft_weights().detach()
    expected = 0.5 * (14 * abs(s[0] - 0.2) + 14 * abs(s[1] - 0.2))
    assert plain.regularizer().item() == pytest.approx(expected.item(), rel=1e-6)
    # layer weighting, L = 4: w(l) = 3 / (|l - 2| + 1) -> 1, 1.5, 3, 1.5; the head counts as l = 4 -> 1.
    assert [layer_regularizer_weight(l, 4) for l in range(5)] == [1.0, 1.5, 3.0, 1.5, 1.0]
    layer = AdaptiveModelAverager(sft, aligned, blocks="block2", head_block=True, reg=0.5, reg_weighting="layer")
    set_logits(layer, [1.0, -1.0, 0.5])
    s = layer.sft_weights().detach()
    expected = 0.5 * (7 * 2.5 * abs(s[0] - 0.2) + 7 * 4.5 * abs(s[1] - 0.2) + 1 * abs(s[2] - 0.2))
    assert layer.regularizer().item() == pytest.approx(expected.item(), rel=1e-6)


def test_backward_saves_no_merged_weight():
    sft, aligned = pair(layers=2)
    ama = AdaptiveModelAverager(sft, aligned, blocks="block2")
    params = {p.data_ptr() for p in list(sft.parameters()) + list(aligned.parameters())}
    linear_shapes = {tuple(m.weight_sft.shape) for m in ama.merged_model.modules() if hasattr(m, "weight_sft")
                     and m.weight_sft.dim() == 2}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    ids = torch.randint(0, VOCAB, (1, 5))  # 5 tokens: no activation has a weight's shape
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ama(ids, labels=ids).loss
    loss.backward()
    weight_sized = [t for t in saved if tuple(t.shape) in linear_shapes]
    assert weight_sized and all(t.data_ptr() in params for t in weight_sized)  # only the frozen originals


def test_export_loads_as_a_normal_checkpoint(tmp_path):
    for tied in (False, True):
        sft, aligned = pair(tied=tied, layers=4)
        ama = AdaptiveModelAverager(sft, aligned, blocks="block2", embed_aligned_weight=0.25)
        set_logits(ama, [0.9, -0.6])
        out_dir = tmp_path / f"tied{tied}"
        summary = ama.export_merged(out_dir, max_shard_size="20KB")
        assert summary["shards"] > 1
        loaded = AutoModelForCausalLM.from_pretrained(out_dir)
        ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, ama(ids).logits, rtol=1e-5, atol=1e-5)
        if tied:
            assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        record = json.loads((out_dir / "ama_weights.json").read_text())
        a = ama.aligned_weights().tolist()
        assert [b["aligned_weight"] for b in record["blocks"]] == pytest.approx(a)
        assert record["aligned_weight_by_layer"] == pytest.approx([a[0], a[0], a[1], a[1]])
        assert record["embed_aligned_weight"] == 0.25 and record["settings"]["sft_mean"] == 0.2


def test_train_ama_lowers_the_loss_and_keeps_the_mean():
    sft, aligned = pair(layers=4)
    ama = AdaptiveModelAverager(sft, aligned, blocks="block4", reg=0.0)
    # data the aligned model likes: its own greedy continuations
    prompt = torch.randint(0, VOCAB, (4, 3), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ids = aligned.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    labels = ids.clone()
    labels[:, :3] = -100
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}] * 12
    result = train_ama(ama, batches, lr=0.5, warmup_ratio=0.1, progress=False)
    assert result["steps"] == 12 and len(result["losses"]) == 12
    assert result["losses"][-1] < result["losses"][0]
    assert sum(b["sft_weight"] for b in result["block_weights"]) / 4 == pytest.approx(0.2, abs=1e-6)
