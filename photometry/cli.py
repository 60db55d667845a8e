"""The ``tessphot`` command line: one sub-command per module, each with
``add_arguments(parser)`` and ``run(args) -> exit code``.

Errors of kind :class:`photometry.errors.InputError` become one line on stderr and exit code 2.
"""
import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import InputError

#: sub-command -> (module implementing it, one-line help)
COMMANDS = {
    "simulate": ("photometry.simulate", "write a synthetic sector of SPOC-format FFIs"),
    "prepare": ("photometry.prepare", "build the HDF5 cache of a sector/camera/CCD"),
    "todo": ("photometry.todo", "build the task list todo.sqlite"),
    "run": ("photometry.run", "run photometry on every task"),
    "correct": ("photometry.correct", "co-trend the light curves of a run (PDCSAP_FLUX)"),
    "star": ("photometry.star", "run one star with full logging and plots"),
    "status": ("photometry.status_cmd", "counts and failures of a run"),
    "plugins": ("photometry.plugins_cmd", "list installed plugins and their hooks"),
}


def add_settings_arguments(parser):
    """The options every settings-driven command accepts."""
    parser.add_argument("--settings", action="append", default=[], metavar="FILE",
                        help="TOML file overriding default settings (repeatable)")
    parser.add_argument("--set", action="append", default=[], dest="assignments",
                        metavar="SECTION.KEY=VALUE", help="override one setting (repeatable)")


def build_parser(argv=()):
    """The parser; only the sub-command named in ``argv`` is imported (start-up stays fast)."""
    parser = argparse.ArgumentParser(
        prog="tessphot", description="Light curves from NASA TESS full-frame images.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((arg for arg in argv if arg in COMMANDS), None)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(command)
            command.set_defaults(handler=module.run)
    return parser


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args) or 0
    except InputError as exc:
        print(f"tessphot {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tessphot {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
