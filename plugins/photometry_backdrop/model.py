"""The ``backdrop`` prepare stage: fit at prepare time, evaluate at any stamp and cadence.

Stored state (``models/backdrop`` group of the cache), far smaller than the images:

===================== =================== ====================================================
``weights``           (N, n_terms) f4     polynomial + spline weights of each frame
``strap``             (N, C) f4           per-column (strap) offsets of each frame, e-/s
``noise``             (N,) f4             residual scale of one pixel in that frame, e-/s
``n_clipped``         (N,) i4             bins rejected as outliers in that frame
``pairs``             (n_terms, 2) i4     (row-basis, column-basis) index of each term
``row_knots``         1-D f8              spline knots along rows (pixels)
``col_knots``         1-D f8              spline knots along columns (pixels)
``usable_mask``       (R, ceil(C/8)) u1   pixels used by the fit, ``np.packbits`` on axis 1
``saturated_mask``    (R, ceil(C/8)) u1   saturated/bleed pixels, packed the same way
``cov_chol``          (n, n) f4           Cholesky factor of the Schur-complemented normal
                                          matrix (unit noise), for ``evaluate_error``
``strap_coupling``    (C, n_terms) f4     strap/term coupling divided by strap precision
``strap_precision``   (C,) f8             diagonal of the strap block of the normal matrix
``gain``              (C,) f8             multiplicative column response (straps); the model
                                          is ``gain * (poly + spline + strap)``
``free_columns``      (C,) u1             1: the column's offset is free in every frame (a
                                          strap); 0: tied to its sum-image value within
                                          ``column_prior``
``jitter/pixels``     (n_pix, 2) i4       sampled (row, column) pixels near stars
``jitter/short`` etc. (N, k) f4           principal components of their residual series
``stamp_tables/*``    derived             transposed series and the static error map, so a
                                          stamp reads only its own terms and columns
                                          (:mod:`.stamp`, :func:`.stamp.write_stamp_tables`)
===================== =================== ====================================================

Attributes: ``version``, ``complete``, ``n_rows``, ``n_cols``, ``poly_degree``,
``bin_rows``, ``pixel_noise``, ``settings`` (JSON of the ``[backdrop]`` section).
"""
import itertools
import json
import logging
import time

import numpy as np
from scipy.ndimage import median_filter, uniform_filter1d
from tqdm import tqdm

from photometry.errors import ConfigurationError, InputError
from photometry.quality import PixelQualityFlags
from photometry.stages import BackgroundModel

from .fit import BackdropFitter, nanquantile_columns
from .masks import build_mask, read_catalog, star_pixels
from .stamp import StampEvaluator, write_stamp_tables

__all__ = ["Backdrop", "jitter_components"]

logger = logging.getLogger(__name__)

#: Pixel flags that keep a pixel out of the fit in that frame.
BAD_PIXEL_BITS = int(PixelQualityFlags.NotUsedForBackground | PixelQualityFlags.ManualExclude
                     | PixelQualityFlags.Saturated | PixelQualityFlags.NonFinite)

_POSITIVE = ("knot_spacing", "bin_rows", "poly_prior", "spline_prior", "strap_prior", "column_prior",
             "clip_nsigma", "saturation", "mask_box", "mask_nsigma", "catalog_radius")


def _options(settings):
    """The ``[backdrop]`` section, checked where it is given rather than deep in a fit."""
    try:
        s = dict(settings["backdrop"])
    except (KeyError, TypeError):
        raise ConfigurationError("settings: missing section [backdrop]") from None
    for key in _POSITIVE:
        if not float(s[key]) > 0:
            raise ConfigurationError(f"backdrop.{key}: must be > 0 (got {s[key]!r})")
    if int(s["poly_degree"]) < 0:
        raise ConfigurationError("backdrop.poly_degree: must be >= 0")
    return s


def jitter_components(resid, time, settings):
    """Principal components of pixel residual series in three time-scale bands.

    The residuals are split at gaps longer than ten median cadences; within each segment a
    boxcar of ``jitter_short`` cadences separates short from medium time-scales and one of
    ``jitter_long`` cadences medium from long. Returns a dict band -> (N, k) array of the
    leading left singular vectors scaled by their singular values (e-/s units).
    """
    n, npix = resid.shape
    k = int(settings["jitter_components"])
    x = np.nan_to_num(resid - np.nanmedian(resid, axis=0), nan=0.0).astype(np.float64)
    short = np.zeros_like(x)
    medium = np.zeros_like(x)
    long_ = np.zeros_like(x)
    t = np.asarray(time, float) if time is not None else np.arange(n, dtype=float)
    bounds = [0, n]
    finite = np.isfinite(t)
    if finite.sum() > 2:
        dt = np.diff(t)
        med = np.nanmedian(dt)
        if med > 0:
            bounds = [0] + list(np.flatnonzero(dt > 10 * med) + 1) + [n]
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = x[a:b]
        ws = min(int(settings["jitter_short"]), len(seg))
        wl = min(int(settings["jitter_long"]), len(seg))
        s1 = uniform_filter1d(seg, max(ws, 1), axis=0, mode="nearest")
        s2 = uniform_filter1d(s1, max(wl, 1), axis=0, mode="nearest")
        short[a:b], medium[a:b], long_[a:b] = seg - s1, s1 - s2, s2
    out = {}
    rng = np.random.default_rng(int(settings.get("seed", 0)))
    for name, band in (("short", short), ("medium", medium), ("long", long_)):
        u, sv = _leading_svd(band, k, rng)
        out[name] = (u * sv).astype(np.float32)
    return out


def _leading_svd(a, k, rng, oversample=10, power=3):
    """Leading ``k`` left singular vectors and values of ``a`` (n x p), randomized.

    Halko, Martinsson & Tropp (2011): a Gaussian sketch of ``k + oversample`` columns, a few
    power iterations (re-orthonormalised), then an exact SVD of the small projected matrix.
    O(n p k) time and O(n k) extra memory, linear in the number of frames ``n`` (the full
    SVD was O(n^2 p)); on backdrop residuals the components agree with the full SVD to
    ~1e-6 of the leading singular value.
    """
    n, p = a.shape
    kk = min(k, n, p)
    if kk == 0:
        return np.zeros((n, 0)), np.zeros(0)
    m = min(kk + oversample, n, p)
    if m >= min(n, p):  # small: the exact SVD is as cheap
        u, sv, _ = np.linalg.svd(a, full_matrices=False)
        return u[:, :kk], sv[:kk]
    q, _ = np.linalg.qr(a @ rng.standard_normal((p, m)))
    for _ in range(power):
        z, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ z)
    ub, sv, _ = np.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub)[:, :kk], sv[:kk]


def strap_columns(fitter, nsigma):
    """Columns whose per-frame offset stays free: straps and their neighbours.

    A strap is a column with a measured gain, or whose static offset in the sum-image fit
    stands ``nsigma`` robust sigma (over the columns with usable pixels) out of the running
    median of its 7 neighbourhood (the offsets also carry a smooth part of the sky, which the
    polynomial and spline share with them). A column without usable pixels is never free:
    nothing in a frame could measure it.
    """
    counts = fitter._column_counts
    offset = np.asarray(fitter.sum_fit.strap[0], dtype=float)
    has = counts > 0
    free = fitter.gain != 1.0
    if has.sum() > 10:
        idx = np.flatnonzero(has)
        local = np.zeros_like(offset)
        local[idx] = offset[idx] - median_filter(offset[idx], size=7, mode="nearest")
        offset = local
        vals = offset[has]
        med = np.median(vals)
        sig = 1.4826 * np.median(np.abs(vals - med))
        free |= has & (np.abs(offset - med) > max(nsigma * sig, 1e-6))
    free = free | np.r_[free[1:], False] | np.r_[False, free[:-1]]
    return free & has


class Backdrop(BackgroundModel):
    """CCD-wide background: polynomial + tensor B-spline + one offset per column, per frame.

    The fit is done at prepare time on the cache's full frames (see :mod:`.fit` for why it is
    fast); ``evaluate`` rebuilds the separable bases on any stamp.
    """

    name = "backdrop"
    version = "1"

    def __init__(self, settings):
        super().__init__(settings)
        self.options = _options(settings)

    # ------------------------------------------------------------------ prepare
    def run(self, cache, group):
        """Fit every frame of ``cache`` and store the model in ``group``."""
        s = self.options
        f = group.file
        t_start = time.perf_counter()
        for key in list(group.keys()):
            del group[key]
        n_frames, R, C = f["images"].shape
        if "sumimage" in f:
            sumimage = f["sumimage"][()]
        else:
            sumimage = self._mean_image(cache, (R, C))
        catalog = read_catalog(f)
        usable, sat, exclude = build_mask(sumimage, s, catalog)
        ref = int(f.attrs.get("ref_frame", 0))
        if "pixel_flags" in f and n_frames:
            ref_flags = f["pixel_flags"][ref]
            sat |= (ref_flags & int(PixelQualityFlags.Saturated)) != 0
            exclude |= sat | ((ref_flags & BAD_PIXEL_BITS) != 0)
            usable &= ~exclude
        blocks = iter(cache.iter_frame_blocks())
        first = next(blocks, None)
        if first is None:
            raise InputError(f"{f.filename}: backdrop: the cache holds no frames")
        noise = self._pixel_noise(first[2], usable)
        fitter = self._fitter(usable, noise, f.filename)
        fitter.fit_gain(sumimage)
        for _ in range(int(s["mask_refine"])):
            # the star mask again, now against the full model of the sum image (the same
            # model every frame gets), so only real sources stay masked
            res = sumimage - fitter.evaluate(fitter.sum_fit.weights, fitter.sum_fit.strap)[0]
            # a column with no usable pixel has no strap estimate: take its level from the
            # lower part of its residuals (stars only add light) so it can come back
            res = np.where(exclude, np.nan, res)
            col_level = nanquantile_columns(res, 0.3)
            res -= np.nan_to_num(col_level)[None, :]
            vals = res[usable & np.isfinite(res)]
            sigma = 1.4826 * np.median(np.abs(vals - np.median(vals)))
            new = ~(exclude | star_pixels(np.nan_to_num(res), sigma, s)) & np.isfinite(sumimage)
            if np.array_equal(new, usable):
                break
            usable = new
            fitter = self._fitter(usable, noise, f.filename)
            fitter.fit_gain(sumimage)
        fitter.constrain_columns(strap_columns(fitter, float(s["strap_nsigma"])))
        rng = np.random.default_rng(int(s["seed"]))
        cand = np.flatnonzero((~usable & ~sat & np.isfinite(sumimage)).ravel())
        npix = min(int(s["jitter_pixels"]), cand.size)
        pick = np.sort(rng.choice(cand, size=npix, replace=False)) if npix else cand[:0]
        jr, jc = np.unravel_index(pick, (R, C))
        t_setup = time.perf_counter() - t_start
        nt = len(fitter.pairs)
        ds = {
            "weights": group.create_dataset("weights", (n_frames, nt), "f4"),
            "strap": group.create_dataset("strap", (n_frames, C), "f4"),
            "noise": group.create_dataset("noise", (n_frames,), "f4"),
            "n_clipped": group.create_dataset("n_clipped", (n_frames,), "i4"),
        }
        jitter = np.zeros((n_frames, npix), dtype=np.float32)
        bar = tqdm(total=n_frames, desc="backdrop", unit="frame", leave=False,
                   disable=not bool(s.get("progress", True)))
        # frames that failed prepare's frame checks (all NaN, all zero, ...) are not fitted:
        # their model is NaN, so their photometry is NaN rather than wrong
        usable_frames = np.asarray(getattr(cache, "usable_frames", np.ones(n_frames, bool)))
        for sl, images, errors, flags in itertools.chain([first], blocks):
            ok = usable_frames[sl]
            nan = np.float32(np.nan)
            w, st, ns = (np.full((len(ok), nt), nan), np.full((len(ok), C), nan),
                         np.full(len(ok), nan))
            nc, jt = np.zeros(len(ok), np.int32), np.full((len(ok), npix), nan)
            if ok.any():
                res = fitter.fit(images[ok], flags[ok], BAD_PIXEL_BITS, (jr, jc))
                w[ok], st[ok], ns[ok], nc[ok] = res.weights, res.strap, res.noise, res.n_clipped
                if res.jitter is not None:
                    jt[ok] = res.jitter
            ds["weights"][sl] = w
            ds["strap"][sl] = st
            ds["noise"][sl] = ns
            ds["n_clipped"][sl] = nc
            jitter[sl] = jt
            bar.update(sl.stop - sl.start)
        bar.close()
        t_fit = time.perf_counter() - t_start - t_setup
        self._store(group, fitter, usable, sat, (jr, jc), jitter,
                    f["time"][()] if "time" in f else None)
        write_stamp_tables(group)
        # wall-clock seconds, for benchmarks: masks + factorisation, and the frame loop
        # (including reading the blocks from the cache)
        group.attrs["time_setup"] = t_setup
        group.attrs["time_fit"] = t_fit
        return group

    def _fitter(self, usable, noise, filename):
        if usable.sum() < 0.02 * usable.size:
            raise InputError(f"{filename}: backdrop: fewer than 2% of pixels are free of "
                             f"stars and flags ({usable.mean():.1%}); cannot fit a background")
        return BackdropFitter(usable, self.options, noise)

    @staticmethod
    def _pixel_noise(errors, usable):
        vals = np.asarray(errors)[:, usable]
        vals = vals[np.isfinite(vals) & (vals > 0)]
        return float(np.median(vals)) if vals.size else 1.0

    @staticmethod
    def _mean_image(cache, shape):
        total = np.zeros(shape)
        count = np.zeros(shape)
        for _, images, _, _ in cache.iter_frame_blocks():
            for img in images:
                ok = np.isfinite(img)
                total[ok] += img[ok]
                count += ok
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def _store(self, group, fitter, usable, sat, jitter_pixels, jitter, time):
        s = self.options
        R, C = fitter.shape
        group.create_dataset("pairs", data=fitter.pairs)
        group.create_dataset("row_knots", data=fitter.rows.knots)
        group.create_dataset("col_knots", data=fitter.cols.knots)
        group.create_dataset("usable_mask", data=np.packbits(usable, axis=1))
        group.create_dataset("saturated_mask", data=np.packbits(sat, axis=1))
        group.create_dataset("cov_chol", data=fitter.chol.astype(np.float32))
        group.create_dataset("strap_coupling", data=fitter.coupling_d.astype(np.float32))
        group.create_dataset("strap_precision", data=fitter.strap_precision)
        group.create_dataset("gain", data=fitter.gain)
        group.create_dataset("free_columns", data=fitter.free_columns.astype(np.uint8))
        jg = group.create_group("jitter")
        jg.create_dataset("pixels", data=np.stack(jitter_pixels, axis=1).astype(np.int32))
        if jitter.shape[1] and jitter.shape[0] > 2:
            for band, comps in jitter_components(jitter, time, s).items():
                jg.create_dataset(band, data=comps)
        group.attrs.update({
            "version": self.version, "n_rows": R, "n_cols": C,
            "poly_degree": int(s["poly_degree"]), "bin_rows": int(s["bin_rows"]),
            "pixel_noise": fitter.pixel_noise, "n_usable": int(usable.sum()),
            "settings": json.dumps(s, sort_keys=True),
        })
        group.attrs["complete"] = True

    # ------------------------------------------------------------------ evaluation
    @classmethod
    def evaluate(cls, group, row_slice, col_slice, frames=slice(None)):
        """Background (n_frames, rows, cols) in e-/s at a stamp (cube pixel indices).

        Reads only the stamp's terms and strap columns (:mod:`.stamp`), so the cost does not
        grow with the CCD's width or the number of terms.
        """
        return StampEvaluator.of(group).evaluate(group, row_slice, col_slice, frames)

    @classmethod
    def evaluate_error(cls, group, row_slice, col_slice, frames=slice(None)):
        """1-sigma statistical uncertainty (n_frames, rows, cols) of :meth:`evaluate`.

        ``noise[t] * sqrt(phi^T A^-1 phi)`` with ``A`` the unit-noise normal matrix (strap
        block folded in through its Schur complement); the square root is a static map per
        pixel, ``stamp_tables/error_scale`` (:func:`.stamp.error_scale`).
        """
        return StampEvaluator.of(group).evaluate_error(group, row_slice, col_slice, frames)
