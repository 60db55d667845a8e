"""The scattered-light cube: a binned, star-free picture of the sky in every cadence.

Why a cube: scattered light from the Earth and Moon is smooth over tens of pixels but changes
from cadence to cadence. Storing a robust statistic of the star-free pixels in 16x16 (or 8x8)
bins per cadence keeps the whole CCD-wide, time-resolved sky in a few MB, from which any
stamp's sky is interpolated later (``correct.evaluate``).

In memory a cube is an :class:`SLCube`; in the cache it is the ``models/scattered_light``
group (:func:`write_group` / :func:`read_group`); on disk it can be exported to, and imported
from, the FITS layout tess-backml writes (:func:`write_fits` / :func:`read_fits`).

Terms (see ``docs/scattered_light.md``):

* ``values`` (nt, ny, nx): per-bin median of ``image - reference`` in each cadence, e-/s,
  where ``reference`` is the stored background model named by ``reference`` (``"none"``:
  nothing, so ``values`` is the total sky, pedestal included).
* ``static`` (ny, nx): per-bin median of ``values`` over the ``n_dark`` darkest cadences
  (tess-backml's "static scene"); the FITS export writes ``values - static`` like tess-backml.
* ``column_gain`` (C,): multiplicative sky response of each science column (1 except in strap
  columns, which reflect extra light); the model at a pixel is ``gain[col] * spline(values)``.
"""
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from photometry import (disc_mask, InputError, LightCurveQualityFlags, open_fits,
                        PixelQualityFlags, TESSQualityFlags)

from .interp import axis_weights, segments

__all__ = ["SLCube", "CubeBuilder", "bin_statistics", "column_gain", "static_mask",
           "mask_layers", "relax_mask",
           "bin_time", "write_group", "read_group", "write_fits", "read_fits", "BTJD0"]

#: JD of BTJD 0 (tess-backml writes its TIME table in JD).
BTJD0 = 2457000.0

#: Pixel flags that keep a pixel out of its bin in that frame.
BAD_PIXEL_BITS = int(PixelQualityFlags.ManualExclude | PixelQualityFlags.Saturated
                     | PixelQualityFlags.NonFinite | PixelQualityFlags.NotUsedForBackground)


@dataclass
class SLCube:
    """A scattered-light cube and everything needed to evaluate it.

    ``bin_rows``/``bin_cols`` are the bin centres in 0-based CCD coordinates (our cubes: bin
    ``i`` covers science rows ``i*b .. i*b+b-1`` so its centre is ``row_offset + i*b +
    (b-1)/2``). ``time`` is BTJD (bin centres when ``time_binned``).
    """

    values: np.ndarray
    errors: np.ndarray
    counts: np.ndarray
    time: np.ndarray
    bin_rows: np.ndarray
    bin_cols: np.ndarray
    bin_size: int
    static: np.ndarray = None
    column_gain: np.ndarray = None
    gain_column_offset: int = 44
    cadenceno: np.ndarray = None
    quality: np.ndarray = None
    time_binned: bool = False
    time_bin_hours: float = 0.0
    reference: str = "none"
    sector: int = 0
    camera: int = 0
    ccd: int = 0
    meta: dict = field(default_factory=dict)
    #: (nt,) int32 LightCurveQualityFlags per cube frame (ScatteredLightUnreliable where the
    #: frame had too few measured bins or none at all); the correction ORs them into the
    #: cadences that use that frame.
    flags: np.ndarray = None

    def __post_init__(self):
        self.values = np.asarray(self.values, dtype=np.float64)
        self.errors = np.asarray(self.errors, dtype=np.float64)
        if self.values.ndim != 3 or self.errors.shape != self.values.shape:
            raise ValueError(f"cube values {self.values.shape} and errors "
                             f"{self.errors.shape} must be equal (nt, ny, nx) shapes")
        self.time = np.asarray(self.time, dtype=np.float64)
        self.bin_rows = np.asarray(self.bin_rows, dtype=np.float64)
        self.bin_cols = np.asarray(self.bin_cols, dtype=np.float64)
        nt, ny, nx = self.values.shape
        if self.time.shape != (nt,) or self.bin_rows.shape != (ny,) \
                or self.bin_cols.shape != (nx,):
            raise ValueError("cube time/bin_rows/bin_cols do not match the values' shape")
        if self.static is None:
            self.static = np.zeros((ny, nx))
        if self.cadenceno is None:
            self.cadenceno = np.full(nt, -1, dtype=np.int64)
        if self.quality is None:
            self.quality = np.zeros(nt, dtype=np.int64)
        if self.flags is None:
            self.flags = np.zeros(nt, dtype=np.int32)
        self.flags = np.asarray(self.flags, dtype=np.int32)
        if self.flags.shape != (nt,):
            raise ValueError(f"cube flags {self.flags.shape} do not match {nt} frames")

    @property
    def shape(self):
        return self.values.shape

    def gain_at(self, cols):
        """Column response at 0-based CCD columns ``cols`` (1 outside the stored range)."""
        cols = np.asarray(cols, dtype=int)
        if self.column_gain is None:
            return np.ones(cols.shape)
        idx = cols - int(self.gain_column_offset)
        ok = (idx >= 0) & (idx < self.column_gain.size)
        out = np.ones(cols.shape)
        out[ok] = self.column_gain[idx[ok]]
        return out


# ------------------------------------------------------------------------------ statistics
def bin_statistics(images, mask, bin_size, min_pixels=10, errors=None):
    """Per-bin median, its error and the number of pixels, for a block of frames.

    Why a sort instead of ``nanmedian``: one sort of the (frames, bins, b*b) array gives the
    median and the quantiles of every bin at once, 5-10x faster than ``nanmedian`` plus a
    separate scatter estimate, and it is exact with a different pixel count in every bin.

    Parameters
    ----------
    images : (n, R, C) array
    mask : (n, R, C) or (R, C) bool
        True where a pixel must not be used.
    bin_size : int
    min_pixels : int
        Bins with fewer usable pixels are NaN.
    errors : (n, R, C) array, optional
        Pixel uncertainties. If given, sigma is their mean over the bin's usable pixels (the
        noise of one pixel); otherwise the 16-84 % range of the values, which also holds the
        static structure of the bin (faint stars, gradients) and so overstates the error.

    Returns
    -------
    median, error, count : (n, ny, nx) arrays
        ``error`` = 1.2533 * sigma / sqrt(count) (the standard error of a median of Gaussian
        samples).
    """
    images = np.asarray(images, dtype=np.float32)
    n, R, C = images.shape
    b = int(bin_size)
    ny, nx = -(-R // b), -(-C // b)
    work = np.full((n, ny * b, nx * b), np.inf, dtype=np.float32)
    bad = np.broadcast_to(mask, images.shape) | ~np.isfinite(images)
    work[:, :R, :C] = np.where(bad, np.inf, images)
    cells = work.reshape(n, ny, b, nx, b).transpose(0, 1, 3, 2, 4).reshape(n, ny, nx, b * b)
    cells.sort(axis=-1)
    count = np.isfinite(cells).sum(axis=-1)
    k = np.maximum(count, 1)

    def quantile(q):
        pos = q * (k - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, k - 1)
        frac = pos - lo
        vlo = np.take_along_axis(cells, lo[..., None], axis=-1)[..., 0]
        vhi = np.take_along_axis(cells, hi[..., None], axis=-1)[..., 0]
        return vlo + frac * (vhi - vlo)

    with np.errstate(invalid="ignore"):
        median = quantile(0.5).astype(np.float64)
        sigma = 0.5 * (quantile(0.8413) - quantile(0.1587)).astype(np.float64)
    if errors is not None:
        e = np.full((n, ny * b, nx * b), np.nan, dtype=np.float32)
        e[:, :R, :C] = np.where(bad, np.nan, np.asarray(errors, dtype=np.float32))
        e = e.reshape(n, ny, b, nx, b)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            esig = np.nanmean(e, axis=(2, 4)).astype(np.float64)
        sigma = np.where(np.isfinite(esig), esig, sigma)
    error = 1.2533 * sigma / np.sqrt(k)
    few = count < max(int(min_pixels), 1)
    median[few] = np.nan
    error[few] = np.nan
    return median, error, count


def _fill_empty(values, errors):
    """Fill NaN bins of each frame from their valid neighbours (growing rings).

    Why: a bin can be fully masked (a saturated star, a strap cluster); the spline needs a
    value there. Neighbour means are smooth and local; the filled bins get twice the largest
    neighbouring error so the uncertainty says they were not measured. A frame without any
    valid bin is left NaN (``empty``) for :func:`_fill_frames`: one bad frame (all pixels
    flagged) is a reason to flag that cadence, not to fail the whole cube.

    Returns
    -------
    values, errors : filled copies
    empty : (n,) bool, frames that had no valid bin at all (still NaN)
    """
    values = values.copy()
    errors = errors.copy()
    empty = ~np.isfinite(values).reshape(len(values), -1).any(axis=1)
    live = np.flatnonzero(~empty)
    if live.size == 0:
        return values, errors, empty
    v_all, e_all = values[live], errors[live]
    kernel = np.ones((1, 3, 3))
    for _ in range(max(values.shape[1:])):
        bad = ~np.isfinite(v_all)
        if not bad.any():
            break
        good = ~bad
        v = np.where(good, v_all, 0.0)
        e = np.where(good & np.isfinite(e_all), e_all, 0.0)
        s = ndimage.convolve(v, kernel, mode="constant")
        w = ndimage.convolve(good.astype(float), kernel, mode="constant")
        emax = ndimage.maximum_filter(e, size=(1, 3, 3), mode="constant")
        fill = bad & (w > 0)
        v_all[fill] = s[fill] / w[fill]
        e_all[fill] = 2.0 * emax[fill]
    values[live], errors[live] = v_all, e_all
    return values, errors, empty


def _fill_frames(values, errors, empty):
    """Fill frames without any valid bin from the nearest valid frames in time.

    Why: a frame whose pixels are all flagged (or masked) still needs a cube slice so the
    cube stays aligned with the cache's cadences; the linear interpolation between the
    frames before and after (or the nearest one at an end) is the best guess, its error is
    doubled, and the caller flags the cadence ScatteredLightUnreliable.

    Raises
    ------
    InputError
        No frame has a usable bin: there is no sky to interpolate from.
    """
    if not empty.any():
        return values, errors
    ok = np.flatnonzero(~empty)
    if ok.size == 0:
        raise InputError("scattered-light cube: no frame has a usable bin (every pixel is "
                         "masked or flagged); nothing to measure the sky from")
    values = values.copy()
    errors = errors.copy()
    for k in np.flatnonzero(empty):
        after = ok[ok > k]
        before = ok[ok < k]
        if before.size and after.size:
            a, b = before[-1], after[0]
            w = (k - a) / (b - a)
            values[k] = (1 - w) * values[a] + w * values[b]
            errors[k] = 2.0 * np.maximum(errors[a], errors[b])
        else:
            j = before[-1] if before.size else after[0]
            values[k] = values[j]
            errors[k] = 2.0 * errors[j]
    return values, errors


# ------------------------------------------------------------------------------ masks
def _smooth(image, exclude, box):
    """Smooth version of ``image``: median of usable pixels in box cells, bilinear.

    Cells with too few usable pixels take their neighbours' value; if no cell has any (a
    tiny, crowded field), the median of whatever is usable, else of every finite pixel.
    """
    med, _, _ = bin_statistics(image[None], exclude[None], box, min_pixels=3)
    med, _, empty = _fill_empty(med, np.zeros_like(med))
    if empty[0]:
        use = ~exclude & np.isfinite(image)
        if not use.any():
            use = np.isfinite(image)
        med[:] = np.median(image[use]) if use.any() else 0.0
    R, C = image.shape
    rr = (np.arange(R) + 0.5) / box - 0.5
    cc = (np.arange(C) + 0.5) / box - 0.5
    return ndimage.map_coordinates(med[0], np.meshgrid(rr, cc, indexing="ij"), order=1,
                                   mode="nearest")


def static_mask(sumimage, settings, catalog=None, flags=None, gain=None):
    """Pixels never used for the cube: stars, saturation bleed, bad pixels (strict mask).

    See :func:`mask_layers`; this is its ``mask``.
    """
    return mask_layers(sumimage, settings, catalog, flags, gain)[0]


def mask_layers(sumimage, settings, catalog=None, flags=None, gain=None):
    """The strict static mask, the part of it that can never be relaxed, and a star score.

    Why both star masks: the sum-image threshold finds every source bright enough to bias a
    bin median; the catalog discs cover the PRF wings of bright stars that fall below that
    threshold. Why the discs only where the sum image is raised (``catalog_nsigma``) and
    at most ``catalog_max_radius``: the sqrt(flux) radius of a Tmag 5 star is 60 px, which
    in a small or dense field masks everything, yet its wings beyond a few pixels are below
    the noise and do not bias a median.

    Parameters
    ----------
    sumimage : (R, C) array
    settings : dict
        The ``[scattered_light]`` section.
    catalog : (rows, cols, tmag) arrays in cube pixel indices, optional
    flags : (R, C) pixel flags of the reference frame, optional
    gain : (C,) column gain, optional
        The sum image is divided by it first, so strap columns (a few % brighter) do not
        look like starlight to the catalog discs' threshold. :func:`build_cube` therefore
        derives the gains from the mask without catalog discs, then asks again with them.

    Returns
    -------
    mask : (R, C) bool, True = masked (strict).
    hard : (R, C) bool, masked pixels no fallback may use (non-finite, flagged bad,
        saturated and their bleed).
    score : (R, C) float, the sum-image excess over the smooth sky in robust sigma: the
        fallback (:func:`relax_mask`) uses the lowest-scoring pixels first.
    """
    s = settings
    img = np.asarray(sumimage, dtype=float)
    if gain is not None:
        img = img / np.asarray(gain, dtype=float)[None, :]
    hard = ~np.isfinite(img)
    if flags is not None:
        hard |= (np.asarray(flags).astype(np.int64) & BAD_PIXEL_BITS) != 0
    box = max(int(s["bin_size"]), 4)
    smooth = _smooth(np.where(hard, 0, img), hard, box)
    resid = img - smooth
    vals = resid[~hard]
    sigma = 1.4826 * np.median(np.abs(vals - np.median(vals))) if vals.size else 1.0
    sigma = sigma if np.isfinite(sigma) and sigma > 0 else 1.0
    stars = (resid > float(s["star_nsigma"]) * sigma) & ~hard
    # the fallback's score against a sky that leaves those stars out: around a bright star
    # (or in a crowded box) the first sky estimate is pulled up, and pixels still full of
    # starlight would look faint
    clean = _smooth(np.where(hard, 0, img), hard | ndimage.binary_dilation(stars), box)
    score = np.where(hard, np.inf, (img - clean) / sigma)
    mask = hard.copy()
    dil = int(s["star_dilate"])
    if dil > 0:
        stars = ndimage.binary_dilation(stars, iterations=dil)
    mask |= stars
    # saturated pixels and their bleed columns (+- rows along the column, +-2 columns)
    sat = img > float(s["saturation"])
    if flags is not None:
        sat |= (np.asarray(flags).astype(np.int64) & int(PixelQualityFlags.Saturated)) != 0
    if sat.any():
        m = int(s["bleed_margin"])
        sat = ndimage.binary_dilation(sat, structure=np.ones((2 * m + 1, 5), dtype=bool))
        hard |= sat
        mask |= sat
    if catalog is not None:
        rows, cols, tmag = (np.asarray(a, dtype=float) for a in catalog)
        bright = np.isfinite(tmag) & (tmag <= float(s["catalog_tmag"]))
        radius = float(s["catalog_radius"]) * np.sqrt(
            10 ** (-0.4 * (tmag[bright] - float(s["catalog_tmag"]))))
        rmax = float(s.get("catalog_max_radius", 40.0))
        discs = disc_mask(img.shape, rows[bright], cols[bright], np.minimum(radius, rmax))
        mask |= discs & (score > float(s.get("catalog_nsigma", 1.0)))
    return mask, hard, score


def relax_mask(mask, hard, score, bin_size, min_pixels, max_score=np.inf):
    """Unmask, in holes of the strict mask, the faintest pixels of each bin.

    Why: in a dense or small field (or around a bright star) the strict mask can take
    whole groups of bins. A short bin with a measured neighbour is filled from its
    neighbours (that was measured best on the simulated scene: pixels the strict mask took
    sit in star wings, which pointing jumps modulate). A short bin with no measured
    neighbour (the inside of a hole, or a frame with no measured bin at all) is measured
    instead on its ``min_pixels`` least star-affected pixels (lowest ``score``; never
    ``hard`` ones). Their sum-image selection is fixed in time, so the cube still follows
    the glow's changes exactly; only the static level can carry a little starlight. Pixels
    scoring above ``max_score`` are never used: inside a bright star's PRF even the
    faintest pixels carry starlight that pointing jitter modulates, so such a bin is better
    filled from its neighbours.

    Returns
    -------
    mask : (R, C) bool, the relaxed mask
    relaxed : (ny, nx) int, pixels given back per bin
    """
    mask = np.asarray(mask, dtype=bool).copy()
    R, C = mask.shape
    b = int(bin_size)
    ny, nx = -(-R // b), -(-C // b)
    need = max(int(min_pixels), 1)
    relaxed = np.zeros((ny, nx), dtype=np.int64)
    _, _, count = bin_statistics(np.zeros((1, R, C), np.float32), mask, b, 0)
    ok = count[0] >= need
    lonely = ~ok & ~ndimage.maximum_filter(ok, size=3, mode="constant")
    for i, j in zip(*np.nonzero(lonely)):
        rs, cs = slice(i * b, min((i + 1) * b, R)), slice(j * b, min((j + 1) * b, C))
        m = mask[rs, cs]
        have = int((~m).sum())
        cand = m & ~hard[rs, cs] & (score[rs, cs] <= max_score)
        if not cand.any():
            continue
        sc = np.where(cand, score[rs, cs], np.inf).ravel()
        take = np.argsort(sc, kind="stable")[:min(need - have, int(cand.sum()))]
        flat = m.ravel().copy()
        flat[take] = False
        mask[rs, cs] = flat.reshape(m.shape)
        relaxed[i, j] = take.size
    return mask, relaxed


def column_gain(sumimage, mask, settings):
    """Multiplicative sky response of each column (straps), from the star-free sum image.

    Why multiplicative: straps on the back of the CCD reflect part of the light that
    passes through, so a strap column sees a fixed fraction more of whatever sky falls on
    it; the same gain then holds when the glow rises. Columns whose median ratio to the
    smooth sky differs from 1 by less than ``strap_nsigma`` of its error keep gain 1.

    Returns
    -------
    gain : (C,) array, strap : (C,) bool (columns with a significant gain)
    """
    img = np.asarray(sumimage, dtype=float)
    R, C = img.shape
    # smooth along rows only over big cells so one column does not pull its own baseline
    box = max(int(settings["bin_size"]), 8)
    smooth = _smooth(np.where(mask, 0, img), mask, box)
    ratio = np.where(mask | (smooth <= 0), np.nan, img / np.where(smooth > 0, smooth, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(ratio, axis=0)
        spread = 1.4826 * np.nanmedian(np.abs(ratio - med[None]), axis=0)
    n = np.sum(np.isfinite(ratio), axis=0)
    err = 1.2533 * spread / np.sqrt(np.maximum(n, 1))
    # columns next to a strap pull the smooth baseline; compare with a running median
    base = ndimage.median_filter(np.nan_to_num(med, nan=1.0), size=31, mode="nearest")
    excess = med / base - 1.0
    strap = (n >= 10) & np.isfinite(excess) & (np.abs(excess) > 0.002) & \
        (np.abs(excess) > float(settings["strap_nsigma"]) * np.maximum(err, 1e-6))
    gain = np.ones(C)
    gain[strap] = 1.0 + excess[strap]
    return gain, strap


# ------------------------------------------------------------------------------ building
class CubeBuilder:
    """Accumulates the cube block by block (prepare streams the frames once).

    Parameters
    ----------
    shape : (R, C) science-region shape
    row_offset, column_offset : int, 0-based CCD position of pixel [0, 0]
    mask : (R, C) bool, the static mask (:func:`static_mask`)
    gain : (C,) column gain (:func:`column_gain`); images are divided by it before binning
    settings : the ``[scattered_light]`` section
    """

    def __init__(self, shape, row_offset, column_offset, mask, gain, settings):
        self.shape = tuple(shape)
        self.row_offset = int(row_offset)
        self.column_offset = int(column_offset)
        self.mask = np.asarray(mask, dtype=bool)
        self.gain = np.asarray(gain, dtype=np.float32)
        self.settings = settings
        self.bin_size = int(settings["bin_size"])
        self.min_pixels = int(settings["min_pixels"])
        self.min_bin_fraction = float(settings.get("min_bin_fraction", 0.5))
        self._values, self._errors, self._measured = [], [], []
        b = self.bin_size
        R, C = self.shape
        ny, nx = -(-R // b), -(-C // b)
        # centre of the usable part of each bin (a partial last bin is narrower)
        self.bin_rows = self.row_offset + np.array(
            [(i * b + min((i + 1) * b, R) - 1) / 2.0 for i in range(ny)])
        self.bin_cols = self.column_offset + np.array(
            [(j * b + min((j + 1) * b, C) - 1) / 2.0 for j in range(nx)])
        _, _, count = bin_statistics(np.zeros((1,) + self.shape, np.float32), self.mask, b, 0)
        self._wr = axis_weights(self.bin_rows, self.row_offset + np.arange(R)).astype(np.float32)
        self._wc = axis_weights(self.bin_cols, self.column_offset + np.arange(C)).astype(
            np.float32)
        self.counts = count[0].astype(np.int64)

    def add(self, images, flags=None, reference=None, errors=None):
        """Bin one block of frames ``(n, R, C)``; ``reference`` is subtracted first."""
        images = np.asarray(images, dtype=np.float32)
        if reference is not None:
            images = images - np.asarray(reference, dtype=np.float32)
        images = images / self.gain[None, None, :]
        mask = self.mask[None]
        if flags is not None:
            mask = mask | ((np.asarray(flags) & BAD_PIXEL_BITS) != 0)
        if errors is not None:
            errors = np.asarray(errors, dtype=np.float32) / self.gain[None, None, :]
        med, err, _ = bin_statistics(images, mask, self.bin_size, self.min_pixels, errors)
        measured = np.isfinite(med).reshape(len(med), -1).mean(axis=1)
        if bool(self.settings.get("refine", True)) and med.shape[1] * med.shape[2] > 1:
            # Second pass: the median of the residuals from the smooth first-pass model.
            # Why: with most of a bin masked (stars), its usable pixels are not centred in
            # it, and across a steep glow gradient their median is the sky somewhere else;
            # residuals from a model that follows the gradient have no such offset.
            # Frames without any measured bin stay NaN (filled in time by finish()).
            filled, _, empty = _fill_empty(med, err)
            live = ~empty
            if live.any():
                model = np.matmul(np.matmul(self._wr, filled[live].astype(np.float32)),
                                  self._wc.T)
                m = mask if mask.shape[0] == 1 else mask[live]
                dmed, _, _ = bin_statistics(images[live] - model, m, self.bin_size,
                                            self.min_pixels)
                med[live] = filled[live] + dmed
        self._values.append(med)
        self._errors.append(err)
        self._measured.append(measured)

    def finish(self, time, cadenceno=None, quality=None, **meta):
        """The :class:`SLCube` (empty bins filled, static level from the darkest frames)."""
        values = np.concatenate(self._values)
        errors = np.concatenate(self._errors)
        measured = np.concatenate(self._measured)
        values, errors, empty = _fill_empty(values, errors)
        values, errors = _fill_frames(values, errors, empty)
        # a frame measured in too few bins is a guess from its neighbours: flag it, do not
        # fail the cube for it
        few = measured < self.min_bin_fraction
        flags = np.where(few, int(LightCurveQualityFlags.ScatteredLightUnreliable), 0)
        info = dict(meta.pop("meta", None) or {})
        info.update(n_empty_frames=int(empty.sum()), n_flagged_frames=int(few.sum()),
                    min_measured_fraction=float(measured.min()) if measured.size else 0.0)
        cube = SLCube(values=values, errors=errors, counts=self.counts, time=time,
                      bin_rows=self.bin_rows, bin_cols=self.bin_cols, bin_size=self.bin_size,
                      column_gain=self.gain.astype(np.float64),
                      gain_column_offset=self.column_offset, cadenceno=cadenceno,
                      quality=quality, flags=flags, meta=info, **meta)
        cube.static = dark_level(cube, int(self.settings["n_dark"]))
        return cube


def dark_level(cube, n_dark):
    """Per-bin median of the ``n_dark`` darkest good cadences (tess-backml's static scene)."""
    good = TESSQualityFlags.filter(cube.quality) & np.all(np.isfinite(cube.values), (1, 2))
    if (good & (cube.flags == 0)).any():
        good &= cube.flags == 0       # frames guessed from their neighbours are no dark level
    idx = np.flatnonzero(good) if good.any() else np.arange(len(cube.time))
    level = np.median(cube.values[idx], axis=(1, 2))
    dark = idx[np.argsort(level)[:max(int(n_dark), 1)]]
    return np.median(cube.values[dark], axis=0)


def bin_time(cube, hours, gap_factor=3.0):
    """Average the cube in ``hours``-long windows within each orbit (bad cadences skipped).

    Why: a binned cube is smaller and less noisy, at the price of interpolating in time;
    windows never straddle a data gap (longer than ``gap_factor`` median cadences), and the
    last window of a segment keeps the remainder. The error of a bin is the quadrature mean.
    """
    if not hours or hours <= 0:
        return cube
    t = cube.time
    width = float(hours) / 24.0
    good = TESSQualityFlags.filter(cube.quality)
    if not good.any():
        good = np.ones(t.size, dtype=bool)
    seg = segments(t, gap_factor)
    vals, errs, times, cads, flags = [], [], [], [], []
    for s0, s1 in seg:
        ts = t[s0:s1]
        edges = np.arange(ts[0], ts[-1] + width, width)
        index = np.clip(np.searchsorted(edges, ts, side="right") - 1, 0, None)
        for k in np.unique(index):
            sel = np.flatnonzero(index == k) + s0
            use = sel[good[sel]]
            if use.size == 0:
                continue
            vals.append(cube.values[use].mean(axis=0))
            errs.append(np.sqrt((cube.errors[use] ** 2).sum(axis=0)) / use.size)
            times.append(t[use].mean())
            cads.append(int(cube.cadenceno[use[0]]))
            flags.append(int(np.bitwise_or.reduce(cube.flags[use])))
    out = SLCube(values=np.array(vals), errors=np.array(errs), counts=cube.counts,
                 time=np.array(times), bin_rows=cube.bin_rows, bin_cols=cube.bin_cols,
                 bin_size=cube.bin_size, static=cube.static, column_gain=cube.column_gain,
                 gain_column_offset=cube.gain_column_offset, cadenceno=np.array(cads),
                 quality=np.zeros(len(times), dtype=np.int64), time_binned=True,
                 time_bin_hours=float(hours), reference=cube.reference, sector=cube.sector,
                 camera=cube.camera, ccd=cube.ccd, meta=dict(cube.meta),
                 flags=np.array(flags, dtype=np.int32))
    return out


# ------------------------------------------------------------------------------ HDF5
_ARRAYS = ("values", "errors", "counts", "time", "bin_rows", "bin_cols", "static",
           "column_gain", "cadenceno", "quality", "flags")
_SCALARS = ("bin_size", "gain_column_offset", "time_binned", "time_bin_hours", "reference",
            "sector", "camera", "ccd")


def write_group(cube, group):
    """Store ``cube`` in an h5py group (datasets + attributes; see ``docs/scattered_light.md``)."""
    for key in list(group.keys()):
        del group[key]
    for name in _ARRAYS:
        value = getattr(cube, name)
        if value is None:
            continue
        dtype = np.float32 if name in ("values", "errors", "static") else None
        group.create_dataset(name, data=np.asarray(value, dtype=dtype))
    for name in _SCALARS:
        value = getattr(cube, name)
        group.attrs[name] = value if not isinstance(value, (bool, np.bool_)) else int(value)
    group.attrs["meta"] = json.dumps(cube.meta, sort_keys=True, default=str)
    return group


def read_group(group):
    """The :class:`SLCube` stored by :func:`write_group`."""
    kwargs = {name: group[name][()] for name in _ARRAYS if name in group}
    a = group.attrs
    for name in _SCALARS:
        if name in a:
            value = a[name]
            value = value.decode() if isinstance(value, bytes) else value
            kwargs[name] = value
    kwargs["time_binned"] = bool(kwargs.get("time_binned", False))
    kwargs["bin_size"] = int(kwargs["bin_size"])
    kwargs["reference"] = str(kwargs.get("reference", "none"))
    kwargs["meta"] = json.loads(a["meta"]) if "meta" in a else {}
    return SLCube(**kwargs)


# ------------------------------------------------------------------------------ FITS
def write_fits(cube, path, overwrite=True):
    """Export in tess-backml's layout (a tess-backml ``ScatterLightCorrector`` can read it).

    Primary header: ``SECTOR``, ``CAMERA``, ``CCD``, ``TSTART``/``TSTOP`` (TJD), ``PIXBIN``,
    ``PIXBINM``, ``IMGSIZEX``/``IMGSIZEY``, ``TIMBINS`` (h), ``TIMBINM``, ``TIMSIZE``;
    ext 1 ``SCATTER LIGHT CUBE`` = the transposed stack ``[values - static, errors]``, shown as
    (2, nt, ny, nx) in FITS axis order; ext 2 ``PIXEL COUNTS`` (ny, nx) int64; ext 3 ``TIME``
    (column ``time`` in JD, header ``BINNED``). Our additions, ignored by tess-backml:
    ``ROW0``/``COL0`` (0-based CCD position of the first bin's first pixel), ``REFMODEL``, and
    ext 4 ``STATIC`` (the dark level), ext 5 ``COLUMN GAIN``, ``FRAME FLAGS`` (only if any
    frame is flagged), ``BIN CENTERS``.
    """
    from astropy.io import fits

    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists (use overwrite)")
    nt, ny, nx = cube.shape
    ph = fits.PrimaryHDU()
    h = ph.header
    h["CREATOR"] = ("tessphot", "Software of origin")
    h["ORIGIN"] = ("photometry_scattered", "package that wrote this cube")
    h["TELESCOP"] = "TESS"
    h["SECTOR"] = (int(cube.sector), "Observing sector")
    h["CAMERA"] = (int(cube.camera), "Camera number")
    h["CCD"] = (int(cube.ccd), "CCD chip number")
    h["BJDREFI"] = (2457000, "integer part of BTJD reference date")
    h["TIMEUNIT"] = "d"
    half = (np.median(np.diff(cube.time)) / 2.0) if nt > 1 else 0.0
    h["TSTART"] = (float(cube.time[0] - half), "observation start time in TJD")
    h["TSTOP"] = (float(cube.time[-1] + half), "observation stop time in TJD")
    h["OBJECT"] = ("Scatter Light cube", "Type of data")
    h["PIXBIN"] = (int(cube.bin_size), "Bin size in pixel space")
    h["PIXBINM"] = ("median", "Method of binning in pixel space")
    # tess-backml writes IMGSIZEX/Y swapped with respect to the array; we keep that meaning
    # (X = rows, Y = columns) so square cubes read the same by both tools
    h["IMGSIZEX"] = (int(ny), "Image size in axis X")
    h["IMGSIZEY"] = (int(nx), "Image size in axis Y")
    h["TIMBINS"] = (float(cube.time_bin_hours), "[h] bin size in time axis")
    h["TIMBINM"] = ("mean" if cube.time_binned else "none", "Method of binning in time")
    h["TIMSIZE"] = (int(nt), "Cube size in time axis")
    b = int(cube.bin_size)
    h["ROW0"] = (float(cube.bin_rows[0] - (b - 1) / 2.0), "0-based CCD row of first bin edge")
    h["COL0"] = (float(cube.bin_cols[0] - (b - 1) / 2.0), "0-based CCD col of first bin edge")
    h["REFMODEL"] = (str(cube.reference), "background model subtracted before binning")
    data = np.array([cube.values - cube.static[None], cube.errors], dtype=np.float32).T
    hdus = [ph,
            fits.ImageHDU(data, name="SCATTER LIGHT CUBE"),
            fits.ImageHDU(np.asarray(cube.counts, dtype=np.int64), name="PIXEL COUNTS")]
    tcol = fits.Column(name="time", format="D", unit="jd", array=cube.time + BTJD0)
    th = fits.BinTableHDU.from_columns([tcol], name="TIME")
    th.header["BINNED"] = (bool(cube.time_binned), "Is cube binned in time")
    hdus.append(th)
    hdus.append(fits.ImageHDU(np.asarray(cube.static, dtype=np.float32), name="STATIC"))
    if cube.column_gain is not None:
        gh = fits.ImageHDU(np.asarray(cube.column_gain, dtype=np.float32), name="COLUMN GAIN")
        gh.header["COLOFF"] = (int(cube.gain_column_offset), "0-based CCD col of element 0")
        hdus.append(gh)
    if np.any(cube.flags):
        hdus.append(fits.ImageHDU(np.asarray(cube.flags, dtype=np.int32), name="FRAME FLAGS"))
    centres = fits.BinTableHDU.from_columns(
        [fits.Column(name="bin_cols", format="D", array=cube.bin_cols)], name="BIN CENTERS")
    centres.header["NROWBIN"] = ny
    for i, r in enumerate(cube.bin_rows):
        centres.header[f"ROWC{i}"] = float(r)
    hdus.append(centres)
    tmp = path.with_name(path.name + ".partial")
    fits.HDUList(hdus).writeto(tmp, overwrite=True)
    os.replace(tmp, path)
    return path


def read_fits(path, sector=None, camera=None, ccd=None):
    """Import a cube written by :func:`write_fits` or by tess-backml.

    For tess-backml files the bin centres follow that tool's own grid: its science window
    starts at 0-based CCD column 45 (it slices ``[45:2093]``, one column right of the first
    science column 44), rows at 0. Their values are flux minus the dark-frame level, so
    ``static`` is 0 and ``reference`` is ``"dark"``.

    Raises
    ------
    InputError
        Not a scattered-light cube, or sector/camera/CCD differ from the requested ones.
    """
    path = Path(path)
    with open_fits(path) as hdul:
        names = [hdu.name for hdu in hdul]
        for need in ("SCATTER LIGHT CUBE", "PIXEL COUNTS", "TIME"):
            if need not in names:
                raise InputError(f"{path}: not a scattered-light cube (no {need} extension)")
        h = hdul[0].header
        for key, want in (("SECTOR", sector), ("CAMERA", camera), ("CCD", ccd)):
            if want is not None and int(h.get(key, -1)) != int(want):
                raise InputError(f"{path}: cube is for {key} {h.get(key)}, not {want}")
        data = np.asarray(hdul["SCATTER LIGHT CUBE"].data, dtype=np.float64).T
        if data.ndim != 4 or data.shape[0] != 2:
            raise InputError(f"{path}: SCATTER LIGHT CUBE has shape {data.shape[::-1]}, "
                             "expected (2, nt, ny, nx) in FITS order")
        values, errors = data[0], data[1]
        nt, ny, nx = values.shape
        counts = np.asarray(hdul["PIXEL COUNTS"].data, dtype=np.int64)
        time = np.asarray(hdul["TIME"].data["time"], dtype=np.float64) - BTJD0
        binned = bool(hdul["TIME"].header.get("BINNED", False))
        b = int(h["PIXBIN"])
        ours = "ROW0" in h
        row0 = float(h["ROW0"]) if ours else 0.0
        col0 = float(h["COL0"]) if ours else 45.0
        bin_rows = row0 + np.arange(ny) * b + (b - 1) / 2.0
        bin_cols = col0 + np.arange(nx) * b + (b - 1) / 2.0
        if "BIN CENTERS" in names:
            bc = hdul["BIN CENTERS"]
            bin_cols = np.asarray(bc.data["bin_cols"], dtype=float)
            bin_rows = np.array([bc.header[f"ROWC{i}"] for i in range(ny)], dtype=float)
        static = np.asarray(hdul["STATIC"].data, dtype=np.float64) if "STATIC" in names \
            else np.zeros((ny, nx))
        gain, goff = None, 44
        if "COLUMN GAIN" in names:
            gain = np.asarray(hdul["COLUMN GAIN"].data, dtype=np.float64)
            goff = int(hdul["COLUMN GAIN"].header.get("COLOFF", 44))
        reference = str(h.get("REFMODEL", "dark"))
        flags = np.asarray(hdul["FRAME FLAGS"].data, dtype=np.int32) \
            if "FRAME FLAGS" in names else None
        return SLCube(values=values + static[None], errors=errors, counts=counts, time=time,
                      bin_rows=bin_rows, bin_cols=bin_cols, bin_size=b, static=static,
                      column_gain=gain, gain_column_offset=goff, time_binned=binned,
                      time_bin_hours=float(h.get("TIMBINS", 0.0)) if binned else 0.0,
                      reference=reference, sector=int(h.get("SECTOR", 0)),
                      camera=int(h.get("CAMERA", 0)), ccd=int(h.get("CCD", 0)),
                      meta={"file": str(path), "creator": str(h.get("CREATOR", ""))},
                      flags=flags)
