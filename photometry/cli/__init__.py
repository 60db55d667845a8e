"""The ``tessphot`` command line: one sub-command per module, each with
``add_arguments(parser)`` and ``run(args) -> exit code``.

The contract (``docs/bad_input.md`` lists the cases, ``tests/test_bad_input.py`` checks them):

- Exit codes: 0 success; 1 a run finished with failed targets (ERROR/ABORT); 2 bad usage or
  bad input (a file, target or setting), or an environment the command cannot work in (a
  read-only or full disk), found before any work where it can be; 70 an internal error (a
  bug); 130 interrupted (Ctrl-C, SIGTERM); 141 stdout closed early (``tessphot status | head``).
- stderr gets one line per problem, naming the file, target or setting, never a traceback.
  Tracebacks go to the log file (:func:`log_path`): ``OUTPUT/tessphot.log`` once ``run``
  has checked its output folder, else ``$TESSPHOT_LOG`` or
  ``${XDG_CACHE_HOME:-~/.cache}/tessphot/tessphot.log``; the one-line message of an internal
  error names it.
"""
import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from photometry.hooks.version import __version__
from photometry.hooks.errors import InputError, disk_full

__all__ = ["main", "build_parser", "add_settings_arguments", "tic_id", "at_least", "finite_float",
           "output_folder", "log_path",
           "use_log_file", "configure_logging", "one_line", "EXIT_USAGE", "EXIT_INTERNAL"]

#: sub-command -> (module implementing it, one-line help)
COMMANDS = {
    "simulate": ("photometry.sim.simulate", "write a synthetic sector of SPOC-format FFIs"),
    "prepare": ("photometry.scheduler.prepare", "build the HDF5 cache of a sector/camera/CCD"),
    "todo": ("photometry.scheduler.todo", "build the task list todo.sqlite"),
    "run": ("photometry.scheduler.run", "run photometry on every task"),
    "correct": ("photometry.scheduler.correct", "co-trend the light curves of a run (PDCSAP_FLUX)"),
    "star": ("photometry.cli.star", "run one star with full logging and plots"),
    "status": ("photometry.cli.status", "counts and failures of a run"),
    "plugins": ("photometry.cli.plugins", "list installed plugins and their hooks"),
}

#: commands that log more than WARNING on stderr without -v: ``star`` is the command for
#: debugging one star, so its plugins' INFO messages (a fallback to the analytic PRF, the
#: stamp chosen ...) are shown; ``-v`` adds DEBUG
BASE_VERBOSITY = {"star": 1}

EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
LOG_ENV = "TESSPHOT_LOG"
LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
#: a log file larger than this is renamed to ``*.1`` when a command starts
LOG_MAX_BYTES = 20_000_000


def one_line(text):
    """``text`` with its line breaks and runs of blanks collapsed (a message is one line)."""
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- parser
#: sub-command -> settings section whose keys are the defaults of its options of the same name
#: (an option left out falls back to the setting, so --help shows the setting's value)
OPTION_SETTINGS = {"simulate": "simulate", "todo": "scheduler", "run": "scheduler"}


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default: its own, or that of the setting it falls back to."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or isinstance(action, (argparse._HelpAction,
                                                    argparse._VersionAction)):
            return text
        default = action.default
        if default is None and action.option_strings:
            found = self._setting(action.dest)
            if found is not None:
                return f"{text} (default: {found[1]!r}, setting {found[0]})".replace("%", "%%")
        if default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"

    def _setting(self, dest):
        section = OPTION_SETTINGS.get(self._prog.rpartition(" ")[2])
        if section is None:
            return None
        from photometry.hooks.settings import default_settings
        values = default_settings().get(section, {})
        return (f"{section}.{dest}", values[dest]) if dest in values else None


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line on stderr and exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} "
                              f"(see {self.prog} --help)\n")


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


def build_parser(argv=()):
    """The parser; only the sub-command named in ``argv`` is imported (start-up stays fast)."""
    parser = _Parser(prog="tessphot", description="Light curves from NASA TESS full-frame images.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-vv for debug); also accepted after the command")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((arg for arg in argv if arg in COMMANDS), None)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: when not given after the command, the count given before it stays
        command.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                             help="more logging (-vv for debug)")
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(command)
            command.set_defaults(handler=module.run)
    return parser


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
_FILE_ONLY = {"stderr": False}


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


# --------------------------------------------------------------------------- main
def _user_error(command, message):
    print(f"tessphot {command}: error: {one_line(message)}", file=sys.stderr)
    logging.getLogger(__name__).info("user error: %s", one_line(message), extra=_FILE_ONLY)
    return EXIT_USAGE


def _os_error_message(exc):
    """One line for an OSError that names a file (a user or environment problem), or None."""
    name = exc.filename
    if disk_full(exc):
        where = f"{name}: " if name else ""
        return f"{where}no space left on device; stopped (finished results are kept)"
    if name is None:
        return None
    return f"{name}: {exc.strerror or exc}"


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    argv = [str(a) for a in argv]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    verbosity = args.verbose + BASE_VERBOSITY.get(args.command, 0)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)]
    configure_logging(level)
    logger = logging.getLogger(__name__)
    logger.info("tessphot %s: %s", __version__, " ".join(argv), extra=_FILE_ONLY)
    try:
        return args.handler(args) or 0
    except InputError as exc:
        return _user_error(args.command, exc)
    except KeyboardInterrupt:
        print(f"tessphot {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader (head, less) went away: no traceback, and none at exit either
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        message = _os_error_message(exc)
        if message is None:
            return _internal_error(args.command, exc)
        logger.info("OS error", exc_info=True, extra=_FILE_ONLY)
        return _user_error(args.command, message)
    except Exception as exc:  # noqa: BLE001 - a bug: one line here, the traceback in the log
        return _internal_error(args.command, exc)
    finally:
        reset_logging()


def _internal_error(command, exc):
    logging.getLogger(__name__).error("internal error in tessphot %s", command, exc_info=True,
                                      extra=_FILE_ONLY)
    if _handlers["file"] is None:  # no log file could be opened: the traceback is all we have
        import traceback
        traceback.print_exception(exc, file=sys.stderr)
        where = "no log file could be written"
    else:
        where = f"traceback in {log_path()}"
    print(f"tessphot {command}: internal error: {type(exc).__name__}: {one_line(exc)} "
          f"({where}; please report it)", file=sys.stderr)
    return EXIT_INTERNAL

