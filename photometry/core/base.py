"""BasePhotometry: everything a per-target algorithm needs, and nothing it must not do.

An algorithm subclasses :class:`BasePhotometry`, sets a unique ``name`` and ``version``, and
implements :meth:`BasePhotometry.do_photometry`, which fills ``self.lightcurve`` (flux,
flux_err, flux_background, pos_centroid), ``self.final_phot_mask`` and optionally
``self.additional_headers``, and returns a :class:`STATUS`. It reads data only through this
class (stamp cubes, sum image, catalog, WCS, movement kernel, PRF) and does no file or
database I/O: the core (:func:`photometry.scheduler.target.run_target`) opens the data, turns
exceptions into a STATUS and writes the light curve. The class keeps the stamp, the cubes and
the time axis; what it delegates lives in its own module of ``photometry.core``: the catalog
queries (``target_catalog``), the sky (``sky``), the motion (``motion``), the metrics
(``metrics``), the verdict and reason codes (``verdict``) and the plugins a target uses
(``lookup``).

Coordinates (``docs/coordinates_and_formats.md``): 0-based ``(row, column)`` of the full SPOC
CCD frame (first science pixel at row 0, column 44), pixel centres at integers. Cube pixel
``[i, j]`` of the stamp is CCD pixel ``(row_min + i, col_min + j)``.

The data source (``source`` argument) is anything satisfying
:class:`photometry.data.sources.DataSource` (the Protocol lists what BasePhotometry reads): a
:class:`photometry.data.cache.FFICache` (datasource "ffi"), a
:class:`photometry.data.tpf.TPFSource` ("tpf") or a
:class:`photometry.data.memory_source.MemorySource`.
"""
import contextlib
import logging
from functools import cached_property
from pathlib import Path

import numpy as np
from astropy.table import Table

from photometry.hooks.errors import AlgorithmFailure, ConfigurationError, UnprocessableTarget
from photometry.hooks.quality import PixelQualityFlags
from photometry.core import lookup, metrics, motion, sky, verdict
from photometry.core.stamps import default_stamp_size, clip_stamp
from photometry.core.target_catalog import query_catalog, read_target, stamp_catalog
from photometry.data.sources import ERRORS, FLAGS, IMAGES
from photometry.hooks.status import STATUS

__all__ = ["STATUS", "BasePhotometry"]

logger = logging.getLogger(__name__)


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



def _expected_noise(phot):
    """:func:`photometry.core.metrics.expected_noise` of the current result.

    Kept while the mask, the flux, the stamp, the sum image and the background cube are the
    same: the metrics and the light-curve file both ask for it (~1 ms each at 1 282
    cadences). The arrays are held and compared by identity (an ``id`` alone could be reused
    by a new array once the old one is freed).
    """
    mask = phot.final_phot_mask
    key = (None if mask is None else np.asarray(mask).tobytes(),
           np.asarray(phot.lightcurve["flux"], dtype=float).tobytes(),
           phot.flux_kind, phot._stamp)
    arrays = (phot.__dict__.get("sumimage"), phot.__dict__.get("backgrounds_cube"),
              phot.target_model_image)
    memo = phot.__dict__.get("_expected_noise_memo")
    if memo is not None and memo[0] == key and all(a is b for a, b in zip(memo[1], arrays)):
        return memo[2]
    value = metrics.expected_noise(phot)
    phot.__dict__["_expected_noise_memo"] = (key, arrays, value)
    return value


class BasePhotometry:
    """The target, its stamp, cubes, catalog, motion and metrics; algorithms subclass it.

    Parameters
    ----------
    starid : int
        TIC id of the target; it must be in the source's catalog.
    source : DataSource
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

    # where the stars are in each frame (photometry.core.motion)
    _frame_index = motion.frame_index
    _source_frame = motion.source_frame
    movement_at = motion.movement_at
    catalog_attime = motion.catalog_attime
    _pos_corr = motion.pos_corr
    # reason codes of the result (photometry.core.verdict)
    report_flag = verdict.report_flag
    decline = verdict.decline
    failure_reason = verdict.failure_reason
    check_flags = property(verdict.check_flags)
    saturated_target_pixels = verdict.saturated_target_pixels
    sumimage = cached_property(sky.stamp_sumimage)
    # iterators over the frames of the cubes (TASOC's API)
    images = property(lambda self: iter(self.images_cube), doc="Frames of ``images_cube``.")
    images_err = property(lambda self: iter(self.images_err_cube),
                          doc="Frames of ``images_err_cube``.")
    backgrounds = property(lambda self: iter(self.backgrounds_cube),
                           doc="Frames of ``backgrounds_cube``.")
    pixelflags = property(lambda self: iter(self.pixelflags_cube),
                          doc="Frames of ``pixelflags_cube``.")
    # the catalog (photometry.core.target_catalog)
    _query_catalog = query_catalog
    _read_target = read_target
    catalog = cached_property(stamp_catalog)
    # the sky under the stamp (photometry.core.sky)
    _background_local = cached_property(sky.local_background)
    _background_model = sky.background_model
    backgrounds_cube = cached_property(sky.backgrounds_cube)
    backgrounds_err_cube = cached_property(sky.backgrounds_err_cube)
    background_pixels_used = property(sky.background_pixels_used)
    # metrics and diagnostics of the result (photometry.core.metrics)
    _post_process = metrics.post_process
    output_quality = metrics.output_quality
    good_cadences = metrics.good_cadences
    ccd_noise = cached_property(metrics.ccd_noise)
    flux_weights = metrics.flux_weights
    _mean_sky = metrics.mean_sky
    expected_noise = _expected_noise
    background_error_in_mask = metrics.background_error_in_mask
    aperture_bitmask = metrics.aperture_bitmask
    # the verdict: checks, reason codes (photometry.core.verdict)
    _check = verdict.check
    _source_warnings = verdict.source_warnings
    _store_flags = verdict.store_flags
    # the plugins a target uses: stamp corrections, output writers (photometry.core.lookup)
    _apply_corrections = lookup.apply_corrections
    save_lightcurve = lookup.save_lightcurve

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
        self._corrections = lookup.load_corrections(self.settings)
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
    @property
    def movement_kernel(self):
        """The source's movement kernel (per-frame shift relative to the reference), or None."""
        return getattr(self.source, "movement_kernel", None)

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
        return np.asarray(self._read(IMAGES), dtype=np.float64)

    @cached_property
    def pixel_err_cube(self):
        """(N, r, c) 1-sigma uncertainty of the pixels alone (e-/s), without the background's.

        For algorithms that fit a background level themselves: the background model's error
        is common to the pixels of a stamp, so adding it to each pixel as if independent
        (``images_err_cube``) overstates the error of a fitted flux (2.4 x for a Tmag 12.5
        star of the linpsf test scene).
        """
        return np.asarray(self._read(ERRORS), dtype=np.float64)

    @cached_property
    def images_err_cube(self):
        """(N, r, c) 1-sigma uncertainty of ``images_cube`` (e-/s), background error added."""
        # sqrt(a ** 2 + b ** 2) with one temporary instead of three (same operations)
        var = np.square(self.pixel_err_cube)
        var += np.square(self.backgrounds_err_cube)
        return np.sqrt(var, out=var)

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
            flags = np.asarray(self._read(FLAGS), dtype=np.uint8).copy()
        except KeyError:
            flags = np.zeros(self._raw_images.shape, dtype=np.uint8)
        flags[~np.isfinite(self._raw_images)] |= np.uint8(PixelQualityFlags.NonFinite)
        return flags

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

    def report_details(self, error=None, skip_targets=None):
        """Record an error message, or the starids this target's light curve makes redundant."""
        if error is not None:
            self.details["errors"].append(str(error))
        if skip_targets is not None:
            self.details["skip_targets"] = [int(s) for s in skip_targets]





