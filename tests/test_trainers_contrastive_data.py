"""Tokenisation, truncation, batching and input checks of ContrastiveTrainer's data path."""

import datasets
import pytest
import torch
from helpers_tokenizer import char_tokenizer

from taxfree.errors import TaxfreeError
from taxfree.trainers import (
    ContrastiveCollator,
    ContrastiveConfig,
    record_format,
    tokenize_dataset,
    tokenize_prompt_completions,
)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_text_record_gets_eos_and_shared_prompt(tok):
    prompt_ids, completion_ids = tokenize_prompt_completions(tok, "ab", ["c", "de</s>"])
    assert prompt_ids == ids(tok, "ab")
    eos = tok.eos_token_id
    assert completion_ids == [ids(tok, "c") + [eos], ids(tok, "de") + [eos]]  # never two EOS


def test_chat_record_uses_the_template(tok):
    prompt = [{"role": "user", "content": "hi"}]
    prompt_ids, completion_ids = tokenize_prompt_completions(
        tok, prompt, [[{"role": "assistant", "content": "yo"}], "no"]
    )
    assert prompt_ids == [tok.bos_token_id] + ids(tok, "user: hi\nassistant: ")
    # The completion is what the template renders after the prompt: content and end of turn.
    assert completion_ids == [ids(tok, "yo\n"), ids(tok, "no\n")]


def test_truncation_keeps_prompt_end_and_completion_start(tok):
    prompt_ids, completion_ids = tokenize_prompt_completions(
        tok, "0123456789", ["abcdef", "xy"], max_length=7, max_prompt_length=4
    )
    assert prompt_ids == ids(tok, "6789")
    # 7 - 4 = 3 tokens of room: "abcdef</s>" loses its end, "xy</s>" fits.
    assert completion_ids == [ids(tok, "abc"), ids(tok, "xy") + [tok.eos_token_id]]


def test_pref_records_become_pairs_with_rewards_one_zero(tok):
    ds = datasets.Dataset.from_list([{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    assert record_format(ds.column_names) == "pref"
    out = tokenize_dataset(ds, tok)
    assert out.column_names == ["prompt_ids", "completion_ids", "rewards"]
    row = out[0]
    assert row["rewards"] == [1.0, 0.0]
    assert row["completion_ids"][0] == ids(tok, "good") + [tok.eos_token_id]


def test_num_completions_takes_the_first_k(tok):
    ds = datasets.Dataset.from_list(
        [
            {"prompt": "q", "completions": ["a", "b", "c"], "rewards": [0.1, 0.2, 0.3]},
            {"prompt": "r", "completions": ["d", "e"], "rewards": [1.0, 2.0]},
        ]
    )
    out = tokenize_dataset(ds, tok, num_completions=2)
    assert out[0]["rewards"] == pytest.approx([0.1, 0.2])
    assert [len(r) for r in out["completion_ids"]] == [2, 2]


def test_collator_pads_right_and_masks_prompt_and_padding(tok):
    features = [
        {"prompt_ids": [5, 6], "completion_ids": [[7], [8, 9, 10]], "rewards": [1.0, 0.0]},
        {"prompt_ids": [11], "completion_ids": [[12, 13], [14]], "rewards": [0.0, 2.0]},
    ]
    batch = ContrastiveCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 0, 0],
        [5, 6, 8, 9, 10],
        [11, 12, 13, 0, 0],
        [11, 14, 0, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    m = -100
    assert batch["labels"].tolist() == [
        [m, m, 7, m, m],
        [m, m, 8, 9, 10],
        [m, 12, 13, m, m],
        [m, 14, m, m, m],
    ]
    assert torch.equal(batch["rewards"], torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert ContrastiveCollator(pad_token_id=0, pad_to_multiple_of=4)(features)["input_ids"].shape == (4, 8)


def rw(*counts):
    return datasets.Dataset.from_list(
        [{"prompt": "q", "completions": ["a"] * k, "rewards": [0.0] * k} for k in counts]
    )


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (lambda: rw(3, 2, 3), {}, "record 1 holds 2 completions, record 0 holds 3"),
        (lambda: rw(3, 2), {"num_completions": 3}, "record 1: 2 completions, fewer than the K = 3"),
        (lambda: rw(3), {"pairwise": True}, "K must be 2"),
        (lambda: rw(1), {}, "at least 2 completions"),
        (
            lambda: datasets.Dataset.from_list([{"prompt": "q", "completions": ["a", "b"], "rewards": [1.0]}]),
            {},
            "2 completions but 1 rewards",
        ),
        (lambda: datasets.Dataset.from_list([{"prompt": "q", "answer": "a"}]), {}, "neither the rw format"),
        (
            lambda: datasets.Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}]),
            {"num_completions": 4},
            "pref records hold 2 completions",
        ),
    ],
)
def test_bad_datasets_raise_taxfree_error(tok, make, kwargs, message):
    with pytest.raises(TaxfreeError, match=message):
        tokenize_dataset(make(), tok, **kwargs)


def test_tokenizer_without_pad_or_eos_is_refused():
    no_pad = char_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(TaxfreeError, match="no pad token"):
        tokenize_dataset(rw(2), no_pad)
    no_eos = char_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(TaxfreeError, match="no eos token"):
        tokenize_dataset(rw(2), no_eos)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": "exo"}, "unknown 'exo'"),
        ({"beta_pi": 0.0}, "beta_pi must be > 0"),
        ({"beta": -1.0}, "beta must be > 0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"pref_eps": 0.5}, "pref_eps"),
        ({"max_length": 8, "max_prompt_length": 8}, "must be smaller than max_length"),
        ({"loss_type": "kto-pair", "num_completions": 3}, "must be 2 for kto-pair"),
    ],
)
def test_config_checks(tmp_path, kwargs, message):
    with pytest.raises(TaxfreeError, match=message):
        ContrastiveConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


def test_config_defaults(tmp_path):
    args = ContrastiveConfig(output_dir=str(tmp_path), report_to="none")
    assert args.loss_type == "exo-rw" and args.remove_unused_columns is False
    assert args.beta_pi == args.beta_r == 0.1 and args.pref_eps == pytest.approx(4.54e-5, rel=1e-3)
