"""The core's result checks (photometry/checks.py) on simulated sectors: what they cost, how
often they flag a correct light curve, and which wrong ones they catch.

For every star (Tmag <= 15) of each simulated sector it runs aperture and linpsf, scores the
light curve against truth.h5 and sorts it:

* correct: noise <= 1.5 x the ideal, injected amplitude within 5 %, and total flux within 5 %
  (linpsf) or at least half of it (aperture: an in-mask, SAP-like flux);
* incorrect: everything else.

It prints, per method, how many correct light curves a core check flagged (the false
positives) and which codes caught the incorrect ones, the distributions of the checks'
measured values on the correct ones (what the thresholds in ``[checks]`` were chosen from),
and the CPU time of the checks against that of the whole ``photometry()`` call.

Usage::

    python benchmarks/bench_checks.py [--seeds 5 6 8] [--size 128] [--cadences 100]
        [--spoc-prf DIR] [--no-uncertainty] [--workdir DIR]

``--spoc-prf`` adds a sector drawn with the SPOC PRF models in DIR (the methods keep their
defaults, so it shows what the checks catch when a method's PRF is wrong);
``--no-uncertainty`` adds the first sector again with its FFIs' uncertainty HDUs removed
(issue 13, item 1).
"""
import argparse
import collections
import importlib.util
import logging
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import h5py
import numpy as np

from photometry.core import checks as checks_module
from photometry.data.sources import open_source
from photometry.sim.evaluation import score_lightcurve
from photometry.hooks.settings import load_settings

KEYS = ("noise_vs_stated", "noise_vs_limit", "mask_vs_optimal", "catalog_ratio",
        "reference_vs_expected", "reference_ratio", "noise_vs_aperture", "noise_vs_decorrelated")


def _bench_aperture():
    spec = importlib.util.spec_from_file_location(
        "bench_aperture", Path(__file__).parent / "bench_aperture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def strip_uncertainty(ffi_dir, out_dir):
    """Copies of the FFIs without their uncertainty HDU (as TICA frames come)."""
    from astropy.io import fits
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(ffi_dir).glob("*_ffic.fits")):
        with fits.open(path) as hdul:
            primary = hdul[0].copy()
            primary.header["NEXTEND"] = 1
            fits.HDUList([primary, hdul[1].copy()]).writeto(out_dir / path.name, overwrite=True)
    return out_dir


def evaluate(truth_path, cache_path, settings):
    """Per star and method: status, codes, metrics, truth scores, CPU times."""
    from photometry_aperture.aperture import AperturePhotometry
    from photometry_linpsf.linpsf import LinPSFPhotometry
    with h5py.File(truth_path, "r") as h5:
        st = {k: h5["stars"][k][()] for k in h5["stars"]}
        true_flux = h5["flux"][()]
        rows, cols = h5.attrs["rows"], h5.attrs["cols"]
        r0, c0 = h5.attrs["row_offset"], h5.attrs["column_offset"]
    sel = np.flatnonzero((st["tmag"] <= 15) & np.isfinite(st["ideal_noise"])
                         & (st["row"] > r0 - 0.5) & (st["row"] < r0 + rows - 0.5)
                         & (st["column"] > c0 - 0.5) & (st["column"] < c0 + cols - 0.5))
    source = open_source(cache_path)
    timer = {"checks": 0.0}
    original = checks_module.check_result

    def timed(phot, cfg=None):
        t0 = time.process_time()
        try:
            return original(phot, cfg)
        finally:
            timer["checks"] += time.process_time() - t0
    checks_module.check_result = timed
    out = []
    try:
        for k in sel:
            for cls in (AperturePhotometry, LinPSFPhotometry):
                timer["checks"] = 0.0
                t0 = time.process_time()
                try:
                    phot = cls(int(st["starid"][k]), source, settings=settings)
                    status = phot.photometry().name
                except Exception as exc:  # noqa: BLE001 - a decline or failure is a result
                    out.append({"method": cls.name, "status": "ERROR", "error": str(exc),
                                "codes": (getattr(phot, "details", {}).get("checks") or {})
                                .get("codes", [])})
                    continue
                total = time.process_time() - t0
                checks = phot.details.get("checks") or {}
                ratio, amp = score_lightcurve(phot.lightcurve, true_flux[k], st["ideal_noise"][k])
                good = np.asarray(phot.lightcurve["quality"]) == 0
                scale = np.nanmedian(np.asarray(phot.lightcurve["flux"])[good]) \
                    / np.median(true_flux[k][good])
                out.append({"method": cls.name, "status": status,
                            "codes": checks.get("codes", []), "metrics": checks.get("metrics", {}),
                            "ratio": float(ratio), "scale": float(scale),
                            "amp": float(amp) if st["variable"][k] else None,
                            "cpu_total": total, "cpu_checks": timer["checks"]})
    finally:
        checks_module.check_result = original
    return out


def correct(r):
    if "ratio" not in r:
        return None
    ok = r["ratio"] <= 1.5 and (r["amp"] is None or abs(r["amp"] - 1) <= 0.05)
    return ok and (abs(r["scale"] - 1) <= 0.05 if r["method"] == "linpsf" else r["scale"] >= 0.5)


def summarize(label, results):
    print(f"\n== {label}")
    for method in ("aperture", "linpsf"):
        rs = [r for r in results if r["method"] == method]
        good = [r for r in rs if correct(r)]
        bad = [r for r in rs if correct(r) is False]
        own = {"METHOD_WARNING"}
        fp = [r for r in good if set(r["codes"]) - own]
        caught = [r for r in bad if set(r["codes"]) - own or r["status"] == "ERROR"]
        codes = collections.Counter(c for r in caught for c in r["codes"])
        failed = sum(1 for r in rs if "ratio" not in r)
        print(f"{method}: {len(rs)} light curves; correct {len(good)}, flagged {len(fp)} "
              f"{dict(collections.Counter(c for r in fp for c in r['codes']))}; incorrect "
              f"{len(bad)}, flagged {len(caught)} {dict(codes)}; failed/declined {failed}")
        for key in KEYS:
            v = np.array([r["metrics"][key] for r in good if r["metrics"].get(key) is not None])
            if v.size:
                print(f"   correct {key:16s} min {v.min():7.3f}  p1 {np.percentile(v, 1):7.3f}  "
                      f"median {np.median(v):7.3f}  p99 {np.percentile(v, 99):7.3f}  "
                      f"max {v.max():7.3f}")
        cpu = [(r["cpu_checks"], r["cpu_total"]) for r in rs if "cpu_total" in r]
        if cpu:
            c, t = np.sum(cpu, axis=0)
            print(f"   CPU: checks {1e3 * c / len(cpu):.1f} ms per target, "
                  f"{100 * c / t:.1f} % of photometry()")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[5, 6, 8])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--cadences", type=int, default=100)
    parser.add_argument("--spoc-prf", default=None, metavar="DIR")
    parser.add_argument("--no-uncertainty", action="store_true")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="write every result (label, method, "
                        "status, codes, metrics, scores) to this file")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.ERROR)
    bench = _bench_aperture()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_checks_"))
    settings = load_settings()
    print(f"# bench_checks {time.strftime('%Y-%m-%d')} on {platform.machine()}, "
          f"{platform.python_version()}; workdir {work}")
    everything = []
    for seed in args.seeds:
        truth, cache = bench.simulate_and_prepare(work / f"seed{seed}", args.size,
                                                  args.cadences, seed)
        res = evaluate(truth, cache, settings)
        for r in res:
            r["label"] = f"seed {seed}"
        everything += res
        summarize(f"simulated sector, seed {seed}", res)
    summarize(f"all {len(args.seeds)} simulated sectors", everything)
    exe = [sys.executable, "-m", "photometry.cli"]
    if args.spoc_prf:
        base = work / "spoc"
        subprocess.run(exe + ["simulate", str(base / "sim"), "--cadences", str(args.cadences),
                              "--size", str(args.size), str(args.size), "--seed", "9",
                              "--prf", args.spoc_prf], check=True, capture_output=True)
        subprocess.run(exe + ["prepare", str(base / "sim" / "ffi"), "--catalog",
                              str(base / "sim" / "catalog.csv"), "--cache", str(base / "cache"),
                              "--no-progress"], check=True, capture_output=True)
        res = evaluate(base / "sim" / "truth.h5", next((base / "cache").glob("*.hdf5")),
                       settings)
        for r in res:
            r["label"] = "spoc"
        everything += res
        summarize("sector drawn with the SPOC PRF (methods and checks use the analytic one)",
                  res)
    if args.no_uncertainty:
        seed = args.seeds[0]
        base = work / f"seed{seed}"
        ffi = strip_uncertainty(base / "sim" / "ffi", work / "nounc" / "ffi")
        subprocess.run(exe + ["prepare", str(ffi), "--catalog", str(base / "sim" / "catalog.csv"),
                              "--cache", str(work / "nounc" / "cache"), "--no-progress"],
                       check=True, capture_output=True)
        res = evaluate(base / "sim" / "truth.h5", next((work / "nounc" / "cache").glob("*.hdf5")),
                       settings)
        for r in res:
            r["label"] = "no-uncertainty"
        everything += res
        summarize(f"seed {seed} without uncertainty HDUs (issue 13 item 1)", res)
        print("   statuses:", dict(collections.Counter(
            f"{r['method']} {r['status']}" for r in res)))
    if args.json:
        import json
        Path(args.json).write_text(json.dumps(everything, default=float))


if __name__ == "__main__":
    main()
