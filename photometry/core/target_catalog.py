"""The catalog behind a data source, as the core reads it for one target: the target's row
and the stars near its stamp, from the catalog SQLite next to a cache (read-only) or the
source's own in-memory table (TPF, memory sources). The one place the core runs catalog SQL."""
import sqlite3

import numpy as np
from astropy.table import Table

from photometry.hooks.errors import UnprocessableTarget

__all__ = ["query_catalog", "read_target", "stamp_catalog"]


def query_catalog(phot, where, params):
    """Rows of the source's catalog matching an SQL condition, as an astropy Table."""
    path = getattr(phot.source, "catalog_path", None)
    if path is not None:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(f"SELECT * FROM catalog WHERE {where}", params).fetchall()
        names = rows[0].keys() if rows else ["starid", "ra", "dec", "tmag", "row", "column"]
        table = Table(rows=[tuple(r) for r in rows] if rows else None, names=list(names))
        return table
    table = phot.source.catalog_table()
    mask = _evaluate_where(table, where, params)
    return table[mask]


def read_target(phot):
    rows = phot._query_catalog("starid = ?", (phot.starid,))
    if len(rows) == 0:
        raise UnprocessableTarget(
            f"TIC {phot.starid}: not in the catalog of sector {phot.sector} camera "
            f"{phot.camera} CCD {phot.ccd}")
    row = rows[0]
    target = {"starid": phot.starid}
    for key in ("ra", "dec", "tmag", "row", "column", "pmra", "pmdec", "teff",
                "ra_J2000", "dec_J2000"):
        value = row[key] if key in rows.colnames else None
        target[key] = None if value is None or np.ma.is_masked(value) else float(value)
    for key in ("ra_J2000", "dec_J2000"):
        if target[key] is None:
            target[key] = target[key.split("_")[0]]
    if target["tmag"] is None or not np.isfinite(target["tmag"]):
        raise UnprocessableTarget(f"TIC {phot.starid}: catalog has no Tmag")
    if target["row"] is None or target["column"] is None:
        raise UnprocessableTarget(f"TIC {phot.starid}: catalog has no pixel position")
    return target


def stamp_catalog(phot):
    """Stars whose reference position is within ``catalog_buffer`` px of the stamp.

    Columns ``starid, ra, dec, tmag, row, column`` (CCD 0-based, reference frame) and
    ``row_stamp, column_stamp`` (0-based in the stamp cube). Sorted by Tmag.
    """
    buf = float(phot.psettings["catalog_buffer"])
    r1, r2, c1, c2 = phot._stamp
    table = phot._query_catalog(
        '"row" >= ? AND "row" <= ? AND "column" >= ? AND "column" <= ?',
        (r1 - 0.5 - buf, r2 - 0.5 + buf, c1 - 0.5 - buf, c2 - 0.5 + buf))
    out = Table()
    out["starid"] = np.asarray(table["starid"], dtype=np.int64)
    for key in ("ra", "dec", "tmag", "row", "column"):
        out[key] = np.asarray(table[key], dtype=float)
    out["row_stamp"] = out["row"] - r1
    out["column_stamp"] = out["column"] - c1
    out.sort("tmag")
    return out


def _evaluate_where(table, where, params):
    """Evaluate the two SQL conditions BasePhotometry uses against an in-memory Table."""
    if where.startswith("starid"):
        return np.asarray(table["starid"]) == params[0]
    row = np.asarray(table["row"], dtype=float)
    col = np.asarray(table["column"], dtype=float)
    return (row >= params[0]) & (row <= params[1]) & (col >= params[2]) & (col <= params[3])
