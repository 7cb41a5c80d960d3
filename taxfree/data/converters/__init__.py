"""Converters from public data sets (upstream schemas) into the project's record kinds."""

from taxfree.data.converters._common import SkipRecord
from taxfree.data.converters.files import ConversionResult, convert_file, convert_rows, read_upstream
from taxfree.data.converters.hub import download
from taxfree.data.converters.registry import SOURCES, Source, get_source

__all__ = [
    "SOURCES",
    "ConversionResult",
    "SkipRecord",
    "Source",
    "convert_file",
    "convert_rows",
    "download",
    "get_source",
    "read_upstream",
]
