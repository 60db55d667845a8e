"""``tessphot todo CACHE_DIR``: the task list ``CACHE_DIR/todo.sqlite``.

One task per (starid, sector, camera, ccd, cadence, datasource) for every catalog star whose
reference position lies on the science area of a prepared cache and that is brighter than the
faint limit. Priority 1 is the brightest star over all caches, so a run that is stopped early has
done the most valuable targets.

Why the geometry is stored per task: the run filters on it, ``status`` reports on it, and
workers need not recompute it; and computing it here is one vectorised pass per CCD (TASOC
projected each star through the WCS in a Python loop).
"""
import logging
import re
import time
from pathlib import Path

import h5py
import numpy as np

from photometry.hooks.commandline import add_settings_arguments
from photometry.core.crowding import cache_crowding
from photometry.hooks.errors import InputError
from photometry.hooks.settings import load_settings
from photometry.core.stamps import STAMP_TABLE
from photometry.data.taskstore import TODO_COLUMNS, TODO_NAME, TaskStore

__all__ = ["add_arguments", "run", "make_todo", "find_caches", "default_stamp_size",
           "TODO_NAME"]

logger = logging.getLogger(__name__)
CACHE_PATTERN = re.compile(r"^sector(\d{4})_camera(\d)_ccd(\d)\.hdf5$")

def default_stamp_size(tmag, settings=None):
    """Vectorised :func:`photometry.core.stamps.default_stamp_size`: (rows, columns) arrays, odd,
    from the TASOC table, ``photometry.stamp_scale`` and ``photometry.stamp_min_size``."""
    settings = settings or {}
    minimum = int(settings.get("stamp_min_size", 15))
    scale = float(settings.get("stamp_scale", 1.0))
    tmag = np.asarray(tmag, dtype=float)
    sizes = []
    for col in (1, 2):
        n = np.ceil(np.interp(tmag, STAMP_TABLE[:, 0], STAMP_TABLE[:, col]) * scale)
        n = np.maximum(n.astype(np.int64), minimum)
        sizes.append(2 * (n // 2) + 1)
    return sizes[0], sizes[1]


def add_arguments(parser):
    parser.add_argument("cache_dir", metavar="CACHE_DIR", help="folder of prepared caches")
    parser.add_argument("--faint-limit", type=float, default=None, metavar="MAG",
                        help="faintest Tmag to include")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing todo.sqlite (its results are lost)")
    add_settings_arguments(parser)


def run(args):
    extra = {} if args.faint_limit is None else {"scheduler": {"faint_limit": args.faint_limit}}
    settings = load_settings(args.settings, args.assignments, extra=extra,
                             extra_origin="--faint-limit")
    limit = settings["scheduler"]["faint_limit"]
    t0 = time.perf_counter()
    path, n = make_todo(args.cache_dir, faint_limit=limit, overwrite=args.overwrite,
                        settings=settings)
    print(f"{path}: {n} tasks ({time.perf_counter() - t0:.1f} s)")
    return 0


def find_caches(cache_dir):
    """The complete caches in ``cache_dir``: list of (path, attributes dict)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise InputError(f"{cache_dir}: not a folder" if cache_dir.exists()
                         else f"{cache_dir}: cache folder not found")
    caches = []
    for path in sorted(cache_dir.iterdir()):
        if not CACHE_PATTERN.match(path.name):
            continue
        try:
            with h5py.File(path, "r") as h5:
                attrs = dict(h5.attrs)
                shape = h5["images"].shape if "images" in h5 else None
        except OSError as exc:
            raise InputError(f"{path}: not a readable HDF5 cache ({exc})") from None
        if not attrs.get("complete", False):
            logger.warning("%s: cache is incomplete (prepare did not finish); skipped", path)
            continue
        if shape is None or len(shape) != 3:
            raise InputError(f"{path}: cache has no 'images' cube")
        try:
            info = {"path": path, "name": path.name, "sector": int(attrs["sector"]),
                    "camera": int(attrs["camera"]), "ccd": int(attrs["ccd"]),
                    "cadence": int(round(float(attrs["cadence"]))),
                    "row_offset": int(attrs.get("row_offset", 0)),
                    "column_offset": int(attrs.get("column_offset", 44)),
                    "rows": int(shape[1]), "cols": int(shape[2])}
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: cache attribute {exc} missing or not a number "
                             "(not made by 'tessphot prepare'?)") from None
        caches.append(info)
    if not caches:
        raise InputError(f"{cache_dir}: no complete cache sectorSSSS_cameraC_ccdD.hdf5 "
                         "(run 'tessphot prepare' first)")
    return caches


def _catalog_path(info):
    return info["path"].with_name(
        f"catalog_sector{info['sector']:04d}_camera{info['camera']}_ccd{info['ccd']}.sqlite")


def _read_catalog(path, faint_limit):
    import sqlite3
    if not path.is_file():
        raise InputError(f"{path}: catalog of the cache not found")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = con.execute('SELECT starid, tmag, "row", "column" FROM catalog '
                               "WHERE tmag < ?", (faint_limit,)).fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise InputError(f"{path}: not a catalog SQLite ({exc})") from None
    if not rows:
        return (np.zeros(0, np.int64),) + (np.zeros(0),) * 3
    table = np.array(rows, dtype=float)  # NULL -> NaN; TIC ids are exact in float64
    return (table[:, 0].astype(np.int64), table[:, 1].copy(), table[:, 2].copy(),
            table[:, 3].copy())


def targets_for_cache(info, faint_limit, stamp_settings=None):
    """Vectorised selection of one CCD's targets: dict of column arrays (no priority yet;
    the columns that are the same for the whole CCD come from ``info``)."""
    starid, tmag, row, col = _read_catalog(_catalog_path(info), faint_limit)
    r0, c0 = info["row_offset"], info["column_offset"]
    # distance from the pixel centre position to the science-area border (pixel edges at -0.5)
    d_top, d_bottom = row - (r0 - 0.5), (r0 + info["rows"] - 0.5) - row
    d_left, d_right = col - (c0 - 0.5), (c0 + info["cols"] - 0.5) - col
    edge = np.minimum(np.minimum(d_top, d_bottom), np.minimum(d_left, d_right))
    keep = np.isfinite(edge) & (edge > 0) & np.isfinite(tmag)
    stamp_rows, stamp_cols = default_stamp_size(tmag[keep], stamp_settings)
    return {"starid": starid[keep], "tmag": tmag[keep], "row": row[keep], "column": col[keep],
            "edge_distance": edge[keep], "stamp_rows": stamp_rows, "stamp_cols": stamp_cols}


def make_todo(cache_dir, faint_limit=15.0, overwrite=False, settings=None):
    """Build ``cache_dir/todo.sqlite``; returns (path, number of tasks).

    Written under a temporary name and renamed, so an interrupted ``todo`` never leaves a
    half-filled task list that a run would take as complete.
    """
    settings = settings or load_settings()
    cache_dir = Path(cache_dir)
    path = cache_dir / TODO_NAME
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists (use --overwrite to rebuild it and lose its results)")
    caches = find_caches(cache_dir)
    parts = [targets_for_cache(info, faint_limit, settings.get("photometry"))
             for info in caches]
    for info, part in zip(caches, parts):   # for the method policy (photometry/crowding.py)
        part["crowding"] = cache_crowding(info, part, settings)
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    which = np.concatenate([np.full(len(p["starid"]), i) for i, p in enumerate(parts)])
    n = len(cols["starid"])
    order = np.lexsort((cols["starid"], cols["tmag"]))  # brightest first, ties by TIC
    cols["priority"] = np.empty(n, dtype=np.int64)
    cols["priority"][order] = np.arange(1, n + 1)
    method = settings["scheduler"].get("todo_method") or None
    tmp = path.with_name(path.name + ".partial")
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    store = TaskStore(tmp, create=True)
    try:
        store.scratch_mode()    # a scratch file until renamed
        groups = []
        for i, info in enumerate(caches):
            constants = {"sector": info["sector"], "camera": info["camera"],
                         "ccd": info["ccd"], "cadence": info["cadence"], "datasource": "ffi",
                         "method": method, "cache": info["name"]}
            rows = order[which[order] == i]  # this CCD's tasks in priority order
            varying = [c for c in TODO_COLUMNS if c not in constants]
            groups.append((constants, zip(*(cols[c][rows].tolist() for c in varying))))
        store.add_task_groups(groups, bulk=True)
        store.make_self_contained()     # one file to rename
    finally:
        store.close()
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    tmp.replace(path)
    logger.info("%s: %d tasks from %d caches", path, n, len(caches))
    return path, n
