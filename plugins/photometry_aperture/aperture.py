"""AperturePhotometry: simple aperture sums in a mask built from the sum image, catalog and PRF.

The mask logic lives in :mod:`photometry_aperture.masks` (pure array functions); this class
gathers its inputs from :class:`photometry.core.base.BasePhotometry`, grows the stamp while the
mask touches its edge, sums the light curve and reports contamination and the fainter stars
its mask makes redundant. Settings: the ``[aperture]`` section (settings/defaults.toml).

Method, per target:

1. Segmentation (K2P2-like): pixels of the background-subtracted sum image above
   ``mode + threshold_sigma x robust noise``; a watershed seeded at the catalog stars that
   make their own peak (expected flux x PRF) splits blended neighbours; the target keeps its
   segment.
2. Mask: the pixels of that segment that maximise the predicted per-cadence S/N (ranked by
   target signal / variance, including the background error as correlated over the mask).
   Saturated stars (``tmag < saturation_tmag`` or flagged pixels) also keep every saturated
   pixel and their bleed columns, extended along the columns down to the threshold.
3. Stamp growth: a mask touching a stamp side grows that side by ``resize_step`` and starts
   again, at most ``max_resizes`` times (WARNING if it still touches or cannot grow).
4. Light curve: residual sky surface fitted per cadence on the stamp's empty pixels
   (``residual_background``; cache data only, a TPF's sky is final), sum over the mask,
   errors with the background error correlated, flux-weighted centroid (0-based CCD column,
   row), division by the PRF-predicted fraction of flux kept at each frame's position
   (``motion_correction``).
5. Contamination ``AP_CONT`` = catalog-expected flux of other stars in the mask / all
   expected flux in it. With ``contamination_correction`` (default) the flux is
   ``flux - AP_CONT x median(flux)``, i.e. the neighbours' mean share is removed so that
   relative amplitudes are the target's own (header ``AP_CCORR``); set it false for the raw
   aperture sum. Fainter catalog stars whose centre pixel is in the mask become
   ``skip_targets``.

Headers: AP_CONT, AP_CCORR, AP_NPIX, AP_FFRAC (expected fraction of the target's flux in
the mask), AP_THRSH, AP_SNR, AP_SAT, AP_NSKIP, AP_MCORR.
"""
import logging
import warnings

import numpy as np

from photometry import (AlgorithmFailure, BasePhotometry, mag2flux, nanmean0, PixelQualityFlags,
                        STATUS, TESSQualityFlags)

from . import masks

__all__ = ["AperturePhotometry", "prf_stack"]

logger = logging.getLogger(__name__)


def _prf_model(phot):
    """The CCD's PRF model (``phot.prf``), else the analytic default PRF, else None."""
    try:
        return phot.prf
    except Exception as exc:  # noqa: BLE001 - no PRF model for this CCD: use a fallback
        logger.debug("TIC %d: no PRF model for the CCD (%s)", phot.starid, exc)
    try:
        from photometry import AnalyticPRF
        return AnalyticPRF()
    except ImportError:
        return None


def _nanmedian0(values, overwrite_input=False):
    """``np.nanmedian(values, axis=0)``, the same numbers, in one axis-wise median.

    Why: at >= 600 cadences ``np.nanmedian`` runs one Python-level median per pixel
    (``apply_along_axis``), ~60 ms a target at 1 282 cadences (issue 15). Columns without a
    NaN get :func:`masks.median0` over the axis (the same order statistics and mean of the
    middle pair as the per-pixel median, so the same bits); only the columns that hold a
    NaN go through ``np.nanmedian``. ``overwrite_input``: ``values`` (a float64 temporary of
    the caller's) may be partitioned in place; the medians are order statistics, so the same.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim == 0 or values.shape[0] == 0:
        return np.nanmedian(values, axis=0)
    flat = values.reshape(values.shape[0], -1)
    med = masks.median0(flat, overwrite_input=overwrite_input)
    bad = np.isnan(med)
    if bad.any():
        med[bad] = np.nanmedian(flat[:, bad], axis=0)
    return med.reshape(values.shape[1:])


def _add_in_quadrature(errors, variance):
    """``np.sqrt(errors ** 2 + variance)`` written into ``errors`` (a float64 cube we own)."""
    out = np.square(errors, out=errors)
    out += variance
    return np.sqrt(out, out=out)


class _PixelNoise:
    """Per-pixel noise of the mask inputs, computed only for the pixels asked for.

    ``(variance, bkg_error)`` of :func:`masks.find_mask`: the median over the good cadences
    of ``images_err_cube**2`` (less the background error squared when the background is
    correlated, as find_mask adds it back over the mask) and of ``backgrounds_err_cube``.
    Why lazily: find_mask only reads them at the target's segment (and a saturated mask's
    bleed pixels), ~10-30 of a stamp's 225 pixels, and the two medians over all pixels
    and 1 282 cadences were ~10 ms a target (issue 15). The medians are per pixel, so a
    pixel's value does not depend on which others are computed: the same numbers.
    Pixels not asked for are NaN (variance) and 0 (bkg_error).
    """

    def __init__(self, errors, bkg_errors, good, correlated):
        self.shape = errors.shape[1:]
        self._good = np.flatnonzero(good)
        self._errors = errors.reshape(len(errors), -1)
        self._bkg = bkg_errors.reshape(len(bkg_errors), -1)
        self.correlated = bool(correlated)
        self.variance = np.full(self.shape, np.nan)
        self.bkg_error = np.zeros(self.shape)
        self._done = np.zeros(self.shape, dtype=bool)

    def __call__(self, selection):
        todo = np.flatnonzero(np.asarray(selection, dtype=bool) & ~self._done)
        if todo.size:
            rows = np.ix_(self._good, todo)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                # the fancy index makes a copy of our own: squared and partitioned in place
                errors = np.asarray(self._errors[rows], dtype=float)
                variance = _nanmedian0(np.square(errors, out=errors), overwrite_input=True)
                bkg_error = _nanmedian0(np.asarray(self._bkg[rows], dtype=float),
                                        overwrite_input=True)
            bkg_error = np.where(np.isfinite(bkg_error), bkg_error, 0.0)
            if self.correlated:
                # images_err already holds the background error in quadrature; find_mask
                # adds it back as correlated, so take it out of the per-pixel part
                variance = np.clip(variance - bkg_error ** 2, 0, None)
            self.variance.flat[todo] = variance
            self.bkg_error.flat[todo] = bkg_error
            self._done.flat[todo] = True
        return self.variance, self.bkg_error


def _enclosed_flux(prf, rows, cols, mask, origin, size):
    """(n,) PRF flux of stars at CCD ``rows, cols`` inside ``mask`` (origin: its first pixel).

    The sum of the mask's rows of ``prf.design_matrix`` per star, the same numbers: the
    sparse product adds each star's values in increasing pixel order, as the running sum
    over the mask's pixels of its row-major stamp does here (the pixels outside the mask
    would add exact zeros). Why: building and slicing the sparse matrix of 1 283 positions
    was most of ``_aperture_loss``, and then the running sum over whole stamps (issue 15).
    Each distinct position is evaluated once. A model with its own ``design_matrix`` goes
    through it.
    """
    from photometry import PRFModel
    if type(prf).design_matrix is not PRFModel.design_matrix:
        mat = prf.design_matrix(rows, cols, mask.shape, origin=origin, size=size)
        return np.asarray(mat[np.flatnonzero(mask.ravel())].sum(axis=0)).ravel()
    # each distinct position once (a TPF's coarse POS_CORR or unmeasured frames repeat one)
    rows = np.atleast_1d(np.asarray(rows, dtype=float))
    if rows.size == 0:
        return np.zeros(0)
    pos = np.empty(rows.size, dtype=complex)          # (row, col) pairs, sorted as such
    pos.real, pos.imag = rows, np.atleast_1d(np.asarray(cols, dtype=float))
    uniq, back = np.unique(pos, return_inverse=True)
    values, r0, c0 = prf.stamps(uniq.real.copy(), uniq.imag.copy(), size)
    values = values.reshape(len(uniq), -1)
    out = np.zeros(len(uniq))
    nrows, ncols = mask.shape
    steps = np.arange(size)
    # stamps with the same origin see the mask at the same stamp pixels: only those are
    # summed, in the same (row-major, running) order, so the sum is the one over the whole
    # stamp with the outside zeroed (adding 0.0 is exact); ~30x fewer terms
    r0, c0 = np.asarray(r0, dtype=np.int64), np.asarray(c0, dtype=np.int64)
    keys, group = np.unique((r0 - r0.min()) * (int(np.ptp(c0)) + 1) + (c0 - c0.min()),
                            return_inverse=True)
    for k in range(keys.size):
        sel = np.flatnonzero(group.ravel() == k)
        rr, cc = r0[sel[0]] - origin[0] + steps, c0[sel[0]] - origin[1] + steps
        okr, okc = (rr >= 0) & (rr < nrows), (cc >= 0) & (cc < ncols)
        inside = np.zeros((size, size), dtype=bool)
        inside[np.ix_(okr, okc)] = mask[np.ix_(rr[okr], cc[okc])]
        idx = np.flatnonzero(inside)
        if idx.size:
            out[sel] = np.cumsum(values[np.ix_(sel, idx)], axis=1)[:, -1]
    return out[back.ravel()]


def prf_stack(phot, rows, cols, sigma):
    """(n, r, c) unit-flux PRF images of stars at stamp positions ``rows, cols``.

    Uses the CCD's PRF model (``phot.prf``, :mod:`photometry.data.prf`), or the analytic default
    PRF when the CCD has none; a pixel-integrated Gaussian of ``sigma`` pixels if neither
    is available. Light of a star falling outside the stamp is dropped, so a star near the
    edge contributes only what it puts inside.
    """
    shape = np.shape(phot.sumimage)
    rows = np.asarray(rows, dtype=float)
    cols = np.asarray(cols, dtype=float)
    prf = _prf_model(phot)
    if prf is not None and hasattr(prf, "design_matrix") and rows.size:
        r0, c0 = phot.stamp[0], phot.stamp[2]
        size = int(prf.default_size())
        mat = prf.design_matrix(rows + r0, cols + c0, shape, origin=(r0, c0), size=size)
        return np.asarray(mat.toarray().T.reshape((rows.size,) + tuple(shape)))
    return masks.gaussian_prf_stack(shape, rows, cols, sigma=sigma)


class AperturePhotometry(BasePhotometry):
    """Aperture photometry with K2P2-style segmentation and S/N-optimal masks.

    Per attempt: build the mask (:func:`photometry_aperture.masks.find_mask`); if it touches
    a stamp side, grow that side by ``aperture.resize_step`` and try again (at most
    ``aperture.max_resizes`` times). Then sum the background-subtracted pixels per cadence.
    Result: ``lightcurve`` flux (contamination-corrected if ``aperture.contamination_correction``),
    flux_err (background error correlated over the mask), flux_background, pos_centroid
    (flux-weighted, 0-based CCD column, row), ``final_phot_mask`` and the ``AP_*`` headers.
    """

    name = "aperture"
    version = "1.0"

    def _mask_inputs(self, cfg):
        good = TESSQualityFlags.filter(self.quality)
        if not np.any(good):
            good = np.ones(self.n_frames, dtype=bool)
        sumimage = np.asarray(self.sumimage, dtype=float)
        if not np.any(np.isfinite(sumimage)):
            raise AlgorithmFailure(f"TIC {self.starid}: the sum image has no finite pixel")
        correlated = bool(cfg["correlated_background"])
        pixel_noise = _PixelNoise(self.images_err_cube, self.backgrounds_err_cube, good,
                                  correlated)
        flags = self.pixelflags_cube[good]
        saturated_pixels = np.any((flags & int(PixelQualityFlags.Saturated)) != 0, axis=0)
        cat = self.catalog
        index = np.flatnonzero(np.asarray(cat["starid"]) == self.starid)
        if index.size == 0:
            raise AlgorithmFailure(f"TIC {self.starid}: the target is not in its stamp catalog")
        rows = np.asarray(cat["row_stamp"], dtype=float)
        cols = np.asarray(cat["column_stamp"], dtype=float)
        fluxes = mag2flux(np.asarray(cat["tmag"], dtype=float))
        models = fluxes[:, None, None] * prf_stack(self, rows, cols, float(cfg["prf_sigma"]))
        return dict(sumimage=sumimage, variance=None, models=models, star_rows=rows,
                    star_cols=cols, fluxes=fluxes, target_index=int(index[0]),
                    pixel_noise=pixel_noise, saturated_pixels=saturated_pixels,
                    saturated=self.target["tmag"] < float(cfg["saturation_tmag"]),
                    threshold_sigma=float(cfg["threshold_sigma"]),
                    dominance=float(cfg["seed_dominance"]), correlated_background=correlated)

    def _aperture_loss(self, mask):
        """(N,) PRF flux in ``mask`` at each frame's position / at the reference position.

        Why: a pixel mask stays put while the spacecraft jitter and the momentum-dump steps
        move the star by tenths of a pixel, which changes the enclosed flux by up to a few
        per cent for a small optimal mask. The movement kernel gives the target's position
        per frame and the PRF the enclosed fraction there; dividing by this ratio removes
        the loss. None when there is no movement kernel or no PRF model.
        """
        if self.movement_kernel is None and getattr(self.source, "pos_corr", None) is None:
            return None
        prf = _prf_model(self)
        if prf is None or not hasattr(prf, "design_matrix"):
            return None
        drow = np.zeros(self.n_frames)
        dcol = np.zeros(self.n_frames)
        pos_corr = np.asarray(self.lightcurve["pos_corr"], dtype=float)  # (column, row)
        if np.all(np.isfinite(pos_corr)):
            dcol, drow = pos_corr[:, 0], pos_corr[:, 1]
        if not (np.any(drow) or np.any(dcol)):
            return None
        r0, c0 = self.stamp[0], self.stamp[2]
        rows = np.concatenate([[self.target_pos_row], self.target_pos_row + drow])
        cols = np.concatenate([[self.target_pos_column], self.target_pos_column + dcol])
        frac = _enclosed_flux(prf, rows, cols, mask, (r0, c0), int(prf.default_size()))
        if not frac[0] > 0:
            return None
        loss = frac[1:] / frac[0]
        return np.where(loss > 0.2, loss, np.nan)

    def _decorrelate_motion(self, flux, max_gap=4, shrink_dof=2.0):
        """Remove what is left of the flux's linear dependence on the target's position.

        The PRF loss correction leaves a few per cent of the motion signal (PRF model
        errors). The coefficients come from differences of flux and position between
        successive good cadences: differencing removes slow stellar variability, so a stellar
        signal hardly leaks into the fit. Successive good cadences may be up to
        ``decorrelation_max_gap`` cadences apart, so that the pairs across a momentum dump
        (whose own cadence is flagged) are kept: the dump steps (0.1-0.3 px) give the fit the
        lever arm of the slow offsets the correction is applied to, where the jitter
        differences alone (~0.03 px) left coefficients so uncertain that, applied to the
        whole position excursion, they added more noise than they removed (the excess over
        the ideal noise on the 128 px scene, seed 6). Outliers (flares, transit edges) are
        clipped on the residual of the fit, not of the raw differences, for the same reason.
        Applied only when it removes clearly more of the difference variance than a fit to
        pure noise would (4/n), and with at least 20 differences.
        """
        pos = np.asarray(self.lightcurve["pos_corr"], dtype=float)
        good = TESSQualityFlags.filter(self.quality) & np.isfinite(flux) \
            & np.all(np.isfinite(pos), axis=1)
        idx = np.flatnonzero(good)
        close = np.diff(idx) <= max(int(max_gap), 1)
        first, second = idx[:-1][close], idx[1:][close]
        if first.size < 20:
            return flux
        df = flux[second] - flux[first]
        dp = pos[second] - pos[first]
        keep = np.ones(df.size, dtype=bool)
        for _ in range(3):
            coef, *_ = np.linalg.lstsq(dp[keep], df[keep], rcond=None)
            resid = df - dp @ coef
            mad = np.median(np.abs(resid[keep] - np.median(resid[keep])))
            new = np.abs(resid - np.median(resid[keep])) < 5 * 1.4826 * max(mad, 1e-12)
            if np.array_equal(new, keep) or new.sum() < 20:
                break
            keep = new
        coef, *_ = np.linalg.lstsq(dp[keep], df[keep], rcond=None)
        before = np.var(df[keep])
        after = np.var(df[keep] - dp[keep] @ coef)
        # only a clear detection of leftover motion signal (not a fit to noise)
        if not after < before * (1.0 - 4.0 / keep.sum()):
            return flux
        # shrink the coefficients by their significance (James-Stein): the correction is
        # applied to the whole position excursion, where the coefficients' error adds noise
        # p' Cov p; a barely significant fit is applied only in part
        cov = after * np.linalg.pinv(dp[keep].T @ dp[keep])
        chi2 = float(coef @ np.linalg.pinv(cov) @ coef)
        shrink = max(0.0, 1.0 - float(shrink_dof) / chi2) if chi2 > 0 else 0.0
        ref = np.median(pos[good], axis=0)
        return flux - shrink * ((pos - ref) @ coef)

    def find_mask(self):
        """The mask of the current stamp (a :class:`masks.MaskResult`), no stamp change."""
        cfg = self.settings["aperture"]
        return masks.find_mask(**self._mask_inputs(cfg))

    def do_photometry(self):
        cfg = self.settings["aperture"]
        status = STATUS.OK
        max_resizes = int(cfg["max_resizes"])
        if self.target["tmag"] < float(cfg["saturation_tmag"]):
            max_resizes *= 2  # bleed columns of bright stars can be long
        step = int(cfg["resize_step"])
        for attempt in range(max_resizes + 1):
            res = self.find_mask()
            if not res.edges:
                break
            if attempt == max_resizes:
                logger.warning("TIC %d: mask still touches the stamp edge (%s) after %d "
                               "resizes", self.starid, ", ".join(res.edges), attempt)
                status = STATUS.WARNING
                break
            if not self.resize_stamp(**{side: step for side in res.edges}):
                logger.warning("TIC %d: mask touches the stamp edge (%s), which cannot grow",
                               self.starid, ", ".join(res.edges))
                status = STATUS.WARNING
                break
        if not res.segment.any():
            logger.warning("TIC %d: no segment above the background on the target; "
                           "using the target pixel alone", self.starid)
            status = STATUS.WARNING

        mask = res.mask
        self.mask_result = res
        images, backgrounds = self.images_cube, self.backgrounds_cube
        bkg_err = self.backgrounds_err_cube
        errors = self.images_err_cube
        order = int(cfg["residual_background"])
        # a TPF's sky (SPOC's FLUX_BKG, or the TESScut fit that models the stars' light) is
        # final: a plane through the "empty" pixels of a small TPF is the stars' wings
        if order >= 0 and self.datasource != "tpf":
            sky = (res.labels == 0) & np.isfinite(res.models_total) \
                & (res.models_total < res.noise) & ~mask
            good = TESSQualityFlags.filter(self.quality)
            reference = nanmean0(images[good if np.any(good) else slice(None)])
            resid, resid_err = masks.residual_background(images, sky, order,
                                                         reference=reference)
            if resid is not None:
                # kept in the cubes, so what is written (the TPF export) is what was summed;
                # in place (the cubes are this object's own), the same operations as
                # ``images - resid``, ``np.sqrt(bkg_err ** 2 + resid_err ** 2)``
                var = np.square(resid_err, out=resid_err)
                self.images_cube = images = np.subtract(images, resid, out=images)
                self.backgrounds_cube = backgrounds = np.add(backgrounds, resid,
                                                             out=backgrounds)
                self.backgrounds_err_cube = bkg_err = _add_in_quadrature(bkg_err, var)
                self.images_err_cube = errors = _add_in_quadrature(errors, var)
        flux, flux_err, background, centroid = masks.aperture_sums(
            images, errors, bkg_err, mask, backgrounds=backgrounds,
            correlated_background=bool(cfg["correlated_background"]))
        loss = None
        if bool(cfg["motion_correction"]):
            loss = self._aperture_loss(mask)
            if loss is not None:
                flux = flux / loss
                flux_err = flux_err / loss
        if bool(cfg["motion_decorrelation"]):
            flux = self._decorrelate_motion(flux, int(cfg.get("decorrelation_max_gap", 4)),
                                            float(cfg.get("decorrelation_shrink", 2.0)))
        good = TESSQualityFlags.filter(self.quality) & np.isfinite(flux)
        cont = res.contamination
        corrected = bool(cfg["contamination_correction"]) and np.isfinite(cont) and cont > 0
        if corrected and np.any(good):
            # neighbours' flux is constant to first order: subtracting the catalog share of
            # the mean mask flux restores the target's relative amplitudes
            flux = flux - cont * np.median(flux[good])
        if np.isfinite(cont) and cont > float(cfg["contamination_warning"]):
            logger.warning("TIC %d: contamination %.2f in the aperture", self.starid, cont)
            status = STATUS.WARNING

        r1, _, c1, _ = self.stamp
        lc = self.lightcurve
        lc["flux"] = flux
        lc["flux_err"] = flux_err
        lc["flux_background"] = background
        lc["pos_centroid"] = np.column_stack([centroid[:, 1] + c1, centroid[:, 0] + r1])
        self.final_phot_mask = mask
        self.mask_result = res
        cat = self.catalog
        skip = [int(cat["starid"][k]) for k in res.skip]
        self.report_details(skip_targets=skip)
        self.additional_headers.update({
            "AP_CONT": (float(cont) if np.isfinite(cont) else float("nan"),
                        "AP contamination from catalog stars in mask"),
            "AP_CCORR": (bool(corrected), "AP flux corrected for contamination"),
            "AP_NPIX": (int(mask.sum()), "AP pixels in mask"),
            "AP_FFRAC": (float(res.flux_fraction), "AP expected target flux fraction in mask"),
            "AP_THRSH": (float(res.threshold), "[e-/s] AP segmentation threshold"),
            "AP_SNR": (float(res.snr), "AP predicted S/N per cadence of mask"),
            "AP_SAT": (bool(res.saturated), "AP saturated-star mask with bleed columns"),
            "AP_NSKIP": (len(skip), "AP fainter catalog stars inside mask"),
            "AP_MCORR": (loss is not None, "AP flux corrected for motion aperture loss"),
        })
        return status
