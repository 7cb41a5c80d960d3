"""One exception type for every user mistake: the CLI prints it as `error: ...` and exits 2."""


class TaxfreeError(Exception):
    """Bad input (config, data, models, paths): reported on one line, never as a traceback."""


class ConfigError(TaxfreeError):
    """A config value is wrong; the message already names file and key."""
