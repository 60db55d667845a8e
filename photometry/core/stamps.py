"""Stamp geometry: the default stamp size from Tmag, and clipping to the data.

Why a table: bright stars spread over many pixels and saturate, and the charge bleeds along
CCD columns (that is, over many *rows*), so their stamps must be much taller than wide. The
sizes follow the TASOC pipeline's lookup table, interpolated linearly in Tmag, rounded up,
made odd (centred on the target pixel), never smaller than ``photometry.stamp_min_size``.
"""
import math

import numpy as np

__all__ = ["default_stamp_size", "clip_stamp", "STAMP_TABLE"]

#: (Tmag, rows, columns) of the TASOC default stamp; Tmag >= 8 gets the minimum size.
STAMP_TABLE = np.array([
    (0.0, 832.0, 158.0),
    (1.0, 344.0, 100.0),
    (2.1, 147.0, 66.0),
    (3.2, 68.0, 45.0),
    (4.2, 36.0, 33.0),
    (5.3, 23.0, 23.0),
    (6.3, 18.0, 18.0),
    (8.0, 15.0, 15.0),
])


def default_stamp_size(tmag, settings=None):
    """(height, width) in pixels (rows, columns), both odd, of the stamp for ``tmag``.

    ``settings`` is the ``[photometry]`` section; ``stamp_min_size`` (default 15) is the
    smallest side and ``stamp_scale`` multiplies the table (for example 2 for crowded or
    very extended targets).
    """
    settings = settings or {}
    minimum = int(settings.get("stamp_min_size", 15))
    scale = float(settings.get("stamp_scale", 1.0))
    tmag = float(tmag)
    rows = np.interp(tmag, STAMP_TABLE[:, 0], STAMP_TABLE[:, 1])
    cols = np.interp(tmag, STAMP_TABLE[:, 0], STAMP_TABLE[:, 2])
    height = max(minimum, math.ceil(rows * scale))
    width = max(minimum, math.ceil(cols * scale))
    # Centred on a pixel with +-N//2, so the real size is always odd.
    return 2 * (height // 2) + 1, 2 * (width // 2) + 1


def clip_stamp(stamp, limits):
    """``stamp`` (row_min, row_max, col_min, col_max) clipped to ``limits`` (same form).

    Returns None if nothing is left.
    """
    r1, r2, c1, c2 = (int(v) for v in stamp)
    lr1, lr2, lc1, lc2 = (int(v) for v in limits)
    r1, r2 = max(r1, lr1), min(r2, lr2)
    c1, c2 = max(c1, lc1), min(c2, lc2)
    if r2 <= r1 or c2 <= c1:
        return None
    return (r1, r2, c1, c2)
