"""Every hook a plugin can implement, in one place.

Registration hooks return a list of classes; each class has a unique ``name`` that is its key
in settings, the task list and output file names. Plugins implement only the arguments they
need, so a hook can gain arguments later without breaking them.
"""
import pluggy

#: the pluggy project name: the entry-point group and the markers' name
PROJECT_NAME = "photometry"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: the marker a plugin puts on its hook functions (``photometry.hookimpl``)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_algorithms():
    """Per-target photometry algorithms: a list of BasePhotometry subclasses (all results kept)."""


@hookspec
def register_prepare_stages():
    """Prepare-stage models run over a CCD's frames (background, scattered light, PRF):
    a list of :class:`photometry.data.stages.PrepareStage` subclasses (all results kept)."""


@hookspec
def register_corrections():
    """Corrections applied to a target's stamp before photometry (e.g. scattered light):
    a list of :class:`photometry.data.stages.StampCorrection` subclasses (all results kept)."""


@hookspec
def register_calibration_stages():
    """Raw-FFI calibration stages: a list of :class:`photometry.data.stages.CalibrationStage`
    subclasses, each with an integer ``order`` (all results kept)."""


@hookspec
def register_lightcurve_corrections():
    """Corrections of a CCD's light curves after its photometry (co-trending, PDCSAP_FLUX):
    a list of :class:`photometry.data.stages.LightCurveCorrection` subclasses (all results kept)."""


@hookspec
def register_output_writers():
    """Light-curve writers: a list of classes with ``name`` and ``write(photometry, path)``
    (all results kept)."""


@hookspec(firstresult=True)
def choose_method(target, settings):
    """The algorithm name for a target when no method is forced (first non-None wins).

    ``target`` is a mapping with at least starid, tmag, row, column, sector, camera, ccd.
    """


@hookspec
def register_settings():
    """Settings sections this plugin owns, next to its code: ``{section: {key: default}}``.

    The sections join the core's defaults: a settings file or ``--set section.key=value``
    may change them, every value is typed from its default and checked like a core setting,
    and ``tessphot plugins`` shows them. A section may not reuse a core or another plugin's
    section name (the error names both owners).
    """


@hookspec
def register_setting_limits():
    """Allowed values of this plugin's settings beyond their type: ``{"section.key": Limit}``
    with the helpers of :mod:`photometry.hooks.settings` (``at_least``, ``between``, ``one_of``, ...).
    Keys must belong to the plugin's own sections."""
