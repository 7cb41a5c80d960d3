"""One exception type for every user mistake: the CLI prints it as `error: ...` and exits 2."""


class TaxfreeError(Exception):
    """Bad input (config, data, models, paths): reported on one line, never as a traceback."""


class ConfigError(TaxfreeError):
    """A config value is wrong; the message already names file and key."""


class DiskFullError(TaxfreeError):
    """No space left (or quota exceeded) while writing `target`: reported like bad input, but
    what was completely written before can be kept for a resume (`kept` says what)."""

    def __init__(self, target: str, reason: str, kept: str | None = None):
        self.target, self.reason, self.kept = target, reason, kept
        after = f"kept {kept}, free some space and re-run to resume" if kept else "free some space and re-run"
        super().__init__(f"{target}: {reason} while writing; the partial output was removed, {after}")


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT: the disk (or the user's quota) is full, an environment problem the user
    fixes, so it is reported like bad input rather than as a traceback."""
    import errno

    return isinstance(exc, OSError) and exc.errno in {errno.ENOSPC, getattr(errno, "EDQUOT", -1)}


def disk_full_error(exc: OSError, what: str | None = None, kept: str | None = None) -> DiskFullError:
    """The one-line error for a full disk, naming what was being written; callers raise it
    after removing their partial output."""
    import errno

    reason = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    return DiskFullError(str(what or exc.filename or "output"), reason, kept)


def nearest(word, options) -> str:
    """` (did you mean X?)` for the closest of `options`, or an empty string: the one hint every
    unknown-name error of the project gives."""
    import difflib

    match = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""
