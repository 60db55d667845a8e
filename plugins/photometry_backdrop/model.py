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
import json
import logging
import time
import warnings

import numpy as np
from scipy.ndimage import uniform_filter1d
from tqdm import tqdm

from photometry import (BackgroundModel, ConfigurationError, InputError, PixelQualityFlags,
                        StreamingStage)

from .fit import BackdropFitter, nanquantile_columns
from .masks import build_mask, star_pixels
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


def _segments(time, n):
    """Bounds of the segments between gaps longer than ten median cadences."""
    t = np.asarray(time, float) if time is not None else np.arange(n, dtype=float)
    bounds = [0, n]
    if np.isfinite(t).sum() > 2:
        med = np.nanmedian(np.diff(t))
        if med > 0:
            bounds = [0] + list(np.flatnonzero(np.diff(t) > 10 * med) + 1) + [n]
    return list(zip(bounds[:-1], bounds[1:]))


def _bands(resid, segments, settings):
    """(short, medium, long) float32 band series of residual series (n, pixels)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixel series
        x = np.asarray(resid, np.float32) - np.nanmedian(resid, axis=0).astype(np.float32)
    np.nan_to_num(x, copy=False, nan=0.0)
    s1 = np.empty_like(x)
    s2 = np.empty_like(x)
    for a, b in segments:
        ws = max(min(int(settings["jitter_short"]), b - a), 1)
        wl = max(min(int(settings["jitter_long"]), b - a), 1)
        uniform_filter1d(x[a:b], ws, axis=0, mode="nearest", output=s1[a:b])
        uniform_filter1d(s1[a:b], wl, axis=0, mode="nearest", output=s2[a:b])
    x -= s1    # short = x - s1
    s1 -= s2   # medium = s1 - s2; long = s2
    return x, s1, s2


BANDS = ("short", "medium", "long")


def jitter_components(resid, time, settings, group_pixels=256, oversample=10, power=3):
    """Principal components of pixel residual series in three time-scale bands.

    The residuals are split at gaps longer than ten median cadences; within each segment a
    boxcar of ``jitter_short`` cadences separates short from medium time-scales and one of
    ``jitter_long`` cadences medium from long. Returns a dict band -> (N, k) array of the
    leading left singular vectors scaled by their singular values (e-/s units).

    The components come from a randomized SVD (Halko, Martinsson & Tropp 2011: a Gaussian
    sketch of k + ``oversample`` columns, ``power`` power iterations, an exact SVD of the
    small projection), O(N pixels k) time. ``resid`` (N, pixels) may be an h5py dataset:
    every product with a band matrix is summed over groups of ``group_pixels`` pixels, whose
    bands are recomputed in each of the 2 ``power`` + 2 passes, so the memory is a few
    (N, ``group_pixels``) arrays and (N, k) sketches whatever the number of frames.
    """
    n, npix = resid.shape
    k = int(settings["jitter_components"])
    segments = _segments(time, n)
    kk = min(k, n, npix)
    if kk == 0:
        return {band: np.zeros((n, 0), np.float32) for band in BANDS}
    m = min(kk + oversample, n, npix)
    groups = [slice(a, min(a + int(group_pixels), npix)) for a in range(0, npix, group_pixels)]

    def each_group():
        for g in groups:
            yield g, _bands(resid[:, g], segments, settings)

    out = {}
    if m >= min(n, npix):  # small: the exact SVD of the whole bands is as cheap
        full = [np.concatenate(parts, axis=1) for parts in
                zip(*(bands for _, bands in each_group()))]
        for band, a in zip(BANDS, full):
            u, sv, _ = np.linalg.svd(a, full_matrices=False)
            out[band] = (u[:, :kk] * sv[:kk]).astype(np.float32)
        return out
    rng = np.random.default_rng(int(settings.get("seed", 0)))
    sketch = [rng.standard_normal((npix, m)).astype(np.float32) for _ in BANDS]

    def times_right(right):   # band @ right, right (npix, m) -> (n, m)
        acc = [np.zeros((n, m), np.float32) for _ in BANDS]
        for g, bands in each_group():
            for j, a in enumerate(bands):
                acc[j] += a @ right[j][g]
        return acc

    def times_left(left):     # left.T @ band, left (n, m) -> (m, npix)
        acc = [np.zeros((m, npix), np.float32) for _ in BANDS]
        for g, bands in each_group():
            for j, a in enumerate(bands):
                acc[j][:, g] = left[j].T @ a
        return acc

    q = [np.linalg.qr(y)[0] for y in times_right(sketch)]
    for _ in range(power):
        z = [np.linalg.qr(t.T)[0] for t in times_left(q)]
        q = [np.linalg.qr(y)[0] for y in times_right(z)]
    for band, qj, bj in zip(BANDS, q, times_left(q)):
        ub, sv, _ = np.linalg.svd(bj, full_matrices=False)
        out[band] = ((qj @ ub)[:, :kk] * sv[:kk]).astype(np.float32)
    return out


def strap_columns(fitter, nsigma):
    """Columns whose per-frame offset stays free: straps and their neighbours.

    A strap is a column with a measured gain, or whose static offset in the sum-image fit
    stands ``nsigma`` robust sigma out once the column-only part of the smooth model is
    projected out. Why the projection: a function of the column alone is carried equally well
    by the offsets or by the polynomial and spline (``sum_k R_k(r) = 1``), and only the weak
    priors split it, so the offsets hold an arbitrary smooth profile of up to ~10 e-/s set by
    rounding (a float32 right-hand side moves it). Residuals from a weighted fit of the
    offsets by the column basis do not depend on that split; scaled by ``sqrt(count)`` they
    are noise-like, so their robust sigma is a real noise scale. (The former test, offset
    minus its 7-column running median, collapsed to sigma 0 on the smooth profile and
    freed every column at one of its bends: 27-41 of 128 columns on a 128-px scene with one
    strap, and their fit noise raised the aperture noise by 2-3 %.) A column without usable
    pixels is never free: nothing in a frame could measure it.
    """
    counts = fitter._column_counts
    has = counts > 0
    free = fitter.gain != 1.0
    if has.sum() > 2 * fitter.cbasis.shape[1]:
        offset = np.asarray(fitter.sum_fit.strap[0], dtype=float)
        keep = has.copy()
        for _ in range(2):  # refit without the straps, which would pull the smooth part
            z = (offset - fitter.column_profile(offset, keep)) * np.sqrt(counts)
            med = np.median(z[keep])
            sig = 1.4826 * np.median(np.abs(z[keep] - med))
            keep = has & (np.abs(z - med) <= max(nsigma * sig, 1e-6))
        free |= has & ~keep
    free = free | np.r_[free[1:], False] | np.r_[False, free[:-1]]
    return free & has


class Backdrop(StreamingStage, BackgroundModel):
    """CCD-wide background: polynomial + tensor B-spline + one offset per column, per frame.

    A streaming prepare stage (:class:`photometry.data.stages.StreamingStage`): the masks and the
    factorisation are built once from the prepare preview, then every block of frames is
    fitted while ingest has it in memory (see :mod:`.fit` for why it is fast); ``evaluate``
    rebuilds the separable bases on any stamp.
    """

    name = "backdrop"
    version = "1"

    def __init__(self, settings):
        super().__init__(settings)
        self.options = _options(settings)

    # ------------------------------------------------------------------ prepare
    def begin(self, context, group):
        """Masks, column gains, the factorised normal matrix and the output datasets.

        Everything here comes from ``context`` (:class:`photometry.data.stages.StreamContext`):
        its preview image (during prepare the mean of ``prepare.preview_frames`` frames
        spread over the sector; the sum image in a second pass), the catalog, and the
        flags of the frame nearest the middle.
        """
        s = self.options
        t_start = time.perf_counter()
        for key in list(group.keys()):
            del group[key]
        n_frames, (R, C) = int(context.n_frames), tuple(context.shape)
        if n_frames == 0:
            raise InputError(f"{context.filename}: backdrop: the cache holds no frames")
        sumimage = np.asarray(context.preview_image, dtype=float)
        usable, sat, exclude = build_mask(sumimage, s, context.catalog)
        ref_flags = np.asarray(context.preview_flags)
        sat |= (ref_flags & int(PixelQualityFlags.Saturated)) != 0
        exclude |= sat | ((ref_flags & BAD_PIXEL_BITS) != 0)
        usable &= ~exclude
        errors = np.asarray(context.preview_errors)
        noise = self._pixel_noise(errors if errors.ndim == 3 else errors[None], usable)
        fitter = self._fitter(usable, noise, context.filename)
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
            fitter = self._fitter(usable, noise, context.filename)
            fitter.fit_gain(sumimage)
        fitter.constrain_columns(strap_columns(fitter, float(s["strap_nsigma"])))
        rng = np.random.default_rng(int(s["seed"]))
        cand = np.flatnonzero((~usable & ~sat & np.isfinite(sumimage)).ravel())
        npix = min(int(s["jitter_pixels"]), cand.size)
        pick = np.sort(rng.choice(cand, size=npix, replace=False)) if npix else cand[:0]
        nt = len(fitter.pairs)
        self._state = {
            "fitter": fitter, "usable": usable, "sat": sat, "group": group,
            "jitter_pixels": np.unravel_index(pick, (R, C)),
            # residual series of the jitter pixels, kept in the file (not in memory) until
            # finish turns them into components: 8 kB per frame for 2000 pixels
            "jitter": group.create_dataset(
                "_jitter_residuals", (n_frames, npix), "f4", fillvalue=np.nan,
                chunks=(min(context.time_chunk, n_frames), min(256, npix))) if npix else None,
            "ds": {"weights": group.create_dataset("weights", (n_frames, nt), "f4"),
                   "strap": group.create_dataset("strap", (n_frames, C), "f4"),
                   "noise": group.create_dataset("noise", (n_frames,), "f4"),
                   "n_clipped": group.create_dataset("n_clipped", (n_frames,), "i4")},
            "t_setup": time.perf_counter() - t_start, "t_fit": 0.0, "t_fit_cpu": 0.0,
            "bar": tqdm(total=n_frames, desc="backdrop", unit="frame", leave=False,
                        disable=not bool(s.get("progress", True))),
        }

    def add_block(self, frames, images, errors, pixel_flags, usable):
        """Fit one block of frames; frames that failed prepare's frame checks (all NaN, all
        zero, ...) are not fitted: their model is NaN, so their photometry is NaN rather
        than wrong."""
        st = self._state
        t0, c0 = time.perf_counter(), time.process_time()
        fitter, ds = st["fitter"], st["ds"]
        ok = np.asarray(usable, bool)
        k = len(ok)
        nt, C = len(fitter.pairs), fitter.shape[1]
        nan = np.float32(np.nan)
        w, strap, noise = np.full((k, nt), nan), np.full((k, C), nan), np.full(k, nan)
        n_clipped = np.zeros(k, np.int32)
        jitter = None
        if st["jitter"] is not None:
            jitter = np.full((k, st["jitter"].shape[1]), nan, np.float32)
        if ok.any():
            # the block itself when every frame is usable (the fit only reads it): a copy
            # of a full-frame block is 0.5 GB of images and 0.1 GB of flags
            if not ok.all():
                images, pixel_flags = images[ok], pixel_flags[ok]
            res = fitter.fit(images, pixel_flags, BAD_PIXEL_BITS, st["jitter_pixels"])
            w[ok], strap[ok], noise[ok], n_clipped[ok] = (res.weights, res.strap, res.noise,
                                                          res.n_clipped)
            if res.jitter is not None and jitter is not None:
                jitter[ok] = res.jitter
        if jitter is not None:
            st["jitter"][frames] = jitter
        ds["weights"][frames] = w
        ds["strap"][frames] = strap
        ds["noise"][frames] = noise
        ds["n_clipped"][frames] = n_clipped
        st["bar"].update(k)
        st["t_fit"] += time.perf_counter() - t0
        st["t_fit_cpu"] += time.process_time() - c0

    def finish(self, cache, group):
        """The fixed state (masks, factorisation, gains) and the jitter components."""
        st = self._state
        st["bar"].close()
        f = group.file
        self._store(group, st["fitter"], st["usable"], st["sat"], st["jitter_pixels"],
                    st["jitter"], f["time"][()] if "time" in f else None)
        write_stamp_tables(group)
        if "_jitter_residuals" in group:
            del group["_jitter_residuals"]
        # seconds, for benchmarks: masks + factorisation and the block fits (wall), the block
        # fits' CPU time (all threads of the process)
        group.attrs["time_setup"] = st["t_setup"]
        group.attrs["time_fit"] = st["t_fit"]
        group.attrs["time_fit_cpu"] = st["t_fit_cpu"]
        self._state = None
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
        if jitter is not None and jitter.shape[1] and jitter.shape[0] > 2:
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
