"""What the core measures of a finished light curve (TASOC's metrics, the expected noise, the
APERTURE image, the output QUALITY), from a :class:`photometry.core.base.BasePhotometry`."""
import warnings

import numpy as np

from photometry.hooks.quality import (LightCurveQualityFlags, PixelQualityFlags, TESSQualityFlags,
                                      lightcurve_quality)

__all__ = ["lightcurve_metrics", "aperture_bitmask", "post_process", "output_quality",
           "good_cadences", "ccd_noise", "flux_weights", "mean_sky", "expected_noise",
           "background_error_in_mask"]


def lightcurve_metrics(time, flux, flux_err):
    """TASOC §3.6 statistics of a light curve (good cadences only).

    Returns a dict: ``mean_flux`` (median flux, e-/s), ``variance`` (of the relative flux,
    ddof 1), ``rms_hour`` (ppm: MAD-scaled scatter of the relative flux binned to one hour),
    ``ptp`` (ppm: median absolute point-to-point difference), ``variability``
    (standard deviation of the relative flux after a 1/sigma-weighted cubic in time, divided by
    the median relative error; about 1 for a constant star with honest errors).
    """
    from astropy.stats import mad_std

    time = np.asarray(time, dtype=float)
    flux = np.asarray(flux, dtype=float)
    flux_err = np.asarray(flux_err, dtype=float)
    ok = np.isfinite(time) & np.isfinite(flux)
    time, flux, flux_err = time[ok], flux[ok], flux_err[ok]
    out = {"mean_flux": None, "variance": None, "rms_hour": None, "ptp": None,
           "variability": None}
    if flux.size == 0:
        return out
    mean = float(np.median(flux))
    out["mean_flux"] = mean
    if flux.size < 2 or mean == 0:
        return out
    rel = flux / mean - 1.0
    rel_err = np.abs(flux_err / mean)
    out["variance"] = float(np.var(rel, ddof=1))
    out["ptp"] = float(1e6 * np.median(np.abs(np.diff(rel))))
    # One-hour bins of the relative flux; the scatter of the bin means is the rms per hour.
    edges = np.arange(time[0], time[-1] + 1 / 24 + 1e-9, 1 / 24)
    index = np.digitize(time, edges)
    sums = np.bincount(index, weights=rel)
    counts = np.bincount(index)
    binned = sums[counts > 0] / counts[counts > 0]
    if binned.size >= 2:
        out["rms_hour"] = float(1e6 * mad_std(binned))
    good_err = np.isfinite(rel_err) & (rel_err > 0)
    if np.count_nonzero(good_err) > 4:
        t = time[good_err] - time[good_err].mean()
        w = 1.0 / rel_err[good_err]
        coeffs = np.polyfit(t, rel[good_err], 3, w=w)
        resid = rel[good_err] - np.polyval(coeffs, t)
        out["variability"] = float(np.std(resid) / np.median(rel_err[good_err]))
    return out


def aperture_bitmask(phot):
    """APERTURE bits: 1 collected, 2 in mask, 4 background, 8 centroid, 32..256 CCD output."""
    img = phot.sumimage
    bits = np.zeros(img.shape, dtype=np.int32)
    bits[np.isfinite(img)] |= 1
    if phot.final_phot_mask is not None:
        mask = np.asarray(phot.final_phot_mask, dtype=bool)
        bits[mask] |= 2 | 8
    used = phot.background_pixels_used
    if used is not None:
        bits[used] |= 4
    cols, _ = phot.get_pixel_grid()
    # CCD outputs A-D by 0-based columns 44-555, 556-1067, 1068-1579, 1580-2091.
    for k, bit in enumerate((32, 64, 128, 256)):
        lo, hi = 44 + 512 * k, 44 + 512 * (k + 1)
        bits[(cols >= lo) & (cols < hi)] |= bit
    return bits


def post_process(phot):
    lc = phot.lightcurve
    flux = np.asarray(lc["flux"], dtype=float)
    err = np.asarray(lc["flux_err"], dtype=float)
    if not np.any(np.isfinite(flux)):
        phot.decline("FINITE_FRACTION", "every flux value is NaN")
    if not np.any(np.isfinite(err)):
        phot.decline("ERRORS_INVALID", "every flux error is NaN")
    good = TESSQualityFlags.filter(phot.quality) & np.isfinite(flux)
    phot.details.update(lightcurve_metrics(phot.time[good], flux[good], err[good]))
    cen = np.asarray(lc["pos_centroid"], dtype=float)[good]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        phot.details["pos_centroid"] = [float(v) for v in np.nanmedian(cen, axis=0)]
    mask = phot.final_phot_mask
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        phot.details["mask_size"] = int(np.count_nonzero(mask))
        edge = np.zeros_like(mask)
        edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
        phot.details["edge_flux"] = float(np.nansum(phot.sumimage[mask & edge]))
    expected = phot.expected_noise()
    if expected is not None:
        from photometry.data.noise import measured_cdpp
        phot.details["cdpp_expected"] = expected.cdpp(1.0)
        phot.details["cdpp_sap"] = measured_cdpp(phot.time[good], flux[good], phot.cadence)
    if "AP_CONT" in phot.additional_headers:
        phot.details["contamination"] = float(phot.additional_headers["AP_CONT"][0])
    elif "PSF_CONT" in phot.additional_headers:
        phot.details["contamination"] = float(phot.additional_headers["PSF_CONT"][0])


def output_quality(phot):
    """(N,) QUALITY of the light-curve file (:func:`photometry.hooks.quality.lightcurve_quality`):
    SPOC's cadence bits, and our own bits (BackgroundShenanigans where any mask pixel has
    it, the bits the stamp corrections set) shifted above them."""
    own = np.zeros(phot.n_frames, dtype=np.int64)
    flags = phot.pixelflags_cube
    mask = phot.final_phot_mask
    sel = flags if mask is None else flags[:, np.asarray(mask, dtype=bool)]
    bad = np.any((sel & PixelQualityFlags.BackgroundShenanigans) != 0,
                 axis=tuple(range(1, sel.ndim)))
    own[bad] |= int(LightCurveQualityFlags.BackgroundShenanigans)
    own |= getattr(phot, "correction_quality", 0)
    return lightcurve_quality(phot.quality, own)


def good_cadences(phot):
    """(N,) bool: cadences passing ``TESSQualityFlags.DEFAULT_BITMASK`` with finite flux."""
    flux = np.asarray(phot.lightcurve["flux"], dtype=float)
    return TESSQualityFlags.filter(phot.quality) & np.isfinite(flux)


def ccd_noise(phot):
    """:class:`photometry.data.noise.CCDNoise` of the data: the source's own (``noise``), the
    cache's ``noise_*`` attributes, the TPF's header, else the documented defaults."""
    from photometry.data.noise import CCDNoise
    noise = getattr(phot.source, "noise", None)
    if isinstance(noise, CCDNoise):
        return noise
    attrs = getattr(phot.source, "attrs", None) or {}
    if "noise_read_noise" in attrs:
        return CCDNoise.from_attrs(attrs)
    return CCDNoise.from_header(getattr(phot.source, "header", None) or {}, phot.cadence)


def flux_weights(phot, sky=None):
    """(r, c) weights ``w`` of the flux as a linear estimate from the stamp's pixels,
    ``flux = sum(w * pixels)``: what the expected noise (:meth:`expected_noise`) sums.

    Why by ``flux_kind``: an aperture sum and a PRF fit of the same pixels have different
    noise. ``"total"`` (a PRF fit): the weighted least-squares weights of the target's
    unit-flux model (``target_model_image``, else the core's PRF at the catalog position)
    with a jointly fitted constant background (:func:`photometry.data.noise.prf_fit_weights`),
    over the pixels not flagged for PRF fits, weighted by the CCD noise model. Otherwise
    1 in ``final_phot_mask`` (the aperture sum); None without a mask.

    Parameters
    ----------
    sky : (r, c) array, optional
        Mean sky background of the good cadences (computed if not given).
    """
    mask = phot.final_phot_mask
    if mask is None:
        return None
    if phot.flux_kind != "total":
        return np.asarray(mask, dtype=float)
    from photometry.core.checks import _prf_images, _prf_model
    from photometry.data.noise import prf_fit_weights
    prf = phot.target_model_image
    if prf is None or np.shape(prf) != np.shape(phot.sumimage):
        cat = phot.catalog[np.asarray(phot.catalog["starid"]) == phot.starid]
        prf = _prf_images(phot, _prf_model(phot), cat["row_stamp"], cat["column_stamp"])[0]
    if sky is None:
        sky = mean_sky(phot)
    cols, _ = phot.get_pixel_grid()
    var = phot.ccd_noise.pixel_variance(np.asarray(phot.sumimage, float) + sky, cols)
    flagged = np.all((np.asarray(phot.pixelflags_cube)[phot.good_cadences()]
                      & PixelQualityFlags.PRF_FIT_BITMASK) != 0, axis=0)
    var = np.where(flagged | ~np.isfinite(phot.sumimage), np.nan, var)
    return prf_fit_weights(prf, var, background=True)


def mean_sky(phot):
    """(r, c) mean background of the good cadences (NaN ignored)."""
    from photometry.core.sky import nanmean0
    return nanmean0(phot.backgrounds_cube[phot.good_cadences()])


def expected_noise(phot):
    """Expected noise of the flux (:class:`ApertureNoise`), from the sum image (stars), the
    mean background of the good cadences (sky) and the read noise of each pixel's output,
    weighted as the method's flux weights its pixels (:meth:`flux_weights`: the aperture
    sum, or the PRF fit of a ``flux_kind = "total"`` method); None without a mask or a
    positive flux."""
    from photometry.data.noise import ApertureNoise
    good = phot.good_cadences()
    if phot.final_phot_mask is None or not np.any(good):
        return None
    flux = float(np.median(np.asarray(phot.lightcurve["flux"], dtype=float)[good]))
    if not flux > 0:
        return None
    sky = mean_sky(phot)
    cols, _ = phot.get_pixel_grid()
    return ApertureNoise.of_weights(phot.ccd_noise, phot.sumimage, sky,
                                    phot.flux_weights(sky), cols, flux, phot.cadence)


def background_error_in_mask(phot):
    """(N,) 1-sigma error of the background summed over the mask (SAP_BKG_ERR), e-/s.

    The method's own ``flux_background_err`` column if it has one; otherwise the
    background errors added linearly over the mask: a background model (or the flat local
    estimate) errs alike in neighbouring pixels.
    """
    if "flux_background_err" in phot.lightcurve.colnames:
        return np.asarray(phot.lightcurve["flux_background_err"], dtype=float)
    mask = phot.final_phot_mask
    if mask is None:
        return np.full(phot.n_frames, np.nan)
    return np.sum(phot.backgrounds_err_cube[:, np.asarray(mask, dtype=bool)], axis=1)
