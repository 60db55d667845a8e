"""Base classes of the non-algorithm plugin kinds: prepare stages, stamp corrections,
calibration stages, light-curve corrections. Each subclass has a unique ``name`` and a
``version`` string."""
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from photometry.hooks.errors import ConfigurationError
from photometry.hooks.plugins import default_plugin_manager, lookup

__all__ = ["PrepareStage", "StreamingStage", "StreamContext", "BackgroundModel",
           "StampCorrection", "CalibrationStage", "LightCurveCorrection", "InputFile",
           "cache_catalog",
           "context_from_cache", "background_model_class"]


class PrepareStage:
    """A CCD-wide model built at prepare time (background, scattered light, PRF shape).

    A plain ``PrepareStage`` is a *second-pass* stage: after ingest (sum image, reference
    frame, movement kernel, catalog SQLite), ``run(cache, group)`` reads the stored frames
    through ``cache.iter_frame_blocks()`` and stores its state in ``group`` (the cache's
    ``models/<name>`` group). A stage that can fit each block as it streams by derives
    from :class:`StreamingStage` instead and costs no second read of the cube. Either must
    be restartable: prepare calls it again from scratch if it did not finish.
    """

    name = None
    version = "0"
    #: True for stages fed the frame blocks during ingest (:class:`StreamingStage`)
    streaming = False

    def __init__(self, settings):
        self.settings = settings

    def run(self, cache, group):
        raise NotImplementedError


@dataclass
class StreamContext:
    """What a streaming stage knows before the first block (``StreamingStage.begin``).

    ``preview_*`` stand in for the full-sector sum image, which does not exist yet: the mean
    of up to ``prepare.preview_frames`` usable frames spread evenly over the sector (trimmed
    as stored), the mean of their uncertainties ((R, C); in a second pass the first block's
    (k, R, C) uncertainties), and the pixel flags of the one nearest the middle (as the
    reference frame is). ``catalog`` is (row, column, tmag) in cube pixels
    through the WCS of that frame (stars move < 1 px over a sector), or None.
    """

    shape: tuple
    n_frames: int
    time: np.ndarray
    preview_image: np.ndarray
    preview_errors: np.ndarray
    preview_flags: np.ndarray
    n_preview: int
    catalog: Optional[tuple] = None
    filename: str = ""
    time_chunk: int = 32
    extra: Any = None


class StreamingStage(PrepareStage):
    """A prepare stage fitted block by block while prepare ingests the frames (one pass).

    Prepare calls ``begin(context, group)`` once with a :class:`StreamContext`, then
    ``add_block(frames, images, errors, pixel_flags, usable)`` for every block of
    ``time_chunk`` frames in time order (a slice of cache frame indices, the (k, R, C) cubes
    exactly as stored, and a (k,) bool of the frames that passed the frame checks: fit only
    those), then ``finish(cache, group)`` after ingest, when the cache's 1-D arrays (time,
    quality, ...) are final. The arrays passed to ``add_block`` are re-used afterwards:
    copy what must be kept. A resumed prepare calls ``begin`` again and replays the stored
    blocks, so the result is the same as without the interruption.

    ``run(cache, group)`` runs the same stage as a second pass over a finished cache (tests,
    benchmarks, re-fitting), with the full sum image as the preview.
    """

    streaming = True

    def begin(self, context, group):
        raise NotImplementedError

    def add_block(self, frames, images, errors, pixel_flags, usable):
        raise NotImplementedError

    def finish(self, cache, group):
        raise NotImplementedError

    def run(self, cache, group):
        context = context_from_cache(cache)
        self.begin(context, group)
        usable = np.asarray(getattr(cache, "usable_frames", np.ones(context.n_frames, bool)))
        for sl, images, errors, flags in cache.iter_frame_blocks():
            self.add_block(sl, images, errors, flags, usable[sl])
        return self.finish(cache, group)


class StageData:
    """Read access to an open cache for a prepare stage that reads more than frame blocks.

    The cubes (``images``, ``errors``, ``pixel_flags``) by block of frames and pixels, the
    1-D arrays (``time``, ``quality``, ...), the attributes, the finished ``models/`` groups,
    the movement kernel and the catalog SQLite next to the cache: a stage reads through this
    and never touches the HDF5 file itself. ``source`` is a cache (``CacheWriter``, whose
    ``file`` is the open h5py file) or an open h5py file.
    """

    def __init__(self, source):
        self._file = getattr(source, "file", source)

    @property
    def attrs(self):
        """The cache's attributes (``sector``, ``camera``, ``ccd``, offsets, ...)."""
        return self._file.attrs

    @property
    def shape(self):
        """(N, R, C) of the cubes."""
        return tuple(self._file["images"].shape)

    @property
    def time_chunk(self):
        """Frames per stored chunk of the cubes (1 when unchunked): read whole chunks."""
        chunks = self._file["images"].chunks
        return int(chunks[0]) if chunks else 1

    def __contains__(self, name):
        return name in self._file

    def array(self, name):
        """The whole dataset ``name`` (a 1-D array such as ``time`` or ``quality``)."""
        return self._file[name][()]

    def read(self, name, frames=slice(None), rows=slice(None), cols=slice(None)):
        """One block ``name[frames, rows, cols]`` of a cube."""
        return self._file[name][frames, rows, cols]

    def model_group(self, name):
        """The finished ``models/<name>`` group of a prepare stage, or None."""
        g = self._file.get(f"models/{name}")
        return g if g is not None and bool(g.attrs.get("complete", False)) else None

    def movement_kernel(self):
        """The cache's :class:`MovementKernel`, or None."""
        from photometry.data.movement import MovementKernel
        return MovementKernel.from_file(self._file)

    @property
    def catalog_path(self):
        """The catalog SQLite next to the cache (whether or not it exists)."""
        from pathlib import Path

        from photometry.data.cache import catalog_filename
        a = self._file.attrs
        return Path(self._file.filename).parent / catalog_filename(
            int(a["sector"]), int(a["camera"]), int(a["ccd"]))


def cache_catalog(h5file):
    """(row, column, tmag) of the catalog SQLite next to an open cache file, in cube pixel
    indices (reference-frame positions), or None when there is none."""
    import sqlite3
    from pathlib import Path

    from photometry.data.cache import catalog_filename
    a = h5file.attrs
    try:
        path = Path(h5file.filename).parent / catalog_filename(a["sector"], a["camera"],
                                                                a["ccd"])
    except KeyError:
        return None
    if not path.exists():
        return None
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        data = np.array(con.execute('SELECT "row", "column", tmag FROM catalog '
                                    'WHERE tmag IS NOT NULL').fetchall(), float).reshape(-1, 3)
    return (data[:, 0] - float(a.get("row_offset", 0)),
            data[:, 1] - float(a.get("column_offset", 0)), data[:, 2])


def context_from_cache(cache):
    """:class:`StreamContext` of an ingested cache: the sum image as the preview, the
    reference frame's flags, the first block's uncertainties, the catalog SQLite."""
    f = cache.file
    n, nrow, ncol = f["images"].shape
    ref = int(f.attrs.get("ref_frame", 0))
    first = next(iter(cache.iter_frame_blocks()), None)
    if "sumimage" in f:
        image = f["sumimage"][()]
    else:
        total = np.zeros((nrow, ncol))
        count = np.zeros((nrow, ncol))
        for _, images, _, _ in cache.iter_frame_blocks():
            ok = np.isfinite(images)
            total += np.where(ok, images, 0).sum(axis=0)
            count += ok.sum(axis=0)
        image = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    # the first block's uncertainties themselves (k, R, C): the typical pixel noise is
    # their median, as the stages measured it before there was a preview
    errors = first[2] if first is not None and len(first[2]) else \
        np.full((1, nrow, ncol), np.nan)
    flags = f["pixel_flags"][ref] if "pixel_flags" in f and n else \
        np.zeros((nrow, ncol), np.uint8)
    return StreamContext(
        shape=(nrow, ncol), n_frames=n, time=f["time"][()] if "time" in f else np.arange(n),
        preview_image=image, preview_errors=errors, preview_flags=flags, n_preview=n,
        catalog=cache_catalog(f), filename=str(f.filename),
        time_chunk=int(getattr(cache, "block", 32)))


class StampCorrection:
    """A correction applied to a target's stamp cubes before the algorithm runs.

    ``apply(phot)`` receives the BasePhotometry object and returns nothing; it replaces
    ``phot`` cubes (images, errors, backgrounds), adds its uncertainty to the errors and ORs
    its LightCurveQualityFlags bits into ``phot.correction_quality``.
    """

    name = None
    version = "0"

    def __init__(self, settings):
        self.settings = settings

    def available(self, phot):
        """Whether this correction has what it needs for ``phot`` (e.g. its model in the cache).

        A correction configured by default but without its state is skipped, not an error.
        """
        return True

    def apply(self, phot):
        raise NotImplementedError


class CalibrationStage:
    """One step of raw-FFI calibration; stages run in increasing ``order``.

    ``apply(frame, models)`` takes and returns a :class:`photometry.data.calibration.RawFrame`.
    """

    name = None
    version = "0"
    order = 0

    def __init__(self, settings):
        self.settings = settings

    def apply(self, frame, models):
        raise NotImplementedError


class BackgroundModel(PrepareStage):
    """A prepare stage whose stored state gives the sky background at any stamp and cadence.

    BasePhotometry calls ``evaluate(group, row_slice, col_slice, frames)`` (class method; the
    slices are in cube pixel indices of the science region, ``frames`` an index array or slice)
    and gets the (n_frames, rows, cols) background in e-/s, and ``evaluate_error`` (same
    signature) for its 1-sigma uncertainty.
    """

    @classmethod
    def evaluate(cls, group, row_slice, col_slice, frames=slice(None)):
        raise NotImplementedError

    @classmethod
    def evaluate_error(cls, group, row_slice, col_slice, frames=slice(None)):
        raise NotImplementedError


@dataclass(frozen=True)
class InputFile:
    """A file a :class:`LightCurveCorrection` reads, found and opened by the core.

    The first (sorted) file of ``folder`` whose name matches the glob ``pattern``; ``setting``
    names the setting that gave ``folder`` (its error message when the folder does not
    exist, a ConfigurationError: a mistyped folder is no silent fallback).
    """

    folder: str
    pattern: str = "*"
    setting: str = ""


class LightCurveCorrection:
    """A correction of a CCD's light curves after its photometry (systematics: PDCSAP_FLUX).

    The core (:mod:`photometry.scheduler.correct`) calls, for each CCD and method: ``candidates(stars)``
    (which stars may shape the correction), ``inputs(key)`` (the files it needs, which the core
    reads), ``fit(ensemble)`` on those stars' light curves (the files read are in
    ``ensemble.inputs``), then ``correct(star)`` for every star of the CCD (the candidates too)
    and writes the result into its file, then writes ``products()``. A correction does no file
    I/O: the core opens every file and hands it arrays (:class:`photometry.FitsTables`).
    Deterministic: the same light curves give the same result, whatever the order of work.
    """

    name = None
    version = "0"

    def __init__(self, settings):
        self.settings = settings

    def candidates(self, stars):
        """(S,) bool: stars (an astropy Table: ``starid, tmag, row, column, variability,
        contamination, status``; ``status`` is the photometry STATUS value) whose light curves
        ``fit`` should see. Default: all."""
        import numpy as np
        return np.ones(len(stars), dtype=bool)

    def inputs(self, key):
        """The files ``fit`` needs for CCD/method ``key`` = (sector, camera, ccd, cadence,
        method): ``{name: InputFile}`` (e.g. SPOC's CBV file of the CCD, from a setting). The
        core reads each into a :class:`photometry.FitsTables` and passes it as
        ``ensemble.inputs[name]`` (None when no file matched). Default: none."""
        return {}

    def fit(self, ensemble):
        """Learn the CCD's correction from a :class:`photometry.scheduler.correct.Ensemble`."""
        raise NotImplementedError

    def correct(self, star):
        """A :class:`photometry.scheduler.correct.Corrected` for one :class:`photometry.scheduler.correct.StarLightCurve`."""
        raise NotImplementedError

    def products(self):
        """CCD-level files to keep, ``{file name: HDUList}`` built in memory (written by the
        core into ``LC_DIR/cbv/``). Default: none."""
        return {}

    def restore(self, products, key):
        """Restore the state of an earlier ``fit`` of CCD/method ``key`` = (sector, camera, ccd,
        cadence, method) from this correction's products, so that one more star can be
        corrected alone (``tessphot star``). ``products.get(file name)`` gives a product of
        ``LC_DIR/cbv/`` as a :class:`photometry.FitsTables` (None if there is none; the core
        reads it). Returns False if it cannot."""
        return False


def background_model_class(name, pm=None):
    """The BackgroundModel prepare stage registered under ``name`` (``photometry.background``):
    the one lookup the core and plugins that evaluate the background model share."""
    cls = lookup(pm or default_plugin_manager(), "register_prepare_stages", name)
    if not issubclass(cls, BackgroundModel):
        raise ConfigurationError(
            f"photometry.background = '{name}' is not a BackgroundModel prepare stage")
    return cls
