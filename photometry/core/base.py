"""BasePhotometry: everything a per-target algorithm needs, and nothing it must not do.

An algorithm subclasses :class:`BasePhotometry`, sets a unique ``name`` and ``version``, and
implements :meth:`BasePhotometry.do_photometry`, which fills ``self.lightcurve`` (flux,
flux_err, flux_background, pos_centroid), ``self.final_phot_mask`` and optionally
``self.additional_headers``, and returns a :class:`STATUS`. It reads data only through this
class (stamp cubes, sum image, catalog, WCS, movement kernel, PRF) and does no file or
database I/O: the core (:func:`photometry.scheduler.target.run_target`) opens the data, turns exceptions into a STATUS and
writes the light curve.

Coordinates (``docs/coordinates_and_formats.md``): 0-based ``(row, column)`` of the full SPOC
CCD frame (first science pixel at row 0, column 44), pixel centres at integers. Cube pixel
``[i, j]`` of the stamp is CCD pixel ``(row_min + i, col_min + j)``.

The data source (``source`` argument) is a :class:`photometry.data.cache.FFICache` (datasource
"ffi") or a :class:`photometry.data.tpf.TPFSource` ("tpf"). BasePhotometry uses only this part of
them:

``datasource, sector, camera, ccd, cadence, n_frames, time, timecorr, cadenceno, quality,
row_offset, column_offset, sumimage, reference_wcs, movement_kernel,
stamp(name, row_slice, col_slice) -> (N, r, c), model_group(name)``
and, for the catalog, either ``catalog_path`` (the catalog SQLite, see ``docs/architecture.md``)
or ``catalog_table()`` (an astropy Table with the SQLite's columns).
"""
import contextlib
import enum
import logging
import sqlite3
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np
from astropy.table import Table

from photometry.hooks.errors import AlgorithmFailure, ConfigurationError, UnprocessableTarget
from photometry.hooks.quality import (LightCurveQualityFlags, PixelQualityFlags, TESSQualityFlags,
                      lightcurve_quality)
from photometry.core.stamps import default_stamp_size, clip_stamp

__all__ = ["STATUS", "BasePhotometry", "lightcurve_metrics", "aperture_bitmask"]

logger = logging.getLogger(__name__)


class STATUS(enum.IntEnum):
    """Outcome of one target. Values are stored in todo.sqlite, so never renumber them."""

    UNKNOWN = 0
    OK = 1
    ERROR = 2
    WARNING = 3
    ABORT = 4
    SKIPPED = 5
    STARTED = 6


#: STATUS of a finished result in increasing severity (the checks can only make it worse)
_SEVERITY = (STATUS.OK, STATUS.WARNING, STATUS.ERROR)

#: Cube names of the data sources (cache datasets / TPF columns behind them).
_IMAGES, _ERRORS, _FLAGS = "images", "errors", "pixel_flags"
_TPF_BKG, _TPF_BKG_ERR = "backgrounds", "background_errors"

#: Columns of ``BasePhotometry.catalog``.
CATALOG_COLUMNS = ("starid", "ra", "dec", "tmag", "row", "column", "row_stamp", "column_stamp")


class _ListHandler(logging.Handler):
    """Collects warnings and errors logged while a target runs, for ``details['errors']``."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.levelname}: {record.getMessage()}")


class _ForwardHandler(logging.Handler):
    """Passes on to a logger's ancestors the records they would have shown (``level`` up)."""

    def __init__(self, logger, level):
        super().__init__(level=level)
        self.parent = logger.parent

    def emit(self, record):
        if self.parent is not None:
            self.parent.handle(record)


@contextlib.contextmanager
def _collect_warnings(names):
    """Every WARNING and ERROR logged under the loggers ``names`` meanwhile, whatever the log
    level: the list of "LEVEL: message" lines, filled as they are logged.

    Why: the reasons of a WARNING must reach the todo diagnostics and the light-curve header
    even when the console shows errors only (``tessphot run`` without ``-v``). A logger
    whose level hides warnings is lowered to WARNING for the block and kept from its
    ancestors' handlers, to which only what they would have shown before is passed on.
    """
    handler = _ListHandler()
    saved = []
    for name in names:
        log = logging.getLogger(name)
        saved.append((log, log.level, log.propagate, None))
        log.addHandler(handler)
        shown = log.getEffectiveLevel()
        if shown > logging.WARNING:
            forward = _ForwardHandler(log, shown) if log.propagate else None
            log.setLevel(logging.WARNING)
            log.propagate = False
            if forward is not None:
                log.addHandler(forward)
            saved[-1] = (log, saved[-1][1], saved[-1][2], forward)
    try:
        yield handler.messages
    finally:
        for log, level, propagate, forward in saved:
            log.removeHandler(handler)
            if forward is not None:
                log.removeHandler(forward)
            log.setLevel(level)
            log.propagate = propagate


def _photometry_settings(settings):
    if settings is None:
        from photometry.hooks.settings import default_settings
        settings = default_settings()
    if "photometry" not in settings:
        raise ConfigurationError("settings: missing section [photometry]")
    return settings



class BasePhotometry:
    """The target, its stamp, cubes, catalog, motion and metrics; algorithms subclass it.

    Parameters
    ----------
    starid : int
        TIC id of the target; it must be in the source's catalog.
    source : FFICache or TPFSource
        The open data source (see the module docstring for what is used).
    settings : dict, optional
        Full settings (``load_settings()``); the defaults if None.
    plot : bool
        Write the diagnostic plots (the core does, after the photometry).
    plot_folder : path, optional
        Where the plots go when the core is given no folder.

    Raises
    ------
    UnprocessableTarget
        If the target is not in the catalog or falls outside the data.
    """

    name = "base"
    version = "0"
    #: what the flux measures, for the core's checks (docs/checks.md): "total" (the star's
    #: whole flux, e.g. a PRF fit), "aperture" (the light in ``final_phot_mask``, SAP-like)
    #: or None (not said: the checks allow either reading); it also picks the expected noise's
    #: formula (:meth:`flux_weights`)
    flux_kind = None
    #: a "total" method's unit-flux model image of the target over the stamp (what it fitted),
    #: for :meth:`flux_weights`; None: the core's PRF (``prf``) at the catalog position
    target_model_image = None

    def __init__(self, starid, source, settings=None, plot=False, plot_folder=None):
        self.starid = int(starid)
        self.source = source
        self.settings = _photometry_settings(settings)
        self.psettings = self.settings["photometry"]
        self.plot = bool(plot)
        self.plot_folder = None if plot_folder is None else Path(plot_folder)
        self.datasource = source.datasource
        self.sector = int(source.sector)
        self.camera = int(source.camera)
        self.ccd = int(source.ccd)
        self.cadence = int(source.cadence)
        self.details = {"stamp": None, "stamp_resizes": 0, "errors": [], "skip_targets": []}
        self.additional_headers = {}
        self.final_phot_mask = None
        self._flags = []
        self._check_report = None
        self._status = STATUS.UNKNOWN
        self._stamp = None
        self._corrections = _load_corrections(self.settings)
        self._corrections_active = False

        # Time axis. Cadences with NaN time are dropped by the source (TPFSource) or never
        # exist (cache); keep only finite ones here too so every cube row has a time.
        self._frames = np.flatnonzero(np.isfinite(np.asarray(source.time, dtype=float)))
        if self._frames.size == 0:
            raise UnprocessableTarget(f"TIC {self.starid}: the data source has no valid times")
        if self._frames.size == len(source.time):
            self._frames = slice(None)
        self.time = np.asarray(source.time, dtype=float)[self._frames]
        self.timecorr = np.asarray(source.timecorr, dtype=float)[self._frames]
        self.cadenceno = np.asarray(source.cadenceno, dtype=np.int64)[self._frames]
        self.quality = np.asarray(source.quality, dtype=np.int64)[self._frames]
        self.n_frames = len(self.time)

        self.row_offset = int(source.row_offset)
        self.column_offset = int(source.column_offset)
        self.max_shape = tuple(getattr(source, "shape", None) or np.shape(source.sumimage))

        self.target = self._read_target()
        self.target_pos_row = float(self.target["row"])
        self.target_pos_column = float(self.target["column"])
        r0, c0 = self.row_offset, self.column_offset
        nr, nc = self.max_shape
        if not (r0 - 0.5 <= self.target_pos_row < r0 + nr - 0.5
                and c0 - 0.5 <= self.target_pos_column < c0 + nc - 0.5):
            raise UnprocessableTarget(
                f"TIC {self.starid}: position (row {self.target_pos_row:.1f}, column "
                f"{self.target_pos_column:.1f}) is outside the data (rows {r0}-{r0 + nr - 1}, "
                f"columns {c0}-{c0 + nc - 1})")

        self.lightcurve = self._empty_lightcurve()
        self._set_stamp(self.default_stamp())

    # ------------------------------------------------------------------ target and catalog
    def _query_catalog(self, where, params):
        """Rows of the source's catalog matching an SQL condition, as an astropy Table."""
        path = getattr(self.source, "catalog_path", None)
        if path is not None:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
                conn.row_factory = sqlite3.Row
                rows = conn.execute(f"SELECT * FROM catalog WHERE {where}", params).fetchall()
            names = rows[0].keys() if rows else ["starid", "ra", "dec", "tmag", "row", "column"]
            table = Table(rows=[tuple(r) for r in rows] if rows else None, names=list(names))
            return table
        table = self.source.catalog_table()
        mask = _evaluate_where(table, where, params)
        return table[mask]

    def _read_target(self):
        rows = self._query_catalog("starid = ?", (self.starid,))
        if len(rows) == 0:
            raise UnprocessableTarget(
                f"TIC {self.starid}: not in the catalog of sector {self.sector} camera "
                f"{self.camera} CCD {self.ccd}")
        row = rows[0]
        target = {"starid": self.starid}
        for key in ("ra", "dec", "tmag", "row", "column", "pmra", "pmdec", "teff",
                    "ra_J2000", "dec_J2000"):
            value = row[key] if key in rows.colnames else None
            target[key] = None if value is None or np.ma.is_masked(value) else float(value)
        for key in ("ra_J2000", "dec_J2000"):
            if target[key] is None:
                target[key] = target[key.split("_")[0]]
        if target["tmag"] is None or not np.isfinite(target["tmag"]):
            raise UnprocessableTarget(f"TIC {self.starid}: catalog has no Tmag")
        if target["row"] is None or target["column"] is None:
            raise UnprocessableTarget(f"TIC {self.starid}: catalog has no pixel position")
        return target

    @cached_property
    def catalog(self):
        """Stars whose reference position is within ``catalog_buffer`` px of the stamp.

        Columns ``starid, ra, dec, tmag, row, column`` (CCD 0-based, reference frame) and
        ``row_stamp, column_stamp`` (0-based in the stamp cube). Sorted by Tmag.
        """
        buf = float(self.psettings["catalog_buffer"])
        r1, r2, c1, c2 = self._stamp
        table = self._query_catalog(
            '"row" >= ? AND "row" <= ? AND "column" >= ? AND "column" <= ?',
            (r1 - 0.5 - buf, r2 - 0.5 + buf, c1 - 0.5 - buf, c2 - 0.5 + buf))
        out = Table()
        out["starid"] = np.asarray(table["starid"], dtype=np.int64)
        for key in ("ra", "dec", "tmag", "row", "column"):
            out[key] = np.asarray(table[key], dtype=float)
        out["row_stamp"] = out["row"] - r1
        out["column_stamp"] = out["column"] - c1
        out.sort("tmag")
        return out

    @property
    def movement_kernel(self):
        """The source's movement kernel (per-frame shift relative to the reference), or None."""
        return getattr(self.source, "movement_kernel", None)

    def _frame_index(self, frame_or_time):
        """Index into this object's frames of an integer frame index or a float time."""
        if isinstance(frame_or_time, (int, np.integer)):
            index = int(frame_or_time)
            if not -self.n_frames <= index < self.n_frames:
                raise IndexError(f"frame {index} out of range (0..{self.n_frames - 1})")
            return index % self.n_frames
        t = float(frame_or_time)
        index = int(np.argmin(np.abs(self.time - t)))
        step = np.median(np.diff(self.time)) if self.n_frames > 1 else np.inf
        if abs(self.time[index] - t) > step:
            raise ValueError(f"time {t} is outside the time series "
                             f"({self.time[0]:.5f}..{self.time[-1]:.5f})")
        return index

    def _source_frame(self, index):
        """Frame index in the source of frame ``index`` of this object."""
        if isinstance(self._frames, slice):
            return int(index)
        return int(self._frames[index])

    def movement_at(self, rows, columns, frame_index):
        """(drow, dcolumn) shift of CCD positions ``rows, columns`` in frame ``frame_index``."""
        rows = np.asarray(rows, dtype=float)
        columns = np.asarray(columns, dtype=float)
        kernel = self.movement_kernel
        if kernel is None:
            return np.zeros_like(rows), np.zeros_like(columns)
        dx, dy = _kernel_shift(kernel, columns - self.column_offset, rows - self.row_offset,
                               self._source_frame(frame_index))
        return dy, dx

    def catalog_attime(self, frame_or_time):
        """The catalog with ``row, column, row_stamp, column_stamp`` moved to that frame.

        ``frame_or_time`` is an integer frame index or a float BTJD time (nearest frame).
        """
        index = self._frame_index(frame_or_time)
        cat = self.catalog.copy()
        drow, dcol = self.movement_at(cat["row"], cat["column"], index)
        for key, delta in (("row", drow), ("row_stamp", drow), ("column", dcol),
                           ("column_stamp", dcol)):
            cat[key] = np.asarray(cat[key]) + delta
        return cat

    # ------------------------------------------------------------------ stamp
    def default_stamp(self):
        """The TASOC default stamp for the target's Tmag, centred and clipped to the data."""
        height, width = default_stamp_size(self.target["tmag"], self.psettings)
        if self.datasource == "tpf":
            return (self.row_offset, self.row_offset + self.max_shape[0],
                    self.column_offset, self.column_offset + self.max_shape[1])
        row = int(round(self.target_pos_row))
        col = int(round(self.target_pos_column))
        return (row - height // 2, row + height // 2 + 1, col - width // 2, col + width // 2 + 1)

    @property
    def stamp(self):
        """(row_min, row_max, col_min, col_max): 0-based CCD coordinates, end-exclusive."""
        return self._stamp

    def _limits(self):
        return (self.row_offset, self.row_offset + self.max_shape[0],
                self.column_offset, self.column_offset + self.max_shape[1])

    def _set_stamp(self, stamp):
        stamp = clip_stamp(stamp, self._limits())
        if stamp is None:
            raise UnprocessableTarget(f"TIC {self.starid}: empty stamp after clipping to data")
        changed = stamp != self._stamp
        self._stamp = stamp
        self.details["stamp"] = list(stamp)
        self.target_pos_row_stamp = self.target_pos_row - stamp[0]
        self.target_pos_column_stamp = self.target_pos_column - stamp[2]
        if changed:
            for key in ("catalog", "images_cube", "images_err_cube", "pixel_err_cube",
                        "backgrounds_cube", "backgrounds_err_cube", "pixelflags_cube",
                        "sumimage", "wcs", "_background_local", "prf", "_raw_images",
                        "_bkg_region"):
                self.__dict__.pop(key, None)
            if self._corrections_active:
                self._apply_corrections()
        return changed

    def _apply_corrections(self):
        """Run the configured stamp corrections on the current stamp's cubes.

        Why here: a correction changes the cubes of one stamp, so it runs again whenever the
        stamp changes (``_set_stamp``) once the photometry has started.
        """
        self.correction_quality = np.zeros(self.n_frames, dtype=np.int32)
        for correction in self._corrections:
            if correction.available(self):
                correction.apply(self)
                self.details.setdefault("corrections", [])
                if correction.name not in self.details["corrections"]:
                    self.details["corrections"].append(correction.name)

    def resize_stamp(self, down=None, up=None, left=None, right=None, width=None, height=None):
        """Grow (positive) or shrink (negative) the stamp; ``width``/``height`` re-centre.

        ``down`` moves ``row_min`` (towards lower rows), ``up`` moves ``row_max``, ``left``
        ``col_min``, ``right`` ``col_max``. Cubes are re-read lazily on next use.

        Returns
        -------
        bool
            True if the stamp changed (it may not, at the edge of the data).
        """
        r1, r2, c1, c2 = self._stamp
        if height is not None:
            row = int(round(self.target_pos_row))
            r1, r2 = row - int(height) // 2, row + int(height) // 2 + 1
        if width is not None:
            col = int(round(self.target_pos_column))
            c1, c2 = col - int(width) // 2, col + int(width) // 2 + 1
        r1 -= int(down or 0)
        r2 += int(up or 0)
        c1 -= int(left or 0)
        c2 += int(right or 0)
        if r2 <= r1 or c2 <= c1:
            raise ValueError(f"resize_stamp would make an empty stamp {(r1, r2, c1, c2)}")
        changed = self._set_stamp((r1, r2, c1, c2))
        if changed:
            self.details["stamp_resizes"] += 1
            logger.info("TIC %d: stamp resized to %s", self.starid, self._stamp)
        return changed

    def _slices(self, stamp=None):
        r1, r2, c1, c2 = stamp or self._stamp
        return (slice(r1 - self.row_offset, r2 - self.row_offset),
                slice(c1 - self.column_offset, c2 - self.column_offset))

    def get_pixel_grid(self):
        """(columns, rows): 0-based CCD coordinate meshgrids of the stamp, each (r, c)."""
        r1, r2, c1, c2 = self._stamp
        return np.meshgrid(np.arange(c1, c2), np.arange(r1, r2))

    # ------------------------------------------------------------------ cubes
    def _read(self, name, stamp=None):
        rs, cs = self._slices(stamp)
        cube = self.source.stamp(name, rs, cs)
        if not isinstance(self._frames, slice):
            cube = cube[self._frames]
        return cube

    @cached_property
    def _raw_images(self):
        return np.asarray(self._read(_IMAGES), dtype=np.float64)

    @cached_property
    def pixel_err_cube(self):
        """(N, r, c) 1-sigma uncertainty of the pixels alone (e-/s), without the background's.

        For algorithms that fit a background level themselves: the background model's error
        is common to the pixels of a stamp, so adding it to each pixel as if independent
        (``images_err_cube``) overstates the error of a fitted flux (2.4 x for a Tmag 12.5
        star of the linpsf test scene).
        """
        return np.asarray(self._read(_ERRORS), dtype=np.float64)

    @cached_property
    def images_err_cube(self):
        """(N, r, c) 1-sigma uncertainty of ``images_cube`` (e-/s), background error added."""
        return np.sqrt(self.pixel_err_cube ** 2 + self.backgrounds_err_cube ** 2)

    @cached_property
    def images_cube(self):
        """(N, r, c) background-subtracted flux (e-/s) of the stamp.

        Every source's images hold the sky (a SPOC TPF's FLUX + FLUX_BKG, see
        ``photometry.data.tpf``), from which ``backgrounds_cube`` is subtracted here.
        """
        return self._raw_images - self.backgrounds_cube

    @cached_property
    def pixelflags_cube(self):
        """(N, r, c) uint8 :class:`PixelQualityFlags`; NonFinite added where flux is not finite."""
        try:
            flags = np.asarray(self._read(_FLAGS), dtype=np.uint8).copy()
        except KeyError:
            flags = np.zeros(self._raw_images.shape, dtype=np.uint8)
        flags[~np.isfinite(self._raw_images)] |= np.uint8(PixelQualityFlags.NonFinite)
        return flags

    @cached_property
    def _background_local(self):
        """Fallback background: per-frame sigma-clipped median of source-free pixels.

        Why: without a CCD-wide background model the sky under a stamp is best estimated from
        the pixels around it that hold no star. The region is the stamp grown by
        ``photometry.local_background_margin`` pixels (one read); pixels are excluded if they
        lie within a Tmag-dependent radius of a catalog star or are bright in the sum image
        (above the sigma-clipped sum-image median by ``local_background_threshold`` sigma).
        Each frame's background is one number (flat over the stamp) with error
        ``1.253 * std / sqrt(n)`` (the error of a median).
        """
        from astropy.stats import sigma_clipped_stats

        margin = int(self.psettings["local_background_margin"])
        r1, r2, c1, c2 = self._stamp
        region = clip_stamp((r1 - margin, r2 + margin, c1 - margin, c2 + margin),
                            self._limits())
        rs, cs = self._slices(region)
        sumimg = np.asarray(self.source.sumimage[rs, cs], dtype=float)
        mask = ~np.isfinite(sumimg)
        _, med, std = sigma_clipped_stats(sumimg[~mask], sigma=3.0, maxiters=5)
        thresh = float(self.psettings["local_background_threshold"])
        mask |= sumimg > med + thresh * std
        # Stars: a disc whose radius grows with brightness (2 px at Tmag 12, +1 px / mag).
        rr, cc = np.mgrid[region[0]:region[1], region[2]:region[3]]
        stars = self._query_catalog(
            '"row" >= ? AND "row" <= ? AND "column" >= ? AND "column" <= ?',
            (region[0] - 10, region[1] + 10, region[2] - 10, region[3] + 10))
        for star in stars:
            radius = float(np.clip(2.0 + (12.0 - float(star["tmag"])), 1.5, 20.0))
            mask |= (rr - float(star["row"])) ** 2 + (cc - float(star["column"])) ** 2 \
                <= radius ** 2
        if np.count_nonzero(~mask) < int(self.psettings["local_background_min_pixels"]):
            raise UnprocessableTarget(
                f"TIC {self.starid}: only {np.count_nonzero(~mask)} source-free pixels for "
                f"the local background (need {self.psettings['local_background_min_pixels']})")
        cube = np.asarray(self._read(_IMAGES, region), dtype=float)
        pixels = cube[:, ~mask]  # (N, npix)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            _, med, std = sigma_clipped_stats(pixels, sigma=3.0, maxiters=5, axis=1)
        n = np.sum(np.isfinite(pixels), axis=1)
        err = 1.2533 * np.asarray(std) / np.sqrt(np.maximum(n, 1))
        used = np.zeros((r2 - r1, c2 - c1), dtype=bool)
        used[:] = ~mask[r1 - region[0]:r2 - region[0], c1 - region[2]:c2 - region[2]]
        self.details["background"] = "local"
        return np.asarray(med, dtype=float), err, used

    def _background_model(self):
        """(class, group) of the configured BackgroundModel if its state is in the cache."""
        name = self.psettings.get("background", "")
        if not name or self.datasource == "tpf":
            return None
        group = self.source.model_group(name) if hasattr(self.source, "model_group") else None
        if group is None:
            return None
        from photometry.data.stages import background_model_class
        return background_model_class(name), group

    @cached_property
    def backgrounds_cube(self):
        """(N, r, c) sky background (e-/s) under each stamp pixel.

        TPF: the source's sky (SPOC's FLUX_BKG, or the TESScut sky fit of ``photometry.data.tpf``).
        Cache: the ``photometry.background`` model if its state is in the cache
        (``BackgroundModel.evaluate``), otherwise the local estimate (``_background_local``).
        """
        if self.datasource == "tpf":
            self.details["background"] = getattr(self.source, "sky_source", "FLUX_BKG")
            return np.asarray(self._read(_TPF_BKG), dtype=np.float64)
        model = self._background_model()
        shape = self._raw_images.shape
        if model is not None:
            cls, group = model
            rs, cs = self._slices()
            bkg = np.asarray(cls.evaluate(group, rs, cs, self._frames), dtype=np.float64)
            self.details["background"] = cls.name
            return np.broadcast_to(bkg, shape).copy()
        level, _, _ = self._background_local
        return np.broadcast_to(level[:, None, None], shape).copy()

    @cached_property
    def backgrounds_err_cube(self):
        """(N, r, c) 1-sigma uncertainty of ``backgrounds_cube`` (e-/s)."""
        shape = self._raw_images.shape
        if self.datasource == "tpf":
            try:
                return np.asarray(self._read(_TPF_BKG_ERR), dtype=np.float64)
            except KeyError:
                return np.zeros(shape)
        model = self._background_model()
        if model is not None:
            cls, group = model
            rs, cs = self._slices()
            try:
                err = cls.evaluate_error(group, rs, cs, self._frames)
            except NotImplementedError:
                return np.zeros(shape)
            return np.broadcast_to(np.asarray(err, dtype=np.float64), shape).copy()
        _, err, _ = self._background_local
        return np.broadcast_to(err[:, None, None], shape).copy()

    @property
    def background_pixels_used(self):
        """(r, c) bool: stamp pixels used to estimate the background (APERTURE bit 4)."""
        if self.datasource == "tpf":
            used = getattr(self.source, "background_pixels", None)
            return None if used is None else np.asarray(used)[self._slices()]
        if self._background_model() is not None:
            return None
        return self._background_local[2]

    @property
    def images(self):
        """Iterator over the frames of ``images_cube`` (r, c)."""
        return iter(self.images_cube)

    @property
    def images_err(self):
        """Iterator over the frames of ``images_err_cube``."""
        return iter(self.images_err_cube)

    @property
    def backgrounds(self):
        """Iterator over the frames of ``backgrounds_cube``."""
        return iter(self.backgrounds_cube)

    @property
    def pixelflags(self):
        """Iterator over the frames of ``pixelflags_cube``."""
        return iter(self.pixelflags_cube)

    @cached_property
    def sumimage(self):
        """(r, c) mean background-subtracted image over good frames.

        Cache: the cached sum image minus the mean background of the good frames (so it is
        on the same scale as ``images_cube``); TPF: the mean of ``images_cube`` over frames
        passing ``TESSQualityFlags.DEFAULT_BITMASK``.
        """
        good = TESSQualityFlags.filter(self.quality)
        if not np.any(good):
            good = np.ones(self.n_frames, dtype=bool)
        if self.datasource == "tpf":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return np.nanmean(self.images_cube[good], axis=0)
        rs, cs = self._slices()
        img = np.asarray(self.source.sumimage[rs, cs], dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return img - np.nanmean(self.backgrounds_cube[good], axis=0)

    @cached_property
    def wcs(self):
        """Astropy WCS of the stamp (0-based stamp pixels, ``origin=0``)."""
        rs, cs = self._slices()
        ref = self.source.reference_wcs
        if ref is None:
            return None
        return ref.slice((rs, cs))

    @cached_property
    def prf(self):
        """The PRF model of this CCD (``photometry.data.prf``), for PRF-based algorithms."""
        from photometry.data.prf import load_prf
        return load_prf(self.psettings["prf"], self.camera, self.ccd)

    # ------------------------------------------------------------------ light curve
    def _empty_lightcurve(self):
        n = self.n_frames
        lc = Table()
        lc["time"] = self.time
        lc["timecorr"] = self.timecorr
        lc["cadenceno"] = self.cadenceno
        lc["quality"] = self.quality
        lc["flux"] = np.full(n, np.nan)
        lc["flux_err"] = np.full(n, np.nan)
        lc["flux_background"] = np.full(n, np.nan)
        lc["pos_centroid"] = np.full((n, 2), np.nan)
        lc["pos_corr"] = self._pos_corr()
        lc.meta["starid"] = self.starid
        return lc

    def _pos_corr(self):
        """(N, 2) column/row jitter of the target relative to the reference frame (pixels)."""
        pos = getattr(self.source, "pos_corr", None)
        if pos is not None:
            return np.asarray(pos, dtype=float)[self._frames]
        out = np.zeros((self.n_frames, 2))
        if self.movement_kernel is None:
            return out
        frames = np.arange(len(self.source.time))[self._frames]
        dx, dy = _kernel_shift(self.movement_kernel,
                               np.atleast_1d(self.target_pos_column - self.column_offset),
                               np.atleast_1d(self.target_pos_row - self.row_offset), frames)
        out[:, 0] = np.reshape(dx, (self.n_frames, -1))[:, 0]
        out[:, 1] = np.reshape(dy, (self.n_frames, -1))[:, 0]
        return out

    @property
    def status(self):
        """The STATUS returned by the last :meth:`photometry` call."""
        return self._status

    def do_photometry(self):
        """The algorithm: fill ``self.lightcurve`` and ``final_phot_mask``, return a STATUS.

        No file or database I/O here. Raise :class:`photometry.hooks.errors.SkipTarget`,
        :class:`UnprocessableTarget` or :class:`AlgorithmFailure` to signal why it stopped.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement do_photometry")

    def photometry(self):
        """Run :meth:`do_photometry`, then the post-processing metrics (TASOC §3.6).

        Returns
        -------
        STATUS
        """
        # The core's loggers and the algorithm's own package (plugins log under their name).
        names = sorted({"photometry", type(self).__module__.split(".")[0]})
        with _collect_warnings(names) as messages:
            try:
                self._corrections_active = True
                self._apply_corrections()
                status = self.do_photometry()
                if not isinstance(status, STATUS) or status == STATUS.UNKNOWN:
                    raise AlgorithmFailure(
                        f"{type(self).__name__}.do_photometry returned {status!r}, not a STATUS")
                if status in (STATUS.OK, STATUS.WARNING):
                    self._post_process()
                    status = self._check(status, messages)
            finally:
                self._store_flags()
        self.details["errors"].extend(messages)
        self._status = status
        return status

    def _check(self, status, messages):
        """The core's result checks (:mod:`photometry.core.checks`) and the algorithm's flags:
        the worse of their level and the algorithm's status."""
        from photometry.core.checks import LEVELS, Flag, check_result
        report = check_result(self)
        if status == STATUS.WARNING and not any(f.level == "WARNING" for f in self._flags):
            # the algorithm said WARNING without a reason code: its logged warnings are it
            said = [m.split(": ", 1)[-1] for m in messages if m.startswith("WARNING: ")]
            self._flags.append(Flag("METHOD_WARNING", "WARNING",
                                    "; ".join(said) or f"{self.name} returned WARNING"))
        self._source_warnings()
        self._check_report = report
        for item in report.flags:
            logger.warning("TIC %d: %s %s: %s", self.starid, item.level, item.code, item.text)
        level = max([report.status] + [f.level for f in self._flags], key=LEVELS.index)
        return max(status, STATUS[level], key=_SEVERITY.index)

    def _source_warnings(self):
        """What the data source could not do well (``source.warnings``: (code, text), e.g. a
        TESScut sky it could not separate from the stars) makes any result at best a
        WARNING: each is a flag with its code, stored with the result."""
        for code, text in getattr(self.source, "warnings", ()):
            self.report_flag(code, text)

    def _store_flags(self):
        """``details['checks']``: the algorithm's flags, then the core checks' (if they ran)."""
        from photometry.core.checks import CheckReport
        report = self._check_report
        if report is None and not self._flags:
            return
        combined = CheckReport(self._flags + (report.flags if report else []),
                               report.metrics if report else {})
        self.details["checks"] = combined.to_details()

    def report_flag(self, code, text, level=STATUS.WARNING):
        """Record a reason code of this result (an algorithm's own check, e.g. a fit's chi^2).

        ``level`` STATUS.WARNING or STATUS.ERROR: the target's STATUS is at least that bad.
        The code and ``text`` (one line) go to the todo diagnostics and the light-curve
        header with the core's checks (``docs/checks.md``); the text is also logged.
        """
        from photometry.core.checks import Flag
        name = STATUS(level).name
        self._flags.append(Flag(str(code), name, str(text)))
        logger.warning("TIC %d: %s %s: %s", self.starid, name, code, text)

    def decline(self, code, text):
        """Refuse this target with a reason code (e.g. ``SATURATED``): raises
        :class:`AlgorithmFailure`, so the target is ERROR with ``code: text`` as its error
        and the code in the diagnostics. Why a method declines rather than guesses: a wrong
        flux marked OK is the worst outcome (``docs/checks.md``)."""
        from photometry.core.checks import Flag
        self._flags.append(Flag(str(code), "ERROR", str(text)))
        raise AlgorithmFailure(f"TIC {self.starid}: {code}: {text}")

    def failure_reason(self):
        """One line: the ERROR reasons of the checks ("CODE: text; ..."), for the todo list."""
        errors = [f"{f.code}: {f.text}" for f in self.check_flags if f.level == "ERROR"]
        return f"TIC {self.starid}: " + "; ".join(errors) if errors else \
            f"TIC {self.starid}: {self.name} returned ERROR"

    @property
    def check_flags(self):
        """The reason codes recorded so far (algorithm's and, after the checks, the core's)."""
        report = self._check_report
        return list(self._flags) + (list(report.flags) if report is not None else [])

    def saturated_target_pixels(self):
        """(r, c) bool of the target's saturated pixels (core and bleed columns), or None.

        From the ``Saturated`` pixel flags, or the calibrated flux at the saturation level
        where a source has no flags (TPFs); see :func:`photometry.core.checks.saturated_target_pixels`.
        """
        from photometry.core.checks import saturated_target_pixels
        return saturated_target_pixels(self)

    def _post_process(self):
        lc = self.lightcurve
        flux = np.asarray(lc["flux"], dtype=float)
        err = np.asarray(lc["flux_err"], dtype=float)
        if not np.any(np.isfinite(flux)):
            self.decline("FINITE_FRACTION", "every flux value is NaN")
        if not np.any(np.isfinite(err)):
            self.decline("ERRORS_INVALID", "every flux error is NaN")
        good = TESSQualityFlags.filter(self.quality) & np.isfinite(flux)
        self.details.update(lightcurve_metrics(self.time[good], flux[good], err[good]))
        cen = np.asarray(lc["pos_centroid"], dtype=float)[good]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.details["pos_centroid"] = [float(v) for v in np.nanmedian(cen, axis=0)]
        mask = self.final_phot_mask
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            self.details["mask_size"] = int(np.count_nonzero(mask))
            edge = np.zeros_like(mask)
            edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
            self.details["edge_flux"] = float(np.nansum(self.sumimage[mask & edge]))
        expected = self.expected_noise()
        if expected is not None:
            from photometry.data.noise import measured_cdpp
            self.details["cdpp_expected"] = expected.cdpp(1.0)
            self.details["cdpp_sap"] = measured_cdpp(self.time[good], flux[good], self.cadence)
        if "AP_CONT" in self.additional_headers:
            self.details["contamination"] = float(self.additional_headers["AP_CONT"][0])
        elif "PSF_CONT" in self.additional_headers:
            self.details["contamination"] = float(self.additional_headers["PSF_CONT"][0])

    def report_details(self, error=None, skip_targets=None):
        """Record an error message, or the starids this target's light curve makes redundant."""
        if error is not None:
            self.details["errors"].append(str(error))
        if skip_targets is not None:
            self.details["skip_targets"] = [int(s) for s in skip_targets]

    def output_quality(self):
        """(N,) QUALITY of the light-curve file (:func:`photometry.hooks.quality.lightcurve_quality`):
        SPOC's cadence bits, and our own bits (BackgroundShenanigans where any mask pixel has
        it, the bits the stamp corrections set) shifted above them."""
        own = np.zeros(self.n_frames, dtype=np.int64)
        flags = self.pixelflags_cube
        mask = self.final_phot_mask
        sel = flags if mask is None else flags[:, np.asarray(mask, dtype=bool)]
        bad = np.any((sel & PixelQualityFlags.BackgroundShenanigans) != 0,
                     axis=tuple(range(1, sel.ndim)))
        own[bad] |= int(LightCurveQualityFlags.BackgroundShenanigans)
        own |= getattr(self, "correction_quality", 0)
        return lightcurve_quality(self.quality, own)

    def good_cadences(self):
        """(N,) bool: cadences passing ``TESSQualityFlags.DEFAULT_BITMASK`` with finite flux."""
        flux = np.asarray(self.lightcurve["flux"], dtype=float)
        return TESSQualityFlags.filter(self.quality) & np.isfinite(flux)

    @cached_property
    def ccd_noise(self):
        """:class:`photometry.data.noise.CCDNoise` of the data: the source's own (``noise``), the
        cache's ``noise_*`` attributes, the TPF's header, else the documented defaults."""
        from photometry.data.noise import CCDNoise
        noise = getattr(self.source, "noise", None)
        if isinstance(noise, CCDNoise):
            return noise
        attrs = getattr(self.source, "attrs", None) or {}
        if "noise_read_noise" in attrs:
            return CCDNoise.from_attrs(attrs)
        return CCDNoise.from_header(getattr(self.source, "header", None) or {}, self.cadence)

    def flux_weights(self, sky=None):
        """(r, c) weights ``w`` of the flux as a linear estimate from the stamp's pixels,
        ``flux = sum(w * pixels)``: what the expected noise (:meth:`expected_noise`) sums.

        Why by ``flux_kind``: an aperture sum and a PRF fit of the same pixels have different
        noise. ``"total"`` (a PRF fit): the weighted least-squares weights of the target's
        unit-flux model (``target_model_image``, else the core's PRF at the catalog position)
        with a jointly fitted constant background (:func:`photometry.data.noise.prf_fit_weights`),
        over the pixels not flagged for PRF fits, weighted by the CCD noise model. Otherwise
        1 in ``final_phot_mask`` (the aperture sum); None without a mask.

        Parameters
        ----------
        sky : (r, c) array, optional
            Mean sky background of the good cadences (computed if not given).
        """
        mask = self.final_phot_mask
        if mask is None:
            return None
        if self.flux_kind != "total":
            return np.asarray(mask, dtype=float)
        from photometry.core.checks import _prf_images, _prf_model
        from photometry.data.noise import prf_fit_weights
        prf = self.target_model_image
        if prf is None or np.shape(prf) != np.shape(self.sumimage):
            cat = self.catalog[np.asarray(self.catalog["starid"]) == self.starid]
            prf = _prf_images(self, _prf_model(self), cat["row_stamp"], cat["column_stamp"])[0]
        if sky is None:
            sky = self._mean_sky()
        cols, _ = self.get_pixel_grid()
        var = self.ccd_noise.pixel_variance(np.asarray(self.sumimage, float) + sky, cols)
        flagged = np.all((np.asarray(self.pixelflags_cube)[self.good_cadences()]
                          & PixelQualityFlags.PRF_FIT_BITMASK) != 0, axis=0)
        var = np.where(flagged | ~np.isfinite(self.sumimage), np.nan, var)
        return prf_fit_weights(prf, var, background=True)

    def _mean_sky(self):
        """(r, c) mean background of the good cadences."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(self.backgrounds_cube[self.good_cadences()], axis=0)

    def expected_noise(self):
        """Expected noise of the flux (:class:`ApertureNoise`), from the sum image (stars), the
        mean background of the good cadences (sky) and the read noise of each pixel's output,
        weighted as the method's flux weights its pixels (:meth:`flux_weights`: the aperture
        sum, or the PRF fit of a ``flux_kind = "total"`` method); None without a mask or a
        positive flux."""
        from photometry.data.noise import ApertureNoise
        good = self.good_cadences()
        if self.final_phot_mask is None or not np.any(good):
            return None
        flux = float(np.median(np.asarray(self.lightcurve["flux"], dtype=float)[good]))
        if not flux > 0:
            return None
        sky = self._mean_sky()
        cols, _ = self.get_pixel_grid()
        return ApertureNoise.of_weights(self.ccd_noise, self.sumimage, sky,
                                        self.flux_weights(sky), cols, flux, self.cadence)

    def background_error_in_mask(self):
        """(N,) 1-sigma error of the background summed over the mask (SAP_BKG_ERR), e-/s.

        The method's own ``flux_background_err`` column if it has one; otherwise the
        background errors added linearly over the mask: a background model (or the flat local
        estimate) errs alike in neighbouring pixels.
        """
        if "flux_background_err" in self.lightcurve.colnames:
            return np.asarray(self.lightcurve["flux_background_err"], dtype=float)
        mask = self.final_phot_mask
        if mask is None:
            return np.full(self.n_frames, np.nan)
        return np.sum(self.backgrounds_err_cube[:, np.asarray(mask, dtype=bool)], axis=1)

    def aperture_bitmask(self):
        """(r, c) int32 APERTURE image (TASOC §2.5 bits, see docs/coordinates_and_formats.md)."""
        return aperture_bitmask(self)

    def save_lightcurve(self, output_folder):
        """Write the light curve with each writer of ``photometry.writers`` (atomically).

        Returns the path the first writer wrote (the FITS file by default). Called by the core.
        """
        from photometry.hooks.plugins import default_plugin_manager, lookup
        pm = default_plugin_manager()
        paths = [lookup(pm, "register_output_writers", name)().write(self, output_folder)
                 for name in self.psettings.get("writers", ["fits"])]
        if not paths:
            raise ConfigurationError("settings photometry.writers: no output writer named")
        self.details["filepath_lightcurve"] = str(paths[0])
        return paths[0]


def lightcurve_metrics(time, flux, flux_err):
    """TASOC §3.6 statistics of a light curve (good cadences only).

    Returns a dict: ``mean_flux`` (median flux, e-/s), ``variance`` (of the relative flux,
    ddof 1), ``rms_hour`` (ppm: MAD-scaled scatter of the relative flux binned to one hour),
    ``ptp`` (ppm: median absolute point-to-point difference), ``variability``
    (standard deviation of the relative flux after a 1/sigma-weighted cubic in time, divided by
    the median relative error; about 1 for a constant star with honest errors).
    """
    from astropy.stats import mad_std

    time = np.asarray(time, dtype=float)
    flux = np.asarray(flux, dtype=float)
    flux_err = np.asarray(flux_err, dtype=float)
    ok = np.isfinite(time) & np.isfinite(flux)
    time, flux, flux_err = time[ok], flux[ok], flux_err[ok]
    out = {"mean_flux": None, "variance": None, "rms_hour": None, "ptp": None,
           "variability": None}
    if flux.size == 0:
        return out
    mean = float(np.median(flux))
    out["mean_flux"] = mean
    if flux.size < 2 or mean == 0:
        return out
    rel = flux / mean - 1.0
    rel_err = np.abs(flux_err / mean)
    out["variance"] = float(np.var(rel, ddof=1))
    out["ptp"] = float(1e6 * np.median(np.abs(np.diff(rel))))
    # One-hour bins of the relative flux; the scatter of the bin means is the rms per hour.
    edges = np.arange(time[0], time[-1] + 1 / 24 + 1e-9, 1 / 24)
    index = np.digitize(time, edges)
    sums = np.bincount(index, weights=rel)
    counts = np.bincount(index)
    binned = sums[counts > 0] / counts[counts > 0]
    if binned.size >= 2:
        out["rms_hour"] = float(1e6 * mad_std(binned))
    good_err = np.isfinite(rel_err) & (rel_err > 0)
    if np.count_nonzero(good_err) > 4:
        t = time[good_err] - time[good_err].mean()
        w = 1.0 / rel_err[good_err]
        coeffs = np.polyfit(t, rel[good_err], 3, w=w)
        resid = rel[good_err] - np.polyval(coeffs, t)
        out["variability"] = float(np.std(resid) / np.median(rel_err[good_err]))
    return out


def aperture_bitmask(phot):
    """APERTURE bits: 1 collected, 2 in mask, 4 background, 8 centroid, 32..256 CCD output."""
    img = phot.sumimage
    bits = np.zeros(img.shape, dtype=np.int32)
    bits[np.isfinite(img)] |= 1
    if phot.final_phot_mask is not None:
        mask = np.asarray(phot.final_phot_mask, dtype=bool)
        bits[mask] |= 2 | 8
    used = phot.background_pixels_used
    if used is not None:
        bits[used] |= 4
    cols, _ = phot.get_pixel_grid()
    # CCD outputs A-D by 0-based columns 44-555, 556-1067, 1068-1579, 1580-2091.
    for k, bit in enumerate((32, 64, 128, 256)):
        lo, hi = 44 + 512 * k, 44 + 512 * (k + 1)
        bits[(cols >= lo) & (cols < hi)] |= bit
    return bits


def _load_corrections(settings):
    """Instances of the stamp corrections named in ``photometry.corrections``."""
    from photometry.hooks.plugins import default_plugin_manager, lookup
    names = settings["photometry"].get("corrections", [])
    pm = default_plugin_manager()
    return [lookup(pm, "register_corrections", name)(settings) for name in names]


def _kernel_shift(kernel, x, y, frames):
    """Shift (dx, dy) in ``frames`` of reference science-pixel positions (x, y).

    ``kernel`` has ``shift(x, y, frame_index)`` (:class:`photometry.data.movement.MovementKernel`,
    :class:`photometry.data.tpf.TranslationKernel`). Frames without a measurement (NaN kernel rows)
    get no shift rather than NaN positions: the reference position is the best guess there.
    """
    dx, dy = kernel.shift(x, y, frames)
    dx = np.where(np.isfinite(dx), dx, 0.0)
    dy = np.where(np.isfinite(dy), dy, 0.0)
    return dx, dy


def _evaluate_where(table, where, params):
    """Evaluate the two SQL conditions BasePhotometry uses against an in-memory Table."""
    if where.startswith("starid"):
        return np.asarray(table["starid"]) == params[0]
    row = np.asarray(table["row"], dtype=float)
    col = np.asarray(table["column"], dtype=float)
    return (row >= params[0]) & (row <= params[1]) & (col >= params[2]) & (col <= params[3])
