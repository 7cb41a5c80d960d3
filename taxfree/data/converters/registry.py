"""The public data sets we convert, by name: one module per upstream source."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from taxfree.data.converters import chitchat, hh_rlhf, imdb, sharegpt, tldr, ultrafeedback
from taxfree.errors import TaxfreeError


@dataclass(frozen=True)
class Source:
    """An upstream data set: how to convert one of its rows and where the hub keeps it."""

    name: str
    convert: Callable[[dict], dict[str, list[dict]]]
    hub_id: str
    hub_config: str | None
    hub_splits: dict[str, str | None]  # upstream split -> "train"/"test", or None to split it ourselves
    summary: str
    # Sources whose records pair several upstream rows (chitchat: two conversations on one
    # starter) convert each row into candidates, then build the records of each split at once.
    # Their rows are split one by one (the pairs form inside a split), not by prompt.
    combine: Callable[[list[dict], int], dict[str, list[dict]]] | None = None

    @classmethod
    def from_module(cls, module: ModuleType) -> "Source":
        return cls(
            name=module.NAME,
            convert=module.convert,
            hub_id=module.HUB_ID,
            hub_config=module.HUB_CONFIG,
            hub_splits=dict(module.HUB_SPLITS),
            summary=(module.__doc__ or "").strip().splitlines()[0],
            combine=getattr(module, "combine", None),
        )


SOURCES: dict[str, Source] = {
    s.name: s for s in map(Source.from_module, (hh_rlhf, ultrafeedback, imdb, tldr, sharegpt, chitchat))
}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise TaxfreeError(f"unknown data source {name!r} (choose from {', '.join(SOURCES)})")
    return SOURCES[name]
