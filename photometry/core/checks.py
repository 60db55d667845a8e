"""The core's checks of every light curve before it may be STATUS OK (``docs/checks.md``).

Why: in mass processing nobody looks at each of 100 000 light curves, so a wrong one marked OK
is the worst defect the pipeline can have. Whatever algorithm produced it (built-in or a
third-party plugin), :class:`photometry.core.base.BasePhotometry` runs :func:`check_result` after
``do_photometry`` and before the light curve is written. The checks use only the result
(``lightcurve`` flux and flux_err, ``final_phot_mask``) and the core's data (cubes, pixel
flags, catalog, PRF, movement kernel), never the algorithm's internals.

Each failed check is a :class:`Flag`: a reason code, a level (WARNING or ERROR) and one line of
text. The worst level decides the target's STATUS; every flag is stored in the todo
diagnostics (``details['checks']``, the ``qc_codes`` column) and in the light-curve header
(:func:`header_cards`). Thresholds are the ``[checks]`` settings.

Codes (the check behind each, and its level):

===================== ======= ==========================================================
FINITE_FRACTION       W / E   finite flux on too few good cadences
ERRORS_INVALID        W / E   stated errors not finite or not positive where flux is finite
NOISE_EXCESS          W       point-to-point scatter far above the stated errors or the noise
                              propagated from the pixel uncertainties (the photon limit)
NOISE_VS_APERTURE     W       a total-flux (PRF-fit) light curve measurably noisier than
                              aperture sums of the same pixels
SLOW_NOISE_VS_APERTURE W      the same, counting the noise that follows the pointing,
                              against aperture sums decorrelated against the pointing
ERRORS_OVERSTATED     W       scatter far below the stated errors
PIXEL_ERRORS_MISSING  W       pixel uncertainties NaN in the mask (noise model used instead)
FLUX_VS_REFERENCE     E       flux inconsistent with a plain sum of the same pixels, allowing
                              for the catalog neighbours' light in them and the PRF fraction
FLUX_LOW              W       flux below what its core pixels imply for any real TESS PRF
FLUX_VS_CATALOG       W       flux far from the catalog magnitude's
NO_MASK               W       no ``final_phot_mask``: the pixel checks cannot run
MASK_TOO_SMALL        W       mask holds much less of the target's PRF than an S/N-optimal one
BLEED_NOT_COVERED     E       saturated pixels of the target (core and bleed) outside the mask
BLEED_TRUNCATED       W       the target's saturated pixels run off the stamp
KERNEL_INVALID        W       the movement kernel is not measured on enough good frames
METHOD_WARNING        W       the algorithm returned WARNING itself (its logged reasons)
METHOD_ERROR          E       the algorithm failed without a reason code of its own
===================== ======= ==========================================================

Algorithms add their own codes with :meth:`BasePhotometry.report_flag` (e.g. linpsf's
``FIT_CHI2``) or refuse a target with :meth:`BasePhotometry.decline` (``SATURATED``).
"""
import logging
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from photometry.core.motion import pos_corr
from photometry.data.noise import CCDNoise
from photometry.hooks.quality import CHECK_CODES, PixelQualityFlags, TESSQualityFlags
from photometry.hooks.utilities import mag2flux

__all__ = ["Flag", "CheckReport", "check_result", "saturated_target_pixels",
           "robust_scatter", "header_cards", "LEVELS", "CHECK_CODES"]

logger = logging.getLogger(__name__)

#: level names in increasing severity (the STATUS names they map to)
LEVELS = ("OK", "WARNING", "ERROR")



@dataclass
class Flag:
    """One failed check: reason code, level ("WARNING" or "ERROR") and a one-line text."""

    code: str
    level: str
    text: str

    def __post_init__(self):
        if self.level not in LEVELS[1:]:
            raise ValueError(f"check flag level must be WARNING or ERROR, not {self.level!r}")


class CheckReport:
    """The flags and the measured values of one target's checks.

    ``status`` is the worst level ("OK" without flags); :meth:`to_details` is what goes to
    ``details['checks']`` (todo diagnostics) and, through :func:`header_cards`, the header.
    """

    def __init__(self, flags=(), metrics=None):
        self.flags = list(flags)
        self.metrics = dict(metrics or {})

    @property
    def status(self):
        return max((f.level for f in self.flags), key=LEVELS.index, default="OK")

    @property
    def codes(self):
        return list(dict.fromkeys(f.code for f in self.flags))

    def to_details(self):
        return {"status": self.status, "codes": self.codes,
                "flags": [asdict(f) for f in self.flags],
                "metrics": {k: _plain(v) for k, v in self.metrics.items()}}


def _plain(value):
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# --------------------------------------------------------------------------- statistics
def _local_cubic(window):
    """(odd window, (window,) weights): the Savitzky-Golay filter that gives the central value
    of a cubic fitted to ``window`` cadences (rounded up to odd), which
    :func:`robust_scatter` and :func:`_smooth` share."""
    window = int(window) | 1
    half = window // 2
    vander = np.vander(np.arange(-half, half + 1), 4, increasing=True)
    return window, np.linalg.pinv(vander)[0]


def robust_scatter(flux, good=None, window=7):
    """White-noise sigma of a light curve from its residual about a local cubic.

    Why not the plain standard deviation or point-to-point difference: stars vary, and at
    30-min cadence a 3 % sinusoid of 0.5 d dominates both for a bright star. The residual of
    each good cadence about a cubic fitted to the ``window`` cadences around it (a
    Savitzky-Golay filter; the series of good cadences taken as consecutive) removes
    variability slower than a few cadences; its MAD, scaled by ``1 / sqrt(1 - w0)`` (``w0``
    the filter's central weight, 1/3 for 7 points), is the white-noise sigma. None with fewer
    than ``2 x window`` finite good cadences.
    """
    flux = np.asarray(flux, dtype=float)
    ok = np.isfinite(flux) if good is None else (np.asarray(good, bool) & np.isfinite(flux))
    values = flux[ok]
    window, weights = _local_cubic(window)
    if values.size < 2 * window:
        return None
    half = window // 2
    smooth = np.lib.stride_tricks.sliding_window_view(values, window) @ weights
    resid = values[half:values.size - half] - smooth
    mad = np.median(np.abs(resid - np.median(resid)))
    return float(1.4826 * mad / np.sqrt(1.0 - weights[half]))


# --------------------------------------------------------------------------- core data
def saturated_target_pixels(phot, level=None, raw=None):
    """(r, c) bool: the target's saturated pixels (its core and bleed columns), or None.

    Saturated pixels are those flagged ``Saturated`` on any good cadence (prepare flags the
    cache) or, for sources without pixel flags (TPFs, TESScut), whose median calibrated flux
    (sky included) reaches ``level`` (default ``prepare.saturation_level``, e-/s: the full
    well of a 2-s read). The target's are the 8-connected groups with a pixel within 2 px of
    its position. None when the target has none. ``raw``: the median calibrated image at
    least where the pixels' maxima may reach ``level`` (``_may_reach``), if already computed.
    """
    level = _saturation_level(phot) if level is None else level
    good = _good_cadences(phot)
    flags = np.asarray(phot.pixelflags_cube)[good]
    saturated = np.any((flags & int(PixelQualityFlags.Saturated)) != 0, axis=0)
    raw = _raw_median(phot, good, _may_reach(phot, level)) if raw is None else raw
    saturated |= np.nan_to_num(raw, nan=0.0) >= level
    if not saturated.any():
        return None
    labels, _ = ndimage.label(saturated, structure=np.ones((3, 3), bool))
    rr, cc = np.indices(saturated.shape)
    near = np.hypot(rr - phot.target_pos_row_stamp, cc - phot.target_pos_column_stamp) <= 2.0
    ids = np.setdiff1d(np.unique(labels[near & saturated]), [0])
    if ids.size == 0:
        return None
    return np.isin(labels, ids)


def _median0(values, overwrite_input=False):
    """Median over axis 0 (cadences), NaN ignored; ``np.median`` when all are finite (the
    usual case: ``np.nanmedian`` goes through masked arrays and was half of the checks'
    time). ``overwrite_input``: ``values`` is a temporary of the caller's, partitioned in
    place (``np.median``'s option: the same order statistics without a copy of the cube)."""
    values = np.asarray(values, dtype=float)
    if np.isfinite(values).all():
        return np.median(values, axis=0, overwrite_input=overwrite_input)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(values, axis=0)


def _saturation_level(phot):
    """The saturation level (e-/s) of the source's settings, else of the target's."""
    cfg = getattr(phot.source, "settings", None) or phot.settings
    return float(cfg.get("prepare", phot.settings["prepare"])["saturation_level"])


def _may_reach(phot, level):
    """(r, c) bool: pixels whose median calibrated flux (sky included) may reach ``level``.

    The image's maximum over all cadences plus the sky's is at least every good cadence's
    sum, hence its median: only these pixels (and those whose maximum is undefined) need the
    median, which over every pixel and cadence cost a third of the checks' time.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        top = (np.fmax.reduce(np.asarray(phot.images_cube, float), axis=0)
               + np.fmax.reduce(np.asarray(phot.backgrounds_cube, float), axis=0))
    return ~(top < level)


def _raw_median(phot, good, where):
    """(r, c) median calibrated flux (sky included) over the good cadences at the pixels
    ``where``, NaN elsewhere."""
    raw = np.full(np.shape(phot.sumimage), np.nan)
    if np.any(where):
        images = np.asarray(phot.images_cube)[:, where][good]
        images += np.asarray(phot.backgrounds_cube)[:, where][good]   # a copy of our own
        raw[where] = _median0(images, overwrite_input=True)
    return raw


def _good_cadences(phot):
    good = TESSQualityFlags.filter(phot.quality)
    return good if np.any(good) else np.ones(phot.n_frames, dtype=bool)


def _prf_model(phot):
    """The core's PRF model of the CCD (``photometry.data.prf``), else the analytic default."""
    from photometry.data.prf import AnalyticPRF
    try:
        return phot.prf
    except Exception as exc:  # noqa: BLE001 - no PRF for this CCD: the analytic default
        logger.debug("TIC %d: checks use the analytic PRF (%s)", phot.starid, exc)
        return AnalyticPRF()


def _is_spoc(prf):
    from photometry.data.prf import SpocPRF
    return isinstance(prf, SpocPRF)


def _prf_images(phot, prf, rows, cols):
    """(n, r, c) unit-flux PRF images of ``prf`` at stamp positions ``rows, cols``."""
    shape = np.shape(phot.sumimage)
    rows = np.atleast_1d(np.asarray(rows, float))
    cols = np.atleast_1d(np.asarray(cols, float))
    if rows.size == 0:
        return np.zeros((0,) + shape)
    r0, c0 = phot.stamp[0], phot.stamp[2]
    mat = prf.design_matrix(rows + r0, cols + c0, shape, origin=(r0, c0),
                            size=int(prf.default_size()))
    return np.asarray(mat.toarray().T.reshape((rows.size,) + shape))


def _noise_model(phot):
    """The CCD noise model of the source (cache attributes or header, else defaults)."""
    attrs = getattr(phot.source, "attrs", None)
    if attrs is not None and "noise_read_noise" in attrs:
        return CCDNoise.from_attrs(attrs)
    header = getattr(phot.source, "header", None) or {}
    return CCDNoise.from_header(header, phot.cadence)


def _pixel_variances(phot, good, level):
    """((r, c) per-pixel variance, (r, c) bool missing, (r, c) median calibrated image).

    The median over good cadences of the pixel error cube squared (the pixels alone: the
    background model's error would cost an evaluation of its own for a term the allowances
    below swamp); where that is not finite and positive, the CCD noise model of the
    calibrated flux ``raw`` (``missing`` marks those). ``raw`` is computed there and where
    it may reach the saturation ``level`` (for :func:`saturated_target_pixels`), NaN elsewhere.
    """
    errors = np.asarray(phot.pixel_err_cube, float)[good]     # a copy of our own
    var = _median0(np.square(errors, out=errors), overwrite_input=True)
    missing = ~(np.isfinite(var) & (var > 0))
    raw = _raw_median(phot, good, missing | _may_reach(phot, level))
    if missing.any():
        cols, _ = phot.get_pixel_grid()
        var = np.where(missing, _noise_model(phot).pixel_variance(raw, cols), var)
    return var, missing, raw


# --------------------------------------------------------------------------- the checks
def check_result(phot, cfg=None):
    """Run every check on ``phot`` after ``do_photometry``; a :class:`CheckReport`.

    Parameters
    ----------
    phot : BasePhotometry
        After ``do_photometry`` (``lightcurve`` and ``final_phot_mask`` filled).
    cfg : dict, optional
        The ``[checks]`` settings (default ``phot.settings['checks']``).
    """
    cfg = dict(phot.settings["checks"] if cfg is None else cfg)
    report = CheckReport()
    flags, m = report.flags, report.metrics
    skip = set(cfg.get("disabled", []))

    def flag(code, level, text):
        if code not in skip:
            flags.append(Flag(code, level, text))

    good = _good_cadences(phot)
    flux = np.asarray(phot.lightcurve["flux"], dtype=float)
    err = np.asarray(phot.lightcurve["flux_err"], dtype=float)
    n_good = int(np.count_nonzero(good))

    # 1. finite fraction of the good cadences
    finite = np.isfinite(flux) & good
    m["finite_fraction"] = frac = np.count_nonzero(finite) / max(n_good, 1)
    if frac < float(cfg["finite_fraction_error"]):
        flag("FINITE_FRACTION", "ERROR", f"finite flux on {frac:.0%} of {n_good} good cadences")
    elif frac < float(cfg["finite_fraction_warning"]):
        flag("FINITE_FRACTION", "WARNING",
             f"finite flux on {frac:.0%} of {n_good} good cadences")

    # 2. stated errors finite and positive
    bad_err = finite & ~(np.isfinite(err) & (err > 0))
    m["invalid_error_fraction"] = bad = np.count_nonzero(bad_err) / max(np.count_nonzero(finite), 1)
    if bad > float(cfg["invalid_errors_error"]):
        flag("ERRORS_INVALID", "ERROR", f"flux_err not finite and positive on {bad:.0%} of "
             "the cadences with flux")
    elif bad > 0:
        flag("ERRORS_INVALID", "WARNING", f"flux_err not finite and positive on "
             f"{np.count_nonzero(bad_err)} cadences with flux")
    use = finite & np.isfinite(err) & (err > 0)
    if not np.any(use):
        return report
    F = float(np.median(flux[use]))
    m["flux"] = F

    # 3. scatter against the stated errors
    scatter = robust_scatter(flux, use, int(cfg["scatter_window"]))
    stated = float(np.median(err[use]))
    m["scatter"] = scatter
    if scatter is not None:
        m["noise_vs_stated"] = r = scatter / stated
        if r > float(cfg["noise_vs_stated_max"]):
            flag("NOISE_EXCESS", "WARNING", f"scatter {scatter:.4g} e-/s is {r:.1f}x the "
                 f"stated flux_err {stated:.4g}")
        elif r < float(cfg["noise_vs_stated_min"]):
            flag("ERRORS_OVERSTATED", "WARNING", f"scatter {scatter:.4g} e-/s is {r:.2f}x "
                 f"the stated flux_err {stated:.4g}")

    # 4. movement kernel measured
    _check_kernel(phot, good, cfg, flag, m)

    # 5-8. pixel checks: they need the mask
    mask = phot.final_phot_mask
    if mask is None:
        flag("NO_MASK", "WARNING", "the method gave no final_phot_mask: flux, mask and "
             "bleed checks not run")
        return report
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != np.shape(phot.sumimage) or not mask.any():
        flag("NO_MASK", "ERROR", f"final_phot_mask has shape {mask.shape} and "
             f"{int(mask.sum())} pixels for a stamp of {np.shape(phot.sumimage)}")
        return report
    _check_pixels(phot, good, use, flux, F, scatter, mask, cfg, flag, m)
    return report


def _check_kernel(phot, good, cfg, flag, m):
    """KERNEL_INVALID: the fraction of good frames whose motion was measured."""
    kernel = phot.movement_kernel
    measured = None
    pos = getattr(phot.source, "pos_corr", None)
    if pos is not None:
        frames = np.arange(len(phot.source.time))[phot._frames]
        measured = np.all(np.isfinite(np.asarray(pos, float)[frames]), axis=1)
    elif kernel is not None and hasattr(kernel, "kernel"):
        frames = np.arange(len(phot.source.time))[phot._frames]
        measured = np.all(np.isfinite(np.asarray(kernel.kernel, float)[frames]), axis=1)
    if measured is None:
        m["kernel_fraction"] = None
        return
    m["kernel_fraction"] = frac = float(np.count_nonzero(measured & good)
                                        / max(np.count_nonzero(good), 1))
    if frac < float(cfg["kernel_min_fraction"]):
        flag("KERNEL_INVALID", "WARNING", f"movement measured on {frac:.0%} of the good "
             "frames; positions elsewhere are the reference frame's")


def _check_pixels(phot, good, use, flux, F, scatter, mask, cfg, flag, m):
    """Noise against the pixel errors, flux against the reference aperture and the catalog,
    mask size against the PRF, bleed coverage."""
    images = np.asarray(phot.images_cube, dtype=float)
    var, missing, raw = _pixel_variances(phot, good, _saturation_level(phot))
    npix = int(mask.sum())
    m["mask_pixels"] = npix

    miss = np.count_nonzero(missing & mask) / npix
    m["pixel_errors_missing"] = miss
    if miss > float(cfg["pixel_errors_missing_max"]):
        flag("PIXEL_ERRORS_MISSING", "WARNING", f"pixel uncertainties missing in {miss:.0%} "
             "of the mask; the CCD noise model stands in for them")

    # the catalog: the target's PRF and the neighbours' expected light
    cat = phot.catalog
    is_target = np.asarray(cat["starid"]) == phot.starid
    prf_model = _prf_model(phot)
    prf = _prf_images(phot, prf_model, cat["row_stamp"], cat["column_stamp"])
    cat_flux = mag2flux(np.asarray(cat["tmag"], dtype=float))
    target_prf = prf[is_target][0] if is_target.any() else np.zeros(mask.shape)
    neighbours = np.tensordot(cat_flux[~is_target], prf[~is_target], axes=1) \
        if (~is_target).any() else np.zeros(mask.shape)
    F_cat = float(mag2flux(phot.target["tmag"]))
    c_mask = float(target_prf[mask].sum())
    Nb = float(neighbours[mask].sum())
    m["prf_fraction"] = c_mask
    m["neighbour_flux"] = Nb

    saturated = saturated_target_pixels(phot, raw=raw)
    truncated = False
    if saturated is not None:
        edge = np.zeros_like(saturated)
        edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
        truncated = bool(np.any(saturated & edge))
        cover = np.count_nonzero(saturated & mask) / np.count_nonzero(saturated)
        m["saturated_pixels"] = int(np.count_nonzero(saturated))
        m["bleed_coverage"] = cover
        if cover < float(cfg["bleed_min_coverage"]):
            flag("BLEED_NOT_COVERED", "ERROR", f"mask covers {cover:.0%} of the target's "
                 f"{int(saturated.sum())} saturated pixels (core and bleed columns)")
        if truncated:
            flag("BLEED_TRUNCATED", "WARNING", "the target's saturated pixels run off the "
                 "stamp: flux beyond its edge is lost")

    # flux against the reference aperture: the sum of the mask's core pixels (where most of
    # the target's PRF falls; uncatalogued stars in the wings of a big mask do not count)
    # minus the catalog neighbours' light there, R - Nb = s F. A total-flux method has s =
    # the PRF fraction in the core, an in-mask (SAP-like) flux s = core / mask fraction; both
    # are known only as well as the PRF model (reference_prf_tolerance), and neither can
    # exceed 1 (the core is part of the star and of the mask). A saturated target, whose
    # light the PRF does not describe, is held to R - Nb <= F only.
    spoc = "_spoc" if _is_spoc(prf_model) else ""
    tol = float(cfg[f"flux_tolerance{spoc}"])
    ptol = float(cfg[f"reference_prf_tolerance{spoc}"])
    if saturated is None:
        core = mask & _core_pixels(target_prf, float(cfg["reference_core_fraction"]))
        core = core if core.any() else mask
        c_core = float(target_prf[core].sum())
        lo = c_core * (1 - ptol)
        hi = min(c_core / max(c_mask, 1e-12) * (1 + ptol), 1 + tol)
    else:
        core, lo, hi = mask, 0.0, 1 + tol
    ref = np.sum(np.where(core, images, 0.0), axis=(1, 2))
    ref_ok = use & np.isfinite(ref)
    if ref_ok.any() and F != 0:
        Rc, Nc = float(np.median(ref[ref_ok])), float(neighbours[core].sum())
        sky = _sky_offset(images, phot.sumimage, target_prf * F_cat + neighbours, var, good)
        sigma_core = np.sqrt(np.sum(var[core]))
        allowance = (float(cfg["flux_nsigma"]) * 1.253 * sigma_core / np.sqrt(ref_ok.sum())
                     + float(cfg["neighbour_tolerance"]) * Nc + core.sum() * abs(sky))
        bounds = sorted((lo * F, hi * F))
        m.update(reference_ratio=(Rc - Nc) / F, reference_bounds=[lo, hi],
                 reference_allowance=allowance / abs(F), reference_pixels=int(core.sum()),
                 sky_offset=sky)
        if not bounds[0] - allowance <= Rc - Nc <= bounds[1] + allowance:
            flag("FLUX_VS_REFERENCE", "ERROR",
                 f"flux {F:.5g} e-/s against {Rc - Nc:.5g} in {int(core.sum())} of its mask "
                 f"pixels (sum {Rc:.5g} minus catalog neighbours {Nc:.4g}); expected "
                 f"{bounds[0]:.5g}..{bounds[1]:.5g} +- {allowance:.3g}")
        elif saturated is None and F > 0:
            _check_low_flux(phot, cfg, flag, m, F, c_mask, target_prf, neighbours, images,
                            use, var, sky, spoc)

    # noise against the photon limit: the PRF-weighted noise of the target's total flux from
    # the pixel uncertainties (the Cramer-Rao bound of a PRF fit of a lone star), relative to
    # the total flux the reference core implies, at the method's flux scale. Judged only where
    # the target's light dominates its core: deblending a brighter neighbour costs more noise
    # than a lone star's bound.
    if scatter is not None and saturated is None and ref_ok.any() and F > 0 \
            and Rc - Nc > 0 and c_core > 0:
        total = (Rc - Nc) / c_core
        limit = 1.0 / np.sqrt(np.sum(target_prf[np.isfinite(var)] ** 2
                                     / var[np.isfinite(var)]))
        m["noise_vs_limit"] = r = (scatter / F) / (limit / total)
        if r > float(cfg["noise_vs_limit_max"]) and Nc < Rc - Nc:
            flag("NOISE_EXCESS", "WARNING", f"scatter {scatter / F:.3g} of the flux is {r:.1f}x "
                 f"the photon limit {limit / total:.3g} from the pixel uncertainties")

    if scatter is not None and saturated is None and F > 0 \
            and getattr(phot, "flux_kind", None) == "total":
        noisy = _check_vs_aperture(images, use, scatter / F, target_prf, neighbours, F_cat,
                                   var, phot.sumimage, cfg, flag, m)
        _check_slow_vs_aperture(phot, prf_model, prf, images, use, flux / F, target_prf,
                                neighbours, F_cat, var, phot.sumimage, cfg,
                                (lambda *a: None) if noisy else flag, m)

    # flux against the catalog magnitude
    factor = float(cfg["catalog_factor"])
    lo = 0.0 if truncated else c_mask / factor
    m["catalog_ratio"] = F / F_cat
    if not lo <= F / F_cat <= factor:
        flag("FLUX_VS_CATALOG", "WARNING", f"flux {F:.5g} e-/s is {F / F_cat:.3g}x the "
             f"catalog's {F_cat:.5g} (Tmag {phot.target['tmag']:.2f})")

    # mask size against the PRF: the target's PRF flux in the mask relative to the mask of
    # best predicted S/N among the pixels where the target's expected light dominates (not
    # for saturated stars, whose light the PRF does not describe)
    if saturated is None and F_cat > 0:
        own = target_prf * F_cat >= neighbours
        c_opt = _optimal_prf_fraction(np.where(own, target_prf, 0.0), F_cat, var)
        m["optimal_prf_fraction"] = c_opt
        if c_opt > 0:
            m["mask_vs_optimal"] = ratio = c_mask / c_opt
            if ratio < float(cfg["mask_min_fraction"]):
                flag("MASK_TOO_SMALL", "WARNING", f"{npix}-pixel mask holds {c_mask:.0%} of "
                     f"the target's PRF, an S/N-optimal mask {c_opt:.0%}")


def _check_low_flux(phot, cfg, flag, m, F, c_mask, target_prf, neighbours, images, use, var,
                    sky, spoc):
    """FLUX_LOW: a flux below what the star's light around it implies (e.g. a PRF fit whose
    shape is narrower than the star's).

    The reference is the plain sum of the pixels holding ``reference_low_flux_core`` (0.95)
    of the target's PRF, minus the catalog neighbours' light there: nearly all of the star,
    so its share hardly depends on the PRF's shape (the 100 SPOC PRF models of 4 CCDs put
    0.969-1.008 of the analytic model's fraction there; the 80 % core: 0.89-1.04). A total
    flux (``flux_kind == "total"``) must account for that fraction of it; an unknown kind
    whose mask holds at least ``reference_low_flux_mask`` of the PRF for that fraction over
    the mask's (its in-mask reading); smaller in-mask fluxes are judged by the ERROR bounds.
    The region reaches further into the neighbours' wings than the core, which a PRF model
    predicts worst (the analytic one put half the light a SPOC-PRF neighbour put there), so
    all of their predicted light is allowed (``reference_low_flux_neighbours``).
    """
    kind = getattr(phot, "flux_kind", None)
    wide = _core_pixels(target_prf, float(cfg["reference_low_flux_core"]))
    c_wide = float(target_prf[wide].sum())
    if kind == "total":
        expected = c_wide
    elif kind is None and c_mask >= float(cfg["reference_low_flux_mask"]):
        expected = c_wide / c_mask
    else:
        return
    ref = np.sum(np.where(wide, images, 0.0), axis=(1, 2))
    ok = use & np.isfinite(ref)
    if not ok.any():
        return
    R, N = float(np.median(ref[ok])), float(neighbours[wide].sum())
    allowance = (float(cfg["flux_nsigma"]) * 1.253 * np.sqrt(np.sum(var[wide])) / np.sqrt(ok.sum())
                 + float(cfg["reference_low_flux_neighbours"]) * N + wide.sum() * abs(sky))
    m["reference_vs_expected"] = (R - N) / F / expected
    m["reference_wide_neighbours"] = N / F
    if R - N > expected * (1 + float(cfg[f"reference_low_flux{spoc}"])) * F + allowance:
        flag("FLUX_LOW", "WARNING",
             f"flux {F:.5g} e-/s is {F * expected / (R - N):.0%} of what the {int(wide.sum())} "
             f"pixels holding {c_wide:.0%} of its PRF imply ({R - N:.5g} e-/s after catalog "
             f"neighbours {N:.4g}): too low, or light the catalog lacks")


def _core_pixels(prf, fraction):
    """(r, c) bool: the brightest pixels of a PRF image holding ``fraction`` of its sum."""
    flat = np.where(np.isfinite(prf), prf, 0.0).ravel()
    order = np.argsort(-flat)
    cum = np.cumsum(flat[order])
    n = int(np.searchsorted(cum, fraction * cum[-1])) + 1 if cum[-1] > 0 else 0
    core = np.zeros(flat.size, bool)
    core[order[:n]] = True
    return core.reshape(prf.shape)


def _empty_pixels(sumimage, model, var):
    """(r, c) bool: the stamp's pixels where no star is expected (the catalog ``model`` below
    half a pixel sigma), or None when fewer than 3: where :func:`_sky_offset` and
    :func:`_sky_series` measure the sky left after the background."""
    empty = np.isfinite(sumimage) & (model < 0.5 * np.sqrt(var))
    return empty if np.count_nonzero(empty) >= 3 else None


def _sky_offset(images, sumimage, model, var, cadences):
    """Median level (e-/s per pixel) of the background-subtracted stamp over ``cadences``
    (bool) where no star is expected: what is left of the sky after the core's background
    (0 if no such pixel).

    Why: the reference sum and the method may treat the sky differently (TESScut flux holds
    the sky; methods fit their own residual sky); this much per mask pixel is allowed. The
    empty pixels are taken before the cadences (the same values in the same order, without
    a copy of the whole cube).
    """
    empty = _empty_pixels(sumimage, model, var)
    if empty is None:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        level = np.nanmedian(images[:, empty][cadences])
    return float(level) if np.isfinite(level) else 0.0


def _sky_series(images, sumimage, model, var):
    """(n,) per-cadence level (e-/s per pixel) of the background-subtracted stamp where no
    star is expected (:func:`_sky_offset` cadence by cadence; 0 without such pixels).

    Why per cadence: the wide aperture of SLOW_NOISE_VS_APERTURE holds ~70 pixels, and a
    background model's residual that changes in time (scattered light) is, summed over them,
    up to several per cent of a Tmag 12 star: a PRF fit fits its own sky and has no share in
    it.
    """
    empty = _empty_pixels(sumimage, model, var)
    if empty is None:
        return np.zeros(len(images))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        level = np.nanmedian(images[:, empty], axis=1)
    return np.where(np.isfinite(level), level, 0.0)


def _check_vs_aperture(images, use, relative, target_prf, neighbours, F_cat, var, sumimage,
                       cfg, flag, m):
    """NOISE_VS_APERTURE: a total-flux (PRF-fit) light curve measurably noisier than the
    best of three aperture sums of the same stamp's pixels.

    Why: a PRF fit with the right shape is the minimum-variance estimate of the flux and no
    noisier than an aperture sum of the same pixels; one that is noisier has a wrong shape
    model (a learned model that missed the real SPOC PRF gave 1.4-2.6 x the ideal noise
    where aperture gave 1.3-1.5, with every other check passing, docs/linpsf.md). The
    apertures: the target-dominated pixels of best predicted S/N (as for MASK_TOO_SMALL) and
    those holding 90 % and 95 % of its PRF (a small mask is the most sensitive to pointing
    jitter); each one's flux is its median sum minus the catalog neighbours' light and the
    sky offset there. Flagged when the ratio of relative scatters (to the least noisy
    aperture) exceeds ``1 + aperture_noise_margin`` plus ``aperture_noise_nsigma`` times its
    statistical error, ``1.65 / sqrt(N)`` for two MAD scatters of N cadences (1.16 /
    sqrt(N) each, taken as independent: conservative).
    """
    sky = _sky_offset(images, sumimage, target_prf * F_cat + neighbours, var, use)
    best = None
    for mask in _aperture_masks(target_prf, neighbours, F_cat, var):
        sums = np.sum(np.where(mask, images, 0.0), axis=(1, 2))
        ok = use & np.all(np.isfinite(images[:, mask]), axis=1)
        scatter = robust_scatter(sums, ok, int(cfg["scatter_window"]))
        if scatter is None or scatter <= 0 or not ok.any():
            continue
        ap_flux = float(np.median(sums[ok])) - float(neighbours[mask].sum()) - mask.sum() * sky
        if ap_flux > 0 and (best is None or scatter / ap_flux < best[0]):
            best = (scatter / ap_flux, int(mask.sum()), int(np.count_nonzero(ok)))
    if best is None:
        return False
    ratio = relative / best[0]
    limit = 1.0 + float(cfg["aperture_noise_margin"]) \
        + float(cfg["aperture_noise_nsigma"]) * 1.65 / np.sqrt(best[2])
    m.update(noise_vs_aperture=float(ratio), noise_vs_aperture_limit=float(limit),
             aperture_pixels=best[1])
    if ratio > limit:
        flag("NOISE_VS_APERTURE", "WARNING", f"relative scatter {relative:.3g} is "
             f"{ratio:.2f}x that of a {best[1]}-pixel aperture sum of the same pixels "
             f"({best[0]:.3g}; limit {limit:.2f}x)")
    return bool(ratio > limit)


def _aperture_masks(target_prf, neighbours, F_cat, var):
    """The three aperture masks the aperture comparisons use: among the pixels the target
    dominates, those of best predicted S/N and those holding 90 % and 95 % of its PRF (a
    small mask is the most sensitive to pointing jitter, a large one to neighbours)."""
    own = (target_prf * F_cat >= neighbours) & np.isfinite(var) & (var > 0) & (target_prf > 0)
    if not own.any():
        return []
    p, v = target_prf[own], var[own]
    by_snr = np.argsort(-p / v)
    snr = np.cumsum(p[by_snr]) / np.sqrt(np.cumsum(v[by_snr]))
    by_flux = np.argsort(-p)
    cum = np.cumsum(p[by_flux]) / np.sum(target_prf[np.isfinite(target_prf)])
    picks = [by_snr[:int(np.argmax(snr)) + 1]] + [
        by_flux[:int(np.searchsorted(cum, f)) + 1] for f in (0.9, 0.95)]
    masks = []
    for pick in picks:
        mask = np.zeros(own.size, bool)
        mask[np.flatnonzero(own)[pick]] = True
        masks.append(mask.reshape(own.shape))
    return masks


def _check_slow_vs_aperture(phot, prf_model, prf, images, use, relative, target_prf,
                            neighbours, F_cat, var, sumimage, cfg, flag, m):
    """SLOW_NOISE_VS_APERTURE: a total-flux (PRF-fit) light curve whose noise, counting the
    slow part that follows the pointing, exceeds that of an aperture sum of the same stamp
    decorrelated against the pointing.

    Why: a PRF shape model that misses the real PRF turns the pointing's jitter and drift
    into flux errors that follow the pointing (SPOC-PRF scenes: linpsf 1.4-5.7 x the ideal
    noise where aperture gave 1.0-1.7), much of it slow, which the point-to-point scatter of
    NOISE_VS_APERTURE does not see (docs/checks.md).

    How, without mistaking the star's variability for noise: every reference ``R`` (the
    plain sum of the pixels holding ``slow_aperture_fraction``, 0.99, of the target's PRF, and
    the three sums of ``_aperture_masks``; each minus the catalog neighbours' light and a
    per-cadence sky level, over its median) holds the same stellar signal as ``f / F``, so
    ``f / F - R`` holds none. It is fitted by ``[1, dx, dy, R - 1]`` (``dx, dy`` the target's
    POS_CORR; the last term takes up a dilution difference); the ``(dx, dy)`` coefficients
    plus ``R``'s own response, which the core's PRF and the catalog predict
    (:func:`_pointing_response`), are the PRF fit's response ``a`` to the pointing. Its slow
    variance ``a' cov(smooth X) a`` (the pointing smoothed as :func:`robust_scatter` does),
    less what the fit's noise puts there, is added to the flux's point-to-point variance; of
    the four references the smallest counts (one with systematics of its own, a neighbour or
    a background residual, only adds). The reference noise: the least point-to-point scatter
    of the three aperture sums, each less its own pointing response (from its difference with
    the wide sum). The limit is NOISE_VS_APERTURE's plus the uncertainty of the slow part.
    Not judged where the catalog neighbours put more than ``slow_neighbour_max`` of the
    target's light into the wide sum, where it reaches the stamp's edge (light moving off a
    cut stamp), or without a pointing measurement. ``prf``: the catalog stars' PRF images.
    """
    window = int(cfg["scatter_window"])
    X = np.asarray(pos_corr(phot), dtype=float)
    wide = _core_pixels(target_prf, float(cfg["slow_aperture_fraction"]))
    c_wide = float(target_prf[wide].sum())
    nb_frac = float(neighbours[wide].sum()) / max(F_cat * c_wide, 1e-300)
    m["slow_neighbour_fraction"] = nb_frac
    ok = use & np.all(np.isfinite(X), axis=1) & np.all(np.isfinite(images[:, wide]), axis=1)
    n = int(np.count_nonzero(ok))
    edge = np.zeros_like(wide)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    m["slow_aperture_on_edge"] = on_edge = bool(np.any(wide & edge))
    if n < 4 * window or nb_frac > float(cfg["slow_neighbour_max"]) or on_edge \
            or c_wide <= 0:
        return
    X = X[ok] - np.median(X[ok], axis=0)
    if not np.all(np.std(X, axis=0) > 0):
        return
    smooth_X = _smooth(X, window)
    cube = images[ok]
    sky = _sky_series(cube, sumimage, target_prf * F_cat + neighbours, var)

    def relative_sum(mask):
        sums = cube[:, mask].sum(axis=1) - float(neighbours[mask].sum()) - mask.sum() * sky
        level = float(np.median(sums))
        return sums / level if level > 0 else None

    masks = [wide] + _aperture_masks(target_prf, neighbours, F_cat, var)
    fluxes = np.where(np.asarray(phot.catalog["starid"]) == phot.starid, F_cat,
                      mag2flux(np.asarray(phot.catalog["tmag"], dtype=float)))
    predicted = _pointing_response(phot, prf_model, prf, masks, fluxes)
    rel = relative[ok]
    p2p = robust_scatter(rel, None, window)
    if p2p is None:
        return
    cov_X = np.cov(smooth_X.T)

    def response(y, R, b_R):
        """Response of ``y`` to the pointing, from ``y - R`` (no stellar signal) plus the
        predicted response of the reference ``R``, and its covariance."""
        design = np.column_stack([np.ones(n), X, R - 1.0])
        dinv = np.linalg.pinv(design.T @ design)
        coef = dinv @ (design.T @ (y - R))
        resid = (y - R) - design @ coef
        return coef[1:3] + b_R, dinv[1:3, 1:3] * float(np.sum(resid ** 2)) / max(n - 4, 1)

    # the PRF fit's slow pointing noise against each reference; the smallest counts (a
    # reference with systematics of its own - a neighbour, the background - only adds)
    sums = [relative_sum(mask) for mask in masks]
    slow = []
    for R, b_R in zip(sums, predicted):
        if R is None:
            continue
        coef, cov = response(rel, R, b_R)
        slow2 = float(coef @ cov_X @ coef - np.trace(cov @ cov_X))
        slow.append((max(slow2, 0.0),
                     float(2.0 * np.sqrt(max(coef @ cov_X @ cov @ cov_X @ coef, 0.0)))))
    if not slow or sums[0] is None:
        return
    slow2, slow2_err = min(slow)
    noise = float(np.sqrt(p2p ** 2 + slow2))
    best = None
    for mask, A in zip(masks[1:], sums[1:]):
        if A is None:
            continue
        scatter = robust_scatter(A - X @ response(A, sums[0], predicted[0])[0], None, window)
        if scatter is not None and scatter > 0 and (best is None or scatter < best[0]):
            best = (scatter, int(mask.sum()))
    if best is None:
        return
    ratio = noise / best[0]
    sigma = np.hypot(1.65 / np.sqrt(n), slow2_err / (2.0 * noise ** 2))
    limit = 1.0 + float(cfg["aperture_noise_margin"]) + float(cfg["aperture_noise_nsigma"]) * sigma
    m.update(slow_noise=float(np.sqrt(slow2)), noise_vs_decorrelated=float(ratio),
             noise_vs_decorrelated_limit=float(limit), decorrelated_pixels=best[1])
    if ratio > limit:
        flag("SLOW_NOISE_VS_APERTURE", "WARNING", f"noise {noise:.3g} of the flux (of it "
             f"{np.sqrt(slow2):.3g} slow, following the pointing) is {ratio:.2f}x that of a "
             f"{best[1]}-pixel aperture sum decorrelated against the pointing ({best[0]:.3g}; "
             f"limit {limit:.2f}x)")


def _smooth(values, window):
    """``values`` (n, ...) smoothed by a local cubic of ``window`` cadences (the
    Savitzky-Golay filter of :func:`robust_scatter`); the ``window // 2`` cadences at either
    end take the nearest smoothed value."""
    values = np.asarray(values, dtype=float)
    window, weights = _local_cubic(window)
    half = window // 2
    inner = np.moveaxis(np.lib.stride_tricks.sliding_window_view(values, window, axis=0),
                        -1, 0)
    smooth = np.tensordot(weights, inner, axes=1)
    return np.concatenate([np.repeat(smooth[:1], half, axis=0), smooth,
                           np.repeat(smooth[-1:], half, axis=0)])


def _pointing_response(phot, prf_model, prf, masks, fluxes, step=0.05):
    """(len(masks), 2): per mask, the (column, row) relative change, per pixel of shift of
    the whole scene, of the light the catalog puts into it (the target's and its
    neighbours' PRFs, ``fluxes`` e-/s in catalog order, central differences of the core's
    PRF), relative to the target's light there. Why the neighbours: one whose PRF a mask
    cuts moves light across its edge (0.9 % per pixel for a Tmag 11 star 4 px from a Tmag 9
    target). ``prf``: the stars' unshifted PRF images."""
    cat = phot.catalog
    rows = np.asarray(cat["row_stamp"], float)
    cols = np.asarray(cat["column_stamp"], float)
    is_target = np.asarray(cat["starid"]) == phot.starid
    fluxes = np.asarray(fluxes, float)
    masks = np.asarray(masks, dtype=float)                       # (k, r, c)
    light = []
    for dr, dc in ((0, step), (0, -step), (step, 0), (-step, 0)):
        images = _prf_images(phot, prf_model, rows + dr, cols + dc)   # (stars, r, c)
        light.append(np.einsum("krc,src->ks", masks, images))
    light = np.asarray(light)                                    # (4, k, stars)
    level = np.einsum("krc,src->ks", masks, prf)[:, is_target] @ fluxes[is_target]
    total = light[:4] @ fluxes                                   # (4, k)
    out = np.stack([total[0] - total[1], total[2] - total[3]], axis=1) / (2 * step)
    return np.where(level[:, None] > 0, out / np.where(level > 0, level, 1.0)[:, None], 0.0)


def _optimal_prf_fraction(prf, flux, var):
    """The target's PRF fraction in the mask of best predicted S/N.

    Pixels ranked by expected target signal (``flux x prf``) / variance, the cumulative
    S/N ``sum(signal) / sqrt(sum(var))`` maximised; the PRF sum over those pixels.
    """
    ok = np.isfinite(prf) & np.isfinite(var) & (var > 0) & (prf > 0)
    if not ok.any():
        return 0.0
    p, v = prf[ok], var[ok]
    order = np.argsort(-p / v)
    snr = np.cumsum(flux * p[order]) / np.sqrt(np.cumsum(v[order]))
    return float(np.sum(p[order][:int(np.argmax(snr)) + 1]))


# --------------------------------------------------------------------------- header
def header_cards(checks):
    """FITS cards (key, value, comment) of ``details['checks']`` for the primary header.

    ``QCSTATUS`` (OK / WARNING / ERROR), ``QCCODES`` (comma-separated reason codes) and one
    ``QCTXTn`` card per flag ("LEVEL CODE: text").
    """
    if not checks:
        return []
    codes = ",".join(checks["codes"])
    # a comment only where it fits beside the value (a long value takes CONTINUE cards)
    cards = [("QCSTATUS", checks["status"], "core result checks (docs/checks.md)"),
             ("QCCODES", codes, "reason codes of failed checks" if len(codes) <= 36 else "")]
    for k, item in enumerate(checks["flags"], start=1):
        # no comment: a long text takes CONTINUE cards, a comment would be cut with a warning
        cards.append((f"QCTXT{k}", f"{item['level']} {item['code']}: {item['text']}"[:400], ""))
    return cards
