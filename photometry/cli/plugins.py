"""``tessphot plugins``: each plugin of this process's plugin manager (``TESSPHOT_BLOCK_PLUGINS``
and ``TESSPHOT_EXTRA_PLUGINS`` applied), its distribution, version and hooks, what it registers
(algorithms, writers, prepare stages and background models, corrections, calibration stages)
and the settings sections it owns, with their defaults and limits."""
import json
from importlib import metadata

from photometry.data.stages import BackgroundModel
from photometry.hooks.plugins import (ENTRY_POINT_GROUP, REGISTRATION_HOOKS, default_plugin_manager,
                                      hook_impls)
from photometry.hooks.settings import plugin_settings

__all__ = ["plugin_table", "add_arguments", "run"]


def plugin_table(pm):
    """One row per plugin: name, distribution, version, hooks it implements, the names it
    registers per kind (``registers``; ``backgrounds`` are the prepare stages that are
    background models) and the settings it owns (``settings``, ``limits``)."""
    dists = {ep.name: ep.dist for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    defaults, limits, owners = plugin_settings(pm)
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist = dists.get(name)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        registers = {}
        for hook_name, kind in REGISTRATION_HOOKS.items():
            classes = [cls for plugin_name, function in hook_impls(pm, hook_name)
                       if plugin_name == name for cls in function() or []]
            if classes:
                registers[kind] = [cls.name for cls in classes]
            if kind == "prepare_stages":
                backgrounds = [cls.name for cls in classes
                               if isinstance(cls, type) and issubclass(cls, BackgroundModel)]
                if backgrounds:
                    registers["backgrounds"] = backgrounds
        sections = {s: defaults[s] for s, owner in owners.items() if owner == name}
        rows.append({
            "name": name,
            "distribution": dist.metadata["Name"] if dist else "-",
            "version": dist.version if dist else "-",
            "hooks": hooks,
            "registers": registers,
            "settings": sections,
            "limits": {k: v.text for k, v in limits.items() if k.split(".")[0] in sections},
        })
    return rows


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
