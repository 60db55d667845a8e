"""Light-curve file: path layout, SPOC layout and keywords, QUALITY bits, atomic writing and
updating, lightkurve compatibility."""
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from photometry.output import lightcurve_io
from photometry.core.base import STATUS, BasePhotometry
from photometry.hooks.settings import load_settings, settings_hash
from photometry.data.tpf import TPFSource

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
    hlsp = lightcurve_io.lightcurve_path(tmp_path, 261136679, 1, 4, 2, 1800, "aperture",
                                         style="hlsp", project="tasoc")
    assert hlsp.name == ("hlsp_tasoc_tess_ffi_s0001-0000000261136679-4-2-c1800-aperture_"
                         "tess_v2.0_lc.fits")
    with pytest.raises(ValueError, match="style"):
        lightcurve_io.lightcurve_filename(1, 1, 1, 1, 1800, "a", style="qlp")


def test_utc_dates_as_spoc_writes_them():
    # the real SPOC light curve of TIC 25155310: TSTART 1325.293656167129 (TDB) is
    # DATE-OBS '2018-07-25T19:01:42.709Z'
    assert lightcurve_io.utc_date(1325.293656167129) == "2018-07-25T19:01:42.709"


def test_quality_bits():
    from photometry.hooks.quality import LightCurveQualityFlags as F, lightcurve_quality
    spoc = np.array([0, 32, 128, 0, 4096])
    own = np.array([0, 0, F.FlaggedBadData, F.ScatteredLightUnreliable,
                    F.BackgroundShenanigans])
    q = lightcurve_quality(spoc, own)
    # SPOC bits kept; scattered light also as SPOC's Straylight2; ours above bit 20
    assert q.tolist() == [0, 32, 128, 4096 | (64 << 20), 4096 | (256 << 20)]
    assert np.all((q >> 20) < 2 ** 11)            # int32-safe


def test_content_and_coordinates(tmp_path, phot):
    path = phot.save_lightcurve(tmp_path)
    with fits.open(path, checksum=True) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "LIGHTCURVE", "APERTURE", "SUMIMAGE"]
        h = hdul[0].header
        assert (h["TICID"], h["SECTOR"], h["CAMERA"], h["CCD"]) == (25155310, 1, 4, 1)
        assert h["OBJECT"] == "TIC 25155310"
        assert (h["PHOTMET"], h["METHVER"]) == ("whole", "2.1")
        assert h["SETHASH"] == settings_hash(phot.settings)
        assert h["AP_CONT"] == pytest.approx(0.0123)
        assert h["RA_OBJ"] == pytest.approx(63.37389)
        # how lightkurve recognises a SPOC light curve, and what SPOC writes
        assert (h["TELESCOP"], h["ORIGIN"]) == ("TESS", "tessphot")
        assert "LightCurveExporter" in h["CREATOR"] and h["FILEVER"] == "2.0"
        assert h["DATA_REL"] == 0 and h["SPOCVER"] == "spoc-3.3.28-20180822-3-g8d5f3fff42"
        assert h["DATE-OBS"].startswith("2018-07-25T19:")
        assert h["PMRA"] == pytest.approx(63.0735, abs=1e-3)
        th = hdul["LIGHTCURVE"].header
        assert th["CROWDSAP"] == pytest.approx(1 - 0.0123)    # from the method's AP_CONT
        assert th["PDCMETHD"] == "none"
        for key in ("CDPP0_5", "CDPP1_0", "CDPP2_0", "NOI_TOT", "CDPPEXP", "NREADOUT"):
            assert key in th, key
        lc = hdul["LIGHTCURVE"].data
        assert lc.columns.names[:14] == [
            "TIME", "TIMECORR", "CADENCENO", "SAP_FLUX", "SAP_FLUX_ERR", "SAP_BKG",
            "SAP_BKG_ERR", "PDCSAP_FLUX", "PDCSAP_FLUX_ERR", "QUALITY", "MOM_CENTR1",
            "MOM_CENTR2", "POS_CORR1", "POS_CORR2"]
        assert "FLUX" not in lc.columns.names        # else lightkurve ignores flux_column
        np.testing.assert_allclose(lc["SAP_BKG"], np.nansum(phot.backgrounds_cube, axis=(1, 2)))
        assert np.all(lc["SAP_BKG_ERR"] > 0)
        # Output centroids are 1-based CCD column/row.
        np.testing.assert_allclose(lc["MOM_CENTR1"], 1623.5)
        np.testing.assert_allclose(lc["MOM_CENTR2"], 393.0)
        assert np.isnan(lc["POS_CORR1"][0]) and np.isfinite(lc["POS_CORR1"][1])
        assert hdul["LIGHTCURVE"].header["BJDREFI"] == 2457000
        # QUALITY: SPOC's cadence bits as the TPF has them (8 = Earth point)
        assert lc["QUALITY"].tolist() == [8, 0, 0, 0, 0]
        # Stamp WCS + physical WCS: stamp pixel [0, 0] is CCD (row 388, column 1618).
        ap = hdul["APERTURE"].header
        assert (ap["CRVAL1P"], ap["CRVAL2P"]) == (1619, 389)
        assert np.all(hdul["APERTURE"].data & 2)
        assert np.all(hdul["APERTURE"].data & 256)   # columns 1618-1628 are on output D
        assert ap["NPIXSAP"] == 121


def test_lightkurve_reads_it(tmp_path, phot):
    import lightkurve
    path = phot.save_lightcurve(tmp_path)
    lc = lightkurve.read(str(path))
    assert isinstance(lc, lightkurve.TessLightCurve)
    assert lc.time.format == "btjd"
    assert lc.meta["FLUX_ORIGIN"] == "pdcsap_flux"
    # the Earth-point cadence is dropped by lightkurve's default quality mask
    np.testing.assert_allclose(lc.flux.value, phot.lightcurve["flux"][1:])
    np.testing.assert_allclose(lc.centroid_col.value, 1623.5)
    assert len(lightkurve.read(str(path), quality_bitmask="none")) == 5


def test_update_is_atomic_and_idempotent(tmp_path, phot):
    path = phot.save_lightcurve(tmp_path)
    before = path.read_bytes()
    sap = fits.getdata(path, "LIGHTCURVE")["SAP_FLUX"]
    err = fits.getdata(path, "LIGHTCURVE")["SAP_FLUX_ERR"]
    cards = [("PDCMETHD", "test", "method"), ("PDC_NCBV", 2, "vectors")]
    assert lightcurve_io.update_lightcurve(path, sap * 1.01, err, cards)
    h = fits.getheader(path, "LIGHTCURVE")
    assert (h["PDCMETHD"], h["PDC_NCBV"]) == ("test", 2)
    np.testing.assert_allclose(fits.getdata(path, "LIGHTCURVE")["PDCSAP_FLUX"], sap * 1.01)
    after = path.read_bytes()
    # the same again: nothing to do, the file is not touched
    assert not lightcurve_io.update_lightcurve(path, sap * 1.01, err, cards)
    assert path.read_bytes() == after != before
    with fits.open(path, checksum=True) as hdul:
        assert hdul[1].verify_checksum() == 1


def test_atomic_write_never_leaves_a_partial_file(tmp_path, phot, monkeypatch):
    real_write_bytes = Path.write_bytes

    def crash_midway(self, data):
        real_write_bytes(self, data[:len(data) // 2])  # part of the file is on disk...
        raise OSError("disk full")                      # ...then the write dies

    monkeypatch.setattr(Path, "write_bytes", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        phot.save_lightcurve(tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    monkeypatch.setattr(Path, "write_bytes", real_write_bytes)
    path = phot.save_lightcurve(tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [path]


@pytest.mark.parametrize("value", [
    True, False, np.bool_(True), 0, -7, 2 ** 40, np.int32(5), np.int64(-3), 0.0, -0.0, 1.0, 0.1,
    1e-300, -1.7976931348623157e308, 6.305192971941304e-06, 1325.2935, 1353.0018333333335,
    np.float32(0.1), np.float64(84.2785980041172), 123456789012345.678, None, "", "TESS",
    "it's", "a" * 67, "a" * 69, "x" * 150, "READNOIA,READNOIB,READNOIC,READNOID,NREADOUT,EXPOSURE"])
@pytest.mark.parametrize("comment", ["", "[ppm] expected noise per cadence: star photons",
                                     "c" * 70])
def test_card_images_are_astropys(value, comment):
    """The writer formats cards itself (astropy's Card costs ~0.1-0.2 ms each): every image
    must be what astropy writes, CONTINUE cards and truncated comments included."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        for key in ("TSTART", "DATE-OBS", "A_0_2", "CDPP0_5"):
            assert lightcurve_io.card_image(key, value, comment) == \
                fits.Card(key, value, comment).image
    assert lightcurve_io.card_image("COMMENT", "bits " * 30) == fits.Card("COMMENT", "bits " * 30).image


def test_serialised_file_is_astropys_file(tmp_path, phot, monkeypatch):
    """The bytes written are the bytes astropy writes for the same HDUs: the file re-written
    by astropy (``checksum=True``, same time stamp) is identical, its checksums verify and
    astropy's verification finds nothing to fix."""
    import datetime
    import io
    from astropy.io.fits.hdu.base import _ValidHDU

    class Fixed(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2026, 12, 7, 12, 0, 0, tzinfo=tz)

    monkeypatch.setattr(lightcurve_io.datetime, "datetime", Fixed)
    monkeypatch.setattr(_ValidHDU, "_get_timestamp", lambda self: "2026-12-07T12:00:00")
    path = phot.save_lightcurve(tmp_path)
    ours = path.read_bytes()
    assert len(ours) % 2880 == 0
    with fits.open(path, checksum=True) as hdul:
        hdul.verify("exception")
        assert [h.name for h in hdul] == ["PRIMARY", "LIGHTCURVE", "APERTURE", "SUMIMAGE"]
        assert all(h._checksum_valid and h._datasum_valid for h in hdul)
        copy = fits.HDUList([h.copy() for h in hdul])
        for h in copy:
            h.header["CHECKSUM"] = "0" * 16         # astropy recomputes both
            h.header["DATASUM"] = "0"
        # astropy's table copy regenerates the column cards and drops their comments
        copy[1].header.comments["TTYPE10"] = hdul[1].header.comments["TTYPE10"]
        buf = io.BytesIO()
        copy.writeto(buf, checksum=True, output_verify="exception")
    assert buf.getvalue() == ours
