"""Local lm-eval tasks and the lm-eval runner, checked against torch computed by hand."""

import json

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from taxfree.errors import TaxfreeError
from taxfree.eval.lm_eval_runner import flatten_lm_eval_results, run_lm_eval
from taxfree.eval.local_tasks import LocalTaskSpec, write_local_tasks
from taxfree.models import tiny_llama

WORDS = (
    "<unk> <pad> </s> <s> the cat dog sat on mat red blue green is a what color sky grass sun moon "
    "big small yes no one two three four five six"
).split()
NORMAL = WORDS[4:]


@pytest.fixture(scope="module")
def lm():
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    model = tiny_llama(len(vocab), seed=0, pad_token_id=1, eos_token_id=2, bos_token_id=3).eval()
    return model, tok


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def continuation_logprob(model, tok, context, continuation):
    ctx = tok(context)["input_ids"]
    ids = tok(context + continuation)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ctx), len(ids)))


MC_QUERIES = ["what color is the sky", "what color is the grass", "the cat sat on the", "is the sun big",
              "the dog is", "one two three"]
MC_CHOICES = [["blue", "green", "red"], ["green", "blue"], ["mat", "dog", "sky"], ["yes", "no"],
              ["big", "small", "red"], ["four", "five", "six"]]


def test_multiple_choice_accuracy_equals_direct_loglikelihoods(lm, tmp_path):
    model, tok = lm
    records, best_norm = [], []
    for i, (q, choices) in enumerate(zip(MC_QUERIES, MC_CHOICES)):
        lls = [continuation_logprob(model, tok, q, " " + c) for c in choices]
        best = max(range(len(choices)), key=lambda k: lls[k])
        worst = min(range(len(choices)), key=lambda k: lls[k])
        best_norm.append(max(range(len(choices)), key=lambda k: lls[k] / len(choices[k])))
        # gold = the model's favourite for even items, its least favourite for odd ones
        records.append({"query": q, "choices": choices, "gold": best if i % 2 == 0 else worst})
    data = write_jsonl(tmp_path / "mc.jsonl", records)
    include = write_local_tasks(tmp_path / "tasks", [LocalTaskSpec("tiny_mc", "multiple_choice", data)])
    res = run_lm_eval(model, tok, ["tiny_mc"], include_path=include, batch_size=4)
    assert res["tiny_mc"]["acc"] == pytest.approx(0.5)
    expected_norm = sum(b == r["gold"] for b, r in zip(best_norm, records)) / len(records)
    assert res["tiny_mc"]["acc_norm"] == pytest.approx(expected_norm)


def test_exact_match_equals_direct_greedy_generation(lm, tmp_path):
    model, tok = lm
    max_gen = 3
    candidates = [f"{a} {b} {c}" for a in ("the", "what", "is") for b in ("cat", "dog", "sky") for c in ("red", "big", "on")]
    items = []
    for q in candidates:
        ids = tok(q, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_gen, do_sample=False,
                                 pad_token_id=1)
        new = out[0, ids.shape[1]:].tolist()
        if all(WORDS[t] in NORMAL for t in new):  # no special token: decoding is unambiguous
            items.append((q, tok.decode(new)))
    assert len(items) >= 4
    items = items[:6]
    records = [{"question": q, "answer": a if i % 2 == 0 else "moon moon moon"} for i, (q, a) in enumerate(items)]
    assert all(a != "moon moon moon" for _, a in items)
    data = write_jsonl(tmp_path / "em.jsonl", records)
    include = write_local_tasks(tmp_path / "tasks", [LocalTaskSpec("tiny_em", "exact_match", data, max_gen_toks=max_gen)])
    res = run_lm_eval(model, tok, ["tiny_em"], include_path=include, batch_size=4)
    expected = sum(1 for i in range(len(records)) if i % 2 == 0) / len(records)
    assert res["tiny_em"]["exact_match"] == pytest.approx(expected)


def test_model_directory_and_limit(lm, tmp_path):
    model, tok = lm
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = write_jsonl(tmp_path / "mc.jsonl", [{"query": q, "choices": c, "gold": 0} for q, c in zip(MC_QUERIES, MC_CHOICES)])
    include = write_local_tasks(tmp_path / "tasks", [LocalTaskSpec("tiny_mc", "multiple_choice", data)])
    from_dir = run_lm_eval(tmp_path / "model", None, ["tiny_mc"], include_path=include, limit=2, device="cpu")
    in_memory = run_lm_eval(model, tok, ["tiny_mc"], include_path=include, limit=2)
    assert from_dir["tiny_mc"]["acc"] == in_memory["tiny_mc"]["acc"]
    firsts = [continuation_logprob(model, tok, q, " " + c[0]) >= max(continuation_logprob(model, tok, q, " " + x) for x in c)
              for q, c in zip(MC_QUERIES[:2], MC_CHOICES[:2])]
    assert in_memory["tiny_mc"]["acc"] == pytest.approx(sum(firsts) / 2)


def test_written_yaml_reads_local_json(tmp_path):
    data = write_jsonl(tmp_path / "em.jsonl", [{"question": "q one", "answer": "a"}])
    shots = write_jsonl(tmp_path / "shots.jsonl", [{"question": "q two", "answer": "b"}])
    include = write_local_tasks(
        tmp_path / "tasks", [LocalTaskSpec("tiny_em", "exact_match", data, num_fewshot=1, fewshot_path=shots)]
    )
    cfg = yaml.safe_load((tmp_path / "tasks" / "tiny_em.yaml").read_text())
    assert cfg["dataset_path"] == "json"
    files = cfg["dataset_kwargs"]["data_files"]
    assert files == {"test": str((tmp_path / "tasks/tiny_em/test.jsonl").resolve()),
                     "train": str((tmp_path / "tasks/tiny_em/fewshot.jsonl").resolve())}
    assert cfg["fewshot_split"] == "train" and cfg["num_fewshot"] == 1
    assert cfg["output_type"] == "generate_until" and cfg["generation_kwargs"]["do_sample"] is False
    assert (tmp_path / "tasks/tiny_em/test.jsonl").read_text() == data.read_text()
    assert include == str((tmp_path / "tasks").resolve())


@pytest.mark.parametrize(
    "record, message",
    [
        ({"query": "q", "choices": ["a", "b"], "gold": 2}, "'gold' must be an integer index"),
        ({"query": "q", "choices": ["a"], "gold": 0}, "at least 2 strings"),
        ({"choices": ["a", "b"], "gold": 0}, "'query' must be a string"),
        ({"query": "q", "choices": ["a", "b"], "gold": True}, "'gold' must be an integer"),
    ],
)
def test_bad_multiple_choice_records_are_refused(tmp_path, record, message):
    data = write_jsonl(tmp_path / "mc.jsonl", [record])
    with pytest.raises(TaxfreeError, match=message):
        write_local_tasks(tmp_path / "tasks", [LocalTaskSpec("t", "multiple_choice", data)])


def test_bad_specs_are_refused(tmp_path):
    data = write_jsonl(tmp_path / "em.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(TaxfreeError, match="duplicate task names: t"):
        write_local_tasks(tmp_path / "x", [LocalTaskSpec("t", "exact_match", data), LocalTaskSpec("t", "exact_match", data)])
    with pytest.raises(TaxfreeError, match="needs fewshot_path"):
        write_local_tasks(tmp_path / "x", [LocalTaskSpec("t", "exact_match", data, num_fewshot=2)])
    with pytest.raises(TaxfreeError, match="kind 'mc'"):
        write_local_tasks(tmp_path / "x", [LocalTaskSpec("t", "mc", data)])
    with pytest.raises(TaxfreeError, match="no such file"):
        write_local_tasks(tmp_path / "x", [LocalTaskSpec("t", "exact_match", tmp_path / "nope.jsonl")])
    (tmp_path / "broken.jsonl").write_text('{"question": "q", "answer": "a"}\n{not json\n')
    with pytest.raises(TaxfreeError, match="broken.jsonl:2: not valid JSON"):
        write_local_tasks(tmp_path / "x", [LocalTaskSpec("t", "exact_match", tmp_path / "broken.jsonl")])
    with pytest.raises(TaxfreeError, match="local task name"):
        write_local_tasks(tmp_path / "x", [LocalTaskSpec("bad name", "exact_match", data)])
    assert not (tmp_path / "x").exists()  # nothing written before everything validated


def test_runner_input_errors(lm, tmp_path):
    model, tok = lm
    with pytest.raises(TaxfreeError, match="needs its tokenizer"):
        run_lm_eval(model, None, ["tiny_mc"], include_path=None)
    with pytest.raises(TaxfreeError, match="no tasks"):
        run_lm_eval(model, tok, [])
    with pytest.raises(TaxfreeError, match="include_path: no such directory"):
        run_lm_eval(model, tok, ["x"], include_path=tmp_path / "missing")


@pytest.mark.slow
def test_unknown_task_names_the_nearest(lm, tmp_path):
    model, tok = lm
    with pytest.raises(TaxfreeError, match=r"unknown task\(s\): arc_eazy \(did you mean arc_easy\?\)"):
        run_lm_eval(model, tok, ["arc_eazy"])


def test_flatten_keeps_filters_and_drops_non_numbers():
    raw = {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                  "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": "N/A"},
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.75, "acc_stderr,none": 0.02, "acc_norm,none": 0.7},
    }
    assert flatten_lm_eval_results(raw) == {
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                  "exact_match,flexible-extract": 0.5},
        "arc_easy": {"acc": 0.75, "acc_stderr": 0.02, "acc_norm": 0.7},
    }


def test_code_executing_tasks_need_explicit_permission(lm, tmp_path):
    model, tok = lm
    data = write_jsonl(tmp_path / "mc.jsonl", [{"query": q, "choices": c, "gold": 0} for q, c in zip(MC_QUERIES, MC_CHOICES)])
    include = write_local_tasks(tmp_path / "tasks", [LocalTaskSpec("tiny_mc", "multiple_choice", data)])
    cfg = yaml.safe_load((tmp_path / "tasks" / "tiny_mc.yaml").read_text())
    cfg.update(task="tiny_unsafe", unsafe_code=True)
    (tmp_path / "tasks" / "tiny_unsafe.yaml").write_text(yaml.safe_dump(cfg))
    model.train()
    with pytest.raises(TaxfreeError, match="task tiny_unsafe executes model-written code: set allow_code_execution"):
        run_lm_eval(model, tok, ["tiny_unsafe"], include_path=include)
    assert model.training  # the caller's mode is given back
    res = run_lm_eval(model, tok, ["tiny_unsafe"], include_path=include, allow_code_execution=True, limit=2)
    assert 0.0 <= res["tiny_unsafe"]["acc"] <= 1.0
    assert model.training
    model.eval()
