"""Which trainer runs each alignment method the align stage accepts, and under which loss name.

TRL's DPOTrainer and KTOTrainer already implement dpo, ipo, hinge, exo-pair and kto; the K-way
EXO/DPO-rw family and kto-pair have no TRL trainer, so `taxfree.trainers.ContrastiveTrainer` runs
them. The TRL loss names are those of trl 1.16 (`DPOConfig.loss_type`, `KTOConfig.loss_type`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from taxfree.errors import TaxfreeError

TRL_DPO = "trl-dpo"
TRL_KTO = "trl-kto"
TAXFREE_CONTRASTIVE = "taxfree-contrastive"


@dataclass(frozen=True)
class MethodBackend:
    """`trainer` is TRL_DPO, TRL_KTO or TAXFREE_CONTRASTIVE; `loss_type` is that trainer's name."""

    trainer: str
    loss_type: str


METHOD_BACKENDS: dict[str, MethodBackend] = {
    "dpo": MethodBackend(TRL_DPO, "sigmoid"),
    "ipo": MethodBackend(TRL_DPO, "ipo"),
    "hinge": MethodBackend(TRL_DPO, "hinge"),
    # TRL refuses exo_pair with label_smoothing == 0: pass the EXO eps as DPOConfig.label_smoothing.
    "exo-pair": MethodBackend(TRL_DPO, "exo_pair"),
    "kto": MethodBackend(TRL_KTO, "kto"),
    "kto-pair": MethodBackend(TAXFREE_CONTRASTIVE, "kto-pair"),
    "exo-pref": MethodBackend(TAXFREE_CONTRASTIVE, "exo-pref"),
    "exo-rw": MethodBackend(TAXFREE_CONTRASTIVE, "exo-rw"),
    "dpo-rw": MethodBackend(TAXFREE_CONTRASTIVE, "dpo-rw"),
    "dpo-pref": MethodBackend(TAXFREE_CONTRASTIVE, "dpo-pref"),
}

LOSS_NAMES: tuple[str, ...] = tuple(METHOD_BACKENDS)


def method_backend(name: str) -> MethodBackend:
    """The backend for an align method name, or a TaxfreeError naming the closest valid one."""
    try:
        return METHOD_BACKENDS[name]
    except (KeyError, TypeError):
        near = difflib.get_close_matches(str(name), LOSS_NAMES, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise TaxfreeError(
            f"unknown alignment method {name!r}{hint}; expected one of {', '.join(LOSS_NAMES)}"
        ) from None
