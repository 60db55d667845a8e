"""Benchmark of the aperture plugin against simulation truth, side by side with photutils.

For every star of a simulated sector (``tessphot simulate`` + ``tessphot prepare``) in a
magnitude range (default isolated stars, 8 <= Tmag <= 13) it measures, on good-quality cadences:

* ``ratio``: the scatter of ``flux/median(flux) - true/median(true)`` divided by the ideal
  PRF-weighted photon + read + sky noise of truth.h5 (``stars/ideal_noise`` / mean true flux);
* ``amp``: the recovered / injected relative amplitude (least-squares slope of the measured
  relative light curve against the true one; variable stars only);

for our aperture photometry (contamination-corrected flux) and for plain photutils circular
apertures with a sigma-clipped median annulus background (the radius giving the best median
ratio over the stars is reported, so the comparison favours photutils). Prints a table by
magnitude bin and the medians.

Usage::

    python benchmarks/bench_aperture.py [--size 256] [--cadences 200] [--seed 5]
        [--workdir DIR] [--stages none | backdrop ...] [--all-stars] [--variable-only] [--keep]

``--stages`` omitted runs prepare's default stages (``prepare.stages``, now ``["backdrop"]``);
``--stages none`` runs prepare with no stage, so BasePhotometry's flat local background is
benchmarked.

Per-target cost (issue 15)::

    python benchmarks/bench_aperture.py --timing CACHE_DIR [--targets 171] [--method aperture]
        [--output DIR] [--profile FILE] [--blas-threads 1] [--malloc-tuned]

runs ``run_target`` (reads, background, checks and file write included) on the first
``--targets`` tasks of ``CACHE_DIR/todo.sqlite`` in the claim order, through the worker's
stamp cache, after one untimed warm-up target, and prints one JSON line: CPU time
(``process_time``) per target (median, mean, each), peak RSS, statuses. BLAS is capped at
``--blas-threads`` as the scheduler's workers are (``scheduler.worker_threads``): a second
OpenBLAS thread adds its spinning to the process's CPU time (the 138-158 ms of 2026-12-07
were measured so; 70-80 ms with one thread). Run it with ``PYTHONPATH`` pointing at an
export of another version to compare versions in alternating processes. ``--malloc-tuned``
first applies :func:`photometry.scheduler.target.tune_malloc` (glibc keeps freed cube-sized
blocks for reuse instead of returning them to the kernel), the allocator setting proposed
for the workers.

The test suite imports :func:`evaluate` to check the acceptance figures on a small scene.
"""
import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import h5py
import numpy as np

from photometry.core.base import BasePhotometry
from photometry.data.sources import open_source
from photometry.hooks.quality import TESSQualityFlags
from photometry.sim.evaluation import compare_to_truth
from photometry.hooks.settings import load_settings

__all__ = ["simulate_and_prepare", "evaluate", "summarize"]

BINS = [(8, 9), (9, 10), (10, 11), (11, 12), (12, 13)]
RADII = (1.5, 2.0, 2.5, 3.0, 3.5)


def simulate_and_prepare(workdir, size=128, cadences=100, seed=5, stages=None):
    """Run ``tessphot simulate`` and ``tessphot prepare`` into ``workdir``; paths returned.

    ``stages`` None: prepare's default stages; a list (empty = no stage, local background):
    passed as ``prepare.stages``.
    """
    workdir = Path(workdir)
    exe = [sys.executable, "-m", "photometry.cli"]
    subprocess.run(exe + ["simulate", str(workdir / "sim"), "--cadences", str(cadences),
                          "--size", str(size), str(size), "--seed", str(seed)],
                   check=True, capture_output=True)
    extra = [] if stages is None else ["--set", f"prepare.stages={json.dumps(list(stages))}"]
    subprocess.run(exe + ["prepare", str(workdir / "sim" / "ffi"), "--catalog",
                          str(workdir / "sim" / "catalog.csv"), "--cache", str(workdir / "cache"),
                          "--no-progress"] + extra, check=True, capture_output=True)
    cache = next((workdir / "cache").glob("sector*.hdf5"))
    return workdir / "sim" / "truth.h5", cache


def _photutils_fluxes(phot, radii):
    """Per-cadence flux of circular apertures with an annulus median background."""
    from photutils.aperture import (ApertureStats, CircularAnnulus, CircularAperture,
                                    aperture_photometry)
    phot.resize_stamp(width=31, height=31)
    raw = phot.images_cube + phot.backgrounds_cube   # calibrated images, sky included
    out = {r: np.full(phot.n_frames, np.nan) for r in radii}
    for i in range(phot.n_frames):
        drow, dcol = phot.movement_at(phot.target_pos_row, phot.target_pos_column, i)
        pos = (phot.target_pos_column_stamp + float(dcol), phot.target_pos_row_stamp + float(drow))
        annulus = CircularAnnulus(pos, r_in=6.0, r_out=10.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sky = ApertureStats(raw[i], annulus, sigma_clip=None).median
            for r in radii:
                ap = CircularAperture(pos, r=r)
                total = aperture_photometry(raw[i], ap)["aperture_sum"][0]
                out[r][i] = total - sky * ap.area
    return out


def evaluate(truth_path, cache_path, tmag_range=(8.0, 13.0), isolated=True, radii=RADII,
             settings=None, progress=False, variable_only=False):
    """Aperture plugin and photutils on the selected stars; list of per-star dicts."""
    from photometry_aperture.aperture import AperturePhotometry
    settings = settings or load_settings()
    with h5py.File(truth_path, "r") as h5:
        stars = {k: h5["stars"][k][:] for k in ("starid", "tmag", "isolated", "ideal_noise",
                                                 "row", "column", "variable")}
        true_flux = h5["flux"][:]
        rows, cols = h5.attrs["rows"], h5.attrs["cols"]
        r0, c0 = h5.attrs["row_offset"], h5.attrs["column_offset"]
    sel = (stars["tmag"] >= tmag_range[0]) & (stars["tmag"] <= tmag_range[1]) \
        & np.isfinite(stars["ideal_noise"])
    # whole default stamp on the data: the comparison is about photometry, not edges
    sel &= (stars["row"] > r0 + 8) & (stars["row"] < r0 + rows - 9) \
        & (stars["column"] > c0 + 8) & (stars["column"] < c0 + cols - 9)
    if isolated:
        sel &= stars["isolated"].astype(bool)
    if variable_only:
        sel &= stars["variable"].astype(bool)
    source = open_source(cache_path)
    results = []
    indices = np.flatnonzero(sel)
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc="stars", unit="star")
    for k in indices:
        starid = int(stars["starid"][k])
        phot = AperturePhotometry(starid, source, settings=settings)
        status = phot.photometry()
        good = TESSQualityFlags.filter(phot.quality)
        true = true_flux[k]
        ideal = stars["ideal_noise"][k] / np.mean(true)
        scatter, amp = compare_to_truth(phot.lightcurve["flux"], true, good)
        row = {"starid": starid, "tmag": float(stars["tmag"][k]), "status": int(status),
               "ratio": scatter / ideal, "amp": amp, "npix": int(phot.final_phot_mask.sum()),
               "contamination": float(phot.additional_headers["AP_CONT"][0])}
        if not radii:
            results.append(row)
            continue
        base = BasePhotometry(starid, source, settings=settings)
        for r, flux in _photutils_fluxes(base, radii).items():
            s, a = compare_to_truth(flux, true, good)
            row[f"pu_ratio_{r}"] = s / ideal
            row[f"pu_amp_{r}"] = a
        results.append(row)
    return results


def summarize(results, radii=RADII):
    """Medians overall and by magnitude bin; photutils at its best radius."""
    best = min(radii, key=lambda r: np.median([x[f"pu_ratio_{r}"] for x in results]))

    def med(rows, key, amp=False):
        vals = np.array([x[key] for x in rows], float)
        vals = vals[np.isfinite(vals)]
        if not vals.size:
            return np.nan
        return float(np.median(np.abs(vals - 1))) if amp else float(np.median(vals))

    out = {"n": len(results), "photutils_radius": best,
           "ratio": med(results, "ratio"), "pu_ratio": med(results, f"pu_ratio_{best}"),
           "amp_error": med(results, "amp", True),
           "pu_amp_error": med(results, f"pu_amp_{best}", True),
           "amp_median": med(results, "amp"), "pu_amp_median": med(results, f"pu_amp_{best}"),
           "bins": []}
    for lo, hi in BINS:
        rows = [x for x in results if lo <= x["tmag"] < hi]
        if rows:
            out["bins"].append({"bin": f"{lo}-{hi}", "n": len(rows),
                                "ratio": med(rows, "ratio"),
                                "pu_ratio": med(rows, f"pu_ratio_{best}"),
                                "amp_error": med(rows, "amp", True),
                                "pu_amp_error": med(rows, f"pu_amp_{best}", True)})
    return out


def _print(summary, elapsed, args):
    print(f"# bench_aperture: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}, scene {args.size}x{args.size} px, {args.cadences} "
          f"cadences, seed {args.seed}, stages "
          f"{'default' if args.stages is None else (args.stages or 'none')}; {elapsed:.0f} s")
    print(f"photutils best radius {summary['photutils_radius']} px, annulus 6-10 px")
    print("| Tmag | stars | noise/ideal (ours) | noise/ideal (photutils) "
          "| amplitude error (ours) | amplitude error (photutils) |")
    print("|---|---|---|---|---|---|")
    for b in summary["bins"]:
        print(f"| {b['bin']} | {b['n']} | {b['ratio']:.3f} | {b['pu_ratio']:.3f} | "
              f"{100 * b['amp_error']:.2f} % | {100 * b['pu_amp_error']:.2f} % |")
    print(f"| all | {summary['n']} | {summary['ratio']:.3f} | {summary['pu_ratio']:.3f} | "
          f"{100 * summary['amp_error']:.2f} % | {100 * summary['pu_amp_error']:.2f} % |")
    print(f"median recovered/injected amplitude: ours {summary['amp_median']:.4f}, "
          f"photutils {summary['pu_amp_median']:.4f}")


def time_targets(cache_dir, n_targets=171, method="aperture", output=None, profile=None,
                 blas_threads=1, malloc_tuned=False):
    """CPU time of ``run_target`` per target on a prepared cache folder (see the module
    docstring); a dict. ``malloc_tuned``: :func:`photometry.scheduler.target.tune_malloc`
    first."""
    import resource
    import sqlite3
    from photometry.scheduler.target import tune_malloc
    from photometry.data.taskstore import CLAIM_ORDER
    from photometry.hooks.plugins import default_plugin_manager, lookup
    from photometry.scheduler.run import _LazySource
    from photometry.scheduler.target import run_target
    from threadpoolctl import threadpool_limits
    tuned = tune_malloc() if malloc_tuned else False
    settings = load_settings()
    cache_dir = Path(cache_dir)
    with sqlite3.connect(str(cache_dir / "todo.sqlite")) as db:
        order = CLAIM_ORDER.replace("r.priority", "t.priority")
        todo = db.execute(f"SELECT starid, cache FROM todolist t ORDER BY {order} LIMIT ?",
                          (int(n_targets),)).fetchall()
    mb = float(settings.get("scheduler", {}).get("stamp_cache_mb", 0) or 0)
    source = _LazySource(cache_dir / todo[0][1], cache_bytes=mb * 1024 ** 2)
    cls = lookup(default_plugin_manager(), "register_algorithms", method)
    output = Path(output or tempfile.mkdtemp(prefix="bench_ap_time_"))
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
    times, statuses = [], {}
    with threadpool_limits(int(blas_threads)) if blas_threads else contextlib.nullcontext():
        run_target(cls, todo[0][0], source, settings, output / "warm-up")
        for starid, _ in todo:
            t0 = time.process_time()
            if prof:
                prof.enable()
            result = run_target(cls, starid, source, settings, output)
            if prof:
                prof.disable()
            times.append(1e3 * (time.process_time() - t0))
            statuses[int(starid)] = int(result["status"])
    if prof:
        prof.dump_stats(profile)
    t = np.array(times)
    return {"targets": len(t), "method": method, "median_ms": float(np.median(t)),
            "mean_ms": float(np.mean(t)), "blas_threads": blas_threads, "malloc_tuned": tuned,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load": list(os.getloadavg()), "statuses": statuses,
            "times_ms": [round(float(x), 2) for x in t]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cadences", type=int, default=200)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--stages", nargs="*", default=None,
                        help="prepare stages (default: prepare.stages, i.e. backdrop); "
                             "'none' for no stage (BasePhotometry's local background)")
    parser.add_argument("--all-stars", action="store_true", help="not only isolated stars")
    parser.add_argument("--variable-only", action="store_true",
                        help="only stars with injected variability (amplitude figures)")
    parser.add_argument("--workdir", help="reuse/keep this folder")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--timing", metavar="CACHE_DIR",
                        help="per-target CPU time of run_target on this prepared cache folder")
    parser.add_argument("--targets", type=int, default=171)
    parser.add_argument("--method", default="aperture")
    parser.add_argument("--output", help="--timing: light-curve folder (default: a temporary one)")
    parser.add_argument("--profile", help="--timing: cProfile statistics to this file")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="--timing: BLAS threads (0: as the environment says)")
    parser.add_argument("--malloc-tuned", action="store_true",
                        help="--timing: glibc mallopt as tune_malloc (what the workers apply)")
    args = parser.parse_args(argv)
    if args.timing:
        print(json.dumps(time_targets(args.timing, args.targets, args.method, args.output,
                                      args.profile, args.blas_threads,
                                      args.malloc_tuned)))
        return 0
    if args.stages is not None and [x.lower() for x in args.stages] in (["none"], []):
        args.stages = []
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_ap_"))
    t0 = time.perf_counter()
    try:
        caches = list((workdir / "cache").glob("sector*.hdf5"))
        if caches and (workdir / "sim" / "truth.h5").exists():
            truth, cache = workdir / "sim" / "truth.h5", caches[0]
        else:
            truth, cache = simulate_and_prepare(workdir, args.size, args.cadences, args.seed,
                                                args.stages)
        results = evaluate(truth, cache, isolated=not args.all_stars, progress=True,
                           variable_only=args.variable_only)
        _print(summarize(results), time.perf_counter() - t0, args)
    finally:
        if not (args.keep or args.workdir):
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
