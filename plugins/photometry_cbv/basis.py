"""Co-trending basis vectors from a CCD's own quiet stars, and the MAP fit to one star.

Pure array functions (no I/O). The method follows SPOC's PDC-MAP (Smith et al. 2012, Stumpe
et al. 2012) and the ensemble idea of TASOC's corrections, in one single-scale band:

1. Every light curve becomes a relative flux ``y = flux / median - 1`` divided by its own
   white-noise level (point-to-point scatter), so that each star counts by its information
   and pure noise has unit variance.
2. Basis stars: candidates whose scatter is not far above the others' (no large intrinsic
   variability), then the ``correlated_fraction`` of them most correlated with the rest (the
   stars systematics dominate), as PDC selects its stars.
3. Robust SVD of that (stars x cadences) matrix: points, and runs of 1 to 8 hours, more
   than ``clip_sigma`` off the rank-k model are replaced by it and the SVD repeated
   (transits, flares and cosmic rays do not become vectors, where they would remove a basis
   star's own transit). A vector is kept only if its singular value stands above the largest
   one of noise by ``significance``: the Marchenko-Pastur edge ``sqrt(S) + sqrt(N)`` of a
   unit-variance S x N matrix, or the stars' own red noise (:func:`red_noise_edge`) if higher;
   a vector that one star dominates, or that rests on few stars (participation ratio), is
   removed with the star holding most of it and the SVD redone (PDC's entropy cleaning).
4. Prior: the least-squares coefficients of every quiet candidate (not only the basis
   stars, the most correlated, whose coefficients are the largest), each with its own
   red-noise-inflated variance; a star's prior is a local regression of them (quadratic in
   CCD position, linear in Tmag and flux fraction) over its nearest stars in position, Tmag
   and flux fraction, each star weighted by ``1 / (tau^2 + its variance)`` with outliers
   clipped, and the intrinsic scatter ``tau^2`` about it (PDC-MAP builds its prior from
   quiet-star coefficients as a function of position and magnitude).
5. MAP fit per star with that Gaussian prior. The likelihood is the least-squares fit with
   each coefficient's variance inflated by how much the residual's own correlated
   variability projects on that vector (its autocovariance seen through the vector): a
   star's own slow signal (rotation, pulsation) counts as correlated noise along the slow
   vectors, so those coefficients lean on the prior (what PDC's variability-weighted prior
   does), while a quiet star is fitted by its own data;
   residual outliers (transits, flares) are clipped from the fit, point by point and as runs
   of 1 to 8 hours (a 1-mmag transit at 2 sigma per cadence stands out at 5 sigma over 3 h).
"""
from dataclasses import dataclass, field

import numpy as np

__all__ = ["white_noise", "normalise", "Basis", "build_basis", "PriorModel", "map_fit",
           "FitResult", "red_noise_factors", "red_noise_edge", "outliers", "clip_windows"]


def white_noise(y):
    """Robust point-to-point noise of a series (its white-noise sigma), NaNs ignored."""
    y = np.asarray(y, dtype=float)
    y = y[np.isfinite(y)]
    if y.size < 3:
        return np.nan
    return float(1.4826 * np.median(np.abs(np.diff(y))) / np.sqrt(2.0))


def normalise(flux, good):
    """(relative flux ``flux/median - 1`` with NaN where not good, its white noise, median)."""
    flux = np.asarray(flux, dtype=float)
    ok = np.asarray(good, dtype=bool) & np.isfinite(flux)
    if np.count_nonzero(ok) < 3:
        return np.full(flux.shape, np.nan), np.nan, np.nan
    med = float(np.median(flux[ok]))
    if not med > 0:
        return np.full(flux.shape, np.nan), np.nan, med
    y = np.where(ok, flux / med - 1.0, np.nan)
    return y, white_noise(y[ok]), med


def _fill(y, x):
    """Linear interpolation in ``x`` over the NaNs of each row of ``y`` (ends held flat)."""
    out = y.copy()
    for row in out:
        bad = ~np.isfinite(row)
        if bad.any() and (~bad).sum() >= 2:
            row[bad] = np.interp(x[bad], x[~bad], row[~bad])
        elif bad.any():
            row[bad] = 0.0
    return out


@dataclass
class Basis:
    """Co-trending basis vectors of one CCD and their provenance.

    Attributes
    ----------
    vectors : (k, N) array
        Unit-norm vectors over the cadences (all cadences, flagged ones too).
    singular_values : (k,) array
    basis_index : (B,) int
        Indices (into the ensemble) of the stars the vectors were built from.
    threshold : float
        Singular value of pure noise the vectors had to exceed.
    """

    vectors: np.ndarray
    singular_values: np.ndarray
    basis_index: np.ndarray
    threshold: float
    notes: list = field(default_factory=list)
    #: the quiet candidates (the scatter cut) the basis stars were chosen from: the prior's
    quiet_index: np.ndarray = None


def _select_quiet(z, max_scatter, fraction, min_stars):
    """Indices of the rows of ``z`` (noise-normalised, gap-filled) that go into the SVD, and
    of the quiet ones (scatter at most ``max_scatter`` times the median) they come from."""
    scatter = np.std(z, axis=1)
    quiet = np.flatnonzero(scatter <= max_scatter * np.median(scatter))
    if quiet.size <= min_stars:
        return quiet, quiet
    sub = z[quiet] - z[quiet].mean(axis=1, keepdims=True)
    sub /= np.linalg.norm(sub, axis=1, keepdims=True) + 1e-300
    corr = np.abs(sub @ sub.T)
    np.fill_diagonal(corr, np.nan)
    score = np.nanmedian(corr, axis=1)
    n_keep = max(min_stars, int(np.ceil(fraction * quiet.size)))
    order = np.lexsort((quiet, -score))          # most correlated first, ties by index
    return np.sort(quiet[order[:n_keep]]), quiet


def _few_carriers(u, dominance, min_carriers, carrier_fraction):
    """(k,) bool: the columns of ``u`` (stars x vectors) that one star dominates (more than
    ``dominance`` of the weight) or few stars carry (participation ratio ``1 / sum(u^4)``
    below ``max(min_carriers, carrier_fraction * stars)``)."""
    weight = u ** 2
    carriers = 1.0 / np.sum(weight ** 2, axis=0)
    return (weight.max(axis=0) > dominance) | \
        (carriers < max(min_carriers, carrier_fraction * u.shape[0]))


def red_noise_edge(resid, trials=3, seed=0, dominance=0.5, min_carriers=5.0,
                   carrier_fraction=0.05):
    """Largest singular value of ``resid`` (stars x cadences) once each star's series is
    circularly shifted by its own random lag (median of ``trials``; fixed seed, so the same
    stars give the same number): each star keeps its own correlated noise, the stars lose
    whatever they share. For white noise it is the Marchenko-Pastur edge.

    Only singular vectors that many stars carry count (``_few_carriers`` with the basis's own
    ``dominance``, ``min_carriers``, ``carrier_fraction``): one star with a strong slow signal
    of its own (a 1 % rotation) is a singular value of its own, about its norm, whatever
    the lags; such a vector is never a basis vector (the carrier test drops it), so it is no
    measure of the noise a common vector must stand above. Counted, it lifted the edge of
    the benchmark's pixel scene from 39 to 66 and dropped three of its four vectors
    (docs/corrections.md, Results).
    """
    rng = np.random.default_rng(seed)
    n = resid.shape[1]
    top = []
    for _ in range(trials):
        lags = rng.integers(0, n, resid.shape[0])
        idx = (np.arange(n)[None, :] + lags[:, None]) % n
        u, s, _ = np.linalg.svd(np.take_along_axis(resid, idx, axis=1), full_matrices=False)
        common = np.flatnonzero(~_few_carriers(u, dominance, min_carriers, carrier_fraction))
        top.append(s[common[0]] if common.size else s[0])
    return float(np.median(top))


def build_basis(y, sigma, good_common, time, max_vectors=8, significance=1.2,
                correlated_fraction=0.5, max_scatter=3.0, clip_sigma=4.0, iterations=5,
                min_stars=10, dominance=0.5, min_carriers=5.0, carrier_fraction=0.05,
                max_removed=20, ids=None):
    """Co-trending basis vectors from candidate light curves (steps 1-3 of the module doc).

    Parameters
    ----------
    y : (S, N) array
        Relative fluxes (``normalise``), NaN at unusable cadences.
    sigma : (S,) array
        White noise of each row.
    good_common : (N,) bool
        Cadences the SVD uses (good for most stars); the vectors are extended to the others
        by projecting the stars' fluxes there.
    time : (N,) array
        For filling gaps of single stars.
    dominance, min_carriers, carrier_fraction, max_removed : float, float, float, int
        A vector must be carried by many stars, not one or a few (variables whose signals
        happen to look alike): no star may hold more than ``dominance`` of its weight, and
        its participation ratio ``1 / sum(u^4)`` (the number of stars it effectively rests on)
        must be at least ``max(min_carriers, carrier_fraction * stars)``. Otherwise the star
        holding most of it is left out and the SVD redone, at most ``max_removed`` times;
        vectors still failing are dropped.
    ids : (S,) array, optional
        Star names for the notes (default: row numbers).

    Returns
    -------
    Basis
        With zero vectors when too few stars or nothing above the noise.
    """
    y = np.asarray(y, dtype=float)
    S, N = y.shape
    notes = []
    usable = np.flatnonzero(np.isfinite(sigma) & (sigma > 0)
                            & (np.mean(np.isfinite(y[:, good_common]), axis=1) > 0.9))
    empty = Basis(np.zeros((0, N)), np.zeros(0), usable, np.nan, notes)
    if usable.size < min_stars or np.count_nonzero(good_common) < 10:
        notes.append(f"{usable.size} usable basis stars (need {min_stars})")
        return empty
    z_all = _fill(y[usable] / sigma[usable, None], time)
    windows = clip_windows(time[good_common], np.ones(np.count_nonzero(good_common), bool))
    every = np.ones(np.count_nonzero(good_common), dtype=bool)
    # each star's own level is not a systematic: centre the rows (the fit has a free offset)
    z_all -= np.mean(z_all[:, good_common], axis=1, keepdims=True)
    rows, quiet = _select_quiet(z_all[:, good_common], max_scatter, correlated_fraction,
                                min_stars)
    quiet_index = usable[quiet]
    for n_removed in range(max_removed + 1):        # PDC's entropy cleaning
        if rows.size < min_stars:
            notes.append(f"{rows.size} quiet basis stars (need {min_stars})")
            return empty
        z = z_all[rows][:, good_common].copy()
        threshold = significance * (np.sqrt(z.shape[0]) + np.sqrt(z.shape[1]))
        k = 0
        for _ in range(iterations):
            u, s, vt = np.linalg.svd(z, full_matrices=False)
            k = int(min(max_vectors, np.count_nonzero(s > threshold)))
            # the outliers are judged against the vectors that many stars carry: a deep
            # transit of one bright star stands above the noise as a vector of its own, and
            # judged against a model holding it, it would never be clipped
            common = np.flatnonzero(~_few_carriers(u[:, :k], dominance, min_carriers,
                                                   carrier_fraction))
            model = (u[:, common] * s[common]) @ vt[common]
            resid = z_all[rows][:, good_common] - model
            # outliers point by point and as runs of hours (a transit of a basis star must
            # not become part of a vector, or it would remove that star's own transit)
            out = np.array([outliers(r, every, clip_sigma, windows) for r in resid])
            new = np.where(out, model, z_all[rows][:, good_common])
            if np.array_equal(new, z):
                break
            z = new
        if k:
            # the stars' own slow signals (rotation, pulsation) are red noise, which lifts
            # singular values above the white-noise edge: the level that noise reaches
            # without any common signal, from the residual with each star shifted in time
            threshold = max(threshold, significance * red_noise_edge(
                z - model, dominance=dominance, min_carriers=min_carriers,
                carrier_fraction=carrier_fraction))
            k = int(np.count_nonzero(s[:k] > threshold))
        if k == 0:
            notes.append("no vector above the noise")
            return Basis(np.zeros((0, N)), np.zeros(0), usable[rows], threshold, notes)
        weight = u[:, :k] ** 2
        carriers = 1.0 / np.sum(weight ** 2, axis=0)
        few = _few_carriers(u[:, :k], dominance, min_carriers, carrier_fraction)
        if not few.any() or n_removed == max_removed:
            break
        j = int(np.flatnonzero(few)[0])
        worst = int(np.argmax(weight[:, j]))
        who = usable[rows][worst]
        notes.append(f"TIC {ids[who] if ids is not None else who} carried vector {j + 1} "
                     f"({carriers[j]:.1f} stars): left out")
        rows = np.delete(rows, worst)
    keep = np.flatnonzero(~few)
    if keep.size == 0:
        notes.append("no vector common to the stars")
        return Basis(np.zeros((0, N)), np.zeros(0), usable[rows], threshold, notes)
    k = keep.size
    # extend to every cadence: project the (clipped) fluxes of the basis stars
    z_full = z_all[rows].copy()
    z_full[:, good_common] = z
    vectors = u[:, keep].T @ z_full
    vectors /= np.linalg.norm(vectors[:, good_common], axis=1, keepdims=True)
    # a fixed sign (largest |value| positive) so the same stars give the same file
    flip = np.sign(vectors[np.arange(k), np.argmax(np.abs(vectors[:, good_common]), axis=1)])
    vectors *= np.where(flip == 0, 1.0, flip)[:, None]
    return Basis(vectors, s[keep], usable[rows], float(threshold), notes, quiet_index)


@dataclass
class PriorModel:
    """The prior stars' coefficients, for a Gaussian prior at any CCD position and Tmag.

    Attributes
    ----------
    rows, columns, tmag : (B,) arrays
        CCD positions and magnitudes of the stars with coefficients.
    coeffs : (B, k) array
        Their least-squares coefficients on the vectors (relative-flux units).
    starid : (B,) array
        To leave a star's own coefficients out of its prior.
    n_neighbours : int
        Nearest stars whose coefficients make a prior.
    quadratic_min_stars : float
        Effective number of weighted stars (``(sum w)^2 / sum w^2``) below which the
        regression drops its quadratic position terms.
    mag_px : float
        Pixels that one magnitude counts as in the neighbour distance: a systematic's
        coefficient depends on the aperture (so on Tmag) as much as on the place on the CCD.
    coeff_var : (B, k) array or None
        Each star's own (red-noise-inflated) coefficient variance; None: the stars are
        weighted alike and their scatter is the prior's (the SVD's basis stars).
    ff_px : float
        Pixels that one unit of flux fraction counts as in the neighbour distance (0: not
        used): a focus coefficient follows how much of the star the aperture holds.
    iterations, clip : int, float
        Passes of the weighted regression (``tau^2`` re-estimated) and the outlier limit.
    """

    rows: np.ndarray
    columns: np.ndarray
    tmag: np.ndarray
    coeffs: np.ndarray
    starid: np.ndarray
    n_neighbours: int = 30
    mag_px: float = 500.0
    flux_fraction: np.ndarray = None
    quadratic_min_stars: float = 20.0
    coeff_var: np.ndarray = None
    ff_px: float = 0.0
    iterations: int = 3
    clip: float = 4.0

    def prior(self, row, column, tmag, starid=None, flux_fraction=np.nan):
        """(mean (k,), variance (k,)) of the coefficients at (row, column, tmag).

        A local regression of the coefficients, quadratic in CCD row and column (a focus or
        velocity-aberration pattern grows with the distance from the boresight, a pointing
        drift changes sign across the CCD), linear in Tmag and, where the stars have one, in
        the aperture's flux fraction FLFRCSAP (a focus change costs an aperture holding less
        of the star's light more), with Gaussian weights in the distance
        ``sqrt(drow^2 + dcol^2 + (mag_px dTmag)^2 + (ff_px dFLFRCSAP)^2)`` whose scale is that
        of the ``n_neighbours``-th nearest star, the star itself left out. The quadratic terms need
        ``quadratic_min_stars`` effective stars (else linear): with a local linear
        regression the prior of the largest (focus-like) vector was off by 2.6x the stars'
        own scatter (scale-3 synthetic ensemble), and so were the 5-10 d signals it protects.

        With ``coeff_var`` (each star's own, red-noise-inflated coefficient variance) every
        star also counts by ``1 / (tau^2 + var)``, ``tau^2`` the stars' intrinsic scatter
        about the regression (robust, iterated), and a star more than ``clip`` sigma off it
        is left out: a variable's slow coefficients, or a crowded star's neighbour's signal,
        then hardly move the prior, so the prior can rest on all quiet stars rather than on
        the most correlated ones, whose coefficients are the largest (biased; docs). The
        variance is ``tau^2`` (the scatter without coefficient noise) plus the error of the
        regression's value here, so a prior from few or discordant stars is wide.
        """
        keep = self.starid != starid if starid is not None else np.ones(len(self.starid), bool)
        dr, dc = self.rows[keep] - row, self.columns[keep] - column
        dm = (self.tmag[keep] - tmag) * self.mag_px if np.isfinite(tmag) else \
            np.zeros(dr.size)
        d2 = dr ** 2 + dc ** 2 + dm ** 2
        ff = None if self.flux_fraction is None else self.flux_fraction[keep]
        if self.ff_px and ff is not None and np.isfinite(flux_fraction) \
                and np.all(np.isfinite(ff)):
            d2 = d2 + ((ff - flux_fraction) * self.ff_px) ** 2
        c = self.coeffs[keep]
        k = self.coeffs.shape[1]
        n = min(self.n_neighbours, d2.size)
        if n < 6:
            return np.zeros(k), np.full(k, np.inf)
        scale2 = max(np.partition(d2, n - 1)[n - 1], 1.0)
        w = np.exp(-0.5 * d2 / scale2)
        u, v = dr / np.sqrt(scale2), dc / np.sqrt(scale2)
        cols = [np.ones_like(dr), u, v, dm / np.sqrt(scale2)]
        if w.sum() ** 2 / np.sum(w ** 2) >= self.quadratic_min_stars:
            cols += [u ** 2, v ** 2, u * v]
        if ff is not None and np.isfinite(flux_fraction) and np.all(np.isfinite(ff)) \
                and np.std(ff) > 0:
            cols.append((ff - flux_fraction) / np.std(ff))
        x = np.column_stack(cols)
        if self.coeff_var is None:
            return _local_regression(x, c, w, np.zeros_like(c), 0, np.inf)
        return _local_regression(x, c, w, self.coeff_var[keep], self.iterations, self.clip)


def _local_regression(x, c, w, var, iterations, clip):
    """Intercepts (k,) and their prior variances of the weighted regressions of each column
    of ``c`` on ``x`` (:meth:`PriorModel.prior`): geometric weights ``w`` times
    ``1 / (tau^2 + var)``, ``tau^2`` re-estimated ``iterations`` times (robustly: MAD of the
    residuals less the median own variance), points beyond ``clip`` sigma left out.
    ``iterations = 0``: one unweighted pass, ``tau^2`` the weighted scatter (basis stars).
    The variance is ``tau^2`` (times ``n_eff / (n_eff - p)``) plus the intercept's error."""
    k = c.shape[1]
    mean, out = np.zeros(k), np.full(k, np.inf)
    p = x.shape[1]
    for j in range(k):
        use = np.ones(w.size, bool)
        tau2 = None
        for _ in range(iterations + 1):
            if tau2 is None:
                wj = w * use
            else:
                wj = w * use / np.maximum(tau2 + var[:, j], 1e-30)
            xtw = x.T * wj
            try:
                inv = np.linalg.inv(xtw @ x)
            except np.linalg.LinAlgError:
                return np.zeros(k), np.full(k, np.inf)
            beta = inv @ (xtw @ c[:, j])
            resid = c[:, j] - x @ beta
            # the intrinsic scatter, robustly (a crowded star's neighbour or a cropped
            # aperture is a different star, not scatter): MAD of the local stars' residuals
            # less their typical own variance
            wu = w * use
            n_eff = wu.sum() ** 2 / np.sum(wu ** 2)
            if iterations:
                local = use & (w > 0.05 * w.max())
                mad2 = (1.4826 * np.median(np.abs(resid[local]))) ** 2
                tau2 = max(mad2 - float(np.median(var[local, j])), 0.01 * mad2, 1e-30)
            else:          # the basis stars alone, unweighted: their scatter about it
                tau2 = float(w @ resid ** 2 / w.sum())
            tau2 *= n_eff / max(n_eff - p, 1.0)
            new = use & (np.abs(resid) <= clip * np.sqrt(tau2 + var[:, j]))
            if np.count_nonzero(w * new > 1e-3 * w.max()) < p + 2:
                new = use
            use = new
        # error of the intercept: (X^T W X)^-1 X^T W S W X (X^T W X)^-1, S = tau^2 + var
        s = tau2 + var[:, j]
        h = inv @ ((xtw * wj * s) @ x) @ inv
        mean[j], out[j] = beta[0], tau2 + h[0, 0]
    return mean, out


@dataclass
class FitResult:
    """MAP fit of one star: coefficients, their covariance and diagnostics."""

    coeffs: np.ndarray
    cov: np.ndarray
    systematic: np.ndarray       # (N,) relative flux removed
    residual_sigma: float        # scatter of the fit residual (relative), the likelihood noise
    prior_weight: float          # mean over vectors of prior precision / posterior precision
    prior_goodness: float        # exp(-max(0, chi2/k - 1)/2) of the coefficients against the prior
    n_clipped: int
    red_noise: float             # largest red-noise factor beta_k^2 of the least-squares fit


def red_noise_factors(design, resid, use, max_lag=0.5):
    """(K,) beta_k^2 >= 1: the variance of the residual's projection on each regressor over
    what white noise of the residual's variance would give.

    ``v^T C v`` with ``C`` the residual's autocovariance (the biased estimate, with a Bartlett
    window out to ``max_lag`` of the series): a slow residual (a star's 10-d rotation)
    projects on a slow vector as much as its amplitude allows, so the least-squares
    coefficient of that vector is that uncertain; a white residual, or a fast one against a
    slow vector, leaves beta^2 near 1 (values below 1 are noise and are raised to 1).
    """
    r = np.where(use, resid - np.mean(resid[use]), 0.0)
    n = r.size
    m = 1 << int(np.ceil(np.log2(2 * n)))
    var = np.sum(r ** 2) / max(np.count_nonzero(use), 1)
    if not var > 0:
        return np.ones(design.shape[0])
    acov = np.fft.irfft(np.abs(np.fft.rfft(r, m)) ** 2, m)[:n] / np.count_nonzero(use)
    lags = np.arange(n)
    window = np.clip(1.0 - lags / (max_lag * n), 0.0, None)
    out = np.ones(design.shape[0])
    for k, v in enumerate(design):
        v = np.where(use, v, 0.0)
        auto = np.fft.irfft(np.abs(np.fft.rfft(v, m)) ** 2, m)[:n]      # sum v(t) v(t+lag)
        proj = auto[0] * acov[0] + 2.0 * np.sum((window * acov * auto)[1:])
        out[k] = max(1.0, proj / (var * auto[0])) if auto[0] > 0 else 1.0
    return out


def clip_windows(time, use, hours=(0.0, 1.0, 2.0, 4.0, 8.0)):
    """Run lengths (cadences) of :func:`outliers`: one cadence and 1 to 8 hours."""
    if time is None or np.count_nonzero(use) < 2:
        return (1,)
    step = np.median(np.diff(np.asarray(time)[use])) * 24.0
    return tuple(sorted({max(1, int(round(h / step))) for h in hours}))


def outliers(resid, use, clip_sigma, windows=(1,)):
    """(N,) bool: cadences inside a run of ``w`` consecutive used cadences (for each ``w`` in
    ``windows``) whose mean residual is more than ``clip_sigma`` robust sigma (of such means)
    from zero. One cadence finds cosmic rays; a few hours of them find a transit or a flare
    too shallow to stand out point by point."""
    idx = np.flatnonzero(use)
    r = resid[idx] - np.median(resid[idx])
    out = np.zeros(resid.size, dtype=bool)
    for w in windows:
        if w > idx.size // 4:
            continue
        c = np.cumsum(np.insert(r, 0, 0.0))
        means = (c[w:] - c[:-w]) / w
        sig = 1.4826 * np.median(np.abs(means - np.median(means)))
        if not sig > 0:
            continue
        for start in np.flatnonzero(np.abs(means) > clip_sigma * sig):
            out[idx[start:start + w]] = True
    return out


def map_fit(y, vectors, good, prior_mean=None, prior_var=None, time=None, clip_sigma=4.0,
            iterations=5):
    """Maximum a posteriori coefficients of ``vectors`` for one relative light curve ``y``.

    ``prior_var`` None (or infinite) gives least squares. Outliers (transits, flares, cosmic
    rays) are clipped where the least-squares residual, or its running mean over 1 to 8 hours
    (with ``time``), is beyond ``clip_sigma`` robust sigma (:func:`outliers`); the
    least-squares coefficients then carry that residual's scatter, each inflated by how much
    the residual's own correlated variability projects on its vector
    (:func:`red_noise_factors`): a star whose own signal is slow (a 10-d rotation) cannot
    tell it from a slow vector, so that coefficient leans on the prior, while white noise and
    clipped transits leave the fit to the data (step 5 of the module docstring).
    """
    vectors = np.asarray(vectors, dtype=float)
    k, N = vectors.shape
    y = np.asarray(y, dtype=float)
    use = np.asarray(good, dtype=bool) & np.isfinite(y)
    if k == 0 or np.count_nonzero(use) <= k + 2:
        return FitResult(np.zeros(k), np.zeros((k, k)), np.zeros(N), np.nan, np.nan, np.nan,
                         0, np.nan)
    # a free offset beside the vectors: the median normalisation leaves each star a level
    # that the vectors must not absorb
    design = np.vstack([vectors, np.full(N, 1.0 / np.sqrt(N))])
    windows = clip_windows(time, use)
    fit = use.copy()
    for _ in range(iterations):
        a = design[:, fit]
        c_ls = np.linalg.solve(a @ a.T, a @ y[fit])
        resid = y - c_ls @ design
        # every usable cadence is judged against the fit without the ones clipped so far:
        # judged among the fitted cadences only, a clipped transit is no outlier there, comes
        # back at the next pass and is clipped again, and the fit that counts alternates
        # between the two (the coefficients then carried the transit: a 1-mmag transit next
        # to a momentum dump lost 4 % of its depth to the jump of the pointing vector)
        new_fit = use & ~outliers(resid, use, clip_sigma, windows)
        if np.count_nonzero(new_fit) <= k + 3 or np.array_equal(new_fit, fit):
            break
        fit = new_fit
    a = design[:, fit]                       # the estimate of the final mask, converged or not
    c_ls = np.linalg.solve(a @ a.T, a @ y[fit])
    resid = y - c_ls @ design
    # least-squares estimate and its covariance, each regressor's variance inflated by the
    # residual's correlated variability along it (red_noise_factors)
    sig2 = float(np.var(resid[fit]))
    beta2 = red_noise_factors(design, resid, fit)
    beta2[-1] = 1.0                                            # the free offset
    a = design[:, fit]
    half = np.sqrt(beta2)
    ls_cov = sig2 * half[:, None] * np.linalg.inv(a @ a.T) * half[None, :]
    ls_prec = np.linalg.inv(ls_cov)
    if prior_mean is None:
        prior_mean, prior_var = np.zeros(k), np.full(k, np.inf)
    prior_var = np.asarray(prior_var, dtype=float)
    finite = np.isfinite(prior_var)
    prior_prec = np.where(finite, 1.0 / np.maximum(np.where(finite, prior_var, 1.0), 1e-30),
                          0.0)
    mean = np.where(finite, prior_mean, 0.0)
    lam = np.diag(np.append(prior_prec, 0.0))
    full_cov = np.linalg.inv(ls_prec + lam)
    full = full_cov @ (ls_prec @ c_ls + lam @ np.append(mean, 0.0))
    coeffs, cov = full[:k], full_cov[:k, :k]
    post = 1.0 / np.diag(cov)
    weight = float(np.mean(prior_prec / post))
    if np.any(finite):
        chi2 = np.sum((coeffs[finite] - prior_mean[finite]) ** 2 * prior_prec[finite])
        goodness = float(np.exp(-0.5 * max(0.0, chi2 / np.count_nonzero(finite) - 1.0)))
    else:
        goodness = np.nan
    sigma = float(np.sqrt(np.var((y - full @ design)[fit])))
    return FitResult(coeffs, cov, coeffs @ vectors, sigma, weight, goodness,
                     int(np.count_nonzero(use & ~fit)), float(np.max(beta2[:k])))
