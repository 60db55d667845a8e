"""Built-in light-curve correction "cbv": co-trending basis vectors and a MAP fit (PDCSAP_FLUX).

Registered through the ``photometry`` entry-point group like any third-party plugin
(``cbv = "photometry_cbv"``). After a CCD's photometry the core
(:mod:`photometry.scheduler.correct`) hands it the CCD's light curves: it builds co-trending basis
vectors from the quiet, well-measured stars (robust SVD, :mod:`photometry_cbv.basis`) or
takes SPOC's CBVs (``cbv.spoc_cbv_dir``, :mod:`photometry_cbv.spoc`), fits them to each star
with a prior from its neighbours' coefficients (PDC-MAP) and returns PDCSAP_FLUX. See
``docs/corrections.md``.
"""
import photometry

from .basis import Basis, PriorModel, build_basis, map_fit, normalise, white_noise
from .correction import CBVCorrection
from .spoc import cbv_hdulist, cbv_input, read_cbvs, vectors_on

__all__ = ["CBVCorrection", "Basis", "PriorModel", "build_basis", "map_fit", "normalise",
           "white_noise", "cbv_hdulist", "cbv_input", "read_cbvs", "vectors_on"]

__version__ = "1.0"


@photometry.hookimpl
def register_lightcurve_corrections():
    return [CBVCorrection]
