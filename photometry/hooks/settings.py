"""Settings: documented defaults in ``settings/defaults.toml``, overridable per run, typed,
range-checked and hashed.

Why a hash: the cache and every light curve record which settings produced them, so a
resumed prepare with other settings is refused instead of silently mixing products.

Why checked at load: a bad value must stop the command before any work, with one line naming
the key and where the value came from (the file, the ``--set`` or the command-line options),
not as a traceback from deep inside a worker, and not silently when nothing happens to use
it. Every key's type is inferred from its default (so a key added to ``defaults.toml`` is
typed without more code); the allowed values beyond the type are declared in :data:`LIMITS`,
the one place for them (documented in ``docs/settings.md``).
"""
import copy
import hashlib
import json
import math
import tomllib
from importlib import resources
from pathlib import Path

from photometry.hooks.errors import ConfigurationError

__all__ = ["load_settings", "settings_hash", "parse_assignment", "default_settings",
           "core_settings", "plugin_settings", "LIMITS", "DEFAULTS_ORIGIN"]

#: how the defaults are named in error messages (a default that breaks its limit is a bug)
DEFAULTS_ORIGIN = "settings/defaults.toml"


def core_settings():
    """The core's documented defaults (``settings/defaults.toml``), as a nested dict."""
    text = resources.files("photometry._defaults").joinpath("defaults.toml").read_text()
    return tomllib.loads(text)


def default_settings(pm=None):
    """The documented defaults, as a nested dict: the core's and the sections the plugins of
    ``pm`` own (hook ``register_settings``; default: this process's plugin manager)."""
    from photometry.hooks.plugins import default_plugin_manager
    settings = core_settings()
    settings.update(plugin_settings(pm or default_plugin_manager())[0])
    return settings


def plugin_settings(pm):
    """The settings the plugins own: ``(defaults, limits, owners)``.

    ``defaults`` is ``{section: {key: default}}``, ``limits`` ``{"section.key": Limit}``,
    ``owners`` ``{section: plugin name}``.

    Raises
    ------
    ConfigurationError
        A section that is not a table, one claimed twice, or a limit outside its plugin's
        own sections (naming the plugin).
    """
    from photometry.hooks.plugins import hook_impls
    core = core_settings()
    defaults, owners, limits = {}, {}, {}
    for plugin, function in hook_impls(pm, "register_settings"):
        for section, values in (function() or {}).items():
            if not isinstance(values, dict):
                raise ConfigurationError(f"plugin '{plugin}': settings section '{section}' "
                                         "is not a table of defaults")
            other = "the core" if section in core else owners.get(section)
            if other:
                raise ConfigurationError(f"plugin '{plugin}': settings section '{section}' "
                                         f"is already defined by {other}")
            defaults[section], owners[section] = dict(values), plugin
    for plugin, function in hook_impls(pm, "register_setting_limits"):
        for name, limit in (function() or {}).items():
            section = name.split(".")[0]
            if owners.get(section) != plugin or not isinstance(limit, Limit):
                raise ConfigurationError(f"plugin '{plugin}': limit '{name}' must be a "
                                         "photometry.hooks.settings.Limit of one of its own "
                                         "settings")
            limits[name] = limit
    return defaults, limits, owners


# --------------------------------------------------------------------------- limits
class Limit:
    """Allowed values of one setting beyond its type: ``text`` for messages and docs,
    ``test(value) -> bool`` for each number or string (each element of a list).

    ``allow_inf``: an infinite float is accepted (e.g. "no timeout"); otherwise every float
    must be finite. ``scalar_or_list``: the setting takes a number or a list of numbers
    (a default of either kind), e.g. a chunk shape "8" or "[8, 16]". ``length``: the length
    a list must have.
    """

    def __init__(self, text, test, allow_inf=False, scalar_or_list=False, length=None):
        self.text, self.test = text, test
        self.allow_inf, self.scalar_or_list, self.length = allow_inf, scalar_or_list, length


def at_least(low, **kw):
    return Limit(f">= {low}", lambda v: v >= low, **kw)


def above(low, **kw):
    return Limit(f"> {low}", lambda v: v > low, **kw)


def between(low, high, **kw):
    return Limit(f"in [{low}, {high}]", lambda v: low <= v <= high, **kw)


def one_of(*choices, **kw):
    return Limit("one of " + ", ".join(repr(c) for c in choices), lambda v: v in choices, **kw)


def any_value(**kw):
    return Limit("any", lambda v: True, **kw)


def _core_check_code(code):
    from photometry.hooks.quality import CHECK_CODES
    return code in CHECK_CODES


_FRACTION = between(0.0, 1.0)
_POSITIVE = above(0)
_COUNT = at_least(0)
_ONE_OR_MORE = at_least(1)

#: ``"section.key"`` -> :class:`Limit`. Keys not listed are only typed (and finite). Plugin
#: engineers add their keys here; ``docs/settings.md`` lists them (a test keeps it complete).
LIMITS = {
    # simulate
    "simulate.cadences": _ONE_OR_MORE,
    "simulate.rows": _ONE_OR_MORE,
    "simulate.cols": _ONE_OR_MORE,
    "simulate.first_row": _COUNT,
    "simulate.first_col": _COUNT,
    "simulate.cadence": one_of(0, 1800, 600, 200),
    "simulate.sector": _ONE_OR_MORE,
    "simulate.camera": between(1, 4),
    "simulate.ccd": between(1, 4),
    "simulate.prf_sigma": _POSITIVE,
    "simulate.prf_wing_sigma": _POSITIVE,
    "simulate.prf_wing_fraction": _FRACTION,
    "simulate.prf_fwhm": _POSITIVE,
    "simulate.prf_beta": above(1),
    "simulate.prf_ellipticity": between(0.0, 0.9),
    "simulate.prf_angle": between(-180.0, 180.0),
    "simulate.prf_field_ellipticity": between(0.0, 0.9),
    "simulate.prf_field_width": _COUNT,
    "simulate.prf_coma": _COUNT,
    "simulate.focus_change": _COUNT,
    "simulate.focus_period": _COUNT,
    "simulate.star_density": _COUNT,
    "simulate.catalog_margin_px": _COUNT,
    "simulate.isolated_per_bin": _COUNT,
    "simulate.close_pairs": _COUNT,
    "simulate.faint_neighbours": _COUNT,
    "simulate.n_variable": _FRACTION,
    "simulate.sky_level": _COUNT,
    "simulate.glow_timescale": _POSITIVE,
    "simulate.glow_scale": _POSITIVE,
    "simulate.strap_spacing": _ONE_OR_MORE,
    "simulate.read_noise": _COUNT,
    "simulate.full_well": _POSITIVE,
    "simulate.jitter_rms": _COUNT,
    "simulate.dump_interval": _POSITIVE,
    "simulate.dump_jump": at_least(0, length=2),
    "simulate.sky_gradient": any_value(length=2),
    "simulate.glow_origin": any_value(length=2),
    "simulate.coarse_point": _COUNT,
    "simulate.manual_exclude": _COUNT,
    "simulate.wcs_error_px": _COUNT,
    # prepare
    "prepare.time_chunk": _ONE_OR_MORE,
    "prepare.spatial_chunk": at_least(1, scalar_or_list=True, length=2),
    "prepare.compression": one_of("none", "bitshuffle-lz4", "bitshuffle-zstd"),
    "prepare.precision": between(0.0, 1.0),
    "prepare.catalog_margin": _COUNT,
    "prepare.kernel_stars": _ONE_OR_MORE,
    "prepare.kernel_box": at_least(3),
    "prepare.kernel_isolation": _COUNT,
    "prepare.kernel_min_affine_stars": _ONE_OR_MORE,
    "prepare.kernel_clip": _POSITIVE,
    "prepare.saturation_level": _POSITIVE,
    "prepare.preview_frames": _ONE_OR_MORE,
    "prepare.saturation_bleed_pad": _COUNT,
    # photometry
    "photometry.local_background_margin": _COUNT,
    "photometry.local_background_threshold": _POSITIVE,
    "photometry.local_background_min_pixels": _ONE_OR_MORE,
    "photometry.stamp_min_size": _ONE_OR_MORE,
    "photometry.stamp_scale": _POSITIVE,
    "photometry.catalog_buffer": _COUNT,
    "photometry.lightcurve_correction": any_value(),
    "photometry.file_names": one_of("tessphot", "hlsp"),
    "photometry.hlsp_project": Limit("lower-case letters, digits, '-'",
                                     lambda v: bool(v) and all(c.islower() or c.isdigit()
                                                               or c == "-" for c in v)),
    # checks (the core's result checks, docs/checks.md)
    "checks.disabled": Limit("one of the core's check codes (docs/checks.md)",
                             _core_check_code),
    "checks.finite_fraction_warning": _FRACTION,
    "checks.finite_fraction_error": _FRACTION,
    "checks.invalid_errors_error": _FRACTION,
    "checks.scatter_window": at_least(5),
    "checks.noise_vs_stated_max": above(1),
    "checks.noise_vs_stated_min": between(0.0, 1.0),
    "checks.noise_vs_limit_max": above(1),
    "checks.aperture_noise_margin": at_least(0.0),
    "checks.aperture_noise_nsigma": at_least(0.0),
    "checks.slow_aperture_fraction": between(0.5, 0.999),
    "checks.slow_neighbour_max": at_least(0.0),
    "checks.pixel_errors_missing_max": _FRACTION,
    "checks.reference_core_fraction": between(0.1, 1.0),
    "checks.reference_prf_tolerance": _FRACTION,
    "checks.reference_prf_tolerance_spoc": _FRACTION,
    "checks.reference_low_flux_core": between(0.1, 1.0),
    "checks.reference_low_flux": _FRACTION,
    "checks.reference_low_flux_spoc": _FRACTION,
    "checks.reference_low_flux_neighbours": _COUNT,
    "checks.reference_low_flux_mask": _FRACTION,
    "checks.flux_tolerance": _COUNT,
    "checks.flux_tolerance_spoc": _COUNT,
    "checks.flux_nsigma": _COUNT,
    "checks.neighbour_tolerance": _COUNT,
    "checks.catalog_factor": above(1),
    "checks.mask_min_fraction": _FRACTION,
    "checks.bleed_min_coverage": _FRACTION,
    "checks.kernel_min_fraction": _FRACTION,
    # scheduler
    "scheduler.workers": _COUNT,
    "scheduler.worker_threads": _COUNT,
    "scheduler.task_timeout": above(0, allow_inf=True),
    "scheduler.max_attempts": _ONE_OR_MORE,
    "scheduler.lease": _POSITIVE,
    "scheduler.heartbeat": _POSITIVE,
    "scheduler.claim_batch": _ONE_OR_MORE,
    "scheduler.prefetch": _COUNT,
    "scheduler.stamp_cache_mb": _COUNT,
    "scheduler.commit_every": _ONE_OR_MORE,
    "scheduler.commit_interval": _COUNT,
    "scheduler.busy_timeout": _POSITIVE,
    "scheduler.summary_interval": _POSITIVE,
    "scheduler.dask_inflight": _ONE_OR_MORE,
    # aperture
    "aperture.threshold_sigma": _POSITIVE,
    "aperture.seed_dominance": _FRACTION,
    "aperture.prf_sigma": _POSITIVE,
    "aperture.contamination_warning": _COUNT,
    "aperture.residual_background": between(-1, 2),
    "aperture.decorrelation_max_gap": _ONE_OR_MORE,
    "aperture.decorrelation_shrink": _COUNT,
    "aperture.resize_step": _ONE_OR_MORE,
    "aperture.max_resizes": _COUNT,
    "aperture.policy_crowding_limit": _FRACTION,
    # calibration
    "calibration.exposure_tolerance": _POSITIVE,
    "calibration.pedestal_first_row": _COUNT,
    "calibration.pedestal_skip_columns": _COUNT,
    "calibration.smear_skip_rows": _COUNT,
    "calibration.smear_estimator": one_of("mean", "median"),
    # backdrop
    "backdrop.poly_degree": _COUNT,
    "backdrop.knot_spacing": _POSITIVE,
    "backdrop.bin_rows": _ONE_OR_MORE,
    "backdrop.clip_iterations": _COUNT,
    "backdrop.jitter_components": _COUNT,
    # scattered light
    "scattered_light.bin_size": _ONE_OR_MORE,
    "scattered_light.min_pixels": _ONE_OR_MORE,
    "scattered_light.time_bin": _COUNT,
    "scattered_light.min_bin_fraction": _FRACTION,
    "scattered_light.interpolation": one_of("cubic", "linear"),
    "scattered_light.gap_factor": _POSITIVE,
    "scattered_light.time_smooth": _COUNT,
    # linpsf
    "linpsf.basis": one_of("auto", "polar", "cartesian", "hybrid"),
    "linpsf.cart_step": _POSITIVE,
    "linpsf.cart_core": _POSITIVE,
    "linpsf.cart_wing_step": _POSITIVE,
    "linpsf.max_shape_residual": _POSITIVE,
    "linpsf.max_lattice_spread": _POSITIVE,
    "linpsf.max_flux_loss": _FRACTION,
    "linpsf.rmax": _POSITIVE,
    "linpsf.n_r_knots": at_least(2),
    "linpsf.n_phi": _COUNT,
    "linpsf.n_sub": _ONE_OR_MORE,
    "linpsf.mode": one_of("target", "scene"),
    "linpsf.max_stars": _ONE_OR_MORE,
    "linpsf.min_stars": _ONE_OR_MORE,
    "linpsf.iterations": _ONE_OR_MORE,
    "linpsf.grid": _ONE_OR_MORE,
    "linpsf.blur_samples": _ONE_OR_MORE,
    "linpsf.time_degree": _COUNT,
    "linpsf.time_bins": _ONE_OR_MORE,
    "linpsf.max_sources": _ONE_OR_MORE,
    "linpsf.scene_tile": _ONE_OR_MORE,
    "linpsf.scene_block": _ONE_OR_MORE,
    "linpsf.residual_iterations": _COUNT,
    "linpsf.neighbour_smoothing": _COUNT,
    # cbv light-curve correction
    "cbv.tmag_min": between(-5.0, 25.0),
    "cbv.tmag_max": between(-5.0, 25.0),
    "cbv.max_contamination": _FRACTION,
    "cbv.max_basis_stars": _ONE_OR_MORE,
    "cbv.max_scatter": _POSITIVE,
    "cbv.correlated_fraction": Limit("in (0, 1]", lambda v: 0 < v <= 1),
    "cbv.min_stars": at_least(2),
    "cbv.max_vectors": _ONE_OR_MORE,
    "cbv.significance": _POSITIVE,
    "cbv.clip_sigma": _POSITIVE,
    "cbv.min_noise_goodness": _COUNT,
    "cbv.prior_neighbours": _ONE_OR_MORE,
    "cbv.prior_mag_px": _COUNT,
    "cbv.prior_ff_px": _COUNT,
    "cbv.prior_stars": one_of("quiet", "basis"),
    "cbv.spoc_cbv_vectors": _ONE_OR_MORE,
    "linpsf.max_chi2": _POSITIVE,
    "linpsf.max_misfit": _COUNT,
}

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list"}


def _kind(value):
    for kind in (bool, int, float, str, list, dict):
        if isinstance(value, kind):
            return kind
    return type(value)


def _check_scalar(value, kind, limit, allow_inf):
    """``value`` as ``kind`` (an int is a valid float) or a message saying what is wrong."""
    if kind is float and _kind(value) is int:
        value = float(value)
    if _kind(value) is not kind:
        return None, f"is not {_TYPE_NAMES.get(kind, kind.__name__)}"
    if kind is float and not math.isfinite(value) and not (allow_inf and value > 0):
        return None, "is not a finite number"
    if limit is not None and not limit.test(value):
        return None, f"must be {limit.text}"
    return value, None


def check_value(name, value, default, limits=None):
    """The value of setting ``name`` normalised to the default's type (int -> float for a
    float setting, so that equal values hash alike); ``limits`` defaults to :data:`LIMITS`.

    Raises
    ------
    ValueError
        With what is wrong (the caller adds the key and where the value came from).
    """
    limit = (LIMITS if limits is None else limits).get(name)
    allow_inf = bool(limit and limit.allow_inf)
    kind = _kind(default)
    if kind is list or (limit is not None and limit.scalar_or_list):
        if limit is not None and limit.scalar_or_list and _kind(value) is not list:
            element = default[0] if isinstance(default, list) and default else default
            checked, problem = _check_scalar(value, _kind(element), limit, allow_inf)
            if problem:
                raise ValueError(problem)
            return checked
        if _kind(value) is not list:
            raise ValueError("is not a list")
        if limit is not None and limit.length is not None and len(value) != limit.length:
            raise ValueError(f"must be a list of {limit.length} values")
        kinds = {_kind(v) for v in (default if isinstance(default, list) else [default])}
        element_kind = kinds.pop() if len(kinds) == 1 else None
        out = []
        for item in value:
            if element_kind is None:   # an empty default: the limit alone says what fits
                if _kind(item) in (list, dict):
                    raise ValueError("must be a list of plain values")
                if limit is not None and not limit.test(item):
                    raise ValueError(f"element {item!r} must be {limit.text}")
                out.append(item)
                continue
            checked, problem = _check_scalar(item, element_kind, limit, allow_inf)
            if problem:
                raise ValueError(f"element {item!r} {problem}")
            out.append(checked)
        return out
    checked, problem = _check_scalar(value, kind, limit, allow_inf)
    if problem:
        raise ValueError(problem)
    return checked


def _validate(settings, defaults, origins, limits, default_origins, prefix=""):
    for key, default in defaults.items():
        name = f"{prefix}{key}"
        if isinstance(default, dict):
            _validate(settings[key], default, origins, limits, default_origins,
                      prefix=name + ".")
            continue
        try:
            settings[key] = check_value(name, settings[key], default, limits)
        except ValueError as exc:
            origin = origins.get(name) or default_origins.get(name.split(".")[0],
                                                              DEFAULTS_ORIGIN)
            raise ConfigurationError(f"{origin}: {name} = {_show(settings[key])} {exc}") \
                from None


def _show(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


# --------------------------------------------------------------------------- loading
def _merge(base, update, origin, origins, prefix=""):
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in base:
            raise ConfigurationError(f"{origin}: unknown setting '{name}'")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigurationError(f"{origin}: setting '{name}' is a section, not a value")
            _merge(base[key], value, origin, origins, prefix=name + ".")
        else:
            if isinstance(value, dict):
                raise ConfigurationError(f"{origin}: setting '{name}' is a value, not a section")
            base[key] = value
            origins[name] = origin


def parse_assignment(text):
    """Turn ``"section.key=value"`` (value in TOML syntax, bare words as strings) into a dict."""
    if "=" not in text:
        raise ConfigurationError(f"--set {text}: expected section.key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key or any(not part for part in key.split(".")):
        raise ConfigurationError(f"--set {text}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    nested = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def _read_toml(path):
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigurationError(f"{path}: settings file not found") from None
    except IsADirectoryError:
        raise ConfigurationError(f"{path}: is a folder, not a settings file") from None
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{path}: settings file is not UTF-8 text (byte "
                                 f"{exc.start})") from None
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot read the settings file "
                                 f"({exc.strerror or exc})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path}: not a valid TOML settings file ({exc})") from None


def load_settings(files=(), assignments=(), extra=None, extra_origin="command-line options"):
    """Defaults (the core's and the loaded plugins' sections), then each TOML file, then
    ``section.key=value`` assignments, then ``extra`` (a nested dict from command-line
    options, named ``extra_origin`` in messages); then every value is checked against its
    default's type and :data:`LIMITS` (and the plugins' limits).

    Raises
    ------
    ConfigurationError
        One line naming the key (or file) and where the value came from: a missing,
        unreadable, non-UTF-8 or malformed file, an unknown key, a value of the wrong type or
        out of its range.
    """
    from photometry.hooks.plugins import default_plugin_manager
    _, plugin_limits, owners = plugin_settings(default_plugin_manager())
    settings = default_settings()
    origins = {}
    for path in files:
        path = Path(path)
        _merge(settings, _read_toml(path), str(path), origins)
    for text in assignments:
        _merge(settings, parse_assignment(text), f"--set {text}", origins)
    if extra:
        _merge(settings, copy.deepcopy(extra), extra_origin, origins)
    _validate(settings, default_settings(), origins, {**LIMITS, **plugin_limits},
              {section: f"plugin '{owner}' defaults" for section, owner in owners.items()})
    return settings


def settings_hash(settings, section=None):
    """Short stable hash of the settings (or of one section of them)."""
    data = settings if section is None else settings[section]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
