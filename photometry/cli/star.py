"""``tessphot star``: run one star with full logging and the diagnostic plots.

For per-star debugging: find the CCD cache whose catalog holds the star (or read a TPF/TESScut
file with ``--tpf``), run one method through :func:`photometry.scheduler.target.run_target` exactly as the
scheduler would, print the outcome and where the light curve and plots went.
"""
import json
import logging
import sqlite3
from pathlib import Path

from photometry.hooks.commandline import add_settings_arguments, output_folder, tic_id
from photometry.hooks.errors import ConfigurationError, InputError

logger = logging.getLogger(__name__)


def add_arguments(parser):
    parser.add_argument("starid", type=tic_id, help="TIC id of the star")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cache", type=Path, metavar="CACHE_DIR",
                       help="folder of prepared caches (sectorSSSS_cameraC_ccdD.hdf5 + catalogs)")
    where.add_argument("--tpf", type=Path, metavar="FILE",
                       help="a SPOC TPF or TESScut file instead of a cache (datasource tpf)")
    parser.add_argument("--output", type=Path, required=True, metavar="LC_DIR",
                        help="where the light curve (and plots) go")
    parser.add_argument("--method", default=None,
                        help="algorithm name (default: the choose_method policy)")
    parser.add_argument("--sector", type=int,
                        help="pick this sector if several caches hold the star; with --tpf: "
                             "checked against the file, used where it does not say")
    parser.add_argument("--camera", type=int)
    parser.add_argument("--ccd", type=int)
    parser.add_argument("--tmag", type=float,
                        help="with --tpf: TESS magnitude when the file has none (TESScut)")
    parser.add_argument("--catalog", type=Path, metavar="FILE",
                        help="with --tpf: star catalog (starid, ra, dec, tmag[, pmra, pmdec, "
                             "teff]) for the target's position and the neighbours")
    parser.add_argument("--plot", action="store_true", help="write the diagnostic plots")
    parser.add_argument("--tpf-out", action="store_true",
                        help="also write the stamp as a SPOC-layout Target Pixel File "
                             "(output writer 'tpf', next to the light curve)")
    parser.add_argument("--json", action="store_true",
                        help="print the outcome as one JSON document (status, method, files, "
                             "details) instead of the text report")
    add_settings_arguments(parser)


def find_cache(cache_dir, starid, sector=None, camera=None, ccd=None):
    """(cache path, catalog row dict) of the one cache whose catalog holds ``starid``.

    Raises
    ------
    InputError
        If no cache holds the star, or several do and the options do not pick one.
    """
    from photometry.data.cache import cache_filename
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise InputError(f"{cache_dir}: cache folder not found")
    found = []
    for cat in sorted(cache_dir.glob("catalog_sector*_camera*_ccd*.sqlite")):
        with sqlite3.connect(f"file:{cat}?mode=ro", uri=True) as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute("SELECT * FROM catalog WHERE starid = ?", (starid,)).fetchone()
            meta = conn.execute("SELECT sector, camera, ccd FROM settings").fetchone()
        if row is None or meta is None:
            continue
        s, c, d = (int(v) for v in meta)
        if (sector, camera, ccd) != (None, None, None) and any(
                want is not None and want != have
                for want, have in ((sector, s), (camera, c), (ccd, d))):
            continue
        path = cache_dir / cache_filename(s, c, d)
        if path.exists():
            found.append((path, dict(row) | {"sector": s, "camera": c, "ccd": d}))
    if not found:
        raise InputError(f"{cache_dir}: no prepared cache has TIC {starid} in its catalog")
    if len(found) > 1:
        names = ", ".join(p.name for p, _ in found)
        raise InputError(f"{cache_dir}: TIC {starid} is in several caches ({names}); "
                         "choose with --sector/--camera/--ccd")
    return found[0]


def run(args):
    from photometry.core.base import STATUS
    from photometry.scheduler.target import run_target, setup_worker
    from photometry.hooks.plugins import default_plugin_manager, lookup
    from photometry.hooks.settings import load_settings

    settings = load_settings(args.settings, args.assignments)
    setup_worker(settings)  # as the run's workers: the same bits
    output_folder(args.output)
    if args.tpf_out and "tpf" not in settings["photometry"]["writers"]:
        settings["photometry"]["writers"] = list(settings["photometry"]["writers"]) + ["tpf"]
    pm = default_plugin_manager()
    if args.tpf is None and (args.catalog is not None or args.tmag is not None):
        raise InputError(f"{'--catalog' if args.catalog is not None else '--tmag'} is for "
                         "--tpf input (a cache has its own catalog)")
    if args.tpf is not None:
        from photometry.data.tpf import TPFSource
        source = TPFSource(args.tpf, starid=args.starid, tmag=args.tmag, catalog=args.catalog,
                           sector=args.sector, camera=args.camera, ccd=args.ccd,
                           settings=settings)
        target = dict(source.target, sector=source.sector, camera=source.camera,
                      ccd=source.ccd, datasource="tpf")
    else:
        from photometry.data.cache import FFICache
        path, target = find_cache(args.cache, args.starid, args.sector, args.camera, args.ccd)
        source = FFICache(path)
        target["datasource"] = "ffi"
    method = args.method or pm.hook.choose_method(target=target, settings=settings)
    if not method:
        raise ConfigurationError(f"TIC {args.starid}: no method chosen; give --method NAME")
    cls = lookup(pm, "register_algorithms", method)
    logger.info("TIC %d: method %s %s, sector %d camera %d CCD %d (%s)", args.starid, method,
                cls.version, source.sector, source.camera, source.ccd, source.datasource)
    try:
        result = run_target(cls, args.starid, source, settings, args.output, plot=args.plot)
    finally:
        if hasattr(source, "close"):
            source.close()
    status = STATUS(result["status"])
    code = 0 if status in (STATUS.OK, STATUS.WARNING) else 1
    pdc = None
    if result["lightcurve"]:  # co-trended with its CCD's stored correction, if LC_DIR has one
        from photometry.scheduler.correct import correct_star
        pdc = correct_star(result["lightcurve"], args.output, settings,
                           target.get("row"), target.get("column"))
    if args.json:  # one document, so that ``star ... --json > star.json`` is valid JSON
        plots = (Path(result["lightcurve"]).parent / "plots" / f"{args.starid:011d}"
                 if result["lightcurve"] and args.plot else None)
        print(json.dumps({"starid": args.starid, "status": status.name, "method": method,
                          "elapsed": result["elapsed"], "lightcurve": result["lightcurve"],
                          "pdc_method": pdc, "plots": plots, "error": result["error"],
                          "details": result["details"]}, indent=1, default=str))
        return code
    print(f"TIC {args.starid}: {status.name} ({method}, {result['elapsed']:.2f} s)")
    if result["lightcurve"]:
        print(f"light curve: {result['lightcurve']} (PDCSAP_FLUX: "
              f"{pdc or 'not corrected: no stored correction of this CCD in ' + str(args.output)})")
        if result["details"].get("filepath_tpf"):
            print(f"target pixel file: {result['details']['filepath_tpf']}")
        if args.plot:
            print(f"plots: {Path(result['lightcurve']).parent / 'plots' / f'{args.starid:011d}'}")
    if result["error"]:
        print(f"error: {result['error']}")
    print(json.dumps(result["details"], indent=1, default=str))
    return code
