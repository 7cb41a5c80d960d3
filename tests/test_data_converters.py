"""Upstream converters on fixture files in the exact upstream schemas, with exact outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from taxfree.data.converters import SOURCES, SkipRecord, convert_file, convert_rows, read_upstream
from taxfree.data.converters import hh_rlhf, imdb, sharegpt, tldr, ultrafeedback
from taxfree.data.records import read_jsonl
from taxfree.errors import TaxfreeError

UPSTREAM = Path(__file__).parent / "fixtures" / "upstream"


def rows(path):
    return [row for _, row in read_upstream(path)]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def to_parquet(jsonl_path, out_path):
    pq.write_table(pa.Table.from_pylist(rows(jsonl_path)), out_path)
    return out_path


def test_registry_names_every_source_and_its_hub_location():
    assert {name: (s.hub_id, s.hub_config, s.hub_splits) for name, s in SOURCES.items()} == {
        "hh_rlhf": ("Anthropic/hh-rlhf", None, {"train": "train", "test": "test"}),
        "ultrafeedback_binarized": (
            "HuggingFaceH4/ultrafeedback_binarized", None, {"train_prefs": "train", "test_prefs": "test"}),
        "imdb": ("stanfordnlp/imdb", None, {"train": "train", "test": "test"}),
        "tldr": ("openai/summarize_from_feedback", "comparisons", {"train": "train", "validation": "test"}),
        "sharegpt": ("Open-Orca/SlimOrca-Dedup", None, {"train": None}),
        "chitchat": (None, None, {}),  # the PyPI package chitchat-dataset (scripts/fetch_smol.sh)
    }


# --- HH-RLHF -----------------------------------------------------------------------------------

def test_hh_single_turn_becomes_prompt_and_final_replies():
    first = rows(UPSTREAM / "hh_rlhf" / "train.jsonl.gz")[0]
    prompt = [user("What is the capital of France?")]
    chosen, rejected = [assistant("Paris is the capital of France.")], [assistant("I don't know.")]
    assert hh_rlhf.convert(first) == {
        "pref": [{"prompt": prompt, "chosen": chosen, "rejected": rejected}],
        "sft": [{"prompt": prompt, "completion": chosen}],
        "kto": [
            {"prompt": prompt, "completion": chosen, "label": True},
            {"prompt": prompt, "completion": rejected, "label": False},
        ],
        "rw": [{"prompt": prompt, "completions": [chosen, rejected], "rewards": [1.0, 0.0]}],
    }


def test_hh_several_turns_prompt_is_everything_but_the_last_reply():
    second = rows(UPSTREAM / "hh_rlhf" / "train.jsonl.gz")[1]
    pref = hh_rlhf.convert(second)["pref"][0]
    assert pref == {
        "prompt": [
            user("I want to bake bread."),
            assistant("Great! Do you have yeast?"),
            user("Yes, dry yeast."),
            # a paragraph break without a speaker tag stays inside the turn
            assistant("Then start with flour, water and salt.\n\nMix them well."),
            user("How long do I knead it?"),
        ],
        "chosen": [assistant("About ten minutes, until the dough is smooth.")],
        "rejected": [assistant("Knead it for two hours.")],
    }


def test_hh_humans_tag_variant_is_a_user_turn():
    fifth = rows(UPSTREAM / "hh_rlhf" / "train.jsonl.gz")[4]
    assert hh_rlhf.convert(fifth)["pref"][0]["prompt"] == [user("Is water wet?")]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"chosen": "\n\nHuman: Hi\n\nAssistant: Yo", "rejected": "\n\nHuman: Hi\n\nAssistant: Yo"},
         "chosen and rejected replies are identical"),
        ({"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Yo"}, "empty final reply"),
        ({"chosen": "\n\nHuman: Hi\n\nAssistant: A", "rejected": "\n\nHuman: Hey\n\nAssistant: B"},
         "chosen and rejected transcripts differ before the final reply"),
        ({"chosen": "\n\nHuman: Hi\n\nAssistant: A\n\nHuman: more", "rejected": "\n\nHuman: Hi\n\nAssistant: B"},
         "transcript does not end with an Assistant reply"),
        ({"chosen": "Hi\n\nAssistant: A", "rejected": "\n\nHuman: Hi\n\nAssistant: B"},
         "transcript does not start with a Human turn"),
    ],
)
def test_hh_unusable_rows_are_skipped_with_a_reason(row, reason):
    with pytest.raises(SkipRecord, match=f"^{reason}$"):
        hh_rlhf.convert(row)


def test_hh_wrong_schema_is_an_error():
    with pytest.raises(TaxfreeError, match=r"hh_rlhf: missing key 'rejected' \(is this a hh_rlhf file\?\)"):
        hh_rlhf.convert({"chosen": "\n\nHuman: a\n\nAssistant: b"})


def test_hh_convert_file_keeps_upstream_splits(tmp_path):
    out = tmp_path / "hh"
    result = convert_file(
        "hh_rlhf",
        {"train": UPSTREAM / "hh_rlhf" / "train.jsonl.gz", "test": UPSTREAM / "hh_rlhf" / "test.jsonl.gz"},
        out,
    )
    assert result.counts() == {
        "kto_train.jsonl": 6, "pref_train.jsonl": 3, "rw_train.jsonl": 3, "sft_train.jsonl": 3,
        "kto_test.jsonl": 2, "pref_test.jsonl": 1, "rw_test.jsonl": 1, "sft_test.jsonl": 1,
    }
    assert sorted(p.name for p in out.iterdir()) == sorted([*result.counts(), "conversion.json"])
    assert read_jsonl(out / "pref_test.jsonl", kind="pref") == [
        {"prompt": [user("Name a primary colour.")], "chosen": [assistant("Red.")], "rejected": [assistant("Green.")]}
    ]
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["upstream_rows"] == 6
    assert summary["skipped"] == {"chosen and rejected replies are identical": 1, "empty final reply": 1}
    assert result.describe(out).splitlines()[0] == f"hh_rlhf: 6 upstream rows -> {out}"


# --- UltraFeedback -----------------------------------------------------------------------------

def test_ultrafeedback_pairs_carry_scores_as_rewards():
    first = rows(UPSTREAM / "ultrafeedback_binarized" / "train_prefs.jsonl")[0]
    prompt = [user("Write a haiku about rain.")]
    chosen = [assistant("Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky")]
    rejected = [assistant("Rain is wet.")]
    pid = "3f1a9c0e5b7d2f4a6c8e0b1d3f5a7c9e1b3d5f7a9c1e3b5d7f9a1c3e5b7d9f1a"
    assert ultrafeedback.convert(first) == {
        "pref": [{"prompt": prompt, "chosen": chosen, "rejected": rejected, "id": pid}],
        "sft": [{"prompt": prompt, "completion": chosen, "id": pid}],
        "kto": [
            {"prompt": prompt, "completion": chosen, "label": True, "id": pid},
            {"prompt": prompt, "completion": rejected, "label": False, "id": pid},
        ],
        "rw": [{"prompt": prompt, "completions": [chosen, rejected], "rewards": [8.5, 3.0], "id": pid}],
    }


def test_ultrafeedback_reads_parquet_and_skips_identical_pairs(tmp_path):
    parquet = to_parquet(UPSTREAM / "ultrafeedback_binarized" / "train_prefs.jsonl", tmp_path / "train_prefs.parquet")
    result = convert_rows("ultrafeedback_binarized", ((w, r, "train") for w, r in read_upstream(parquet)))
    assert [p["chosen"][0]["content"] for p in result.records["train"]["pref"]] == [
        "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky", "2 + 2 = 4."]
    assert dict(result.skipped) == {"chosen and rejected replies are identical": 1}


def test_ultrafeedback_bad_message_list_names_the_row(tmp_path):
    good = rows(UPSTREAM / "ultrafeedback_binarized" / "train_prefs.jsonl")[0]
    bad = dict(good, rejected=[{"role": "user", "content": "x"}])
    path = tmp_path / "uf.parquet"
    pq.write_table(pa.Table.from_pylist([good, bad]), path)
    with pytest.raises(TaxfreeError, match=r"uf\.parquet: row 2: ultrafeedback_binarized: 'rejected': "
                                           r"'messages' must end with an assistant message"):
        convert_file("ultrafeedback_binarized", path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- IMDB --------------------------------------------------------------------------------------

def test_imdb_prompt_is_the_first_eight_words():
    first = rows(UPSTREAM / "imdb" / "train.jsonl")[0]
    review = "I loved this movie from the very first scene to the end.\n\nThe acting was superb."
    assert imdb.PROMPT_WORDS == 8
    assert imdb.convert(first) == {
        "prompt": [{"prompt": "I loved this movie from the very first", "sentiment": "positive"}],
        "sft": [{"prompt": "I loved this movie from the very first",
                 "completion": " scene to the end.\n\nThe acting was superb.", "sentiment": "positive"}],
        "text": [{"text": review, "sentiment": "positive"}],
    }


def test_imdb_negative_review_and_short_review():
    second, third = rows(UPSTREAM / "imdb" / "train.jsonl")[1:]
    out = imdb.convert(second)
    assert out["sft"] == [{"prompt": "This film was a waste of two hours",
                           "completion": " and I want them back.", "sentiment": "negative"}]
    with pytest.raises(SkipRecord, match="^review shorter than 9 words$"):
        imdb.convert(third)
    assert imdb.convert(second, prompt_words=2)["prompt"] == [{"prompt": "This film", "sentiment": "negative"}]


def test_imdb_bad_label_is_an_error():
    with pytest.raises(TaxfreeError, match=r"imdb: 'label' must be 0, 1 or -1, got 3"):
        imdb.convert({"text": "one two three four five six seven eight nine ten", "label": 3})


def test_imdb_parquet_split_by_prompt_is_seeded(tmp_path):
    parquet = to_parquet(UPSTREAM / "imdb" / "train.jsonl", tmp_path / "train-00000-of-00001.parquet")
    a = convert_file("imdb", parquet, tmp_path / "a", test_fraction=0.5, seed=1)
    b = convert_file("imdb", [parquet], tmp_path / "b", test_fraction=0.5, seed=1)
    assert a.counts() == b.counts() == {
        "prompt_train.jsonl": 1, "sft_train.jsonl": 1, "text_train.jsonl": 1,
        "prompt_test.jsonl": 1, "sft_test.jsonl": 1, "text_test.jsonl": 1,
    }
    assert (tmp_path / "a" / "sft_test.jsonl").read_bytes() == (tmp_path / "b" / "sft_test.jsonl").read_bytes()
    train = read_jsonl(tmp_path / "a" / "text_train.jsonl", kind="text")
    test = read_jsonl(tmp_path / "a" / "text_test.jsonl", kind="text")
    assert {r["sentiment"] for r in train + test} == {"positive", "negative"}


# --- TL;DR -------------------------------------------------------------------------------------

TLDR_PROMPT = (
    "SUBREDDIT: r/relationships\nTITLE: Roommate won't do dishes\n"
    "POST: My roommate never washes the dishes and the sink is always full. I asked nicely twice.\nTL;DR:"
)


def test_tldr_choice_picks_the_chosen_summary():
    first, second = rows(UPSTREAM / "tldr" / "batch3.json")[:2]
    assert tldr.convert(first) == {
        "pref": [{"prompt": TLDR_PROMPT, "chosen": " roommate leaves dishes, asked twice, nothing changed",
                  "rejected": " I like dishes", "post_id": "t3_1abc"}],
        "sft": [{"prompt": TLDR_PROMPT, "completion": " roommate leaves dishes, asked twice, nothing changed",
                 "post_id": "t3_1abc"}],
        "kto": [
            {"prompt": TLDR_PROMPT, "completion": " roommate leaves dishes, asked twice, nothing changed",
             "label": True, "post_id": "t3_1abc"},
            {"prompt": TLDR_PROMPT, "completion": " I like dishes", "label": False, "post_id": "t3_1abc"},
        ],
        "rw": [{"prompt": TLDR_PROMPT,
                "completions": [" roommate leaves dishes, asked twice, nothing changed", " I like dishes"],
                "rewards": [1.0, 0.0], "post_id": "t3_1abc"}],
    }
    assert tldr.convert(second)["pref"] == [{
        "prompt": TLDR_PROMPT, "chosen": " Roommate ignores my requests to wash dishes.",
        "rejected": " I like dishes", "post_id": "t3_1abc"}]


def test_tldr_skips_cnndm_and_identical_summaries():
    cnndm, same = rows(UPSTREAM / "tldr" / "batch3.json")[2:]
    with pytest.raises(SkipRecord, match=r"^not a Reddit post \(CNN/DM article\)$"):
        tldr.convert(cnndm)
    with pytest.raises(SkipRecord, match="^chosen and rejected summaries are identical$"):
        tldr.convert(same)


def test_tldr_bad_choice_names_file_and_line(tmp_path):
    lines = (UPSTREAM / "tldr" / "batch3.json").read_text().splitlines()
    row = json.loads(lines[1])
    row["choice"] = 2
    path = tmp_path / "batch9.json"
    path.write_text("\n".join([lines[0], json.dumps(row)]) + "\n")
    with pytest.raises(TaxfreeError, match=r"batch9\.json:2: tldr: 'choice' must be 0 or 1, got 2$"):
        convert_file("tldr", path, tmp_path / "out")


def test_tldr_comparisons_of_one_post_stay_in_one_split(tmp_path):
    result = convert_file("tldr", UPSTREAM / "tldr" / "batch3.json", tmp_path / "t", test_fraction=0.5)
    # one usable post: it cannot be both train and test, and train is never emptied
    assert result.counts() == {"kto_train.jsonl": 4, "pref_train.jsonl": 2, "rw_train.jsonl": 2, "sft_train.jsonl": 2}


# --- ShareGPT ----------------------------------------------------------------------------------

def test_sharegpt_maps_speakers_to_roles():
    first, second, third = rows(UPSTREAM / "sharegpt" / "slimorca_sample.jsonl")
    assert sharegpt.convert(first) == {"sft": [{"messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        user("Translate 'bonjour' to English."),
        assistant("'Bonjour' means 'hello'."),
    ]}]}
    # trailing user turn after the last reply is dropped; "id" is kept
    assert sharegpt.convert(second) == {"sft": [{"messages": [
        user("Give me a fruit."), assistant("An apple."), user("Another one."), assistant("A pear."),
    ], "id": "QWJ3kX_0"}]}
    with pytest.raises(SkipRecord, match="^unknown speaker 'narrator'$"):
        sharegpt.convert(third)


def test_sharegpt_convert_file_writes_valid_sft(tmp_path):
    result = convert_file("sharegpt", UPSTREAM / "sharegpt" / "slimorca_sample.jsonl", tmp_path / "s",
                          test_fraction=0.5, seed=0)
    assert sum(result.counts().values()) == 2
    assert set(result.counts()) == {"sft_train.jsonl", "sft_test.jsonl"}
    for name in result.counts():
        assert len(read_jsonl(tmp_path / "s" / name, kind="sft")) == 1


# --- shared machinery --------------------------------------------------------------------------

def test_json_array_input_is_read(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows(UPSTREAM / "imdb" / "train.jsonl")))
    assert [where.split(": ")[-1] for where, _ in read_upstream(path)] == ["item 1", "item 2", "item 3"]


def test_all_rows_skipped_empty_input_and_bad_files_are_errors(tmp_path):
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}) + "\n")
    with pytest.raises(TaxfreeError, match=r"hh_rlhf: all 1 upstream rows were skipped \(1 chosen and rejected replies are identical\)"):
        convert_file("hh_rlhf", same, tmp_path / "o1")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TaxfreeError, match=r"imdb: no upstream rows \(empty data set\)"):
        convert_file("imdb", empty, tmp_path / "o2")
    csv = tmp_path / "train.csv"
    csv.write_text("text,label\n")
    with pytest.raises(TaxfreeError, match=r"train\.csv: unknown upstream file type"):
        list(read_upstream(csv))
    broken = tmp_path / "x.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(TaxfreeError, match=r"x\.parquet: not a readable parquet file"):
        list(read_upstream(broken))
    with pytest.raises(TaxfreeError, match=r"unknown data source 'hh' \(choose from hh_rlhf, "):
        convert_file("hh", same, tmp_path / "o3")
    with pytest.raises(TaxfreeError, match=r"test fraction must be in \[0, 1\), got 1\.0"):
        convert_file("imdb", UPSTREAM / "imdb" / "train.jsonl", tmp_path / "o4", test_fraction=1.0)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "imdb"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(TaxfreeError, match=r"imdb: output directory exists and is not empty \(use --force"):
        convert_file("imdb", UPSTREAM / "imdb" / "train.jsonl", out, test_fraction=0)
    result = convert_file("imdb", UPSTREAM / "imdb" / "train.jsonl", out, test_fraction=0, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["conversion.json", "prompt_train.jsonl", "sft_train.jsonl",
                                                    "text_train.jsonl"]
    assert result.counts()["sft_train.jsonl"] == 2


def test_upstream_type_errors_name_key_and_types():
    with pytest.raises(TaxfreeError, match=r"^tldr: 'choice' must be int, got bool$"):
        tldr.convert({"info": {}, "summaries": [], "choice": True})
    with pytest.raises(TaxfreeError, match=r"^sharegpt: 'conversations' must be list, got str$"):
        sharegpt.convert({"conversations": "human: hi"})
    with pytest.raises(TaxfreeError, match=r"^ultrafeedback_binarized: 'score_chosen' must be int or float, got null$"):
        ultrafeedback.convert(dict(rows(UPSTREAM / "ultrafeedback_binarized" / "train_prefs.jsonl")[0], score_chosen=None))
