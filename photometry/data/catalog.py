"""Star catalogs: reading and validating user tables, proper motion, the per-CCD SQLite.

The user's catalog is any CSV, ECSV or FITS table with ``starid, ra, dec, tmag`` (and optionally
``pmra, pmdec, teff``); common spellings such as ``TICID``, ``RA``, ``Dec``, ``Tmag`` are
accepted, so target lists from MAST load as they are. ``prepare`` turns it into one SQLite file
per sector/camera/CCD holding only the stars on (or near) that CCD, with their positions moved
to the sector epoch and projected through the reference WCS, so that every photometry worker can
look up the stars of its stamp with one indexed query.

Conventions: ``ra``/``dec`` in degrees (ICRS); ``pmra`` is mu_alpha* = mu_alpha cos(dec) and
``pmdec`` mu_delta, both in mas/yr (the TIC and Gaia convention); epochs are Julian years.
"""
import os
import sqlite3
import warnings
from pathlib import Path

import numpy as np
from astropy.table import Table

from photometry.hooks.errors import InputError

__all__ = ["read_catalog", "apply_proper_motion", "btjd_to_epoch", "write_catalog_sqlite",
           "read_catalog_sqlite", "catalog_settings", "stars_in_box", "CATALOG_COLUMNS",
           "ALIASES"]

#: Columns of the catalog table returned by :func:`read_catalog`, in order.
CATALOG_COLUMNS = ("starid", "ra", "dec", "tmag", "pmra", "pmdec", "teff")

#: Accepted spellings of each column (compared case-insensitively), most preferred first.
ALIASES = {
    "starid": ("starid", "ticid", "tic_id", "tic", "id", "star_id"),
    "ra": ("ra", "ra_deg", "raj2000", "ra_j2000", "ra_icrs", "radeg"),
    "dec": ("dec", "decl", "de", "dec_deg", "dej2000", "decj2000", "dec_j2000", "de_icrs",
            "dedeg"),
    "tmag": ("tmag", "tessmag", "t_mag", "tess_mag"),
    "pmra": ("pmra", "pm_ra", "pmra_masyr"),
    "pmdec": ("pmdec", "pm_dec", "pmde", "pm_decl", "pmdecl", "pmdec_masyr"),
    "teff": ("teff", "t_eff"),
}
_REQUIRED = ("starid", "ra", "dec", "tmag")
_J2000_JD = 2451545.0
_BTJD_OFFSET = 2457000.0
_MAS_TO_RAD = np.pi / (180.0 * 3600.0 * 1000.0)


def _format_for(path):
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith((".csv", ".txt")):
        return "ascii.csv"
    if name.endswith(".ecsv"):
        return "ascii.ecsv"
    if name.endswith((".fits", ".fit", ".fts")):
        return "fits"
    raise InputError(f"{path}: unknown catalog format (use .csv, .ecsv or .fits)")


def _read_ecsv_fast(path):
    """The data of an ECSV file through astropy's C reader, or None to use the ECSV reader.

    Why: astropy's ECSV reader is pure Python (3.5 s for 200 000 rows, against 0.5 s for the
    same table as CSV). The columns we use are plain numbers, so the YAML header is needed only
    for the delimiter; anything unusual (multidimensional or typed columns) falls back.
    """
    if path.name.lower().endswith(".gz"):
        return None
    delimiter = " "
    with open(path, encoding="utf-8", errors="replace") as stream:
        first = stream.readline()
        if not first.startswith("# %ECSV"):
            return None
        for line in stream:
            if not line.startswith("#"):
                break
            text = line[1:].strip()
            if text.startswith("delimiter:"):
                delimiter = text.split(":", 1)[1].strip().strip("'\"") or " "
            if "subtype" in text:
                return None
    try:
        return Table.read(path, format="ascii.fast_basic", delimiter=delimiter, comment="#",
                          guess=False)
    except Exception:  # noqa: BLE001 - the full ECSV reader gives the real error message
        return None


def _numeric(table, name, path, what):
    column = table[name]
    mask = np.asarray(getattr(column, "mask", np.zeros(len(column), bool)), dtype=bool)
    try:
        values = np.asarray(np.ma.getdata(column), dtype=np.float64)
    except (TypeError, ValueError):
        raw = np.ma.getdata(column)
        for value in raw:
            try:
                float(value)
            except (TypeError, ValueError):
                raise InputError(f"{path}: column '{name}' ({what}) holds non-numeric value "
                                 f"{str(value)!r}") from None
        values = np.asarray(raw, dtype=np.float64)
    values = values.copy()
    values[mask] = np.nan
    return values


def read_catalog(path):
    """Read and validate a star catalog table.

    Parameters
    ----------
    path : str or Path
        ``.csv`` (lines starting with ``#`` are comments), ``.ecsv`` or ``.fits`` (each
        optionally ``.gz``).

    Returns
    -------
    astropy.table.Table
        Columns :data:`CATALOG_COLUMNS`: ``starid`` int64, the rest float64; missing ``pmra``/
        ``pmdec`` are 0, missing ``teff`` NaN. ``meta['source']`` is the path.

    Raises
    ------
    InputError
        Unreadable file, missing required column(s) (all named), non-numeric or duplicate
        ``starid``, non-numeric coordinates or magnitudes, no usable rows.

    Warns
    -----
    UserWarning
        When rows with NaN ``ra``/``dec``/``tmag`` are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: catalog file not found")
    fmt = _format_for(path)
    kwargs = {"comment": "#"} if fmt == "ascii.csv" else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = _read_ecsv_fast(path) if fmt == "ascii.ecsv" else None
            if table is None:
                table = Table.read(path, format=fmt, **kwargs)
    except Exception as exc:  # astropy raises many types for malformed tables
        message = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InputError(f"{path}: cannot read the catalog as {fmt} ({message})") from None

    lower = {}
    for name in table.colnames:
        lower.setdefault(name.strip().lower(), name)
    found = {}
    for canonical, spellings in ALIASES.items():
        for spelling in spellings:
            if spelling in lower:
                found[canonical] = lower[spelling]
                break
    missing = [c for c in _REQUIRED if c not in found]
    if missing:
        raise InputError(f"{path}: catalog has no column {', '.join(repr(m) for m in missing)} "
                         f"(columns: {', '.join(table.colnames)})")
    if len(table) == 0:
        raise InputError(f"{path}: catalog has no rows")

    starid_col = table[found["starid"]]
    if getattr(starid_col, "mask", None) is not None and np.any(starid_col.mask):
        raise InputError(f"{path}: column '{found['starid']}' (starid) has empty values")
    starid_f = _numeric(table, found["starid"], path, "starid")
    if np.issubdtype(np.asarray(starid_col).dtype, np.integer):
        starid = np.asarray(starid_col, dtype=np.int64)
    else:
        bad = ~np.isfinite(starid_f) | (starid_f != np.round(starid_f))
        if np.any(bad):
            raise InputError(f"{path}: column '{found['starid']}' (starid) holds non-integer "
                             f"value {str(starid_col[np.argmax(bad)])!r}")
        starid = starid_f.astype(np.int64)
    unique, counts = np.unique(starid, return_counts=True)
    if np.any(counts > 1):
        dup = unique[counts > 1]
        raise InputError(f"{path}: duplicate starid {', '.join(map(str, dup[:5]))}"
                         f"{' ...' if len(dup) > 5 else ''} ({len(dup)} duplicated)")

    out = Table(meta={"source": str(path)})
    out["starid"] = starid
    for name in ("ra", "dec", "tmag"):
        out[name] = _numeric(table, found[name], path, name)
    for name, fill in (("pmra", 0.0), ("pmdec", 0.0), ("teff", np.nan)):
        if name in found:
            values = _numeric(table, found[name], path, name)
            if name != "teff":
                values[~np.isfinite(values)] = 0.0
            out[name] = values
        else:
            out[name] = np.full(len(out), fill)

    bad = ~(np.isfinite(out["ra"]) & np.isfinite(out["dec"]) & np.isfinite(out["tmag"]))
    if np.any(bad):
        warnings.warn(f"{path}: dropped {int(bad.sum())} of {len(out)} rows with NaN ra, dec or "
                      f"tmag (first starid {out['starid'][np.argmax(bad)]})", stacklevel=2)
        out = out[~bad]
    if len(out) == 0:
        raise InputError(f"{path}: catalog has no rows with finite ra, dec and tmag")
    dec = np.asarray(out["dec"])
    if np.any(np.abs(dec) > 90):
        i = int(np.argmax(np.abs(dec) > 90))
        raise InputError(f"{path}: dec {dec[i]} of starid {out['starid'][i]} is outside "
                         "[-90, 90] degrees")
    out["ra"] = np.mod(out["ra"], 360.0)
    return out


def btjd_to_epoch(btjd):
    """Julian epoch (decimal year, e.g. 2018.56) of a BTJD: proper motions are per Julian year."""
    return 2000.0 + (np.asarray(btjd, dtype=np.float64) + _BTJD_OFFSET - _J2000_JD) / 365.25


def apply_proper_motion(ra, dec, pmra, pmdec, from_epoch=2000.0, to_epoch=None):
    """Move positions by their proper motion, rigorously (valid at the poles and across RA 0).

    The star moves on a straight line in space at constant velocity (no parallax or radial
    velocity in the catalog, so the same model as ERFA ``pmsafe`` with those set to zero): the
    unit vector moves by ``dt * (pmra * e_alpha + pmdec * e_delta)`` and is renormalised. A
    small-angle ``ra + pmra / cos(dec)`` update instead blows up near the poles.

    Parameters
    ----------
    ra, dec : array_like
        Degrees at ``from_epoch``.
    pmra, pmdec : array_like
        mas/yr; ``pmra`` includes the cos(dec) factor. NaN counts as 0.
    from_epoch, to_epoch : float
        Julian years.

    Returns
    -------
    ra, dec : ndarray
        Degrees at ``to_epoch``, ``ra`` in [0, 360).
    """
    if to_epoch is None:
        raise TypeError("apply_proper_motion() needs to_epoch")
    ra = np.radians(np.asarray(ra, dtype=np.float64))
    dec = np.radians(np.asarray(dec, dtype=np.float64))
    dt = float(to_epoch) - float(from_epoch)
    mu_a = np.nan_to_num(np.asarray(pmra, dtype=np.float64)) * (_MAS_TO_RAD * dt)
    mu_d = np.nan_to_num(np.asarray(pmdec, dtype=np.float64)) * (_MAS_TO_RAD * dt)
    sa, ca = np.sin(ra), np.cos(ra)
    sd, cd = np.sin(dec), np.cos(dec)
    x = cd * ca - mu_a * sa - mu_d * sd * ca
    y = cd * sa + mu_a * ca - mu_d * sd * sa
    z = sd + mu_d * cd
    ra_out = np.mod(np.degrees(np.arctan2(y, x)), 360.0)
    dec_out = np.degrees(np.arctan2(z, np.hypot(x, y)))
    return ra_out, dec_out


def _unit(ra_deg, dec_deg):
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)], axis=-1)


def _footprint_cone(wcs, shape, margin):
    """Centre (unit vector) and cos(radius) of a cone holding the margin-expanded footprint."""
    nrows, ncols = shape
    lo_x, hi_x = -0.5 - margin, ncols - 0.5 + margin
    lo_y, hi_y = -0.5 - margin, nrows - 0.5 + margin
    t = np.linspace(0.0, 1.0, 65)
    x = np.concatenate([lo_x + (hi_x - lo_x) * t, np.full_like(t, hi_x),
                        hi_x - (hi_x - lo_x) * t, np.full_like(t, lo_x)])
    y = np.concatenate([np.full_like(t, lo_y), lo_y + (hi_y - lo_y) * t,
                        np.full_like(t, hi_y), hi_y - (hi_y - lo_y) * t])
    ra, dec = wcs.all_pix2world(x, y, 0)
    ra_c, dec_c = wcs.all_pix2world([(lo_x + hi_x) / 2], [(lo_y + hi_y) / 2], 0)
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        raise InputError("reference WCS maps the CCD footprint to non-finite sky positions")
    centre = _unit(ra_c, dec_c)[0]
    cosines = _unit(ra, dec) @ centre
    radius = np.arccos(np.clip(cosines.min(), -1.0, 1.0))
    # edges bulge between the samples (SIP); pad by 2 % and about two pixels (TESS 21"/px)
    scale = np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))
    radius = min(np.pi, radius * 1.02 + np.radians(2.0 * scale))
    return centre, np.cos(radius)


def _column(table, name, fill=None):
    """A float column of ``table``, or ``fill`` everywhere when it is absent and optional."""
    if name in table.colnames:
        return np.asarray(np.ma.filled(table[name], np.nan), dtype=np.float64)
    if fill is None:
        raise InputError(f"catalog table has no column '{name}'")
    return np.full(len(table), fill, dtype=np.float64)


def write_catalog_sqlite(table, path, wcs, row_offset, column_offset, shape, sector, camera, ccd,
                         reference_time, margin):
    """Write the per-CCD catalog SQLite (schema in ``docs/architecture.md``), atomically.

    Parameters
    ----------
    table : astropy.table.Table
        From :func:`read_catalog` (J2000 positions).
    path : str or Path
        Output file; written as ``<path>.partial`` and renamed.
    wcs : astropy.wcs.WCS
        Reference-frame WCS for science-region 0-based pixels (``FFIFrame.wcs``).
    row_offset, column_offset : int
        0-based CCD position of science pixel [0, 0].
    shape : (int, int)
        Science region (rows, columns).
    sector, camera, ccd : int
    reference_time : float
        BTJD of the reference frame; positions are moved to this epoch before projecting.
    margin : float
        Keep stars up to this many pixels outside the science region (their light still falls on
        it).

    Returns
    -------
    int
        Number of stars written.
    """
    import sqlite_utils

    path = Path(path)
    nrows, ncols = int(shape[0]), int(shape[1])
    epoch = float(btjd_to_epoch(reference_time))
    ra0 = _column(table, "ra")
    dec0 = _column(table, "dec")
    pmra = np.nan_to_num(_column(table, "pmra", 0.0))
    pmdec = np.nan_to_num(_column(table, "pmdec", 0.0))
    teff = _column(table, "teff", np.nan)

    # Cheap cone on the sky first, on the J2000 positions with each star's cone widened by how
    # far it moves by the epoch; then proper motion and the exact (SIP) projection of the
    # survivors only.
    centre, cos_radius = _footprint_cone(wcs, (nrows, ncols), margin)
    motion = np.hypot(pmra, pmdec) * abs(epoch - 2000.0)
    pad = np.radians(np.minimum(motion / 3.6e6, 5.0))
    cosines = _unit(ra0, dec0) @ centre
    near = np.flatnonzero(np.arccos(np.clip(cosines, -1.0, 1.0))
                          <= np.arccos(cos_radius) + pad)
    ra, dec = apply_proper_motion(ra0[near], dec0[near], pmra[near], pmdec[near], 2000.0, epoch)
    if len(near):
        x, y = wcs.all_world2pix(ra, dec, 0, tolerance=1e-5, maxiter=50, quiet=True)
    else:
        x = y = np.empty(0)
    keep = (np.isfinite(x) & np.isfinite(y)
            & (x >= -0.5 - margin) & (x <= ncols - 0.5 + margin)
            & (y >= -0.5 - margin) & (y <= nrows - 0.5 + margin))
    idx = near[keep]
    rows = list(zip(np.asarray(table["starid"], dtype=np.int64)[idx].tolist(),
                    ra[keep].tolist(), dec[keep].tolist(), ra0[idx].tolist(), dec0[idx].tolist(),
                    pmra[idx].tolist(), pmdec[idx].tolist(),
                    np.asarray(table["tmag"], dtype=np.float64)[idx].tolist(),
                    teff[idx].tolist(),
                    (y[keep] + row_offset).tolist(), (x[keep] + column_offset).tolist()))
    # NaN teff is stored as NULL by sqlite3 itself.

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        tmp.unlink()
    try:
        db = sqlite_utils.Database(tmp)
        db.conn.execute("PRAGMA journal_mode=OFF")
        db.conn.execute("PRAGMA synchronous=OFF")
        catalog = db.create_table("catalog", {
            "starid": int, "ra": float, "dec": float, "ra_J2000": float, "dec_J2000": float,
            "pmra": float, "pmdec": float, "tmag": float, "teff": float, "row": float,
            "column": float}, pk="starid", not_null=["ra", "dec", "tmag", "row", "column"])
        with db.conn:
            db.conn.executemany(
                'INSERT INTO catalog (starid, ra, dec, ra_J2000, dec_J2000, pmra, pmdec, tmag, '
                'teff, "row", "column") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)', rows)
        catalog.create_index(["tmag"], index_name="catalog_tmag_idx")
        catalog.create_index(["row", "column"], index_name="catalog_row_column_idx")
        db.create_table("settings", {"sector": int, "camera": int, "ccd": int,
                                     "reference_time": float, "epoch": float, "margin": float,
                                     "row_offset": int, "column_offset": int, "rows": int,
                                     "columns": int})
        db["settings"].insert({"sector": int(sector), "camera": int(camera), "ccd": int(ccd),
                               "reference_time": float(reference_time), "epoch": epoch,
                               "margin": float(margin), "row_offset": int(row_offset),
                               "column_offset": int(column_offset), "rows": nrows,
                               "columns": ncols})
        db.conn.execute("ANALYZE")
        db.conn.close()
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return len(rows)


def _connect(path_or_conn):
    """(connection, close_when_done) from a path, sqlite3 connection or sqlite-utils Database."""
    if isinstance(path_or_conn, sqlite3.Connection):
        return path_or_conn, False
    if hasattr(path_or_conn, "conn") and isinstance(path_or_conn.conn, sqlite3.Connection):
        return path_or_conn.conn, False
    path = Path(path_or_conn)
    if not path.is_file():
        raise InputError(f"{path}: catalog SQLite file not found")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True), True


_SELECT = ('SELECT starid, ra, dec, ra_J2000, dec_J2000, pmra, pmdec, tmag, teff, "row", '
           '"column" FROM catalog')
_NAMES = ("starid", "ra", "dec", "ra_J2000", "dec_J2000", "pmra", "pmdec", "tmag", "teff",
          "row", "column")


def _to_table(records, meta=None):
    out = Table(meta=meta or {})
    data = list(zip(*records)) if records else [()] * len(_NAMES)
    for name, values in zip(_NAMES, data):
        if name == "starid":
            out[name] = np.asarray(values, dtype=np.int64)
        else:
            out[name] = np.array(values, dtype=np.float64)  # NULL (None) -> NaN
    return out


def catalog_settings(path_or_conn):
    """The ``settings`` row of a catalog SQLite, as a dict."""
    conn, close = _connect(path_or_conn)
    try:
        cursor = conn.execute("SELECT * FROM settings")
        names = [d[0] for d in cursor.description]
        row = cursor.fetchone()
    except sqlite3.DatabaseError as exc:
        raise InputError(f"{path_or_conn}: not a catalog SQLite file ({exc})") from None
    finally:
        if close:
            conn.close()
    if row is None:
        raise InputError(f"{path_or_conn}: catalog SQLite has an empty settings table")
    return dict(zip(names, row))


def read_catalog_sqlite(path_or_conn, tmag_max=None):
    """All stars of a catalog SQLite (optionally only those brighter than ``tmag_max``).

    ``meta`` holds the ``settings`` row; positions are 0-based CCD ``row``/``column``.
    """
    conn, close = _connect(path_or_conn)
    try:
        meta = catalog_settings(conn)
        if tmag_max is None:
            records = conn.execute(_SELECT + " ORDER BY starid").fetchall()
        else:
            records = conn.execute(_SELECT + " WHERE tmag <= ? ORDER BY starid",
                                   (float(tmag_max),)).fetchall()
    except sqlite3.DatabaseError as exc:
        raise InputError(f"{path_or_conn}: not a catalog SQLite file ({exc})") from None
    finally:
        if close:
            conn.close()
    return _to_table(records, meta)


def stars_in_box(path_or_conn, row_min, row_max, col_min, col_max, tmag_max=None):
    """Stars whose reference-frame CCD position lies in a pixel box (bounds inclusive).

    Why a function: BasePhotometry needs the stars around each stamp, thousands of times per
    CCD; this is one query on the (row, column) index instead of loading the whole catalog.
    """
    conn, close = _connect(path_or_conn)
    sql = _SELECT + ' WHERE "row" BETWEEN ? AND ? AND "column" BETWEEN ? AND ?'
    args = [float(row_min), float(row_max), float(col_min), float(col_max)]
    if tmag_max is not None:
        sql += " AND tmag <= ?"
        args.append(float(tmag_max))
    try:
        records = conn.execute(sql + " ORDER BY tmag", args).fetchall()
    except sqlite3.DatabaseError as exc:
        raise InputError(f"{path_or_conn}: not a catalog SQLite file ({exc})") from None
    finally:
        if close:
            conn.close()
    return _to_table(records)
