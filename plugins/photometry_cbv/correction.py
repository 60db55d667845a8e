"""CBVCorrection: the light-curve correction "cbv" (PDCSAP_FLUX from co-trending vectors).

Settings: the ``[cbv]`` section (settings/defaults.toml); method: :mod:`photometry_cbv.basis`;
documentation: ``docs/corrections.md``.
"""
import logging

import numpy as np
from astropy.io import fits

from photometry import STATUS, Corrected, LightCurveCorrection

from .basis import PriorModel, build_basis, map_fit, normalise, white_noise
from .spoc import cbv_hdulist, cbv_input, read_cbvs, vectors_on

__all__ = ["CBVCorrection"]

logger = logging.getLogger(__name__)

#: PDCMETHD values
OWN, SPOC, NONE = "cbvMAP", "spocCBV", "none"
#: prior chi^2 per vector (``1 - 2 ln PR_GOOD1``) beyond which the prior is widened by it
PRIOR_MISMATCH = 4.0
#: header keywords of a fit (SPOC's names where SPOC has one), in the order written
_METRICS = (("PDC_NBAS", "stars of the prior"),
            ("PDC_TOT", "PDC total goodness metric for target"),
            ("PDC_NOI", "PDC noise goodness (1 = no noise added)"),
            ("PR_GOOD1", "Prior goodness (fit agrees with prior)"),
            ("PR_WGHT1", "Prior weight (0 = least squares)"),
            ("PDCVAR", "Target variability (residual / white noise)"),
            ("PDC_NCLP", "cadences clipped from the fit"))


class CBVCorrection(LightCurveCorrection):
    """Co-trending with the CCD's own basis vectors (or SPOC's CBVs), MAP fit per star."""

    name = "cbv"
    version = "1.0"

    def __init__(self, settings):
        super().__init__(settings)
        self.cfg = settings["cbv"]
        self.notes = []
        self.vectors = np.zeros((0, 0))
        self.prior_model = None
        self.kind = NONE
        self.axis = None
        self._ensemble = None
        self._basis = None

    # ------------------------------------------------------------------ CCD level
    def candidates(self, stars):
        """Basis candidates: photometry STATUS OK, Tmag in [tmag_min, tmag_max], contamination
        at most ``max_contamination``, the ``max_basis_stars`` brightest (ties by TIC).

        A WARNING light curve (an aperture that lost flux, noise far above the photon limit)
        may hold an artefact of its own that, shared by a few such stars, would become a
        vector or bend the prior of its neighbours; it is still corrected. A table without a
        ``status`` column counts as all OK.
        """
        cfg = self.cfg
        tmag = np.asarray(stars["tmag"], dtype=float)
        cont = np.asarray(stars["contamination"], dtype=float)
        ok = (tmag >= cfg["tmag_min"]) & (tmag <= cfg["tmag_max"])
        ok &= ~(cont > cfg["max_contamination"])
        if "status" in stars.colnames:
            ok &= np.asarray(stars["status"]) == int(STATUS.OK)
        idx = np.flatnonzero(ok)
        order = np.lexsort((np.asarray(stars["starid"])[idx], tmag[idx]))
        keep = np.zeros(len(stars), dtype=bool)
        keep[idx[order[:int(cfg["max_basis_stars"])]]] = True
        return keep

    def fit(self, ensemble):
        cfg = self.cfg
        self._ensemble = ensemble
        self.axis = ensemble.cadenceno
        n_star, n = ensemble.flux.shape
        y = np.full((n_star, n), np.nan)
        sigma = np.full(n_star, np.nan)
        for i in range(n_star):
            y[i], sigma[i], _ = normalise(ensemble.flux[i], ensemble.good[i])
        common = (np.mean(ensemble.good, axis=0) >= 0.9) if n_star else np.zeros(n, bool)
        spoc = self._spoc_vectors(ensemble)
        if spoc is not None:
            self.vectors, self.kind = spoc, SPOC
            basis_index = np.flatnonzero(np.isfinite(sigma) & (sigma > 0))
        else:
            basis = build_basis(
                y, sigma, common, ensemble.time, max_vectors=int(cfg["max_vectors"]),
                significance=float(cfg["significance"]),
                correlated_fraction=float(cfg["correlated_fraction"]),
                max_scatter=float(cfg["max_scatter"]), clip_sigma=float(cfg["clip_sigma"]),
                min_stars=int(cfg["min_stars"]), ids=ensemble.starid)
            self.notes.extend(basis.notes)
            self._basis = basis
            self.vectors, basis_index = basis.vectors, basis.basis_index
            self.kind = OWN if basis.vectors.shape[0] else NONE
        k = self.vectors.shape[0]
        if k == 0:
            return
        prior_index = basis_index
        if cfg["prior_stars"] == "quiet" and self._basis is not None:
            # every quiet candidate, not only the SVD's most correlated half: those hold
            # the largest coefficients for their noise, and a prior from them alone
            # overstated the other stars' (docs/corrections.md, Prior)
            prior_index = self._basis.quiet_index
        fits_ = [map_fit(y[i], self.vectors, ensemble.good[i], time=ensemble.time,
                         clip_sigma=float(cfg["clip_sigma"])) for i in prior_index]
        coeffs = np.array([f.coeffs for f in fits_]).reshape(-1, k)
        coeff_var = np.array([np.diag(f.cov) for f in fits_]).reshape(-1, k)
        ok = np.all(np.isfinite(coeffs), axis=1) & np.all(np.isfinite(coeff_var), axis=1)
        idx = prior_index[ok]
        weighted = cfg["prior_stars"] != "basis"
        self.prior_model = PriorModel(ensemble.row[idx], ensemble.column[idx],
                                      ensemble.tmag[idx], coeffs[ok], ensemble.starid[idx],
                                      int(cfg["prior_neighbours"]), float(cfg["prior_mag_px"]),
                                      ensemble.flux_fraction[idx],
                                      coeff_var=coeff_var[ok] if weighted else None,
                                      ff_px=float(cfg["prior_ff_px"]))
        self.n_basis = int(ok.sum())

    def inputs(self, key):
        """SPOC's CBV file of this CCD, if ``spoc_cbv_dir`` is set (the core reads it)."""
        folder = self.cfg["spoc_cbv_dir"]
        return {"spoc_cbv": cbv_input(folder, *key[:3])} if folder else {}

    def _spoc_vectors(self, ensemble):
        """SPOC's single-scale CBVs on our cadences if ``spoc_cbv_dir`` holds this CCD's."""
        folder = self.cfg["spoc_cbv_dir"]
        if not folder:
            return None
        cbv = ensemble.inputs.get("spoc_cbv")
        if cbv is None:
            note = (f"no SPOC CBV file for s{ensemble.sector:04d}-{ensemble.camera}-"
                    f"{ensemble.ccd} in {folder}: own vectors used")
            logger.warning(note)
            self.notes.append(note)
            return None
        t, _, gap, vectors = read_cbvs(cbv, ensemble.sector, ensemble.camera, ensemble.ccd)
        vectors = vectors[:int(self.cfg["spoc_cbv_vectors"])]
        self.notes.append(f"SPOC CBVs from {cbv.path.name}")
        return vectors_on(ensemble.time, ensemble.cadence, t, gap, vectors)

    @staticmethod
    def _product_name(sector, camera, ccd, cadence, method):
        return f"tessphot-s{sector:04d}-{camera}-{ccd}-c{cadence:04d}-{method}_cbv.fits"

    def products(self):
        """The vectors on our cadences in SPOC's CBV format, with the prior's basis-star
        coefficients in a PRIOR extension (so :meth:`restore` can correct one more star)."""
        ens = self._ensemble
        if self.prior_model is None or ens is None:
            return {}
        name = self._product_name(ens.sector, ens.camera, ens.ccd, ens.cadence, ens.method)
        gap = np.mean(ens.good, axis=0) < 0.9
        meta = [("CBVMETH", self.kind, "tessphot PDCMETHD of these vectors"),
                ("NBASIS", self.n_basis, "stars of the prior")]
        if self._basis is not None:
            meta.append(("SVTHRESH", float(self._basis.threshold),
                         "singular value of pure noise"))
        hdul = cbv_hdulist(self.vectors, ens.time, ens.cadenceno, gap, ens.sector,
                           ens.camera, ens.ccd, meta)
        pm = self.prior_model
        prior = fits.BinTableHDU.from_columns(
            [fits.Column("STARID", "K", array=pm.starid),
             fits.Column("ROW", "D", array=pm.rows), fits.Column("COLUMN", "D", array=pm.columns),
             fits.Column("TMAG", "D", array=pm.tmag),
             fits.Column("FLFRCSAP", "D", array=pm.flux_fraction),
             fits.Column("COEFF", f"{pm.coeffs.shape[1]}D", array=pm.coeffs)]
            + ([] if pm.coeff_var is None else
               [fits.Column("COEFFVAR", f"{pm.coeffs.shape[1]}D", array=pm.coeff_var)]),
            name="PRIOR")
        prior.header["NNEIGHB"] = (pm.n_neighbours, "neighbours of a prior")
        prior.header["MAGPX"] = (pm.mag_px, "pixels per magnitude in the prior distance")
        prior.header["FFPX"] = (pm.ff_px, "pixels per unit FLFRCSAP in the prior distance")
        hdul.append(prior)
        return {name: hdul}

    def restore(self, products, key):
        """Take the state of an earlier :meth:`fit` of this CCD and method from its product
        file (``products.get(name)``, read by the core); False if there is none (or it does
        not match)."""
        sector, camera, ccd, cadence, method = key
        product = products.get(self._product_name(sector, camera, ccd, cadence, method))
        if product is None:
            return False
        t, cadenceno, gap, vectors = read_cbvs(product, sector, camera, ccd)
        if "PRIOR" not in product:
            return False
        d, head = product.table("PRIOR"), product.headers["PRIOR"]
        n = len(d["STARID"])
        # COEFFVAR: the stars are weighted (prior_stars = "quiet"); without it, the basis stars
        coeff_var = (np.array(d["COEFFVAR"], float).reshape(n, -1)
                     if "COEFFVAR" in d else None)
        self.prior_model = PriorModel(np.array(d["ROW"], float), np.array(d["COLUMN"], float),
                                      np.array(d["TMAG"], float),
                                      np.array(d["COEFF"], float).reshape(n, -1),
                                      np.array(d["STARID"], np.int64),
                                      int(head["NNEIGHB"]), float(head["MAGPX"]),
                                      np.array(d["FLFRCSAP"], float), coeff_var=coeff_var,
                                      ff_px=float(head.get("FFPX", 0.0)))
        self.kind = str(product.header.get("CBVMETH", OWN))
        self.vectors = vectors
        self.n_basis = len(self.prior_model.starid)
        self.axis = cadenceno
        self.notes.append(f"vectors and prior from {product.path.name}")
        return True

    # ------------------------------------------------------------------ one star
    def _vectors_on(self, cadenceno):
        """The vectors on a star's cadence axis (NaN where they have no value)."""
        if self.axis is None or np.array_equal(self.axis, cadenceno):
            return self.vectors
        idx = np.clip(np.searchsorted(self.axis, cadenceno), 0, len(self.axis) - 1)
        ok = self.axis[idx] == cadenceno
        return np.where(ok[None], self.vectors[:, idx], np.nan)

    @staticmethod
    def _apply(star, vectors, good, med, fit):
        """(PDCSAP flux, its error, noise goodness PDC_NOI) of one fit."""
        systematic = np.where(np.all(np.isfinite(vectors), axis=0), fit.systematic, np.nan)
        # divided out, not subtracted: pointing, focus and velocity aberration change the
        # fraction of the star's light in its aperture, so they scale its transits and its
        # variability too (subtracted, a transit during a 1 % systematic kept 0.99 of its depth)
        gain = 1.0 + systematic
        flux = star.flux / gain
        fit_rel = np.sqrt(np.einsum("kn,kl,ln->n", vectors, fit.cov, vectors))
        err = np.hypot(np.asarray(star.flux_err, float), np.abs(flux) * fit_rel) / gain
        good = good & np.isfinite(flux)
        noise_sap = white_noise(star.flux[good] / med)
        noise_pdc = white_noise(flux[good] / med)
        g_noise = float(min(1.0, noise_sap / noise_pdc)) if noise_pdc > 0 else np.nan
        return flux, err, g_noise

    def correct(self, star):
        cfg = self.cfg
        k = self.vectors.shape[0]
        vectors = self._vectors_on(star.cadenceno) if k else self.vectors
        good = star.good & np.all(np.isfinite(vectors), axis=0) if k else star.good
        y, sig_white, med = normalise(star.flux, good)
        if k == 0 or self.prior_model is None or not np.isfinite(sig_white):
            reason = self.notes[-1] if self.notes else "no vectors"
            if k and not np.isfinite(sig_white):
                reason = "too few good cadences"
            return Corrected(star.flux, star.flux_err, NONE,
                             [("PDC_NOTE", reason[:48].strip(), "why no correction"),
                              ("PDC_NCBV", 0, "co-trending vectors fitted"),
                              *[(key, None, comment) for key, comment in _METRICS]])
        mean, var = self.prior_model.prior(star.row, star.column, star.tmag, star.starid,
                                           star.flux_fraction)
        fit = map_fit(y, np.nan_to_num(vectors), good, mean, var, time=star.time,
                      clip_sigma=float(cfg["clip_sigma"]))
        flux, err, g_noise = self._apply(star, vectors, good, med, fit)
        g_prior = fit.prior_goodness          # against the neighbours' prior as it is
        chi2 = 1.0 - 2.0 * np.log(max(fit.prior_goodness, 1e-300))   # per vector
        if chi2 > PRIOR_MISMATCH:
            # the star's own data and its neighbours' prior disagree far beyond the prior's
            # width (a 1-pixel or truncated aperture, a blend: a response unlike the quiet
            # stars'): the prior is widened by that factor (Birge ratio) and the fit redone,
            # kept unless it fails the noise rule below where the first did not; PR_GOOD1
            # stays the first fit's, so the header still says that fit and prior disagree
            wide = map_fit(y, np.nan_to_num(vectors), good, mean, var * chi2, time=star.time,
                           clip_sigma=float(cfg["clip_sigma"]))
            other = self._apply(star, vectors, good, med, wide)
            limit = float(cfg["min_noise_goodness"])
            if other[2] >= limit or not g_noise >= limit:
                fit, (flux, err, g_noise) = wide, other
        total = float(np.sqrt(g_noise * g_prior)) if np.isfinite(g_prior) else g_noise
        values = [self.n_basis, total, g_noise, g_prior, fit.prior_weight,
                  float(fit.residual_sigma / sig_white), fit.n_clipped]
        metrics = [(key, value, comment) for (key, comment), value in zip(_METRICS, values)]
        if not g_noise >= float(cfg["min_noise_goodness"]):
            # the vectors' own noise, times this star's coefficients, would swamp the star's
            # noise (a bright star, or one whose own variability drives the fit): a
            # correction that cannot be trusted is not applied, and the header says why
            return Corrected(star.flux, star.flux_err, NONE,
                             [("PDC_NOTE", f"correction adds noise (PDC_NOI {g_noise:.2f})",
                               "why no correction"),
                              ("PDC_NCBV", 0, "co-trending vectors fitted"), *metrics])
        cards = [("PDC_NOTE", "", "why no correction"),
                 ("PDC_NCBV", int(k), "co-trending vectors fitted"), *metrics]
        return Corrected(flux, err, self.kind, cards)
