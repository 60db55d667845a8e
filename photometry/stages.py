"""Base classes of the non-algorithm plugin kinds: prepare stages, stamp corrections,
calibration stages, light-curve corrections. Each subclass has a unique ``name`` and a
``version`` string."""

__all__ = ["PrepareStage", "BackgroundModel", "StampCorrection", "CalibrationStage",
           "LightCurveCorrection"]


class PrepareStage:
    """A CCD-wide model built at prepare time (background, scattered light, PRF shape).

    ``run`` reads the ingested frames through the cache writer (``cache.iter_frame_blocks()``)
    and stores its state in ``group`` (the cache's ``models/<name>`` group). It must be
    restartable: prepare calls it again from scratch if it did not finish.
    """

    name = None
    version = "0"

    def __init__(self, settings):
        self.settings = settings

    def run(self, cache, group):
        raise NotImplementedError


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

    ``apply(frame, models)`` takes and returns a :class:`photometry.calibration.RawFrame`.
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


class LightCurveCorrection:
    """A correction of a CCD's light curves after its photometry (systematics: PDCSAP_FLUX).

    The core (:mod:`photometry.correct`) calls, for each CCD and method: ``candidates(stars)``
    (which stars may shape the correction), ``fit(ensemble)`` on those stars' light curves,
    then ``correct(star)`` for every star of the CCD (the candidates too) and writes the
    result into its file. No file I/O here except a correction's own declared inputs (e.g.
    SPOC CBV files named in its settings). Deterministic: the same light curves give the same
    result, whatever the order of work.
    """

    name = None
    version = "0"

    def __init__(self, settings):
        self.settings = settings

    def candidates(self, stars):
        """(S,) bool: stars (an astropy Table: ``starid, tmag, row, column, variability,
        contamination``) whose light curves ``fit`` should see. Default: all."""
        import numpy as np
        return np.ones(len(stars), dtype=bool)

    def fit(self, ensemble):
        """Learn the CCD's correction from a :class:`photometry.correct.Ensemble`."""
        raise NotImplementedError

    def correct(self, star):
        """A :class:`photometry.correct.Corrected` for one :class:`photometry.correct.StarLightCurve`."""
        raise NotImplementedError

    def products(self):
        """CCD-level files to keep, ``{file name: HDUList}`` (written by the core into
        ``LC_DIR/cbv/``). Default: none."""
        return {}

    def restore(self, folder, key):
        """Restore the state of an earlier ``fit`` of CCD/method ``key`` = (sector, camera, ccd,
        cadence, method) from this correction's products in ``folder``, so that one more star
        can be corrected alone (``tessphot star``). Returns False if it cannot."""
        return False
