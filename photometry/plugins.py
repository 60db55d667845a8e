"""The plugin manager and the name-to-class registries built from the registration hooks.

Built-in plugins and third-party ones are found the same way: the ``photometry`` entry-point
group. Set ``TESSPHOT_TRACE_HOOKS=1`` to log every hook call.
"""
import functools
import logging
import os
from importlib import metadata

import pluggy

from . import PROJECT_NAME, hookspecs
from .errors import ConfigurationError

__all__ = ["get_plugin_manager", "default_plugin_manager", "registry", "lookup", "plugin_table",
           "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = PROJECT_NAME
logger = logging.getLogger(__name__)


def get_plugin_manager(blocked=(), extra_plugins=()):
    """A new plugin manager: specs, entry-point plugins (minus ``blocked``), ``extra_plugins``.

    Raises
    ------
    ConfigurationError
        If a plugin fails to import (naming it) or implements a hook that does not exist.
    """
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in blocked:
        pm.set_blocked(name)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - re-raised with the plugin's name
            raise ConfigurationError(
                f"plugin '{ep.name}' ({ep.value}) failed to import: {exc}") from exc
        pm.register(plugin, name=ep.name)
    for plugin in extra_plugins:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigurationError(f"plugin hook error: {exc}") from exc
    if os.environ.get("TESSPHOT_TRACE_HOOKS"):
        pm.trace.root.setwriter(logger.warning)
        pm.enable_tracing()
    return pm


#: registration hook -> base class its classes must derive from (import path, resolved lazily)
_BASES = {
    "register_algorithms": "photometry.base:BasePhotometry",
    "register_prepare_stages": "photometry.stages:PrepareStage",
    "register_corrections": "photometry.stages:StampCorrection",
    "register_calibration_stages": "photometry.stages:CalibrationStage",
    "register_lightcurve_corrections": "photometry.stages:LightCurveCorrection",
    "register_output_writers": None,
}


def _resolve(path):
    module, _, attr = path.partition(":")
    return getattr(__import__(module, fromlist=[attr]), attr)


def registry(pm, hook_name):
    """Name-to-class mapping from one registration hook.

    Raises
    ------
    ConfigurationError
        On a duplicate name (naming both classes), a class without a ``name``, or a class
        that does not derive from the hook's base class.
    """
    base_path = _BASES[hook_name]
    base = _resolve(base_path) if base_path else None
    found = {}
    hook = getattr(pm.hook, hook_name)
    for impl_result in hook():
        for cls in impl_result or []:
            label = f"{cls.__module__}.{cls.__qualname__}"
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name:
                raise ConfigurationError(f"{label} (from {hook_name}) has no 'name'")
            if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
                raise ConfigurationError(
                    f"{label} (from {hook_name}) must derive from {base_path.replace(':', '.')}")
            if name in found:
                other = found[name]
                raise ConfigurationError(
                    f"duplicate {hook_name} name '{name}': "
                    f"{other.__module__}.{other.__qualname__} and {label}")
            found[name] = cls
    return found


def lookup(pm, hook_name, name):
    """The class registered under ``name``, or a ConfigurationError listing the known names."""
    classes = registry(pm, hook_name)
    if name not in classes:
        known = ", ".join(sorted(classes)) or "none"
        raise ConfigurationError(f"unknown {hook_name.replace('register_', '')[:-1]} "
                                 f"'{name}' (known: {known})")
    return classes[name]


def plugin_table(pm):
    """One row per plugin: name, distribution, version, hooks it implements."""
    dists = {ep.name: ep.dist for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist = dists.get(name)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        rows.append({
            "name": name,
            "distribution": dist.metadata["Name"] if dist else "-",
            "version": dist.version if dist else "-",
            "hooks": hooks,
        })
    return rows


@functools.lru_cache(maxsize=None)
def default_plugin_manager():
    """One plugin manager per process for the command-line tools (never at import time)."""
    return get_plugin_manager()
