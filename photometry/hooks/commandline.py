"""Command-line plumbing every command shares: the argparse types and options of the
sub-commands, the output-folder check, and logging (one line per record on stderr, tracebacks
in the log file). The parser itself and the exit codes are :mod:`photometry.cli`'s."""
import argparse
import logging
import os
import sys
from pathlib import Path

from photometry.hooks.errors import InputError, disk_full

__all__ = ["one_line", "add_settings_arguments", "tic_id", "at_least", "finite_float",
           "output_folder", "stderr_level", "log_path", "default_log_path", "use_log_file",
           "configure_logging", "reset_logging", "log_file_open", "FILE_ONLY", "LOG_ENV"]

LOG_ENV = "TESSPHOT_LOG"
LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
#: a log file larger than this is renamed to ``*.1`` when a command starts
LOG_MAX_BYTES = 20_000_000

def one_line(text):
    """``text`` with its line breaks and runs of blanks collapsed (a message is one line)."""
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- options
def add_settings_arguments(parser):
    """The options every settings-driven command accepts."""
    parser.add_argument("--settings", action="append", default=[], metavar="FILE",
                        help="TOML file overriding default settings (repeatable; later wins)")
    parser.add_argument("--set", action="append", default=[], dest="assignments",
                        metavar="SECTION.KEY=VALUE",
                        help="override one setting, after the files (repeatable)")


def tic_id(text):
    """argparse type of a TIC id: a positive integer that fits SQLite's 64-bit integers."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"TIC id {text!r} is not an integer") from None
    if not 0 < value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"TIC id {text} must be between 1 and 2^63 - 1")
    return value


def at_least(minimum):
    """argparse type of an integer option >= ``minimum`` (a count, a limit)."""
    def integer(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} must be at least {minimum}")
        return value
    integer.__name__ = f"integer >= {minimum}"
    return integer


def finite_float(text):
    """argparse type of a finite number (a magnitude: nan and inf are refused)."""
    import math
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def output_folder(path, option="--output"):
    """Create the output folder ``path`` and check that files can be written in it, before
    any work; returns it as a Path.

    Raises
    ------
    InputError
        One line naming the option and folder: a file in the way, no permission, a read-only
        or full file system.
    """
    import tempfile
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"{option} {path}: exists and is not a folder") from None
    except NotADirectoryError:
        raise InputError(f"{option} {path}: a parent of it is a file, not a folder") from None
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot create the folder "
                         f"({exc.strerror or exc})") from None
    if not path.is_dir():
        raise InputError(f"{option} {path}: exists and is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".tessphot-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = "no space left on device" if disk_full(exc) else (exc.strerror or exc)
        raise InputError(f"{option} {path}: cannot write files there ({reason})") from None
    return path


# --------------------------------------------------------------------------- logging
class _OneLineFormatter(logging.Formatter):
    """stderr records: one line each, the exception's own line kept, its traceback not."""

    def format(self, record):
        message = one_line(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            message += f" ({type(record.exc_info[1]).__name__}: {one_line(record.exc_info[1])})"
        return one_line(f"{record.levelname} {record.name}: {message}")


_handlers = {"stderr": None, "file": None}
#: ``extra=`` of a record meant for the log file only
FILE_ONLY = {"stderr": False}


def stderr_level():
    """The level of this process's stderr messages (WARNING unless -v was given)."""
    handler = _handlers["stderr"]
    return handler.level if handler is not None else logging.getLogger().getEffectiveLevel()


def log_path():
    """Where tracebacks go: the file the current process logs to, else the default one."""
    handler = _handlers["file"]
    if handler is not None:
        return Path(handler.baseFilename)
    return default_log_path()


def default_log_path():
    if os.environ.get(LOG_ENV):
        return Path(os.environ[LOG_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tessphot" / "tessphot.log"


class _LogFile(logging.FileHandler):
    """The log file; a write that fails (a full disk) is dropped silently, never reported on
    stderr (logging's default prints a traceback per record)."""

    def handleError(self, record):
        pass

    def flush(self):
        try:
            super().flush()
        except OSError:
            pass

    def close(self):
        try:
            super().close()
        except OSError:
            self.stream = None


def _open_log(path, rotate=True):
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if rotate and path.is_file() and path.stat().st_size > LOG_MAX_BYTES:
            path.replace(path.with_name(path.name + ".1"))
        handler = _LogFile(path, encoding="utf-8", delay=False)
    except OSError:
        return None
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.DEBUG)
    return handler


def use_log_file(path, rotate=True):
    """Send this process's log (and tracebacks) to ``path`` from now on; returns the path
    used (the old file is kept if ``path`` cannot be opened)."""
    handler = _open_log(path, rotate=rotate)
    if handler is None:
        return log_path()
    root = logging.getLogger()
    old = _handlers["file"]
    if old is not None:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    _handlers["file"] = handler
    return Path(handler.baseFilename)


def configure_logging(stderr_level, log_file=None, rotate=True):
    """stderr: one line per record at ``stderr_level``; the log file: everything from INFO
    (DEBUG with -vv) with tracebacks. Replaces what an earlier call set up (the command line
    runs in-process in the tests, many times)."""
    reset_logging()
    root = logging.getLogger()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(_OneLineFormatter())
    stream.setLevel(stderr_level)
    stream.addFilter(lambda record: getattr(record, "stderr", True))  # extra={"stderr": False}
    root.addHandler(stream)
    _handlers["stderr"] = stream
    use_log_file(log_file or default_log_path(), rotate=rotate)
    root.setLevel(min(stderr_level, logging.INFO))


def reset_logging():
    root = logging.getLogger()
    for key, handler in _handlers.items():
        if handler is not None:
            root.removeHandler(handler)
            if key == "file":
                handler.close()
        _handlers[key] = None


def log_file_open():
    """Whether this process logs to a file (tracebacks go there) rather than nowhere."""
    return _handlers["file"] is not None
