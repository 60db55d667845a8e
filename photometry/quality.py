"""Quality bit registries, defined once: cadence flags (SPOC), pixel flags (cache), output flags."""
import enum

import numpy as np

__all__ = ["TESSQualityFlags", "PixelQualityFlags", "LightCurveQualityFlags"]


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
    #: ``photometry.cache.FRAME_PROBLEMS``) and is left out of the sum image, the reference
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
    """Bits of the output ``QUALITY`` column (the cadence's own SPOC bits go in PIXEL_QUALITY)."""

    FlaggedBadData = 1
    ManualExclude = 2
    SigmaClip = 4
    ScatteredLightUnreliable = 64
    Interpolated = 128
    BackgroundShenanigans = 256


LightCurveQualityFlags.DEFAULT_BITMASK = 1 | 2
