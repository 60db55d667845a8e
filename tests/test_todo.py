"""``tessphot todo``: target selection, priorities and geometry from a cache + its catalog."""
import sqlite3

import h5py
import numpy as np
import pytest

from photometry.hooks.errors import InputError
from photometry.core.stamps import default_stamp_size as scalar_stamp_size
from photometry.data.taskstore import TaskStore
from photometry.scheduler.todo import default_stamp_size, make_todo


def make_fake_ccd(folder, sector=1, camera=1, ccd=4, rows=64, cols=64, row_offset=0,
                  column_offset=44, stars=None, cadence=1800, complete=True, seed=0,
                  n_stars=50):
    """A cache with the attributes and image shape ``todo`` reads, and its catalog SQLite.

    ``stars``: list of (starid, tmag, row, column); random ones if None.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if stars is None:
        rng = np.random.default_rng(seed)
        ids = 1000 * sector + 100000 * camera + 10000 * ccd + np.arange(n_stars)
        tmag = rng.uniform(6, 16, n_stars)
        row = rng.uniform(row_offset - 5, row_offset + rows + 5, n_stars)
        col = rng.uniform(column_offset - 5, column_offset + cols + 5, n_stars)
        stars = list(zip(ids.tolist(), tmag.tolist(), row.tolist(), col.tolist()))
    path = folder / f"sector{sector:04d}_camera{camera}_ccd{ccd}.hdf5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("images", shape=(3, rows, cols), dtype="f4")
        for key, value in dict(schema_version=1, sector=sector, camera=camera, ccd=ccd,
                               cadence=cadence, row_offset=row_offset,
                               column_offset=column_offset, complete=complete).items():
            h5.attrs[key] = value
    cat = folder / f"catalog_sector{sector:04d}_camera{camera}_ccd{ccd}.sqlite"
    cat.unlink(missing_ok=True)
    con = sqlite3.connect(cat)
    con.execute('CREATE TABLE catalog (starid INTEGER PRIMARY KEY, ra REAL, dec REAL, '
                'tmag REAL, "row" REAL, "column" REAL)')
    con.executemany("INSERT INTO catalog VALUES (?, 0, 0, ?, ?, ?)", stars)
    con.commit()
    con.close()
    return path


def test_selection_priority_and_geometry(tmp_path):
    stars = [(1, 12.0, 10.0, 50.0),      # on silicon
             (2, 9.0, -0.6, 50.0),       # just above the first row: off
             (3, 14.9, 63.4, 107.4),     # last pixel (rows 0-63, columns 44-107): on
             (4, 15.1, 20.0, 60.0),      # too faint
             (5, 3.2, 30.0, 43.4),       # left of the science area (collateral): off
             (6, 3.2, 30.0, 44.0)]       # bright, on
    make_fake_ccd(tmp_path, stars=stars)
    path, n = make_todo(tmp_path, faint_limit=15)
    assert n == 3
    with TaskStore(path) as store:
        rows = list(store.db.query("SELECT * FROM todolist ORDER BY priority"))
    assert [r["starid"] for r in rows] == [6, 1, 3]       # brightest first
    assert [r["priority"] for r in rows] == [1, 2, 3]
    assert all(r["method"] is None for r in rows) and "status" not in rows[0]
    assert rows[0]["edge_distance"] == pytest.approx(0.5)  # column 44.0 vs edge at 43.5
    assert rows[1]["edge_distance"] == pytest.approx(min(10.5, 53.5, 6.5, 57.5))
    assert rows[2]["edge_distance"] == pytest.approx(0.1)
    assert (rows[0]["stamp_rows"], rows[0]["stamp_cols"]) == (69, 45)  # TASOC table at 3.2
    assert (rows[1]["stamp_rows"], rows[1]["stamp_cols"]) == (15, 15)
    assert rows[0]["cache"] == "sector0001_camera1_ccd4.hdf5"
    assert (rows[0]["sector"], rows[0]["camera"], rows[0]["ccd"], rows[0]["cadence"],
            rows[0]["datasource"]) == (1, 1, 4, 1800, "ffi")


def test_stamp_size_matches_basephotometry():
    tmag = np.linspace(-1, 17, 200)
    rows, cols = default_stamp_size(tmag)
    for t, r, c in zip(tmag, rows, cols):
        assert (r, c) == scalar_stamp_size(t)


def test_several_ccds_global_priority_and_overwrite(tmp_path):
    make_fake_ccd(tmp_path, ccd=1, seed=1)
    make_fake_ccd(tmp_path, ccd=2, seed=2)
    make_fake_ccd(tmp_path, ccd=3, seed=3, complete=False)  # unfinished prepare: ignored
    path, n = make_todo(tmp_path, faint_limit=13)
    with TaskStore(path) as store:
        tmag = [r[0] for r in store.conn.execute("SELECT tmag FROM todolist ORDER BY priority")]
        ccds = {r[0] for r in store.conn.execute("SELECT DISTINCT ccd FROM todolist")}
    assert len(tmag) == n and tmag == sorted(tmag) and max(tmag) < 13
    assert ccds == {1, 2}
    with pytest.raises(InputError, match="exists"):
        make_todo(tmp_path)
    _, n2 = make_todo(tmp_path, faint_limit=16, overwrite=True)
    assert n2 > n
    assert not (tmp_path / "todo.sqlite.partial").exists()


def test_no_cache_is_input_error(tmp_path):
    with pytest.raises(InputError, match="no complete cache"):
        make_todo(tmp_path)


def test_cli_todo(tmp_path, capsys):
    """The command line in this process (a new interpreter costs seconds on the test machine;
    test_run.py starts ``tessphot run`` as a process where the scenario needs one)."""
    from photometry.cli import main
    make_fake_ccd(tmp_path, n_stars=30)
    assert main(["todo", str(tmp_path), "--faint-limit", "14"]) == 0
    out = capsys.readouterr().out
    with TaskStore(tmp_path / "todo.sqlite") as store:
        n = store.count()
    assert f"{n} tasks" in out and n > 0
    assert main(["todo", str(tmp_path)]) == 2
    assert "exists" in capsys.readouterr().err


def make_large_fake_ccd(path, n=200_000, seed=5):
    """A full-size fake CCD with ``n`` random catalog stars (Tmag 5-20), some off the edges;
    returns the (starid, tmag, row, column) tuples."""
    rng = np.random.default_rng(seed)
    stars = list(zip(range(1, n + 1), rng.uniform(5, 20, n).tolist(),
                     rng.uniform(-10, 2058, n).tolist(), rng.uniform(34, 2102, n).tolist()))
    make_fake_ccd(path, rows=2048, cols=2048, stars=stars)
    return stars


def test_large_ccd_is_fast(tmp_path):
    """200 000 catalog stars on one CCD: vectorised, a few seconds (benchmark has the figure)."""
    import time
    stars = make_large_fake_ccd(tmp_path)
    t0 = time.perf_counter()
    _, count = make_todo(tmp_path, faint_limit=15)
    assert time.perf_counter() - t0 < 30
    tmag = np.array([s[1] for s in stars])
    row = np.array([s[2] for s in stars])
    col = np.array([s[3] for s in stars])
    expected = np.sum((tmag < 15) & (row >= -0.5) & (row < 2047.5) & (col >= 43.5)
                      & (col < 2091.5))
    assert count == expected
