"""``tessphot plugins``: each plugin of this process's plugin manager (``TESSPHOT_BLOCK_PLUGINS``
and ``TESSPHOT_EXTRA_PLUGINS`` applied), its distribution, version and hooks, what it registers
(algorithms, writers, prepare stages and background models, corrections, calibration stages)
and the settings sections it owns, with their defaults and limits."""
import json

from photometry.hooks.plugins import default_plugin_manager, plugin_table


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _show(value):
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def run(args):
    rows = plugin_table(default_plugin_manager())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']:<24} {row['distribution']:<28} {row['version']:<10} "
              f"{', '.join(row['hooks'])}")
        for kind, names in row["registers"].items():
            print(f"    {kind.replace('_', ' ') + ':':<20} {', '.join(names)}")
        for section, values in row["settings"].items():
            print(f"    [{section}]")
            for key, value in values.items():
                limit = row["limits"].get(f"{section}.{key}")
                print(f"      {key} = {_show(value)}" + (f"    # {limit}" if limit else ""))
    return 0
