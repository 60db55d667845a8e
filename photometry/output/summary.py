"""Per-CCD summary of a run: one row per task, measured against expected noise, and the
CDPP-versus-Tmag figure (as in the TASOC and QLP papers).

Written at the end of ``tessphot run`` and by ``tessphot status CACHE_DIR --output LC_DIR``
into ``LC_DIR/summary/``: ``s{sector:04d}-{camera}-{ccd}-c{cadence:04d}_summary.fits`` and
``.csv`` (the same table) and ``..._cdpp.png``. The table is built from ``todo.sqlite``
(one row per task and method: status, reason) and the LIGHTCURVE header of each light curve (CDPP, noise model,
crowding, PDC keywords), so it always describes the files as they are.
"""
import logging
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

__all__ = ["summary_table", "write_summaries", "ratio_by_magnitude", "SUMMARY_COLUMNS"]

logger = logging.getLogger(__name__)

#: (table column, LIGHTCURVE header keyword) read from each light curve
_HEADER_COLUMNS = (("cdpp_pdcsap", "CDPP1_0"), ("cdpp_sap", "CDPPSAP"),
                   ("cdpp_expected", "CDPPEXP"), ("ratio_pdcsap", "NOIRPDC"),
                   ("ratio_sap", "NOIRSAP"), ("noise_expected", "NOI_TOT"),
                   ("crowdsap", "CROWDSAP"), ("flux_fraction", "FLFRCSAP"),
                   ("pdc_method", "PDCMETHD"), ("pdc_goodness", "PDC_TOT"),
                   ("pdc_vectors", "PDC_NCBV"))
SUMMARY_COLUMNS = ("starid", "tmag", "method", "status", "reason", "contamination",
                   *(c for c, _ in _HEADER_COLUMNS), "lightcurve")


def _tasks(cache_dir, output):
    """One row per (task, method) of ``output``'s results, and one per task without any
    (PENDING, its todolist method): ``((sector, camera, ccd, cadence), starid, tmag, method,
    status, reason, contamination, lightcurve)``. Results of another run's output folder are
    left out (a planned or migrated result, which has no folder yet, counts as this one's)."""
    from photometry.data.taskstore import TODO_NAME, TaskStore, status_name
    with TaskStore(Path(cache_dir) / TODO_NAME) as store:
        rows = store.output_results(output)
    out = []
    for r in rows:
        lines = (line.strip() for line in (r["reason"] or "").splitlines())
        reason = "; ".join(dict.fromkeys(line for line in lines if line))
        status, cont = status_name(r["status"]), r["contamination"]
        out.append((tuple(int(r[k]) for k in ("sector", "camera", "ccd", "cadence")),
                    int(r["starid"]), float(r["tmag"]), r["method"], status, reason[:300],
                    np.nan if cont is None else float(cont), r["lightcurve"]))
    return out


def summary_table(tasks, output):
    """The summary Table of one CCD's tasks (rows of :func:`_tasks`)."""
    rows = []
    for _, starid, tmag, method, status, reason, cont, rel in tasks:
        values = {c: np.nan for c, _ in _HEADER_COLUMNS}
        values["pdc_method"] = ""
        path = ""
        if rel:
            path = str(Path(output) / rel)
            try:
                header = fits.getheader(path, "LIGHTCURVE")
                for col, key in _HEADER_COLUMNS:
                    value = header.get(key)
                    if value is not None and not isinstance(value, fits.card.Undefined):
                        values[col] = value
            except (OSError, KeyError) as exc:
                logger.warning("%s: cannot read the header (%s)", path, exc)
        rows.append([starid, tmag, method, status, reason, cont,
                     *(values[c] for c, _ in _HEADER_COLUMNS), rel or ""])
    dtypes = [np.int64, float, str, str, str, float] + \
        [str if c == "pdc_method" else float for c, _ in _HEADER_COLUMNS] + [str]
    return Table(rows=rows or None, names=SUMMARY_COLUMNS, dtype=dtypes)


def ratio_by_magnitude(table, column="ratio_pdcsap", width=1.0):
    """Rows ``(tmag_low, tmag_high, n, median ratio)`` of finished stars in Tmag bins."""
    ok = np.isfinite(np.asarray(table[column], dtype=float))
    tmag = np.asarray(table["tmag"], dtype=float)[ok]
    ratio = np.asarray(table[column], dtype=float)[ok]
    if tmag.size == 0:
        return []
    edges = np.arange(np.floor(tmag.min()), np.ceil(tmag.max()) + width, width)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (tmag >= lo) & (tmag < hi)
        if sel.any():
            out.append((float(lo), float(hi), int(sel.sum()), float(np.median(ratio[sel]))))
    return out


def write_summaries(cache_dir, output):
    """Write the summary table (FITS, CSV) and CDPP plot of every CCD; the paths written."""
    from photometry.output.lightcurve_io import write_atomic
    from photometry.output.plots import plot_cdpp_summary, save_figure
    tasks = _tasks(cache_dir, output)
    folder = Path(output) / "summary"
    paths = []
    for key in sorted({t[0] for t in tasks}):
        table = summary_table([t for t in tasks if t[0] == key], output)
        name = "s{:04d}-{}-{}-c{:04d}".format(*key)
        table.meta["EXTNAME"] = "SUMMARY"
        for k, v in zip(("SECTOR", "CAMERA", "CCD", "CADENCE"), key):
            table.meta[k] = v
        folder.mkdir(parents=True, exist_ok=True)
        fits_path = folder / f"{name}_summary.fits"
        write_atomic(fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table)]), fits_path)
        csv_path = folder / f"{name}_summary.csv"
        tmp = csv_path.with_name(f".{csv_path.name}.tmp")
        table.write(tmp, format="ascii.csv", overwrite=True)
        tmp.replace(csv_path)
        png = save_figure(plot_cdpp_summary(table, key), folder / f"{name}_cdpp.png")
        paths += [fits_path, csv_path, png]
    return paths
