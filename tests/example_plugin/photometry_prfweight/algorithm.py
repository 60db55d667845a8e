"""PRF-weighted photometry (optimal extraction, Naylor 1998) at the catalog position.

Per cadence, with ``P`` the target's unit-flux PRF over the stamp, ``d`` the background-
subtracted image with known neighbours' PRFs subtracted and ``s`` its per-pixel errors, the
flux estimate is ``F = sum(P d / s^2) / sum(P^2 / s^2)``: the minimum-variance linear estimate
of a star of known shape and position. Its error is ``1 / sqrt(sum(P^2 / s^2))``.
"""
import numpy as np

from photometry import STATUS, BasePhotometry, mag2flux

__all__ = ["PRFWeightedPhotometry", "prf_weighted_flux"]


def prf_weighted_flux(images, errors, prf):
    """Optimal-extraction flux and error per cadence.

    Parameters
    ----------
    images : (N, R, C) background-subtracted flux (e-/s)
    errors : (N, R, C) 1-sigma errors (e-/s)
    prf : (R, C) the target's PRF (fraction of its flux per pixel)

    Returns
    -------
    flux, flux_err : (N,) arrays (NaN where a cadence has no usable pixel)
    """
    ok = np.isfinite(images) & np.isfinite(errors) & (errors > 0)
    w = np.where(ok, prf / np.where(ok, errors, 1.0) ** 2, 0.0)
    norm = np.sum(w * prf, axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = np.sum(w * np.where(ok, images, 0.0), axis=(1, 2)) / norm
        flux_err = 1.0 / np.sqrt(norm)
    flux[norm <= 0] = np.nan
    flux_err[norm <= 0] = np.nan
    return flux, flux_err


class PRFWeightedPhotometry(BasePhotometry):
    """The plugin's algorithm: one class, a unique ``name``, and ``do_photometry``."""

    name = "prfweight"
    version = "0.2.0"

    def do_photometry(self):
        cat = self.catalog
        r0, _, c0, _ = self.stamp
        shape = self.sumimage.shape
        prf_model = self.prf
        is_target = np.asarray(cat["starid"]) == self.starid
        # subtract the catalog-expected images of the neighbours (they are constant)
        neighbours = prf_model.evaluate(np.asarray(cat["row"])[~is_target],
                                        np.asarray(cat["column"])[~is_target], shape,
                                        origin=(r0, c0),
                                        flux=mag2flux(np.asarray(cat["tmag"])[~is_target]))
        prf = prf_model.evaluate(self.target_pos_row, self.target_pos_column, shape,
                                 origin=(r0, c0))
        flux, flux_err = prf_weighted_flux(self.images_cube - neighbours,
                                           self.images_err_cube, prf)
        self.lightcurve["flux"] = flux
        self.lightcurve["flux_err"] = flux_err
        self.lightcurve["flux_background"] = np.nansum(
            self.backgrounds_cube * (prf > 0.01), axis=(1, 2))
        self.lightcurve["pos_centroid"] = np.column_stack(
            [np.full(len(flux), self.target_pos_column), np.full(len(flux), self.target_pos_row)])
        self.final_phot_mask = prf > 0.01
        return STATUS.OK
