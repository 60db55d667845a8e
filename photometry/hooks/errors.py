"""Exception types whose class decides what happens next.

The command line maps :class:`InputError` to exit code 2 with its one-line message; the
worker maps the per-target exceptions to a STATUS (see ``photometry.status``).
"""

import errno

__all__ = ["InputError", "ConfigurationError", "SkipTarget", "UnprocessableTarget",
           "AlgorithmFailure", "disk_full"]

#: errno values that mean "the disk is full", not "this input is bad"
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def disk_full(exc):
    """True for an OSError of a full disk or quota (ENOSPC, EDQUOT): not one target's fault,
    every target after it would fail the same way, so a run stops (exit 2, results kept).

    Libraries re-raise it without its errno, so the chain of causes is followed, and
    astropy's FITS writer is recognised by its message: numpy's short write under it carries
    no errno either, and astropy raises ``OSError("Not enough space on disk ...")``.
    """
    seen = set()
    while isinstance(exc, BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and (exc.errno in _DISK_FULL
                                         or str(exc).startswith("Not enough space on disk")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class InputError(Exception):
    """Bad usage or bad input: one line naming the file or target and the problem (exit 2)."""


class ConfigurationError(InputError):
    """A settings or plugin problem that must stop the whole run."""


class SkipTarget(Exception):
    """Nothing to do for this target (status SKIPPED, never retried)."""


class UnprocessableTarget(Exception):
    """The target's data cannot be processed (status ABORT, flagged, never retried)."""


class AlgorithmFailure(Exception):
    """A repeatable failure of the algorithm on this target (status ERROR, not retried)."""
