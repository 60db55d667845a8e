"""Pixel response functions (PRF): the fraction of a star's flux that lands in each pixel.

Two models share one interface (:class:`PRFModel`):

* :class:`AnalyticPRF` -- a Gaussian core plus a broad Gaussian wing, integrated exactly over
  each pixel (differences of error functions). It needs no data files, is separable and
  therefore fast, and is the simulator's default.
* :class:`SpocPRF` -- the SPOC super-sampled PRF models of one camera/CCD (117x117 samples at
  9 per pixel on a 5x5 grid of CCD positions). The samples are already pixel-integrated (the
  value at offset ``(dr, dc)`` is the flux fraction in a pixel whose centre is ``(dr, dc)``
  from the star), so a stamp is obtained by sampling the model at the stamp's integer pixel
  offsets. Models are interpolated bilinearly between the four grid positions around the star,
  then bilinearly between samples to the star's sub-pixel position.

Coordinates are the project convention: 0-based ``(row, column)`` of the full CCD frame as SPOC
writes it (collateral columns included), pixel centres at integer values. Every method is
vectorised over stars because the same code renders whole simulated frames (thousands of
stars) and builds design matrices for PRF photometry.
"""
import glob
import os
import re

import numpy as np
from scipy import sparse
from scipy.special import erf

from photometry.hooks.errors import InputError

__all__ = ["PRFModel", "AnalyticPRF", "SampledPRF", "SpocPRF", "FieldPRF", "FAMILIES", "load_prf"]


class PRFModel:
    """Common interface: stamps of flux fractions for many stars at once.

    Subclasses implement :meth:`stamps`; :meth:`evaluate` and :meth:`design_matrix` build on it.
    """

    #: short name recorded in outputs
    name = "prf"

    def default_size(self, flux=None):
        """Stamp side (pixels, odd) large enough to hold the PRF of a star of this flux."""
        return 13

    def stamps(self, row, col, size):
        """Flux fractions of unit-flux stars in ``size`` x ``size`` stamps.

        Parameters
        ----------
        row, col : array_like
            0-based CCD positions of the stars (shape ``(N,)``).
        size : int
            Stamp side; the stamp is centred on the pixel nearest to the star.

        Returns
        -------
        values : ndarray, shape (N, size, size), float64
            Fraction of the star's flux in each stamp pixel.
        row0, col0 : ndarray of int, shape (N,)
            CCD position of ``values[k, 0, 0]``.
        """
        raise NotImplementedError

    def evaluate(self, row, col, shape, origin=(0, 0), flux=None, size=None):
        """Image of the given shape holding the stars (unit flux, or ``flux`` e-/s each).

        ``origin`` is the CCD ``(row, column)`` of ``image[0, 0]``. Light falling outside the
        image is dropped, so for a single star in a large image the sum is the enclosed fraction.
        """
        row = np.atleast_1d(np.asarray(row, dtype=float))
        col = np.atleast_1d(np.asarray(col, dtype=float))
        flux = np.ones_like(row) if flux is None else np.broadcast_to(
            np.asarray(flux, dtype=float), row.shape)
        nrows, ncols = shape
        if size is None:
            sizes = np.array([self.default_size(f) for f in flux]) if flux.size < 64 else \
                self._sizes(flux)
        else:
            sizes = np.full(row.shape, int(size))
        # render onto an image padded by the largest half-stamp so that stamps need no
        # clipping (a boolean mask over millions of stamp pixels costs more than the PRF)
        pad = int(sizes.max()) // 2 + 1 if sizes.size else 0
        prow, pcol = nrows + 2 * pad, ncols + 2 * pad
        image = np.zeros(prow * pcol, dtype=np.float64)
        for s in np.unique(sizes):
            sel = np.flatnonzero(sizes == s)
            sel = sel[np.argsort(row[sel], kind="stable")]   # chunks cover bands of rows
            steps = np.arange(s)
            for start in range(0, sel.size, 8192):  # bounded temporary memory
                idx = sel[start:start + 8192]
                values, r0, c0 = self.stamps(row[idx], col[idx], int(s))
                values *= flux[idx, None, None]
                r0 = r0 - origin[0] + pad
                c0 = c0 - origin[1] + pad
                inside = (r0 >= 0) & (r0 + s <= prow) & (c0 >= 0) & (c0 + s <= pcol)
                flat = (r0[inside, None, None] + steps[None, :, None]) * pcol \
                    + (c0[inside, None, None] + steps[None, None, :])
                if flat.size:
                    lo = int(flat.min())
                    band = np.bincount((flat - lo).ravel(), weights=values[inside].ravel())
                    image[lo:lo + band.size] += band
                if not inside.all():                # stamps reaching beyond the padding
                    out = ~inside
                    rr = r0[out, None, None] + steps[None, :, None]
                    cc = c0[out, None, None] + steps[None, None, :]
                    ok = (rr >= 0) & (rr < prow) & (cc >= 0) & (cc < pcol)
                    image += np.bincount((rr * pcol + cc)[ok], weights=values[out][ok],
                                         minlength=prow * pcol)
        return image.reshape(prow, pcol)[pad:pad + nrows, pad:pad + ncols].copy()

    def _sizes(self, flux):
        """Vectorised :meth:`default_size` (subclasses with flux tiers override it)."""
        return np.full(flux.shape, self.default_size())

    def design_matrix(self, row, col, shape, origin=(0, 0), size=None):
        """Sparse matrix (npix x nstars): column k is star k's PRF over the image pixels.

        This is what a linear PRF fit solves with: ``image.ravel() ~ A @ fluxes``.
        """
        row = np.atleast_1d(np.asarray(row, dtype=float))
        col = np.atleast_1d(np.asarray(col, dtype=float))
        size = self.default_size() if size is None else int(size)
        nrows, ncols = shape
        values, r0, c0 = self.stamps(row, col, size)
        rr = (r0 - origin[0])[:, None, None] + np.arange(size)[None, :, None]
        cc = (c0 - origin[1])[:, None, None] + np.arange(size)[None, None, :]
        star = np.broadcast_to(np.arange(row.size)[:, None, None], values.shape)
        ok = (rr >= 0) & (rr < nrows) & (cc >= 0) & (cc < ncols)
        return sparse.csr_matrix((values[ok], ((rr * ncols + cc)[ok], star[ok])),
                                 shape=(nrows * ncols, row.size))


def _stamp_origin(position, size):
    """First pixel of a stamp of ``size`` centred on the pixel nearest to ``position``."""
    return np.floor(position + 0.5).astype(np.int64) - size // 2


class AnalyticPRF(PRFModel):
    """Gaussian core + Gaussian wing, each integrated exactly over square pixels.

    The defaults put about 24 % of the flux in the central pixel of a centred star (the real
    SPOC PRF of camera 1 has 26 %) and 15 % of it in a wing wide enough to make crowding and
    background estimation realistic. The total integral is exactly 1.

    Parameters
    ----------
    sigma : float
        Core Gaussian standard deviation, pixels.
    wing_sigma : float
        Wing Gaussian standard deviation, pixels.
    wing_fraction : float
        Fraction of the flux in the wing (0 <= f < 1).
    """

    name = "analytic"

    def __init__(self, *, sigma=0.7, wing_sigma=2.0, wing_fraction=0.15):
        if not sigma > 0 or not wing_sigma > 0:
            raise InputError(f"analytic PRF: sigma and wing_sigma must be positive, "
                             f"got {sigma}, {wing_sigma}")
        if not 0 <= wing_fraction < 1:
            raise InputError(f"analytic PRF: wing_fraction must be in [0, 1), got {wing_fraction}")
        self.sigma = float(sigma)
        self.wing_sigma = float(wing_sigma)
        self.wing_fraction = float(wing_fraction)

    def default_size(self, flux=None):
        """Stamp side growing with flux so the wing light lost outside it stays below ~0.35 e-/s.

        11 px loses 1.8e-3 of the flux (wing beyond 2.75 sigma), 13 px 3.5e-4, 19 px 3e-7.
        Without ``flux`` (a unit model for fitting) the answer is the lossless 19 px.
        """
        return int(self._sizes(np.atleast_1d(1.0e4 if flux is None else flux))[0])

    def _sizes(self, flux):
        # 11 px below 200 e-/s loses <= 0.35 e-/s; beyond that, sizes keep the loss smaller
        return np.select([flux <= 200.0, flux <= 1.0e3, flux <= 1.0e5], [11, 13, 19], 31)

    @staticmethod
    def _integrated_1d(offsets, sigma):
        """Fraction of a 1-D Gaussian inside unit pixels centred at ``offsets`` (N, size).

        Consecutive pixels share edges, so erf is evaluated once per edge.
        """
        scale = 1.0 / (np.sqrt(2.0) * sigma)
        edges = np.concatenate([offsets - 0.5, offsets[:, -1:] + 0.5], axis=1)
        cdf = erf(edges * scale)
        return 0.5 * (cdf[:, 1:] - cdf[:, :-1])

    def stamps(self, row, col, size):
        row = np.atleast_1d(np.asarray(row, dtype=float))
        col = np.atleast_1d(np.asarray(col, dtype=float))
        r0 = _stamp_origin(row, size)
        c0 = _stamp_origin(col, size)
        steps = np.arange(size)
        dr = (r0[:, None] + steps[None, :]) - row[:, None]     # (N, size) pixel-centre offsets
        dc = (c0[:, None] + steps[None, :]) - col[:, None]
        # separable components: values = sum_k w_k outer(rows_k, cols_k), one batched matmul
        rows = [(1.0 - self.wing_fraction) * self._integrated_1d(dr, self.sigma)]
        cols = [self._integrated_1d(dc, self.sigma)]
        if self.wing_fraction > 0:
            rows.append(self.wing_fraction * self._integrated_1d(dr, self.wing_sigma))
            cols.append(self._integrated_1d(dc, self.wing_sigma))
        values = np.stack(rows, axis=2) @ np.stack(cols, axis=1)
        return values, r0, c0

    def __repr__(self):
        return (f"AnalyticPRF(sigma={self.sigma}, wing_sigma={self.wing_sigma}, "
                f"wing_fraction={self.wing_fraction})")


#: cubic B-spline weights of the four taps ``floor(s) - 1 .. floor(s) + 2`` at fraction ``t``
def _cubic_weights(t):
    t2, t3 = t * t, t * t * t
    return ((1 - t) ** 3 / 6.0, (3 * t3 - 6 * t2 + 4) / 6.0,
            (-3 * t3 + 3 * t2 + 3 * t + 1) / 6.0, t3 / 6.0)


class SampledPRF(PRFModel):
    """Pixel-integrated PRF samples on a grid of CCD positions, interpolated in between.

    The common machinery of the SPOC models (:class:`SpocPRF`) and of the analytic field
    families (:class:`FieldPRF`): at each grid position a super-sampled image whose sample
    at offset ``(dr, dc) = ((i - centre_r) / nsamp, (j - centre_c) / nsamp)`` is the flux
    fraction in a pixel whose centre lies ``(dr, dc)`` from the star (pixel-integrated
    already, so a stamp is the model sampled at the stamp's integer pixel offsets).

    Interpolation, as the SPOC PRF documentation describes it: linear in CCD position
    between the four grid models around the star (nearest models outside the grid, no
    extrapolation), and, between super-samples, an interpolating cubic B-spline of each
    model (as lkprf's ``RectBivariateSpline``). Why cubic: bilinear interpolation between
    samples 1/9 px apart sags by ~h^2 f''/8 between them, 6e-4 of the flux in the peak
    pixel of a TESS star, with kinks at every sample; a star drifting over the samples then
    shows that artificial structure (hundreds of sigma for a Tmag 8 star), which no smooth
    PRF model (nor the real sky) has. The spline passes through every sample exactly (a grid
    position at a sample offset reproduces the file) and, being a spline of samples whose
    every pixel lattice sums to 1, keeps that sum at every sub-pixel phase.

    Parameters
    ----------
    models : ndarray (n_grid_rows, n_grid_cols, ny, nx), or callable
        Super-sampled models, each already normalised as wanted (unit lattice sums); or
        ``f(grid_row, grid_col) -> (ny, nx)`` (``ny = 2 centre_r + 1``), called when a star
        first needs that grid position (tabulated families).
    grid_rows, grid_cols : ndarray
        0-based CCD row / column of the grid positions (increasing).
    nsamp : int
        Samples per pixel.
    centre : (int, int)
        Sample index of the star's position.
    """

    name = "sampled"

    #: stars per batch of :meth:`stamps` (its gathers are 16 stamps per star and model)
    _BATCH = 512

    def __init__(self, models, grid_rows, grid_cols, nsamp, centre):
        self.grid_rows = np.atleast_1d(np.asarray(grid_rows, dtype=float))
        self.grid_cols = np.atleast_1d(np.asarray(grid_cols, dtype=float))
        self.nsamp = int(nsamp)
        self.center = (int(centre[0]), int(centre[1]))
        if callable(models):
            self._build, ny, nx = models, 2 * self.center[0] + 1, 2 * self.center[1] + 1
            self.models = np.zeros((self.grid_rows.size, self.grid_cols.size, ny, nx))
        else:
            self._build = None
            self.models = np.asarray(models, dtype=np.float64)
        gr, gc, ny, nx = self.models.shape
        # the smallest odd stamp holding every sample at any sub-pixel phase (a stamp is
        # centred on the nearest pixel, so a star is up to 0.5 px off its centre)
        reach = max(self.center[0], ny - 1 - self.center[0], self.center[1],
                    nx - 1 - self.center[1]) / self.nsamp
        self.support = 2 * int(np.ceil(reach + 0.5 - 1e-9)) + 1
        # zero samples around each model so that every spline tap of a support-sized
        # stamp lies inside the coefficient array (no masks in :meth:`stamps`)
        self._pad = int(np.ceil(self.nsamp * (self.support // 2 + 0.5)
                                - min(self.center))) + 3
        pad = self._pad
        #: B-spline coefficients of each model (the interpolant through its samples), padded
        self.coeffs = np.zeros((gr, gc, ny + 2 * pad, nx + 2 * pad))
        self._ready = np.zeros((gr, gc), dtype=bool)
        if self._build is None:
            self._ensure(np.arange(gr).repeat(gc), np.tile(np.arange(gc), gr))

    def _ensure(self, ii, jj):
        """Tabulate (lazy models) and spline-filter the grid models (ii, jj) not yet ready."""
        from scipy.ndimage import spline_filter

        for i, j in set(zip(np.ravel(ii).tolist(), np.ravel(jj).tolist())):
            if self._ready[i, j]:
                continue
            if self._build is not None:
                self.models[i, j] = self._build(self.grid_rows[i], self.grid_cols[j])
            self.coeffs[i, j] = spline_filter(np.pad(self.models[i, j], self._pad), order=3,
                                              mode="mirror")
            self._ready[i, j] = True

    #: e-/s a star may lose beyond its stamp in :meth:`evaluate` (as :class:`AnalyticPRF`)
    max_lost_flux = 0.35

    def default_size(self, flux=None):
        """The support, or for a star of ``flux`` e-/s the smallest odd stamp (from 11 px)
        losing less than :attr:`max_lost_flux` of its light."""
        if flux is None:
            return self.support
        return int(self._sizes(np.atleast_1d(float(flux)))[0])

    def _sizes(self, flux):
        if not hasattr(self, "_tiers"):
            # light beyond each stamp size for a star half a pixel off the stamp centre (the
            # worst phase) at the first grid position
            sizes = np.arange(min(11, self.support), self.support + 1, 2)
            full = self.stamps([self.grid_rows[0] + 0.49], [self.grid_cols[0] + 0.49],
                               self.support)[0][0]
            h = self.support // 2
            self._tiers = (sizes, np.array([full.sum() - full[h - k // 2:h + k // 2 + 1,
                                                              h - k // 2:h + k // 2 + 1].sum()
                                            for k in sizes]))
        sizes, lost = self._tiers
        flux = np.asarray(flux, dtype=float)
        ok = np.abs(flux)[:, None] * lost[None, :] < self.max_lost_flux
        first = np.where(ok.any(axis=1), np.argmax(ok, axis=1), sizes.size - 1)
        return sizes[first]

    @staticmethod
    def _bracket(grid, x):
        """Lower index and weight of the upper neighbour for linear interpolation, clamped."""
        if grid.size == 1:
            return np.zeros(x.shape, dtype=np.int64), np.zeros(x.shape)
        i = np.clip(np.searchsorted(grid, x) - 1, 0, grid.size - 2)
        t = np.clip((x - grid[i]) / (grid[i + 1] - grid[i]), 0.0, 1.0)
        return i, t

    def _corners(self, row, col):
        """The four (grid row, grid column, weight) of each star's position interpolation."""
        i, ti = self._bracket(self.grid_rows, row)
        j, tj = self._bracket(self.grid_cols, col)
        i1 = np.minimum(i + 1, self.grid_rows.size - 1)
        j1 = np.minimum(j + 1, self.grid_cols.size - 1)
        return ((i, j, (1 - ti) * (1 - tj)), (i, j1, (1 - ti) * tj),
                (i1, j, ti * (1 - tj)), (i1, j1, ti * tj))

    def model_at(self, row, col):
        """Super-sampled model(s) interpolated linearly to CCD position(s), (N, ny, nx)."""
        row = np.atleast_1d(np.asarray(row, dtype=float))
        col = np.atleast_1d(np.asarray(col, dtype=float))
        corners = self._corners(row, col)
        for i, j, w in corners:
            self._ensure(i[w > 0], j[w > 0])
        return sum(w[:, None, None] * self.models[i, j] for i, j, w in corners)

    def stamps(self, row, col, size):
        row = np.atleast_1d(np.asarray(row, dtype=float))
        col = np.atleast_1d(np.asarray(col, dtype=float))
        size = int(size)
        if size > self.support:
            # beyond the support the model is zero: the support-sized stamp, embedded
            inner, r0, c0 = self.stamps(row, col, self.support)
            d = size // 2 - self.support // 2
            out = np.zeros((row.size, size, size))
            out[:, d:d + self.support, d:d + self.support] = inner
            return out, r0 - d, c0 - d
        values = np.empty((row.size, size, size))
        r0 = _stamp_origin(row, size)
        c0 = _stamp_origin(col, size)
        for k in range(0, row.size, self._BATCH):
            sl = slice(k, k + self._BATCH)
            values[sl] = self._stamp_batch(row[sl], col[sl], r0[sl], c0[sl], size)
        return values, r0, c0

    def _stamp_batch(self, row, col, r0, c0, size):
        """:meth:`stamps` values of a batch of stars (size <= support).

        A stamp's pixels sample the model on a lattice of stride ``nsamp`` whose sub-sample
        fraction is the same for every pixel, so each star needs 4 x 4 spline weights and
        16 strided gathers of its lattice per grid model."""
        n, pad, ns = row.size, self._pad, self.nsamp
        ny, nx = self.coeffs.shape[2:]
        lattice = ns * np.arange(size)
        taps = np.arange(4)
        out = []
        for first, pos, centre in ((r0, row, self.center[0]), (c0, col, self.center[1])):
            s = (first - pos) * ns + centre + pad            # (N,) sample of the first pixel
            f = np.floor(s)
            w = np.stack(_cubic_weights(s - f), axis=1)      # (N, 4)
            index = (f.astype(np.int64) - 1)[:, None, None] + taps[None, :, None] \
                + lattice[None, None, :]                     # (N, 4 taps, size)
            out.append((w, index))
        (wy, iy), (wx, ix) = out
        flat = self.coeffs.reshape(-1)
        offsets = iy[:, :, None, :, None] * nx + ix[:, None, :, None, :]   # (N, 4, 4, S, S)
        values = np.zeros((n, size, size))
        for ii, jj, wpos in self._corners(row, col):
            use = wpos > 0
            if not use.any():
                continue
            self._ensure(ii[use], jj[use])
            base = (ii * self.grid_cols.size + jj) * (ny * nx)
            gathered = flat[base[use, None, None, None, None] + offsets[use]]
            values[use] += np.einsum("n,na,nb,nabij->nij", wpos[use], wy[use], wx[use],
                                     gathered)
        return values


_PRF_NAME = re.compile(r"prf-(\d)-(\d)-row(\d{4})-col(\d{4})\.fits(\.gz)?$")


class SpocPRF(SampledPRF):
    """The SPOC super-sampled PRF models of one camera/CCD, interpolated in CCD position.

    Parameters
    ----------
    directory : str or Path
        Folder holding the ``*-prf-C-D-rowRRRR-colCCCC.fits[.gz]`` files of one camera/CCD
        (e.g. ``Sectors1_2_3/cam1_ccd4``). The grid may be any rectangular subset of positions
        (at least 1x1); outside the grid the nearest models are used (no extrapolation).

    Notes
    -----
    Each file's primary image is 117x117 samples with ``NSAMP`` = 9 samples per pixel; sample
    ``(CRPIX2P-1, CRPIX1P-1)`` (0-based) is the star's position; ``CCD_RREF``/``CCD_CREF`` give
    the 1-based CCD row/column where the model applies. The samples sum to NSAMP**2; we divide
    by the actual total over NSAMP**2 so that a stamp sums to 1 (to rounding of the grid).
    Interpolation: :class:`SampledPRF` (linear in CCD position, cubic spline between samples).
    """

    name = "spoc"

    def __init__(self, directory):
        from astropy.io import fits

        self.directory = str(directory)
        paths = sorted(p for p in glob.glob(os.path.join(self.directory, "*prf*.fits*"))
                       if _PRF_NAME.search(os.path.basename(p)))
        if not paths:
            raise InputError(f"{self.directory}: no SPOC PRF files (*-prf-C-D-rowRRRR-colCCCC.fits)")
        models = {}
        camccd = set()
        for path in paths:
            try:
                with fits.open(path) as hdul:
                    header = hdul[0].header
                    data = np.asarray(hdul[0].data, dtype=np.float64)
            except (OSError, ValueError) as exc:
                raise InputError(f"{path}: not a readable PRF FITS file ({exc})") from None
            if data.ndim != 2 or "CCD_RREF" not in header or "NSAMP" not in header:
                raise InputError(f"{path}: not a SPOC PRF model (no 2-D image with CCD_RREF/NSAMP)")
            nsamp = int(round(header["NSAMP"]))
            center = (int(round(header.get("CRPIX2P", (data.shape[0] + 1) / 2))) - 1,
                      int(round(header.get("CRPIX1P", (data.shape[1] + 1) / 2))) - 1)
            key = (float(header["CCD_RREF"]) - 1.0, float(header["CCD_CREF"]) - 1.0)
            # normalise so that each 1-pixel lattice of samples sums to 1 (file: NSAMP**2 total)
            models[key] = (data * (nsamp**2 / data.sum()), nsamp, center)
            camccd.add((int(header.get("CAM", 0)), int(header.get("CCD", 0))))
        self.camera, self.ccd = sorted(camccd)[0]
        grid_rows = np.array(sorted({k[0] for k in models}))
        grid_cols = np.array(sorted({k[1] for k in models}))
        shapes = {m[0].shape for m in models.values()}
        nsamps = {m[1] for m in models.values()}
        centers = {m[2] for m in models.values()}
        if len(shapes) != 1 or len(nsamps) != 1 or len(centers) != 1:
            raise InputError(f"{self.directory}: PRF files differ in shape, NSAMP or centre")
        missing = [(r, c) for r in grid_rows for c in grid_cols if (r, c) not in models]
        if missing:
            raise InputError(f"{self.directory}: PRF grid incomplete, no model at CCD "
                             f"(row, col) {missing[0][0] + 1:.0f}, {missing[0][1] + 1:.0f}")
        cube = np.stack([np.stack([models[(r, c)][0] for c in grid_cols]) for r in grid_rows])
        super().__init__(cube, grid_rows, grid_cols, nsamps.pop(), centers.pop())

    def __repr__(self):
        return (f"SpocPRF({self.directory!r}, camera={self.camera}, ccd={self.ccd}, "
                f"grid={self.grid_rows.size}x{self.grid_cols.size})")


#: CCD (row, column) span of the science pixels, 0-based, collateral columns included
_SCIENCE_ROWS = (0.0, 2047.0)
_SCIENCE_COLS = (44.0, 2091.0)
#: distance (px) from one science corner to the opposite one: the field coordinate's unit
_SCIENCE_DIAGONAL = float(np.hypot(2047.0, 2047.0))


class FieldPRF(SampledPRF):
    """Analytic PRF families that are not our default: elliptical, with wings, lopsided, and
    varying across the CCD and (through :meth:`focused`) in time.

    Why: a PRF-fitting method judged only on the simulator's own round double Gaussian is
    tuned to it (issue 16). These families change what such a method must learn: the
    ellipticity and its orientation, heavy power-law wings, a wing displaced from the core
    (a centroid that is not the peak, as the real TESS PRF far from the optical axis), and
    their change over the field.

    Families (``family``):

    * ``"elliptical"``: the analytic default's core + wing Gaussians (``sigma``,
      ``wing_sigma``, ``wing_fraction``) made elliptical, with the wing displaced from the
      core by ``coma`` px (times the field coordinate) along the direction away from the
      optical axis. With ``ellipticity = field_ellipticity = field_width = coma = 0`` it is
      :class:`AnalyticPRF` (to the interpolation error, < 1e-6 of the flux per pixel).
    * ``"moffat"``: an elliptical Moffat profile ``(1 + x^T S^-1 x)^-beta`` of full width at
      half maximum ``fwhm`` (geometric mean of the axes): power-law wings (``beta`` = 3:
      twice the light beyond 3 px of a Gaussian of the same core).

    Shape at a CCD position with field coordinate ``q`` (distance from ``axis`` over the
    science diagonal, 0..1): width times ``1 + field_width q``; ellipticity as the vector sum
    of ``ellipticity`` at position angle ``angle`` (fixed on the CCD) and
    ``field_ellipticity q`` along the radial direction from the axis. Ellipticity is
    defined by the second moments ``M`` of the PSF: ``e = sqrt((Mcc - Mrr)^2 + 4 Mrc^2) /
    (Mcc + Mrr)``, angle from the column axis towards the row axis. The PSF is integrated
    over pixels (Simpson's rule on a ``1 / (2 nsamp)`` px grid, < 1e-6 relative) at
    ``nsamp`` samples per pixel, at ``grid x grid`` CCD positions (the SPOC layout), and
    interpolated as :class:`SampledPRF` does; the truth of a simulation is that interpolant.

    Parameters
    ----------
    family : {"elliptical", "moffat"}
    sigma, wing_sigma, wing_fraction : float
        "elliptical": core and wing Gaussian widths (px, rms per axis for a round PSF) and the
        wing's share of the flux.
    fwhm, beta : float
        "moffat": FWHM (px) and power-law index (> 1; > 2 for finite second moments).
    ellipticity, angle : float
        Ellipticity and position angle (degrees) at the optical axis.
    field_ellipticity, field_width, coma : float
        Radial ellipticity, relative width growth and wing displacement (px) at ``q = 1``.
    axis : (float, float)
        CCD (row, column) of the optical axis (default the far science corner, so that the
        default cutouts at the first science pixels see the field edge).
    grid : int
        CCD positions per axis of the tabulated models (evenly over the science area).
    size : int
        Table side (px, odd); light beyond it is dropped.
    scale : float
        Width factor (focus); see :meth:`focused`.
    """

    name = "field"
    #: width-factor step of the focus nodes between which :meth:`focused` interpolates
    focus_step = 0.005

    def __init__(self, family="elliptical", *, sigma=0.7, wing_sigma=2.0, wing_fraction=0.15,
                 fwhm=1.6, beta=3.0, ellipticity=0.0, angle=0.0, field_ellipticity=0.0,
                 field_width=0.0, coma=0.0, axis=(2047.0, 2091.0), grid=5, size=25, nsamp=10,
                 scale=1.0):
        if family not in ("elliptical", "moffat"):
            raise InputError(f"PRF family {family!r}: must be 'elliptical' or 'moffat'")
        checks = {"sigma": sigma > 0, "wing_sigma": wing_sigma > 0, "fwhm": fwhm > 0,
                  "beta": beta > 1, "wing_fraction": 0 <= wing_fraction < 1,
                  "ellipticity": 0 <= ellipticity < 1, "field_ellipticity": field_ellipticity >= 0,
                  "field_width": field_width > -1, "grid": int(grid) >= 1,
                  "size": int(size) >= 3 and int(size) % 2 == 1, "scale": scale > 0}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"PRF family {family!r}: invalid {bad[0]} "
                             f"(sigma, wing_sigma, fwhm, scale > 0; beta > 1; 0 <= wing_fraction, "
                             f"ellipticity < 1; size odd >= 3)")
        self.family = family
        self.params = dict(sigma=float(sigma), wing_sigma=float(wing_sigma),
                           wing_fraction=float(wing_fraction), fwhm=float(fwhm),
                           beta=float(beta), ellipticity=float(ellipticity),
                           angle=float(angle), field_ellipticity=float(field_ellipticity),
                           field_width=float(field_width), coma=float(coma),
                           axis=(float(axis[0]), float(axis[1])), grid=int(grid),
                           size=int(size), nsamp=int(nsamp))
        self.scale = float(scale)
        self._focus_nodes = {}
        g = int(grid)
        rows = np.linspace(*_SCIENCE_ROWS, g) if g > 1 else np.array([np.mean(_SCIENCE_ROWS)])
        cols = np.linspace(*_SCIENCE_COLS, g) if g > 1 else np.array([np.mean(_SCIENCE_COLS)])
        if int(nsamp) % 2:
            raise InputError(f"PRF family {family!r}: nsamp must be even, got {nsamp}")
        # samples up to half a pixel inside the stamp's edge: a stamp of ``size`` then holds
        # the whole table at every sub-pixel phase (light beyond it is dropped, consistently)
        half = (int(size) // 2) * int(nsamp) - int(nsamp) // 2
        super().__init__(lambda r, c: self._tabulate(r, c, self.scale), rows, cols, nsamp,
                         (half, half))
        self.name = family

    # ------------------------------------------------------------------ shape
    def shape_at(self, row, col, scale=None):
        """(width factor, second-moment ellipticity, position angle in rad, coma vector (dr, dc))
        of the PSF at CCD ``(row, col)`` (see the class docstring)."""
        p = self.params
        dr, dc = row - p["axis"][0], col - p["axis"][1]
        dist = float(np.hypot(dr, dc))
        q = min(dist / _SCIENCE_DIAGONAL, 1.0)
        radial = np.arctan2(dr, dc) if dist > 0 else 0.0
        a0 = np.deg2rad(p["angle"])
        e1 = p["ellipticity"] * np.cos(2 * a0) + p["field_ellipticity"] * q * np.cos(2 * radial)
        e2 = p["ellipticity"] * np.sin(2 * a0) + p["field_ellipticity"] * q * np.sin(2 * radial)
        ell = float(np.hypot(e1, e2))
        if ell >= 0.95:
            raise InputError(f"PRF family {self.family!r}: ellipticity {ell:.2f} at CCD "
                             f"({row:.0f}, {col:.0f}) (must stay < 0.95)")
        width = (1 + p["field_width"] * q) * (self.scale if scale is None else scale)
        coma = p["coma"] * q
        return width, ell, 0.5 * float(np.arctan2(e2, e1)), (coma * np.sin(radial),
                                                              coma * np.cos(radial))

    @staticmethod
    def _shape_matrix(var, ell, theta):
        """2 x 2 (row, column) covariance of rms ``sqrt(var)`` per axis with ellipticity ``ell``
        at angle ``theta`` (from the column axis towards the row axis)."""
        c, s = np.cos(2 * theta), np.sin(2 * theta)
        return var * np.array([[1 - ell * c, ell * s], [ell * s, 1 + ell * c]])

    def _psf(self, dr, dc, row, col, scale):
        """The PSF (unit integral over the plane) at offsets from a star at CCD (row, col)."""
        p = self.params
        width, ell, theta, (kr, kc) = self.shape_at(row, col, scale)

        def gauss(var, r, c):
            m = self._shape_matrix(var, ell, theta)
            inv = np.linalg.inv(m)
            quad = inv[0, 0] * r * r + 2 * inv[0, 1] * r * c + inv[1, 1] * c * c
            return np.exp(-0.5 * quad) / (2 * np.pi * np.sqrt(np.linalg.det(m)))

        if self.family == "elliptical":
            core = gauss((p["sigma"] * width) ** 2, dr, dc)
            if p["wing_fraction"] == 0:
                return core
            wing = gauss((p["wing_sigma"] * width) ** 2, dr - kr, dc - kc)
            return (1 - p["wing_fraction"]) * core + p["wing_fraction"] * wing
        # Moffat: (1 + x^T S^-1 x)^-beta, S = alpha^2 (shape matrix of unit determinant)
        beta = p["beta"]
        alpha = 0.5 * p["fwhm"] * width / np.sqrt(2 ** (1 / beta) - 1)
        m = self._shape_matrix(alpha ** 2, ell, theta) / np.sqrt(1 - ell ** 2)
        inv = np.linalg.inv(m)
        quad = inv[0, 0] * dr * dr + 2 * inv[0, 1] * dr * dc + inv[1, 1] * dc * dc
        return (beta - 1) / (np.pi * np.sqrt(np.linalg.det(m))) * (1 + quad) ** (-beta)

    def _tabulate(self, row, col, scale):
        """Pixel-integrated samples (ny, nx) of the PSF at CCD (row, col), width factor scale.

        Composite Simpson's rule along each axis on a grid of ``1 / (2 nsamp)`` px: the
        integral over the pixel centred on sample j spans 2 nsamp intervals."""
        p = self.params
        ns, half = p["nsamp"], self.center[0]
        m = 2 * ns                                   # Simpson intervals per pixel (even)
        step = m // ns                               # fine points per super-sample
        edge = half * step + m // 2                  # fine points from the centre to the edge
        fine = np.arange(-edge, edge + 1) / m
        dr, dc = np.meshgrid(fine, fine, indexing="ij")
        f = self._psf(dr, dc, row, col, scale)
        w = np.full(m + 1, 2.0)
        w[1::2] = 4.0
        w[[0, -1]] = 1.0
        n_out = 2 * half + 1
        band = np.zeros((n_out, fine.size))
        for j in range(n_out):
            band[j, j * step:j * step + m + 1] = w / (3.0 * m)
        return band @ f @ band.T

    # ------------------------------------------------------------------ focus
    def focused(self, scale):
        """This PRF with every width multiplied by ``scale`` (the PRF of one frame of a focus
        change): a :class:`SampledPRF` interpolated linearly between focus nodes every
        ``focus_step`` in width (tabulated once per node; the interpolation error is ~1e-6
        of the flux per pixel, far below the nodes' own differences)."""
        scale = float(scale) * self.scale
        if scale == self.scale:
            return self
        if scale <= 0:
            raise InputError(f"focus change: PRF width factor {scale} is not positive")
        k = int(np.floor((scale - 1.0) / self.focus_step + 1e-9))
        t = (scale - (1.0 + k * self.focus_step)) / self.focus_step
        nodes = [self._focus_node(k + d) for d in (0, 1)]

        def blend(r, c):
            i = int(np.searchsorted(self.grid_rows, r))
            j = int(np.searchsorted(self.grid_cols, c))
            for node in nodes:
                node._ensure(i, j)
            return (1 - t) * nodes[0].models[i, j] + t * nodes[1].models[i, j]
        out = SampledPRF(blend, self.grid_rows, self.grid_cols, self.nsamp, self.center)
        out.name = self.name
        return out

    def _focus_node(self, k):
        if k not in self._focus_nodes:
            s = 1.0 + k * self.focus_step
            self._focus_nodes[k] = self if s == self.scale else FieldPRF(
                self.family, scale=s, **{key: v for key, v in self.params.items()})
        return self._focus_nodes[k]

    def __repr__(self):
        p = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"FieldPRF({self.family!r}, {p}, scale={self.scale})"


#: the ``photometry.data.prf`` / ``simulate.prf`` names of the analytic families
FAMILIES = ("elliptical", "moffat")


def load_prf(spec, camera=None, ccd=None, **options):
    """The PRF model named by a setting: ``"analytic"``, a family of :data:`FAMILIES` or a
    folder of SPOC PRF files.

    ``options`` are the model's keyword arguments (those of :class:`AnalyticPRF` for
    "analytic", of :class:`FieldPRF` for a family; options the model does not take are
    ignored, so one settings section can serve every model). A folder holding ``camC_ccdD``
    sub-folders (e.g. ``.../Sectors1_2_3``) is resolved with ``camera`` and ``ccd``.
    """
    import inspect

    def taken(cls):
        names = inspect.signature(cls.__init__).parameters
        return {k: v for k, v in options.items() if k in names}

    if spec is None or str(spec) == "analytic":
        return AnalyticPRF(**taken(AnalyticPRF))
    if str(spec) in FAMILIES:
        return FieldPRF(str(spec), **taken(FieldPRF))
    directory = str(spec)
    if not os.path.isdir(directory):
        raise InputError(f"{directory}: PRF must be 'analytic', one of {', '.join(FAMILIES)} "
                         "or a folder of SPOC PRF files")
    sub = os.path.join(directory, f"cam{camera}_ccd{ccd}")
    if camera is not None and ccd is not None and os.path.isdir(sub):
        directory = sub
    return SpocPRF(directory)
