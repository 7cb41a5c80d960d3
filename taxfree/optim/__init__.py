"""Online merging optimizers (OnDARE-AdamW, OnTIES-AdamW) and the factory the stages call."""

from taxfree.optim.factory import OPTIMIZER_NAMES, build_optimizer
from taxfree.optim.ondare import OnDAREAdamW
from taxfree.optim.onties import OnTIESAdamW

__all__ = ["OnDAREAdamW", "OnTIESAdamW", "build_optimizer", "OPTIMIZER_NAMES"]
