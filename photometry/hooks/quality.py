"""Quality bit registries, defined once: cadence flags (SPOC), pixel flags (cache), output flags."""
import enum

import numpy as np

__all__ = ["TESSQualityFlags", "PixelQualityFlags", "LightCurveQualityFlags",
           "lightcurve_quality", "CHECK_CODES", "FIT_BITMASK", "fit_cadences"]


class _Flags(enum.IntFlag):
    """Bit flags with helpers to test arrays of packed values."""

    @classmethod
    def filter(cls, quality, bitmask=None):
        """True where none of the bits of ``bitmask`` (default: the class default) is set."""
        if bitmask is None:
            bitmask = cls.DEFAULT_BITMASK
        return (np.asarray(quality, dtype=np.int64) & int(bitmask)) == 0

    @classmethod
    def decode(cls, value):
        """Names of the flags set in ``value``."""
        return [flag.name for flag in cls if int(value) & int(flag)]


class TESSQualityFlags(_Flags):
    """SPOC cadence quality bits (``DQUALITY``), as lightkurve decodes them."""

    AttitudeTweak = 1
    SafeMode = 2
    CoarsePoint = 4
    EarthPoint = 8
    Argabrightening = 16
    Desat = 32
    ApertureCosmic = 64
    ManualExclude = 128
    Discontinuity = 256
    ImpulsiveOutlier = 512
    CollateralCosmic = 1024
    Straylight = 2048
    Straylight2 = 4096
    PlanetSearchExclude = 8192
    BadCalibrationExclude = 16384
    InsufficientTargets = 32768
    #: Private bit set by ``prepare`` (never by SPOC, whose bits end far below it; 2^30 still
    #: fits the int32 ``quality`` of the cache and the light curve): the frame failed the
    #: frame checks (all NaN, all zero, constant, mostly non-finite or absurd level; see
    #: ``photometry.data.cache.FRAME_PROBLEMS``) and is left out of the sum image, the reference
    #: frame, the movement kernel and every prepare-stage model.
    UnusableFrame = 1 << 30


#: Cadences we never use for sum images, references or photometry statistics.
TESSQualityFlags.DEFAULT_BITMASK = (1 | 2 | 4 | 8 | 32 | 128 | TESSQualityFlags.UnusableFrame)


class PixelQualityFlags(_Flags):
    """Per-pixel, per-frame bits stored in the cache's ``pixel_flags`` cube."""

    NotUsedForBackground = 1
    ManualExclude = 2
    BackgroundShenanigans = 4
    Saturated = 8
    NonFinite = 16


PixelQualityFlags.DEFAULT_BITMASK = 2 | 16
#: pixels a PRF fit leaves out: excluded, not finite, or saturated (the PRF does not hold there)
PixelQualityFlags.PRF_FIT_BITMASK = 2 | 8 | 16


class LightCurveQualityFlags(_Flags):
    """Our own per-cadence bits of a light curve (stamp corrections, background trouble).

    They are not SPOC's: the light-curve file's QUALITY column holds SPOC's cadence bits as
    read, so that lightkurve's bitmasks act on it, and these bits shifted up by
    :data:`OUTPUT_SHIFT` (see :func:`lightcurve_quality`). The values here are stored in cache
    models (scattered-light cube flags), so they are never renumbered.
    """

    FlaggedBadData = 1
    ManualExclude = 2
    SigmaClip = 4
    ScatteredLightUnreliable = 64
    Interpolated = 128
    BackgroundShenanigans = 256


LightCurveQualityFlags.DEFAULT_BITMASK = 1 | 2
#: our bits sit this far up in QUALITY: above every bit SPOC uses (1 .. 2^17) and outside
#: lightkurve's named bitmasks (all <= 65535), so "default"/"hard"/"hardest" mean what they mean
#: for SPOC files; ``quality_bitmask=int`` can select ours (e.g. ``256 << 20``)
LightCurveQualityFlags.OUTPUT_SHIFT = 20


def lightcurve_quality(cadence_quality, own_flags):
    """The QUALITY column of a light-curve file.

    SPOC's cadence bits as read; ``Straylight2`` (4096, SPOC's automatic scattered-light flag,
    in lightkurve's "hard" mask) where our scattered-light correction is unreliable; our own
    :class:`LightCurveQualityFlags` shifted up by ``OUTPUT_SHIFT`` (FlaggedBadData is left
    out: the SPOC bits already say it).
    """
    q = np.asarray(cadence_quality, dtype=np.int64).copy()
    own = np.asarray(own_flags, dtype=np.int64) & ~int(LightCurveQualityFlags.FlaggedBadData)
    q[(own & int(LightCurveQualityFlags.ScatteredLightUnreliable)) != 0] |= \
        int(TESSQualityFlags.Straylight2)
    q |= own << LightCurveQualityFlags.OUTPUT_SHIFT
    return q


#: the reason codes of the core's checks (what ``checks.disabled`` may name; a test keeps it
#: equal to the codes :func:`check_result` raises)
CHECK_CODES = frozenset({
    "FINITE_FRACTION", "ERRORS_INVALID", "NOISE_EXCESS", "ERRORS_OVERSTATED", "NO_MASK",
    "KERNEL_INVALID", "PIXEL_ERRORS_MISSING", "BLEED_NOT_COVERED", "BLEED_TRUNCATED",
    "FLUX_VS_REFERENCE", "FLUX_VS_CATALOG", "MASK_TOO_SMALL", "FLUX_LOW", "NOISE_VS_APERTURE",
    "SLOW_NOISE_VS_APERTURE"})


#: cadences a correction fits on: lightkurve's "default" bitmask of SPOC bits (17087) ...
FIT_BITMASK = 1 | 2 | 4 | 8 | 16 | 32 | 128 | 512 | 16384
#: ... and none of our own bits that make a cadence untrustworthy
_OWN_BAD = int(LightCurveQualityFlags.ScatteredLightUnreliable
               | LightCurveQualityFlags.BackgroundShenanigans
               | LightCurveQualityFlags.ManualExclude)


def fit_cadences(quality, flux):
    """(N,) bool: cadences a light-curve correction may fit on (see FIT_BITMASK)."""
    q = np.asarray(quality, dtype=np.int64)
    own = q >> LightCurveQualityFlags.OUTPUT_SHIFT
    return ((q & FIT_BITMASK) == 0) & ((own & _OWN_BAD) == 0) & np.isfinite(flux)
