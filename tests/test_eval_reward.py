"""Reward scoring: batched scores equal each pair's score alone, whatever the padding."""

import re
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast

from taxfree.errors import TaxfreeError
from taxfree.eval.reward import format_reward_input_ids, score_with_reward_model
from taxfree.models import tiny_llama_config

WORDS = "<unk> <pad> </s> <s> user assistant : the cat dog sat on mat is good bad very hello hi how are you".split()
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"


def make_tokenizer(padding_side="right", pad_is_eos=False, chat=False):
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        eos_token="</s>",
        bos_token="<s>",
        pad_token="</s>" if pad_is_eos else "<pad>",
        padding_side=padding_side,
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def make_rm(pad_token_id, seed=0):
    cfg = tiny_llama_config(len(WORDS), hidden_size=32, num_layers=2, num_heads=4, pad_token_id=pad_token_id)
    cfg.num_labels = 1
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(cfg).eval()


PROMPTS = ["the cat sat on", "how are you", "hi", "is the dog good"]
RESPONSES = [" the mat", " very good", " hello how are you very very good", " bad"]


def alone(model, ids):
    """What transformers itself gives one unpadded sequence (batch of one)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_scores_equal_single_sequence_scores(padding_side):
    tok = make_tokenizer(padding_side)
    model = make_rm(pad_token_id=tok.pad_token_id)
    expected = [alone(model, tok(p + r + "</s>")["input_ids"]) for p, r in zip(PROMPTS, RESPONSES)]
    got = score_with_reward_model(model, tok, PROMPTS, RESPONSES, batch_size=3, progress=False)
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(round(x, 4) for x in got)) == len(got)  # distinct scores: positions really differ


def test_pad_equal_to_eos_reads_where_the_model_reads_alone():
    # TRL sets pad = eos when a tokenizer has no pad token; transformers then scores the token
    # before a trailing eos. Batching must not move that position.
    tok = make_tokenizer(pad_is_eos=True)
    model = make_rm(pad_token_id=tok.eos_token_id)
    expected = [alone(model, tok(p + r + "</s>")["input_ids"]) for p, r in zip(PROMPTS, RESPONSES)]
    got = score_with_reward_model(model, tok, PROMPTS, RESPONSES, batch_size=4, progress=False)
    assert got == pytest.approx(expected, abs=1e-5)


def test_model_without_pad_id_scores_last_token_and_config_is_restored():
    tok = make_tokenizer()
    model = make_rm(pad_token_id=None)
    expected = [alone(model, tok(p + r + "</s>")["input_ids"]) for p, r in zip(PROMPTS, RESPONSES)]
    got = score_with_reward_model(model, tok, PROMPTS, RESPONSES, batch_size=4, progress=False)
    assert got == pytest.approx(expected, abs=1e-5)
    assert model.config.pad_token_id is None


def test_message_prompts_use_the_chat_template():
    tok = make_tokenizer(chat=True)
    model = make_rm(pad_token_id=tok.pad_token_id)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    responses = [r.strip() for r in RESPONSES]
    expected = []
    for chat, r in zip(chats, responses):
        text = tok.apply_chat_template(chat + [{"role": "assistant", "content": r}], tokenize=False)
        assert text.startswith("user : ") and text.endswith("</s> ")
        expected.append(alone(model, tok(text)["input_ids"]))
    got = score_with_reward_model(model, tok, chats, responses, batch_size=2, progress=False)
    assert got == pytest.approx(expected, abs=1e-5)


def test_string_prompts_get_eos_once():
    tok = make_tokenizer()
    ids = format_reward_input_ids(tok, "hi", " hello")
    assert ids == tok("hi hello </s>")["input_ids"]
    assert format_reward_input_ids(tok, "hi", " hello</s>") == ids
    assert format_reward_input_ids(tok, "hi", " hello", append_eos=False) == tok("hi hello")["input_ids"]


def test_max_length_keeps_the_end_of_the_pair():
    tok = make_tokenizer()
    model = make_rm(pad_token_id=tok.pad_token_id)
    ids = tok(PROMPTS[2] + RESPONSES[2] + "</s>")["input_ids"]
    got = score_with_reward_model(model, tok, [PROMPTS[2]], [RESPONSES[2]], max_length=4, progress=False)
    assert got == pytest.approx([alone(model, ids[-4:])], abs=1e-5)


def test_bad_inputs_raise_one_line_errors():
    tok = make_tokenizer()
    model = make_rm(pad_token_id=tok.pad_token_id)
    with pytest.raises(TaxfreeError, match="no chat template"):
        score_with_reward_model(model, tok, [[{"role": "user", "content": "hi"}]], ["hello"], progress=False)
    with pytest.raises(TaxfreeError, match="2 prompts but 1 responses"):
        score_with_reward_model(model, tok, ["a", "b"], ["c"], progress=False)
    two = make_rm(pad_token_id=tok.pad_token_id)
    two.config.num_labels = 2
    with pytest.raises(TaxfreeError, match="num_labels=1"):
        score_with_reward_model(two, tok, ["a"], ["b"], progress=False)
    with pytest.raises(TaxfreeError, match="must be a string"):
        score_with_reward_model(model, tok, ["a"], [3], progress=False)


def test_score_positions_handle_left_and_right_padding():
    from taxfree.eval.reward import _score_positions

    pad, eos = 1, 2
    ids = torch.tensor([[5, 6, 7, eos, pad, pad], [pad, pad, 5, 6, 7, eos], [5, 6, 7, 8, 9, eos]])
    mask = (torch.arange(6) < 4).long().unsqueeze(0).repeat(3, 1)
    mask[1] = torch.tensor([0, 0, 1, 1, 1, 1])
    mask[2] = 1
    assert _score_positions(ids, mask, pad_token_id=pad).tolist() == [3, 5, 5]
    assert _score_positions(ids, mask, pad_token_id=eos).tolist() == [2, 4, 4]  # pad == eos: token before eos
    assert _score_positions(ids, mask, pad_token_id=None).tolist() == [3, 5, 5]


def _two_label_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
        pad_token_id=0)).eval()


def test_a_classifier_label_scores_that_class_logit_at_the_last_token():
    from helpers_tokenizer import char_tokenizer

    from taxfree.eval.reward import resolve_reward_label, score_with_reward_model

    model, tok = _two_label_classifier(), char_tokenizer()
    prompts, responses = ["good film", "bad"], [" loved it", " hated every minute"]
    scores = score_with_reward_model(model, tok, prompts, responses, batch_size=2, progress=False,
                                     label=resolve_reward_label(model, "Positive"))
    for p, r, s in zip(prompts, responses, scores):  # each pair alone, unpadded: the logit at its last token
        ids = torch.tensor([tok(p + r + tok.eos_token)["input_ids"]])
        with torch.no_grad():
            assert s == pytest.approx(model(input_ids=ids).logits[0, 1].item(), abs=1e-5)


@pytest.mark.parametrize("label,expected", [("POSITIVE", 1), ("negative", 0), ("1", 1), (0, 0)])
def test_reward_label_by_name_or_index(label, expected):
    from taxfree.eval.reward import resolve_reward_label

    assert resolve_reward_label(_two_label_classifier(), label) == expected


@pytest.mark.parametrize("label,message", [
    (None, "a classifier with 2 labels (NEGATIVE, POSITIVE): name the class"),
    ("neutral", "reward_label 'neutral': not a label of the model (has: NEGATIVE, POSITIVE)"),
    ("2", "reward_label 2: the model has 2 labels (0..1)"),
])
def test_reward_label_errors(label, message):
    from taxfree.errors import TaxfreeError
    from taxfree.eval.reward import resolve_reward_label

    with pytest.raises(TaxfreeError, match=re.escape(message)):
        resolve_reward_label(_two_label_classifier(), label)


def test_pairs_longer_than_the_model_are_cut_to_its_positions():
    """A BERT-sized reward backbone has 512 positions and a sampled answer can run past them:
    an encoder keeps the start (its pooled first token), a decoder the end (its scored last token)."""
    from transformers import BertConfig, BertForSequenceClassification

    from helpers_tokenizer import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=1,
                                                    max_position_embeddings=24, pad_token_id=0)).eval()
    long = "abcdefghij" * 5  # 50 characters: past the 24 positions
    got = score_with_reward_model(bert, tok, ["q:"], [long], progress=False)
    ids = torch.tensor([tok("q:" + long + tok.eos_token)["input_ids"][:24]])
    with torch.no_grad():
        assert got[0] == pytest.approx(bert(input_ids=ids).logits[0, 0].item(), abs=1e-5)
    cfg = tiny_llama_config(len(tok), hidden_size=32, max_position_embeddings=24, pad_token_id=0)
    cfg.num_labels = 1
    decoder = LlamaForSequenceClassification(cfg).eval()
    got = score_with_reward_model(decoder, tok, ["q:"], [long], progress=False)
    ids = torch.tensor([tok("q:" + long + tok.eos_token)["input_ids"][-24:]])
    with torch.no_grad():
        assert got[0] == pytest.approx(decoder(input_ids=ids).logits[0, 0].item(), abs=1e-5)
