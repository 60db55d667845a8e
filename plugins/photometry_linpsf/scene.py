"""Scene mode of linpsf: every catalog star of the CCD fitted at prepare time, tile by tile.

Two parts:

* prepare stage ``linpsf_scene`` (:class:`LinPSFScene`): covers the CCD with square tiles of
  ``scene_tile`` px; each tile is read with ``scene_margin`` px around it, so the stars near
  its edges are fitted together with their neighbours on the other side, and
  :func:`photometry_linpsf.linpsf.fit_scene` fits every catalog star up to ``scene_tmag_max``
  whose PRF reaches that region (one sparse design per group of cadences). A star's light
  curve comes from the tile that *owns* it (the tile holding the pixel its reference position
  falls in); the margin stars' fits of other tiles are discarded. As in the per-target mode,
  a second pass refits each owned star and a local constant with every other star held at
  its first-pass flux smoothed in time (``fit_scene(held=...)``). When the shape stage found
  a significant time model (focus, plate scale), both passes apply it (``fit_scene(
  time_model=...)``), as the per-target mode does.
* algorithm mode ``linpsf.mode = "scene"`` (:func:`scene_photometry`): the target's light
  curve is read from the stored fluxes instead of fitting its stamp.

Why: the per-target algorithm refits a target's ~35 neighbours in every stamp they reach, so
a crowded CCD fits every star many times over; this is psfmachine's "fit the whole scene once"
mode, built on the same solver, noise model and priors as the per-target fit.

Memory is bounded for full frames: a tile is read one block of ``scene_block`` cadences
(whole time chunks) at a time, and only the owned stars' (N, k) fluxes of one tile are held.
The data are the cache's images minus the configured background model
(``photometry.background``, as BasePhotometry subtracts it); the per-cadence constant of
``fit_scene`` then takes the tile's residual sky (or the whole sky without a background model).
The noise model is fixed per tile, as in the per-target fit: the median over the good
cadences of ``err^2 + background_err^2``, taken per block and combined by the median, so
that every block of a tile is weighted the same way (no steps at block boundaries).
"""
import logging
import time as _time
import warnings
from pathlib import Path

import numpy as np

from photometry import (background_model_class, ConfigurationError, InputError, load_prf,
                        mag2flux, PixelQualityFlags, PrepareStage, read_catalog_sqlite,
                        StageData, TESSQualityFlags)

from .linpsf import SCENE, fit_scene, held_fluxes
from .stage import load_shape_model
from .timemodel import load_time_model

__all__ = ["LinPSFScene", "SceneFitter", "tile_boxes"]

logger = logging.getLogger(__name__)

#: name of the prepare stage (and of its ``models/`` group)



def tile_boxes(shape, tile):
    """Owned boxes ``(r0, r1, c0, c1)`` (cube pixels, end-exclusive) tiling an image, row-major.

    Tile ``t`` is row ``t // n_cols``, column ``t % n_cols`` of the grid, ``n_cols =
    ceil(C / tile)``; the last row/column of tiles is cut at the image edge.
    """
    R, C = (int(v) for v in shape)
    tile = int(tile)
    if tile < 1:
        raise ConfigurationError(f"linpsf.scene_tile = {tile}: must be a positive number of px")
    return [(r, min(r + tile, R), c, min(c + tile, C))
            for r in range(0, R, tile) for c in range(0, C, tile)]


class SceneFitter:
    """The tile fits of the scene mode, on an open cache (the prepare writer's or a reader).

    Parameters
    ----------
    data : photometry.StageData
        The cache: ``images``, ``errors``, ``pixel_flags``, ``quality``, the movement kernel
        and ``models/`` (``linpsf_shape``, the background model).
    settings : dict
        Full settings (``[linpsf]``, ``photometry.background``, ``photometry.data.prf``).
    catalog_path : path, optional
        The catalog SQLite; default: the one next to the cache file.

    Raises
    ------
    InputError
        Without a catalog SQLite (nothing to fit).
    """

    def __init__(self, data, settings, catalog_path=None):
        cfg = settings["linpsf"]
        self.data = data
        self.cfg = cfg
        self.n_frames, R, C = data.shape
        self.shape = (R, C)
        self.row_offset = int(data.attrs.get("row_offset", 0))
        self.column_offset = int(data.attrs.get("column_offset", 0))
        self.margin = int(cfg["scene_margin"])
        self.tmag_max = float(cfg["scene_tmag_max"])
        self.prior_width = float(cfg["prior_width"])
        good = TESSQualityFlags.filter(np.asarray(data.array("quality")))
        self.good = good if good.any() else np.ones(self.n_frames, bool)
        chunk = data.time_chunk
        blocks = max(1, -(-int(cfg["scene_block"]) // chunk))
        self.block = blocks * chunk                     # whole time chunks per read

        # PRF: the linpsf_shape model if it is there (it must run first), else photometry.data.prf
        self.prf = load_shape_model(self._model_group("linpsf_shape"))
        self.prf_name = "linpsf_shape"
        if self.prf is None:
            spec = settings["photometry"].get("prf", "analytic")
            self.prf = load_prf(spec, data.attrs.get("camera"), data.attrs.get("ccd"))
            self.prf_name = f"prf:{getattr(self.prf, 'name', 'prf')}"
            logger.warning("%s: no linpsf_shape model in the cache (add \"linpsf_shape\" before "
                           "\"%s\" in prepare.stages); using the %s PRF", SCENE, SCENE, spec)
        # the shape's time model (focus, plate scale), applied to every cadence when the
        # linpsf_shape stage found a significant one: as in the per-target mode
        self.time_model = load_time_model(self._model_group("linpsf_shape")) \
            if self.prf_name == "linpsf_shape" else None
        self.time = None
        if self.time_model is not None:
            if "time" not in data:
                raise InputError(f"{SCENE}: models/linpsf_shape has a time model but the cache "
                                 f"has no time")
            self.time = np.asarray(data.array("time"), dtype=float)
        #: px beyond the read region within which a star still puts light into it
        self.reach = self.prf.default_size() // 2 + 0.5

        # background model subtracted from the images, as BasePhotometry does for a stamp
        self.background = None
        self.background_name = ""
        name = settings["photometry"].get("background", "")
        group = self._model_group(name) if name else None
        if group is not None:
            self.background = (background_model_class(name), group)
            self.background_name = name
        self.fit_background = bool(cfg["fit_background"])
        if self.background is None:
            logger.info("%s: no background model in the cache; each tile's fitted constant "
                        "takes the sky", SCENE)
            self.fit_background = True

        # movement kernel; frames without a measurement get the median motion (as the
        # per-target fit does), not the reference position
        self.kernel = data.movement_kernel()
        if self.kernel is not None:
            rows = self.kernel.kernel
            ok = np.all(np.isfinite(rows), axis=1)
            if ok.any():
                rows[~ok] = np.median(rows[ok], axis=0)
            else:
                self.kernel = None

        if catalog_path is None:
            catalog_path = data.catalog_path
        if not Path(catalog_path).is_file():
            raise InputError(f"{SCENE}: no catalog SQLite {catalog_path} next to the cache")
        cat = read_catalog_sqlite(catalog_path, tmag_max=self.tmag_max)
        ok = np.isfinite(np.asarray(cat["tmag"], float)) & np.isfinite(
            np.asarray(cat["row"], float)) & np.isfinite(np.asarray(cat["column"], float))
        self.starid = np.asarray(cat["starid"], np.int64)[ok]          # sorted by starid
        self.row = np.asarray(cat["row"], float)[ok]                   # CCD, reference frame
        self.column = np.asarray(cat["column"], float)[ok]
        self.tmag = np.asarray(cat["tmag"], float)[ok]

    def _model_group(self, name):
        return self.data.model_group(name)

    def owner(self, tile):
        """Index of the tile (:func:`tile_boxes` order) owning each catalog star; -1 off the data.

        A star belongs to the pixel its reference position falls in (BasePhotometry's "on the
        data" rule, ``-0.5 <= position < size - 0.5``) and to the tile holding that pixel.
        """
        R, C = self.shape
        pr, pc = self.pixel(slice(None))
        on = (pr >= 0) & (pr < R) & (pc >= 0) & (pc < C)
        n_cols = -(-C // int(tile))
        return np.where(on, (pr // int(tile)) * n_cols + pc // int(tile), -1)

    def pixel(self, index):
        """(row, column) cube pixel holding the reference position of catalog stars ``index``."""
        return (np.floor(self.row[index] - self.row_offset + 0.5).astype(np.int64),
                np.floor(self.column[index] - self.column_offset + 0.5).astype(np.int64))

    def region(self, box):
        """The read region ``(R0, R1, C0, C1)``: the box plus ``scene_margin``, on the data."""
        r0, r1, c0, c1 = box
        R, C = self.shape
        m = self.margin
        return max(r0 - m, 0), min(r1 + m, R), max(c0 - m, 0), min(c1 + m, C)

    def fitted_stars(self, region):
        """Catalog indices of the stars fitted for a region: those whose PRF can reach it."""
        R0, R1, C0, C1 = region
        r = self.row - self.row_offset
        c = self.column - self.column_offset
        return np.flatnonzero((r >= R0 - self.reach) & (r <= R1 - 1 + self.reach)
                              & (c >= C0 - self.reach) & (c <= C1 - 1 + self.reach))

    def _noise(self, rs, cs):
        """(r, c) fixed noise model of a region: median over good cadences of the variance."""
        meds = []
        for start in range(0, self.n_frames, self.block):
            sl = slice(start, min(start + self.block, self.n_frames))
            var = np.asarray(self.data.read("errors", sl, rs, cs), dtype=float) ** 2
            if self.background is not None:
                cls, group = self.background
                try:
                    var = var + np.asarray(cls.evaluate_error(group, rs, cs, sl), float) ** 2
                except NotImplementedError:
                    pass
            g = self.good[sl]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                meds.append(np.nanmedian(var[g] if g.any() else var, axis=0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.sqrt(np.nanmedian(np.stack(meds), axis=0))

    def _block(self, sl, rs, cs):
        """(images minus the background model, bad-pixel mask) of one block of a region."""
        images = np.asarray(self.data.read("images", sl, rs, cs), dtype=float)
        if self.background is not None:
            cls, group = self.background
            images -= np.asarray(cls.evaluate(group, rs, cs, sl), dtype=float)
        flags = np.asarray(self.data.read("pixel_flags", sl, rs, cs))
        bad = (flags & PixelQualityFlags.PRF_FIT_BITMASK) != 0
        return images, bad | ~np.isfinite(images)

    def _shifts(self, x, y, sl):
        """(drow, dcol) (n, k) of cube positions ``x, y`` in the frames of ``sl`` (or None)."""
        if self.kernel is None:
            return None, None
        dx, dy = self.kernel.shift(x, y, np.arange(sl.start, sl.stop))
        return dy, dx

    def _times(self, sl):
        """BTJD of the frames of ``sl`` for the time model (None without one)."""
        return None if self.time is None else self.time[sl]

    def fit_tile(self, box, stars=None):
        """Light curves of ``stars`` from the fit of every star reaching a tile's region.

        First pass: :func:`fit_scene` on each block of cadences (all stars whose PRF reaches
        the region, catalog-flux priors, one constant background; the shape's time model,
        if the cache holds a used one, in both passes). Second pass (when
        ``neighbour_smoothing`` > 2, as in the per-target mode): each requested star and a
        local constant are refitted over its PRF stamp with every other star held at its
        first-pass flux smoothed in time (``fit_scene(held=...)``), on the data minus the
        first pass's median residual image (``info["static"]``, median over the blocks).

        Parameters
        ----------
        box : (r0, r1, c0, c1)
            The tile (cube pixels, end-exclusive).
        stars : array of int, optional
            Catalog indices of the stars wanted (default: those the tile owns); they must
            lie in the read region.

        Returns
        -------
        dict
            ``index`` (k,) the requested catalog indices, ``flux``, ``flux_err`` (N, k)
            float32 (e-/s), ``sky`` (N, k) float32 the fitted constant under each star (e-/s
            per pixel, on top of the background model), ``background`` (N,) the tile's
            first-pass constant, ``region``, ``n_fitted``, ``n_designs`` and ``seconds``.
        """
        t0 = _time.perf_counter()
        region = self.region(box)
        R0, R1, C0, C1 = region
        rs, cs = slice(R0, R1), slice(C0, C1)
        index = self.fitted_stars(region)
        if stars is None:
            r0, r1, c0, c1 = box
            pr, pc = self.pixel(index)
            stars = index[(pr >= r0) & (pr < r1) & (pc >= c0) & (pc < c1)]
        stars = np.asarray(stars, dtype=np.int64)
        cols_wanted = np.searchsorted(index, stars)
        if stars.size and (np.any(cols_wanted >= index.size)
                           or np.any(index[np.minimum(cols_wanted, index.size - 1)] != stars)):
            raise ValueError(f"{SCENE}: stars outside the region {region} of tile {box}")
        N = self.n_frames
        out = {"index": stars, "region": region, "n_fitted": int(index.size), "n_designs": 0,
               "background": np.full(N, np.nan, np.float32)}
        for key in ("flux", "flux_err", "sky"):
            out[key] = np.full((N, stars.size), np.nan, np.float32)
        if stars.size == 0:
            out["seconds"] = _time.perf_counter() - t0
            return out
        sigma = self._noise(rs, cs)
        rows, cols = self.row[index], self.column[index]
        x, y = cols - self.column_offset, rows - self.row_offset
        fluxes = mag2flux(self.tmag[index])
        origin = (self.row_offset + R0, self.column_offset + C0)
        flux = np.empty((N, index.size))
        err = np.empty((N, index.size))
        kw = dict(origin=origin, prior_width=self.prior_width, fit_background=self.fit_background,
                  time_model=self.time_model)
        statics, designs = [], None
        for start in range(0, N, self.block):
            sl = slice(start, min(start + self.block, N))
            images, bad = self._block(sl, rs, cs)
            dy, dx = self._shifts(x, y, sl)
            f1, e1, bkg, info = fit_scene(
                images, np.broadcast_to(sigma, images.shape), rows, cols, fluxes, self.prf,
                drow=dy, dcol=dx, good=self.good[sl], bad=bad, times=self._times(sl), **kw)
            flux[sl], err[sl], out["background"][sl] = f1, e1, bkg
            out["n_designs"] += int(info["n_designs"])
            statics.append(info["static"])
            designs = info["designs"] if sl.stop - sl.start == N else None   # one block: reuse
        window = int(self.cfg.get("neighbour_smoothing", 0))
        if window <= 2 or index.size < 2:
            out["flux"][:] = flux[:, cols_wanted]
            out["flux_err"][:] = err[:, cols_wanted]
            out["sky"][:] = out["background"][:, None]
        else:
            held, var_held = held_fluxes(flux, err, self.good, window,
                                         float(self.cfg["neighbour_clip"]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                static = np.nan_to_num(np.nanmedian(np.stack(statics), axis=0))
            for start in range(0, N, self.block):
                sl = slice(start, min(start + self.block, N))
                images, bad = self._block(sl, rs, cs)
                dy, dx = self._shifts(x, y, sl)
                f2, e2, sky, _ = fit_scene(
                    images, np.broadcast_to(sigma, images.shape), rows, cols, fluxes,
                    self.prf, drow=dy, dcol=dx, good=self.good[sl], bad=bad,
                    held=(held[sl], var_held[sl]), static=static, designs=designs,
                    times=self._times(sl), **kw)
                out["flux"][sl] = f2[:, cols_wanted]
                out["flux_err"][sl] = e2[:, cols_wanted]
                out["sky"][sl] = sky[:, cols_wanted]
        out["seconds"] = _time.perf_counter() - t0
        return out


class LinPSFScene(PrepareStage):
    """Prepare stage ``linpsf_scene``: every star's light curve from tile-wise scene fits.

    Stored in ``models/linpsf_scene`` (stars ordered by owning tile, so a tile writes one
    contiguous column range): ``starid``, ``row``, ``column`` (CCD, reference frame),
    ``tmag``, ``tile`` (K,); ``flux``, ``flux_err`` (N, K) float32 (e-/s; NaN where not
    fitted); ``sky`` (N, K) float32 the constant fitted under each star (e-/s per pixel, on
    top of the background model: its local one of the second pass, else its tile's);
    ``flux_median`` (K,) median flux over good cadences; ``background`` (N, T) the
    first-pass constant of each tile;
    ``tiles`` (T, 4) owned boxes and ``tile_fitted`` (T,) stars fitted per tile. Attrs:
    ``tile, margin, tmag_max, prf_model, background_model, moving, time_model`` (the
    shape's time model applied), ``n_stars, n_tiles, seconds, seconds_per_tile, usable``.

    Restartable like every prepare stage: an unfinished group is discarded and the stage
    runs again from the first tile (``CacheWriter.stage_group``).
    """

    name = SCENE
    version = "1.1"                 # 1.1: the shape's time model applied

    def run(self, cache, group):
        t0 = _time.perf_counter()
        cfg = self.settings["linpsf"]
        fitter = SceneFitter(StageData(cache), self.settings)
        tile = int(cfg["scene_tile"])
        boxes = tile_boxes(fitter.shape, tile)
        owner = fitter.owner(tile)
        on = np.flatnonzero(owner >= 0)
        order = on[np.lexsort((fitter.starid[on], owner[on]))]
        owner_sorted = owner[order]
        K, N, T = order.size, fitter.n_frames, len(boxes)
        bounds = np.searchsorted(owner_sorted, np.arange(T + 1))

        group.attrs.update(tile=tile, margin=fitter.margin, tmag_max=fitter.tmag_max,
                           prf_model=fitter.prf_name, background_model=fitter.background_name,
                           moving=fitter.kernel is not None,
                           time_model=fitter.time_model is not None, usable=False)
        group.create_dataset("starid", data=fitter.starid[order])
        group.create_dataset("row", data=fitter.row[order])
        group.create_dataset("column", data=fitter.column[order])
        group.create_dataset("tmag", data=fitter.tmag[order])
        group.create_dataset("tile", data=owner_sorted.astype(np.int32))
        group.create_dataset("tiles", data=np.asarray(boxes, dtype=np.int32).reshape(-1, 4))
        # (N, K): a target's read is one column, N / 256 chunks of 256 x 16 values
        chunks = (min(N, 256), min(K, 16)) if K else None
        flux = group.create_dataset("flux", (N, K), np.float32, chunks=chunks,
                                    fillvalue=np.nan)
        flux_err = group.create_dataset("flux_err", (N, K), np.float32, chunks=chunks,
                                        fillvalue=np.nan)
        sky = group.create_dataset("sky", (N, K), np.float32, chunks=chunks, fillvalue=np.nan)
        flux_median = np.full(K, np.nan)
        background = np.full((N, T), np.nan, np.float32)
        fitted = np.zeros(T, np.int32)
        seconds = []
        logger.info("%s: %d stars (Tmag <= %g) in %d tiles of %d px (+%d px margin), %s PRF%s",
                    SCENE, K, fitter.tmag_max, T, tile, fitter.margin, fitter.prf_name,
                    " with its time model" if fitter.time_model is not None else "")
        for t, box in enumerate(boxes):
            k0, k1 = int(bounds[t]), int(bounds[t + 1])
            if k1 == k0:
                continue                    # no star to own: nothing worth fitting
            res = fitter.fit_tile(box, order[k0:k1])
            flux[:, k0:k1] = res["flux"]
            flux_err[:, k0:k1] = res["flux_err"]
            sky[:, k0:k1] = res["sky"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                flux_median[k0:k1] = np.nanmedian(res["flux"][fitter.good], axis=0)
            background[:, t] = res["background"]
            fitted[t] = res["n_fitted"]
            seconds.append(res["seconds"])
            logger.info("%s: tile %d/%d (rows %d-%d, columns %d-%d): %d stars fitted, %d owned, "
                        "%d designs, %.1f s", SCENE, t + 1, T, box[0], box[1] - 1, box[2],
                        box[3] - 1, fitted[t], k1 - k0, res["n_designs"], res["seconds"])
        group.create_dataset("flux_median", data=flux_median)
        group.create_dataset("background", data=background)
        group.create_dataset("tile_fitted", data=fitted)
        total = _time.perf_counter() - t0
        group.attrs.update(n_stars=K, n_tiles=T, seconds=total,
                           seconds_per_tile=float(np.mean(seconds)) if seconds else 0.0,
                           usable=True)
        logger.info("%s: %d stars in %.1f s (%.2f s per fitted tile, %.1f ms per star)", SCENE,
                    K, total, float(np.mean(seconds)) if seconds else 0.0,
                    1e3 * total / max(K, 1))
