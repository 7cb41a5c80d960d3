"""Record kinds: validation errors name file and line; conversions between kinds are exact."""

from __future__ import annotations

import gzip
import json

import pytest

from taxfree.data.records import (
    RECORD_KINDS,
    as_messages,
    completion_text,
    pref_to_kto,
    pref_to_rw,
    pref_to_sft,
    read_jsonl,
    rw_to_pref,
    sft_to_prompt_completion,
    validate_record,
    write_jsonl,
)
from taxfree.errors import TaxfreeError

USER = [{"role": "user", "content": "Hi?"}]
A = [{"role": "assistant", "content": "Hello."}]
B = [{"role": "assistant", "content": "Go away."}]

VALID = {
    "text": {"text": "Once upon a time."},
    "prompt": {"prompt": USER},
    "sft": {"messages": USER + A},
    "pref": {"prompt": "Q:", "chosen": " yes", "rejected": " no", "id": 7},
    "rw": {"prompt": USER, "completions": [A, B, A], "rewards": [1, 0.5, -2.0]},
    "kto": {"prompt": "Q:", "completion": " yes", "label": False},
}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_record_kinds_are_the_project_formats():
    assert set(RECORD_KINDS) == {"text", "prompt", "sft", "pref", "rw", "kto"}
    assert RECORD_KINDS["rw"] == ("prompt", "completions", "rewards")


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_records_pass(kind):
    assert validate_record(kind, VALID[kind]) is None


def test_sft_prompt_completion_form_passes():
    assert validate_record("sft", {"prompt": USER, "completion": A}) is None
    assert validate_record("sft", {"prompt": "Q:", "completion": ""}) is None


@pytest.mark.parametrize(
    "kind, obj, message",
    [
        ("text", {"text": ""}, "'text' is an empty string"),
        ("text", {"text": ["a"]}, "'text' must be a string, got list"),
        ("text", {"txt": "x"}, "text record is missing 'text'"),
        ("prompt", {"prompt": 3}, "'prompt' must be a string or a list of messages, got int"),
        ("prompt", {"prompt": []}, "'prompt' is an empty message list"),
        ("prompt", {"prompt": [{"role": "human", "content": "x"}]},
         "'prompt[0].role' must be one of system, user, assistant, tool, got 'human'"),
        ("prompt", {"prompt": [{"role": "user", "content": None}]}, "'prompt[0].content' must be a string, got null"),
        ("sft", {"messages": USER}, "'messages' must end with an assistant message, got role 'user'"),
        ("sft", {"messages": USER + A, "prompt": "x"}, "sft record has both 'messages' and 'prompt'/'completion'"),
        ("sft", {"prompt": "Q"}, "sft record is missing 'completion'"),
        ("sft", {}, "sft record needs 'messages' or 'prompt' and 'completion'"),
        ("pref", {"prompt": "Q", "chosen": "a"}, "pref record is missing 'rejected'"),
        ("pref", {"prompt": "Q", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are identical"),
        ("pref", {"prompt": "Q", "chosen": A, "rejected": "a"}, "'chosen' must be a string like the prompt, got list"),
        ("pref", {"prompt": USER, "chosen": "a", "rejected": B},
         "'chosen' must be a list of messages like the prompt, got string"),
        ("pref", {"prompt": USER, "chosen": USER, "rejected": B}, "'chosen' must end with an assistant message"),
        ("pref", {"prompt": "  ", "chosen": "a", "rejected": "b"}, "'prompt' is an empty string"),
        ("rw", {"prompt": "Q", "completions": ["a", "b"], "rewards": [1.0]},
         "'completions' has 2 entries but 'rewards' has 1"),
        ("rw", {"prompt": "Q", "completions": ["a"], "rewards": [1.0]}, "at least 2 completions, got 1"),
        ("rw", {"prompt": "Q", "completions": ["a", "b"], "rewards": [1.0, float("nan")]},
         "'rewards[1]' is not finite (nan)"),
        ("rw", {"prompt": "Q", "completions": ["a", "b"], "rewards": [1.0, float("inf")]},
         "'rewards[1]' is not finite (inf)"),
        ("rw", {"prompt": "Q", "completions": ["a", "b"], "rewards": [True, 0.0]}, "'rewards[0]' must be a number, got bool"),
        ("rw", {"prompt": "Q", "completions": "ab", "rewards": [1, 0]}, "'completions' must be a list, got string"),
        ("kto", {"prompt": "Q", "completion": "a", "label": 1}, "'label' must be true or false, got int"),
        ("kto", ["Q", "a"], "a kto record must be a JSON object, got list"),
    ],
)
def test_invalid_records_name_where_and_why(kind, obj, message):
    with pytest.raises(TaxfreeError) as err:
        validate_record(kind, obj, where="f.jsonl:4")
    text = str(err.value)
    assert text.startswith("f.jsonl:4: ")
    assert message in text
    assert "\n" not in text


def test_unknown_kind_is_an_error():
    with pytest.raises(TaxfreeError, match=r"unknown record kind 'prefs' \(choose from text, prompt, sft, pref, rw, kto\)"):
        validate_record("prefs", {})


def test_read_jsonl_returns_records_and_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(VALID["pref"]), "", json.dumps(VALID["pref"] | {"id": 8})])
    assert read_jsonl(path, kind="pref") == [VALID["pref"], VALID["pref"] | {"id": 8}]


def test_read_jsonl_reads_gzip(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n'))
    assert read_jsonl(path, kind="text") == [{"text": "a"}]


@pytest.mark.parametrize(
    "lines, kind, expected",
    [
        (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], "text", r":2: malformed JSON \(Expecting ',' delimiter at column 13\)"),
        (['{"text": "a"}', '["text"]'], None, r":2: a record must be a JSON object, got list"),
        (['{"text": "a"}', '{"text": "b"}', '{"txt": "c"}'], "text", r":3: text record is missing 'text'"),
        (['{"prompt": "Q", "completions": ["a", "b", "c"], "rewards": [1, 2]}'], "rw",
         r":1: 'completions' has 3 entries but 'rewards' has 2"),
        (['{"prompt": "Q", "completions": ["a", "b"], "rewards": [1, NaN]}'], "rw", r":1: 'rewards\[1\]' is not finite"),
        (['{"prompt": "Q", "chosen": "x", "rejected": "x"}'], "pref", r":1: 'chosen' and 'rejected' are identical"),
        (['{"prompt": "Q", "completion": "a", "label": "yes"}'], "kto", r":1: 'label' must be true or false, got string"),
        (['{"prompt": "Q", "chosen": "a", "rejected": "b"}',
          '{"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "a"}], '
          '"rejected": [{"role": "assistant", "content": "b"}]}'],
         "pref", r":2: conversational record in a file whose line 1 is standard"),
    ],
)
def test_read_jsonl_names_the_first_bad_line(tmp_path, lines, kind, expected):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TaxfreeError, match=r"^" + str(path).replace(".", r"\.") + expected):
        read_jsonl(path, kind=kind)


def test_read_jsonl_empty_file_and_missing_file_are_errors(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(TaxfreeError, match=r"empty\.jsonl: no records \(empty data set\)$"):
        read_jsonl(empty, kind="text")
    with pytest.raises(TaxfreeError, match=r"nope\.jsonl: no such file$"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_read_jsonl_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(TaxfreeError, match=r"latin\.jsonl:2: not valid UTF-8 \(invalid continuation byte at byte 14\)$"):
        read_jsonl(path, kind="text")


def test_write_jsonl_round_trips_and_leaves_no_temporary_files(tmp_path):
    records = [VALID["kto"], {"prompt": "Ünïcode", "completion": "✓", "label": True}]
    path = tmp_path / "out" / "kto.jsonl"
    assert write_jsonl(path, records, kind="kto") == 2
    assert path.read_text(encoding="utf-8").splitlines()[1] == '{"prompt": "Ünïcode", "completion": "✓", "label": true}'
    assert read_jsonl(path, kind="kto") == records
    assert sorted(p.name for p in path.parent.iterdir()) == ["kto.jsonl"]


def test_write_jsonl_validates_before_writing(tmp_path):
    path = tmp_path / "pref.jsonl"
    with pytest.raises(TaxfreeError, match=r"pref\.jsonl: record 2: 'chosen' and 'rejected' are identical"):
        write_jsonl(path, [VALID["pref"], {"prompt": "Q", "chosen": "a", "rejected": "a"}], kind="pref")
    assert not path.exists()


def test_as_messages_and_completion_text():
    assert as_messages("Hi?") == USER
    assert as_messages("Be brief.", role="system") == [{"role": "system", "content": "Be brief."}]
    assert as_messages(USER + A) == USER + A
    assert completion_text(" yes") == " yes"
    assert completion_text(A + [{"role": "assistant", "content": "Bye."}]) == "Hello.\n\nBye."
    with pytest.raises(TaxfreeError, match="expected a string or a list of messages, got int"):
        completion_text(3)


def test_pref_conversions_keep_extras():
    pref = {"prompt": USER, "chosen": A, "rejected": B, "id": "p1"}
    assert pref_to_sft(pref) == {"prompt": USER, "completion": A, "id": "p1"}
    assert pref_to_kto(pref) == [
        {"prompt": USER, "completion": A, "label": True, "id": "p1"},
        {"prompt": USER, "completion": B, "label": False, "id": "p1"},
    ]
    assert pref_to_rw(pref) == {"prompt": USER, "completions": [A, B], "rewards": [1.0, 0.0], "id": "p1"}
    assert pref_to_rw(pref, rewards=(8.5, 3)) ["rewards"] == [8.5, 3.0]
    for kind, out in (("sft", pref_to_sft(pref)), ("rw", pref_to_rw(pref))):
        validate_record(kind, out)


def test_rw_to_pref_takes_best_against_worst():
    rw = {"prompt": "Q", "completions": ["a", "b", "c", "d"], "rewards": [0.5, 2.0, -1.0, 2.0], "id": 3}
    assert rw_to_pref(rw) == {"prompt": "Q", "chosen": "b", "rejected": "c", "id": 3}
    assert rw_to_pref({"prompt": "Q", "completions": ["a", "b"], "rewards": [1.0, 1.0]}) is None
    assert rw_to_pref({"prompt": "Q", "completions": ["a", "a"], "rewards": [1.0, 0.0]}) is None


def test_sft_messages_to_prompt_completion():
    sft = {"messages": [{"role": "system", "content": "S"}] + USER + A, "id": 1}
    assert sft_to_prompt_completion(sft) == {
        "prompt": [{"role": "system", "content": "S"}] + USER,
        "completion": A,
        "id": 1,
    }
    already = {"prompt": "Q", "completion": "a"}
    assert sft_to_prompt_completion(already) == already
    with pytest.raises(TaxfreeError, match="needs a prompt message before the final assistant reply"):
        sft_to_prompt_completion({"messages": A})
