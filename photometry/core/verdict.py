"""The verdict on a finished result: the core's checks (:mod:`photometry.core.checks`), the
algorithm's own reason codes and the data source's warnings make its final STATUS, stored
with the result."""
import logging

from photometry.hooks.errors import AlgorithmFailure
from photometry.hooks.status import SEVERITY, STATUS

__all__ = ["check", "source_warnings", "store_flags", "report_flag", "decline", "failure_reason",
           "check_flags", "saturated_target_pixels"]

logger = logging.getLogger(__name__)


def check(phot, status, messages):
    """The core's result checks (:mod:`photometry.core.checks`) and the algorithm's flags:
    the worse of their level and the algorithm's status."""
    from photometry.core.checks import LEVELS, Flag, check_result
    report = check_result(phot)
    if status == STATUS.WARNING and not any(f.level == "WARNING" for f in phot._flags):
        # the algorithm said WARNING without a reason code: its logged warnings are it
        said = [m.split(": ", 1)[-1] for m in messages if m.startswith("WARNING: ")]
        phot._flags.append(Flag("METHOD_WARNING", "WARNING",
                                "; ".join(said) or f"{phot.name} returned WARNING"))
    source_warnings(phot)
    phot._check_report = report
    for item in report.flags:
        logger.warning("TIC %d: %s %s: %s", phot.starid, item.level, item.code, item.text)
    level = max([report.status] + [f.level for f in phot._flags], key=LEVELS.index)
    return max(status, STATUS[level], key=SEVERITY.index)


def source_warnings(phot):
    """What the data source could not do well (``source.warnings``: (code, text), e.g. a
    TESScut sky it could not separate from the stars) makes any result at best a
    WARNING: each is a flag with its code, stored with the result."""
    for code, text in getattr(phot.source, "warnings", ()):
        phot.report_flag(code, text)


def store_flags(phot):
    """``details['checks']``: the algorithm's flags, then the core checks' (if they ran)."""
    from photometry.core.checks import CheckReport
    report = phot._check_report
    if report is None and not phot._flags:
        return
    combined = CheckReport(phot._flags + (report.flags if report else []),
                           report.metrics if report else {})
    phot.details["checks"] = combined.to_details()


def report_flag(phot, code, text, level=STATUS.WARNING):
    """Record a reason code of this result (an algorithm's own check, e.g. a fit's chi^2).

    ``level`` STATUS.WARNING or STATUS.ERROR: the target's STATUS is at least that bad.
    The code and ``text`` (one line) go to the todo diagnostics and the light-curve
    header with the core's checks (``docs/checks.md``); the text is also logged.
    """
    from photometry.core.checks import Flag
    name = STATUS(level).name
    phot._flags.append(Flag(str(code), name, str(text)))
    logger.warning("TIC %d: %s %s: %s", phot.starid, name, code, text)


def decline(phot, code, text):
    """Refuse this target with a reason code (e.g. ``SATURATED``): raises
    :class:`AlgorithmFailure`, so the target is ERROR with ``code: text`` as its error
    and the code in the diagnostics. Why a method declines rather than guesses: a wrong
    flux marked OK is the worst outcome (``docs/checks.md``)."""
    from photometry.core.checks import Flag
    phot._flags.append(Flag(str(code), "ERROR", str(text)))
    raise AlgorithmFailure(f"TIC {phot.starid}: {code}: {text}")


def failure_reason(phot):
    """One line: the ERROR reasons of the checks ("CODE: text; ..."), for the todo list."""
    errors = [f"{f.code}: {f.text}" for f in phot.check_flags if f.level == "ERROR"]
    return f"TIC {phot.starid}: " + "; ".join(errors) if errors else \
        f"TIC {phot.starid}: {phot.name} returned ERROR"


def check_flags(phot):
    """The reason codes recorded so far (algorithm's and, after the checks, the core's)."""
    report = phot._check_report
    return list(phot._flags) + (list(report.flags) if report is not None else [])


def saturated_target_pixels(phot):
    """(r, c) bool of the target's saturated pixels (core and bleed columns), or None.

    From the ``Saturated`` pixel flags, or the calibrated flux at the saturation level
    where a source has no flags (TPFs); see :func:`photometry.core.checks.saturated_target_pixels`.
    """
    from photometry.core.checks import saturated_target_pixels
    return saturated_target_pixels(phot)
