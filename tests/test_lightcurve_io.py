"""Light-curve file: path layout, atomic writing, header content, lightkurve compatibility."""
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from photometry import lightcurve_io
from photometry.base import STATUS, BasePhotometry
from photometry.settings import load_settings, settings_hash
from photometry.tpf import TPFSource

TPF = Path(__file__).parent / "data" / "tess25155310-s01-first-cadences.fits.gz"


class Whole(BasePhotometry):
    name = "whole"
    version = "2.1"

    def do_photometry(self):
        self.lightcurve["flux"] = np.nansum(self.images_cube, axis=(1, 2))
        self.lightcurve["flux_err"] = np.sqrt(np.nansum(self.images_err_cube ** 2, axis=(1, 2)))
        self.lightcurve["flux_background"] = np.nansum(self.backgrounds_cube, axis=(1, 2))
        self.lightcurve["pos_centroid"] = np.column_stack(
            [np.full(self.n_frames, 1622.5), np.full(self.n_frames, 392.0)])
        self.final_phot_mask = np.ones(self.sumimage.shape, dtype=bool)
        self.additional_headers["AP_CONT"] = (0.0123, "contamination")
        return STATUS.OK


@pytest.fixture
def phot():
    p = Whole(25155310, TPFSource(TPF), load_settings())
    assert p.photometry() == STATUS.OK
    return p


def test_path_layout(tmp_path):
    path = lightcurve_io.lightcurve_path(tmp_path, 261136679, 1, 4, 2, 1800, "aperture")
    assert path == (tmp_path / "c1800" / "00261" /
                    "tess00261136679-s0001-4-2-c1800-aperture_lc.fits")


def test_content_and_coordinates(tmp_path, phot):
    path = phot.save_lightcurve(tmp_path)
    with fits.open(path, checksum=True) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "LIGHTCURVE", "SUMIMAGE", "APERTURE"]
        h = hdul[0].header
        assert (h["TICID"], h["SECTOR"], h["CAMERA"], h["CCD"]) == (25155310, 1, 4, 1)
        assert h["OBJECT"] == "TIC 25155310"
        assert (h["PHOTMET"], h["METHVER"]) == ("whole", "2.1")
        assert h["SETHASH"] == settings_hash(phot.settings)
        assert h["AP_CONT"] == pytest.approx(0.0123)
        assert h["RA_OBJ"] == pytest.approx(63.37389)
        lc = hdul["LIGHTCURVE"].data
        # Output centroids are 1-based CCD column/row.
        np.testing.assert_allclose(lc["MOM_CENTR1"], 1623.5)
        np.testing.assert_allclose(lc["MOM_CENTR2"], 393.0)
        assert np.isnan(lc["POS_CORR1"][0]) and np.isfinite(lc["POS_CORR1"][1])
        assert hdul["LIGHTCURVE"].header["BJDREFI"] == 2457000
        # QUALITY: FlaggedBadData (1) where the SPOC cadence quality fails the default mask.
        assert lc["QUALITY"].tolist() == [1, 0, 0, 0, 0]
        # Stamp WCS + physical WCS: stamp pixel [0, 0] is CCD (row 388, column 1618).
        ap = hdul["APERTURE"].header
        assert (ap["CRVAL1P"], ap["CRVAL2P"]) == (1619, 389)
        assert np.all(hdul["APERTURE"].data & 2)
        assert np.all(hdul["APERTURE"].data & 256)   # columns 1618-1628 are on output D


def test_lightkurve_reads_it(tmp_path, phot):
    import lightkurve
    path = phot.save_lightcurve(tmp_path)
    lc = lightkurve.read(str(path))
    assert lc.time.format == "btjd"
    assert lc.meta["FLUX_ORIGIN"] == "flux"
    np.testing.assert_allclose(lc.flux.value, phot.lightcurve["flux"])
    np.testing.assert_allclose(lc.centroid_col.value, 1623.5)


def test_atomic_write_never_leaves_a_partial_file(tmp_path, phot, monkeypatch):
    real_writeto = fits.HDUList.writeto

    def crash_midway(self, name, *args, **kwargs):
        real_writeto(self[:2], name, *args, **kwargs)  # part of the file is on disk...
        raise OSError("disk full")                      # ...then the write dies

    monkeypatch.setattr(fits.HDUList, "writeto", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        phot.save_lightcurve(tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    monkeypatch.setattr(fits.HDUList, "writeto", real_writeto)
    path = phot.save_lightcurve(tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [path]
