"""``tessphot simulate``: a synthetic sector of SPOC-format calibrated FFIs with full truth.

Why a simulator: every other part of the pipeline (FFI reader, cache, movement kernel,
background and scattered-light models, photometry) must be checked against *known* numbers.
Real FFIs have no truth, so we write frames that look like SPOC's (same HDUs, keywords, WCS,
collateral layout, units, noise) from a scene whose every ingredient is recorded in
``truth.h5``: star fluxes per cadence, positions and the per-frame affine motion, the
background cube, the quality flags and the ideal photometric noise of each star.

The scene (stars, variability, background, motion) depends only on the seed and the settings,
never on the order of work; each frame's noise has its own random stream, so the same seed
gives byte-identical files. Frames are rendered and written one at a time (memory bounded).

See ``docs/simulation.md`` for the model, the units and the layout of ``truth.h5``.
"""
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from photometry.data.calibration import FRAME_COLS, FRAME_ROWS, LEAD_COLS, SCIENCE_SIZE
from photometry.hooks.version import __version__
from photometry.hooks.errors import InputError
from photometry.data.noise import CRM_KEEP, DEADC, INT_TIME
from photometry.data.prf import AnalyticPRF, load_prf
from photometry.hooks.utilities import BTJD_TIME_CARDS, mag2flux

__all__ = ["simulate", "Geometry", "Scene", "build_scene", "add_arguments", "run",
           "cadence_for_sector", "apply_kernel", "frame_wcs_header", "reference_wcs_header",
           "focus_scale", "focused_prf"]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# CCD geometry (SPOC full frame: 2078 rows x 2136 columns, 0-based array indices)
#: CCD centre (row, column) in 0-based CCD coordinates: the pivot of the affine motion
CCD_CENTRE = (1023.5, LEAD_COLS + 1023.5)

# Timing constants of TESS FFIs
FRAME_TIME = 2.0                    # s, one CCD readout cycle
SECTOR1_START = 1325.2935           # BTJD, start of sector 1 (first FFI)
SECTOR_LENGTH = 27.38               # d, mean sector length (start to start)
ORBIT_LENGTH = 13.2                 # d of data per orbit
ORBIT_GAP = 1.0                     # d, data downlink gap between the two orbits
SCCONFIG = 120

#: The reference sky WCS: a real full-frame TESS TAN-SIP solution (astrocut's ex_ffi_wcs.txt),
#: 1-based CRPIX in full-frame pixels. CD = PC * CDELT.
REFERENCE_WCS = {
    "CRPIX1": 1045.0, "CRPIX2": 1001.0,
    "CRVAL1": 259.36421299568, "CRVAL2": 36.205189858442,
    "CD1_1": 0.0054214440719814, "CD1_2": 0.001882933847014,
    "CD2_1": -0.001756958456204, "CD2_2": 0.005370972142312,
    "A_ORDER": 2, "A_0_2": -3.149317908124e-06, "A_1_1": 1.730817428468e-05,
    "A_2_0": -1.933462721325e-05,
    "B_ORDER": 2, "B_0_2": 2.042014645602e-05, "B_1_1": -1.636520970621e-05,
    "B_2_0": 3.30815059215721e-06,
    "AP_ORDER": 2, "AP_0_1": -0.0005978141551887, "AP_0_2": 3.162944912935e-06,
    "AP_1_0": 0.000847639020400928, "AP_1_1": -1.72807349897e-05,
    "AP_2_0": 1.93271150683819e-05,
    "BP_ORDER": 2, "BP_0_1": 0.00088615310847368, "BP_0_2": -2.041185722247e-05,
    "BP_1_0": -0.0005960802481639, "BP_1_1": 1.633823692359e-05,
    "BP_2_0": -3.322554744068e-06,
}

# SPOC header structure, copied from a real sector-1 calibrated FFI
# (tess2018206192942-s0001-1-4-0120-s_ffic.fits); values that depend on the frame are filled in.
_PRIMARY_CARDS = [
    ("NEXTEND", 2, "number of standard extensions"),
    ("EXTNAME", "PRIMARY", "name of extension"),
    ("EXTVER", 1, "extension version number (not format version)"),
    ("SIMDATA", True, "file is based on simulated data"),
    ("ORIGIN", "tessphot simulate", "institution responsible for creating this file"),
    ("DATE", None, "file creation date."),
    ("TSTART", None, "observation start time in TJD"),
    ("TSTOP", None, "observation stop time in TJD"),
    ("DATE-OBS", None, "TSTART as UTC calendar date"),
    ("DATE-END", None, "TSTOP as UTC calendar date"),
    ("CREATOR", f"photometry {__version__} simulate", "program used to produce this file"),
    ("PROCVER", "spoc-3.3.31-20180902", "SW version"),
    ("FILEVER", "1.0", "file format version"),
    ("TIMVERSN", "OGIP/93-003", "OGIP memo number for file format"),
    ("TELESCOP", "TESS", "telescope"),
    ("INSTRUME", "TESS Photometer", "detector type"),
    ("DATA_REL", 1, "data release version number"),
    ("ASTATE", True, "archive state F indicates single orbit processi"),
    ("SCCONFIG", SCCONFIG, "spacecraft configuration ID"),
    ("RADESYS", "ICRS", "reference frame of celestial coordinates"),
    ("EQUINOX", 2000.0, "equinox of celestial coordinate system"),
    ("CRMITEN", True, "spacecraft cosmic ray mitigation enabled"),
    ("CRBLKSZ", 10, "[exposures] s/c cosmic ray mitigation block siz"),
    ("CRSPOC", False, "SPOC cosmic ray cleaning enabled"),
    ("SECTOR", None, "observing sector"),
    ("CAMERA", None, "Camera number"),
    ("CCD", None, "CCD chip number"),
    ("FFIINDEX", None, "number of FFI cadence interval of first cadence"),
]

_IMAGE_CARDS_TIME = [
    ("INHERIT", True, "inherit the primary header"),
    ("EXTNAME", None, "name of extension"),
    ("EXTVER", 1, "extension version number (not format version)"),
    ("SIMDATA", True, "file is based on simulated data"),
    ("TELESCOP", "TESS", "telescope"),
    ("INSTRUME", "TESS Photometer", "detector type"),
    ("CAMERA", None, "Camera number"),
    ("CCD", None, "CCD chip number"),
    ("EXPOSURE", None, "[d] time on source"),
    *BTJD_TIME_CARDS,
    ("TELAPSE", None, "[d] TSTOP - TSTART"),
    ("LIVETIME", None, "[d] TELAPSE multiplied by DEADC"),
    ("TSTART", None, "observation start time in BTJD"),
    ("TSTOP", None, "observation stop time in BTJD"),
    ("DATE-OBS", None, "TSTART as UTC calendar date"),
    ("DATE-END", None, "TSTOP as UTC calendar date"),
    ("DEADC", DEADC, "deadtime correction"),
    ("TIMEPIXR", 0.5, "bin time beginning=0 middle=0.5 end=1"),
    ("TIERRELA", 1.16e-05, "[d] relative time error"),
    ("BTC_PIX1", 1068.0, "reference col for barycentric time correction"),
    ("BTC_PIX2", 1024.0, "reference row for barycentric time correction"),
    ("BUNIT", "electrons/s", "physical units of image data"),
    ("BARYCORR", None, "[d] barycentric time correction"),
    ("INT_TIME", INT_TIME, "[s] photon accumulation time per frame"),
    ("READTIME", FRAME_TIME - INT_TIME, "[s] readout time per frame"),
    ("FRAMETIM", FRAME_TIME, "[s] frame time (INT_TIME + READTIME)"),
    ("NUM_FRM", None, "number of frames per time stamp"),
    ("TIMEDEL", None, "[d] time resolution of data"),
    ("BACKAPP", False, "background is subtracted"),
    ("DEADAPP", True, "deadtime applied"),
    ("VIGNAPP", True, "vignetting or collimator correction applied"),
    ("GAINA", 5.349999904632568, "[electrons/count] CCD output A gain"),
    ("GAINB", 5.21999979019165, "[electrons/count] CCD output B gain"),
    ("GAINC", 5.21999979019165, "[electrons/count] CCD output C gain"),
    ("GAIND", 5.179999828338623, "[electrons/count] CCD output D gain"),
    ("READNOIA", None, "[electrons] read noise CCD output A"),
    ("READNOIB", None, "[electrons] read noise CCD output B"),
    ("READNOIC", None, "[electrons] read noise CCD output C"),
    ("READNOID", None, "[electrons] read noise CCD output D"),
    ("NREADOUT", None, "number of read per cadence"),
    ("FXDOFF", 3355400, "compression fixed offset"),
    ("TMOFST{camera}{ccd}", 0.05999999865889549, "(s) readout delay for camera {camera} and ccd {ccd}"),
    ("MEANBLCA", 6589, "[count] FSW mean black level CCD output A"),
    ("MEANBLCB", 6649, "[count] FSW mean black level CCD output B"),
    ("MEANBLCC", 6427, "[count] FSW mean black level CCD output C"),
    ("MEANBLCD", 6359, "[count] FSW mean black level CCD output D"),
    ("LVCSA", 1, "serial register col start, output A"),
    ("LVCEA", 11, "serial register col end (inclusive), output A"),
    ("TVCSA", 2093, "trailing virtual column start, output A"),
    ("TVCEA", 2103, "trailing virtual column end (inclusive), output"),
    ("SCCSA", 45, "science col start, output A"),
    ("SCCEA", 556, "science col end (inclusive), output A"),
    ("SCICOLHA", True, "T science cols are read increasing order else d"),
    ("LVCSB", 12, "serial register col start, output B"),
    ("LVCEB", 22, "serial register col end (inclusive), output B"),
    ("TVCSB", 2104, "trailing virtual column start, output B"),
    ("TVCEB", 2114, "trailing virtual column end (inclusive), output"),
    ("SCCSB", 557, "science col start, output B"),
    ("SCCEB", 1068, "science col end (inclusive), output B"),
    ("SCICOLHB", False, "T science cols are read increasing order else d"),
    ("LVCSC", 23, "serial register col start, output C"),
    ("LVCEC", 33, "serial register col end (inclusive), output C"),
    ("TVCSC", 2115, "trailing virtual column start, output C"),
    ("TVCEC", 2125, "trailing virtual column end (inclusive), output"),
    ("SCCSC", 1069, "science col start, output C"),
    ("SCCEC", 1580, "science col end (inclusive), output C"),
    ("SCICOLHC", True, "T science cols are read increasing order else d"),
    ("LVCSD", 34, "serial register col start, output D"),
    ("LVCED", 44, "serial register col end (inclusive), output D"),
    ("TVCSD", 2126, "trailing virtual column start, output D"),
    ("TVCED", 2136, "trailing virtual column end (inclusive), output"),
    ("SCCSD", 1581, "science col start, output D"),
    ("SCCED", 2092, "science col end (inclusive), output D"),
    ("SCICOLHD", False, "T science cols are read increasing order else d"),
    ("SCIROWS", 1, "science rows start"),
    ("SCIROWE", 2048, "science rows end (inclusive)"),
    ("VROWS", 2069, "virtual row start"),
    ("VROWE", 2078, "virtual row end (inclusive)"),
    ("SMROWS", 2059, "smear rows start"),
    ("SMROWE", 2068, "smear rows end (inclusive)"),
    ("BFROWS", 2049, "buffer rows start"),
    ("BFROWE", 2058, "buffer rows end (inclusive)"),
    ("RADESYS", "ICRS", "reference frame of celestial coordinates"),
    ("EQUINOX", 2000.0, "equinox of celestial coordinate system"),
]

_IMAGE_CARDS_TAIL = [
    ("WCSNAMEP", "PHYSICAL", "name of world coordinate system alternate P"),
    ("WCSAXESP", 2, "number of WCS physical axes"),
    ("CTYPE1P", "RAWX", "physical WCS axis 1 type CCD col"),
    ("CUNIT1P", "PIXEL", "physical WCS axis 1 unit"),
    ("CRPIX1P", 1, "reference CCD column"),
    ("CRVAL1P", None, "value at reference CCD column"),
    ("CDELT1P", 1.0, "physical WCS axis 1 step"),
    ("CTYPE2P", "RAWY", "physical WCS axis 2 type CCD row"),
    ("CUNIT2P", "PIXEL", "physical WCS axis 2 units"),
    ("CRPIX2P", 1, "reference CCD row"),
    ("CRVAL2P", None, "value at reference CCD row"),
    ("CDELT2P", 1.0, "physical WCS axis 2 step"),
    ("RA_NOM", None, "[deg] RA of camera boresight"),
    ("DEC_NOM", None, "[deg] DEC of camera boresight"),
    ("ROLL_NOM", -137.84681701660156, "[deg] roll angle of camera"),
    ("DQUALITY", None, "data quality flags"),
    ("IMAGTYPE", None, "FFI image type: raw, cal, uncert"),
]


def cadence_for_sector(sector):
    """FFI cadence (s) of a sector: 1800 (1-26), 600 (27-55), 200 (56 on)."""
    if sector <= 26:
        return 1800
    if sector <= 55:
        return 600
    return 200


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """Where the written frame sits on the CCD.

    ``first_row``/``first_col`` are the 0-based *science* row/column of the cutout's first
    science pixel; ``rows``/``cols`` the science size. The frame written adds the collateral
    columns/rows the cutout touches, like SPOC cutouts: the 44 leading columns when it starts
    at science column 0, the 44 trailing columns when it ends at the last science column, the
    30 buffer/smear/virtual rows when it ends at the last science row.
    """

    first_row: int
    first_col: int
    rows: int
    cols: int

    def __post_init__(self):
        for name in ("rows", "cols"):
            size = getattr(self, name)
            if not 8 <= size <= SCIENCE_SIZE:
                raise InputError(f"--size: {name} must be between 8 and {SCIENCE_SIZE}, got {size}")
        if self.first_row < 0 or self.first_row + self.rows > SCIENCE_SIZE:
            raise InputError(f"simulate.first_row={self.first_row}: cutout of {self.rows} rows "
                             f"does not fit in the {SCIENCE_SIZE} science rows")
        if self.first_col < 0 or self.first_col + self.cols > SCIENCE_SIZE:
            raise InputError(f"simulate.first_col={self.first_col}: cutout of {self.cols} columns "
                             f"does not fit in the {SCIENCE_SIZE} science columns")

    # science region in 0-based CCD (frame) coordinates
    @property
    def row_offset(self):
        return self.first_row

    @property
    def column_offset(self):
        return LEAD_COLS + self.first_col

    # the frame written, in 0-based CCD coordinates [r0, r1) x [c0, c1)
    @property
    def frame_box(self):
        c0 = 0 if self.first_col == 0 else self.column_offset
        c1 = self.column_offset + self.cols
        if self.first_col + self.cols == SCIENCE_SIZE:
            c1 = FRAME_COLS
        r0 = self.row_offset
        r1 = self.row_offset + self.rows
        if r1 == SCIENCE_SIZE:
            r1 = FRAME_ROWS
        return r0, r1, c0, c1

    @property
    def frame_shape(self):
        r0, r1, c0, c1 = self.frame_box
        return r1 - r0, c1 - c0

    @property
    def science_slices(self):
        """Slices of the science region inside the written frame array."""
        r0, _, c0, _ = self.frame_box
        return (slice(self.row_offset - r0, self.row_offset - r0 + self.rows),
                slice(self.column_offset - c0, self.column_offset - c0 + self.cols))

    @property
    def kernel_origin(self):
        """CCD centre (x0, y0) in science-region pixels of this cutout (cache convention)."""
        return CCD_CENTRE[1] - self.column_offset, CCD_CENTRE[0] - self.row_offset


# ---------------------------------------------------------------------------------------------
# WCS
def reference_wcs_header(geometry):
    """The reference sky WCS as header cards for the written frame (0-based box start)."""
    r0, _, c0, _ = geometry.frame_box
    cards = dict(REFERENCE_WCS)
    cards["CRPIX1"] = REFERENCE_WCS["CRPIX1"] - c0
    cards["CRPIX2"] = REFERENCE_WCS["CRPIX2"] - r0
    return cards


def _sip_terms(cards, prefix):
    order = int(cards.get(f"{prefix}_ORDER", 0))
    return {(p, q): v for p in range(order + 1) for q in range(order + 1 - p)
            if (v := cards.get(f"{prefix}_{p}_{q}")) is not None}, order


def _poly_eval(terms, u, v):
    out = np.zeros_like(u)
    for (p, q), value in terms.items():
        out = out + value * u**p * v**q
    return out


def _transform_sip(cards, pa, pb, matrix, min_order):
    """SIP polynomials (pa, pb) after the linear pixel map ``u' = M u``.

    The new distortion is g(u') = M f(M^-1 u'), a polynomial of the same orders; we fit its
    coefficients exactly (least squares on a grid, scaled for conditioning).
    """
    ta, order = _sip_terms(cards, pa)
    tb, _ = _sip_terms(cards, pb)
    if order == 0:
        return {}
    inv = np.linalg.inv(matrix)
    scale = 1000.0
    grid = np.linspace(-1.5, 1.5, 9) * scale
    up, vp = (g.ravel() for g in np.meshgrid(grid, grid))
    u = inv[0, 0] * up + inv[0, 1] * vp
    v = inv[1, 0] * up + inv[1, 1] * vp
    fa = _poly_eval(ta, u, v)
    fb = _poly_eval(tb, u, v)
    ga = matrix[0, 0] * fa + matrix[0, 1] * fb
    gb = matrix[1, 0] * fa + matrix[1, 1] * fb
    powers = [(p, q) for p in range(order + 1) for q in range(order + 1 - p) if p + q >= min_order]
    design = np.stack([(up / scale)**p * (vp / scale)**q for p, q in powers], axis=1)
    ca = np.linalg.lstsq(design, ga, rcond=None)[0]
    cb = np.linalg.lstsq(design, gb, rcond=None)[0]
    out = {f"{pa}_ORDER": order, f"{pb}_ORDER": order}
    for (p, q), a, b in zip(powers, ca, cb):
        out[f"{pa}_{p}_{q}"] = a / scale**(p + q)
        out[f"{pb}_{p}_{q}"] = b / scale**(p + q)
    return out


def frame_wcs_header(reference, kernel, origin):
    """The reference WCS moved by an affine pointing change (exactly, SIP included).

    Parameters
    ----------
    reference : dict
        WCS cards (1-based CRPIX in the written frame's pixels).
    kernel : sequence of 6 floats
        ``(dx, dy, a, b, c, d)``: a star at reference pixel ``p`` is at
        ``p + (dx, dy) + A (p - origin)`` in this frame, ``A = [[a, b], [c, d]]``.
    origin : (x0, y0)
        Pivot of the affine map in the same 0-based pixels.
    """
    dx, dy, a, b, c, d = (float(k) for k in kernel)
    matrix = np.array([[1.0 + a, b], [c, 1.0 + d]])
    p0 = np.asarray(origin, dtype=float)
    crpix = np.array([reference["CRPIX1"], reference["CRPIX2"]]) - 1.0     # 0-based
    new_crpix = p0 + np.array([dx, dy]) + matrix @ (crpix - p0)
    cd = np.array([[reference["CD1_1"], reference["CD1_2"]],
                   [reference["CD2_1"], reference["CD2_2"]]]) @ np.linalg.inv(matrix)
    cards = dict(reference)
    for key in list(cards):
        if key[:2] in ("A_", "B_") or key[:3] in ("AP_", "BP_"):
            del cards[key]
    cards.update(CRPIX1=new_crpix[0] + 1.0, CRPIX2=new_crpix[1] + 1.0,
                 CD1_1=cd[0, 0], CD1_2=cd[0, 1], CD2_1=cd[1, 0], CD2_2=cd[1, 1])
    cards.update(_transform_sip(reference, "A", "B", matrix, 2))
    cards.update(_transform_sip(reference, "AP", "BP", matrix, 1))
    return cards


def _wcs_from_cards(cards):
    from astropy.io import fits
    from astropy.wcs import WCS

    header = fits.Header()
    header["WCSAXES"] = 2
    header["CTYPE1"] = "RA---TAN-SIP"
    header["CTYPE2"] = "DEC--TAN-SIP"
    for key, value in cards.items():
        header[key] = value
    return WCS(header)


def apply_kernel(kernel, x, y, origin):
    """Positions ``(x, y)`` (column, row) moved by one kernel row about ``origin``."""
    dx, dy, a, b, c, d = kernel
    x0, y0 = origin
    return (x + dx + a * (x - x0) + b * (y - y0),
            y + dy + c * (x - x0) + d * (y - y0))


# ---------------------------------------------------------------------------------------------
@dataclass
class Scene:
    """Everything random about a simulated sector, fixed by the seed (no pixel data)."""

    settings: dict
    geometry: Geometry
    sector: int
    camera: int
    ccd: int
    cadence: int
    # stars
    starid: np.ndarray
    row: np.ndarray          # 0-based CCD row at the reference pointing (position epoch)
    col: np.ndarray
    tmag: np.ndarray
    ra: np.ndarray           # J2000 (catalog epoch)
    dec: np.ndarray
    pmra: np.ndarray         # mas/yr
    pmdec: np.ndarray
    teff: np.ndarray
    kind: np.ndarray         # 0 field, 1 isolated, 2 close pair, 3 faint neighbour, 4 bright
    flux_mean: np.ndarray    # e-/s
    variables: dict
    # time axis and motion
    tstart: np.ndarray       # BTJD
    tstop: np.ndarray
    cadenceno: np.ndarray
    quality: np.ndarray
    barycorr: np.ndarray
    kernels: np.ndarray      # (N, 6) mean kernel per frame
    dumps: list              # (frame index, fraction before the dump, kernel before, after)
    wcs_error: np.ndarray    # (N, 2) error added to each frame's WCS translation (px)
    position_epoch: float
    straps: np.ndarray       # (n, 3): first CCD column, width, relative amplitude
    glow_amplitude: np.ndarray

    @property
    def time(self):
        return 0.5 * (self.tstart + self.tstop)


KIND_NAMES = {0: "field", 1: "isolated", 2: "pair", 3: "neighbour", 4: "bright"}


def _orbit_windows(t0):
    """(start, end) of the two orbits of a sector starting at ``t0``."""
    o1 = (t0, t0 + ORBIT_LENGTH)
    o2 = (o1[1] + ORBIT_GAP, o1[1] + ORBIT_GAP + ORBIT_LENGTH)
    return [o1, o2]


def _time_axis(sector, cadence, n):
    """Start/stop times and cadence numbers of ``n`` frames, skipping the mid-sector gap."""
    dt = cadence / 86400.0
    t0 = SECTOR1_START + (sector - 1) * SECTOR_LENGTH
    orbits = _orbit_windows(t0)
    # FFIINDEX counts cadence intervals since an arbitrary mission epoch, through gaps
    first_index = int(round((t0 - 1325.0) / dt)) + 1000
    starts, numbers = [], []
    k = 0
    while len(starts) < n:
        ts = t0 + k * dt
        in_gap = orbits[0][1] <= ts < orbits[1][0]
        if not in_gap:
            starts.append(ts)
            numbers.append(first_index + k)
        k += 1
    tstart = np.array(starts)
    return tstart, tstart + dt, np.array(numbers, dtype=np.int32), orbits


def _draw_tmag(rng, n, tmag_min, tmag_max):
    """Magnitudes with cumulative counts rising as 10**(0.3 Tmag) (inverse-CDF sampling)."""
    lo, hi = 10 ** (0.3 * tmag_min), 10 ** (0.3 * tmag_max)
    return np.log10(lo + rng.random(n) * (hi - lo)) / 0.3


def _build_stars(rng, cfg, geometry):
    """Star positions (CCD), magnitudes and kinds, including the designed test stars."""
    margin = float(cfg["catalog_margin_px"])
    r_lo = geometry.row_offset - margin
    r_hi = geometry.row_offset + geometry.rows - 1 + margin
    c_lo = geometry.column_offset - margin
    c_hi = geometry.column_offset + geometry.cols - 1 + margin
    area = (r_hi - r_lo) * (c_hi - c_lo)
    n_field = rng.poisson(float(cfg["star_density"]) * area)
    rows = list(rng.uniform(r_lo, r_hi, n_field))
    cols = list(rng.uniform(c_lo, c_hi, n_field))
    mags = list(_draw_tmag(rng, n_field, float(cfg["tmag_min"]), float(cfg["tmag_max"])))
    kinds = [0] * n_field
    designed = []            # (row, col, tmag, kind)

    # inner box where designed stars go (away from the cutout edges)
    edge = 10.0 if min(geometry.rows, geometry.cols) >= 48 else 4.0
    ir_lo, ir_hi = geometry.row_offset + edge, geometry.row_offset + geometry.rows - 1 - edge
    ic_lo, ic_hi = geometry.column_offset + edge, geometry.column_offset + geometry.cols - 1 - edge

    def free(r, c, radius):
        return all((r - dr) ** 2 + (c - dc) ** 2 >= radius ** 2 for dr, dc, _, _ in designed)

    def place(radius, tries=300):
        for _ in range(tries):
            r, c = rng.uniform(ir_lo, ir_hi), rng.uniform(ic_lo, ic_hi)
            if free(r, c, radius):
                return r, c
        return None

    bright = None
    if cfg["bright_star"] and min(geometry.rows, geometry.cols) >= 64:
        r = geometry.row_offset + 0.3 * geometry.rows + rng.uniform(-0.5, 0.5)
        c = geometry.column_offset + 0.7 * geometry.cols + rng.uniform(-0.5, 0.5)
        bright = (r, c)
        designed.append((r, c, float(cfg["bright_star_tmag"]), 4))

    def clear_of_bright(r, c):
        return bright is None or (abs(c - bright[1]) > 6 and np.hypot(r - bright[0], c - bright[1]) > 30)

    n_iso = int(cfg["isolated_per_bin"])
    for lo in range(8, 13):
        for _ in range(n_iso):
            for _ in range(50):
                pos = place(14.0)
                if pos is not None and clear_of_bright(*pos):
                    designed.append((pos[0], pos[1], rng.uniform(lo, lo + 1), 1))
                    break
    for _ in range(int(cfg["close_pairs"])):
        pos = place(12.0)
        if pos is None or not clear_of_bright(*pos):
            continue
        m1 = rng.uniform(10.0, 12.5)
        sep, angle = rng.uniform(0.7, 1.5), rng.uniform(0, 2 * np.pi)
        designed.append((pos[0], pos[1], m1, 2))
        designed.append((pos[0] + sep * np.sin(angle), pos[1] + sep * np.cos(angle),
                         m1 + rng.uniform(0.0, 1.5), 2))
    for _ in range(int(cfg["faint_neighbours"])):
        pos = place(12.0)
        if pos is None or not clear_of_bright(*pos):
            continue
        m1 = rng.uniform(9.0, 12.0)
        sep, angle = rng.uniform(1.5, 3.0), rng.uniform(0, 2 * np.pi)
        designed.append((pos[0], pos[1], m1, 3))
        designed.append((pos[0] + sep * np.sin(angle), pos[1] + sep * np.cos(angle),
                         m1 + rng.uniform(2.0, 4.0), 3))

    # clear field stars that would spoil the designed stars: nothing within 6 px of an
    # isolated star, and nothing brighter than (its Tmag + 1) within 12 px
    rows, cols, mags = np.array(rows), np.array(cols), np.array(mags)
    keep = np.ones(rows.size, dtype=bool)
    for r, c, m, kind in designed:
        dist = np.hypot(rows - r, cols - c)
        if kind == 1:
            keep &= ~((dist < 6.0) | ((dist < 12.0) & (mags < m + 1.0)))
        elif kind == 4:
            keep &= ~(dist < 3.0)
        else:
            keep &= ~(dist < 4.0)
    rows, cols, mags = rows[keep], cols[keep], mags[keep]
    kinds = np.zeros(rows.size, dtype=np.int8)
    if designed:
        d = np.array(designed)
        rows = np.concatenate([d[:, 0], rows])
        cols = np.concatenate([d[:, 1], cols])
        mags = np.concatenate([d[:, 2], mags])
        kinds = np.concatenate([d[:, 3].astype(np.int8), kinds])
    return rows, cols, mags, kinds


def _build_variables(rng, cfg, on_frame, tmag, t_lo, t_hi):
    """Choose ~n_variable of the on-frame stars and draw their variability parameters."""
    candidates = np.flatnonzero(on_frame & (tmag > 6.5))
    n = int(round(float(cfg["n_variable"]) * candidates.size))
    chosen = np.sort(rng.choice(candidates, size=n, replace=False)) if n else np.array([], int)
    span = max(t_hi - t_lo, 1e-3)
    kinds = rng.choice(["sinusoid", "transit", "flare"], size=n, p=[0.5, 0.3, 0.2])
    period = np.zeros(n)
    amplitude = np.zeros(n)
    epoch = np.zeros(n)
    duration = np.zeros(n)
    flares = []              # (variable index, t_peak, amplitude, rise_d, decay_d)
    for k, kind in enumerate(kinds):
        if kind == "sinusoid":
            period[k] = 10 ** rng.uniform(np.log10(0.5), 1.0)
            amplitude[k] = 10 ** rng.uniform(np.log10(0.005), np.log10(0.05))
            epoch[k] = t_lo + rng.uniform(0, period[k])
        elif kind == "transit":
            period[k] = rng.uniform(0.5, 5.0)
            amplitude[k] = rng.uniform(0.005, 0.03)      # depth
            duration[k] = rng.uniform(1.5, 4.0) / 24.0
            # first transit inside the simulated span so short runs see one
            epoch[k] = t_lo + rng.uniform(0, min(period[k], span))
        else:
            nfl = max(1, rng.poisson(span / 2.0))
            for _ in range(nfl):
                flares.append((k, rng.uniform(t_lo, t_hi), 10 ** rng.uniform(-2, np.log10(0.3)),
                               rng.uniform(2, 10) / 1440.0, rng.uniform(10, 60) / 1440.0))
                amplitude[k] = max(amplitude[k], flares[-1][2])
    flare_arr = np.array(flares, dtype=float).reshape(-1, 5)
    return {"index": chosen, "type": kinds, "period": period, "amplitude": amplitude,
            "epoch": epoch, "duration": duration, "flares": flare_arr}


def relative_flux(variables, t):
    """Relative flux (1 = mean level) of every variable star at times ``t`` (n_var, len(t))."""
    t = np.atleast_1d(t)
    n = len(variables["index"])
    out = np.ones((n, t.size))
    kinds = variables["type"]
    for k in range(n):
        if kinds[k] == "sinusoid":
            out[k] += variables["amplitude"][k] * np.sin(
                2 * np.pi * (t - variables["epoch"][k]) / variables["period"][k])
        elif kinds[k] == "transit":
            p, d = variables["period"][k], variables["duration"][k]
            phase = (t - variables["epoch"][k] + 0.5 * p) % p - 0.5 * p   # time from mid-transit
            ingress = 0.15 * d
            x = np.clip((0.5 * d - np.abs(phase)) / ingress, 0.0, 1.0)   # trapezoid
            out[k] -= variables["amplitude"][k] * x
    for k, tp, amp, rise, decay in variables["flares"]:
        k = int(k)
        dtp = t - tp
        shape = np.where(dtp < 0, np.clip(1 + dtp / rise, 0, 1), np.exp(-np.clip(dtp, 0, None) / decay))
        out[k] += amp * shape
    return out


def exposure_mean_flux(variables, tstart, tstop, nsub=31):
    """Relative flux averaged over each exposure [tstart, tstop] (n_var, n_frames)."""
    frac = (np.arange(nsub) + 0.5) / nsub
    t = tstart[:, None] + (tstop - tstart)[:, None] * frac[None, :]
    rel = relative_flux(variables, t.ravel())
    return rel.reshape(len(variables["index"]), tstart.size, nsub).mean(axis=2)


def _build_motion(rng, cfg, tstart, tstop, t_sector0):
    """Per-frame kernels, dump cadences and quality flags."""
    n = tstart.size
    tmid = 0.5 * (tstart + tstop)
    quality = np.zeros(n, dtype=np.int32)
    dump_times = []
    t = t_sector0 + float(cfg["dump_first"])
    while t < tstop[-1]:
        dump_times.append(t)
        t += float(cfg["dump_interval"])
    # pointing offset: piecewise linear, jumping at each dump
    segments = [(-np.inf, rng.normal(0, 0.05, 2), rng.normal(0, 0.02, 2))]
    for td in dump_times:
        _, o, v = segments[-1]
        start = segments[-1][0]
        end = o + v * (td - (start if np.isfinite(start) else t_sector0))
        angle = rng.uniform(0, 2 * np.pi)
        jump = rng.uniform(*cfg["dump_jump"]) * np.array([np.cos(angle), np.sin(angle)])
        segments.append((td, end + jump, rng.normal(0, 0.02, 2)))

    def offset(t):
        for start, o, v in reversed(segments):
            if t >= start:
                return o + v * (t - (start if np.isfinite(start) else t_sector0))
        return segments[0][1]

    s_end = float(cfg["drift_px"]) / (np.sqrt(2.0) * SCIENCE_SIZE / 2)   # px at a science corner
    scale = lambda t: s_end * (t - t_sector0) / SECTOR_LENGTH  # noqa: E731

    jitter = rng.normal(0, float(cfg["jitter_rms"]), (n, 2))
    kernels = np.zeros((n, 6))
    dumps = []
    for i in range(n):
        kern = lambda tt: np.array([*(offset(tt) + jitter[i]), scale(tt), 0.0, 0.0, scale(tt)])  # noqa: E731
        inside = [td for td in dump_times if tstart[i] <= td < tstop[i]]
        if inside:
            td = inside[0]
            f = (td - tstart[i]) / (tstop[i] - tstart[i])
            before, after = kern(0.5 * (tstart[i] + td)), kern(0.5 * (td + tstop[i]))
            kernels[i] = f * before + (1 - f) * after
            dumps.append((i, f, before, after))
            quality[i] |= 32
        else:
            kernels[i] = kern(tmid[i])
    # a few coarse-pointing and manually excluded cadences, never on dumps
    free = np.flatnonzero(quality == 0)
    n_coarse = min(int(cfg["coarse_point"]), free.size)
    coarse = rng.choice(free, size=n_coarse, replace=False) if n_coarse else []
    for i in coarse:
        quality[i] |= 4
        kernels[i, :2] += rng.normal(0, 0.3, 2)
    free = np.flatnonzero(quality == 0)
    n_manual = min(int(cfg["manual_exclude"]), free.size)
    for i in (rng.choice(free, size=n_manual, replace=False) if n_manual else []):
        quality[i] |= 128
    return kernels, dumps, quality, dump_times


def build_scene(settings):
    """The full random scene of a run (stars, variability, motion, background parameters)."""
    from astropy.time import Time

    cfg = settings["simulate"]
    seed = int(cfg["seed"])
    sector, camera, ccd = int(cfg["sector"]), int(cfg["camera"]), int(cfg["ccd"])
    if sector < 1:
        raise InputError(f"--sector {sector}: must be >= 1")
    if camera not in (1, 2, 3, 4) or ccd not in (1, 2, 3, 4):
        raise InputError(f"--camera {camera} --ccd {ccd}: camera and CCD must be 1..4")
    cadence = int(cfg["cadence"]) if cfg["cadence"] else cadence_for_sector(sector)
    if cadence not in (1800, 600, 200):
        raise InputError(f"--cadence {cadence}: must be 1800, 600 or 200")
    n = int(cfg["cadences"])
    if n < 1:
        raise InputError(f"--cadences {n}: must be >= 1")
    geometry = Geometry(int(cfg["first_row"]), int(cfg["first_col"]),
                        int(cfg["rows"]), int(cfg["cols"]))

    # independent streams so that e.g. more cadences do not change the stars
    ss = np.random.SeedSequence(seed)
    rng_stars, rng_var, rng_motion, rng_bg = (np.random.default_rng(s) for s in ss.spawn(4))

    tstart, tstop, cadenceno, orbits = _time_axis(sector, cadence, n)
    t_sector0 = orbits[0][0]
    row, col, tmag, kind = _build_stars(rng_stars, cfg, geometry)
    nstar = row.size
    ids = 100_000_000 + np.cumsum(rng_stars.integers(1, 5000, nstar))
    pmra = rng_stars.normal(0, 8.0, nstar)
    pmdec = rng_stars.normal(0, 8.0, nstar)
    fast = rng_stars.random(nstar) < 0.01
    pmra[fast] = rng_stars.uniform(-400, 400, fast.sum())
    pmdec[fast] = rng_stars.uniform(-400, 400, fast.sum())
    teff = rng_stars.uniform(3300, 7500, nstar).round(0)

    # sky positions: reference WCS at the position epoch, then back to J2000 with the proper motion
    ref = _wcs_from_cards(REFERENCE_WCS)
    ra_ep, dec_ep = ref.all_pix2world(col, row, 0)
    t_ref = t_sector0 + 0.5 * SECTOR_LENGTH
    position_epoch = float(Time(t_ref + 2457000.0, format="jd", scale="tdb").decimalyear)
    years = position_epoch - 2000.0
    dec = dec_ep - pmdec / 3.6e6 * years
    ra = ra_ep - pmra / 3.6e6 * years / np.cos(np.radians(dec_ep))

    on_frame = ((row > geometry.row_offset - 0.5) & (row < geometry.row_offset + geometry.rows - 0.5)
                & (col > geometry.column_offset - 0.5)
                & (col < geometry.column_offset + geometry.cols - 0.5))
    variables = _build_variables(rng_var, cfg, on_frame, tmag, tstart[0], tstop[-1])
    kernels, dumps, quality, dump_times = _build_motion(rng_motion, cfg, tstart, tstop, t_sector0)
    wcs_error = rng_motion.normal(0, float(cfg["wcs_error_px"]), (n, 2))
    barycorr = 0.0056780875 + 2.0e-4 * np.sin(2 * np.pi * (0.5 * (tstart + tstop) - t_sector0) / 365.25)

    # straps: fixed columns of the whole CCD (independent of the cutout)
    strap_cols = np.arange(LEAD_COLS + 20, LEAD_COLS + SCIENCE_SIZE, int(cfg["strap_spacing"]))
    strap_cols = strap_cols + rng_bg.integers(-15, 16, strap_cols.size)
    straps = np.stack([strap_cols, rng_bg.integers(1, 3, strap_cols.size),
                       rng_bg.uniform(0.5, 1.5, strap_cols.size) * float(cfg["strap_amplitude"])], axis=1)
    tmid = 0.5 * (tstart + tstop)
    tau = float(cfg["glow_timescale"])
    glow_amp = np.zeros(n)
    for o0, o1 in orbits:
        inside = (tmid >= o0) & (tmid <= o1)
        glow_amp[inside] += (np.exp(-(tmid[inside] - o0) / tau) + np.exp(-(o1 - tmid[inside]) / tau))
    glow_amp *= float(cfg["glow_peak"]) * (1 + 0.2 * np.sin(2 * np.pi * (tmid - t_sector0) / 1.37))

    return Scene(settings=settings, geometry=geometry, sector=sector, camera=camera, ccd=ccd,
                 cadence=cadence, starid=ids.astype(np.int64), row=row, col=col, tmag=tmag, ra=ra,
                 dec=dec, pmra=pmra, pmdec=pmdec, teff=teff, kind=kind,
                 flux_mean=mag2flux(tmag), variables=variables, tstart=tstart, tstop=tstop,
                 cadenceno=cadenceno, quality=quality, barycorr=barycorr, kernels=kernels,
                 dumps=dumps, wcs_error=wcs_error, position_epoch=position_epoch,
                 straps=straps, glow_amplitude=glow_amp)


# ---------------------------------------------------------------------------------------------
def focus_scale(time, amplitude, period=0.0):
    """Relative PRF width ``s(t) = 1 + amplitude * f(t)`` of each frame (focus change).

    Why: TESS's focus (and the velocity aberration across the field) changes the PRF width
    slowly during a sector; a PRF model fixed in time then mis-weights the pixels, and the
    error changes the fitted fluxes in time. ``f`` runs from -0.5 to 0.5 over the frames
    given: a linear ramp from the first to the last time (``period = 0``) or
    ``0.5 sin(2 pi (t - t_first) / period)``, so ``amplitude`` is the peak-to-peak relative
    width change and the width at the mid-point of a ramp is the nominal one.

    Parameters
    ----------
    time : array_like (N,)
        Frame mid-times (d).
    amplitude : float
        Peak-to-peak relative width change (0: no change, all ones).
    period : float
        d; 0 = linear ramp over the frames.

    Returns
    -------
    ndarray (N,)
    """
    t = np.asarray(time, dtype=float)
    amplitude = float(amplitude)
    if amplitude == 0 or t.size == 0:
        return np.ones(t.shape)
    if float(period) > 0:
        f = 0.5 * np.sin(2 * np.pi * (t - t.min()) / float(period))
    else:
        span = t.max() - t.min()
        f = (t - t.min()) / span - 0.5 if span > 0 else np.zeros(t.shape)
    scale = 1.0 + amplitude * f
    if np.any(scale <= 0):
        raise InputError(f"focus change {amplitude}: the PRF width would not stay positive")
    return scale


#: ``[simulate] prf_<key>`` settings passed to the PRF families (photometry.data.prf.FieldPRF)
PRF_FAMILY_KEYS = ("fwhm", "beta", "ellipticity", "angle", "field_ellipticity", "field_width",
                   "coma")


def focused_prf(prf, scale):
    """``prf`` with its width multiplied by ``scale`` (the PRF of one frame of a focus change).

    :class:`photometry.data.prf.AnalyticPRF` (both Gaussian sigmas times ``scale``; still integrated
    exactly over pixels, still of unit total) and the families of
    :class:`photometry.data.prf.FieldPRF` (:meth:`~photometry.data.prf.FieldPRF.focused`) can be scaled.
    The SPOC models are fixed pixel-integrated samples: widening them would need the PSF,
    which they do not give.
    """
    if scale == 1:
        return prf
    if hasattr(prf, "focused"):                    # the analytic families (FieldPRF)
        return prf.focused(scale)
    if not isinstance(prf, AnalyticPRF):
        raise InputError(f"focus change: only the analytic PRF and its families can change "
                         f"width, not {prf!r}")
    return AnalyticPRF(sigma=prf.sigma * scale, wing_sigma=prf.wing_sigma * scale,
                       wing_fraction=prf.wing_fraction)


class _Renderer:
    """Turns the scene into pixel data, one frame at a time."""

    def __init__(self, scene, prf):
        self.scene = scene
        self.prf = prf
        cfg = scene.settings["simulate"]
        self.cfg = cfg
        #: relative PRF width of each frame (ones without a focus change)
        self.focus = focus_scale(scene.time, float(cfg["focus_change"]),
                                 float(cfg["focus_period"]))
        if np.any(self.focus != 1) and not (isinstance(prf, AnalyticPRF)
                                            or hasattr(prf, "focused")):
            raise InputError("simulate.focus_change needs the analytic PRF or one of its "
                             "families (the SPOC PRF models are fixed samples that cannot "
                             "change width)")
        g = scene.geometry
        self.shape = (g.rows, g.cols)
        self.origin = (g.row_offset, g.column_offset)
        rr = np.arange(g.rows) + g.row_offset
        cc = np.arange(g.cols) + g.column_offset
        self.rr, self.cc = rr, cc
        # exposure: NUM_FRM 2-s frames of which CRM keeps 80 %, each integrating 1.98 s
        self.num_frm = scene.cadence // 2
        self.nreadout = int(round(self.num_frm * CRM_KEEP))
        self.exposure = scene.cadence * DEADC                      # s on source
        self.read_var = float(cfg["read_noise"]) ** 2 * self.nreadout   # e-^2 per cadence
        self.full_well = float(cfg["full_well"]) / INT_TIME         # e-/s
        # stars that can put light on the cutout (their PRF reaches it)
        pad = 15
        self.near = np.flatnonzero((scene.row > g.row_offset - pad)
                                   & (scene.row < g.row_offset + g.rows + pad)
                                   & (scene.col > g.column_offset - pad)
                                   & (scene.col < g.column_offset + g.cols + pad))
        self.var_pos = {int(k): j for j, k in enumerate(scene.variables["index"])}
        # static background ingredients
        cy, cx = CCD_CENTRE
        gx, gy = (float(v) for v in cfg["sky_gradient"])
        self.sky_shape = (1 + gy * (rr[:, None] - cy) / 1024.0 + gx * (cc[None, :] - cx) / 1024.0)
        self.strap_factor = np.zeros(g.cols)
        for c0, width, amp in scene.straps:
            sel = (cc >= c0) & (cc < c0 + width)
            self.strap_factor[sel] = amp
        self.glow_origin = np.array(cfg["glow_origin"], dtype=float)
        self.glow_scale = float(cfg["glow_scale"])
        self._glow_gr, self._glow_wr = self._interp_matrix(rr.astype(float))
        self._glow_gc, self._glow_wc = self._interp_matrix(cc.astype(float))

    def sky(self, i):
        t = self.scene.time[i] - self.scene.tstart[0]
        level = float(self.cfg["sky_level"]) * (1 + 0.02 * np.sin(2 * np.pi * t / 6.0))
        return level * self.sky_shape

    def glow(self, i):
        """Scattered-light glow: a smooth blob from beyond a CCD corner that moves slowly.

        Evaluated on a grid of CCD pixels every 8 px and interpolated bilinearly (two small
        matrix products): smooth by construction, and the same for a cutout as for the full
        frame it comes from.
        """
        t = self.scene.time[i] - self.scene.tstart[0]
        oy, ox = self.glow_origin + np.array([40.0, -25.0]) * t
        return self._glow_wr @ self.glow_grid(i) @ self._glow_wc.T

    def glow_grid(self, i):
        """The glow at the 8-px grid nodes (``_glow_gr`` x ``_glow_gc``)."""
        t = self.scene.time[i] - self.scene.tstart[0]
        oy, ox = self.glow_origin + np.array([40.0, -25.0]) * t
        dist = np.hypot(self._glow_gr[:, None] - oy, self._glow_gc[None, :] - ox)
        return self.scene.glow_amplitude[i] * np.exp(-dist / self.glow_scale)

    @staticmethod
    def _interp_matrix(pixels, step=8):
        """Grid nodes (multiples of ``step``) around ``pixels`` and the bilinear weights."""
        first = int(np.floor(pixels[0] / step)) * step
        last = int(np.ceil(pixels[-1] / step)) * step
        nodes = np.arange(first, last + step, step, dtype=float)
        pos = (pixels - first) / step
        lower = np.minimum(np.floor(pos).astype(int), nodes.size - 2)
        frac = pos - lower
        weights = np.zeros((pixels.size, nodes.size))
        weights[np.arange(pixels.size), lower] = 1 - frac
        weights[np.arange(pixels.size), lower + 1] = frac
        return nodes, weights

    def background(self, i):
        """True background (sky + glow + strap excess), e-/s, and the glow alone."""
        glow = self.glow(i)
        base = self.sky(i) + glow
        return base * (1.0 + self.strap_factor[None, :]), glow

    def star_fluxes(self, i, rel=None):
        """True flux (e-/s, exposure mean) of every star in frame ``i``."""
        flux = self.scene.flux_mean.copy()
        if rel is None:
            sc = self.scene
            rel = exposure_mean_flux(sc.variables, sc.tstart[i:i + 1], sc.tstop[i:i + 1])[:, 0]
        flux[self.scene.variables["index"]] *= rel
        return flux

    def stars_image(self, kernel, flux, prf=None):
        sc = self.scene
        x0, y0 = CCD_CENTRE[1], CCD_CENTRE[0]
        idx = self.near
        x, y = apply_kernel(kernel, sc.col[idx], sc.row[idx], (x0, y0))
        prf = self.prf if prf is None else prf
        return prf.evaluate(y, x, self.shape, origin=self.origin, flux=flux[idx])

    def expected(self, i, flux):
        """Noise-free science image (e-/s) after and before charge bleeding, background, glow."""
        sc = self.scene
        prf = focused_prf(self.prf, self.focus[i])
        dump = next((d for d in sc.dumps if d[0] == i), None)
        if dump is None:
            stars = self.stars_image(sc.kernels[i], flux, prf)
        else:
            _, f, before, after = dump
            stars = f * self.stars_image(before, flux, prf) \
                + (1 - f) * self.stars_image(after, flux, prf)
        bg, glow = self.background(i)
        unbled = stars + bg
        return bleed(unbled, self.full_well), unbled, bg, glow


def bleed(image, well):
    """Spill charge above ``well`` up and down the column, conserving the total.

    Each saturated run of a column keeps ``well`` per pixel; its excess fills the nearest
    unsaturated pixels alternately above and below. Charge reaching the end of the array is
    lost (it would bleed into rows we do not write).
    """
    over = image > well
    if not over.any():
        return image
    image = image.copy()
    nrows = image.shape[0]
    for c in np.flatnonzero(over.any(axis=0)):
        col = image[:, c]
        while True:
            sat = np.flatnonzero(col > well * (1 + 1e-12))
            if sat.size == 0:
                break
            # the first run of saturated pixels
            start = sat[0]
            stop = start
            while stop + 1 < nrows and col[stop + 1] >= well:
                stop += 1
            excess = float(np.sum(col[start:stop + 1] - well))
            col[start:stop + 1] = well
            lo, hi = start - 1, stop + 1
            while excess > 0 and (lo >= 0 or hi < nrows):
                sides = [s for s in (lo, hi) if 0 <= s < nrows]
                share = excess / len(sides)
                for s in sides:
                    take = min(max(well - col[s], 0.0), share)
                    col[s] += take
                    excess -= take
                lo -= 1
                hi += 1
        image[:, c] = col
    return image


# ---------------------------------------------------------------------------------------------
def _utc(times):
    from astropy.time import Time

    iso = Time(np.asarray(times) + 2457000.0, format="jd", scale="tdb").utc.isot
    return [s[:23] + "Z" for s in np.atleast_1d(iso)]


def _fill(cards, values):
    out = []
    for key, value, comment in cards:
        if key in values:
            value = values[key]
        out.append((key, value, comment))
    return out


class _Writer:
    """Writes one FITS file per frame, atomically, with SPOC headers."""

    def __init__(self, scene, outdir):
        self.scene = scene
        self.ffidir = Path(outdir) / "ffi"
        self.ffidir.mkdir(parents=True, exist_ok=True)
        sc = scene
        # spacecraft (TJD) times: barycentric minus BARYCORR
        self.tjd_start = sc.tstart - sc.barycorr
        self.tjd_stop = sc.tstop - sc.barycorr
        self.utc_tjd_start = _utc(self.tjd_start)
        self.utc_tjd_stop = _utc(self.tjd_stop)
        self.utc_start = _utc(sc.tstart)
        self.utc_stop = _utc(sc.tstop)
        self.ref_wcs = reference_wcs_header(sc.geometry)
        ref = _wcs_from_cards(REFERENCE_WCS)
        ra_nom, dec_nom = ref.all_pix2world([CCD_CENTRE[1]], [CCD_CENTRE[0]], 0)
        self.nominal = (float(ra_nom[0]), float(dec_nom[0]))
        # maximum SIP distortion over the full frame (SPOC's A_DMAX/B_DMAX)
        u, v = np.meshgrid(np.linspace(0, FRAME_COLS, 60) - REFERENCE_WCS["CRPIX1"] + 1,
                           np.linspace(0, FRAME_ROWS, 60) - REFERENCE_WCS["CRPIX2"] + 1)
        self.dmax = tuple(float(np.abs(_poly_eval(_sip_terms(REFERENCE_WCS, p)[0], u, v)).max())
                          for p in ("A", "B"))

    def filename(self, i):
        stamp = self.utc_tjd_start[i]
        year, doy = stamp[:4], None
        from datetime import datetime

        dt = datetime.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")
        doy = dt.timetuple().tm_yday
        sc = self.scene
        return (f"tess{year}{doy:03d}{dt:%H%M%S}-s{sc.sector:04d}-{sc.camera}-{sc.ccd}-"
                f"{SCCONFIG:04d}-s_ffic.fits")

    def wcs_cards(self, i):
        sc = self.scene
        g = sc.geometry
        r0, _, c0, _ = g.frame_box
        kernel = sc.kernels[i].copy()
        kernel[:2] += sc.wcs_error[i]
        origin = (CCD_CENTRE[1] - c0, CCD_CENTRE[0] - r0)
        return frame_wcs_header(self.ref_wcs, kernel, origin)

    def write(self, i, image, uncert):
        from astropy.io import fits

        sc = self.scene
        g = sc.geometry
        cadence_d = sc.cadence / 86400.0
        num_frm = sc.cadence // 2
        rn = float(sc.settings["simulate"]["read_noise"])
        primary = fits.PrimaryHDU()
        for key, value, comment in _fill(_PRIMARY_CARDS, {
                "DATE": self.utc_stop[-1][:10], "TSTART": self.tjd_start[i],
                "TSTOP": self.tjd_stop[i], "DATE-OBS": self.utc_tjd_start[i],
                "DATE-END": self.utc_tjd_stop[i], "SECTOR": sc.sector, "CAMERA": sc.camera,
                "CCD": sc.ccd, "FFIINDEX": int(sc.cadenceno[i])}):
            primary.header[key] = (value, comment)
        r0, _, c0, _ = g.frame_box
        common = {
            "CAMERA": sc.camera, "CCD": sc.ccd, "EXPOSURE": cadence_d * DEADC,
            "TELAPSE": cadence_d, "LIVETIME": cadence_d * DEADC, "TSTART": sc.tstart[i],
            "TSTOP": sc.tstop[i], "DATE-OBS": self.utc_start[i], "DATE-END": self.utc_stop[i],
            "BARYCORR": sc.barycorr[i], "NUM_FRM": num_frm, "TIMEDEL": cadence_d,
            "READNOIA": rn, "READNOIB": rn, "READNOIC": rn, "READNOID": rn,
            "NREADOUT": int(round(num_frm * CRM_KEEP)),
            "CRVAL1P": c0 + 1, "CRVAL2P": r0 + 1, "RA_NOM": self.nominal[0],
            "DEC_NOM": self.nominal[1], "DQUALITY": int(sc.quality[i]),
        }
        wcs = self.wcs_cards(i)
        hdus = [primary]
        for kind, data in (("cal", image), ("uncert", uncert)):
            hdu = fits.ImageHDU(data=data.astype(np.float32, copy=False))
            h = hdu.header
            values = dict(common, EXTNAME=f"CAMERA.CCD {sc.camera}.{sc.ccd} {kind}", IMAGTYPE=kind)
            for key, value, comment in _fill(_IMAGE_CARDS_TIME, values):
                if key.startswith("TMOFST"):
                    key = key.format(camera=sc.camera, ccd=sc.ccd)
                    comment = comment.format(camera=sc.camera, ccd=sc.ccd)
                h[key] = (value, comment)
            h["WCSAXES"] = (2, "number of WCS axes")
            h["CTYPE1"] = ("RA---TAN-SIP", "Gnomonic projection + SIP distortions")
            h["CTYPE2"] = ("DEC--TAN-SIP", "Gnomonic projection + SIP distortions")
            for key in ("CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2", "CD2_1", "CD2_2"):
                h[key] = wcs[key]
            for prefix in ("A", "B", "AP", "BP"):
                h[f"{prefix}_ORDER"] = wcs[f"{prefix}_ORDER"]
            for key, value in wcs.items():
                if key[:2] in ("A_", "B_") or key[:3] in ("AP_", "BP_"):
                    if not key.endswith("ORDER"):
                        h[key] = (value, "distortion coefficient")
            h["A_DMAX"] = (self.dmax[0], "maximum distortion, axis 1")
            h["B_DMAX"] = (self.dmax[1], "maximum distortion, axis 2")
            for key, value, comment in _fill(_IMAGE_CARDS_TAIL, values):
                h[key] = (value, comment)
            hdus.append(hdu)
        path = self.ffidir / self.filename(i)
        tmp = path.with_name(path.name + ".partial")
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
        os.replace(tmp, path)
        return path


# ---------------------------------------------------------------------------------------------
def _ideal_noise(scene, renderer, mean_image):
    """Optimal-weighting flux noise per cadence: sigma^2 = 1 / sum_i P_i^2 / var_i.

    ``var_i`` is the per-pixel variance (e-/s)^2 at the time-mean level (all stars at their
    mean flux, mean background): (lambda_i T + read variance) / T^2.
    """
    g = scene.geometry
    T = renderer.exposure
    var = (np.clip(mean_image, 0, None) * T + renderer.read_var) / T**2
    out = np.full(scene.starid.size, np.nan)
    idx = np.flatnonzero((scene.row >= g.row_offset - 0.5) & (scene.row < g.row_offset + g.rows - 0.5)
                         & (scene.col >= g.column_offset - 0.5)
                         & (scene.col < g.column_offset + g.cols - 0.5))
    if idx.size == 0:
        return out
    size = renderer.prf.default_size()
    steps = np.arange(size)
    for start in range(0, idx.size, 4096):          # bounded memory on full frames
        sel = idx[start:start + 4096]
        values, r0, c0 = renderer.prf.stamps(scene.row[sel], scene.col[sel], size)
        rr = (r0 - g.row_offset)[:, None, None] + steps[None, :, None]
        cc = (c0 - g.column_offset)[:, None, None] + steps[None, None, :]
        ok = (rr >= 0) & (rr < g.rows) & (cc >= 0) & (cc < g.cols)
        v = var[np.clip(rr, 0, g.rows - 1), np.clip(cc, 0, g.cols - 1)]
        info = np.where(ok, values**2 / v, 0.0).sum(axis=(1, 2))
        out[sel] = 1.0 / np.sqrt(info)
    return out


def simulate(outdir, settings, raw=False, overwrite=False, progress=True):
    """Write a synthetic sector (FFIs, catalog.csv, truth.h5) into ``outdir``.

    Returns
    -------
    dict
        Paths written and a few numbers (number of stars, frames, cadence).
    """
    import h5py
    from tqdm import tqdm

    outdir = Path(outdir)
    cfg = settings["simulate"]
    ffidir = outdir / "ffi"
    if ffidir.is_dir() and any(ffidir.glob("*_ffic.fits")):
        if not overwrite:
            raise InputError(f"{ffidir}: already holds FFI files (use --overwrite to replace them)")
        for old in ffidir.glob("*_ffic.fits"):
            old.unlink()
    outdir.mkdir(parents=True, exist_ok=True)

    scene = build_scene(settings)
    sc = scene
    g = sc.geometry
    prf_spec = cfg["prf"]
    prf = load_prf(prf_spec, camera=sc.camera, ccd=sc.ccd, sigma=float(cfg["prf_sigma"]),
                   wing_sigma=float(cfg["prf_wing_sigma"]),
                   wing_fraction=float(cfg["prf_wing_fraction"]),
                   **{k: cfg[f"prf_{k}"] for k in PRF_FAMILY_KEYS if f"prf_{k}" in cfg})
    renderer = _Renderer(sc, prf)
    writer = _Writer(sc, outdir)
    n = sc.tstart.size
    nstar = sc.starid.size

    _write_catalog(outdir / "catalog.csv", sc)

    truth_path = outdir / "truth.h5"
    tmp_truth = outdir / "truth.h5.partial"
    seed = int(cfg["seed"])
    write_bg = bool(cfg["truth_background"])
    with h5py.File(tmp_truth, "w") as h5:
        _write_truth_static(h5, sc, renderer, prf, settings)
        flux_ds = h5.create_dataset("flux", (nstar, n), dtype="f8",
                                    chunks=(min(nstar, 4096) or 1, min(n, 64)),
                                    compression="gzip", compression_opts=1, shuffle=True)
        if write_bg:
            # gzip 1 + shuffle: 3.6x smaller and faster than lzf on smooth float32 frames
            comp = dict(compression="gzip", compression_opts=1, shuffle=True,
                        chunks=(1, min(g.rows, 256), min(g.cols, 256)))
            bg_ds = h5.create_dataset("background", (n, g.rows, g.cols), dtype="f4", **comp)
            bg_ds.attrs["unit"] = "electrons/s"
            # the glow is exactly the bilinear interpolation of its 8-px grid: the grid is
            # always stored, the full cube only for cutouts up to 1024x1024
            glow_ds = None
            if g.rows * g.cols <= 1024 * 1024:
                glow_ds = h5.create_dataset("glow", (n, g.rows, g.cols), dtype="f4", **comp)
                glow_ds.attrs["unit"] = "electrons/s"
            nodes_r, nodes_c = renderer._glow_gr, renderer._glow_gc
            glow_grid_ds = h5.create_dataset("glow_grid/values", (n, nodes_r.size, nodes_c.size),
                                             dtype="f8")
            h5["glow_grid/rows"] = nodes_r
            h5["glow_grid/columns"] = nodes_c
            glow_grid_ds.attrs["doc"] = ("glow (e-/s) at CCD nodes (rows x columns, 0-based); "
                                         "the glow at any pixel is the bilinear interpolation")
        mean_image = np.zeros((g.rows, g.cols))
        mean_unbled = np.zeros((g.rows, g.cols))
        block = []
        frame_shape = g.frame_shape
        sci = g.science_slices
        collateral_sigma = np.sqrt(renderer.read_var) / renderer.exposure
        paths = []
        for i in tqdm(range(n), desc="simulate", unit="frame", disable=not progress):
            if i % 64 == 0:       # variability for the next block of frames (bounded memory)
                rel_block = exposure_mean_flux(sc.variables, sc.tstart[i:i + 64],
                                               sc.tstop[i:i + 64])
            flux = renderer.star_fluxes(i, rel_block[:, i % 64])
            expected, unbled, bg, glow = renderer.expected(i, flux)
            rng = np.random.default_rng([seed, 7, i])
            T = renderer.exposure
            lam = np.clip(expected, 0, None) * T                  # expected electrons
            counts = rng.poisson(lam).astype(np.float64)
            counts += rng.normal(0.0, np.sqrt(renderer.read_var), counts.shape)
            # collateral pixels: calibrated to ~0 with read noise only
            image = rng.standard_normal(frame_shape, dtype=np.float32)
            image *= collateral_sigma
            uncert = np.full(frame_shape, collateral_sigma, dtype=np.float32)
            image[sci] = counts / T
            lam += renderer.read_var
            uncert[sci] = np.sqrt(lam) / T
            paths.append(writer.write(i, image, uncert))
            if write_bg:
                bg_ds[i] = bg.astype(np.float32)
                if glow_ds is not None:
                    glow_ds[i] = glow.astype(np.float32)
                glow_grid_ds[i] = renderer.glow_grid(i)
            mean_image += expected
            mean_unbled += unbled
            block.append(flux)
            if len(block) == 64 or i == n - 1:
                flux_ds[:, i + 1 - len(block):i + 1] = np.stack(block, axis=1)
                block = []
        mean_image /= n
        mean_unbled /= n
        # photon noise follows the collected charge, wherever bleeding moved it
        h5["stars/ideal_noise"] = _ideal_noise(sc, renderer, mean_unbled)
        h5["stars/ideal_noise"].attrs["unit"] = "electrons/s per cadence"
        h5["mean_expected_image"] = mean_image.astype(np.float32)
    os.replace(tmp_truth, truth_path)
    if raw:
        try:
            from photometry.sim import rawsim
        except ModuleNotFoundError as exc:
            if exc.name != "photometry.sim.rawsim":
                raise
            raise InputError("--raw: photometry.rawsim (raw FFI writer) is not installed") from None
        rawsim.write_raw(outdir, settings, seed)
    log.info("simulated %d frames of %dx%d science pixels, %d stars", n, g.rows, g.cols, nstar)
    return {"ffi": [str(p) for p in paths], "catalog": str(outdir / "catalog.csv"),
            "truth": str(truth_path), "n_stars": nstar, "n_frames": n, "cadence": sc.cadence}


def _write_catalog(path, sc):
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as fh:
        fh.write("starid,ra,dec,tmag,pmra,pmdec,teff\n")
        for k in range(sc.starid.size):
            fh.write(f"{sc.starid[k]},{sc.ra[k]:.9f},{sc.dec[k]:.9f},{sc.tmag[k]:.4f},"
                     f"{sc.pmra[k]:.3f},{sc.pmdec[k]:.3f},{sc.teff[k]:.0f}\n")
    os.replace(tmp, path)


def _write_truth_static(h5, sc, renderer, prf, settings):
    g = sc.geometry
    h5.attrs["settings"] = json.dumps(settings, sort_keys=True)
    h5.attrs["package_version"] = __version__
    for key, value in (("sector", sc.sector), ("camera", sc.camera), ("ccd", sc.ccd),
                       ("cadence", sc.cadence), ("row_offset", g.row_offset),
                       ("column_offset", g.column_offset), ("rows", g.rows), ("cols", g.cols),
                       ("exposure", renderer.exposure), ("nreadout", renderer.nreadout),
                       ("read_noise", float(sc.settings["simulate"]["read_noise"])),
                       ("full_well_rate", renderer.full_well),
                       ("position_epoch", sc.position_epoch), ("catalog_epoch", 2000.0)):
        h5.attrs[key] = value
    h5["time"] = sc.time
    h5["time"].attrs["unit"] = "BTJD mid-exposure (barycentric)"
    h5["tstart"] = sc.tstart
    h5["tstop"] = sc.tstop
    h5["cadenceno"] = sc.cadenceno
    h5["quality"] = sc.quality
    h5["barycorr"] = sc.barycorr
    h5["shifts"] = sc.kernels
    x0, y0 = g.kernel_origin
    attrs = h5["shifts"].attrs
    attrs["columns"] = "dx, dy, a, b, c, d"
    attrs["kernel_x0"], attrs["kernel_y0"] = x0, y0
    attrs["ccd_x0"], attrs["ccd_y0"] = CCD_CENTRE[1], CCD_CENTRE[0]
    attrs["convention"] = ("star at reference (x, y) = (column, row) is at x + dx + a*(x-x0) + "
                           "b*(y-y0), y + dy + c*(x-x0) + d*(y-y0); x0, y0 in science-region "
                           "pixels (kernel_x0/y0) or CCD pixels (ccd_x0/y0)")
    h5["wcs_error"] = sc.wcs_error
    h5["wcs_error"].attrs["unit"] = "pixels (dx, dy) added to each frame's WCS translation"
    h5["glow_amplitude"] = sc.glow_amplitude
    h5["focus_scale"] = renderer.focus
    h5["focus_scale"].attrs["doc"] = ("relative PRF width of each frame (analytic PRF sigmas x "
                                      "this); ones without simulate.focus_change")
    h5["focus_scale"].attrs["amplitude"] = float(sc.settings["simulate"]["focus_change"])
    h5["focus_scale"].attrs["period"] = float(sc.settings["simulate"]["focus_period"])
    dumps = np.array([[d[0], d[1]] for d in sc.dumps]).reshape(-1, 2)
    h5["dumps/frame"] = dumps[:, 0].astype(np.int32)
    h5["dumps/fraction_before"] = dumps[:, 1]
    h5["dumps/kernel_before"] = np.array([d[2] for d in sc.dumps]).reshape(-1, 6)
    h5["dumps/kernel_after"] = np.array([d[3] for d in sc.dumps]).reshape(-1, 6)
    h5["straps"] = sc.straps
    h5["straps"].attrs["columns"] = "first CCD column (0-based), width, relative excess"
    st = h5.create_group("stars")
    for key in ("starid", "row", "col", "tmag", "ra", "dec", "pmra", "pmdec", "teff", "kind",
                "flux_mean"):
        st[key if key != "col" else "column"] = getattr(sc, key)
    st["kind"].attrs["names"] = json.dumps(KIND_NAMES)
    variable = np.zeros(sc.starid.size, dtype=bool)
    variable[sc.variables["index"]] = True
    st["variable"] = variable
    st["isolated"] = sc.kind == 1
    var = h5.create_group("variability")
    v = sc.variables
    var["index"] = np.asarray(v["index"], dtype=np.int64)
    var["starid"] = sc.starid[v["index"]]
    var["type"] = np.array(v["type"], dtype="S8")
    for key in ("period", "amplitude", "epoch", "duration"):
        var[key] = v[key]
    var["flares"] = v["flares"]
    var["flares"].attrs["columns"] = "variable index, t_peak (BTJD), amplitude, rise (d), decay (d)"
    p = h5.create_group("prf")
    p.attrs["model"] = repr(prf)
    p.attrs["name"] = prf.name
    cy = g.row_offset + g.rows / 2.0
    cx = g.column_offset + g.cols / 2.0
    stamp, _, _ = prf.stamps([np.floor(cy)], [np.floor(cx)], prf.default_size())
    p["centred_stamp"] = stamp[0]
    p["centred_stamp"].attrs["ccd_position"] = (np.floor(cy), np.floor(cx))


# ---------------------------------------------------------------------------------------------
def add_arguments(parser):
    from photometry.hooks.commandline import add_settings_arguments

    parser.add_argument("outdir", help="output folder (ffi/, catalog.csv, truth.h5)")
    parser.add_argument("--cadences", type=int, help="number of frames")
    parser.add_argument("--size", type=int, nargs=2, metavar=("ROWS", "COLS"),
                        help="science size of the cutout (2048 2048 = full frame)")
    parser.add_argument("--seed", type=int, help="random seed (same seed, same files)")
    parser.add_argument("--cadence", type=int, choices=(1800, 600, 200),
                        help="seconds per frame (default: from the sector)")
    parser.add_argument("--sector", type=int, help="sector number (start time, default cadence)")
    parser.add_argument("--camera", type=int, help="camera 1..4")
    parser.add_argument("--ccd", type=int, help="CCD 1..4")
    parser.add_argument("--prf", help="'analytic', a PRF family ('elliptical', 'moffat': "
                        "settings simulate.prf_*) or a folder of SPOC PRF files")
    parser.add_argument("--focus-change", type=float, metavar="AMP", dest="focus_change",
                        help="peak-to-peak relative PRF width change over the frames "
                             "(analytic PRF and families; default 0 = none)")
    parser.add_argument("--full-frame", action="store_true",
                        help="write the whole 2136x2078 frame with its collateral pixels")
    parser.add_argument("--raw", action="store_true", help="also write raw FFIs (photometry.sim.rawsim)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace FFI files already in OUTDIR/ffi")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_settings_arguments(parser)


def run(args):
    from photometry.hooks.settings import load_settings

    extra = {}
    for key in ("cadences", "seed", "cadence", "sector", "camera", "ccd", "prf",
                "focus_change"):
        value = getattr(args, key)
        if value is not None:
            extra[key] = value
    if args.size:
        extra["rows"], extra["cols"] = args.size
    if args.full_frame:
        extra.update(rows=SCIENCE_SIZE, cols=SCIENCE_SIZE, first_row=0, first_col=0)
    settings = load_settings(args.settings, args.assignments, extra={"simulate": extra})
    cfg = settings["simulate"]
    if cfg["rows"] == SCIENCE_SIZE and cfg["cols"] == SCIENCE_SIZE:
        cfg["first_row"] = cfg["first_col"] = 0
    result = simulate(args.outdir, settings, raw=args.raw, overwrite=args.overwrite,
                      progress=not args.no_progress)
    print(f"wrote {result['n_frames']} frames ({result['cadence']} s), {result['n_stars']} stars "
          f"to {args.outdir}")
    return 0

