"""Online merging optimizers (OnDARE-AdamW, OnTIES-AdamW), their registry and the factory the stages call."""

from taxfree.optim.factory import build_optimizer
from taxfree.optim.ondare import OnDAREAdamW
from taxfree.optim.onties import OnTIESAdamW
from taxfree.optim.registry import OptimizerSpec, optimizer_names, optimizer_spec, optimizers



def __getattr__(name: str):
    if name == "OPTIMIZER_NAMES":  # the registry's names (adamw first), found when first asked for
        return optimizer_names()
    raise AttributeError(name)


__all__ = ["OnDAREAdamW", "OnTIESAdamW", "build_optimizer", "OPTIMIZER_NAMES", "OptimizerSpec", "optimizer_names",
           "optimizer_spec", "optimizers"]
