"""`download(name)`: fetch a public data set with `datasets` and convert it like `convert_file`.

Upstream splits are kept (train -> train, test/validation -> test); a data set with a single
split is split by prompt with `test_fraction`. Needs the network; never used in tests.
"""

from __future__ import annotations

import os
from pathlib import Path

from taxfree.data.converters.files import DEFAULT_TEST_FRACTION, ConversionResult, check_output_dir, convert_rows, write_result
from taxfree.data.converters.registry import get_source
from taxfree.errors import TaxfreeError


def download(
    name: str,
    out_dir: str | os.PathLike | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    limit: int | None = None,
    overwrite: bool = False,
) -> ConversionResult:
    """Download `name` (a key of SOURCES) into out_dir (default data/<name>); `limit` rows per split."""
    source = get_source(name)
    if source.hub_id is None:
        raise TaxfreeError(f"{name} is not on the hub: fetch its upstream file and run `taxfree data convert {name} FILE OUT` "
                           "(for chitchat: `make smol-assets`)")
    out_dir = Path(out_dir) if out_dir is not None else Path("data") / name
    if limit is not None and limit < 1:
        raise TaxfreeError(f"--limit must be at least 1, got {limit}")
    check_output_dir(out_dir, overwrite)
    import datasets

    def rows():
        for upstream_split, split in source.hub_splits.items():
            spec = upstream_split if limit is None else f"{upstream_split}[:{limit}]"
            try:
                ds = datasets.load_dataset(source.hub_id, source.hub_config, split=spec)
            except Exception as exc:  # network, hub or cache problems: report them on one line
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise TaxfreeError(f"{source.hub_id} [{upstream_split}]: download failed: {first_line}") from None
            for i, row in enumerate(ds):
                yield f"{source.hub_id} [{upstream_split}] row {i + 1}", row, split

    result = convert_rows(source, rows(), test_fraction=test_fraction, seed=seed)
    provenance = {
        "hub_id": source.hub_id,
        "hub_config": source.hub_config,
        "hub_splits": source.hub_splits,
        "limit": limit,
        "test_fraction": test_fraction,
        "seed": seed,
    }
    write_result(result, out_dir, provenance, overwrite=overwrite)
    return result
