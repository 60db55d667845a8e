"""BasePhotometry and run_target: the SPOC regression on a real TPF, stamps, motion,
backgrounds and the exception -> STATUS mapping (on a small in-memory FFI-like source)."""
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from photometry.data import stages as stages_module
from photometry.core.base import STATUS, BasePhotometry
from photometry.scheduler.target import run_target
from photometry.hooks.errors import (AlgorithmFailure, ConfigurationError, SkipTarget,
                                     UnprocessableTarget)
from photometry.data.movement import MovementKernel
from photometry.hooks.settings import load_settings
from photometry.core.stamps import default_stamp_size
from photometry.data.tpf import TPFSource

DATA = Path(__file__).parent / "data"
TPF = DATA / "tess25155310-s01-first-cadences.fits.gz"

# SPOC light curve of TIC 25155310, sector 1, cadences 70444-70448 (from
# tess2018206045859-s0001-0000000025155310-0120-s_lc.fits): SAP_FLUX and SAP_BKG in e-/s.
SPOC_CADENCENO = [70444, 70445, 70446, 70447, 70448]
SPOC_SAP_FLUX = [7976.1187, 8025.5674, 8049.3604, 8063.4863, 8035.2324]
SPOC_SAP_BKG = [763.7437, 762.1245, 761.4083, 762.46497, 764.35455]


class SpocAperture(BasePhotometry):
    """The simplest real algorithm: sum the pixels of SPOC's own optimal aperture."""

    name = "spocaperture"
    version = "1.0"

    def do_photometry(self):
        mask = self.source.spoc_aperture
        img = self.images_cube[:, mask]
        self.lightcurve["flux"] = np.nansum(img, axis=1)
        self.lightcurve["flux_err"] = np.sqrt(np.nansum(self.images_err_cube[:, mask] ** 2, 1))
        self.lightcurve["flux_background"] = np.nansum(self.backgrounds_cube[:, mask], axis=1)
        cols, rows = self.get_pixel_grid()
        w = np.clip(img, 0, None)
        self.lightcurve["pos_centroid"] = np.column_stack(
            [(w * cols[mask]).sum(1) / w.sum(1), (w * rows[mask]).sum(1) / w.sum(1)])
        self.final_phot_mask = mask
        return STATUS.OK


def test_spoc_aperture_reproduces_sap_flux_and_bkg(tmp_path):
    result = run_target(SpocAperture, 25155310, TPFSource(TPF), load_settings(), tmp_path)
    assert result["status"] == STATUS.OK, result["error"]
    path = Path(result["lightcurve"])
    assert path == (tmp_path / "c0120" / "00025" /
                    "tess00025155310-s0001-4-1-c0120-spocaperture_lc.fits")
    assert result["details"]["mask_size"] == 9
    # Cadence 70444 has QUALITY 8 (Earth point) and is left out of the statistics.
    assert result["details"]["mean_flux"] == pytest.approx(np.median(SPOC_SAP_FLUX[1:]), abs=0.01)
    with fits.open(path) as hdul:
        assert hdul[0].header["TICID"] == 25155310
        assert hdul[0].header["PHOTMET"] == "spocaperture"
        assert hdul[0].header["METHVER"] == "1.0"
        lc = hdul["LIGHTCURVE"].data
        assert lc["CADENCENO"].tolist() == SPOC_CADENCENO
        np.testing.assert_allclose(lc["SAP_FLUX"], SPOC_SAP_FLUX, atol=0.01)
        np.testing.assert_allclose(lc["SAP_BKG"], SPOC_SAP_BKG, atol=0.01)
        # no correction ran: PDCSAP_FLUX is the SAP copy, and says so
        np.testing.assert_array_equal(lc["PDCSAP_FLUX"], lc["SAP_FLUX"])
        assert hdul["LIGHTCURVE"].header["PDCMETHD"] == "none"
        # QUALITY holds SPOC's cadence bits as the TPF has them (8 = Earth point)
        assert lc["QUALITY"].tolist() == [8, 0, 0, 0, 0]
        # The flux-weighted centroid sits on the target (1-based CCD column ~1624, row ~393).
        assert np.all(np.abs(lc["MOM_CENTR1"] - 1623.9) < 0.5)
        assert np.all(np.abs(lc["MOM_CENTR2"] - 393.3) < 0.5)
        ap = hdul["APERTURE"].data
        assert np.count_nonzero(ap & 2) == 9
        assert hdul["APERTURE"].header["CRVAL1P"] == 1619
        assert hdul["SUMIMAGE"].data.shape == (11, 11)

    import lightkurve
    lk = lightkurve.read(str(path), quality_bitmask="none")
    assert lk.time.format == "btjd"
    np.testing.assert_allclose(lk.flux.value, SPOC_SAP_FLUX, atol=0.01)
    np.testing.assert_allclose(lk.time.value[1:], [1325.29664867, 1325.29803757,
                                                   1325.29942647, 1325.30081537], atol=1e-7)


# --------------------------------------------------------------------- a small FFI-like source
class FakeSource:
    """An in-memory stand-in for FFICache: 60x80 science pixels, a few stars, known sky,
    a known drift (movement kernel), frames with known pixel values."""

    datasource = "ffi"
    sector, camera, ccd, cadence = 1, 1, 1, 1800
    row_offset, column_offset = 0, 44
    shape = (60, 80)
    catalog_path = None

    def __init__(self, n=12, seed=1):
        rng = np.random.default_rng(seed)
        self.n_frames = n
        self.time = 1325.0 + np.arange(n) * self.cadence / 86400
        self.timecorr = np.zeros(n)
        self.cadenceno = np.arange(n)
        self.quality = np.zeros(n, dtype=int)
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crpix = [40.5, 30.5]
        w.wcs.crval = [80.0, -70.0]
        w.wcs.cdelt = [-21 / 3600, 21 / 3600]
        self.reference_wcs = w
        rows = np.array([30.0, 12.3, 45.6, 2.2, 20.4])
        cols = np.array([84.0, 60.2, 100.7, 70.1, 110.0])  # CCD columns (offset 44)
        tmag = np.array([10.0, 11.5, 12.0, 9.0, 13.0])
        ra, dec = w.all_pix2world(cols - self.column_offset, rows - self.row_offset, 0)
        self.stars = Table({"starid": [101, 102, 103, 104, 105], "ra": ra, "dec": dec,
                            "tmag": tmag, "row": rows, "column": cols})
        kernel = np.zeros((n, 6))
        kernel[:, 0] = 0.02 * np.arange(n)   # dx (columns)
        kernel[:, 1] = -0.01 * np.arange(n)  # dy (rows)
        self.movement_kernel = MovementKernel(kernel, self.time, 40.0, 30.0)
        self.sky = 100.0 + 5.0 * np.arange(n)
        rr, cc = np.mgrid[0:60, 0:80]
        cube = np.empty((n,) + self.shape)
        for i in range(n):
            img = np.full(self.shape, self.sky[i])
            for star in self.stars:
                x = star["column"] - 44 + kernel[i, 0]
                y = star["row"] + kernel[i, 1]
                flux = 10 ** (-0.4 * (star["tmag"] - 20.451))
                img += flux / (2 * np.pi) * np.exp(-((cc - x) ** 2 + (rr - y) ** 2) / 2)
            cube[i] = img + rng.normal(0, 1.0, self.shape)
        self.cubes = {"images": cube, "errors": np.ones_like(cube),
                      "pixel_flags": np.zeros(cube.shape, dtype=np.uint8)}
        self.sumimage = cube.mean(axis=0)
        self.groups = {}

    def stamp(self, name, row_slice, col_slice, frames=slice(None)):
        return self.cubes[name][frames, row_slice, col_slice]

    def model_group(self, name):
        return self.groups.get(name)

    def catalog_table(self):
        return self.stars.copy()


class Flat(BasePhotometry):
    name = "flat"

    def do_photometry(self):
        self.lightcurve["flux"] = np.nansum(self.images_cube, axis=(1, 2))
        self.lightcurve["flux_err"] = np.ones(self.n_frames)
        self.final_phot_mask = np.ones(self.sumimage.shape, dtype=bool)
        return STATUS.OK


@pytest.fixture(scope="module")
def source():
    return FakeSource()


@pytest.fixture(scope="module")
def settings():
    return load_settings(assignments=['photometry.background=""'])


def test_default_stamp_sizes():
    assert default_stamp_size(10.0) == (15, 15)
    assert default_stamp_size(8.0) == (15, 15)
    assert default_stamp_size(6.3) == (19, 19)      # 18 -> odd
    assert default_stamp_size(3.2) == (69, 45)      # taller than wide: the bleed is along rows
    assert default_stamp_size(0.0) == (833, 159)
    h1, w1 = default_stamp_size(4.7)
    assert 23 <= h1 <= 37 and 23 <= w1 <= 33


def test_stamp_clip_resize_and_grid(source, settings):
    p = Flat(101, source, settings)
    assert p.stamp == (23, 38, 77, 92)              # 15x15 around (30, 84)
    assert (p.target_pos_row_stamp, p.target_pos_column_stamp) == (7.0, 7.0)
    cols, rows = p.get_pixel_grid()
    assert cols[0, 0] == 77 and rows[0, 0] == 23 and cols.shape == (15, 15)
    first = p.images_cube
    assert p.resize_stamp(up=3, right=2)
    assert p.stamp == (23, 41, 77, 94)
    assert p.images_cube.shape == (12, 18, 17)      # re-read, not the cached cube
    assert first.shape == (12, 15, 15)
    assert p.details["stamp_resizes"] == 1
    assert p.resize_stamp(width=5, height=7)
    assert p.stamp == (27, 34, 82, 87)
    # Near the edge: star 104 at row 2.2 is clipped at row 0, column 44 is the first science one.
    q = Flat(104, source, settings)
    assert q.stamp == (0, 10, 63, 78)
    assert not q.resize_stamp(down=5)               # nothing below row 0: no change
    assert q.details["stamp_resizes"] == 0


def test_cubes_are_cached_pixels_and_wcs_maps_target(source, settings):
    p = Flat(101, source, settings)
    rs, cs = slice(23, 38), slice(77 - 44, 92 - 44)
    raw = source.cubes["images"][:, rs, cs]
    np.testing.assert_allclose(p.images_cube + p.backgrounds_cube, raw, rtol=0, atol=1e-9)
    # Local background: the known sky of every frame within its noise (1 e-/s per pixel).
    np.testing.assert_allclose(p.backgrounds_cube[:, 0, 0], source.sky, atol=0.3)
    assert p.backgrounds_err_cube[0, 0, 0] < 0.3
    x, y = p.wcs.all_world2pix(p.target["ra"], p.target["dec"], 0)
    assert (float(y), float(x)) == pytest.approx((p.target_pos_row_stamp,
                                                  p.target_pos_column_stamp), abs=1e-6)
    assert set(p.catalog["starid"]) == {101}
    assert p.catalog["row_stamp"][0] == pytest.approx(7.0)


def test_catalog_attime_and_pos_corr_follow_the_kernel(source, settings):
    p = Flat(102, source, settings)
    cat0 = p.catalog_attime(0)
    cat5 = p.catalog_attime(5)
    assert cat5["column"][0] - cat0["column"][0] == pytest.approx(0.10)
    assert cat5["row"][0] - cat0["row"][0] == pytest.approx(-0.05)
    cat_t = p.catalog_attime(float(p.time[5]) + 1e-5)  # a time picks the nearest frame
    assert cat_t["column_stamp"][0] == pytest.approx(cat5["column_stamp"][0])
    np.testing.assert_allclose(p.lightcurve["pos_corr"][:, 0], 0.02 * np.arange(12))
    np.testing.assert_allclose(p.lightcurve["pos_corr"][:, 1], -0.01 * np.arange(12))


def test_background_model_from_cache_is_used(monkeypatch, source):
    class Model:
        name = "fakebkg"

        @classmethod
        def evaluate(cls, group, row_slice, col_slice, frames=slice(None)):
            n = group["n"]
            return np.full((n, row_slice.stop - row_slice.start,
                            col_slice.stop - col_slice.start), 42.0)

        @classmethod
        def evaluate_error(cls, group, row_slice, col_slice, frames=slice(None)):
            return np.full(1, 0.5)

    monkeypatch.setattr(stages_module, "background_model_class", lambda name: Model)
    monkeypatch.setitem(source.groups, "fakebkg", {"n": source.n_frames})
    p = Flat(101, source, load_settings(assignments=["photometry.background=fakebkg"]))
    assert np.all(p.backgrounds_cube == 42.0)
    assert np.all(p.backgrounds_err_cube == 0.5)
    assert p.details["background"] == "fakebkg"


@pytest.mark.parametrize("exc, status", [
    (SkipTarget("in the halo of 104"), STATUS.SKIPPED),
    (UnprocessableTarget("saturated beyond the stamp"), STATUS.ABORT),
    (AlgorithmFailure("fit did not converge"), STATUS.ERROR),
    (ZeroDivisionError("bug"), STATUS.ERROR),
])
def test_exceptions_map_to_status(tmp_path, source, settings, exc, status):
    class Failing(Flat):
        name = "failing"

        def do_photometry(self):
            raise exc

    result = run_target(Failing, 101, source, settings, tmp_path)
    assert result["status"] == status
    assert result["lightcurve"] is None
    assert str(exc) in result["error"]
    assert not list(tmp_path.rglob("*.fits"))


def test_configuration_error_stops_the_run(tmp_path, source, settings):
    class Misconfigured(Flat):
        def do_photometry(self):
            raise ConfigurationError("settings: photometry.foo is not known")

    with pytest.raises(ConfigurationError):
        run_target(Misconfigured, 101, source, settings, tmp_path)


def test_unknown_target_and_bad_status(tmp_path, source, settings):
    assert run_target(Flat, 999, source, settings, tmp_path)["status"] == STATUS.ABORT

    class NoStatus(Flat):
        def do_photometry(self):
            return None

    assert run_target(NoStatus, 101, source, settings, tmp_path)["status"] == STATUS.ERROR

    class AllNan(Flat):
        def do_photometry(self):
            return STATUS.OK  # flux left NaN

    result = run_target(AllNan, 101, source, settings, tmp_path)
    assert result["status"] == STATUS.ERROR and "NaN" in result["error"]


def test_ok_run_writes_metrics_and_file(tmp_path, source, settings):
    result = run_target(Flat, 103, source, settings, tmp_path, plot=True)
    assert result["status"] == STATUS.OK, result["error"]
    d = result["details"]
    assert d["mask_size"] == 15 * 15
    assert d["mean_flux"] > 0
    assert d["rms_hour"] is not None and d["ptp"] is not None
    path = Path(result["lightcurve"])
    assert path.exists()
    assert (path.parent / "plots" / "00000000103").is_dir()
    assert list((path.parent / "plots" / "00000000103").glob("*.png"))


def test_real_ffi_cache_gives_the_cached_pixels(tmp_path, settings):
    """The same scene written through the cache writer and read back with FFICache."""
    import sqlite3
    cache = pytest.importorskip("photometry.data.cache")
    fake = FakeSource(n=6, seed=3)
    meta = {"sector": 1, "camera": 1, "ccd": 1, "cadence": 1800, "data_rel": 0,
            "procver": "test", "row_offset": 0, "column_offset": 44}
    path = tmp_path / cache.cache_filename(1, 1, 1)
    lossless = dict(settings, prepare=dict(settings["prepare"], precision=0.0))  # exact pixels
    writer = cache.CacheWriter(path, lossless, ffi_files=[f"f{i}.fits" for i in range(6)],
                               shape=fake.shape, meta=meta)
    wcs_text = fake.reference_wcs.to_header().tostring(sep="\n")
    for i in range(6):
        writer.add_frame(fake.cubes["images"][i].astype(np.float32),
                         fake.cubes["errors"][i].astype(np.float32), time=fake.time[i],
                         time_start=fake.time[i] - 0.01, time_stop=fake.time[i] + 0.01,
                         timecorr=0.0, cadenceno=i, quality=0, wcs_header=wcs_text)
    writer.finish_ingest()
    writer.close(complete=True)
    with sqlite3.connect(tmp_path / cache.catalog_filename(1, 1, 1)) as conn:
        conn.execute("CREATE TABLE catalog (starid INTEGER PRIMARY KEY, ra REAL, dec REAL, "
                     "ra_J2000 REAL, dec_J2000 REAL, pmra REAL, pmdec REAL, tmag REAL, "
                     "teff REAL, row REAL, column REAL)")
        conn.execute("CREATE TABLE settings (sector INT, camera INT, ccd INT, "
                     "reference_time REAL, epoch REAL)")
        conn.execute("INSERT INTO settings VALUES (1, 1, 1, 1325.0, 2018.6)")
        for s in fake.stars:
            conn.execute("INSERT INTO catalog VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                         (int(s["starid"]), s["ra"], s["dec"], s["ra"], s["dec"], 0.0, 0.0,
                          s["tmag"], 5000.0, s["row"], s["column"]))
    with cache.FFICache(path) as src:
        p = Flat(102, src, settings)
        assert p.stamp == (5, 20, 53, 68)
        raw = fake.cubes["images"][:, 5:20, 53 - 44:68 - 44].astype(np.float32)
        np.testing.assert_allclose(p.images_cube + p.backgrounds_cube, raw, rtol=0, atol=1e-9)
        x, y = p.wcs.all_world2pix(p.target["ra"], p.target["dec"], 0)
        assert (float(y), float(x)) == pytest.approx((p.target_pos_row_stamp,
                                                      p.target_pos_column_stamp), abs=1e-6)
        assert set(p.catalog["starid"]) == {102, 104}   # 104 is within catalog_buffer px
        result = run_target(Flat, 102, src, settings, tmp_path / "lc")
        assert result["status"] == STATUS.OK, result["error"]


def test_logged_warnings_reach_details(tmp_path, source, settings):
    import logging

    class Chatty(Flat):
        name = "chatty"

        def do_photometry(self):
            logging.getLogger(__name__).warning("mask touches the edge")
            return super().do_photometry()

    result = run_target(Chatty, 101, source, settings, tmp_path)
    assert result["status"] == STATUS.OK
    assert any("mask touches the edge" in e for e in result["details"]["errors"])


def test_output_writers_come_from_the_registry(tmp_path):
    """The FITS writer is a registered output writer; an unknown name stops the run."""
    settings = load_settings(assignments=['photometry.writers=["fits"]'])
    result = run_target(SpocAperture, 25155310, TPFSource(TPF), settings, tmp_path)
    assert result["status"] == STATUS.OK and Path(result["lightcurve"]).is_file()
    settings = load_settings(assignments=['photometry.writers=["no_such_writer"]'])
    with pytest.raises(ConfigurationError, match="no_such_writer.*known: fits"):
        run_target(SpocAperture, 25155310, TPFSource(TPF), settings, tmp_path / "other")
