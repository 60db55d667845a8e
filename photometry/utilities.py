"""Small numerical helpers shared by the core and the plugins."""
import numpy as np

__all__ = ["mag2flux", "flux2mag", "TESS_ZEROPOINT"]

#: TASOC zero point: Tmag 10 gives about 15 000 e-/s.
TESS_ZEROPOINT = 20.451


def mag2flux(tmag):
    """Expected flux (e-/s) of a star of TESS magnitude ``tmag``."""
    return 10 ** (-0.4 * (np.asarray(tmag, dtype=float) - TESS_ZEROPOINT))


def flux2mag(flux):
    """TESS magnitude of a star giving ``flux`` e-/s."""
    return TESS_ZEROPOINT - 2.5 * np.log10(np.asarray(flux, dtype=float))
