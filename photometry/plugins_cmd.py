"""``tessphot plugins``: each installed plugin, its distribution, version and hooks."""
import json

from .plugins import get_plugin_manager, plugin_table


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args):
    rows = plugin_table(get_plugin_manager())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']:<24} {row['distribution']:<28} {row['version']:<10} "
              f"{', '.join(row['hooks'])}")
    return 0
