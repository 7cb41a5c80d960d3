"""PairRM: loading the PairRM-hf format and scoring as the published code does.

The reference below is written independently from the published recipe (model card's
tokenize_pair with padding="max_length", DebertaV2PairRM.forward with torch.where over the
batch and hidden_states[-1]); our loader must read its checkpoint and give the same logits.
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import DebertaV2Config, DebertaV2Model, PreTrainedTokenizerFast

from taxfree.errors import TaxfreeError
from taxfree.eval.pairrm import (
    CONVERSATION_INSTRUCTION,
    PairRM,
    _conversation_texts,
    preference_probability,
    win_rate,
    win_rate_from_logits,
)

WORDS = "[PAD] [CLS] [SEP] [UNK] [MASK] hello hi there how are you fine good bad the cat dog sat on mat a an is".split()
PREFIXES = ["<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"]
SMAX, CMAX = 12, 6


def make_tokenizer():
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]"
    )
    tok.add_tokens(PREFIXES)  # as in PairRM-hf's added_tokens.json: plain added tokens
    return tok


def pairrm_config(tok):
    ids = {t: tok.convert_tokens_to_ids(t) for t in PREFIXES}
    # the DeBERTa-v3 fields of PairRM-hf's config.json, at toy width
    return {
        "architectures": ["DebertaV2PairRM"],
        "model_type": "deberta-v2",
        "attention_probs_dropout_prob": 0.1,
        "hidden_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "layer_norm_eps": 1e-7,
        "max_position_embeddings": 512,
        "max_relative_positions": -1,
        "norm_rel_ebd": "layer_norm",
        "pad_token_id": 0,
        "pos_att_type": ["p2c", "c2p"],
        "position_biased_input": False,
        "position_buckets": 256,
        "relative_attention": True,
        "share_att_key": True,
        "type_vocab_size": 0,
        "vocab_size": len(tok),
        "n_tasks": 1,
        "drop_out": 0.05,
        "source_prefix_id": ids["<|source|>"],
        "cand1_prefix_id": ids["<|candidate1|>"],
        "cand2_prefix_id": ids["<|candidate2|>"],
        "cand_prefix_id": ids["<|candidate|>"],
    }


class ReferencePairRM(nn.Module):
    """The published module layout, written out here: pretrained_model + head_layer."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.pretrained_model = DebertaV2Model(config)
        h = config.hidden_size
        self.head_layer = nn.Sequential(
            nn.Dropout(config.drop_out), nn.Linear(2 * h, h), nn.Tanh(), nn.Dropout(config.drop_out), nn.Linear(h, config.n_tasks)
        )

    def forward(self, input_ids, attention_mask):
        keep = attention_mask.ne(0).any(dim=0)
        input_ids, attention_mask = input_ids[:, keep], attention_mask[:, keep]
        out = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        encs = out.hidden_states[-1]
        s = torch.where(input_ids == self.config.source_prefix_id)
        c1 = torch.where(input_ids == self.config.cand1_prefix_id)
        c2 = torch.where(input_ids == self.config.cand2_prefix_id)
        left = self.head_layer(torch.cat([encs[s[0], s[1]], encs[c1[0], c1[1]]], dim=-1))
        right = self.head_layer(torch.cat([encs[s[0], s[1]], encs[c2[0], c2[1]]], dim=-1))
        return (left - right).mean(dim=-1)


def reference_tokenize_pair(tok, sources, cand1s, cand2s):
    ids = []
    max_length = SMAX + 2 * CMAX
    for s, c1, c2 in zip(sources, cand1s, cand2s):
        s_ids = tok.encode("<|source|>" + s, max_length=SMAX, truncation=True)
        cml = (max_length - len(s_ids)) // 2
        ids.append(
            s_ids
            + tok.encode("<|candidate1|>" + c1, max_length=cml, truncation=True)
            + tok.encode("<|candidate2|>" + c2, max_length=cml, truncation=True)
        )
    return tok.pad({"input_ids": ids}, return_tensors="pt", padding="max_length", max_length=max_length)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny random ranker saved exactly in the PairRM-hf layout, plus its reference module."""
    tok = make_tokenizer()
    cfg_dict = pairrm_config(tok)
    torch.manual_seed(0)
    ref = ReferencePairRM(DebertaV2Config(**cfg_dict)).eval()
    with torch.no_grad():
        ref.head_layer[4].weight.mul_(40.0)  # make preferences clearly non-zero
    d = tmp_path_factory.mktemp("pairrm_hf")
    (d / "config.json").write_text(json.dumps(cfg_dict))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(d / "model.safetensors"))
    tok.save_pretrained(str(d))
    return d, ref, tok


PROMPTS = ["hello how are you", "the cat sat on the", "how is the dog", "hi"]
A = ["fine good", "mat", "the dog is bad bad bad bad bad bad bad bad", "hi there"]
B = ["bad", "a dog", "good", "hi there"]


def test_state_dict_names_are_the_published_ones(published):
    d, ref, _ = published
    keys = set(PairRM.from_pretrained(d).model.state_dict())
    assert keys == set(ref.state_dict())
    assert {"head_layer.1.weight", "head_layer.4.bias", "pretrained_model.encoder.rel_embeddings.weight"} <= keys


def test_one_order_logits_match_the_reference_recipe(published):
    d, ref, tok = published
    pairrm = PairRM.from_pretrained(d, source_max_length=SMAX, candidate_max_length=CMAX)
    ours = pairrm.compare(PROMPTS, A, B, batch_size=4, mode="[A,B]", progress=False)
    enc = reference_tokenize_pair(tok, PROMPTS, A, B)
    with torch.no_grad():
        expected = ref(enc["input_ids"], enc["attention_mask"]).tolist()
    assert ours == pytest.approx(expected, abs=1e-5)
    assert max(abs(x) for x in expected) > 0.1  # the check compares real preferences, not zeros


def test_truncation_follows_the_model_card(published):
    d, _, tok = published
    pairrm = PairRM.from_pretrained(d, source_max_length=SMAX, candidate_max_length=CMAX)
    long_src = " ".join(["cat"] * 40)
    enc = pairrm.encode_pairs([long_src], ["good " * 30], ["bad"])
    ids = enc["input_ids"][0].tolist()
    assert len(ids) <= SMAX + 2 * CMAX
    # the source segment is cut to SMAX tokens and still ends with [SEP]
    assert ids[:2] == [tok.cls_token_id, tok.convert_tokens_to_ids("<|source|>")]
    assert ids[SMAX - 1] == tok.sep_token_id
    assert ids[SMAX + 1] == tok.convert_tokens_to_ids("<|candidate1|>")


def test_swap_averaged_compare_is_antisymmetric_and_batch_independent(published):
    d, _, _ = published
    pairrm = PairRM.from_pretrained(d)
    ab = pairrm.compare(PROMPTS, A, B, batch_size=4, progress=False)
    ba = pairrm.compare(PROMPTS, B, A, batch_size=4, progress=False)
    assert ab == [-x for x in ba]
    assert ab[3] == 0.0  # identical responses tie exactly
    one_by_one = pairrm.compare(PROMPTS, A, B, batch_size=1, progress=False)
    assert one_by_one == pytest.approx(ab, abs=1e-5)
    # and it is the difference of the two one-order logits, as llm-blender's compare returns
    fwd = pairrm.compare(PROMPTS, A, B, batch_size=4, mode="[A,B]", progress=False)
    rev = pairrm.compare(PROMPTS, A, B, batch_size=4, mode="[B,A]", progress=False)
    assert ab == pytest.approx([x - y for x, y in zip(fwd, rev)], abs=1e-6)


def test_win_rate_counts_ties_as_half(published):
    d, _, _ = published
    pairrm = PairRM.from_pretrained(d)
    logits = pairrm.compare(PROMPTS, A, B, progress=False)
    expected = sum(1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in logits) / len(logits)
    assert win_rate(pairrm, PROMPTS, A, B, progress=False) == expected
    assert win_rate(pairrm, PROMPTS, A, A, progress=False) == 0.5
    assert win_rate_from_logits([2.0, -1.0, 0.0, 0.5]) == pytest.approx(2.5 / 4)
    assert preference_probability(0.0) == 0.5
    assert preference_probability(3.0) == pytest.approx(1 - preference_probability(-3.0))


def test_chat_prompts_use_the_compare_conversations_format():
    src, cand = _conversation_texts(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you"}],
        "fine",
    )
    assert src == CONVERSATION_INSTRUCTION + "USER: hi\nAssistant: <Response 1>\nUSER: how are you\nAssistant: <Response 2>"
    assert cand == "<Response 1>: hello\n<Response 2>: fine"
    with pytest.raises(TaxfreeError, match="alternate"):
        _conversation_texts([{"role": "assistant", "content": "x"}], "y")


def test_chat_prompt_scores_like_its_rendered_string(published):
    d, _, _ = published
    pairrm = PairRM.from_pretrained(d)
    chat = [{"role": "user", "content": "how are you"}]
    src, ca = _conversation_texts(chat, "fine good")
    _, cb = _conversation_texts(chat, "bad")
    assert pairrm.compare([chat], ["fine good"], ["bad"], progress=False) == pytest.approx(
        pairrm.compare([src], [ca], [cb], progress=False), abs=1e-6
    )


def test_prefix_tokens_inside_user_text_do_not_break_scoring(published):
    d, _, _ = published
    pairrm = PairRM.from_pretrained(d)
    tricky = pairrm.compare(["hello <|candidate1|> you"], ["fine"], ["bad"], progress=False)
    plain = pairrm.compare(["hello   you"], ["fine"], ["bad"], progress=False)
    assert tricky == pytest.approx(plain, abs=1e-6)


def test_pytorch_bin_checkpoint_loads_with_weights_only(published, tmp_path):
    d, ref, tok = published
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    tok.save_pretrained(str(tmp_path))
    a = PairRM.from_pretrained(tmp_path).compare(PROMPTS, A, B, progress=False)
    b = PairRM.from_pretrained(d).compare(PROMPTS, A, B, progress=False)
    assert a == pytest.approx(b, abs=1e-6)


def test_bad_inputs_raise_one_line_errors(published, tmp_path):
    d, ref, tok = published
    with pytest.raises(TaxfreeError, match="no such directory"):
        PairRM.from_pretrained(tmp_path / "missing")
    # a checkpoint that is not PairRM's (renamed head) is refused, not half-loaded
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    tok.save_pretrained(str(tmp_path))
    state = {k.replace("head_layer", "classifier"): v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(TaxfreeError, match="not a PairRM-hf checkpoint"):
        PairRM.from_pretrained(tmp_path)
    pairrm = PairRM.from_pretrained(d)
    with pytest.raises(TaxfreeError, match="2 prompts, 1 responses_a"):
        pairrm.compare(["a", "b"], ["x"], ["y", "z"], progress=False)
    with pytest.raises(TaxfreeError, match="mode"):
        pairrm.compare(["a"], ["x"], ["y"], mode="both", progress=False)
    # tokenizer and weights that do not belong together
    cfg = json.loads((d / "config.json").read_text())
    cfg["source_prefix_id"] = cfg["cand2_prefix_id"]
    bad = tmp_path / "mismatch"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(bad / "model.safetensors"))
    tok.save_pretrained(str(bad))
    with pytest.raises(TaxfreeError, match="do not belong together"):
        PairRM.from_pretrained(bad)


def test_save_pretrained_round_trips(published, tmp_path):
    d, _, _ = published
    pairrm = PairRM.from_pretrained(d)
    pairrm.save_pretrained(tmp_path / "copy")
    cfg = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert cfg["architectures"] == ["DebertaV2PairRM"] and cfg["model_type"] == "deberta-v2"
    again = PairRM.from_pretrained(tmp_path / "copy")
    assert again.compare(PROMPTS, A, B, progress=False) == pytest.approx(pairrm.compare(PROMPTS, A, B, progress=False), abs=1e-6)
