"""Alignment losses as pure torch functions (ALGORITHMS.md 2), importable without the pipeline."""

from taxfree.losses.contrastive import (
    CONTRASTIVE_KINDS,
    EXO_PREF_EPS,
    contrastive_loss,
    has_preference,
    winner_loser,
)
from taxfree.losses.kto_pair import kto_pair_kl_estimates, kto_pair_loss
from taxfree.losses.logprobs import IGNORE_INDEX, sequence_logps
from taxfree.losses.methods import (
    LOSS_NAMES,
    METHOD_BACKENDS,
    TAXFREE_CONTRASTIVE,
    TRL_DPO,
    TRL_KTO,
    MethodBackend,
    method_backend,
)
from taxfree.losses.pairwise import dpo_sigmoid_loss, hinge_loss, ipo_loss

__all__ = [
    "CONTRASTIVE_KINDS",
    "EXO_PREF_EPS",
    "IGNORE_INDEX",
    "LOSS_NAMES",
    "METHOD_BACKENDS",
    "MethodBackend",
    "TAXFREE_CONTRASTIVE",
    "TRL_DPO",
    "TRL_KTO",
    "contrastive_loss",
    "dpo_sigmoid_loss",
    "has_preference",
    "hinge_loss",
    "ipo_loss",
    "kto_pair_kl_estimates",
    "kto_pair_loss",
    "method_backend",
    "sequence_logps",
    "winner_loser",
]
