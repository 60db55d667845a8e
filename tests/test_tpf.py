"""TPFSource: real SPOC TPF and TESScut files read with the right geometry, time and motion."""
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from photometry.errors import InputError
from photometry.tpf import TPFSource

DATA = Path(__file__).parent / "data"
TPF = DATA / "tess25155310-s01-first-cadences.fits.gz"
TESSCUT = DATA / "tess-s0001-4-2_84.291190_-80.469170_6x6_astrocut.fits"


def test_spoc_tpf_geometry_and_time():
    src = TPFSource(TPF)
    assert (src.sector, src.camera, src.ccd, src.cadence) == (1, 4, 1, 120)
    # APERTURE CRVAL1P = 1619, CRVAL2P = 389 (1-based) -> 0-based CCD offsets.
    assert (src.row_offset, src.column_offset) == (388, 1618)
    assert src.n_frames == 5
    assert src.cadenceno.tolist() == [70444, 70445, 70446, 70447, 70448]
    assert src.quality.tolist() == [8, 0, 0, 0, 0]
    assert src.spoc_aperture.sum() == 9
    assert src.target["starid"] == 25155310
    assert src.target["tmag"] == pytest.approx(10.555, abs=1e-3)
    # The target (WCS CRVAL = RA_OBJ/DEC_OBJ) sits near the middle of the 11x11 stamp,
    # inside SPOC's optimal aperture.
    r = src.target["row"] - src.row_offset
    c = src.target["column"] - src.column_offset
    assert src.spoc_aperture[int(round(r)), int(round(c))]
    # POS_CORR kept as in the file (NaN in cadence 0); the kernel is zero at its reference.
    assert np.isnan(src.pos_corr[0, 0])
    dx, dy = src.movement_kernel.shift(0.0, 0.0, src.ref_frame)
    assert dx == 0 and dy == 0
    assert src.stamp("images", slice(None), slice(None)).shape == (5, 11, 11)
    with pytest.raises(KeyError):
        src.stamp("no_such_cube", slice(None), slice(None))


def test_tesscut_needs_target_and_reads_offset():
    with pytest.raises(InputError, match="TICID"):
        TPFSource(TESSCUT)
    with pytest.raises(InputError, match="TESSMAG"):
        TPFSource(TESSCUT, starid=261136679)
    src = TPFSource(TESSCUT, starid=261136679, tmag=5.1)
    assert (src.sector, src.camera, src.ccd, src.cadence) == (1, 4, 2, 1800)
    # TESScut: physical WCS in the PIXELS header (1CRV4P = 1628, 2CRV4P = 257).
    assert (src.row_offset, src.column_offset) == (256, 1627)
    assert src.n_frames == 50
    # Pi Men (saturated, bleeding along the columns) sits in the bright core of the cutout.
    r = int(round(src.target["row"] - src.row_offset))
    c = int(round(src.target["column"] - src.column_offset))
    assert (r, c) == (3, 3)
    assert src.sumimage[r, c] > 1e5


def test_nan_times_are_dropped(tmp_path):
    path = tmp_path / "nan.fits"
    with fits.open(TPF) as hdul:
        hdul["PIXELS"].data["TIME"][2] = np.nan
        hdul.writeto(path)
    src = TPFSource(path)
    assert src.n_frames == 4
    assert src.cadenceno.tolist() == [70444, 70445, 70447, 70448]
    assert src.stamp("images", slice(None), slice(None)).shape[0] == 4


def test_bad_files_are_one_line_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        TPFSource(tmp_path / "missing.fits")
    junk = tmp_path / "junk.fits"
    junk.write_text("not a fits file")
    with pytest.raises(InputError, match="junk.fits"):
        TPFSource(junk)
    ffi = DATA / "tess2018206192942-s0001-1-4-0120-s_ffic.fits"
    if ffi.exists():
        with pytest.raises(InputError, match="not a TPF"):
            TPFSource(ffi)
