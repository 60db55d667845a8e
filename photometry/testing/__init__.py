"""For plugin authors: a fake in-memory scene and the contract an algorithm must meet.

``check_algorithm(MyPhotometry)`` in a plugin's own test suite runs the algorithm on
:func:`fake_scene` (no files: a :class:`photometry.data.memory_source.MemorySource`) and fails with
one message naming what is wrong: a ``flux`` or ``flux_err`` that is missing or of the wrong
length, a light-curve column the core does not know (a typo such as ``flux_er`` would
otherwise leave ``flux_err`` NaN and write a column nobody reads), no ``final_phot_mask``, a
file written by the algorithm, and a result that is no measurement: the injected signal not
recovered, noise far above the photon limit, stated errors that do not match the scatter.

Why its own scene: the PRF here is a pixel-integrated elliptical Gaussian, neither the
simulator's nor a SPOC PRF, so passing says the algorithm works on a shape it was not tuned
to. The built-in ``aperture`` and ``linpsf`` pass it (``tests/test_testing.py``).
"""
import os
import tempfile

import numpy as np
from astropy.table import Table
from scipy.special import erf

from photometry.core.base import STATUS, BasePhotometry
from photometry.sim.evaluation import compare_to_truth
from photometry.data.memory_source import MemorySource
from photometry.hooks.utilities import mag2flux

__all__ = ["fake_scene", "check_algorithm", "LIGHTCURVE_COLUMNS", "ContractError"]

#: the light-curve columns the core reads and writes (``BasePhotometry.lightcurve``)
LIGHTCURVE_COLUMNS = ("time", "timecorr", "cadenceno", "quality", "flux", "flux_err",
                      "flux_background", "pos_centroid", "pos_corr")
#: effective exposure (s) of an 1800 s FFI, read variance (e-^2) of its 900 reads, sky (e-/s)
EXPOSURE, READ_VAR, SKY = 1440.0, 900 * 10.0 ** 2, 80.0


class ContractError(AssertionError):
    """An algorithm breaks the plugin contract (an AssertionError, so pytest shows it)."""


def _gaussian_prf(rows, cols, shape, sigma_row, sigma_col):
    """(n_stars, R, C) pixel-integrated elliptical Gaussians of unit flux at 0-based
    ``rows``/``cols`` of the scene (pixel centres at integers)."""
    r_edges = np.arange(shape[0] + 1) - 0.5
    c_edges = np.arange(shape[1] + 1) - 0.5
    fr = np.diff(0.5 * erf((r_edges[None, :] - rows[:, None]) / (np.sqrt(2) * sigma_row)), axis=1)
    fc = np.diff(0.5 * erf((c_edges[None, :] - cols[:, None]) / (np.sqrt(2) * sigma_col)), axis=1)
    return fr[:, :, None] * fc[:, None, :]


def fake_scene(seed=0, shape=(32, 32), n_frames=40, n_stars=15, target_tmag=10.0,
               amplitude=0.01, sigma=(1.0, 1.3)):
    """A small FFI-like scene in memory: star 1 (the target) in the middle with a sinusoid,
    fainter neighbours at least 5 px away, a flat sky, photon and read noise, one flagged
    momentum-dump cadence.

    Returns
    -------
    source : MemorySource
        Cubes ``images`` (sky included, e-/s), ``errors``, ``pixel_flags``; CCD column 44 is
        the scene's first column.
    truth : dict
        ``starid`` (1), ``flux`` (n_stars, n_frames) true e-/s, ``ideal_noise`` of the target
        (e-/s, PRF-weighted photon + read limit), ``amplitude``, ``rows``, ``cols`` (CCD).
    """
    rng = np.random.default_rng(seed)
    rows = np.empty(n_stars)
    cols = np.empty(n_stars)
    rows[0], cols[0] = shape[0] / 2 + rng.uniform(-0.5, 0.5), shape[1] / 2 + rng.uniform(-0.5, 0.5)
    k = 1
    while k < n_stars:
        r, c = rng.uniform(-2, shape[0] + 2), rng.uniform(-2, shape[1] + 2)
        if np.hypot(r - rows[0], c - cols[0]) >= 5:
            rows[k], cols[k] = r, c
            k += 1
    tmag = np.concatenate([[target_tmag], rng.uniform(target_tmag + 1, 16.0, n_stars - 1)])
    time = 1325.0 + np.arange(n_frames) * 1800 / 86400
    true_flux = np.repeat(mag2flux(tmag)[:, None], n_frames, axis=1)
    true_flux[0] *= 1 + amplitude * np.sin(2 * np.pi * (time - time[0]) / 0.4)
    prf = _gaussian_prf(rows, cols, shape, *sigma)
    scene = np.einsum("sn,src->nrc", true_flux, prf)
    var = ((scene + SKY) * EXPOSURE + READ_VAR) / EXPOSURE ** 2
    images = scene + SKY + rng.normal(size=scene.shape) * np.sqrt(var)
    quality = np.zeros(n_frames, dtype=np.int64)
    quality[n_frames // 2] = 32  # a momentum dump: flagged, left out of the statistics
    catalog = Table({"starid": np.arange(1, n_stars + 1), "ra": np.zeros(n_stars),
                     "dec": np.zeros(n_stars), "tmag": tmag, "row": rows, "column": cols + 44})
    source = MemorySource({"images": images, "errors": np.sqrt(var),
                           "pixel_flags": np.zeros(scene.shape, np.uint8)},
                          catalog, time, quality)
    ideal = np.sqrt(1.0 / np.sum(prf[0] ** 2 / var.mean(axis=0)))
    truth = {"starid": 1, "flux": true_flux, "ideal_noise": float(ideal),
             "amplitude": amplitude, "rows": rows, "cols": cols + 44}
    return source, truth


def _fail(cls, message):
    raise ContractError(f"{cls.__module__}.{cls.__qualname__}: {message}")


def check_algorithm(plugin_class, settings=None, scene=None, max_noise_ratio=2.0):
    """Run ``plugin_class`` on the target of a fake scene and check the plugin contract.

    Parameters
    ----------
    plugin_class : type
        A :class:`photometry.core.base.BasePhotometry` subclass.
    settings : dict, optional
        Full settings; default :func:`photometry.hooks.settings.default_settings` without a
        background model (a memory scene has none: the local estimate is used).
    scene : (source, truth), optional
        Default :func:`fake_scene`.
    max_noise_ratio : float
        Largest accepted scatter over the photon-noise limit.

    Returns
    -------
    dict
        ``status``, ``noise_ratio`` (scatter / ideal), ``amplitude`` (recovered / injected),
        ``error_ratio`` (median flux_err / scatter), ``phot`` (the instance).

    Raises
    ------
    ContractError
        Naming the class and the first broken rule.
    """
    cls = plugin_class
    if not (isinstance(cls, type) and issubclass(cls, BasePhotometry)):
        raise ContractError(f"{cls!r} must be a subclass of photometry.core.base.BasePhotometry")
    for attr in ("name", "version"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            _fail(cls, f"class attribute '{attr}' must be a non-empty string")
    if settings is None:
        from photometry.hooks.settings import default_settings
        settings = default_settings()
        settings["photometry"]["background"] = ""
        settings["photometry"]["corrections"] = []
    source, truth = scene if scene is not None else fake_scene()
    starid, n = truth["starid"], len(source.time)
    phot = cls(starid, source, settings=settings)
    failure = None
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        try:
            status = phot.photometry()
        except Exception as exc:  # noqa: BLE001 - reported below, after the column check
            failure, status = exc, None
        finally:
            os.chdir(cwd)
        written = sorted(os.listdir(scratch))
    lc = phot.lightcurve
    unknown = [c for c in lc.colnames if c not in LIGHTCURVE_COLUMNS]
    if unknown:
        _fail(cls, f"unknown light-curve column(s) {', '.join(map(repr, unknown))} "
                   f"(known: {', '.join(LIGHTCURVE_COLUMNS)})")
    if written:
        _fail(cls, f"do_photometry wrote files ({', '.join(written)}): algorithms do no I/O, "
                   "the core writes the outputs")
    for key in ("flux", "flux_err"):
        values = np.asarray(lc[key])
        if values.shape != (n,) or not np.issubdtype(values.dtype, np.floating):
            _fail(cls, f"lightcurve['{key}'] must be {n} floats, one per cadence "
                       f"(got shape {values.shape}, dtype {values.dtype})")
    if failure is not None:
        _fail(cls, f"photometry() raised {type(failure).__name__}: {failure}")
    if status not in (STATUS.OK, STATUS.WARNING):
        _fail(cls, f"an isolated Tmag {source.catalog_table()['tmag'][0]:.1f} star gave "
                   f"STATUS {status!r}, not OK or WARNING")
    good = np.asarray(source.quality) == 0
    for key in ("flux", "flux_err"):
        values = np.asarray(lc[key])
        if not np.all(np.isfinite(values[good])):
            _fail(cls, f"lightcurve['{key}'] is not finite on every good cadence "
                       f"({int(np.sum(~np.isfinite(values[good])))} of {int(good.sum())})")
    flux, flux_err = np.asarray(lc["flux"]), np.asarray(lc["flux_err"])
    if np.any(flux_err[good] <= 0):
        _fail(cls, "lightcurve['flux_err'] must be > 0 on every good cadence")
    if np.asarray(lc["pos_centroid"]).shape != (n, 2):
        _fail(cls, f"lightcurve['pos_centroid'] must be ({n}, 2): column, row per cadence")
    mask = phot.final_phot_mask
    r1, r2, c1, c2 = phot.stamp
    if mask is None:
        _fail(cls, "final_phot_mask is not set (the pixels used, for the APERTURE image)")
    mask = np.asarray(mask)
    if mask.shape != (r2 - r1, c2 - c1) or not np.any(mask.astype(bool)):
        _fail(cls, f"final_phot_mask must be a stamp-shaped ({r2 - r1}, {c2 - c1}) mask with "
                   f"at least one pixel (got shape {mask.shape})")
    true = truth["flux"][0]
    scatter, amplitude = compare_to_truth(flux, true, good)
    ideal = truth["ideal_noise"] / np.median(true[good])
    noise_ratio = scatter / ideal
    error_ratio = np.median(flux_err[good] / flux[good]) / scatter
    if not abs(amplitude - 1) <= 0.05:
        _fail(cls, f"recovered {amplitude:.3f} of the injected {truth['amplitude']:.1%} "
                   "signal (needs 0.95-1.05)")
    if not noise_ratio <= max_noise_ratio:
        _fail(cls, f"scatter {noise_ratio:.2f} x the photon-noise limit "
                   f"(at most {max_noise_ratio})")
    if not 0.5 <= error_ratio <= 2.0:
        _fail(cls, f"stated errors are {error_ratio:.2f} x the measured scatter (needs 0.5-2)")
    return {"status": status, "noise_ratio": float(noise_ratio), "amplitude": float(amplitude),
            "error_ratio": float(error_ratio), "phot": phot}
