"""Small numerical helpers shared by the core and the plugins."""
import numpy as np

__all__ = ["mag2flux", "flux2mag", "TESS_ZEROPOINT", "BTJD_TIME_CARDS", "disc_mask", "open_fits"]

#: TASOC zero point: Tmag 10 gives about 15 000 e-/s.
TESS_ZEROPOINT = 20.451

#: (keyword, value, comment) of the BTJD time system SPOC writes in its FFIs and light curves
BTJD_TIME_CARDS = (
    ("TIMEREF", "SOLARSYSTEM", "barycentric correction applied to times"),
    ("TASSIGN", "SPACECRAFT", "where time is assigned"),
    ("TIMESYS", "TDB", "time system is Barycentric Dynamical Time (TDB)"),
    ("BJDREFI", 2457000, "integer part of BTJD reference date"),
    ("BJDREFF", 0.0, "fraction of the day in BTJD reference date"),
    ("TIMEUNIT", "d", "time unit for TIME, TSTART and TSTOP"),
)


def mag2flux(tmag):
    """Expected flux (e-/s) of a star of TESS magnitude ``tmag``."""
    return 10 ** (-0.4 * (np.asarray(tmag, dtype=float) - TESS_ZEROPOINT))


def flux2mag(flux):
    """TESS magnitude of a star giving ``flux`` e-/s."""
    return TESS_ZEROPOINT - 2.5 * np.log10(np.asarray(flux, dtype=float))


def disc_mask(shape, rows, cols, radii):
    """(shape) bool image, True within ``radii`` of each (row, col) centre (0-based pixels).

    Why a loop over small boxes: catalogs hold thousands of stars, and drawing each disc in
    its own bounding box costs far less than distances over the whole image per star.
    """
    mask = np.zeros(shape, dtype=bool)
    n_rows, n_cols = shape
    for r0, c0, rad in zip(rows, cols, radii):
        r1, r2 = int(max(0, np.floor(r0 - rad))), int(min(n_rows, np.ceil(r0 + rad) + 1))
        c1, c2 = int(max(0, np.floor(c0 - rad))), int(min(n_cols, np.ceil(c0 + rad) + 1))
        if r1 >= r2 or c1 >= c2:
            continue
        yy, xx = np.ogrid[r1:r2, c1:c2]
        mask[r1:r2, c1:c2] |= (yy - r0) ** 2 + (xx - c0) ** 2 <= rad ** 2
    return mask


def open_fits(path):
    """``astropy.io.fits.open`` (no memory map) with a one-line InputError naming the file."""
    from astropy.io import fits

    from photometry.hooks.errors import InputError
    try:
        return fits.open(path, memmap=False)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: not a FITS file ({exc})") from None
