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

from .errors import InputError

__all__ = ["PRFModel", "AnalyticPRF", "SpocPRF", "load_prf"]


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


_PRF_NAME = re.compile(r"prf-(\d)-(\d)-row(\d{4})-col(\d{4})\.fits(\.gz)?$")


class SpocPRF(PRFModel):
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
        self.grid_rows = np.array(sorted({k[0] for k in models}))
        self.grid_cols = np.array(sorted({k[1] for k in models}))
        shapes = {m[0].shape for m in models.values()}
        nsamps = {m[1] for m in models.values()}
        centers = {m[2] for m in models.values()}
        if len(shapes) != 1 or len(nsamps) != 1 or len(centers) != 1:
            raise InputError(f"{self.directory}: PRF files differ in shape, NSAMP or centre")
        missing = [(r, c) for r in self.grid_rows for c in self.grid_cols if (r, c) not in models]
        if missing:
            raise InputError(f"{self.directory}: PRF grid incomplete, no model at CCD "
                             f"(row, col) {missing[0][0] + 1:.0f}, {missing[0][1] + 1:.0f}")
        #: (n_grid_rows, n_grid_cols, ny, nx) sample cubes, each normalised to sum 1 per pixel grid
        self.models = np.stack([np.stack([models[(r, c)][0] for c in self.grid_cols])
                                for r in self.grid_rows])
        self.nsamp = nsamps.pop()
        self.center = centers.pop()
        ny, nx = shapes.pop()
        # stamps wider than the model's support only add zeros
        self.support = min((ny - 1) // self.nsamp, (nx - 1) // self.nsamp) + 1
        if self.support % 2 == 0:
            self.support += 1

    def default_size(self, flux=None):
        return self.support

    @staticmethod
    def _bracket(grid, x):
        """Lower index and weight of the upper neighbour for linear interpolation, clamped."""
        if grid.size == 1:
            return np.zeros(x.shape, dtype=np.int64), np.zeros(x.shape)
        i = np.clip(np.searchsorted(grid, x) - 1, 0, grid.size - 2)
        t = np.clip((x - grid[i]) / (grid[i + 1] - grid[i]), 0.0, 1.0)
        return i, t

    def model_at(self, row, col):
        """Super-sampled model(s) interpolated bilinearly to CCD position(s), shape (N, ny, nx)."""
        row = np.atleast_1d(np.asarray(row, dtype=float))
        col = np.atleast_1d(np.asarray(col, dtype=float))
        i, ti = self._bracket(self.grid_rows, row)
        j, tj = self._bracket(self.grid_cols, col)
        i1 = np.minimum(i + 1, self.grid_rows.size - 1)
        j1 = np.minimum(j + 1, self.grid_cols.size - 1)
        m = self.models
        w = [(1 - ti) * (1 - tj), (1 - ti) * tj, ti * (1 - tj), ti * tj]
        return (w[0][:, None, None] * m[i, j] + w[1][:, None, None] * m[i, j1]
                + w[2][:, None, None] * m[i1, j] + w[3][:, None, None] * m[i1, j1])

    def stamps(self, row, col, size):
        row = np.atleast_1d(np.asarray(row, dtype=float))
        col = np.atleast_1d(np.asarray(col, dtype=float))
        n = row.size
        r0 = _stamp_origin(row, size)
        c0 = _stamp_origin(col, size)
        # position-interpolation weights; the four corner models are combined after sampling
        i, ti = self._bracket(self.grid_rows, row)
        j, tj = self._bracket(self.grid_cols, col)
        i1 = np.minimum(i + 1, self.grid_rows.size - 1)
        j1 = np.minimum(j + 1, self.grid_cols.size - 1)
        steps = np.arange(size)
        # sample coordinates of each stamp pixel centre in the super-sampled grid
        sy = ((r0[:, None] + steps) - row[:, None]) * self.nsamp + self.center[0]   # (N, size)
        sx = ((c0[:, None] + steps) - col[:, None]) * self.nsamp + self.center[1]
        ny, nx = self.models.shape[2:]
        y0 = np.floor(sy).astype(np.int64)
        x0 = np.floor(sx).astype(np.int64)
        fy = sy - y0
        fx = sx - x0
        values = np.zeros((n, size, size))
        flat = self.models.reshape(-1)
        npos = ny * nx
        for ii, jj, wpos in ((i, j, (1 - ti) * (1 - tj)), (i, j1, (1 - ti) * tj),
                             (i1, j, ti * (1 - tj)), (i1, j1, ti * tj)):
            if not np.any(wpos):
                continue
            base = (ii * self.grid_cols.size + jj) * npos            # (N,) model offset
            for dy, wy in ((0, 1 - fy), (1, fy)):
                yy = y0 + dy
                wy = wy * ((yy >= 0) & (yy < ny))
                yy = np.clip(yy, 0, ny - 1)
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    xx = x0 + dx
                    wx = wx * ((xx >= 0) & (xx < nx))
                    xx = np.clip(xx, 0, nx - 1)
                    index = base[:, None, None] + yy[:, :, None] * nx + xx[:, None, :]
                    values += (wpos[:, None, None] * wy[:, :, None] * wx[:, None, :]) * flat[index]
        return values, r0, c0

    def __repr__(self):
        return (f"SpocPRF({self.directory!r}, camera={self.camera}, ccd={self.ccd}, "
                f"grid={self.grid_rows.size}x{self.grid_cols.size})")


def load_prf(spec, camera=None, ccd=None, **analytic_options):
    """The PRF model named by a setting: ``"analytic"`` or a folder of SPOC PRF files.

    A folder holding ``camC_ccdD`` sub-folders (e.g. ``.../Sectors1_2_3``) is resolved with
    ``camera`` and ``ccd``.
    """
    if spec is None or str(spec) == "analytic":
        return AnalyticPRF(**analytic_options)
    directory = str(spec)
    if not os.path.isdir(directory):
        raise InputError(f"{directory}: PRF must be 'analytic' or a folder of SPOC PRF files")
    sub = os.path.join(directory, f"cam{camera}_ccd{ccd}")
    if camera is not None and ccd is not None and os.path.isdir(sub):
        directory = sub
    return SpocPRF(directory)
