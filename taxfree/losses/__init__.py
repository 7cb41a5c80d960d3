"""Alignment losses as pure torch functions, importable without the pipeline, and the registry
of alignment methods declared next to them (taxfree.losses.methods)."""

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
    TAXFREE_CONTRASTIVE,
    TRL_DPO,
    TRL_KTO,
    AlignMethod,
    align_method,
    method_names,
    methods,
)
from taxfree.losses.pairwise import dpo_sigmoid_loss, hinge_loss, ipo_loss

__all__ = [
    "AlignMethod",
    "CONTRASTIVE_KINDS",
    "EXO_PREF_EPS",
    "IGNORE_INDEX",
    "TAXFREE_CONTRASTIVE",
    "TRL_DPO",
    "TRL_KTO",
    "align_method",
    "contrastive_loss",
    "dpo_sigmoid_loss",
    "has_preference",
    "hinge_loss",
    "ipo_loss",
    "kto_pair_kl_estimates",
    "kto_pair_loss",
    "method_names",
    "methods",
    "sequence_logps",
    "winner_loser",
]
