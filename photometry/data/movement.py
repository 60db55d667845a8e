"""The movement kernel: the per-frame affine shift of the stars relative to the reference frame.

Why measure it from the pixels: the per-frame WCS of SPOC FFIs is a fit with its own errors
(and calibrated cutouts may not have one per frame), while photometry needs the *relative*
motion of the stars on the detector to a few thousandths of a pixel. So prepare tracks a few
hundred bright, unsaturated, isolated stars in every frame while it streams them, and fits per
frame the affine map (translation + linear term, which covers pointing jitter, momentum-dump
jumps and the velocity-aberration scale change) from their reference-frame positions to their
positions in that frame.

Convention (docs/architecture.md): kernel row ``i`` = ``(dx, dy, a, b, c, d)``; a star at
reference-frame science-pixel position ``(x, y)`` (column, row; 0-based cube indices) is at
``x + dx + a*(x-x0) + b*(y-y0)``, ``y + dy + c*(x-x0) + d*(y-y0)`` in frame ``i``.

Centroid estimator: a least-squares fit of a pixel-integrated circular 2-D Gaussian plus a
constant background in a small box (vectorised over all stars of a frame, Gauss-Newton with
Levenberg damping). A flux-weighted centroid in a fixed box is pulled towards the box centre
(its shift estimate is scaled down by the truncated wings); the Gaussian fit has no such
scale bias, and its remaining pixel-phase error (the real PRF is not Gaussian) changes sign with
the sub-pixel phase, so it averages out over the many stars of the affine fit.
"""
import logging

import numpy as np
from scipy.special import erf

__all__ = ["select_kernel_stars", "fit_centroids", "fit_affine", "fit_kernel", "MovementKernel"]

logger = logging.getLogger(__name__)

_SQRT2 = np.sqrt(2.0)
_SQRT2PI = np.sqrt(2.0 * np.pi)


def select_kernel_stars(column, row, tmag, shape, *, n_max=200, tmag_min=7.5, tmag_max=11.0,
                        box=7, isolation=4.0, contrast=4.0, image=None, saturation=None,
                        grid=4):
    """Indices of the catalog stars that measure the movement kernel.

    Parameters
    ----------
    column, row : array_like
        Positions in cube pixels (0-based science-region indices) in the first frame.
    tmag : array_like
        TESS magnitudes of the same stars (every catalog star, for the isolation test).
    shape : tuple
        (rows, columns) of the cube.
    n_max, tmag_min, tmag_max : number
        At most ``n_max`` stars within the magnitude range (too bright saturate, too faint are
        noisy).
    box : int
        Side of the fitting box; stars must fit in the image with a 2-pixel margin.
    isolation, contrast : float
        Reject a star with a neighbour closer than ``isolation`` pixels and fainter by less than
        ``contrast`` magnitudes (a neighbour would pull its centroid as the PRF changes).
    image, saturation : array, float, optional
        If given, reject stars whose box holds a non-finite pixel or one above ``saturation``.
    grid : int
        Stars are taken in turns from a ``grid`` x ``grid`` division of the frame so the
        affine terms are constrained over the whole field, not only where bright stars cluster.
    """
    column = np.asarray(column, float)
    row = np.asarray(row, float)
    tmag = np.asarray(tmag, float)
    nrow, ncol = shape
    half = box // 2 + 2
    ok = ((tmag >= tmag_min) & (tmag <= tmag_max) & np.isfinite(column) & np.isfinite(row)
          & (column >= half) & (column <= ncol - 1 - half)
          & (row >= half) & (row <= nrow - 1 - half))
    candidates = np.flatnonzero(ok)
    if candidates.size == 0:
        return candidates
    # isolation against every catalog star (on the frame or not)
    from scipy.spatial import cKDTree
    finite_index = np.flatnonzero(np.isfinite(column) & np.isfinite(row))
    tree = cKDTree(np.column_stack([column[finite_index], row[finite_index]]))
    cand_tree = cKDTree(np.column_stack([column[candidates], row[candidates]]))
    pairs = cand_tree.sparse_distance_matrix(tree, isolation, output_type="coo_matrix")
    ci, nj = candidates[pairs.row], finite_index[pairs.col]
    spoiled = (ci != nj) & (tmag[nj] < tmag[ci] + contrast)
    keep = np.setdiff1d(candidates, ci[spoiled])
    if image is not None and keep.size:
        patches = _patches(image, column[keep], row[keep], box)[0]
        bad = ~np.all(np.isfinite(patches), axis=(1, 2))
        if saturation is not None:
            with np.errstate(invalid="ignore"):
                bad |= np.nanmax(patches, axis=(1, 2)) > saturation
        keep = keep[~bad]
    if keep.size == 0:
        return keep
    # spread over the field: brightest of each cell first, then the second brightest, ...
    cell = (np.minimum((row[keep] * grid // nrow).astype(int), grid - 1) * grid
            + np.minimum((column[keep] * grid // ncol).astype(int), grid - 1))
    order = np.lexsort((tmag[keep], cell))
    keep, cell = keep[order], cell[order]
    rank = np.zeros(keep.size, int)
    for c in np.unique(cell):
        sel = np.flatnonzero(cell == c)
        rank[sel] = np.arange(sel.size)
    order = np.lexsort((tmag[keep], rank))
    return keep[order][:n_max]


#: Centroid fits stop once no star moves by more than this (pixels) in an iteration: far below
#: the 1e-3..1e-2 px uncertainty of a kernel star's centroid, and half the iterations of 1e-6.
CONVERGED_PX = 1e-4


def _patches(image, x, y, box):
    """Boxes of ``box`` x ``box`` pixels around round(x), round(y); NaN outside the image."""
    half = box // 2
    xc = np.rint(x).astype(int)
    yc = np.rint(y).astype(int)
    off = np.arange(-half, half + 1)
    rows = yc[:, None, None] + off[None, :, None]
    cols = xc[:, None, None] + off[None, None, :]
    inside = (rows >= 0) & (rows < image.shape[0]) & (cols >= 0) & (cols < image.shape[1])
    patches = np.where(inside, image[np.clip(rows, 0, image.shape[0] - 1),
                                     np.clip(cols, 0, image.shape[1] - 1)], np.nan)
    return patches.astype(float), xc, yc


def _integrated_gauss(edges_lo, edges_hi, centre, sigma):
    """Fraction of a 1-D Gaussian in each pixel, and its derivatives (centre, sigma)."""
    u_lo = (edges_lo - centre[:, None]) / sigma[:, None]
    u_hi = (edges_hi - centre[:, None]) / sigma[:, None]
    g = 0.5 * (erf(u_hi / _SQRT2) - erf(u_lo / _SQRT2))
    e_lo = np.exp(-0.5 * u_lo ** 2) / _SQRT2PI
    e_hi = np.exp(-0.5 * u_hi ** 2) / _SQRT2PI
    dg_dc = -(e_hi - e_lo) / sigma[:, None]
    dg_ds = -(u_hi * e_hi - u_lo * e_lo) / sigma[:, None]
    return g, dg_dc, dg_ds


def fit_centroids(image, x, y, *, box=7, errors=None, saturation=None, iterations=12):
    """Positions of stars in one image from a pixel-integrated Gaussian fit.

    Parameters
    ----------
    image : ndarray (R, C)
    x, y : array_like
        First guesses (column, row) in the image's pixel indices; the box is centred on
        the nearest pixel, so the guess needs to be within about a pixel.
    errors : ndarray (R, C), optional
        Per-pixel uncertainties used as weights.
    saturation : float, optional
        Stars with a box pixel above it are not measured (NaN).

    Returns
    -------
    xfit, yfit, sigma_pos : ndarray
        Fitted positions and their 1-sigma uncertainty (NaN where the fit failed).
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    n = x.size
    if n == 0:
        return np.empty(0), np.empty(0), np.empty(0)
    half = box // 2
    good_guess = np.isfinite(x) & np.isfinite(y)
    xs = np.where(good_guess, x, 0.0)
    ys = np.where(good_guess, y, 0.0)
    data, xc, yc = _patches(image, xs, ys, box)
    if errors is not None:
        err = _patches(errors, xs, ys, box)[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(np.isfinite(err) & (err > 0), 1.0 / err ** 2, np.nan)
        # normalise so the damping scale does not depend on the flux level
        w = w / np.nanmedian(w, axis=(1, 2), keepdims=True)
    else:
        w = np.ones_like(data)
    valid = good_guess & np.all(np.isfinite(data), axis=(1, 2)) & np.all(np.isfinite(w),
                                                                         axis=(1, 2))
    if saturation is not None:
        with np.errstate(invalid="ignore"):
            valid &= ~(np.nanmax(data, axis=(1, 2)) > saturation)
    data = np.where(np.isfinite(data), data, 0.0)
    w = np.where(np.isfinite(w), w, 0.0)
    off = np.arange(-half, half + 1, dtype=float)
    lo, hi = off - 0.5, off + 0.5

    # first guess: background from the box border, flux-weighted centroid of the rest
    border = np.concatenate([data[:, 0, :], data[:, -1, :], data[:, 1:-1, 0], data[:, 1:-1, -1]],
                            axis=1)
    bkg = np.median(border, axis=1)
    net = np.clip(data - bkg[:, None, None], 0, None)
    flux = net.sum(axis=(1, 2))
    safe = np.where(flux > 0, flux, 1.0)
    cx = (net.sum(axis=1) * off).sum(axis=1) / safe
    cy = (net.sum(axis=2) * off).sum(axis=1) / safe
    valid &= flux > 0
    p = np.column_stack([np.where(flux > 0, flux, 1.0), np.clip(cx, -1, 1), np.clip(cy, -1, 1),
                         np.full(n, 1.0), bkg])
    lam = np.full(n, 1e-3)
    yy = data.reshape(n, -1)
    ww = w.reshape(n, -1)

    def model_and_jac(p):
        m = p.shape[0]
        gx, gx_c, gx_s = _integrated_gauss(lo, hi, p[:, 1], p[:, 3])
        gy, gy_c, gy_s = _integrated_gauss(lo, hi, p[:, 2], p[:, 3])
        f = p[:, 0][:, None, None]
        psf = gy[:, :, None] * gx[:, None, :]
        model = f * psf + p[:, 4][:, None, None]
        jac = np.stack([psf,
                        f * gy[:, :, None] * gx_c[:, None, :],
                        f * gy_c[:, :, None] * gx[:, None, :],
                        f * (gy_s[:, :, None] * gx[:, None, :] + gy[:, :, None] * gx_s[:, None, :]),
                        np.ones_like(psf)], axis=-1)
        return model.reshape(m, -1), jac.reshape(m, -1, 5)

    model, jac = model_and_jac(p)
    chi2 = np.sum(ww * (yy - model) ** 2, axis=1)
    # Levenberg-Marquardt on the stars still moving: a star whose position step fell below
    # CONVERGED_PX leaves the active set (most need 3-4 iterations, a few 7-8, and the
    # iterations of the whole set cost the same per star whatever its state)
    active = np.flatnonzero(valid)
    eye = np.eye(5)[None]
    for _ in range(iterations):
        if not active.size:
            break
        jac_a, ww_a = jac[active], ww[active]
        jtw = jac_a.transpose(0, 2, 1) * ww_a[:, None, :]
        a = jtw @ jac_a
        g = np.einsum("nkp,np->nk", jtw, yy[active] - model[active])
        diag = np.einsum("nkk->nk", a)
        a_damped = a + lam[active][:, None, None] * eye * diag[:, :, None]
        try:
            step = np.linalg.solve(a_damped, g[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            step = np.zeros((active.size, 5))
        trial = p[active] + step
        trial[:, 3] = np.clip(trial[:, 3], 0.3, box / 2.0)
        trial[:, 1:3] = np.clip(trial[:, 1:3], -half, half)
        model_t, jac_t = model_and_jac(trial)
        chi2_t = np.sum(ww_a * (yy[active] - model_t) ** 2, axis=1)
        better = chi2_t <= chi2[active]
        took = active[better]
        p[took] = trial[better]
        model[took] = model_t[better]
        jac[took] = jac_t[better]
        chi2[took] = chi2_t[better]
        lam[active] = np.where(better, lam[active] * 0.3, lam[active] * 10.0)
        active = active[~np.all(np.abs(step[:, 1:3]) < CONVERGED_PX, axis=1)]
    jtw = jac.transpose(0, 2, 1) * ww[:, None, :]
    a = jtw @ jac
    a[~valid] = np.eye(5)
    dof = max(yy.shape[1] - 5, 1)
    try:
        cov = np.linalg.inv(a) * (chi2 / dof)[:, None, None]
        sig = np.sqrt(np.abs(cov[:, 1, 1]) + np.abs(cov[:, 2, 2]))
    except np.linalg.LinAlgError:
        sig = np.full(n, np.nan)
    valid &= (np.abs(p[:, 1]) < half) & (np.abs(p[:, 2]) < half) & np.isfinite(sig)
    xfit = np.where(valid, xc + p[:, 1], np.nan)
    yfit = np.where(valid, yc + p[:, 2], np.nan)
    return xfit, yfit, np.where(valid, sig, np.nan)


def fit_affine(x, y, dx, dy, sigma=None, *, x0=0.0, y0=0.0, min_stars=8, clip=5.0,
               floor=0.003, iterations=5):
    """Weighted least-squares affine ``(dx, dy, a, b, c, d)`` of measured shifts, with rejection.

    Parameters
    ----------
    x, y : array_like
        Reference positions of the stars (column, row).
    dx, dy : array_like
        Their measured shifts in one frame (NaN = not measured).
    sigma : array_like, optional
        1-sigma uncertainty of each shift; ``floor`` is added in quadrature so a few very
        bright stars cannot dominate through an optimistic statistical error.
    min_stars : int
        Below this many usable stars only the translation is fitted (a, b, c, d = 0).
    clip : float
        Stars whose residual exceeds ``clip`` robust standard deviations are rejected and the
        fit repeated (a star with an unresolved neighbour, a cosmic ray or a variable blend).

    Returns
    -------
    params : ndarray (6,)
        NaN if no star could be used.
    used : ndarray of bool
    """
    x, y, dx, dy = (np.asarray(v, float) for v in (x, y, dx, dy))
    if sigma is None:
        sigma = np.zeros_like(x)
    sigma = np.asarray(sigma, float)
    used = np.isfinite(dx) & np.isfinite(dy) & np.isfinite(sigma) & np.isfinite(x) & np.isfinite(y)
    valid = used.copy()
    weights = 1.0 / (sigma ** 2 + floor ** 2)
    params = np.full(6, np.nan)
    for _ in range(iterations):
        n = int(used.sum())
        if n == 0:
            return np.full(6, np.nan), used
        if n >= min_stars:
            design = np.column_stack([np.ones(n), x[used] - x0, y[used] - y0])
        else:
            design = np.ones((n, 1))
        sw = np.sqrt(weights[used])
        rhs = np.column_stack([dx[used], dy[used]])
        coef = np.linalg.lstsq(design * sw[:, None], rhs * sw[:, None], rcond=None)[0]
        params = np.zeros(6)
        params[0], params[1] = coef[0]
        if coef.shape[0] == 3:
            params[2], params[3] = coef[1, 0], coef[2, 0]
            params[4], params[5] = coef[1, 1], coef[2, 1]
        pred_x, pred_y = _apply(params, x, y, x0, y0)
        # residuals in units of each star's uncertainty; the robust scale adapts the limit
        # when the uncertainties are underestimated (never tighter than the stated errors)
        resid = np.hypot(dx - pred_x, dy - pred_y) * np.sqrt(weights)
        if n <= 3:
            break
        # median of a 2-D (Rayleigh) residual norm is sqrt(ln 4) sigma
        scale = max(np.median(resid[used]) / np.sqrt(np.log(4.0)), 1.0)
        # judged afresh each time from all valid stars: a star rejected only because the
        # first fit was pulled by an outlier comes back
        new_used = valid & (resid <= clip * scale)
        if np.array_equal(new_used, used):
            break
        used = new_used
    return params, used


def _apply(params, x, y, x0, y0):
    """Shift (dx, dy) of positions (x, y) under one affine parameter row (or rows)."""
    params = np.asarray(params, float)
    xr = np.asarray(x, float) - x0
    yr = np.asarray(y, float) - y0
    p = [params[..., k] for k in range(6)]
    if params.ndim == 2:
        p = [v[:, None] for v in p]
    return p[0] + p[2] * xr + p[3] * yr, p[1] + p[4] * xr + p[5] * yr


def fit_kernel(centroids, sigmas, ref_frame, *, x0, y0, min_stars=8, clip=5.0, floor=0.003):
    """Movement kernel (N, 6) from per-frame star centroids relative to the reference frame.

    Parameters
    ----------
    centroids : ndarray (N, n_stars, 2)
        Measured (x, y) of each kernel star in each frame (NaN where not measured).
    sigmas : ndarray (N, n_stars)
        Their uncertainties.
    ref_frame : int
        Index of the reference frame; its row of the kernel is zero by definition.
    """
    centroids = np.asarray(centroids, float)
    n_frames = centroids.shape[0]
    kernel = np.full((n_frames, 6), np.nan)
    if centroids.shape[1] == 0:
        logger.warning("no kernel stars: movement kernel set to zero")
        return np.zeros((n_frames, 6))
    ref = centroids[ref_frame]
    for i in range(n_frames):
        d = centroids[i] - ref
        # the uncertainty of the reference position is common to every frame (a constant
        # offset of each star), so it does not enter the per-frame weights
        kernel[i] = fit_affine(ref[:, 0], ref[:, 1], d[:, 0], d[:, 1], sigmas[i], x0=x0, y0=y0,
                               min_stars=min_stars, clip=clip, floor=floor)[0]
    kernel[ref_frame] = 0.0
    return kernel


class MovementKernel:
    """Per-frame affine motion of the stars relative to the reference frame.

    Coordinates are cube (science-region) pixel indices, 0-based, ``x`` = column,
    ``y`` = row. Add the cache's ``column_offset``/``row_offset`` for CCD coordinates (the shift
    itself does not depend on the origin once ``x0, y0`` are expressed in the same system).

    Parameters
    ----------
    kernel : ndarray (N, 6)
        Rows ``(dx, dy, a, b, c, d)``; NaN rows are frames without a measurement.
    time : ndarray (N,)
        Frame mid-times (BTJD), for interpolation to other cadences (TPFs).
    x0, y0 : float
        Centre of the linear terms.
    """

    def __init__(self, kernel, time, x0, y0, ref_frame=0):
        self.kernel = np.asarray(kernel, float)
        self.time = np.asarray(time, float)
        if self.kernel.ndim != 2 or self.kernel.shape[1] != 6:
            raise ValueError("movement kernel must have shape (N, 6)")
        if self.time.shape != (self.kernel.shape[0],):
            raise ValueError("time must have one value per kernel row")
        self.x0 = float(x0)
        self.y0 = float(y0)
        self.ref_frame = int(ref_frame)

    @classmethod
    def from_file(cls, f):
        """The kernel stored in an open cache file (h5py, cube pixel coordinates), or None
        when the file has none (prepare without kernel stars, or still being written)."""
        if "movement_kernel" not in f or "kernel_x0" not in f.attrs or "time" not in f:
            return None
        a = f.attrs
        return cls(f["movement_kernel"][()], f["time"][()], a["kernel_x0"], a["kernel_y0"],
                   int(a.get("ref_frame", 0)))

    def __len__(self):
        return self.kernel.shape[0]

    def shift(self, x, y, frame_index):
        """Shift ``(dx, dy)`` of reference positions ``(x, y)`` in frame(s) ``frame_index``.

        A scalar frame gives arrays shaped like ``x``; an array of frames gives
        (n_frames, n_positions) arrays.
        """
        params = self.kernel[frame_index]
        return _apply(params, np.atleast_1d(x) if np.ndim(frame_index) else x, y,
                      self.x0, self.y0)

    def apply(self, x, y, frame_index):
        """Positions ``(x, y)`` in frame ``frame_index`` of reference positions ``(x, y)``
        (the interface BasePhotometry uses)."""
        dx, dy = self.shift(x, y, frame_index)
        return np.asarray(x, float) + dx, np.asarray(y, float) + dy

    def positions_at(self, frames, x, y):
        """Positions (x, y) in each of ``frames`` of stars at reference positions ``(x, y)``;
        arrays (n_frames, n_stars)."""
        frames = np.atleast_1d(frames)
        x = np.atleast_1d(np.asarray(x, float))
        y = np.atleast_1d(np.asarray(y, float))
        dx, dy = _apply(self.kernel[frames], x, y, self.x0, self.y0)
        return x[None, :] + dx, y[None, :] + dy

    def params_at_time(self, times):
        """Kernel rows linearly interpolated to ``times`` (BTJD).

        Frames without a measurement are skipped. Times up to one median frame step outside
        the frame times take the nearest frame's value; further out is a ValueError (the
        motion there is unknown).
        """
        times = np.atleast_1d(np.asarray(times, float))
        good = np.all(np.isfinite(self.kernel), axis=1) & np.isfinite(self.time)
        t = self.time[good]
        k = self.kernel[good]
        if t.size == 0:
            return np.full((times.size, 6), np.nan)
        step = np.median(np.diff(self.time)) if self.time.size > 1 else 0.0
        if np.any(times < t[0] - step - 1e-9) or np.any(times > t[-1] + step + 1e-9):
            raise ValueError("times outside the span of the movement kernel")
        return np.column_stack([np.interp(times, t, k[:, j]) for j in range(6)])

    def shift_at_time(self, x, y, times):
        """Shifts (n_times, n_positions) at arbitrary times (e.g. TPF cadences)."""
        params = self.params_at_time(times)
        return _apply(params, np.atleast_1d(x), np.atleast_1d(y), self.x0, self.y0)

    def positions_at_time(self, times, x, y):
        """Positions (n_times, n_stars) at arbitrary times of stars at reference ``(x, y)``."""
        x = np.atleast_1d(np.asarray(x, float))
        y = np.atleast_1d(np.asarray(y, float))
        dx, dy = self.shift_at_time(x, y, times)
        return x[None, :] + dx, y[None, :] + dy
