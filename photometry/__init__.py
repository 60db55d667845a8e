"""photometry: a plugin-based photometry framework for NASA TESS full-frame images.

The code lives in rooms (``docs/architecture.md`` draws them), each importing only from the
rooms below it::

    cli, testing -> sim -> scheduler -> output -> core -> data -> hooks

This package is the public API a plugin author uses: every name below is importable as
``from photometry import NAME`` (plugins import nothing else of the core, apart from the
documented submodule :mod:`photometry.testing`). The names are imported on first use, so
``import photometry`` (and ``tessphot --help``) stays fast and loads no numerical code.
"""
import importlib

from photometry.hooks.hookspecs import PROJECT_NAME, hookimpl, hookspec
from photometry.hooks.version import __version__

#: public name -> the module (under ``photometry.``) that defines it
_PUBLIC = {
    # the target and its outcome
    "STATUS": "core.base", "BasePhotometry": "core.base",
    # errors: their class decides exit code / STATUS
    "InputError": "hooks.errors", "ConfigurationError": "hooks.errors",
    "SkipTarget": "hooks.errors", "UnprocessableTarget": "hooks.errors",
    "AlgorithmFailure": "hooks.errors",
    # flags and small helpers
    "TESSQualityFlags": "hooks.quality", "PixelQualityFlags": "hooks.quality",
    "LightCurveQualityFlags": "hooks.quality",
    "mag2flux": "hooks.utilities", "flux2mag": "hooks.utilities",
    "disc_mask": "hooks.utilities", "open_fits": "hooks.utilities",
    "nanmean0": "core.sky",
    # settings (plugin-owned sections and their limits)
    "load_settings": "hooks.settings", "default_settings": "hooks.settings",
    "Limit": "hooks.settings", "at_least": "hooks.settings", "above": "hooks.settings",
    "between": "hooks.settings", "one_of": "hooks.settings", "any_value": "hooks.settings",
    # the plugin manager
    "default_plugin_manager": "hooks.plugins", "lookup": "hooks.plugins",
    # base classes of the registered stages and their contexts
    "PrepareStage": "data.stages", "StreamingStage": "data.stages",
    "StreamContext": "data.stages", "BackgroundModel": "data.stages",
    "StampCorrection": "data.stages", "CalibrationStage": "data.stages",
    "LightCurveCorrection": "data.stages", "background_model_class": "data.stages",
    "InputFile": "data.stages", "FitsTables": "data.fits_tables",
    "cache_catalog": "data.stages", "StageData": "data.stages",
    # data sources and the files they read
    "DataSource": "data.sources", "FFICache": "data.cache", "cache_filename": "data.cache",
    "catalog_filename": "data.cache", "pixel_flags_for": "data.cache",
    "TPFSource": "data.tpf", "MemorySource": "data.memory_source",
    "MemoryGroup": "data.memory_source", "MovementKernel": "data.movement",
    "FFIFrame": "data.ffi", "read_ffi": "data.ffi", "find_ffi_files": "data.ffi",
    "read_catalog_sqlite": "data.catalog", "stars_in_box": "data.catalog",
    "median_variance_factor": "data.calibration",
    "TaskStore": "data.taskstore",
    # instrument models
    "PRFModel": "data.prf", "AnalyticPRF": "data.prf", "SpocPRF": "data.prf",
    "load_prf": "data.prf", "CCDNoise": "data.noise",
    # light-curve files and corrections of whole CCDs
    "read_lightcurve": "output.lightcurve_io", "write_atomic": "output.lightcurve_io",
    "save_figure": "output.plots",
    "Corrected": "scheduler.correct", "Ensemble": "scheduler.correct",
}

__all__ = ["__version__", "PROJECT_NAME", "hookimpl", "hookspec", *_PUBLIC]


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'photometry' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"photometry.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
