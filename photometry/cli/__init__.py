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

from photometry.hooks.version import __version__
from photometry.hooks.commandline import (FILE_ONLY, configure_logging, log_file_open,
                                          log_path, one_line, reset_logging)
from photometry.hooks.errors import InputError, disk_full

__all__ = ["main", "build_parser", "COMMANDS", "EXIT_USAGE", "EXIT_INTERNAL"]

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


# --------------------------------------------------------------------------- main
def _user_error(command, message):
    print(f"tessphot {command}: error: {one_line(message)}", file=sys.stderr)
    logging.getLogger(__name__).info("user error: %s", one_line(message), extra=FILE_ONLY)
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
    logger.info("tessphot %s: %s", __version__, " ".join(argv), extra=FILE_ONLY)
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
        logger.info("OS error", exc_info=True, extra=FILE_ONLY)
        return _user_error(args.command, message)
    except Exception as exc:  # noqa: BLE001 - a bug: one line here, the traceback in the log
        return _internal_error(args.command, exc)
    finally:
        reset_logging()


def _internal_error(command, exc):
    logging.getLogger(__name__).error("internal error in tessphot %s", command, exc_info=True,
                                      extra=FILE_ONLY)
    if not log_file_open():  # no log file could be opened: the traceback is all we have
        import traceback
        traceback.print_exception(exc, file=sys.stderr)
        where = "no log file could be written"
    else:
        where = f"traceback in {log_path()}"
    print(f"tessphot {command}: internal error: {type(exc).__name__}: {one_line(exc)} "
          f"({where}; please report it)", file=sys.stderr)
    return EXIT_INTERNAL

