"""The data layer's contracts: the DataSource Protocol every source satisfies (members and
signatures), the FITS tables the core reads for plugins (so no plugin opens a file), and the
task list's named query for the results of one output folder."""
import inspect
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from photometry import DataSource, FFICache, InputFile, MemorySource, TPFSource
from photometry.data.fits_tables import ProductFolder, find_input_file, read_fits_tables
from photometry.data.taskstore import ERROR, OK, TaskStore
from photometry.hooks.errors import ConfigurationError
from photometry.hooks.settings import load_settings
from photometry.testing import fake_scene

DATA = Path(__file__).parent / "data"
TPF = DATA / "tess25155310-s01-first-cadences.fits.gz"
SOURCES = (FFICache, TPFSource, MemorySource)


def _protocol_methods():
    return {n: v for n, v in vars(DataSource).items()
            if inspect.isfunction(v) and not n.startswith("_")}


@pytest.mark.parametrize("cls", SOURCES, ids=lambda c: c.__name__)
def test_each_source_class_has_the_protocol_methods_and_signatures(cls):
    """Every method of the Protocol exists with its parameters first, in order and by name;
    what a source adds has a default (FFICache.stamp's ``frames``)."""
    for name, proto in _protocol_methods().items():
        impl = getattr(cls, name, None)
        assert callable(impl), f"{cls.__name__} has no method {name}"
        want = list(inspect.signature(proto).parameters)
        got = list(inspect.signature(impl).parameters.values())
        assert [p.name for p in got[:len(want)]] == want, (cls.__name__, name)
        extra = [p.name for p in got[len(want):] if p.default is inspect.Parameter.empty
                 and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert not extra, f"{cls.__name__}.{name} needs {extra} the core does not pass"


def _small_cache(tmp_path):
    from photometry.data.cache import CacheWriter, cache_filename, catalog_filename
    settings = load_settings()
    rng = np.random.default_rng(1)
    shape, n = (12, 14), 4
    meta = {"sector": 1, "camera": 1, "ccd": 1, "cadence": 1800, "data_rel": 0,
            "procver": "test", "row_offset": 0, "column_offset": 44}
    path = tmp_path / cache_filename(1, 1, 1)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval, wcs.wcs.crpix, wcs.wcs.cdelt = [80.0, -70.0], [7.0, 6.0], [-0.0058, 0.0058]
    text = wcs.to_header().tostring(sep="\n")
    writer = CacheWriter(path, settings, ffi_files=[f"f{i}.fits" for i in range(n)],
                         shape=shape, meta=meta)
    for i in range(n):
        writer.add_frame((100 + rng.standard_normal(shape)).astype(np.float32),
                         np.ones(shape, np.float32), time=1325.0 + i / 48,
                         time_start=1325.0 + i / 48 - 0.01, time_stop=1325.0 + i / 48 + 0.01,
                         timecorr=0.0, cadenceno=i, quality=0, wcs_header=text)
    writer.finish_ingest()
    writer.close(complete=True)
    with sqlite3.connect(tmp_path / catalog_filename(1, 1, 1)) as conn:   # its catalog
        conn.execute("CREATE TABLE catalog (starid INTEGER PRIMARY KEY, ra REAL, dec REAL, "
                     "tmag REAL, row REAL, column REAL)")
        conn.execute("INSERT INTO catalog VALUES (1, 80.0, -70.0, 10.0, 5.0, 50.0)")
    return path


def test_every_built_in_source_is_a_data_source(tmp_path):
    """isinstance on open sources of each kind (the fake source of photometry.testing too);
    a source without a catalog SQLite gives catalog_table()."""
    fake, _ = fake_scene()
    with FFICache(_small_cache(tmp_path)) as cache:
        sources = [cache, TPFSource(TPF), fake]
        for src in sources:
            assert isinstance(src, DataSource), type(src).__name__
            assert len(src.time) == len(src.quality) == len(src.cadenceno) == src.n_frames
            cube = src.stamp("images", slice(0, 2), slice(0, 3))
            assert cube.shape == (src.n_frames, 2, 3)
            if src.catalog_path is None:
                assert len(src.catalog_table()) >= 1
            else:
                assert Path(src.catalog_path).is_file()
        assert cache.datasource == "ffi" and sources[1].datasource == "tpf"


def test_a_source_missing_a_member_is_not_a_data_source():
    fake, _ = fake_scene()

    class NoStamp:
        pass

    partial = NoStamp()
    for name in ("datasource", "sector", "camera", "ccd", "cadence", "n_frames", "time",
                 "timecorr", "cadenceno", "quality", "row_offset", "column_offset",
                 "sumimage", "reference_wcs", "movement_kernel", "catalog_path"):
        setattr(partial, name, getattr(fake, name))
    partial.model_group = fake.model_group
    assert not isinstance(partial, DataSource)
    partial.stamp = fake.stamp
    assert isinstance(partial, DataSource)


def _cbv_like(path, name="CBV.single-scale.1.1"):
    cols = [fits.Column("TIME", "D", array=np.array([1.0, 2.0, np.nan])),
            fits.Column("GAP", "L", array=np.array([False, True, False])),
            fits.Column("COEFF", "2D", array=np.arange(6.0).reshape(3, 2)),
            fits.Column("CADENCENO", "J", array=np.array([7, 8, 9], np.int32))]
    table = fits.BinTableHDU.from_columns(cols, name=name)
    table.header["NNEIGHB"] = 5
    primary = fits.PrimaryHDU()
    primary.header["SECTOR"] = 3
    fits.HDUList([primary, table]).writeto(path)


def test_fits_tables_hold_the_columns_as_astropy_reads_them(tmp_path):
    path = tmp_path / "x-s0003-1-1-a.fits"
    _cbv_like(path)
    tables = read_fits_tables(path)
    assert tables.path == path and tables.header["SECTOR"] == 3
    assert "cbv.SINGLE-scale.1.1" in tables and "PRIOR" not in tables      # any case
    t = tables.table("CBV.single-scale.1.1")
    assert t["GAP"].dtype == bool and t["GAP"].tolist() == [False, True, False]
    np.testing.assert_array_equal(t["COEFF"], np.arange(6.0).reshape(3, 2))
    np.testing.assert_array_equal(t["TIME"], [1.0, 2.0, np.nan])
    assert t["CADENCENO"].tolist() == [7, 8, 9]
    assert tables.headers["CBV.SINGLE-SCALE.1.1"]["NNEIGHB"] == 5


def test_input_files_are_found_by_the_core(tmp_path):
    for name in ("b-s0003-1-1-x.fits", "a-s0003-1-1-x.fits", "a-s0003-1-2-x.fits"):
        (tmp_path / name).write_bytes(b"")
    spec = InputFile(str(tmp_path), "*s0003-1-1-*.fits*", "cbv.spoc_cbv_dir")
    assert find_input_file(spec) == tmp_path / "a-s0003-1-1-x.fits"      # first, sorted
    assert find_input_file(InputFile(str(tmp_path), "*s0004-*")) is None
    with pytest.raises(ConfigurationError, match=r"cbv.spoc_cbv_dir = '.*nope': no such"):
        find_input_file(InputFile(str(tmp_path / "nope"), "*", "cbv.spoc_cbv_dir"))


def test_product_folder_reads_one_product_by_name(tmp_path):
    _cbv_like(tmp_path / "p_cbv.fits")
    folder = ProductFolder(tmp_path)
    assert folder.get("missing.fits") is None
    assert "CBV.SINGLE-SCALE.1.1" in folder.get("p_cbv.fits")


def _task(priority, tmag):
    return {"priority": priority, "starid": 100 + priority, "sector": 1, "camera": 1, "ccd": 1,
            "cadence": 1800, "datasource": "ffi", "tmag": tmag, "method": None,
            "row": 10.0 * priority, "column": 50.0, "edge_distance": 5.0, "stamp_rows": 15,
            "stamp_cols": 15, "cache": "sector0001_camera1_ccd1.hdf5"}


def test_output_results_of_one_folder(tmp_path):
    """The one query of the summary table and the light-curve correction: a folder's
    results (one with no folder yet counts), kept ones with a light curve, in two orders."""
    a, b = tmp_path / "a", tmp_path / "b"
    with TaskStore(tmp_path / "todo.sqlite", create=True) as store:
        store.add_tasks([_task(1, 9.0), _task(2, 8.0), _task(3, 10.0)])
        store.plan(method="m", output=a)
        got = store.claim("o", n=2, output=a)       # priorities 1 and 2
        store.save_results([{"priority": t["priority"], "method": "m", "elaptime": 0.0,
                             "status": OK if t["priority"] == 1 else ERROR,
                             "lightcurve": f"lc{t['priority']}.fits"} for t in got], owner="o")
        store.plan(method="k", output=b)
        other = store.claim("p", n=1, output=b)
        store.save_results([{"priority": other[0]["priority"], "method": "k", "elaptime": 0.0,
                             "status": OK, "lightcurve": "k.fits"}], owner="p")
        rows = store.output_results(a)
        kept = store.output_results(a, kept=True, order="method")
        everything_b = store.output_results(b)
    # folder a, by Tmag then method: TIC 101's "k" result (folder b's run) is left out, the
    # pending ones (no folder yet) count
    assert [(r["starid"], r["method"], r["status"], r["lightcurve"]) for r in rows] == [
        (102, "k", None, None), (102, "m", ERROR, None), (101, "m", OK, "lc1.fits"),
        (103, "k", None, None), (103, "m", None, None)]
    assert [(r["starid"], r["method"], r["lightcurve"]) for r in kept] == [(101, "m", "lc1.fits")]
    assert [(r["starid"], r["method"]) for r in everything_b if r["status"] == OK] == [(101, "k")]
    assert set(kept[0]) == set(TaskStore.OUTPUT_COLUMNS)
