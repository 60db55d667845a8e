"""Prepare stage ``linpsf_shape``: the CCD's PRF shape fitted to bright isolated stars.

The stage reads the sum image (mean of the good frames, sky included) and, in one pass over
the ingested blocks, the per-pixel variance of that mean and the union of saturated pixels.
Stars come from the catalog SQLite next to the cache when it exists (``tmag_min..tmag_max``,
no neighbour within ``isolation_radius`` px brighter than Tmag + ``isolation_contrast``; the
light of all other catalog stars is subtracted at catalog flux with the current shape, from the
second iteration on), otherwise from the movement kernel stars (already chosen bright,
isolated and unsaturated by prepare). Per star a local sky
level, its flux and (without a catalog) its position are fitted together with the shape:

1. flux from a box sum minus a border median; the shape fitted to ``(pixel - sky) / flux``
   (with ``joint_sky``: to ``pixel / flux`` with every star's sky as a free column of the
   same solve);
2. the model normalised to a unit sum over the pixel lattice;
3. per star ``flux, sky`` (and position) refitted with the model; stars whose reduced chi^2
   is an outlier (unknown neighbour, variability, cosmic) are dropped; back to 1.

Stored in ``models/linpsf_shape``: ``weights`` (G, G, n_coeffs), ``cell_rows``,
``cell_cols`` (CCD coordinates of the cell centres), the star table used, and attrs with the
basis parameters and the quality figures (``flux_captured``, ``residual_rms``,
``chi2_reduced``, ``lattice_spread``, ``n_stars``, ``usable``).
"""
import logging

import numpy as np
from scipy.spatial import cKDTree

from photometry import (cache_catalog, mag2flux, MovementKernel, PixelQualityFlags, PrepareStage,
                        TESSQualityFlags)

from .model import (BlurredBasis, SplinePRF, make_basis, _cached_design, fit_weights,
                    lattice_sum, normalise, release_tables, single_thread_blas)
from .timemodel import cache_binner, fit_shape_time_model

__all__ = ["LinPSFShapeModel", "fit_shape_model", "select_stars", "motion_samples",
           "kernel_motion_samples", "fit_source_shape", "load_shape_model", "shape_quality_problem",
           "add_shape_residual"]

#: quality figures of a shape fit stored as attrs of ``models/linpsf_shape``
_QUALITY_ATTRS = ("n_stars", "flux_captured", "residual_rms", "chi2_reduced", "lattice_spread",
                  "shape_residual", "n_frames")

logger = logging.getLogger(__name__)


def _basis(cfg):
    return make_basis({"basis": cfg.get("basis", "polar"), "rmax": cfg["rmax"],
                       "n_r_knots": cfg["n_r_knots"], "n_phi": cfg["n_phi"],
                       "core_radius": cfg["core_radius"], "n_sub": cfg.get("n_sub", 1),
                       "cart_step": cfg.get("cart_step", 0.5),
                       "cart_core": cfg.get("cart_core", 3.0),
                       "cart_wing_step": cfg.get("cart_wing_step", 1.0)})


def select_stars(rows, cols, tmag, shape, cfg):
    """Indices of catalog stars bright, unsaturated and isolated enough to shape the PRF."""
    rows, cols, tmag = (np.asarray(a, dtype=float) for a in (rows, cols, tmag))
    margin = float(cfg["rmax"]) + 1
    radius = float(cfg["isolation_radius"])
    ok = (tmag >= float(cfg["tmag_min"])) & (tmag <= float(cfg["tmag_max"])) \
        & (rows >= margin) & (rows <= shape[0] - 1 - margin) \
        & (cols >= margin) & (cols <= shape[1] - 1 - margin)
    tree = cKDTree(np.column_stack([rows, cols]))
    contrast = float(cfg["isolation_contrast"])
    keep = []
    for k in np.flatnonzero(ok):
        near = tree.query_ball_point((rows[k], cols[k]), radius)
        if all(j == k or tmag[j] > tmag[k] + contrast for j in near):
            keep.append(k)
    keep = np.asarray(keep, dtype=int)
    keep = keep[np.argsort(tmag[keep], kind="stable")]
    return keep[:int(cfg["max_stars"])]


class _Star:
    """Pixels of one star's box and its current flux, sky and position."""

    def __init__(self, image, variance, row, col, half, fit_sky=True):
        r0, c0 = int(round(row)) - half, int(round(col)) - half
        sl = (slice(r0, r0 + 2 * half + 1), slice(c0, c0 + 2 * half + 1))
        self.data = image[sl]
        self.ivar = np.where(np.isfinite(self.data) & (variance[sl] > 0),
                             1.0 / np.where(variance[sl] > 0, variance[sl], 1.0), 0.0)
        self.data = np.where(self.ivar > 0, self.data, 0.0)
        self.raw = self.data
        self.box = sl
        self.pr, self.pc = np.mgrid[r0:r0 + 2 * half + 1, c0:c0 + 2 * half + 1].astype(float)
        self.row, self.col = float(row), float(col)
        border = np.ones(self.data.shape, dtype=bool)
        border[1:-1, 1:-1] = False
        good = border & (self.ivar > 0)
        self.fit_sky = fit_sky
        self.sky = float(np.median(self.data[good])) if good.any() and fit_sky else 0.0
        self.flux = float(np.sum((self.data - self.sky)[self.ivar > 0]))
        self.chi2 = np.nan

    def offsets(self, drow=0.0, dcol=0.0):
        return self.pr - self.row - drow, self.pc - self.col - dcol


def _offsets(stars):
    """(drow, dcol) of every box pixel of ``stars`` from its star, concatenated."""
    return (np.concatenate([(s.pr - s.row).ravel() for s in stars]),
            np.concatenate([(s.pc - s.col).ravel() for s in stars]))


def _box_design(stars, basis):
    """(stars x box pixels, n_coeffs) design of the stars' boxes (cached while the
    positions stay: the rounds then only change weights, fluxes and skies)."""
    return _cached_design(basis, *_offsets(stars))


def _refit_stars(stars, basis, weights, positions=False):
    """Flux and sky of every star with the current shape (Gauss-Newton on the position too
    if ``positions``): weighted least squares, all stars at once; sets ``chi2``.

    Why batched: per star and per motion sample the model look-ups were ~1900 Python calls
    of the shape fit; with fixed positions the model is the cached box design times the
    weights, and the 2 x 2 (4 x 4) normal equations of all stars are one batched solve.
    """
    S, P = len(stars), stars[0].data.size
    data = np.stack([s.data.ravel() for s in stars])
    ivar = np.stack([s.ivar.ravel() for s in stars])
    fit_sky = stars[0].fit_sky

    def model_values(h_row=0.0, h_col=0.0):
        if not positions:
            return (_box_design(stars, basis) @ weights).reshape(S, P)
        dr, dc = _offsets(stars)
        return basis.evaluate(weights, dr - h_row, dc - h_col).reshape(S, P)

    for _ in range(3 if positions else 1):
        flux = np.array([s.flux for s in stars])[:, None]
        sky = np.array([s.sky for s in stars])[:, None]
        p = model_values()
        cols = [p] + ([np.ones_like(p)] if fit_sky else [])
        if positions:
            h = 0.01
            cols += [flux * (model_values(h, 0) - model_values(-h, 0)) / (2 * h),
                     flux * (model_values(0, h) - model_values(0, -h)) / (2 * h)]
            target = data - (flux * p + sky)
        else:
            target = data
        A = np.stack(cols, axis=2)                                     # (S, P, m)
        Aw = A * ivar[:, :, None]
        sol = np.linalg.solve(np.einsum("spi,spj->sij", Aw, A),
                              np.einsum("spi,sp->si", Aw, target)[..., None])[..., 0]
        for k, s in enumerate(stars):
            b = sol[k, 1] if fit_sky else 0.0
            if positions:
                s.flux += float(sol[k, 0])
                s.sky += float(b)
                s.row += float(np.clip(sol[k, -2], -0.5, 0.5))
                s.col += float(np.clip(sol[k, -1], -0.5, 0.5))
            else:
                s.flux, s.sky = float(sol[k, 0]), float(b)
    flux = np.array([s.flux for s in stars])[:, None]
    sky = np.array([s.sky for s in stars])[:, None]
    model = flux * model_values() + sky
    chi2 = np.sum((data - model) ** 2 * ivar, axis=1)
    for s, c in zip(stars, chi2):
        s.chi2 = float(c / max(np.count_nonzero(s.ivar) - 2, 1))
    return model


def _subtract_neighbours(stars, basis, weights, scene, shape, half):
    """Replace each star's box data by its raw data minus every other star's model."""
    rows = [s.row for s in stars]
    cols = [s.col for s in stars]
    flux = [max(s.flux, 0.0) for s in stars]
    if scene is not None:
        rows = np.concatenate([rows, scene[0]])
        cols = np.concatenate([cols, scene[1]])
        flux = np.concatenate([flux, scene[2]])
    # the scene rendered from one table of the (smeared) model; each star's own light
    # from the same table, so that it cancels exactly
    model = SplinePRF(basis, weights, [0.0], [0.0])
    full = model.evaluate(np.asarray(rows), np.asarray(cols), shape, origin=(0, 0),
                          flux=np.asarray(flux), size=2 * half + 1)
    own = model._lookup((0, 0), *_offsets(stars)).reshape(len(stars), -1)
    for s, f, o in zip(stars, flux, own):
        s.data = np.where(s.ivar > 0, s.raw - (full[s.box] - f * o.reshape(s.raw.shape)), 0.0)


def _fit_pixels(stars, basis, joint_sky=False):
    """(drow, dcol, values, inv_var, design, extra) of the shape stars' pixels for
    :func:`fit_weights` (``design``: the basis there, from the cached box design).

    ``joint_sky``: the values are ``pixel / flux`` and ``extra`` holds one ``1 / flux`` column
    per star, so every star's sky is fitted together with the shape (else ``extra`` is None).
    Why: alternating shape and sky fits converge slowly along the sky-wing degeneracy (a
    broad wing and a lower sky look alike in a box); the joint solve resolves it from the
    data in one step.
    """
    dr, dc = _offsets(stars)
    sky = [0.0 if joint_sky and s.fit_sky else s.sky for s in stars]
    val = np.concatenate([((s.data - b) / s.flux).ravel() for s, b in zip(stars, sky)])
    ivar = np.concatenate([(s.ivar * s.flux ** 2).ravel() for s in stars])
    inside = (np.hypot(dr, dc) < basis.rmax + 0.75) & (ivar > 0)
    design = _box_design(stars, basis)[inside]
    out = (dr[inside], dc[inside], val[inside], ivar[inside], design)
    if not (joint_sky and stars[0].fit_sky):
        return out + (None,)
    owner = np.concatenate([np.full(s.data.size, k) for k, s in enumerate(stars)])[inside]
    extra = np.zeros((owner.size, len(stars)))
    extra[np.arange(owner.size), owner] = 1.0 / np.array([s.flux for s in stars])[owner]
    return out + (extra,)


def _fit_shape(stars, basis, cfg, prior_mu=0.0, prior_sigma=None):
    """Shape weights from the stars (their skies too when ``joint_sky``)."""
    joint = bool(cfg.get("joint_sky", False))
    dr, dc, val, ivar, design, extra = _fit_pixels(stars, basis, joint)
    kw = dict(prior_mu=prior_mu, prior_sigma=float(cfg["prior_sigma"]) if prior_sigma is None
              else prior_sigma, angular_sigma=float(cfg["angular_prior_sigma"]), design=design)
    if extra is None:
        return fit_weights(basis, dr, dc, val, ivar, **kw)
    weights, skies = fit_weights(basis, dr, dc, val, ivar, extra=extra, **kw)
    for s, b in zip(stars, skies):
        s.sky = float(b)
    return weights


#: the bases ``basis = "auto"`` chooses between (docs/linpsf.md "Shape model")
AUTO_BASES = ("polar", "cartesian")


def fit_shape_model(image, variance, rows, cols, cfg, refit_positions=False, bad=None,
                    fit_sky=True, scene=None, shifts=None):
    """Fit the shape model (see :func:`_fit_shape_model`), BLAS on one thread (small solves).

    With ``basis = "auto"`` every basis of :data:`AUTO_BASES` is fitted and the one with the
    lowest BIC (``chi2 + n_coeffs ln n_pixels`` over the used stars' boxes) is kept. Why: no
    single basis was best on every scene (issue 16): the circular polar basis fits the
    round test PRF best in a crowded field (a free 2-D shape there fitted the neighbours'
    light: light curves 1.15 vs 1.06 x ideal, shape chi^2 1.8e5 vs 374), the tensor-product
    (cartesian) basis every non-circular PRF (SPOC PRF: chi^2 1.5e3 vs 3.1e5, light curves
    1.6-1.9 vs 4.7 x ideal). ``basis_bic_<name>`` and ``basis`` record the choice. Stars
    with guessed positions (``refit_positions``) get the polar basis alone.
    """
    with single_thread_blas():
        if str(cfg.get("basis", "polar")) != "auto":
            return _fit_shape_model(image, variance, rows, cols, cfg, refit_positions, bad,
                                    fit_sky, scene, shifts)
        fits = {}
        # guessed positions (kernel stars) are refitted: a free 2-D shape would absorb a
        # shift of every star (its centre is degenerate with theirs), a circular one cannot
        for name in (AUTO_BASES[:1] if refit_positions else AUTO_BASES):
            fits[name] = _fit_shape_model(image, variance, rows, cols, dict(cfg, basis=name),
                                          refit_positions, bad, fit_sky, scene, shifts)
        usable = {k: v for k, v in fits.items() if v["usable"]}
        if not usable:
            return fits[AUTO_BASES[0]]
        bic = {k: v["chi2_total"] + v["basis"].n_coeffs * np.log(max(v["n_pixels"], 2))
               for k, v in usable.items()}
        best = min(bic, key=bic.get)
        res = usable[best]
        res["basis_bic"] = bic
        logger.info("linpsf_shape: basis %s (BIC %s)", best,
                    ", ".join(f"{k} {v:.4g}" for k, v in bic.items()))
        return res


def _fit_shape_model(image, variance, rows, cols, cfg, refit_positions=False, bad=None,
                     fit_sky=True, scene=None, shifts=None):
    """Fit the shape model to stars at ``rows, cols`` (cube pixel indices) of ``image``.

    Parameters
    ----------
    image, variance : ndarray (R, C)
        The sum image (sky included) and the variance of each of its pixels.
    rows, cols : array_like
        Star positions; stars whose box holds a ``bad`` pixel are not used.
    cfg : dict
        The ``[linpsf]`` settings.
    refit_positions : bool
        Fit each star's position too (when the positions are guesses, not catalog values).
    fit_sky : bool
        Fit a local sky level per star (False for an already background-subtracted image).
    scene : tuple of arrays, optional
        ``(rows, cols, fluxes)`` of the other catalog stars: from the second iteration on,
        their light (at catalog flux, current shape) and that of the other shape stars is
        subtracted from each shape star's box, so stars need only be isolated from
        comparably bright neighbours (``isolation_radius`` / ``isolation_contrast``).
    shifts : ndarray (K, 2), optional
        (drow, dcol) samples of the motion over the frames averaged into ``image``: the fit
        then models the smeared image with the unsmeared PRF (:class:`BlurredBasis`).

    Returns
    -------
    dict
        ``weights`` (G, G, n_coeffs), ``cell_rows``, ``cell_cols`` (cube pixels), ``basis``,
        ``stars`` (structured rows: row, col, flux, sky, chi2, used) and the quality figures.
    """
    raw_basis = _basis(cfg)
    basis = raw_basis if shifts is None or len(shifts) == 0 else \
        BlurredBasis(raw_basis, shifts)
    half = int(np.ceil(basis.rmax)) + 1
    image = np.asarray(image, dtype=float)
    variance = np.asarray(variance, dtype=float)
    bad = np.zeros(image.shape, bool) if bad is None else np.asarray(bad, bool)
    bad = bad | ~np.isfinite(image)
    stars = []
    for r, c in zip(np.atleast_1d(rows), np.atleast_1d(cols)):
        ir, ic = int(round(r)), int(round(c))
        if ir - half < 0 or ic - half < 0 or ir + half >= image.shape[0] \
                or ic + half >= image.shape[1]:
            continue
        if bad[ir - half:ir + half + 1, ic - half:ic + half + 1].any():
            continue
        star = _Star(image, variance, r, c, half, fit_sky)
        if star.flux > 0:
            stars.append(star)
    result = {"basis": raw_basis, "n_candidates": len(stars), "usable": False}
    if len(stars) < int(cfg["min_stars"]):
        logger.warning("linpsf_shape: only %d usable stars (need %d); no shape model",
                       len(stars), int(cfg["min_stars"]))
        return result
    used = np.ones(len(stars), dtype=bool)
    weights = None
    for iteration in range(int(cfg["iterations"])):
        if iteration > 0:
            _subtract_neighbours(stars, basis, weights, scene, image.shape, half)
            release_tables(weights)          # replaced by this round's shape
        sel = [s for s, u in zip(stars, used) if u]
        weights = _fit_shape(sel, basis, cfg)
        weights = normalise(basis, weights)
        _refit_stars(stars, basis, weights, refit_positions and iteration > 0)
        chi2 = np.array([s.chi2 for s in stars])
        med = np.median(chi2[used])
        mad = 1.4826 * np.median(np.abs(chi2[used] - med))
        used = (chi2 < med + float(cfg["clip_sigma"]) * max(mad, 0.05 * med)) & \
            np.array([s.flux > 0 for s in stars])
        if np.count_nonzero(used) < int(cfg["min_stars"]):
            used[:] = True
    sel = [s for s, u in zip(stars, used) if u]
    release_tables(weights)
    weights = _fit_shape(sel, basis, cfg)
    weights = normalise(basis, weights)

    # optional grid of position-dependent models, each pulled towards the global one
    G = max(int(cfg["grid"]), 1)
    edges_r = np.linspace(0, image.shape[0], G + 1)
    edges_c = np.linspace(0, image.shape[1], G + 1)
    grid = np.empty((G, G, basis.n_coeffs))
    srow = np.array([s.row for s in sel])
    scol = np.array([s.col for s in sel])
    for i in range(G):
        for j in range(G):
            if G == 1:
                grid[i, j] = weights
                continue
            inc = [s for s, r, c in zip(sel, srow, scol)
                   if edges_r[i] <= r < edges_r[i + 1] and edges_c[j] <= c < edges_c[j + 1]]
            if len(inc) < int(cfg["min_stars"]):
                grid[i, j] = weights
                continue
            w = _fit_shape(inc, basis, cfg, prior_mu=weights,
                           prior_sigma=float(cfg["grid_prior_sigma"]))
            grid[i, j] = normalise(basis, w)
    cell_rows = 0.5 * (edges_r[:-1] + edges_r[1:]) - 0.5
    cell_cols = 0.5 * (edges_c[:-1] + edges_c[1:]) - 0.5

    # quality, with the final shape: how much of each star's light within rmax the model
    # captures (flux refitted with a free sky), and the residual RMS per unit flux
    _subtract_neighbours(stars, basis, weights, scene, image.shape, half)
    model = SplinePRF(basis, grid, cell_rows, cell_cols)     # smeared, like the data
    captured, rms = [], []
    _refit_stars(sel, basis, weights, False)
    stamps, _, _ = model.stamps(srow, scol, 2 * half + 1)
    for s, vals in zip(sel, stamps):
        dr, dc = s.offsets()
        pred = s.flux * vals
        good = (s.ivar > 0) & (np.hypot(dr, dc) < basis.rmax)
        data = s.data - s.sky
        captured.append(np.sum(pred[good]) / np.sum(data[good]))
        rms.append(np.sqrt(np.mean((data - pred)[good] ** 2)) / s.flux)
    total, spread = lattice_sum(basis, weights)
    table = np.array([(s.row, s.col, s.flux, s.sky, s.chi2, u) for s, u in zip(stars, used)],
                     dtype=[("row", "f8"), ("col", "f8"), ("flux", "f8"), ("sky", "f8"),
                            ("chi2", "f8"), ("used", "?")])
    dof = np.array([max(np.count_nonzero(s.ivar) - 2, 1) for s in sel])
    result.update(weights=grid, cell_rows=cell_rows, cell_cols=cell_cols, stars=table,
                  chi2_total=float(np.sum(np.array([s.chi2 for s in sel]) * dof)),
                  n_pixels=int(np.sum(dof + 2)),
                  usable=True, n_stars=len(sel), flux_captured=float(np.median(captured)),
                  residual_rms=float(np.median(rms)),
                  chi2_reduced=float(np.median([s.chi2 for s in sel])),
                  lattice_spread=spread)
    return result


def _catalog_stars(f, shape, cfg):
    """(rows, cols, refit_positions) of the shape stars in cube pixels, or None."""
    stars = cache_catalog(f)          # the catalog SQLite next to the cache, in cube pixels
    if stars is not None:
        rows, cols, tmag = stars
        keep = select_stars(rows, cols, tmag, shape, cfg)
        others = np.setdiff1d(np.arange(len(rows)), keep)
        others = others[tmag[others] <= float(cfg["scene_tmag_max"])]
        scene = (rows[others], cols[others], mag2flux(tmag[others]))
        return rows[keep], cols[keep], False, "catalog", scene
    if "movement" in f and "row" in f["movement"]:
        # kernel stars: bright, isolated, unsaturated catalog stars; their positions are
        # first-frame guesses, so move them to the reference frame and refit them
        rows = np.asarray(f["movement/row"][()], dtype=float)
        cols = np.asarray(f["movement/column"][()], dtype=float)
        kern = MovementKernel.from_file(f)
        if kern is not None:
            dx, dy = kern.shift(cols, rows, 0)
            cols = cols - np.where(np.isfinite(dx), dx, 0.0)
            rows = rows - np.where(np.isfinite(dy), dy, 0.0)
        return rows, cols, True, "kernel stars", None
    return None


def motion_samples(drow, dcol, good, k):
    """(k, 2) (drow, dcol) shifts of ``k`` good frames evenly spread in time.

    They sample the smear of the sum image (the mean over the good frames). They are shifts
    relative to the reference frame, whose positions the catalog holds, so the mean shift is
    kept: the sum image's stars sit at reference position + mean shift.
    """
    idx = np.flatnonzero(good & np.isfinite(drow) & np.isfinite(dcol))
    if k <= 1 or idx.size < 2:
        return None
    pick = idx[np.linspace(0, idx.size - 1, min(k, idx.size)).round().astype(int)]
    return np.column_stack([drow[pick], dcol[pick]])


def kernel_motion_samples(kernel, good, k, rows, cols):
    """:func:`motion_samples` of a movement kernel at the median position of the shape stars
    ``rows, cols`` (cube pixels), or None without a kernel.

    Why there and not at the kernel's centre: an affine kernel (rotation, plate scale about a
    boresight off the cutout) moves stars differently across the image, and the smear the
    shape fit removes is the one of its stars."""
    if kernel is None or len(kernel) == 0 or not np.size(rows):
        return None
    n = min(len(kernel), len(good))
    dx, dy = kernel.shift(np.atleast_1d(np.median(cols)), np.atleast_1d(np.median(rows)),
                          np.arange(n))
    return motion_samples(np.asarray(dy, float)[:, 0], np.asarray(dx, float)[:, 0],
                          np.asarray(good, bool)[:n], k)


def add_shape_residual(res, n_frames):
    """Set ``res["shape_residual"]``: the shape model's residual on its stars in units of ONE
    cadence's pixel noise, ``sqrt(chi2_reduced / n_frames)`` (the sum image is the mean of
    ``n_frames`` frames, so its chi^2 grows with them for the same model error; this does
    not). The per-CCD model-quality metric :func:`shape_quality_problem` checks."""
    res["n_frames"] = int(n_frames)
    res["shape_residual"] = float(np.sqrt(max(res["chi2_reduced"], 0.0) / max(n_frames, 1)))
    return res


def shape_quality_problem(group, cfg):
    """A one-line reason why the ``linpsf_shape`` model in ``group`` cannot be trusted for an
    OK light curve, or None.

    Checked by the photometry before a target may be OK (issue 16). Limits (``[linpsf]``):
    ``max_shape_residual`` (residual per cadence in pixel sigmas on the shape stars: 1.8 on
    the round crowded test scene, 4-5 for the tensor basis on the SPOC PRF and Moffat scenes,
    72 for a circular model of the SPOC PRF, whose light curves were 4.7x the ideal noise,
    4000 for aliased 0.25 px knots), ``max_lattice_spread`` (flux scale changing with the
    sub-pixel phase) and ``max_flux_loss`` (light within rmax the model misses or adds).
    Caches written before the metric (no ``shape_residual``) are judged on the other two.
    """
    a = group.attrs
    resid = a.get("shape_residual")
    if resid is not None and float(resid) > float(cfg["max_shape_residual"]):
        return (f"linpsf shape model residual {float(resid):.3g} sigma per cadence on its "
                f"{int(a.get('n_stars', 0))} stars > max_shape_residual "
                f"{float(cfg['max_shape_residual']):g}")
    spread = a.get("lattice_spread")
    if spread is not None and float(spread) > float(cfg["max_lattice_spread"]):
        return (f"linpsf shape model flux scale varies by {float(spread):.2g} with the "
                f"sub-pixel phase > max_lattice_spread {float(cfg['max_lattice_spread']):g}")
    captured = a.get("flux_captured")
    if captured is not None and abs(float(captured) - 1) > float(cfg["max_flux_loss"]):
        return (f"linpsf shape model captures {float(captured):.3f} of its stars' light "
                f"within rmax (max_flux_loss {float(cfg['max_flux_loss']):g})")
    return None


def _write_shape(group, res, row_off, col_off):
    """Store a usable shape fit in a ``models/linpsf_shape`` group (CCD coordinates)."""
    group.attrs.update(res["basis"].to_attrs())
    for name, bic in res.get("basis_bic", {}).items():
        group.attrs[f"basis_bic_{name}"] = float(bic)
    group.create_dataset("weights", data=res["weights"])
    group.create_dataset("cell_rows", data=res["cell_rows"] + row_off)
    group.create_dataset("cell_cols", data=res["cell_cols"] + col_off)
    stars = res["stars"].copy()
    stars["row"] += row_off
    stars["col"] += col_off
    group.create_dataset("stars", data=stars)
    for key in _QUALITY_ATTRS:
        group.attrs[key] = res[key]


def fit_source_shape(source, settings, time_model=True):
    """The ``linpsf_shape`` stage's fit on an in-memory data source
    (:class:`photometry.data.memory_source.MemorySource`): the group the photometry reads and the
    fit's result dict.

    As the stage on a cache: catalog stars selected by :func:`select_stars`, the others
    subtracted at catalog flux, the sum image's variance from the ``errors`` cube, the smear
    from the movement kernel, and the time model fitted on the cube when ``time_model``.
    For tests, benchmarks and plugin authors' scenes.
    """
    from photometry import MemoryGroup
    from .timemodel import TimeBinner

    cfg = settings["linpsf"]
    cat = source.catalog_table()
    row_off, col_off = float(source.row_offset), float(source.column_offset)
    rows = np.asarray(cat["row"], float) - row_off
    cols = np.asarray(cat["column"], float) - col_off
    tmag = np.asarray(cat["tmag"], float)
    image = np.asarray(source.sumimage, dtype=float)
    good = TESSQualityFlags.filter(np.asarray(source.quality))
    everything = (slice(None), slice(None))
    errors = np.asarray(source.stamp("errors", *everything), float)
    variance = np.mean(errors[good] ** 2, axis=0) / max(np.count_nonzero(good), 1)
    keep = select_stars(rows, cols, tmag, image.shape, cfg)
    others = np.setdiff1d(np.arange(len(rows)), keep)
    others = others[tmag[others] <= float(cfg["scene_tmag_max"])]
    scene = (rows[others], cols[others], mag2flux(tmag[others]))
    kern = source.movement_kernel
    shifts = kernel_motion_samples(kern, good, int(cfg["blur_samples"]), rows[keep],
                                   cols[keep])
    res = fit_shape_model(image, variance, rows[keep], cols[keep], cfg, scene=scene,
                          shifts=shifts)
    group = MemoryGroup(attrs=dict(usable=bool(res["usable"]), star_source="catalog"))
    if not res["usable"]:
        return group, res
    add_shape_residual(res, np.count_nonzero(good))
    _write_shape(group, res, row_off, col_off)
    if time_model and int(cfg["time_degree"]) > 0:
        binner = TimeBinner.for_shape(source.time, good, rows[keep], cols[keep], image.shape,
                                      cfg)
        binner.add(slice(None), np.asarray(source.stamp("images", *everything)), errors)
        model = fit_shape_time_model(binner, res, scene, kern, cfg)
        if model is not None:
            model.write(group)
    return group, res


class LinPSFShapeModel(PrepareStage):
    """Prepare stage ``linpsf_shape``: see the module docstring."""

    name = "linpsf_shape"
    version = "1.1"

    def run(self, cache, group):
        from tqdm import tqdm

        cfg = self.settings["linpsf"]
        f = cache.file
        image = np.asarray(f["sumimage"][()], dtype=float)
        quality = np.asarray(f["quality"][()])
        # frames that failed prepare's frame checks are not fitted (cache.usable_frames)
        usable = np.asarray(getattr(cache, "usable_frames", np.ones(quality.size, bool)), bool)
        good = TESSQualityFlags.filter(quality) & usable
        if not good.any():
            good = usable.copy()
        var_sum = np.zeros(image.shape)
        count = np.zeros(image.shape)
        saturated = np.zeros(image.shape, dtype=bool)
        sat_bits = int(PixelQualityFlags.Saturated)
        found = _catalog_stars(f, image.shape, cfg)
        # time model: bin means of the candidate stars' boxes, gathered in this same pass
        binner = cache_binner(f, good, found, image.shape, cfg)
        for sl, _images, errors, flags in tqdm(cache.iter_frame_blocks(), desc="linpsf_shape",
                                              unit="block", disable=None):
            g = good[sl]
            err = np.asarray(errors[g], dtype=float)
            ok = np.isfinite(err)
            var_sum += np.where(ok, err ** 2, 0.0).sum(axis=0)
            count += ok.sum(axis=0)
            saturated |= np.any((np.asarray(flags) & sat_bits) != 0, axis=0)
            if binner is not None:
                binner.add(sl, _images, errors,
                           (np.asarray(flags) & PixelQualityFlags.PRF_FIT_BITMASK) != 0)
        with np.errstate(all="ignore"):
            variance = np.where(count > 0, var_sum / count ** 2, np.inf)
        if found is None:
            logger.warning("linpsf_shape: no catalog and no kernel stars; no shape model")
            group.attrs["usable"] = False
            return
        rows, cols, refit, origin, scene = found
        shifts = kernel_motion_samples(MovementKernel.from_file(f), good,
                                       int(cfg["blur_samples"]), rows, cols)
        res = fit_shape_model(image, variance, rows, cols, cfg, refit_positions=refit,
                              bad=saturated, scene=scene, shifts=shifts)
        group.attrs["usable"] = bool(res["usable"])
        group.attrs["star_source"] = origin
        if not res["usable"]:
            return
        add_shape_residual(res, np.count_nonzero(good))
        _write_shape(group, res, float(f.attrs.get("row_offset", 0)),
                     float(f.attrs.get("column_offset", 0)))
        if binner is not None:
            time_model = fit_shape_time_model(binner, res, scene, MovementKernel.from_file(f),
                                              cfg)
            if time_model is not None:
                time_model.write(group)
        logger.info("linpsf_shape: %d stars (%s), flux captured %.4f, residual rms %.2e, "
                    "chi2 %.2f, residual %.2f sigma per cadence", res["n_stars"], origin,
                    res["flux_captured"], res["residual_rms"], res["chi2_reduced"],
                    res["shape_residual"])


def load_shape_model(group):
    """The :class:`SplinePRF` stored in a ``models/linpsf_shape`` group, or None if unusable."""
    if group is None or not bool(group.attrs.get("usable", False)) or "weights" not in group:
        return None
    return SplinePRF.from_group(group)
