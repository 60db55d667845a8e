"""The sky of a cutout whose pixels still hold it (TESScut): stars' PRFs and a smooth sky fitted
together, per cadence.

Why a joint fit: TESScut (astrocut) cuts calibrated FFIs, which are not background-subtracted
(FLUX_BKG is 0). A sky taken from the "empty" pixels of a small cutout is mostly the wings of
the stars that fill it (the aperture plugin's per-stamp plane took 5070 e-/s per pixel from the
6x6 Pi Men cutout). Fitting the catalog stars' PRFs with free fluxes beside the sky attributes
the wings to the stars. On the real SPOC TPF of TIC 25155310 (11x11 px, FLUX + FLUX_BKG) this
gives 86.0 e-/s per pixel against SPOC's FLUX_BKG of 84.7-84.9.

What the fit cannot do: separate the sky from a star whose light outshines the sky in every
pixel of the cutout. Then the sky level rests on the PRF model's far wings (Pi Men, Tmag 5.1,
in 6x6 px: 486 e-/s per pixel where SPOC measured 87-95), so :class:`SkyFit` says whether the
level is ``determined``: at least ``min_sky_pixels`` fitted pixels where the modelled
starlight is below a quarter of the fitted sky (:data:`SKY_DOMINANCE`).

Pure array functions, no I/O (the caller builds the PRF images, see ``photometry.data.tpf``).
"""
import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["SkyFit", "fit_sky", "PRF_RELATIVE_ERROR", "SKY_DOMINANCE"]

#: A pixel is sky-dominated when the modelled starlight there is below this fraction of the
#: fitted sky: then even a PRF wing wrong by 100 % moves the sky by at most this fraction.
SKY_DOMINANCE = 0.25

#: Relative error assumed for the PRF model in the weights: pixels near a bright star, where a
#: small shape or position error is a large flux error, count less than faint ones.
PRF_RELATIVE_ERROR = 0.1


@dataclass
class SkyFit:
    """Result of :func:`fit_sky`.

    Attributes
    ----------
    sky, sky_err : (N, r, c) ndarray
        Sky per pixel (e-/s) and its statistical 1-sigma error (photon and read noise of the
        fitted pixels propagated through the fit), per cadence.
    level : float
        Median sky per pixel over the good cadences (e-/s).
    order : int
        0 constant sky, 1 plane.
    used : (r, c) bool
        Pixels the fit used (finite, unsaturated, not clipped).
    sky_pixels : (r, c) bool
        Used pixels where the modelled starlight is below ``SKY_DOMINANCE`` x the sky.
    determined : bool
        Whether the sky level is constrained by the data (``sky_pixels`` count >=
        ``min_sky_pixels``) rather than by the PRF model's wings alone.
    star_flux : (N, k) ndarray
        Fitted flux (e-/s) of each star image per cadence.
    """

    sky: np.ndarray
    sky_err: np.ndarray
    level: float
    order: int
    used: np.ndarray
    sky_pixels: np.ndarray
    determined: bool
    star_flux: np.ndarray

    @property
    def n_sky_pixels(self):
        return int(np.count_nonzero(self.sky_pixels))


def _sky_basis(shape, order):
    """(npix, 1 or 3) smooth-sky basis: constant, then row and column slopes."""
    nrow, ncol = shape
    rr, cc = np.mgrid[:nrow, :ncol]
    terms = [np.ones(nrow * ncol)]
    if order >= 1:
        terms += [((rr - (nrow - 1) / 2) / max(nrow, 1)).ravel(),
                  ((cc - (ncol - 1) / 2) / max(ncol, 1)).ravel()]
    return np.stack(terms, axis=1)


def _static_fit(image, sigma, stars, basis, use, clip, iterations=4):
    """Weighted, clipped fit of the static image: (coefficients, weights, pixels used)."""
    design = np.concatenate([stars, basis], axis=1)
    use = use.copy()
    starlight = np.zeros(image.shape)
    coef = np.zeros(design.shape[1])
    for _ in range(iterations):
        weight = 1.0 / (sigma ** 2 + (PRF_RELATIVE_ERROR * starlight) ** 2)
        root = np.sqrt(weight[use])
        coef = np.linalg.lstsq(design[use] * root[:, None], image[use] * root, rcond=None)[0]
        starlight = np.clip(stars @ coef[:stars.shape[1]], 0.0, None)
        norm = (image - design @ coef) * np.sqrt(weight)
        scale = 1.4826 * np.median(np.abs(norm[use])) if use.any() else 0.0
        new = use & (np.abs(norm) <= clip * max(scale, 1.0))
        if new.sum() < design.shape[1] + 1 or np.array_equal(new, use):
            break
        use = new
    weight = 1.0 / (sigma ** 2 + (PRF_RELATIVE_ERROR * starlight) ** 2)
    return coef, weight, use, starlight


def fit_sky(flux, flux_err, star_images, usable, good=None, min_sky_pixels=4, plane_pixels=12,
            clip=5.0):
    """Sky under a cutout whose pixels include it, fitted jointly with the stars' PRFs.

    Per cadence the model is ``sum_k F_k PRF_k + sky``, with free star fluxes ``F_k`` (so a
    variable star does not leak into the sky) and a constant sky, or a plane once at least
    ``plane_pixels`` pixels are sky-dominated. Weights are ``1 / (err^2 + (0.1 x starlight)^2)``
    and pixels deviating by more than ``clip`` robust sigmas on the static image (uncatalogued
    stars) are dropped. The weights and pixels come from the median image of the good
    cadences, so every cadence is one matrix product (cadences with a NaN pixel are solved on
    their own finite pixels).

    Parameters
    ----------
    flux, flux_err : (N, r, c) array_like
        Pixels including the sky (e-/s) and their errors (NaN allowed).
    star_images : (k, r, c) array_like
        Unit-flux PRF images of the stars whose light falls on the cutout (k may be 0).
    usable : (r, c) bool
        Pixels that may be fitted (not saturated, not in a bleed column).
    good : (N,) bool, optional
        Cadences for the static image (default all).
    min_sky_pixels, plane_pixels : int
        See :class:`SkyFit` ``determined``; pixels needed for a plane.
    clip : float

    Returns
    -------
    SkyFit
    """
    flux = np.asarray(flux, dtype=float)
    n, nrow, ncol = flux.shape
    npix = nrow * ncol
    err = np.asarray(flux_err, dtype=float) if flux_err is not None else np.full(flux.shape,
                                                                                 np.nan)
    stars = np.asarray(star_images, dtype=float).reshape(-1, npix).T     # (npix, k)
    nstar = stars.shape[1]
    good = np.ones(n, dtype=bool) if good is None or not np.any(good) else np.asarray(good, bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        image = np.nanmedian(flux[good], axis=0).ravel()
        sigma = np.nanmedian(err[good], axis=0).ravel()
    if not np.any(np.isfinite(sigma) & (sigma > 0)):
        sigma = np.ones(npix)          # no errors in the file: an unweighted fit
    sigma = np.where(np.isfinite(sigma) & (sigma > 0), sigma, np.nanmax(sigma))
    use0 = np.asarray(usable, dtype=bool).ravel() & np.isfinite(image)
    # stars with no light on the usable pixels cannot be fitted
    lit = stars[use0].sum(axis=0) > 1e-4 if nstar else np.zeros(0, bool)
    stars = stars[:, lit]

    order = 0
    while True:
        basis = _sky_basis((nrow, ncol), order)
        coef, weight, use, starlight = _static_fit(image, sigma, stars, basis, use0, clip)
        static_sky = basis @ coef[stars.shape[1]:]
        sky_px = use & (starlight < SKY_DOMINANCE * static_sky)
        if order == 0 and sky_px.sum() >= plane_pixels:
            order = 1
            continue
        break

    design = np.concatenate([stars, basis], axis=1)
    root = np.sqrt(weight[use])
    pinv = np.linalg.pinv(design[use] * root[:, None]) * root[None, :]    # (p, nuse)
    data = flux.reshape(n, npix)[:, use]                                  # (N, nuse)
    params = data @ pinv.T                                                # (N, p)
    bad = ~np.all(np.isfinite(data), axis=1)
    for i in np.flatnonzero(bad):
        ok = np.isfinite(data[i])
        if ok.sum() < design.shape[1] + 1:
            params[i] = np.nan
            continue
        d = design[use][ok] * root[ok, None]
        params[i] = np.linalg.lstsq(d, data[i, ok] * root[ok], rcond=None)[0]
    nfit = stars.shape[1]
    sky = (params[:, nfit:] @ basis.T).reshape(n, nrow, ncol)
    # statistical error: the cadence's pixel errors through the (fixed) estimator
    ps = pinv[nfit:]                                                      # (nsky, nuse)
    var_pix = err.reshape(n, npix)[:, use] ** 2
    var_pix = np.where(np.isfinite(var_pix), var_pix, sigma[use][None, :] ** 2)
    cov = np.einsum("ip,np,jp->nij", ps, var_pix, ps)
    var = np.einsum("qi,nij,qj->nq", basis, cov, basis)
    sky_err = np.sqrt(np.clip(var, 0, None)).reshape(n, nrow, ncol)
    sky_err[~np.isfinite(params[:, -1])] = np.nan
    star_flux = np.full((n, nstar), np.nan)
    star_flux[:, np.flatnonzero(lit)] = params[:, :nfit]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        level = float(np.nanmedian(sky[good]))
    return SkyFit(sky=sky, sky_err=sky_err, level=level, order=order,
                  used=use.reshape(nrow, ncol), sky_pixels=sky_px.reshape(nrow, ncol),
                  determined=bool(sky_px.sum() >= min_sky_pixels), star_flux=star_flux)
