"""LinPSFPhotometry: the target and its neighbours fitted together, cadence by cadence.

Per cadence the background-subtracted stamp is modelled as ``sum_k f_k P(x - x_k(t)) + b``:
``P`` is the ``linpsf_shape`` model from the cache (else ``BasePhotometry.prf``, logged), the
positions ``x_k(t)`` are the catalog positions moved by the movement kernel, ``f_k`` the fluxes
of the target and of every catalog neighbour that puts light into the stamp, ``b`` an optional
residual background. Neighbours too faint to matter are subtracted at their catalog flux.

Why these choices (``algorithms.md`` §1.8, §5):

* **Fixed noise model.** Pixel weights are ``1 / median_t(err^2)``, not the cadence's own
  errors: data-dependent Poisson weights bias faint sources, and fixed weights let one
  Cholesky factorisation serve every cadence when no star moves by more than
  ``fixed_tolerance`` px (all cadences are then one multi-right-hand-side solve).
  Otherwise the per-cadence normal matrices are built and solved as one batched call.
* **Priors.** Neighbour fluxes get ``N(catalog flux, (prior_width * flux)^2)`` so that a
  degenerate blend stays near the catalog instead of trading flux with the target; the
  target has no prior (its light curve must not be pulled).
* **Errors** from the diagonal of the inverse normal matrix (the flux covariance).
* **Aperture.** A PRF-shaped aperture (target model above a level chosen to maximise
  completeness + crowding, as psfmachine) gives ``FLFRCSAP`` / ``CROWDSAP`` and the
  centroid; the light-curve flux is the fitted PRF flux.
"""
import logging
import warnings

import numpy as np
from scipy import sparse
from scipy.linalg import cho_factor, cho_solve

from photometry.base import STATUS, BasePhotometry
from photometry.errors import AlgorithmFailure
from photometry.quality import PixelQualityFlags, TESSQualityFlags
from photometry.utilities import mag2flux

from .model import single_thread_blas
from .stage import load_shape_model

__all__ = ["LinPSFPhotometry", "solve_fluxes", "fit_scene"]

logger = logging.getLogger(__name__)

_BAD_PIXELS = int(PixelQualityFlags.NonFinite | PixelQualityFlags.Saturated
                  | PixelQualityFlags.ManualExclude)


def solve_fluxes(design, data, weights, prior_mu, prior_ivar):
    """Gaussian-prior weighted least squares for every cadence.

    Parameters
    ----------
    design : ndarray, (npix, n) or (N, npix, n)
        One design for all cadences (one factorisation) or one per cadence.
    data : ndarray (N, npix)
        Pixel values (NaN allowed: those pixels get zero weight in that cadence).
    weights : ndarray (npix,)
        Inverse variances of the fixed noise model.
    prior_mu, prior_ivar : ndarray (n,)
        Prior mean and inverse variance per parameter (0 ivar = no prior).

    Returns
    -------
    x, err : ndarray (N, n)
        Solutions and 1-sigma errors (sqrt of the covariance diagonal).
    """
    finite = np.isfinite(data)
    y = np.where(finite, data, 0.0)
    n = design.shape[-1]
    if sparse.issparse(design):
        return _solve_sparse(sparse.csr_matrix(design), y, finite, weights, prior_mu,
                             prior_ivar)
    prior = np.diag(prior_ivar)
    rhs_prior = prior_ivar * prior_mu
    if design.ndim == 2 and finite.all():
        Aw = design * weights[:, None]
        normal = design.T @ Aw + prior
        factor = cho_factor(normal)
        x = cho_solve(factor, (y @ Aw + rhs_prior).T).T
        cov = cho_solve(factor, np.eye(n))
        err = np.broadcast_to(np.sqrt(np.diag(cov)), x.shape).copy()
        return x, err
    W = weights[None, :] * finite                              # (N, npix)
    A = design if design.ndim == 3 else np.broadcast_to(design, (len(y),) + design.shape)
    normal = np.einsum("tpi,tp,tpj->tij", A, W, A) + prior[None]
    rhs = np.einsum("tpi,tp->ti", A, W * y) + rhs_prior[None]
    x = np.linalg.solve(normal, rhs[..., None])[..., 0]
    cov = np.linalg.inv(normal)
    err = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    return x, err


def _solve_sparse(A, y, finite, weights, prior_mu, prior_ivar):
    """:func:`solve_fluxes` for one sparse design: one Cholesky factorisation per distinct
    pattern of missing pixels (normally one for all cadences), normal matrix built sparse."""
    N, n = len(y), A.shape[1]
    x = np.empty((N, n))
    err = np.empty((N, n))
    rhs_prior = prior_ivar * prior_mu
    patterns = {}                      # (np.unique(axis=0) on the masks cost 20 ms a call)
    for t, key in enumerate(np.packbits(finite, axis=1)):
        patterns.setdefault(key.tobytes(), []).append(t)
    for members in patterns.values():
        idx = np.asarray(members)
        mask = finite[idx[0]]
        Aw = A.multiply((weights * mask)[:, None]).tocsr()
        normal = (A.T @ Aw).toarray()
        normal[np.diag_indices(n)] += prior_ivar
        factor = cho_factor(normal)
        x[idx] = cho_solve(factor, Aw.T @ y[idx].T + rhs_prior[:, None]).T
        err[idx] = np.sqrt(np.diag(cho_solve(factor, np.eye(n))))
    return x, err


def fit_scene(images, errors, rows, cols, fluxes, prf, drow=None, dcol=None, good=None,
              origin=(0, 0), prior_width=1.0, free=None, fit_background=True,
              rebuild_tolerance=0.02, taylor=True, bad=None):
    """Every star of a scene fitted at once, cadence by cadence (scene mode).

    Why: :class:`LinPSFPhotometry` solves one target's stamp, refitting its ~35 neighbours,
    so a crowded CCD fits every star again in every stamp it reaches. Here the whole image
    is one sparse design matrix (``prf.design_matrix``: pixels x stars, one PRF stamp per
    column), with the same fixed noise model and neighbour priors as the per-target solve
    (:func:`solve_fluxes`). Cadences whose star positions agree within
    ``rebuild_tolerance`` px share one design and one Cholesky factorisation; the design is
    rebuilt at each group's mean position (exact PRFs; a 0.15 px drift over a sector is a
    few tens of groups, each a sparse build and a small dense factorisation).

    Parameters
    ----------
    images, errors : ndarray (N, R, C)
        Pixels (sky included if ``fit_background``) and their 1-sigma errors.
    rows, cols : ndarray (K,)
        CCD positions of the stars at zero shift (``origin`` is the CCD position of pixel 0, 0).
    fluxes : ndarray (K,)
        Catalog fluxes: the prior means ``N(flux, (prior_width * flux)^2)``.
    prf : photometry.prf.PRFModel
        The shape (``SplinePRF`` of the ``linpsf_shape`` stage, or any PRF model).
    drow, dcol : ndarray (N,) or (N, K), optional
        Position shifts per cadence (per star), e.g. from the movement kernel.
    good : ndarray (N,) of bool, optional
        Cadences the fixed noise model is estimated on (default all).
    free : ndarray (K,) of bool, optional
        Stars with no flux prior (e.g. the targets).
    rebuild_tolerance : float
        px; cadences within this of a group's first cadence (every star) share its design.
    taylor : bool
        Correct each cadence to first order for its offset from the group's mean position
        (PRF gradients by central differences, one extra solve with the same factorisation).
        Why: without it a 0.005 px tolerance already biased bright stars by up to 2 sigma
        in a sawtooth along the drift; with it 0.02 px groups match the exact positions.
    bad : ndarray (R, C) or (N, R, C) of bool, optional
        Pixels to ignore.

    Returns
    -------
    flux, flux_err : ndarray (N, K)
    background : ndarray (N,)
        The fitted constant level (zeros without ``fit_background``).
    info : dict
        ``n_designs``: designs built (= factorisations for NaN-free data).
    """
    images = np.asarray(images, dtype=float)
    N, R, C = images.shape
    rows, cols, fluxes = (np.atleast_1d(np.asarray(a, dtype=float)) for a in (rows, cols, fluxes))
    K = rows.size
    drow = np.zeros((N, K)) if drow is None else np.broadcast_to(
        np.asarray(drow, float).reshape(N, -1), (N, K))
    dcol = np.zeros((N, K)) if dcol is None else np.broadcast_to(
        np.asarray(dcol, float).reshape(N, -1), (N, K))
    good = np.ones(N, bool) if good is None or not np.any(good) else np.asarray(good, bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        var = np.nanmedian(np.asarray(errors, float)[good] ** 2, axis=0).ravel()
    weights = np.where(np.isfinite(var) & (var > 0), 1.0 / np.where(var > 0, var, 1), 0.0)
    data = images.reshape(N, -1)
    if bad is not None:
        data = np.where(np.broadcast_to(np.asarray(bad, bool), images.shape).reshape(N, -1),
                        np.nan, data)
    free = np.zeros(K, bool) if free is None else np.asarray(free, bool)
    nb = 1 if fit_background else 0
    mu = np.concatenate([fluxes, np.zeros(nb)])
    width = float(prior_width) * np.abs(fluxes)
    ivar = np.concatenate([np.where(free | (width <= 0), 0.0,
                                    1.0 / np.where(width > 0, width, 1.0) ** 2), np.zeros(nb)])
    # group cadences by position: a new design when any star moved more than the tolerance
    groups, start = [], 0
    for t in range(1, N + 1):
        if t == N or np.max(np.hypot(drow[t] - drow[start], dcol[t] - dcol[start])) \
                > float(rebuild_tolerance):
            groups.append(np.arange(start, t))
            start = t
    x = np.empty((N, K + nb))
    err = np.empty((N, K + nb))
    with single_thread_blas():
        _solve_groups(groups, prf, rows, cols, drow, dcol, data, weights, mu, ivar, (R, C),
                      origin, nb, taylor, x, err)
    background = x[:, K] if nb else np.zeros(N)
    return x[:, :K], err[:, :K], background, {"n_designs": len(groups)}


def _solve_groups(groups, prf, rows, cols, drow, dcol, data, weights, mu, ivar, shape,
                  origin, nb, taylor, x, err):
    """The per-group design builds and solves of :func:`fit_scene` (fills ``x``, ``err``)."""
    R, C = shape
    K = rows.size
    h = 0.01
    for idx in groups:
        r0, c0 = rows + drow[idx].mean(axis=0), cols + dcol[idx].mean(axis=0)
        A = prf.design_matrix(r0, c0, (R, C), origin)
        if nb:
            A = sparse.hstack([A, np.ones((R * C, 1))], format="csr")
        x[idx], err[idx] = solve_fluxes(A, data[idx], weights, mu, ivar)
        dr, dc = drow[idx] - (r0 - rows), dcol[idx] - (c0 - cols)
        if taylor and np.any(np.hypot(dr, dc) > 1e-4):
            # first order in the offset from the group's position: the data are corrected
            # by d(model)/d(position) * offset at the first-pass fluxes and solved again
            # with the same design (the error of using first-pass fluxes is second order)
            gr = (prf.design_matrix(r0 + h, c0, (R, C), origin)
                  - prf.design_matrix(r0 - h, c0, (R, C), origin)) / (2 * h)
            gc = (prf.design_matrix(r0, c0 + h, (R, C), origin)
                  - prf.design_matrix(r0, c0 - h, (R, C), origin)) / (2 * h)
            f = x[idx, :K]
            corr = (gr @ (dr * f).T + gc @ (dc * f).T).T
            x[idx], err[idx] = solve_fluxes(A, data[idx] - corr, weights, mu, ivar)


class LinPSFPhotometry(BasePhotometry):
    """Simultaneous linear PRF photometry of a target and its neighbours (see module doc)."""

    name = "linpsf"
    version = "1.0"

    # ------------------------------------------------------------------ model
    def _shape_model(self):
        """(PRFModel, description): the cache's linpsf_shape model, else ``self.prf``."""
        group = None
        if hasattr(self.source, "model_group"):
            group = self.source.model_group("linpsf_shape")
        model = load_shape_model(group)
        if model is not None:
            return model, "linpsf_shape"
        logger.info("TIC %d: no linpsf_shape model in the data source; using the %s PRF",
                    self.starid, self.psettings.get("prf", "analytic"))
        return self.prf, f"prf:{getattr(self.prf, 'name', 'prf')}"

    def _images(self, prf, rows, cols, shape, origin):
        """(n, r, c) unit-flux PRF images of stars at CCD ``rows, cols`` over the stamp.

        One vectorised ``prf.stamps`` call for all positions (all stars of all cadences at
        once when the positions move), then a scatter into the stamp grid.
        """
        rows = np.atleast_1d(np.asarray(rows, dtype=float))
        cols = np.atleast_1d(np.asarray(cols, dtype=float))
        R, C = shape
        out = np.zeros((rows.size, R * C))
        if rows.size == 0:
            return out.reshape(0, R, C)
        size = int(prf.default_size())
        vals, r0, c0 = prf.stamps(rows, cols, size)
        steps = np.arange(size)
        rr = ((r0 - origin[0])[:, None] + steps[None, :])[:, :, None]
        cc = ((c0 - origin[1])[:, None] + steps[None, :])[:, None, :]
        ok = (rr >= 0) & (rr < R) & (cc >= 0) & (cc < C)
        star = np.broadcast_to(np.arange(rows.size)[:, None, None], vals.shape)
        flat = np.broadcast_to(rr * C + cc, vals.shape)
        out[star[ok], flat[ok]] = vals[ok]
        return out.reshape(rows.size, R, C)

    def _sources(self, cfg, prf, shape, origin):
        """(fitted index array, subtracted index array, catalog fluxes) of the catalog stars."""
        cat = self.catalog
        tmag = np.asarray(cat["tmag"], dtype=float)
        flux = mag2flux(tmag)
        imgs = self._images(prf, np.asarray(cat["row"], float), np.asarray(cat["column"], float),
                            shape, origin)
        in_stamp = imgs.reshape(len(cat), -1).sum(axis=1) * flux
        is_target = np.asarray(cat["starid"]) == self.starid
        if not is_target.any():
            raise AlgorithmFailure(f"TIC {self.starid}: the target is not in its stamp catalog")
        fit = is_target | ((tmag <= self.target["tmag"] + float(cfg["max_delta_mag"]))
                           & (in_stamp >= float(cfg["min_stamp_flux"])))
        order = np.argsort(np.where(is_target, -np.inf, -in_stamp), kind="stable")
        fitted = [k for k in order if fit[k]][:int(cfg["max_sources"])]
        rest = np.setdiff1d(np.arange(len(cat)), fitted)
        rest = rest[in_stamp[rest] > 0]
        return np.asarray(fitted, dtype=int), rest, flux

    # ------------------------------------------------------------------ algorithm
    def do_photometry(self):
        cfg = self.settings["linpsf"]
        status = STATUS.OK
        margin = int(cfg["stamp_margin"])
        if margin > 0 and self.datasource != "tpf":
            self.resize_stamp(down=margin, up=margin, left=margin, right=margin)
        prf, model_name = self._shape_model()
        images = np.asarray(self.images_cube, dtype=float)
        N, R, C = images.shape
        origin = (self.stamp[0], self.stamp[2])
        fitted, rest, cat_flux = self._sources(cfg, prf, (R, C), origin)
        cat = self.catalog
        nfit = fitted.size

        # positions per cadence (movement kernel) and whether they can be treated as fixed
        rows0 = np.asarray(cat["row"], dtype=float)
        cols0 = np.asarray(cat["column"], dtype=float)
        drow = np.zeros((N, len(cat)))
        dcol = np.zeros((N, len(cat)))
        if self.movement_kernel is not None:
            for i in range(N):
                drow[i], dcol[i] = self.movement_at(rows0, cols0, i)
        elif self.datasource == "tpf":
            pos = np.asarray(self.lightcurve["pos_corr"], dtype=float)
            if np.all(np.isfinite(pos)):
                dcol[:] = pos[:, :1]
                drow[:] = pos[:, 1:2]
        # frames without a motion measurement (NaN pos_corr / kernel row) get the median
        # position, not the reference one (the kernel returns 0 shift there)
        pos = np.asarray(self.lightcurve["pos_corr"], dtype=float)
        unknown = ~np.all(np.isfinite(pos), axis=1)
        if unknown.any() and not unknown.all():
            drow[unknown] = np.median(drow[~unknown], axis=0)
            dcol[unknown] = np.median(dcol[~unknown], axis=0)
        mean_dr, mean_dc = np.median(drow, axis=0), np.median(dcol, axis=0)
        moving = np.max(np.hypot(drow - mean_dr, dcol - mean_dc)) > float(cfg["fixed_tolerance"])

        # data, fixed noise model, bad pixels
        good = TESSQualityFlags.filter(self.quality)
        if not good.any():
            good[:] = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            var = np.nanmedian(np.asarray(self.images_err_cube, float)[good] ** 2, axis=0)
        bad = (np.asarray(self.pixelflags_cube) & _BAD_PIXELS) != 0
        data = np.where(bad, np.nan, images).reshape(N, -1)
        weights = np.where(np.isfinite(var) & (var > 0), 1.0 / np.where(var > 0, var, 1), 0.0)
        weights = weights.ravel()
        if not np.any(weights > 0):
            raise AlgorithmFailure(f"TIC {self.starid}: no pixel with a finite error")

        nbkg = 1 if bool(cfg["fit_background"]) else 0
        n = nfit + nbkg
        is_target = np.asarray(cat["starid"])[fitted] == self.starid
        mu = np.zeros(n)
        ivar = np.zeros(n)
        mu[:nfit] = cat_flux[fitted]
        width = float(cfg["prior_width"]) * cat_flux[fitted]
        ivar[:nfit] = np.where(is_target, 0.0, 1.0 / width ** 2)

        def design_at(dr, dc):
            imgs = self._images(prf, np.concatenate([rows0[fitted] + dr[fitted],
                                                     rows0[rest] + dr[rest]]),
                                np.concatenate([cols0[fitted] + dc[fitted],
                                                cols0[rest] + dc[rest]]), (R, C), origin)
            A = imgs[:nfit].reshape(nfit, -1).T
            if nbkg:
                A = np.hstack([A, np.ones((R * C, 1))])
            fixed = (cat_flux[rest, None, None] * imgs[nfit:]).sum(axis=0).ravel()
            return A, fixed

        if not moving:
            A, fixed = design_at(mean_dr, mean_dc)
            fixed = np.broadcast_to(fixed, (N, R * C))
        else:
            # every star at every cadence in one PRF evaluation
            order = np.concatenate([fitted, rest])
            imgs = self._images(prf, (rows0[order][None, :] + drow[:, order]).ravel(),
                                (cols0[order][None, :] + dcol[:, order]).ravel(), (R, C),
                                origin).reshape(N, order.size, R * C)
            A = np.transpose(imgs[:, :nfit], (0, 2, 1))
            if nbkg:
                A = np.concatenate([A, np.ones((N, R * C, 1))], axis=2)
            fixed = np.einsum("k,tkp->tp", cat_flux[rest], imgs[:, nfit:])
            del imgs
        def predict(x):
            return (x @ A.T if A.ndim == 2 else np.einsum("tpi,ti->tp", A, x)) + fixed

        # Static residual correction: the median residual image over good cadences is the
        # part of the scene the PRF model gets wrong (shape errors, uncatalogued stars); it is
        # constant in time, so it is subtracted and the fluxes solved again. Why: a shape
        # error of 0.1 % of the flux per pixel is hundreds of sigma for a bright star and
        # would otherwise leak into every flux as the stars move over the pixels.
        static = np.zeros(R * C)
        for _ in range(int(cfg["residual_iterations"]) + 1):
            x, err = solve_fluxes(A, data - fixed - static[None], weights, mu, ivar)
            model = predict(x)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                static = np.nan_to_num(np.nanmedian((data - model)[good], axis=0)) + static
        model = model + static[None]
        self.static_residual = static.reshape(R, C)
        t = int(np.flatnonzero(is_target)[0])
        flux, flux_err = x[:, t], err[:, t]
        bkg_fit = x[:, nfit] if nbkg else np.zeros(N)
        resid = (data - model).reshape(N, R, C)
        self.residuals_cube = resid
        self.model_cube = model.reshape(N, R, C)

        # PRF-shaped aperture from the reference-position models and the mean fluxes
        ref = self._images(prf, rows0[fitted], cols0[fitted], (R, C), origin)
        mean_flux = np.nanmedian(x[good][:, :nfit], axis=0)
        target_img = ref[t]
        others = np.tensordot(np.delete(mean_flux, t), np.delete(ref, t, axis=0), axes=1)
        if rest.size:
            others = others + np.tensordot(
                cat_flux[rest], self._images(prf, rows0[rest], cols0[rest], (R, C), origin), 1)
        tflux = max(float(mean_flux[t]), 0.0)
        aperture, completeness, crowding = _prf_aperture(target_img, tflux, others, bad.all(0))
        self.final_phot_mask = aperture

        # centroid of the target-only image in the aperture, background in the aperture
        contrib = x[:, t, None] * (A[None, :, t] if A.ndim == 2 else A[:, :, t])
        target_only = (data - model + contrib).reshape(N, R, C)
        rr, cc = np.mgrid[0:R, 0:C]
        w = np.where(aperture[None] & np.isfinite(target_only), target_only, 0.0)
        w = np.clip(w, 0, None)
        tot = w.sum(axis=(1, 2))
        with np.errstate(all="ignore"):
            cen_r = (w * rr).sum(axis=(1, 2)) / tot + origin[0]
            cen_c = (w * cc).sum(axis=(1, 2)) / tot + origin[1]
        background = np.asarray(self.backgrounds_cube, float)[:, aperture].sum(axis=1) \
            + bkg_fit * np.count_nonzero(aperture)

        lc = self.lightcurve
        lc["flux"] = flux
        lc["flux_err"] = flux_err
        lc["flux_background"] = background
        lc["pos_centroid"] = np.column_stack([cen_c, cen_r])

        # model quality: reduced chi^2 and residual RMS relative to the target peak
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            chi2 = float(np.nanmean((resid[good] ** 2) * weights.reshape(R, C)[None]))
            rrms = float(np.sqrt(np.nanmean(np.nanmean(resid[good], axis=0)[aperture] ** 2))
                         / max(tflux * target_img.max(), 1e-12))
        self.details["linpsf"] = {"model": model_name, "n_sources": int(nfit),
                                  "n_subtracted": int(rest.size), "moving": bool(moving),
                                  "chi2": chi2, "residual_rms": rrms}
        if tflux <= 0:
            logger.warning("TIC %d: fitted target flux is not positive", self.starid)
            status = STATUS.WARNING
        self.additional_headers.update({
            "FLFRCSAP": (float(completeness), "fraction of target PRF flux in aperture"),
            "CROWDSAP": (float(crowding), "fraction of aperture model flux from target"),
            "PSF_CONT": (float(1 - crowding) if np.isfinite(crowding) else float("nan"),
                         "PSF contamination in the PRF aperture"),
            "PSF_NSRC": (int(nfit), "PSF stars fitted simultaneously"),
            "PSF_NSUB": (int(rest.size), "PSF faint stars subtracted at catalog flux"),
            "PSF_MODL": (model_name, "PSF shape model used"),
            "PSF_CHI2": (chi2, "PSF mean reduced chi^2 of the stamp fit"),
            "PSF_RRMS": (rrms, "PSF mean residual RMS / target peak in aperture"),
            "PSF_MOVE": (bool(moving), "PSF positions follow the movement kernel"),
        })
        return status

    def save_plots(self, folder=None):
        """The core's plots plus ``residuals.png`` (data, model, residual of the median cadence)."""
        paths = super().save_plots(folder)
        resid = getattr(self, "residuals_cube", None)
        if resid is None:
            return paths
        from pathlib import Path

        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        folder = Path(folder) if folder is not None else self.plot_folder
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            model = np.nanmedian(self.model_cube, axis=0)
            res = np.nanmedian(resid, axis=0)
        fig, axes = plt.subplots(1, 3, figsize=(12, 4))
        for ax, img, title in zip(axes, (model + res, model, res),
                                  ("data (median)", "model", "residual")):
            im = ax.imshow(img, origin="lower", cmap="viridis")
            ax.set_title(title)
            fig.colorbar(im, ax=ax, shrink=0.8)
            if self.final_phot_mask is not None:
                ax.contour(self.final_phot_mask, levels=[0.5], colors="w", linewidths=0.8)
        fig.suptitle(f"TIC {self.starid} linpsf")
        path = folder / "residuals.png"
        tmp = path.with_name(".residuals.png.tmp.png")
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=80)
        plt.close(fig)
        tmp.replace(path)
        return list(paths) + [path]


def _prf_aperture(target, tflux, others, bad, n_levels=40):
    """Aperture maximising completeness + crowding over isophotes of the target PRF.

    Returns (mask, FLFRCSAP, CROWDSAP). ``target`` is the unit-flux PRF image (its stamp sum
    is the fraction of the flux falling in the stamp), ``others`` the model flux of every
    other star.
    """
    levels = np.quantile(target[target > 0], np.linspace(0.0, 0.98, n_levels)) \
        if np.any(target > 0) else [0.0]
    best = (-np.inf, None, np.nan, np.nan)
    for level in levels:
        mask = (target >= level) & (target > 0) & ~bad
        if not mask.any():
            continue
        comp = float(target[mask].sum())
        tot = tflux * comp + float(others[mask].sum())
        crowd = tflux * comp / tot if tot > 0 else 0.0
        score = comp + crowd
        if score > best[0]:
            best = (score, mask, comp, crowd)
    if best[1] is None:
        mask = np.zeros(target.shape, bool)
        mask[np.unravel_index(np.argmax(target), target.shape)] = True
        return mask, float(target[mask].sum()), np.nan
    return best[1], best[2], best[3]
