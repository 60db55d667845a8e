"""Catalog reading (real S002 target list), proper motion against ERFA, the per-CCD SQLite."""
import sqlite3
import warnings
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS

from photometry.data.catalog import (apply_proper_motion, btjd_to_epoch, read_catalog,
                                     read_catalog_sqlite, stars_in_box, write_catalog_sqlite)
from photometry.hooks.errors import InputError
from photometry.data.ffi import read_ffi

DATA = Path(__file__).parent / "data"
S002 = DATA / "all_targets_S002_v1_excerpt.csv"
FFI = DATA / "tess2018206192942-s0001-1-4-0120-s_ffic.fits"


def test_real_target_list_reads_with_aliases():
    cat = read_catalog(S002)
    assert cat.colnames == ["starid", "ra", "dec", "tmag", "pmra", "pmdec", "teff"]
    assert len(cat) == 400
    assert cat["starid"].dtype == np.int64
    first = cat[0]
    assert (first["starid"], first["ra"], first["dec"], first["tmag"]) == \
        (2733208, 356.0455, -13.1907, 8.03)
    assert np.all(cat["pmra"] == 0) and np.all(cat["pmdec"] == 0)
    assert np.all(np.isnan(cat["teff"]))


@pytest.mark.parametrize("fmt, suffix", [("ascii.ecsv", ".ecsv"), ("fits", ".fits"),
                                         ("ascii.csv", ".csv")])
def test_formats_and_other_aliases(tmp_path, fmt, suffix):
    t = Table({"TIC": [5, 6], "RAJ2000": [10.0, 370.0], "DEJ2000": [-5.0, 5.0],
               "TESSMAG": [9.0, 10.0], "pmRA": [1.5, np.nan], "pmDE": [-2.0, 3.0],
               "Teff": [5800.0, 4000.0]})
    path = tmp_path / f"cat{suffix}"
    t.write(path, format=fmt)
    cat = read_catalog(path)
    assert list(cat["starid"]) == [5, 6]
    assert list(cat["ra"]) == [10.0, 10.0]  # wrapped into [0, 360)
    assert list(cat["pmra"]) == [1.5, 0.0] and list(cat["teff"]) == [5800.0, 4000.0]


def _csv(tmp_path, text, name="cat.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_missing_tmag_names_file_and_column(tmp_path):
    path = _csv(tmp_path, "starid,ra,dec\n1,10,20\n")
    with pytest.raises(InputError, match="no column 'tmag'") as info:
        read_catalog(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text, message", [
    ("starid,ra,dec,tmag\n1,10,20,9\n1,11,21,9\n", "duplicate starid 1"),
    ("starid,ra,dec,tmag\nabc,10,20,9\n2,11,21,9\n", "non-numeric value 'abc'"),
    ("starid,ra,dec,tmag\n1.5,10,20,9\n", "non-integer"),
    ("starid,ra,dec,tmag\n1,10,x,9\n", "column 'dec'"),
    ("starid,ra,dec,tmag\n1,10,95,9\n", "outside"),
    ("starid,ra,dec,tmag\n", "no rows"),
])
def test_bad_catalogs(tmp_path, text, message):
    path = _csv(tmp_path, text)
    with pytest.raises(InputError, match=message) as info:
        read_catalog(path)
    assert str(path) in str(info.value)


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="unknown catalog format"):
        read_catalog(_csv(tmp_path, "x", name="cat.xlsx"))
    with pytest.raises(InputError, match="not found"):
        read_catalog(tmp_path / "nope.csv")


def test_nan_positions_dropped_with_warning(tmp_path):
    path = _csv(tmp_path, "starid,ra,dec,tmag\n1,10,20,9\n2,,21,9\n3,12,22,9\n")
    with pytest.warns(UserWarning, match="dropped 1 of 3 rows"):
        cat = read_catalog(path)
    assert list(cat["starid"]) == [1, 3]


def test_proper_motion_matches_erfa_to_a_microarcsecond():
    ra = np.array([10.0, 359.999, 180.0, 45.0, 270.0, 0.0])
    dec = np.array([0.0, 89.9999, -89.99, 60.0, -30.0, -89.9999])
    pmra = np.array([1000.0, 5000.0, -3000.0, 100.0, 10000.0, 8000.0])
    pmdec = np.array([-500.0, 2000.0, 4000.0, -50.0, -10000.0, 0.0])
    start = SkyCoord(ra=ra * u.deg, dec=dec * u.deg, pm_ra_cosdec=pmra * u.mas / u.yr,
                     pm_dec=pmdec * u.mas / u.yr, obstime=Time(2000.0, format="jyear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ERFA: "distance overridden" (no parallax given)
        end = start.apply_space_motion(new_obstime=Time(2010.0, format="jyear"))
    ra1, dec1 = apply_proper_motion(ra, dec, pmra, pmdec, 2000.0, 2010.0)
    sep = SkyCoord(ra1 * u.deg, dec1 * u.deg).separation(SkyCoord(end.ra, end.dec))
    assert sep.to(u.mas).max() < 1e-3 * u.mas
    assert np.all((ra1 >= 0) & (ra1 < 360))
    # a star moving 10" in 10 years along dec
    _, d = apply_proper_motion([30.0], [10.0], [0.0], [1000.0], 2000.0, 2010.0)
    assert d[0] == pytest.approx(10.0 + 10 / 3600, abs=1e-9)


def test_btjd_to_epoch():
    btjd = 1325.329195
    expected = Time(btjd + 2457000, format="jd", scale="tdb").jyear
    assert btjd_to_epoch(btjd) == pytest.approx(expected, abs=1e-9)


def _grid_catalog(wcs, offset=0):
    """Stars on a pixel grid from 60 px outside to 60 px beyond a 128x129 footprint."""
    x, y = np.meshgrid(np.arange(-60.0, 190.0, 7.3), np.arange(-60.0, 190.0, 7.1))
    x, y = x.ravel(), y.ravel()
    ra, dec = wcs.all_pix2world(x, y, 0)
    n = len(x)
    table = Table({"starid": np.arange(n, dtype=np.int64) + 1 + offset, "ra": ra, "dec": dec,
                   "tmag": np.linspace(6, 16, n), "pmra": np.zeros(n), "pmdec": np.zeros(n),
                   "teff": np.full(n, np.nan)})
    return table, x, y


def test_sqlite_keeps_stars_on_or_near_the_footprint(tmp_path):
    frame = read_ffi(FFI)
    table, x, y = _grid_catalog(frame.wcs)
    # far-away stars (other hemisphere, other side of RA 0) must never be kept
    far = Table({"starid": [900001, 900002], "ra": [135.4, 0.1], "dec": [29.0, -28.9],
                 "tmag": [8.0, 8.0], "pmra": [0.0, 0.0], "pmdec": [0.0, 0.0],
                 "teff": [np.nan, 5000.0]})
    # a fast star off the footprint in 2000 that moves onto it by the sector epoch
    epoch = btjd_to_epoch(frame.time)
    ra_t, dec_t = frame.wcs.all_pix2world([64.0], [10.0], 0)
    mover = Table({"starid": [900003], "ra": [ra_t[0]], "dec": [dec_t[0] + 0.3],
                   "tmag": [9.0], "pmra": [0.0], "pmdec": [-0.3 * 3.6e6 / (epoch - 2000.0)],
                   "teff": [np.nan]})
    from astropy.table import vstack
    catalog = vstack([table, far, mover])
    path = tmp_path / "catalog_sector0001_camera1_ccd4.sqlite"
    margin = 20.0
    n = write_catalog_sqlite(catalog, path, frame.wcs, frame.row_offset, frame.column_offset,
                             frame.image.shape, 1, 1, 4, frame.time, margin)
    inside = ((x >= -0.5 - margin) & (x <= 128.5 + margin)
              & (y >= -0.5 - margin) & (y <= 127.5 + margin))
    expected = set(table["starid"][inside]) | {900003}
    stored = read_catalog_sqlite(path)
    assert n == len(stored) == len(expected)
    assert set(stored["starid"]) == expected
    assert not list(tmp_path.glob("*.partial"))
    # CCD coordinates: science pixel + offsets (0-based); J2000 columns are the input
    sel = np.searchsorted(table["starid"], stored["starid"][stored["starid"] < 900000])
    grid = stored[stored["starid"] < 900000]
    np.testing.assert_allclose(grid["column"], x[sel] + 44, atol=1e-4)
    np.testing.assert_allclose(grid["row"], y[sel], atol=1e-4)
    np.testing.assert_array_equal(grid["ra_J2000"], table["ra"][sel])
    moved = stored[stored["starid"] == 900003][0]
    assert moved["row"] == pytest.approx(10.0, abs=0.05)
    assert moved["column"] == pytest.approx(64.0 + 44, abs=0.05)
    assert moved["dec_J2000"] == pytest.approx(dec_t[0] + 0.3)
    x0, y0 = frame.wcs.all_world2pix(mover["ra"], mover["dec"], 0)
    assert y0[0] < -0.5 - margin  # off the footprint at J2000
    # settings table and schema
    assert stored.meta["sector"] == 1 and stored.meta["ccd"] == 4
    assert stored.meta["reference_time"] == frame.time
    assert stored.meta["epoch"] == pytest.approx(epoch)
    with sqlite3.connect(path) as conn:
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(catalog)")}
        pk = [row[1] for row in conn.execute("PRAGMA table_info(catalog)") if row[5]]
    assert "catalog_tmag_idx" in indexes and pk == ["starid"]
    # pixel-box query
    box = stars_in_box(path, 10, 40, 60, 90)
    mask = (stored["row"] >= 10) & (stored["row"] <= 40) & (stored["column"] >= 60) & \
        (stored["column"] <= 90)
    assert set(box["starid"]) == set(stored["starid"][mask]) and len(box) > 5
    assert np.all(np.diff(box["tmag"]) >= 0)
    assert len(stars_in_box(path, 10, 40, 60, 90, tmag_max=10)) < len(box)


def _tan_wcs(ra, dec, scale_deg=21 / 3600):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [64.5, 64.0]  # 1-based: centre of a 128x128 array
    w.wcs.cd = [[-scale_deg, 0.0], [0.0, scale_deg]]
    return w


@pytest.mark.parametrize("ra, dec", [(0.05, -20.0), (180.0, -89.95), (10.0, 89.99)])
def test_sqlite_footprint_across_ra_zero_and_poles(tmp_path, ra, dec):
    wcs = _tan_wcs(ra, dec)
    table, x, y = _grid_catalog(wcs)
    path = tmp_path / "cat.sqlite"
    write_catalog_sqlite(table, path, wcs, 0, 44, (128, 129), 1, 1, 1, 1500.0, 10.0)
    inside = (x >= -10.5) & (x <= 138.5) & (y >= -10.5) & (y <= 137.5)
    assert set(read_catalog_sqlite(path)["starid"]) == set(table["starid"][inside])
