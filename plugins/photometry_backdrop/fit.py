"""The per-frame linear fit of the backdrop model, with all per-CCD work done once.

Why it is fast: the pixel set and its weights are shared by all frames (one static mask), so
the normal matrix is built and factorised once per CCD and every frame is one more right-hand
side. The strap block (one offset per column) is diagonal, so it is eliminated by a Schur
complement and only the (poly + spline) core is factorised. The fit runs on bins of
``bin_rows`` rows x 1 column (straps keep their full column resolution); the basis inside a bin
is taken to first order in the row offset of the bin's usable pixels, which keeps the binned
fit exact in steep gradients when the star mask removes pixels unevenly. Outlier bins
(cosmic rays, moving objects, pixels flagged in one frame) are replaced by the current model
and only frames whose clipped set or fill changed are solved again (EM on the missing data,
which converges to the fit without those bins while keeping the shared factorisation).
"""
import numpy as np
from scipy import linalg, sparse

from .basis import Axis, tensor_pairs

__all__ = ["BackdropFitter", "FrameFit", "nanquantile_columns"]

_BLAS = None


def _one_blas_thread():
    """Context limiting BLAS to one thread for the per-frame products.

    Why: they are many mid-sized GEMMs (a 2048 x 2048 by 2048 x 38 per frame); with two
    OpenBLAS threads on a shared 2-core machine a product took 3-100x its single-thread time
    (threads waiting for a busy core), and the other prepare work runs in the same process.
    """
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController
        _BLAS = ThreadpoolController()      # scans the loaded libraries once (~5 ms)
    return _BLAS.limit(limits=1, user_api="blas")


def nanquantile_columns(a, q):
    """Quantile ``q`` of the finite values of each column of a 2-D array (NaN if none).

    Sorting once (NaNs sort last) and indexing is ~20x faster than ``np.nanquantile`` along
    an axis, which loops in Python over the columns.
    """
    s = np.sort(a, axis=0)
    n = np.isfinite(a).sum(axis=0)
    pos = np.clip(q * (n - 1), 0, None)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
    frac = pos - lo
    cols = np.arange(a.shape[1])
    out = s[lo, cols] * (1 - frac) + s[hi, cols] * frac
    out[n == 0] = np.nan
    return out


class FrameFit:
    """Results of fitting a block of frames."""

    def __init__(self, weights, strap, noise, n_clipped, jitter):
        self.weights = weights      # (nf, n_terms)
        self.strap = strap          # (nf, C)
        self.noise = noise          # (nf,) per-pixel residual scale, e-/s
        self.n_clipped = n_clipped  # (nf,) bins replaced by the model
        self.jitter = jitter        # (nf, n_jitter) data minus model at the jitter pixels


class BackdropFitter:
    """Fits the backdrop model to frames sharing one usable-pixel mask.

    Parameters
    ----------
    usable : (R, C) bool array
        Pixels the fit may use in every frame.
    settings : dict
        The ``[backdrop]`` settings section.
    pixel_noise : float
        Typical 1-sigma noise of one pixel in one frame (e-/s); it scales the priors, which
        are given in e-/s, against the data.
    """

    def __init__(self, usable, settings, pixel_noise):
        s = settings
        self.settings = s
        R, C = usable.shape
        self.shape = (R, C)
        self.rows = Axis(R, s["poly_degree"], s["knot_spacing"])
        self.cols = Axis(C, s["poly_degree"], s["knot_spacing"])
        self.pairs = tensor_pairs(self.rows, self.cols)
        pa, pb = self.pairs[:, 0], self.pairs[:, 1]
        b = int(s["bin_rows"])
        self.bin_rows = b
        nb = -(-R // b)
        self.n_bins = nb
        padded = np.zeros((nb * b, C), dtype=bool)
        padded[:R] = usable
        m3 = padded.reshape(nb, b, C)
        counts = m3.sum(axis=1).astype(float)
        self.counts = counts
        self.active = counts > 0
        self.sqrt_counts = np.sqrt(counts)
        self.rmean, self.rslope, centre = self.rows.binned(b)
        offs = (np.arange(nb * b).reshape(nb, b) - centre[:, None])
        dsum = (offs[:, :, None] * m3).sum(axis=1)
        self.delta = np.divide(dsum, counts, out=np.zeros_like(dsum), where=counts > 0)
        self.cbasis = self.cols.basis(np.arange(C))
        self.usable = usable
        # Normal matrix of the tensor terms: sum over bins of count * phi phi^T, with
        # phi = (rmean + delta * rslope)[a] * cbasis[b]; built through dense products of
        # (row-pair) x (bins, columns) x (column-pair) matrices.
        mr, mc = self.rows.size, self.cols.size
        rm, rs = self.rmean, self.rslope
        w0 = counts
        w1 = counts * self.delta
        w2 = counts * self.delta ** 2
        # B-splines overlap only their neighbours, so these pair matrices are ~97% zeros:
        # sparse products make the once-per-CCD normal matrix a fraction of a second
        qmm = sparse.csr_matrix((rm[:, :, None] * rm[:, None, :]).reshape(nb, mr * mr))
        qms = (rm[:, :, None] * rs[:, None, :])
        qms = sparse.csr_matrix((qms + qms.transpose(0, 2, 1)).reshape(nb, mr * mr))
        qss = sparse.csr_matrix((rs[:, :, None] * rs[:, None, :]).reshape(nb, mr * mr))
        left = np.asarray(qmm.T @ w0 + qms.T @ w1 + qss.T @ w2)           # (mr^2, C)
        cb = self.cbasis
        pcc = sparse.csr_matrix((cb[:, :, None] * cb[:, None, :]).reshape(C, mc * mc))
        a4 = np.asarray((pcc.T @ left.T).T)                                # (mr^2, mc^2)
        a4 = a4.reshape(mr, mr, mc, mc)
        A = a4[pa[:, None], pa[None, :], pb[:, None], pb[None, :]]
        n_poly = int(np.sum(pa <= self.rows.poly_degree))
        self.n_poly = n_poly
        var = float(pixel_noise) ** 2
        prior = np.full(len(pa), var / float(s["spline_prior"]) ** 2)
        prior[:n_poly] = var / float(s["poly_prior"]) ** 2
        A[np.diag_indices_from(A)] += prior
        # strap block (diagonal) and its coupling to the tensor terms
        rw = (w0.T @ rm + w1.T @ rs)                                     # (C, mr)
        self.coupling = rw[:, pa] * cb[:, pb]                            # (C, n_terms)
        self._A = A
        self._column_counts = counts.sum(axis=0)
        self.pixel_noise = float(pixel_noise)
        #: prior mean of each column's offset (subtracted from the data before the solve)
        self.strap_offset = np.zeros(C)
        self._factorise(np.full(C, float(s["strap_prior"])))
        # single precision for the per-frame products (values ~1e2, sums over ~1e6 terms:
        # relative error ~1e-6, far below the noise) doubles their speed
        self._cbasis_t = np.ascontiguousarray(self.cbasis.T, dtype=np.float32)
        # per-frame products: the full-resolution side (bins x columns) is contracted with
        # the column basis by one single-precision GEMM, the rest is small
        self._cbasis32 = self.cbasis.astype(np.float32)
        self._delta32 = self.delta.astype(np.float32)
        self._counts32 = self.counts.astype(np.float32)
        self._cd32 = (self.counts * self.delta).astype(np.float32)
        # robust noise scale from a fixed subsample of bins: medians of ~10^4 values
        # instead of 10^5-10^6 per frame and iteration, with no loss of precision that matters
        act = np.flatnonzero(self.active.ravel())
        step = max(1, act.size // 20000)
        self._sample = act[::step]
        self._sample_rc = np.unravel_index(self._sample, self.active.shape)
        self._sqrt_counts32 = self.sqrt_counts.astype(np.float32)
        self.gain = np.ones(C)
        self.pixel_scale = 1.0
        self._usable_f4 = padded.astype(np.float32)       # rows padded to whole bins
        self._flag_masks = {}
        #: bins in one spline cell: a change of the filled values summing to one bin-sigma
        #: per cell moves the model by ~sigma / cell_bins, negligible
        self._cell_bins = max(1.0, float(s["knot_spacing"]) ** 2 / b)
        self._flip_tolerance = max(1, int(1e-4 * act.size))
        #: positive outliers (faint unmasked stars, cosmic rays) are clipped at a lower level
        self._clip_high = float(s.get("clip_high_nsigma", s["clip_nsigma"]))

    def _factorise(self, prior):
        """Schur complement of the (diagonal) column block with per-column prior widths."""
        var = self.pixel_noise ** 2
        self.strap_precision = self._column_counts + var / np.asarray(prior, float) ** 2
        self.coupling_d = self.coupling / self.strap_precision[:, None]
        schur = self._A - self.coupling.T @ self.coupling_d
        self.chol = linalg.cholesky(schur, lower=True)

    def constrain_columns(self, free):
        """Tie the per-frame column offsets to their time-averaged values.

        A free offset per column and frame is measured from that column's usable pixels only
        (a few tens in a crowded field), so it adds ~noise/sqrt(n) of fit noise, correlated
        along the whole column, to every frame's model; a column with no usable pixel is left
        at its prior, +-``strap_prior`` (20 e-/s). Both swamp the photometry of faint stars.
        Column structure that is real but static is measured from the sum image (all frames:
        ``sqrt(N)`` less noise) and becomes the prior mean; only columns in ``free`` (straps,
        whose excess follows the changing sky) keep the loose ``strap_prior`` per frame, the
        others vary by at most ``column_prior``.

        The prior mean is the sum-image offsets minus their column-basis profile
        (:meth:`column_profile`, fitted on the tied columns): a function of the column alone
        is carried as well by the polynomial and spline, only the weak priors split it, and
        rounding left up to ~10^2 e-/s of it in the offsets; tied to them, the per-frame
        fits moved by ~5e-4 of it (0.017 e-/s rms on full frames, against a residual of
        0.04). Without it the prior mean holds only what the smooth terms cannot carry.
        """
        s = self.settings
        free = np.asarray(free, bool)
        offset = np.asarray(self.sum_fit.strap[0], dtype=float)
        tied = (self._column_counts > 0) & ~free
        if tied.sum() > 2 * self.cbasis.shape[1]:
            offset = np.where(self._column_counts > 0,
                              offset - self.column_profile(offset, tied), offset)
        prior = np.where(free, float(s["strap_prior"]), float(s["column_prior"]))
        self.strap_offset = offset
        self._factorise(prior)
        self.free_columns = free

    def column_profile(self, values, use):
        """Weighted least-squares fit (weights: usable pixels per column) of per-column
        ``values`` by the column basis on the columns ``use``, evaluated on every column.

        The column basis spans every function of the column alone the smooth terms can
        carry, so ``values - column_profile(values, ...)`` does not depend on how a fit split
        such a function between them and the column offsets.
        """
        w = np.sqrt(self._column_counts[use])
        coef = np.linalg.lstsq(self.cbasis[use] * w[:, None], np.asarray(values)[use] * w,
                               rcond=None)[0]
        return self.cbasis @ coef

    # -- linear algebra on blocks of frames ---------------------------------------------------
    # Binned frames are kept as (n_bins, n_frames, C) float32 arrays. The products with the
    # data contract its columns first (C -> the column basis, one contiguous GEMM of a
    # (n_bins * n_frames, C) matrix); the row basis then acts on 50x smaller arrays in float64.
    def _solve(self, ybar):
        """Weights (nf, n_terms) and straps (nf, C) for binned frames (n_bins, nf, C)."""
        nb, nf, C = ybar.shape
        mr, mc = self.rows.size, self.cols.size
        z = self._counts32[:, None, :] * ybar
        s = z.sum(axis=0, dtype=np.float64)                                 # (nf, C)
        hz = (z.reshape(nb * nf, C) @ self._cbasis32).reshape(nb, nf * mc)
        np.multiply(self._cd32[:, None, :], ybar, out=z)
        hd = (z.reshape(nb * nf, C) @ self._cbasis32).reshape(nb, nf * mc)
        g = self.rmean.T @ hz.astype(np.float64) + self.rslope.T @ hd.astype(np.float64)
        g = g.reshape(mr, nf, mc).transpose(1, 0, 2)                        # (nf, mr, mc)
        b = g[:, self.pairs[:, 0], self.pairs[:, 1]]
        rhs = b - s @ self.coupling_d
        w = linalg.cho_solve((self.chol, True), rhs.T, check_finite=False).T
        strap = (s - w @ self.coupling.T) / self.strap_precision
        return w, strap

    def weight_matrix(self, w):
        """Scatter term weights (nf, n_terms) into (nf, mr, mc) tensor coefficient matrices."""
        out = np.zeros((w.shape[0], self.rows.size, self.cols.size))
        out[:, self.pairs[:, 0], self.pairs[:, 1]] = w
        return out

    def _binned_model(self, w, strap):
        """Model of the binned frames, (n_bins, nf, C) float32."""
        nf = w.shape[0]
        mr, mc, C, nb = self.rows.size, self.cols.size, self.shape[1], self.n_bins
        wm = self.weight_matrix(w).transpose(1, 0, 2).reshape(mr, nf * mc)
        cbt = self._cbasis32.T
        m = (self.rmean @ wm).astype(np.float32).reshape(nb * nf, mc) @ cbt
        slope = (self.rslope @ wm).astype(np.float32).reshape(nb * nf, mc) @ cbt
        m = m.reshape(nb, nf, C)
        slope = slope.reshape(nb, nf, C)
        slope *= self._delta32[:, None, :]
        m += slope
        m += strap.astype(np.float32)[None, :, :]
        return m

    def bin_frames(self, images, flags=None, bad_bits=0):
        """Bin means (n_bins, nf, C) of the usable pixels of each frame (divided by the column
        gain), and the bins left without pixels.

        Pixels flagged with ``bad_bits`` or not finite in a frame drop out of that frame only.
        """
        nf = images.shape[0]
        R, C = self.shape
        b, nb = self.bin_rows, self.n_bins
        ybar = np.zeros((nb, nf, C), dtype=np.float32)
        missing = np.zeros((nb, nf, C), dtype=bool)
        buf = np.zeros((nb * b, C), dtype=np.float32)
        cnt = np.zeros((nb * b, C), dtype=np.float32)
        u3 = self._usable_f4.reshape(nb, b, C)
        inv_gain = (1.0 / self.gain).astype(np.float32)
        # bin means of the fast path: one multiply by 1 / (count * gain)
        scale = np.divide(inv_gain[None, :], self._counts32, out=np.zeros_like(self._counts32),
                          where=self.active)
        for i in range(nf):
            img = np.asarray(images[i], dtype=np.float32)
            # fast path: sums of the usable pixels in one pass (einsum: no product array;
            # NaN pixels give NaN bins) and the per-pixel path only when a usable pixel is
            # non-finite or flagged this frame
            if R == nb * b:
                sums = np.einsum("ikc,ikc->ic", img.reshape(nb, b, C), u3)
            else:
                buf[:R] = img
                sums = np.einsum("ikc,ikc->ic", buf.reshape(nb, b, C), u3)
            slow = not np.isfinite(sums).all()
            if not slow and flags is not None and bad_bits:
                fl = np.asarray(flags[i])
                slow = bool(np.bitwise_and(fl, self._flag_mask(bad_bits, fl.dtype)).any())
            if slow:
                good = self.usable & np.isfinite(img)
                if flags is not None and bad_bits:
                    good &= (np.asarray(flags[i]) & bad_bits) == 0
                buf[:R] = np.where(good, img, np.float32(0.0))
                sums = buf.reshape(nb, b, C).sum(axis=1)
                cnt[:R] = good
                n = cnt.reshape(nb, b, C).sum(axis=1)
                np.divide(sums, n, out=ybar[:, i, :], where=n > 0)
                ybar[:, i, :] *= inv_gain
                missing[:, i, :] = self.active & (n == 0)
            else:
                np.multiply(sums, scale, out=ybar[:, i, :])
        return ybar, missing

    def _flag_mask(self, bad_bits, dtype):
        """``bad_bits`` at the usable pixels, 0 elsewhere, in the flags' dtype: one AND
        tells whether any usable pixel is flagged."""
        key = (int(bad_bits), np.dtype(dtype))
        if key not in self._flag_masks:
            bits = int(bad_bits) & int(np.iinfo(dtype).max)
            self._flag_masks[key] = np.where(self.usable, bits, 0).astype(dtype)
        return self._flag_masks[key]

    def _noise(self, z):
        """Robust scale (1.4826 MAD) of each frame's normalised residuals (n_bins, nf, C) on
        the fixed sample of bins."""
        r, c = self._sample_rc
        if not r.size:
            return np.ones(z.shape[1])
        zi = z[r, :, c]                                                   # (n_sample, nf)
        return 1.4826 * np.median(np.abs(zi - np.median(zi, axis=0)), axis=0)

    def fit(self, images, flags=None, bad_bits=0, jitter_pixels=None):
        """Fit a block of frames (nf, R, C); returns a :class:`FrameFit`."""
        with _one_blas_thread():
            return self._fit(images, flags, bad_bits, jitter_pixels)

    def _fit(self, images, flags, bad_bits, jitter_pixels):
        s = self.settings
        ybar, missing = self.bin_frames(images, flags, bad_bits)
        # the fit solves for the column offsets' departure from their prior mean
        offset = self.strap_offset.astype(np.float32)
        if np.any(offset):
            ybar -= offset[None, None, :]
        nf = ybar.shape[1]
        active = self.active
        clip_k = float(s["clip_nsigma"])
        sqc = self._sqrt_counts32
        data = ybar.copy()
        for i in range(nf):  # start missing bins from a sensible level
            mi = missing[:, i, :]
            if mi.any():
                ok = active & ~mi
                data[:, i, :][mi] = np.median(ybar[:, i, :][ok]) if ok.any() else 0.0
        clipped = missing.copy()
        w, strap = self._solve(data)
        sigma = np.zeros(nf)
        todo = np.arange(nf)
        for _ in range(int(s["clip_iterations"])):
            every = todo.size == nf      # all frames: views, not copies
            yt = ybar if every else ybar[:, todo]
            model = self._binned_model(w[todo], strap[todo])                # (nb, nt, C)
            z = yt - model
            z *= sqc[:, None, :]
            sig = self._noise(z)
            sigma[todo] = sig
            new_clip = z > (self._clip_high * sig)[None, :, None]
            new_clip |= z < (-clip_k * sig)[None, :, None]
            new_clip &= active[:, None, :]
            new_clip |= missing if every else missing[:, todo]
            # re-solve when the clipped set changed by more than a few bins at the threshold
            # (each moves the solution by far less than the noise), or when the model-filled
            # bins are still moving (EM not yet converged)
            n_flip = np.count_nonzero(new_clip != (clipped if every else clipped[:, todo]),
                                      axis=(0, 2))
            changed = n_flip > self._flip_tolerance
            for j in np.flatnonzero(~changed):
                nc = new_clip[:, j, :]
                if nc.any():
                    step = (model[:, j, :] - data[:, todo[j], :])[nc] * sqc[nc]
                    changed[j] = np.sum(np.abs(step)) > 0.5 * sig[j] * self._cell_bins
            if every:
                clipped = new_clip
            else:
                clipped[:, todo] = new_clip
            for j in np.flatnonzero(changed):
                data[:, todo[j], :] = np.where(new_clip[:, j, :], model[:, j, :], yt[:, j, :])
            todo = todo[changed]
            if todo.size == 0:
                break
            w[todo], strap[todo] = self._solve(data[:, todo, :])
        strap = strap + self.strap_offset[None, :]
        jitter = None
        if jitter_pixels is not None and len(jitter_pixels[0]):
            jr, jc = jitter_pixels
            rb = self.rows.basis(jr)                                     # (np, mr)
            t = np.matmul(self.weight_matrix(w), self.cbasis[jc].T)      # (nf, mr, np)
            model = (np.einsum("pa,fap->fp", rb, t) + strap[:, jc]) * self.gain[jc]
            vals = np.stack([np.asarray(images[i])[jr, jc] for i in range(nf)])
            jitter = (vals - model).astype(np.float32)
        n_clipped = (clipped & ~missing).sum(axis=(0, 2))
        return FrameFit(w, strap, sigma * self.pixel_scale, n_clipped, jitter)

    def fit_gain(self, sumimage):
        """Per-column multiplicative response (straps) from the time-averaged image.

        A strap column reflects a fixed fraction of the light falling on it, so its excess
        scales with the local sky. Each column is compared with the columns three to each
        side in the same rows (where all three are usable): over 6 px the smooth background is
        linear, so their mean is the sky the column would have without the strap; the median
        ratio minus one is the strap fraction. Only significant positive excesses count (a
        column next to a strap sees a negative one). Frames are divided by ``1 + fraction``
        before the fit and the model multiplied back: the fit stays linear and the
        factorisation shared, and the per-frame additive column terms absorb the rest.
        """
        img = np.asarray(sumimage, dtype=np.float64)
        R, C = self.shape
        ok = self.usable & np.isfinite(img)
        k = 3
        frac = np.full(C, np.nan)
        if C > 2 * k:
            mid = img[:, k:C - k]
            ref = 0.5 * (img[:, :C - 2 * k] + img[:, 2 * k:])
            valid = ok[:, k:C - k] & ok[:, :C - 2 * k] & ok[:, 2 * k:]
            with np.errstate(invalid="ignore", divide="ignore"):
                valid &= ref > 0
                ratio = np.where(valid, mid / np.where(valid, ref, 1.0), np.nan)
            med = nanquantile_columns(ratio, 0.5)
            med[valid.sum(axis=0) < 4] = np.nan
            frac[k:C - k] = med - 1.0
        fin = np.isfinite(frac)
        gain = np.ones(C)
        if fin.sum() > 10:
            med = np.median(frac[fin])
            sig = 1.4826 * np.median(np.abs(frac[fin] - med))
            thr = max(float(self.settings["strap_nsigma"]) * sig, 1e-3)
            keep = fin & (frac - med > thr)
            gain[keep] = 1.0 + np.clip(frac[keep] - med, 0.0, 0.5)
        self.gain = gain
        self.sum_fit = self.fit(img.astype(np.float32)[None])
        return self.gain

    def evaluate(self, w, strap):
        """Full-resolution model (nf, R, C) for fitted weights (used by tests and plots)."""
        rb = self.rows.basis(np.arange(self.shape[0]))
        model = np.matmul(rb, np.matmul(self.weight_matrix(w), self._cbasis_t)) + strap[:, None, :]
        return model * self.gain
