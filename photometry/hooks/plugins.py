"""The plugin manager and the name-to-class registries built from the registration hooks.

Built-in plugins and third-party ones are found the same way: the ``photometry`` entry-point
group. Every command uses one plugin manager per process, :func:`default_plugin_manager`,
and passes it on; it honours two environment variables for every hook kind (algorithms,
writers, background models, corrections, prepare and calibration stages, settings):

``TESSPHOT_BLOCK_PLUGINS=name,name`` (``*`` = every entry-point plugin)
    entry-point plugins left out (not even imported);
``TESSPHOT_EXTRA_PLUGINS=module.a,module.b``
    modules registered as plugins without an entry point (a module that cannot be imported
    is a one-line error: it was asked for by name).

An installed entry-point plugin that fails to import is reported with one WARNING naming it
and skipped, so one broken package does not break every command. Why environment variables
and not settings: which plugins load decides which settings sections exist, so the plugin
list cannot itself come from a settings file. Set ``TESSPHOT_TRACE_HOOKS=1`` to log every
hook call.
"""
import functools
import importlib
import logging
import os
from importlib import metadata

import pluggy


from photometry.hooks import hookspecs
from photometry.hooks.hookspecs import PROJECT_NAME
from photometry.hooks.errors import ConfigurationError

__all__ = ["get_plugin_manager", "default_plugin_manager", "use_plugins", "plugin_names",
           "registry", "lookup", "hook_impls", "ENTRY_POINT_GROUP",
           "BLOCK_PLUGINS_ENV", "EXTRA_PLUGINS_ENV", "REGISTRATION_HOOKS"]

ENTRY_POINT_GROUP = PROJECT_NAME
BLOCK_PLUGINS_ENV = "TESSPHOT_BLOCK_PLUGINS"
EXTRA_PLUGINS_ENV = "TESSPHOT_EXTRA_PLUGINS"
logger = logging.getLogger(__name__)


def _names(value):
    """A tuple of plugin names (or modules) from a comma-separated string or a sequence."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    return tuple(name.strip() if isinstance(name, str) else name
                 for name in value if not isinstance(name, str) or name.strip())


def get_plugin_manager(blocked=(), extra_plugins=()):
    """A new plugin manager: specs, entry-point plugins (minus ``blocked``; ``"*"`` blocks all),
    ``extra_plugins`` (modules, or importable module names).

    Commands do not call this: they use :func:`default_plugin_manager` (one per process).
    Entry-point plugins that fail to import are skipped with one WARNING each; their names are
    in ``pm.tessphot_broken``.

    Raises
    ------
    ConfigurationError
        If an extra plugin named by module cannot be imported, or a plugin implements a hook
        that does not exist.
    """
    blocked = _names(blocked)
    entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
    if "*" in blocked:
        blocked = tuple(ep.name for ep in entry_points)
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.tessphot_broken = []
    for name in blocked:
        pm.set_blocked(name)
    for ep in entry_points:
        if pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the others
            logger.warning("plugin '%s' (%s) failed to import and is skipped: %s: %s "
                           "(%s=%s hides this)", ep.name, ep.value, type(exc).__name__,
                           exc, BLOCK_PLUGINS_ENV, ep.name)
            pm.tessphot_broken.append(ep.name)
            continue
        pm.register(plugin, name=ep.name)
    for plugin in _names(extra_plugins):
        if isinstance(plugin, str):
            try:
                plugin = importlib.import_module(plugin)
            except ImportError as exc:
                raise ConfigurationError(
                    f"{EXTRA_PLUGINS_ENV}: cannot import '{plugin}' ({exc})") from None
        if pm.is_registered(plugin):
            continue
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigurationError(f"plugin hook error: {exc}") from exc
    if os.environ.get("TESSPHOT_TRACE_HOOKS"):
        pm.trace.root.setwriter(logger.warning)
        pm.enable_tracing()
    return pm


#: the block and extra lists this process was told to use (a worker: its coordinator's)
_USE = {}


def use_plugins(blocked, extra_plugins):
    """Make ``blocked`` / ``extra_plugins`` (comma-separated names) this process's plugin
    configuration instead of the environment's: a worker adopts its coordinator's, so that a
    Dask worker with another environment runs the same plugins."""
    _USE["names"] = (_names(blocked), _names(extra_plugins))


def plugin_names():
    """(blocked, extra) names of this process's plugin manager: :func:`use_plugins`, else
    ``TESSPHOT_BLOCK_PLUGINS`` and ``TESSPHOT_EXTRA_PLUGINS``."""
    if "names" in _USE:
        return _USE["names"]
    return (_names(os.environ.get(BLOCK_PLUGINS_ENV)),
            _names(os.environ.get(EXTRA_PLUGINS_ENV)))


def default_plugin_manager():
    """This process's plugin manager (built on first use, never at import time), for the
    block and extra lists of :func:`plugin_names`; every command and the core use it."""
    return _cached_plugin_manager(*plugin_names())


@functools.lru_cache(maxsize=None)
def _cached_plugin_manager(blocked, extra):
    return get_plugin_manager(blocked=blocked, extra_plugins=extra)


#: registration hook -> base class its classes must derive from (import path, resolved lazily)
_BASES = {
    "register_algorithms": "photometry.core.base:BasePhotometry",
    "register_prepare_stages": "photometry.data.stages:PrepareStage",
    "register_corrections": "photometry.data.stages:StampCorrection",
    "register_calibration_stages": "photometry.data.stages:CalibrationStage",
    "register_lightcurve_corrections": "photometry.data.stages:LightCurveCorrection",
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


#: what each registration hook registers, as ``tessphot plugins`` names it
REGISTRATION_HOOKS = {
    "register_algorithms": "algorithms",
    "register_output_writers": "writers",
    "register_prepare_stages": "prepare_stages",
    "register_corrections": "corrections",
    "register_calibration_stages": "calibration_stages",
}


def hook_impls(pm, hook_name):
    """(plugin name, hook function) of every implementation of ``hook_name``, in call order."""
    return [(impl.plugin_name, impl.function)
            for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls())]
