"""The outcome of one target (stored in todo.sqlite: never renumber)."""
import enum

__all__ = ["STATUS", "SEVERITY"]


class STATUS(enum.IntEnum):
    """Outcome of one target. Values are stored in todo.sqlite, so never renumber them."""

    UNKNOWN = 0
    OK = 1
    ERROR = 2
    WARNING = 3
    ABORT = 4
    SKIPPED = 5
    STARTED = 6


#: STATUS of a finished result in increasing severity (the checks can only make it worse)
SEVERITY = (STATUS.OK, STATUS.WARNING, STATUS.ERROR)
