"""ContrastiveTrainer: the K-way EXO / DPO-rw losses and kto-pair on transformers' Trainer.

TRL has trainers for dpo, ipo, hinge, exo-pair and kto; it has none for the K-way methods
(exo-rw, dpo-rw, exo-pref, dpo-pref, EXO paper) nor for kto-pair (online merging paper), so
this small trainer runs them. Everything else (optimiser, schedule, checkpoint and resume,
logging, DDP/FSDP) is the base Trainer's. The maths lives in `taxfree.losses`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from taxfree.errors import TaxfreeError
from taxfree.losses.logprobs import sequence_logps
from taxfree.trainers.config import ContrastiveConfig, contrastive_methods
from taxfree.trainers.data import TOKENIZED_COLUMNS, ContrastiveCollator, check_tokenizer, tokenize_dataset


class ContrastiveTrainer(Trainer):
    """Trains `model` against a frozen `ref_model` on records with K scored completions per prompt.

    Datasets are `datasets.Dataset`s in the rw format (prompt, completions [K], rewards [K]) or the
    pref format (prompt, chosen, rejected: K = 2, rewards (1, 0)); they are tokenised here. Each
    batch holds all K completions of B prompts and runs as one forward of B*K sequences.

    Logged metrics (eval ones prefixed `eval_`): `rewards/accuracies` (share of prompts whose
    best-rewarded completion has a log-ratio strictly above every other one), `rewards/chosen`,
    `rewards/rejected`, `rewards/margins` (beta times the log-ratio of the best and worst
    completion, and their difference), `logratios/mean|min|max` (z over all completions: the
    KL-like statistic), and the extra metrics a method's loss returns (kto-pair: `kl/chosen`,
    `kl/rejected`, the loss's reference points). The loss is the method's declared function
    (taxfree.losses.methods), called with its declared settings.

    Reward ties carry no preference: in the pairwise losses (exo-pref, dpo-pref, kto-pair) a pair
    with equal rewards counts 0 (the loss is still the mean over the batch's prompts), and the
    reward metrics above count only prompts with a preference (accuracies: a single best reward;
    chosen/rejected/margins: best reward above the worst); kto-pair's KL reference points are
    estimated from the pairs with a preference.
    """

    # compute_loss returns a per-batch mean: the base class divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module,
        ref_model: nn.Module,
        args: ContrastiveConfig,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        data_collator: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        compute_metrics: Any = None,
    ):
        if not isinstance(args, ContrastiveConfig):
            raise TaxfreeError(f"ContrastiveTrainer needs args of type ContrastiveConfig, got {type(args).__name__}")
        if not isinstance(model, nn.Module):
            raise TaxfreeError(f"ContrastiveTrainer needs a loaded model (torch module), got {type(model).__name__}")
        if not isinstance(ref_model, nn.Module):
            raise TaxfreeError("ContrastiveTrainer needs a frozen reference model: ref_model is missing")
        if ref_model is model:
            raise TaxfreeError("ref_model must be a separate copy of the model, not the model being trained")
        check_tokenizer(processing_class)

        prep = dict(
            tokenizer=processing_class,
            num_completions=args.num_completions,
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            pairwise=contrastive_methods()[args.loss_type].pairwise,
        )
        with args.main_process_first(desc="tokenizing contrastive datasets"):
            if train_dataset is not None:
                train_dataset = tokenize_dataset(train_dataset, **prep)
            if isinstance(eval_dataset, dict):
                eval_dataset = {name: tokenize_dataset(ds, **prep) for name, ds in eval_dataset.items()}
            elif eval_dataset is not None:
                eval_dataset = tokenize_dataset(eval_dataset, **prep)

        if data_collator is None:
            data_collator = ContrastiveCollator(pad_token_id=processing_class.pad_token_id)

        self.method = contrastive_methods()[args.loss_type]
        ref_model.requires_grad_(False)
        ref_model.eval()
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            compute_metrics=compute_metrics,
        )
        self.ref_model = self._prepare_ref_model(ref_model)

    def _prepare_ref_model(self, ref_model: nn.Module) -> nn.Module:
        """Place (or shard) the frozen reference model the way the policy is placed."""
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(ref_model, self.accelerator)
        if self.is_fsdp_enabled:
            from trl.models.utils import prepare_fsdp

            return prepare_fsdp(ref_model, self.accelerator)
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def _set_signature_columns_if_needed(self) -> None:
        # The tokenised columns are not model inputs; keep them even with remove_unused_columns=True.
        if self._signature_columns is None:
            self._signature_columns = list(TOKENIZED_COLUMNS)

    # ---- the loss ----------------------------------------------------------------------------

    def _completion_logps(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        logps, _ = sequence_logps(out.logits, inputs["labels"], self.args.temperature)
        return logps

    def completion_logratios(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """z[B, K]: policy minus reference log-probability of each completion's tokens."""
        policy = self._completion_logps(model, inputs)
        with torch.no_grad():
            ref = self._completion_logps(self.ref_model, inputs)
        return (policy - ref).view(inputs["rewards"].shape)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict,
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        rewards = inputs["rewards"]
        z = self.completion_logratios(model, inputs)
        out = self.method.loss(z, rewards, **self.args.method_settings())
        loss, extra = out if isinstance(out, tuple) else (out, {})
        self._record_metrics("train" if model.training else "eval", z.detach(), rewards, extra)
        return (loss, {"logratios": z.detach()}) if return_outputs else loss

    # ---- metrics -----------------------------------------------------------------------------

    def _record_metrics(self, mode: str, z: torch.Tensor, rewards: torch.Tensor, extra: dict) -> None:
        scale = self.args.method_settings()[self.method.reward_scale]
        best = rewards.argmax(dim=1, keepdim=True)
        worst = rewards.argmin(dim=1, keepdim=True)
        top = rewards.gather(1, best)
        single_best = (rewards == top).sum(dim=1) == 1  # the accuracy needs one best completion
        preferred = top.squeeze(1) > rewards.gather(1, worst).squeeze(1)
        z_best = z.gather(1, best).squeeze(1)
        z_others = z.scatter(1, best, float("-inf")).max(dim=1).values
        per_prompt = torch.stack(
            [(z_best > z_others).float(), scale * z_best, scale * z.gather(1, worst).squeeze(1),
             single_best.float(), preferred.float()], dim=1
        )
        # Per-prompt rows go through gather_for_metrics, which drops the duplicated tail of the
        # last eval batch by counting rows: so z stays [B, K], one row per prompt.
        per_prompt = self.accelerator.gather_for_metrics(per_prompt)
        all_z = self.accelerator.gather_for_metrics(z.float())
        m = self._metrics[mode]
        single_best, preferred = per_prompt[:, 3].bool(), per_prompt[:, 4].bool()
        if single_best.any():  # prompts whose rewards all tie carry no preference to be right about
            m["rewards/accuracies"].append(per_prompt[single_best, 0].mean().item())
        if preferred.any():
            rows = per_prompt[preferred]
            m["rewards/chosen"].append(rows[:, 1].mean().item())
            m["rewards/rejected"].append(rows[:, 2].mean().item())
            m["rewards/margins"].append((rows[:, 1] - rows[:, 2]).mean().item())
        m["logratios/mean"].append(all_z.mean().item())
        m["logratios/min"].append(all_z.min().item())
        m["logratios/max"].append(all_z.max().item())
        if extra:  # scalars of this batch, averaged over ranks
            names = sorted(extra)
            values = torch.stack([extra[k].detach().reshape(()).float() for k in names]).reshape(1, -1)
            values = self.accelerator.gather(values).mean(dim=0)
            for k, v in zip(names, values.tolist()):
                m[k].append(v)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the metrics averaged since the last log (min/max: over the window) to the Trainer's logs."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        for key, values in self._metrics[mode].items():
            if not values:
                continue
            if key.endswith("/min"):
                value = min(values)
            elif key.endswith("/max"):
                value = max(values)
            else:
                value = sum(values) / len(values)
            logs[f"eval_{key}" if mode == "eval" else key] = value
        self._metrics[mode].clear()
        super().log(logs, start_time)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict,
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ):
        """Eval: the loss, and (unless loss-only) the [B, K] log-ratios with the rewards as labels."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach()
        if prediction_loss_only:
            return loss, None, None
        return loss, outputs["logratios"], inputs["rewards"]
