"""ContrastiveTrainer on a tiny Llama: exact log-ratio masking, learning, accumulation, eval, resume."""

import datasets
import pytest
import torch
from helpers_tokenizer import char_tokenizer
from transformers import TrainerCallback

from taxfree.errors import TaxfreeError
from taxfree.losses import contrastive_loss
from taxfree.models import tiny_llama
from taxfree.trainers import ContrastiveConfig, ContrastiveTrainer

TOK = char_tokenizer()

RW_RECORDS = [
    {"prompt": "2+2=", "completions": ["4", "5", "22"], "rewards": [1.0, 0.0, -1.0]},
    {"prompt": "say hi: ", "completions": ["hello", "go", "x"], "rewards": [0.5, 1.0, 0.0]},
    {"prompt": "colour? ", "completions": ["red", "blue sky", "?"], "rewards": [0.0, 0.2, 0.9]},
    {"prompt": "abc", "completions": ["d", "dd", "e"], "rewards": [2.0, 1.0, 0.0]},
]


def pair_records(records):
    return [dict(r, completions=r["completions"][:2], rewards=r["rewards"][:2]) for r in records]


def make_trainer(tmp_path, records, loss_type="exo-rw", ref_seed=0, eval_records=None, callbacks=None, **kwargs):
    options = dict(
        output_dir=str(tmp_path),
        loss_type=loss_type,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        seed=0,
    )
    options.update(kwargs)
    return ContrastiveTrainer(
        model=tiny_llama(len(TOK), seed=0, hidden_size=32),
        ref_model=tiny_llama(len(TOK), seed=ref_seed, hidden_size=32),
        args=ContrastiveConfig(**options),
        train_dataset=datasets.Dataset.from_list(records),
        eval_dataset=datasets.Dataset.from_list(eval_records) if eval_records else None,
        processing_class=TOK,
        callbacks=callbacks,
    )


def full_batch(trainer, dataset=None):
    dataset = dataset if dataset is not None else trainer.train_dataset
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


def direct_completion_logp(model, prompt_ids, completion_ids):
    """One unpadded sequence; sum log p of each completion token given everything before it."""
    seq = list(prompt_ids) + list(completion_ids)
    with torch.no_grad():
        logp = model(torch.tensor([seq])).logits[0].float().log_softmax(-1)
    return sum(logp[j - 1, seq[j]].item() for j in range(max(len(prompt_ids), 1), len(seq)))


def test_batched_logratios_equal_per_sequence_computation(tmp_path):
    records = [
        {
            "prompt": "a long prompt that is cut from the left",
            "completions": ["yes", "no, a much longer reply"],
            "rewards": [1.0, 0.0],
        },
        {"prompt": "hi", "completions": ["x", "hello there"], "rewards": [0.0, 1.0]},
        {"prompt": "", "completions": ["empty prompt", "ok"], "rewards": [0.3, 0.1]},
    ]
    trainer = make_trainer(tmp_path, records, ref_seed=1, max_length=20, max_prompt_length=12, temperature=1.0)
    ds = trainer.train_dataset
    assert ds[0]["prompt_ids"] == TOK("a long prompt that is cut from the left")["input_ids"][-12:]
    assert len(ds[0]["completion_ids"][1]) == 20 - 12  # the long completion lost its end

    batch = full_batch(trainer)
    assert (batch["attention_mask"] == 0).any()  # padding is present, so masking is exercised
    with torch.no_grad():
        z = trainer.completion_logratios(trainer.model, batch)
    expected = torch.tensor(
        [
            [
                direct_completion_logp(trainer.model, r["prompt_ids"], c)
                - direct_completion_logp(trainer.ref_model, r["prompt_ids"], c)
                for c in r["completion_ids"]
            ]
            for r in ds
        ]
    )
    assert z.shape == (3, 2)
    assert expected.abs().min() > 1e-3  # different models: the log-ratios are not trivially zero
    assert torch.allclose(z, expected, atol=1e-4)


@pytest.mark.parametrize("loss_type", ["exo-rw", "dpo-rw", "exo-pref", "dpo-pref", "kto-pair"])
def test_training_lowers_loss_and_widens_best_margin(tmp_path, loss_type):
    records = RW_RECORDS[:2] if loss_type.endswith("rw") else pair_records(RW_RECORDS[:2])
    trainer = make_trainer(tmp_path, records, loss_type=loss_type, max_steps=6, beta_pi=0.5, beta=0.5)
    batch = full_batch(trainer)
    best, worst = batch["rewards"].argmax(1, keepdim=True), batch["rewards"].argmin(1, keepdim=True)

    def loss_and_margin():
        trainer.model.eval()
        with torch.no_grad():
            z = trainer.completion_logratios(trainer.model, batch)
            loss = trainer.compute_loss(trainer.model, batch)
        return loss.item(), (z.gather(1, best) - z.gather(1, worst)).squeeze(1)

    loss_before, margin_before = loss_and_margin()
    assert torch.equal(margin_before, torch.zeros(2))  # policy == reference at the start
    trainer.train()
    loss_after, margin_after = loss_and_margin()
    assert loss_after < loss_before - 0.05
    assert (margin_after > 0.1).all()
    logged = trainer.state.log_history[-2]  # the last step's log (the final entry is the summary)
    assert logged["rewards/accuracies"] == 1.0
    assert logged["logratios/min"] <= logged["logratios/mean"] <= logged["logratios/max"]
    assert ("kl/chosen" in logged) == (loss_type == "kto-pair")


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    common = dict(max_steps=1, optim="sgd", learning_rate=0.5, weight_decay=0.0, ref_seed=1)
    big = make_trainer(tmp_path / "big", RW_RECORDS[:2], per_device_train_batch_size=2, **common)
    small = make_trainer(
        tmp_path / "small", RW_RECORDS[:2], per_device_train_batch_size=1, gradient_accumulation_steps=2, **common
    )
    start = {n: p.detach().clone() for n, p in big.model.named_parameters()}
    big.train()
    small.train()
    moved = 0.0
    for (name, p_big), (_, p_small) in zip(big.model.named_parameters(), small.model.named_parameters()):
        assert torch.allclose(p_big, p_small, atol=1e-6), name
        moved = max(moved, (p_big - start[name]).abs().max().item())
    assert moved > 1e-4


def test_evaluate_reports_loss_and_logratio_statistics(tmp_path):
    trainer = make_trainer(tmp_path, RW_RECORDS[:2], eval_records=RW_RECORDS[1:], ref_seed=1, beta_pi=0.5, beta_r=0.5)
    batch = full_batch(trainer, trainer.eval_dataset)  # 3 prompts: eval batches of 2 and 1
    trainer.model.eval()
    with torch.no_grad():
        z = trainer.completion_logratios(trainer.model, batch)
    expected_loss = contrastive_loss("exo-rw", z, batch["rewards"], beta_pi=0.5, beta_r=0.5).item()
    best = batch["rewards"].argmax(1)
    others = z.scatter(1, best[:, None], float("-inf")).max(1).values
    expected_accuracy = (z.gather(1, best[:, None]).squeeze(1) > others).float().mean().item()

    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert metrics["eval_logratios/min"] == pytest.approx(z.min().item(), abs=1e-4)
    assert metrics["eval_logratios/max"] == pytest.approx(z.max().item(), abs=1e-4)
    assert metrics["eval_rewards/accuracies"] == pytest.approx(expected_accuracy)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    common = dict(max_steps=4, ref_seed=1, learning_rate=1e-2, lr_scheduler_type="linear")
    straight = make_trainer(tmp_path / "straight", RW_RECORDS, **common)
    straight.train()

    interrupted = make_trainer(tmp_path / "resumed", RW_RECORDS, callbacks=[StopAt(2)], **common)
    interrupted.train()
    assert interrupted.state.global_step == 2
    resumed = make_trainer(tmp_path / "resumed", RW_RECORDS, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_trainer_refuses_bad_setup(tmp_path):
    args = ContrastiveConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    model = tiny_llama(len(TOK), hidden_size=32)
    ds = datasets.Dataset.from_list(RW_RECORDS[:1])
    with pytest.raises(TaxfreeError, match="ref_model is missing"):
        ContrastiveTrainer(model=model, ref_model=None, args=args, train_dataset=ds, processing_class=TOK)
    with pytest.raises(TaxfreeError, match="separate copy"):
        ContrastiveTrainer(model=model, ref_model=model, args=args, train_dataset=ds, processing_class=TOK)
    ref = tiny_llama(len(TOK), hidden_size=32)
    with pytest.raises(TaxfreeError, match="needs processing_class"):
        ContrastiveTrainer(model=model, ref_model=ref, args=args, train_dataset=ds)
    pair_args = ContrastiveConfig(output_dir=str(tmp_path), loss_type="dpo-pref", report_to="none", use_cpu=True)
    with pytest.raises(TaxfreeError, match="K must be 2; got K = 3"):
        ContrastiveTrainer(model=model, ref_model=ref, args=pair_args, train_dataset=ds, processing_class=TOK)


def test_ref_model_is_frozen_and_columns_survive_remove_unused_columns(tmp_path):
    trainer = make_trainer(tmp_path, RW_RECORDS[:2], max_steps=1, ref_seed=1, remove_unused_columns=True)
    before = [p.detach().clone() for p in trainer.ref_model.parameters()]
    trainer.train()
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.ref_model.parameters()))


TIED = [
    {"prompt": "2+2=", "completions": ["4", "5"], "rewards": [1.0, 0.0]},
    {"prompt": "say hi: ", "completions": ["hello", "go"], "rewards": [0.5, 0.5]},  # no preference
]


@pytest.mark.parametrize("loss_type", ["kto-pair", "exo-pref", "dpo-pref"])
def test_tied_pairs_are_not_trained_as_preferences(tmp_path, loss_type):
    """A pair with equal rewards counts 0 in the loss (the mean stays over the batch's prompts)
    and gets no gradient; the reward metrics count only the prompt with a preference."""
    from taxfree.losses import kto_pair_loss

    trainer = make_trainer(tmp_path, TIED, loss_type=loss_type, ref_seed=1, eval_records=TIED, beta_pi=0.5)
    batch = full_batch(trainer)
    with torch.no_grad():
        z = trainer.completion_logratios(trainer.model, batch)
    if loss_type == "kto-pair":  # the KL reference points come from the preferred pair alone
        expected = kto_pair_loss(z[:1, 0], z[:1, 1], trainer.args.beta).item() / 2
    else:
        expected = contrastive_loss(loss_type, z[:1], batch["rewards"][:1], beta_pi=0.5).item() / 2
    with torch.no_grad():
        assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(expected, rel=1e-5)
    tied_only = trainer.data_collator([trainer.train_dataset[1]])
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, tied_only)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in trainer.model.parameters())

    scale = trainer.args.beta if loss_type == "kto-pair" else 0.5
    metrics = trainer.evaluate()
    assert metrics["eval_rewards/accuracies"] == float(z[0, 0] > z[0, 1])
    assert metrics["eval_rewards/margins"] == pytest.approx(scale * (z[0, 0] - z[0, 1]).item(), rel=1e-4)
