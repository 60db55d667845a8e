"""Light-curve corrections of whole CCDs after photometry: ``tessphot correct`` and the last
step of ``tessphot run``.

A light-curve correction (hook ``register_lightcurve_corrections``, base class
:class:`photometry.data.stages.LightCurveCorrection`, setting ``photometry.lightcurve_correction``)
sees the light curves of one CCD and method together: systematics common to a CCD's stars
(pointing, focus, scattered light) can only be told from a star's own signal that way. The
core here does the I/O, the plugin the science:

1. The finished tasks (OK, WARNING) with a light curve come from ``todo.sqlite``; they are
   grouped by (sector, camera, CCD, cadence, method) and sorted by TIC, so the result does not
   depend on the order they ran in.
2. ``candidates(stars)`` picks the stars the correction may learn from (``stars`` carries
   each light curve's photometry ``status``: a correction should not learn from a WARNING,
   which is still corrected in 3.); their light curves are read into an :class:`Ensemble` on
   the CCD's cadence axis (CADENCENO), with the files the correction declares
   (``inputs(key)``, e.g. SPOC's CBVs) read into ``ensemble.inputs``, and ``fit``.
3. Every star of the group (a star added by a later run too) is read, ``correct``-ed and its
   PDCSAP_FLUX, PDCSAP_FLUX_ERR and PDC keywords are replaced atomically
   (:func:`photometry.output.lightcurve_io.update_lightcurve`, which leaves a file alone when
   nothing changes: running twice gives the same files).
4. A correction's CCD-level products (``products()``, e.g. its CBVs in SPOC's CBV format)
   are written to ``LC_DIR/cbv/``; ``tessphot star`` reads them back for ``restore``
   (:class:`photometry.data.fits_tables.ProductFolder`). The plugin opens no file.

A group that fails (an exception in the plugin) is logged and its files keep the uncorrected
copy (``PDCMETHD = 'none'``); one bad light-curve file is skipped with a warning. Neither
stops the run.
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from photometry.hooks.commandline import add_settings_arguments
from photometry.hooks.errors import ConfigurationError, InputError
from photometry.output.lightcurve_io import read_lightcurve, update_lightcurve, write_atomic
from photometry.hooks.quality import fit_cadences
from photometry.hooks.status import STATUS

__all__ = ["Ensemble", "StarLightCurve", "Corrected", "finished_lightcurves",
           "correct_lightcurves", "correct_star", "correct_ensemble", "with_inputs", "finish_run",
           "PRODUCTS", "add_arguments", "run"]

logger = logging.getLogger(__name__)



@dataclass
class StarLightCurve:
    """One star's SAP light curve on its CCD's cadence axis (NaN where it has no row).

    ``flux_fraction`` is the file's FLFRCSAP (NaN if unknown): how much of the star's light
    its aperture holds, which decides how much a focus or pointing change costs it.
    """

    starid: int
    tmag: float
    row: float
    column: float
    time: np.ndarray
    cadenceno: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    quality: np.ndarray
    good: np.ndarray
    flux_fraction: float = np.nan


@dataclass
class Ensemble:
    """Light curves of one CCD and method on one cadence axis (stars sorted by TIC).

    ``flux``, ``flux_err``, ``quality``, ``good`` are (S, N); ``time`` and ``cadenceno`` (N,).
    ``inputs`` holds the files the correction declared (``LightCurveCorrection.inputs``), read
    by the core: {name: :class:`photometry.FitsTables` or None}. ``status`` (S,) is each
    light curve's photometry STATUS (OK or WARNING; default OK): a WARNING light curve is
    corrected, but a correction should not learn the CCD's systematics from it.
    """

    sector: int
    camera: int
    ccd: int
    cadence: int
    method: str
    time: np.ndarray
    cadenceno: np.ndarray
    starid: np.ndarray
    tmag: np.ndarray
    row: np.ndarray
    column: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    quality: np.ndarray
    good: np.ndarray
    flux_fraction: np.ndarray = None
    inputs: dict = field(default_factory=dict)
    status: np.ndarray = None

    def __post_init__(self):
        if self.flux_fraction is None:
            self.flux_fraction = np.full(len(self.starid), np.nan)
        if self.status is None:
            self.status = np.full(len(self.starid), int(STATUS.OK), dtype=np.int64)

    def subset(self, index):
        """The ensemble of the stars ``index`` (same cadence axis)."""
        from dataclasses import replace
        return replace(self, **{k: getattr(self, k)[index] for k in
                                ("starid", "tmag", "row", "column", "flux", "flux_err",
                                 "quality", "good", "flux_fraction", "status")})

    def table(self, contamination=None):
        """The stars as the Table ``LightCurveCorrection.candidates`` takes: ``starid, tmag,
        row, column, status, variability, contamination``."""
        n = len(self.starid)
        return Table({"starid": self.starid, "tmag": self.tmag, "row": self.row,
                      "column": self.column, "status": self.status,
                      "variability": np.full(n, np.nan),
                      "contamination": (np.zeros(n) if contamination is None
                                        else np.asarray(contamination, float))})

    def star(self, i):
        return StarLightCurve(int(self.starid[i]), float(self.tmag[i]), float(self.row[i]),
                              float(self.column[i]), self.time, self.cadenceno,
                              self.flux[i], self.flux_err[i], self.quality[i], self.good[i],
                              float(self.flux_fraction[i]))


@dataclass
class Corrected:
    """What a correction returns for one star: PDCSAP flux and error on the star's cadence
    axis, PDCMETHD, and header cards ``(key, value, comment)``."""

    flux: np.ndarray
    flux_err: np.ndarray
    method: str
    cards: list = field(default_factory=list)


# --------------------------------------------------------------------------- inputs
def finished_lightcurves(cache_dir, output):
    """Table of the finished results (OK, WARNING) with a light-curve file in ``output``,
    sorted by CCD, method and TIC; one row per (task, method), so several methods' light
    curves of a star stand side by side.

    Columns: ``starid, tmag, row, column, sector, camera, ccd, cadence, method, status,
    variability, contamination, path`` (absolute). Results of another run's output folder are
    left out (a migrated result, which has no recorded folder, counts as this one's).
    """
    from photometry.data.taskstore import TODO_NAME, TaskStore
    output = Path(output).resolve()
    with TaskStore(Path(cache_dir) / TODO_NAME) as store:
        found = store.output_results(output, kept=True, order="method")
    names = ["starid", "tmag", "row", "column", "sector", "camera", "ccd", "cadence",
             "method", "status", "variability", "contamination", "path"]
    if not found:
        return Table(names=names, dtype=[int, float, float, float, int, int, int, int, str,
                                         int, float, float, str])
    columns = [{"path": "lightcurve"}.get(n, n) for n in names]
    table = Table(rows=[tuple(np.nan if r[c] is None else r[c] for c in columns) for r in found],
                  names=names)
    table["path"] = [str(output / p) for p in table["path"]]
    return table


def _groups(table):
    keys = ("sector", "camera", "ccd", "cadence", "method")
    if len(table) == 0:
        return []
    return [(tuple(g[k][0] for k in keys), g) for g in table.group_by(list(keys)).groups]


def _on_axis(lc, cadenceno):
    """(time, flux, flux_err, quality) of a read light curve on the CCD's cadence axis, and
    the axis index of each of its rows (-1 if the axis lacks it)."""
    n = cadenceno.size
    idx = np.searchsorted(cadenceno, lc["cadenceno"])
    ok = (idx < n) & (cadenceno[np.minimum(idx, max(n - 1, 0))] == lc["cadenceno"]) \
        if n else np.zeros(len(idx), bool)
    out = [np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan),
           np.zeros(n, dtype=np.int64)]
    for arr, col in zip(out, ("time", "sap_flux", "sap_flux_err", "quality")):
        arr[idx[ok]] = lc[col][ok]
    return out, np.where(ok, idx, -1)


def _flux_fraction(lc):
    value = lc["header"].get("FLFRCSAP")
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


#: what :func:`_read_ensemble` keeps of a read light curve: a few arrays of its cadence count
_ENSEMBLE_COLUMNS = ("cadenceno", "time", "sap_flux", "sap_flux_err", "quality")


def _ensemble_part(path):
    """The columns of one light-curve file an :class:`Ensemble` needs, and its FLFRCSAP.

    The rest of the read (PDCSAP columns, both headers: 96 kB per file at 200 cadences,
    8 kB kept) is dropped before the next file is read, so an ensemble of S stars costs S
    times a few arrays of the cadence count, not S headers.
    """
    lc = read_lightcurve(path)
    return {c: lc[c] for c in _ENSEMBLE_COLUMNS}, _flux_fraction(lc)


def _read_ensemble(key, stars):
    """The light curves of ``stars`` (Table rows) on one axis; unreadable files are dropped."""
    sector, camera, ccd, cadence, method = key
    lcs, fraction, keep = [], [], []
    for i, path in enumerate(stars["path"]):
        try:
            part, frac = _ensemble_part(path)
        except (OSError, KeyError, ValueError) as exc:
            logger.warning("%s: cannot read the light curve (%s); left out", path, exc)
            continue
        lcs.append(part)
        fraction.append(frac)
        keep.append(i)
    stars = stars[keep]
    cadenceno = (np.unique(np.concatenate([lc["cadenceno"] for lc in lcs])) if lcs
                 else np.zeros(0, dtype=np.int64))
    n, s = cadenceno.size, len(lcs)
    time = np.full(n, np.nan)
    flux, err = np.full((s, n), np.nan), np.full((s, n), np.nan)
    quality = np.zeros((s, n), dtype=np.int64)
    for i in range(s):
        # each star's own arrays go as soon as they are on the axis
        (t, flux[i], err[i], quality[i]), _ = _on_axis(lcs[i], cadenceno)
        lcs[i] = None
        time = np.where(np.isfinite(time), time, t)
    fraction = np.array(fraction, dtype=float)
    if n and np.any(~np.isfinite(time)):
        known = np.isfinite(time)
        time[~known] = np.interp(cadenceno[~known], cadenceno[known], time[known])
    return Ensemble(int(sector), int(camera), int(ccd), int(cadence), str(method), time,
                    cadenceno, np.asarray(stars["starid"], dtype=np.int64),
                    np.asarray(stars["tmag"], float), np.asarray(stars["row"], float),
                    np.asarray(stars["column"], float), flux, err, quality,
                    fit_cadences(quality, flux), fraction,
                    status=(np.asarray(stars["status"], dtype=np.int64)
                            if "status" in stars.colnames else None))


def with_inputs(corr, ensemble):
    """``ensemble`` with the files ``corr.inputs`` declares for its group read into
    ``ensemble.inputs`` (the correction itself opens no file)."""
    from dataclasses import replace

    from photometry.data.fits_tables import find_input_file, read_fits_tables
    key = (ensemble.sector, ensemble.camera, ensemble.ccd, ensemble.cadence, ensemble.method)
    read = {}
    for name, spec in corr.inputs(key).items():
        path = find_input_file(spec)
        read[name] = None if path is None else read_fits_tables(path)
    return replace(ensemble, inputs=read)


def correct_ensemble(corr, ensemble, contamination=None):
    """Fit a correction on its candidates of an in-memory :class:`Ensemble` and correct every
    star of it (tests, benchmarks); the list of :class:`Corrected`, in the ensemble's order."""
    from threadpoolctl import threadpool_limits
    cand = np.asarray(corr.candidates(ensemble.table(contamination)), dtype=bool)
    with threadpool_limits(1):
        corr.fit(with_inputs(corr, ensemble.subset(np.flatnonzero(cand))))
        return [corr.correct(ensemble.star(i)) for i in range(len(ensemble.starid))]


def correction_class(settings):
    """The configured LightCurveCorrection class, or None (``photometry.lightcurve_correction
    = ""``). Raises ConfigurationError for an unknown name."""
    name = settings["photometry"].get("lightcurve_correction", "")
    if not name:
        return None
    from photometry.hooks.plugins import default_plugin_manager, lookup
    return lookup(default_plugin_manager(), "register_lightcurve_corrections", name)


# --------------------------------------------------------------------------- the work
#: folder under LC_DIR for the CCD-level products of a correction
PRODUCTS = "cbv"


def _correct_file(corr, row, axis, time):
    """Correct one light-curve file with a fitted correction; (PDCMETHD, rewritten) or None.

    ``row`` needs ``path, starid, tmag, row, column``; ``axis`` and ``time`` are the CCD's
    cadence numbers and times (the file's own when None).
    """
    path = row["path"]
    try:
        lc = read_lightcurve(path)
        if axis is None:
            axis, time = lc["cadenceno"], lc["time"]
        (_, flux, err, quality), idx = _on_axis(lc, axis)
        star = StarLightCurve(int(row["starid"]), float(row["tmag"]), float(row["row"]),
                              float(row["column"]), time, axis, flux, err, quality,
                              fit_cadences(quality, flux), _flux_fraction(lc))
        res = corr.correct(star)
        # back from the CCD axis to the file's own rows (rows the axis lacks keep SAP)
        inside = idx >= 0
        pdc = np.where(inside, np.asarray(res.flux, float)[idx], lc["sap_flux"])
        pdc_err = np.where(inside, np.asarray(res.flux_err, float)[idx], lc["sap_flux_err"])
        cards = [("PDCMETHD", res.method, "PDC algorithm used for target")] + res.cards
        changed = update_lightcurve(path, pdc, pdc_err, cards,
                                    good=fit_cadences(lc["quality"], pdc))
    except (OSError, KeyError, ValueError) as exc:
        logger.warning("%s: correction not written (%s)", path, exc)
        return None
    plots = Path(path).parent / "plots" / f"{int(row['starid']):011d}"
    if plots.is_dir() and (changed or not (plots / "lightcurve.png").exists()):
        from photometry.output.plots import plot_lightcurve_file, save_figure
        save_figure(plot_lightcurve_file(path), plots / "lightcurve.png")
    return res.method, changed


def correct_star(path, output, settings, row=None, column=None):
    """Correct one light curve with the stored products of its CCD's last correction.

    For ``tessphot star``: the vectors and prior of ``LC_DIR/cbv/`` (written by the last
    ``run``/``correct`` into that folder) correct one more star without refitting the CCD.
    ``row``/``column`` (0-based CCD, reference frame) place the star for its prior (default:
    the median centroid of the file). Returns the PDCMETHD written, or None if the
    correction has no stored state for this CCD.
    """
    cls = correction_class(settings)
    if cls is None:
        return None
    with fits.open(path) as hdul:
        if "LIGHTCURVE" not in hdul:  # the first writer's file may be a TPF (writers = ["tpf"])
            return None
        p = hdul[0].header.copy()
        if row is None or column is None:
            d = hdul["LIGHTCURVE"].data
            column, row = (float(np.nanmedian(d["MOM_CENTR1"])) - 1.0,
                           float(np.nanmedian(d["MOM_CENTR2"])) - 1.0)
    key = (int(p["SECTOR"]), int(p["CAMERA"]), int(p["CCD"]), int(p["CADENCE"]),
           str(p["PHOTMET"]))
    corr = cls(settings)
    from photometry.data.fits_tables import ProductFolder
    if not corr.restore(ProductFolder(Path(output) / PRODUCTS), key):
        return None
    res = _correct_file(corr, {"path": str(path), "starid": int(p["TICID"]),
                               "tmag": float(p.get("TESSMAG") or np.nan), "row": row,
                               "column": column}, None, None)
    return None if res is None else res[0]


def correct_group(key, stars, cls, settings, output):
    """Correct one CCD/method group; returns a dict of counts and the PDCMETHD per star."""
    corr = cls(settings)
    summary = {"group": "s{:04d}-{}-{}-c{:04d}-{}".format(*key), "stars": len(stars),
               "rewritten": 0, "unchanged": 0, "failed": 0, "methods": {}}
    cand = np.asarray(corr.candidates(stars), dtype=bool)
    ensemble = with_inputs(corr, _read_ensemble(key, stars[cand]))
    corr.fit(ensemble)
    axis = ensemble.cadenceno
    for row in stars:
        res = _correct_file(corr, row, axis, ensemble.time)
        if res is None:
            summary["failed"] += 1
            continue
        method, changed = res
        summary["rewritten" if changed else "unchanged"] += 1
        summary["methods"][method] = summary["methods"].get(method, 0) + 1
    for name, hdul in corr.products().items():
        write_atomic(hdul, Path(output) / PRODUCTS / name)
    summary["notes"] = list(getattr(corr, "notes", []))
    return summary


def correct_lightcurves(cache_dir, output, settings):
    """Run the configured light-curve correction over every CCD/method group.

    Returns a list of per-group summary dicts (empty if no correction is configured).
    """
    cls = correction_class(settings)
    if cls is None:
        return []
    from threadpoolctl import threadpool_limits
    table = finished_lightcurves(cache_dir, output)
    out = []
    for key, stars in _groups(table):
        try:
            # small matrices: one BLAS thread is faster, and leaves the other cores alone
            with threadpool_limits(1):
                out.append(correct_group(key, stars, cls, settings, output))
        except ConfigurationError:
            raise
        except Exception as exc:  # noqa: BLE001 - one CCD's failure must not lose the others
            logger.exception("light-curve correction of %s failed", key)
            out.append({"group": "s{:04d}-{}-{}-c{:04d}-{}".format(*key), "stars": len(stars),
                        "error": f"{type(exc).__name__}: {exc}"})
    return out


def _report(groups):
    for g in groups:
        if "error" in g:
            print(f"correction {g['group']}: FAILED ({g['error']}); PDCSAP_FLUX left = SAP_FLUX")
            continue
        methods = ", ".join(f"{k} {v}" for k, v in sorted(g["methods"].items()))
        notes = f"; {'; '.join(g['notes'])}" if g.get("notes") else ""
        print(f"correction {g['group']}: {g['stars']} light curves ({methods}), "
              f"{g['rewritten']} rewritten, {g['unchanged']} unchanged, "
              f"{g['failed']} failed{notes}")


def finish_run(cache_dir, output, settings):
    """The last step of ``tessphot run``: correct the light curves, write the CCD summaries.

    Returns 0 (nothing here turns a run into a failure: the photometry results are kept
    whatever happens, and failures are printed).
    """
    from photometry.output.summary import write_summaries
    _report(correct_lightcurves(cache_dir, output, settings))
    for path in write_summaries(cache_dir, output):
        print(f"summary: {path}")
    return 0


# --------------------------------------------------------------------------- command line
def add_arguments(parser):
    parser.add_argument("cache_dir", metavar="CACHE_DIR", help="folder with todo.sqlite")
    parser.add_argument("--output", "-o", required=True, metavar="LC_DIR",
                        help="the light-curve folder of the run")
    add_settings_arguments(parser)


def run(args):
    from photometry.hooks.settings import load_settings
    settings = load_settings(args.settings, args.assignments)
    if not Path(args.output).is_dir():
        raise InputError(f"{args.output}: light-curve folder not found")
    if correction_class(settings) is None:
        raise InputError("photometry.lightcurve_correction is empty: no correction to run")
    return finish_run(args.cache_dir, args.output, settings)
