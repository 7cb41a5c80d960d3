"""The bad-input matrix (issue 9): every mistake a user can make with data, configs, models,
tokenizers and merges ends as exactly one `error: ...` line on stderr, exit code 2, no
traceback, and nothing written. docs/reliability.md lists the same cases with their messages.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, write_config
from taxfree.cli import main
from taxfree.errors import TaxfreeError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# -- helpers ---------------------------------------------------------------------------------

def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `taxfree ARGV` in this process."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, expected, only_line=True):
    """Exit 2, exactly one `error:` line, holding `expected`, and no traceback.

    `only_line`: nothing else on stderr either (errors found before any stage starts); else
    stage logs and progress bars (which end lines with a carriage return) may surround it.
    """
    lines = [l for l in re.split(r"[\r\n]", err) if l.strip()]
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1, err
    assert expected in errors[0], f"{expected!r} not in {errors[0]!r}"
    if only_line:
        assert err.endswith("\n") and err.count("\n") == 1 and lines == errors, err
    return errors[0]


def _doc_rows() -> dict[str, str]:
    """docs/reliability.md's case tables: case id -> the message the row says the user gets."""
    rows = {}
    for line in (REPO / "docs" / "reliability.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| `([^`]+)` \|.*\| `(error: [^`]*)` \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


DOC_ROWS = _doc_rows()


def assert_doc_says(case: str, line: str, **where: Path):
    """The doc's row for `case` is the message the user got, with the test's own paths written
    as the doc writes them (`where`: the printed name -> the path)."""
    for name, path in sorted(where.items(), key=lambda kv: -len(str(kv[1]))):
        line = line.replace(str(path), name)
    assert DOC_ROWS.get(case) == line, f"docs/reliability.md row {case!r}: {DOC_ROWS.get(case)!r} != {line!r}"


def snapshot(root: Path) -> dict:
    """Every path below root with its size and mtime: equal snapshots = nothing written."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.startswith((".tmp-", ".old-"))]


# -- inputs: one tiny model, tokenizers with and without special tokens, broken directories ---

@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from helpers_tokenizer import char_tokenizer
    from taxfree.models import tiny_llama

    root = tmp_path_factory.mktemp("kit")
    tok = char_tokenizer()
    tok.save_pretrained(root / "tok")
    shape = dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    model = tiny_llama(len(tok), pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    tiny_llama(50, **shape).save_pretrained(root / "small_vocab")

    def bare_tokenizer(path, **special):
        vocab = {"<unk>": 0, "<pad>": 1, "a": 2}
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **special).save_pretrained(path)

    bare_tokenizer(root / "tok_bare")  # neither pad nor eos
    bare_tokenizer(root / "tok_noeos", pad_token="<pad>")
    nochat = char_tokenizer()
    nochat.chat_template = None
    nochat.save_pretrained(root / "tok_nochat")

    config = (root / "model" / "config.json").read_text()
    broken = {
        "garbage": {"config.json": '{"model_type": "llama",\n'},
        "listcfg": {"config.json": "[1, 2]"},
        "notype": {"config.json": '{"hidden_size": 16}'},
        "unknown": {"config.json": '{"model_type": "nonsense"}'},
        "noweights": {"config.json": config},
        "pickle": {"config.json": config, "pytorch_model.bin": "not read"},
    }
    for name, files in broken.items():
        (root / name).mkdir()
        for f, text in files.items():
            (root / name / f).write_text(text)
    weights = (root / "model" / "model.safetensors").read_bytes()
    for name, size in (("trunc_header", 300), ("trunc_data", 1300)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(config)
        (root / name / "model.safetensors").write_bytes(weights[:size])
    (root / "noconfig").mkdir()

    data = {
        "sft.jsonl": [{"prompt": "hi", "completion": "hello"}, {"prompt": "yo", "completion": "hey"}],
        "chat.jsonl": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
        "pref.jsonl": [{"prompt": "hi", "chosen": "hello!", "rejected": "go away"},
                       {"prompt": "yo", "chosen": "hey!", "rejected": "no"}],
        "long_sft.jsonl": [{"prompt": "tell me " * 20, "completion": "ok"}],
    }
    for name, records in data.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n')
    (root / "empty.jsonl").write_text("")
    (root / "missing.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n')
    return root


def base_config(kit: Path, runs: Path) -> dict:
    """A world-less experiment on the kit's tiny model: sft, rm and align read only given inputs."""
    return {
        "name": "b",
        "run_dir": str(runs),
        "world": {"kind": "none"},
        "models": {"base": str(kit / "model"), "tokenizer": str(kit / "tok")},
        "data": {"sft_train": str(kit / "sft.jsonl"), "pref_train": str(kit / "pref.jsonl")},
        "stages": ["sft", "rm", "align"],
        "sft": {"max_steps": 2, "batch_size": 2, "max_length": 64, "save_steps": 1},
    }


# -- 1. data files: `taxfree data validate KIND FILE` ----------------------------------------

DATA_CASES = [
    # id, kind, file content, expected message ({f} = the file)
    ("malformed-json", "sft", b'{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n',
     "{f}:2: malformed JSON (Expecting ',' delimiter at column 16)"),
    ("truncated-line", "sft", b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "compl',
     "{f}:3: malformed JSON (Unterminated string starting at column 17)"),
    ("not-utf8", "text", b'{"text": "caf\xe9"}\n', "{f}:1: not valid UTF-8 (invalid continuation byte at byte 14)"),
    ("not-an-object", "sft", b'["prompt", "completion"]\n', "{f}:1: a sft record must be a JSON object, got list"),
    ("missing-field", "pref", b'{"prompt": "a", "chosen": "b"}\n', "{f}:1: pref record is missing 'rejected'"),
    ("missing-sft-fields", "sft", b'{"prompt": "a"}\n', "{f}:1: sft record is missing 'completion'"),
    ("wrong-type-label", "kto", b'{"prompt": "a", "completion": "b", "label": "yes"}\n',
     "{f}:1: 'label' must be true or false, got string"),
    ("wrong-type-prompt", "pref", b'{"prompt": 7, "chosen": "b", "rejected": "c"}\n',
     "{f}:1: 'prompt' must be a string or a list of messages, got int"),
    ("wrong-type-completion", "pref", b'{"prompt": "a", "chosen": ["b"], "rejected": "c"}\n',
     "{f}:1: 'chosen' must be a string like the prompt, got list"),
    ("bad-role", "sft", b'{"messages": [{"role": "human", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     "{f}:1: 'messages[0].role' must be one of system, user, assistant, tool, got 'human'"),
    ("no-assistant-reply", "sft", b'{"messages": [{"role": "user", "content": "a"}]}\n',
     "{f}:1: 'messages' must end with an assistant message, got role 'user'"),
    ("identical-pair", "pref", b'{"prompt": "a", "chosen": "b", "rejected": "b"}\n',
     "{f}:1: 'chosen' and 'rejected' are identical (a pair without a preference)"),
    ("rw-counts", "rw", b'{"prompt": "a", "completions": ["b", "c", "d"], "rewards": [1, 0]}\n',
     "{f}:1: 'completions' has 3 entries but 'rewards' has 2"),
    ("rw-one-completion", "rw", b'{"prompt": "a", "completions": ["b"], "rewards": [1]}\n',
     "{f}:1: a rw record contrasts at least 2 completions, got 1"),
    ("rw-reward-type", "rw", b'{"prompt": "a", "completions": ["b", "c"], "rewards": [1, "high"]}\n',
     "{f}:1: 'rewards[1]' must be a number, got string"),
    ("rw-reward-nan", "rw", b'{"prompt": "a", "completions": ["b", "c"], "rewards": [NaN, 0]}\n',
     "{f}:1: 'rewards[0]' is not finite (nan)"),
    ("mixed-formats", "pref",
     b'{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}], '
     b'"rejected": [{"role": "assistant", "content": "c"}]}\n{"prompt": "a", "chosen": "b", "rejected": "c"}\n',
     "{f}:2: standard record in a file whose line 1 is conversational"),
    ("empty-text", "text", b'{"text": "   "}\n', "{f}:1: 'text' is an empty string"),
    ("empty-file", "sft", b"", "{f}: no records (empty data set)"),
    ("blank-lines-only", "pref", b"\n  \n\n", "{f}: no records (empty data set)"),
]


@pytest.mark.parametrize("case,kind,content,expected", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(tmp_path, capsys, case, kind, content, expected):
    f = tmp_path / f"{case}.jsonl"
    f.write_bytes(content)
    before = snapshot(tmp_path)
    rc, out, err = run_cli(["data", "validate", kind, f], capsys)
    line = assert_user_error(rc, err, expected.format(f=f))
    assert out == "" and snapshot(tmp_path) == before
    assert_doc_says(case, line, FILE=f)


def test_data_validate_unknown_kind_and_missing_file(tmp_path, capsys):
    f = tmp_path / "x.jsonl"
    f.write_text('{"prompt": "a"}\n')
    rc, _, err = run_cli(["data", "validate", "prefs", f], capsys)
    assert_user_error(rc, err, "unknown record kind 'prefs' (choose from text, prompt, sft, pref, rw, kto)")
    rc, _, err = run_cli(["data", "validate", "pref", tmp_path / "nope.jsonl"], capsys)
    assert_user_error(rc, err, f"{tmp_path / 'nope.jsonl'}: no such file")


# -- 2. configs, and the data / models / tokenizers they name: `taxfree validate` and `run` ---

CONFIG_CASES = [
    # id, --set overrides ({k} = the kit directory), expected message after "<config>: "
    ("unknown-method", ["align.methods=[dpoo]"], "align.methods: unknown method 'dpoo' (did you mean dpo?)"),
    ("unknown-loss", ["align.methods=[exo-pairs]"], "align.methods: unknown method 'exo-pairs' (did you mean exo-pair?)"),
    ("unknown-optimizer", ["align.optimizers=[adamw, ondar]"],
     "align.optimizers: unknown optimizer 'ondar' (did you mean ondare?)"),
    ("unknown-optimizer-name", ["sft.optimizer.name=sgd"], "sft.optimizer.name: 'sgd' is not one of adamw, ondare, onties"),
    ("reserve-p-zero", ["align.optimizer.reserve_p=0"], "align.optimizer.reserve_p: 0.0 is outside (0, 1]"),
    ("reserve-p-above-one", ["align.optimizer.reserve_p=1.5"], "align.optimizer.reserve_p: 1.5 is outside (0, 1]"),
    ("alpha-out-of-range", ["align.optimizer.alpha=-0.1"], "align.optimizer.alpha: -0.1 is outside [0, 1]"),
    ("negative-beta", ["align.beta=-0.1"], "align.beta: must be > 0"),
    ("zero-beta-r", ["align.beta_r=0"], "align.beta_r: must be > 0"),
    ("label-smoothing", ["align.label_smoothing=0.7"], "align.label_smoothing: 0.7 is outside [0, 0.5)"),
    ("k-above-completions", ["align.methods=[exo-rw]", "align.num_completions=8", "sample.num_completions=4"],
     "align.num_completions: K = 8 is more than the 4 completions per prompt the sample stage draws"),
    ("k-below-two", ["align.num_completions=1"], "align.num_completions: must be >= 2"),
    ("max-steps-negative", ["sft.max_steps=-3"], "sft.max_steps: -3: must be -1 (train by epochs) or a number of steps >= 1"),
    ("name-dotdot", ["name=.."], "name: must be a plain directory name, got '..'"),
    ("name-slash", ["name=../escape"], "name: must be a plain directory name, got '../escape'"),
    ("evaluate-model-escape", ["stages=[evaluate]", "evaluate.models=[../../outside]"],
     "evaluate.models: '../../outside' is not a model id of a run"),
    ("evaluate-model-absolute", ["stages=[evaluate]", "evaluate.models=[/tmp/x]"],
     "evaluate.models: '/tmp/x' is not a model id of a run"),
    ("code-benchmark", ["stages=[evaluate]", "evaluate.benchmarks=[humaneval]"],
     "evaluate.benchmarks: humaneval run model-written code"),
    ("data-missing", ["data.sft_train={k}/nope.jsonl"], "data.sft_train: file not found: {k}/nope.jsonl"),
    ("data-malformed", ["data.sft_train={k}/bad.jsonl"],
     "data.sft_train: {k}/bad.jsonl:2: malformed JSON (Expecting ',' delimiter at column 16)"),
    ("data-empty", ["data.pref_train={k}/empty.jsonl"], "data.pref_train: {k}/empty.jsonl: no records (empty data set)"),
    ("data-missing-field", ["data.pref_train={k}/missing.jsonl"],
     "data.pref_train: {k}/missing.jsonl:1: pref record is missing 'rejected'"),
    ("data-wrong-kind", ["data.sft_train={k}/pref.jsonl"],
     "data.sft_train: {k}/pref.jsonl:1: sft record is missing 'completion'"),
    ("model-missing", ["models.base={k}/nowhere"], "models.base: model directory not found: {k}/nowhere"),
    ("model-no-config", ["models.base={k}/noconfig"], "models.base: {k}/noconfig has no config.json"),
    ("model-config-garbage", ["models.base={k}/garbage"],
     "models.base: {k}/garbage/config.json: not valid JSON (Expecting property name enclosed in double quotes at line 2 column 1)"),
    ("model-config-not-object", ["models.base={k}/listcfg"], "models.base: {k}/listcfg/config.json: expected a JSON object, got list"),
    ("model-config-no-type", ["models.base={k}/notype"], "models.base: {k}/notype/config.json: no model_type"),
    ("model-unknown-type", ["models.base={k}/unknown"],
     "models.base: {k}/unknown/config.json: model_type 'nonsense' is not an architecture this transformers knows"),
    ("model-no-weights", ["models.base={k}/noweights"],
     "models.base: {k}/noweights: no model.safetensors or model.safetensors.index.json"),
    ("model-pickle-weights", ["models.base={k}/pickle"],
     "models.base: {k}/pickle: no model.safetensors or model.safetensors.index.json (found pytorch_model.bin: "
     "pickle weights are not read; convert them to safetensors)"),
    ("model-truncated-header", ["models.base={k}/trunc_header"],
     "models.base: {k}/trunc_header/model.safetensors: truncated or not a safetensors file"),
    ("model-truncated-data", ["models.base={k}/trunc_data"],
     "models.base: {k}/trunc_data/model.safetensors: tensor 'lm_head.weight': data offsets 0..6656: the file is truncated"),
    ("tokenizer-no-pad-no-eos", ["models.tokenizer={k}/tok_bare"],
     "models.tokenizer: {k}/tok_bare: tokenizer has neither a pad nor an eos token"),
    ("tokenizer-no-eos", ["models.tokenizer={k}/tok_noeos"],
     "models.tokenizer: {k}/tok_noeos: tokenizer has no eos token, which the sft stage needs to end sequences"),
    ("tokenizer-no-chat-template", ["models.tokenizer={k}/tok_nochat", "data.sft_train={k}/chat.jsonl"],
     "models.tokenizer: {k}/tok_nochat: tokenizer has no chat template, but data.sft_train holds chat messages"),
    ("tokenizer-vocab-mismatch", ["models.base={k}/small_vocab"],
     "models.tokenizer: {k}/tok: tokenizer has 104 tokens but the model in {k}/small_vocab has vocab_size 50"),
    ("not-a-tokenizer", ["models.tokenizer={k}/noweights"], "models.tokenizer: {k}/noweights: no tokenizer files (tokenizer.json, tokenizer_config.json, tokenizer.model, ...)"),
]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case,overrides,expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_or_input(kit, tmp_path, capsys, command, case, overrides, expected):
    runs = tmp_path / "runs"
    path = write_config(tmp_path, base_config(kit, runs))
    before = snapshot(kit)
    sets = [a for o in overrides for a in ("--set", o.format(k=kit))]
    rc, out, err = run_cli([command, path, *sets], capsys)
    line = assert_user_error(rc, err, f"{path}: {expected.format(k=kit)}")
    assert out == ""
    assert not runs.exists() and snapshot(kit) == before
    assert_doc_says(case, line, **{"exp.yaml": path, "K": kit})


CONFIG_FILE_CASES = [
    # id, the config file's text, expected message after "<config>: "
    ("repeated-key", "name: a\nseed: 1\nname: b\n", "line 3: invalid YAML: key 'name' is given twice (lines 1 and 3)"),
    ("repeated-key-in-section", "name: a\nsft:\n  lr: 1.0e-5\n  epochs: 1\n  lr: 2.0e-5\n",
     "line 5: invalid YAML: key 'lr' is given twice (lines 3 and 5)"),
    ("empty-config", "", "the file is empty (or only comments): write the experiment's sections"),
    ("comments-only-config", "# name: demo\n\n", "the file is empty (or only comments): write the experiment's sections"),
]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case,text,expected", CONFIG_FILE_CASES, ids=[c[0] for c in CONFIG_FILE_CASES])
def test_bad_config_file(tmp_path, capsys, command, case, text, expected):
    """What YAML would accept silently (a key given twice: the last wins) or a config with nothing
    in it (the whole default experiment would run) is one error line, and nothing is written."""
    path = tmp_path / "exp.yaml"
    path.write_text(text, encoding="utf-8")
    before = snapshot(tmp_path)
    rc, out, err = run_cli([command, path], capsys)
    line = assert_user_error(rc, err, f"{path}: {expected}")
    assert out == "" and snapshot(tmp_path) == before
    assert_doc_says(case, line, **{"exp.yaml": path})


def test_stage_command_writes_nothing_on_bad_input(kit, tmp_path, capsys):
    """`taxfree sft CONFIG` checks its inputs before the stage directory exists."""
    runs = tmp_path / "runs"
    path = write_config(tmp_path, base_config(kit, runs))
    rc, _, err = run_cli(["sft", path, "--set", f"models.base={kit}/noweights"], capsys)
    assert_user_error(rc, err, "models.base: ")
    assert not runs.exists()


def test_only_the_planned_stages_inputs_are_opened(kit, tmp_path, capsys):
    """A bad file that no planned stage reads is not an error for that command."""
    runs = tmp_path / "runs"
    path = write_config(tmp_path, base_config(kit, runs))
    rc, _, err = run_cli(["validate", path, "--set", "stages=[sft]", "--set", f"data.pref_train={kit}/missing.jsonl"], capsys)
    assert rc == 0, err


def test_overlong_prompt_with_truncation_off(kit, tmp_path, capsys):
    runs = tmp_path / "runs"
    data = base_config(kit, runs)
    data["data"]["sft_train"] = str(kit / "long_sft.jsonl")
    data["sft"].update(max_length=16, truncation=False)
    path = write_config(tmp_path, data)
    rc, _, err = run_cli(["sft", path], capsys)
    assert_user_error(rc, err, f"{kit / 'long_sft.jsonl'}: record 1: ", only_line=False)
    import re

    count = re.search(r"record 1: (\d+) tokens, longer than sft\.max_length = 16 \(truncation is off", err)
    assert count is not None and int(count.group(1)) > 150, err  # ~170 characters of a char-level tokenizer
    assert not runs.exists()


def test_subprocess_errors_are_one_line(kit, tmp_path):
    """As a user runs it: `python -m taxfree ...` prints one line and exits 2, no traceback."""
    runs = tmp_path / "runs"
    path = write_config(tmp_path, base_config(kit, runs))
    for argv, expected in (
        (["validate", path, "--set", f"data.sft_train={kit}/bad.jsonl"], f"{kit}/bad.jsonl:2: malformed JSON"),
        (["run", path, "--set", f"models.base={kit}/garbage"], "config.json: not valid JSON"),
        (["data", "validate", "pref", kit / "missing.jsonl"], "pref record is missing 'rejected'"),
    ):
        r = subprocess.run([sys.executable, "-m", "taxfree", *map(str, argv)], capture_output=True, text=True,
                           env=ENV, cwd=REPO, timeout=120)
        assert_user_error(r.returncode, r.stderr, expected)
    assert not runs.exists()


# -- 3. merges: `taxfree merge` -----------------------------------------------------------------

@pytest.fixture(scope="module")
def merge_models(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from taxfree.models import tiny_llama

    root = tmp_path_factory.mktemp("merge_models")
    shape = dict(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    tiny_llama(40, seed=0, **shape).save_pretrained(root / "a")
    tiny_llama(40, seed=1, **shape).save_pretrained(root / "b")
    tiny_llama(48, seed=2, **shape).save_pretrained(root / "vocab")
    tiny_llama(40, seed=3, tie_word_embeddings=True, **shape).save_pretrained(root / "tied")
    Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=32)).save_pretrained(root / "qwen")
    (root / "garbage").mkdir()
    (root / "garbage" / "config.json").write_text("{nope")
    (root / "garbage" / "model.safetensors").write_bytes((root / "a" / "model.safetensors").read_bytes())
    return root


MERGE_CASES = [
    ("different-shapes", ["--sft", "{m}/a", "--aligned", "{m}/vocab", "--aligned-weight", "0.5"],
     "tensor 'lm_head.weight' has shape [40, 16] in sft ({m}/a) but [48, 16] in aligned ({m}/vocab)"),
    ("different-names", ["--sft", "{m}/a", "--aligned", "{m}/tied", "--aligned-weight", "0.5"],
     "tensor 'lm_head.weight' is in sft ({m}/a) but not in aligned ({m}/tied)"),
    ("different-architectures", ["--model", "{m}/a:0.5", "--model", "{m}/qwen:0.5"],
     "different architectures: {m}/a is llama, {m}/qwen is qwen2"),
    ("weight-above-one", ["--sft", "{m}/a", "--aligned", "{m}/b", "--aligned-weight", "1.5"],
     "--aligned-weight = 1.5 is outside [0, 1] (pass --allow-extrapolation to allow it)"),
    ("weight-negative", ["--sft", "{m}/a", "--aligned", "{m}/b", "--aligned-weight", "-0.1"],
     "--aligned-weight = -0.1 is outside [0, 1]"),
    ("weight-nan", ["--sft", "{m}/a", "--aligned", "{m}/b", "--aligned-weight", "nan"],
     "--aligned-weight must be a finite number, got nan"),
    ("weights-not-summing", ["--model", "{m}/a:0.7", "--model", "{m}/b:0.7"], "model weights sum to 1.4, not 1"),
    ("missing-model", ["--sft", "{m}/a", "--aligned", "{m}/nope", "--aligned-weight", "0.5"],
     "{m}/nope: no such checkpoint directory"),
    ("corrupt-config", ["--sft", "{m}/a", "--aligned", "{m}/garbage", "--aligned-weight", "0.5"],
     "{m}/garbage/config.json: cannot read: Expecting property name enclosed in double quotes"),
]


@pytest.mark.parametrize("case,argv,expected", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_bad_merge(merge_models, tmp_path, capsys, case, argv, expected):
    out = tmp_path / "out"
    before = snapshot(merge_models)
    rc, stdout, err = run_cli(["merge", *[a.format(m=merge_models) for a in argv], "--out", out], capsys)
    line = assert_user_error(rc, err, expected.format(m=merge_models))
    assert_doc_says(case, line.replace(f"{merge_models}/", ""))
    assert not out.exists() and leftovers(tmp_path) == [] and snapshot(merge_models) == before


# -- 4. a disk that fills up during a write --------------------------------------------------

def _enospc(path="?"):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_disk_full_in_atomic_write(tmp_path, monkeypatch):
    from taxfree import atomic
    from taxfree.data.records import write_jsonl

    def full(fd):
        raise _enospc()

    monkeypatch.setattr(atomic.os, "fsync", full)
    target = tmp_path / "out.jsonl"
    with pytest.raises(TaxfreeError, match=f"{target}: no space left on device while writing"):
        write_jsonl(target, [{"text": "a"}])
    assert list(tmp_path.iterdir()) == []


def test_disk_full_in_atomic_dir(tmp_path):
    from taxfree.atomic import atomic_dir

    with pytest.raises(TaxfreeError, match="no space left on device"):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "half.safetensors").write_bytes(b"x" * 10)
            raise _enospc(tmp / "half.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_merge_shard_writes(merge_models, tmp_path, capsys, monkeypatch):
    from taxfree.merging import checkpoint

    real = checkpoint.ShardedWriter.append
    calls = []

    def append(self, name, flat):
        calls.append(name)
        if len(calls) == 3:  # some bytes are already in a shard: the disk fills mid-file
            raise _enospc(self.out_dir / self.files[0])
        return real(self, name, flat)

    monkeypatch.setattr(checkpoint.ShardedWriter, "append", append)
    out = tmp_path / "out"
    rc, _, err = run_cli(["merge", "--sft", merge_models / "a", "--aligned", merge_models / "b",
                          "--aligned-weight", "0.5", "--out", out, "--max-shard-size", "2KB"], capsys)
    assert_user_error(rc, err, f"{out}: no space left on device while writing")
    assert len(calls) == 3
    assert not out.exists() and leftovers(tmp_path) == []


def test_disk_full_during_a_stage_removes_its_output(tmp_path, capsys, monkeypatch):
    """The world stage's writer hits a full disk: one error line, no run directory left."""
    import taxfree.stages.world as world

    from conftest import TINY_EXPERIMENT

    real = world.build_tiny_world

    def build(out_dir, **kw):
        real(out_dir, **kw)  # files are written, then the next write fails
        raise _enospc(Path(out_dir) / "world.json")

    monkeypatch.setattr(world, "build_tiny_world", build)
    runs = tmp_path / "runs"
    path = write_config(tmp_path, dict(copy.deepcopy(TINY_EXPERIMENT), run_dir=str(runs)))
    rc, _, err = run_cli(["world", path], capsys)
    assert_user_error(rc, err, "no space left on device while writing", only_line=False)
    assert not runs.exists()


def test_disk_full_keeps_complete_checkpoints_for_the_resume(tmp_path, capsys, monkeypatch):
    """Hours of training are not thrown away: the half-written checkpoint goes, the complete one
    and the start marker stay, and the re-run resumes."""
    import taxfree.stages.world as world

    from conftest import TINY_EXPERIMENT
    from taxfree.pipeline.manifest import MANIFEST, STARTED

    real = world.STAGE

    def run(ctx):
        for step, complete in ((2, True), (4, False)):
            d = ctx.checkpoint_dir / f"checkpoint-{step}"
            d.mkdir(parents=True)
            (d / "model.safetensors").write_bytes(b"weights")
            if complete:
                (d / "trainer_state.json").write_text('{"global_step": 2}')
        raise _enospc(ctx.checkpoint_dir / "checkpoint-4" / "optimizer.pt")

    monkeypatch.setattr(world, "STAGE", dataclasses.replace(real, run=run))
    runs = tmp_path / "runs"
    path = write_config(tmp_path, dict(copy.deepcopy(TINY_EXPERIMENT), run_dir=str(runs)))
    rc, _, err = run_cli(["world", path], capsys)
    stage = runs / "t" / "world"
    assert_user_error(rc, err, f"{stage}/checkpoints/checkpoint-4/optimizer.pt: no space left on device while writing; "
                               "the partial output was removed, kept world/checkpoints/checkpoint-2, free some space "
                               "and re-run to resume", only_line=False)
    assert sorted(p.name for p in (stage / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert (stage / STARTED).is_file() and not (stage / MANIFEST).exists()
    monkeypatch.setattr(world, "STAGE", real)
    rc, _, err = run_cli(["world", path], capsys)
    assert rc == 0 and "world: resuming" in err


@pytest.mark.slow
def test_disk_full_during_a_training_checkpoint(tmp_path, capsys, monkeypatch):
    """The Trainer's checkpoint write fails: the finished world stays, pretrain leaves nothing."""
    from transformers import Trainer

    from conftest import TINY_EXPERIMENT

    def full(self, *a, **k):
        raise _enospc(Path(self.args.output_dir) / "checkpoint-2" / "optimizer.pt")

    monkeypatch.setattr(Trainer, "_save_checkpoint", full)
    runs = tmp_path / "runs"
    data = copy.deepcopy(TINY_EXPERIMENT)
    data.update(run_dir=str(runs))
    data["pretrain"].update(max_steps=4, save_steps=2)
    path = write_config(tmp_path, data)
    rc, _, err = run_cli(["run", path, "--stages", "world,pretrain"], capsys)
    assert_user_error(rc, err, "checkpoint-2/optimizer.pt: no space left on device while writing", only_line=False)
    assert (runs / "t" / "world" / "stage.json").is_file()
    assert not (runs / "t" / "pretrain").exists()


def test_every_case_is_in_the_reliability_doc():
    """docs/reliability.md lists the matrix; its count matches the cases here (the matrix tests
    check each row's message against what the user got)."""
    doc = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    ids = [c[0] for c in DATA_CASES + CONFIG_CASES + CONFIG_FILE_CASES + MERGE_CASES] + [
        "unknown-kind", "missing-file", "overlong-prompt", "disk-full-atomic-write", "disk-full-merge",
        "disk-full-stage", "disk-full-checkpoint", "disk-full-keeps-checkpoints"]
    for case in ids:
        assert f"`{case}`" in doc, case
    assert f"{len(ids)} cases" in doc
