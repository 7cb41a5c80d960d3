"""taxfree: alignment that raises reward while keeping the alignment tax low."""

__version__ = "0.1.0"
