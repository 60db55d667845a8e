"""Side by side with psfmachine 1.1.4: time to fit a crowded scene and accuracy of the fluxes.

Both tools see identical pixels: the in-memory scene of ``tests/test_linpsf.py``
(:func:`make_crowded`: 170 stars in 64 x 64 px, PRF wider than the analytic default, half the
stars variable, a 0.15 px linear drift, 120 cadences of 1800 s with photon + read noise).

* ``linpsf``: the ``linpsf_shape`` fit on the sum image, then the ``linpsf`` algorithm for every
  scored star (each target's fit also solves for its neighbours).
* ``linpsf scene``: the same shape fit, then :func:`photometry_linpsf.linpsf.fit_scene`: every
  catalog star in one sparse solve per group of cadences (issue 5's "same scene" comparison:
  shape model + all fluxes, like psfmachine).
* ``psfmachine``: ``psfmachine.Machine(time, flux, flux_err, ra, dec, sources, column, row)``
  on the same cube, minus the scene's (known, flat) sky because psfmachine expects
  background-subtracted pixels, with a linear WCS (``--arcsec-per-px``: 21 = TESS, 4 = the
  Kepler scale its hard-wired radii are tuned for; its radii ``rmin, rmax, cut_r,
  sparse_dist_lim, limit_radius, time_radius`` are scaled from their 4"-pixel defaults), catalog
  fluxes as ``sources``; then ``build_shape_model``, ``build_time_model`` (``time_resolution``
  chosen for ~20 time bins: with the default 200 and 120 cadences there is a single bin and the
  perturbation explodes, algorithms.md §1.6) and ``fit_model(fit_va=True)``. psfmachine 1.1.4
  pins numpy < 2 / astropy < 6, so it runs in its own interpreter (``--pm-python``, default
  ``.venv-psfmachine/bin/python``, created by ``make benchmarks``) on the scene saved to an
  .npz; the timing covers the Machine construction and the three fits, not the import.

Scored: stars with 8 <= Tmag <= 13 at least 7 px from the edges, on good cadences:

* ``scale``: median over cadences of flux / true flux, per star; reported as the median over
  stars (the tool's scale) and as median |scale / tool's median scale - 1| (star-to-star flux
  error after removing each tool's global scale);
* ``ratio``: scatter of flux/median - true/median over the ideal PRF-weighted noise;
* ``amp``: median |recovered / injected amplitude - 1| of the variable stars.

Usage::

    python benchmarks/bench_psfmachine.py [--seed 3] [--arcsec-per-px 21]
        [--pm-python .venv-psfmachine/bin/python] [--time-resolution 6]
"""
import argparse
import importlib.util
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: psfmachine's own half, run in the interpreter that has psfmachine 1.1.4 installed
PM_SCRIPT = r'''
import json, sys, time, warnings
import numpy as np
import pandas as pd
warnings.filterwarnings("ignore")
import psfmachine
d = np.load(sys.argv[1])
opt = json.loads(sys.argv[2])
s = opt["arcsec_per_px"] / 4.0          # psfmachine's radii are in arcsec for 4" pixels
deg = opt["arcsec_per_px"] / 3600.0
nt, nr, nc = d["images"].shape
R, C = np.mgrid[:nr, :nc]
row = R.ravel().astype(float) + (d["row_offset"] if "row_offset" in d.files else 0)
col = C.ravel().astype(float) + d["column_offset"]
flux = (d["images"] - d["sky"]).reshape(nt, -1)
flux_err = d["errors"].reshape(nt, -1)
# linear WCS at dec 0 (psfmachine has no cos(dec); at dec 0 that is exact)
ra, dec = col * deg, row * deg
sources = pd.DataFrame({"ra": d["cat_col"] * deg, "dec": d["cat_row"] * deg,
                        "phot_g_mean_flux": d["cat_flux"]})
good = d["quality"] == 0
runs = []
for _ in range(opt["repeat"]):
    t0 = time.perf_counter()
    m = psfmachine.Machine(d["time"], flux, flux_err, ra, dec, sources, col, row,
                           limit_radius=24 * s, time_mask=good, n_r_knots=10, n_phi_knots=15,
                           time_nknots=10, time_resolution=opt["time_resolution"],
                           time_radius=8 * s, rmin=1 * s, rmax=16 * s, cut_r=6 * s,
                           sparse_dist_lim=40 * s, sources_flux_column="phot_g_mean_flux")
    m.quiet = True
    t1 = time.perf_counter()
    m.build_shape_model(plot=False)
    if opt["fix_norm"]:
        # diagnostic (algorithms.md 1.6): undo the log-space "normalisation" (a factor on the
        # log-weights), then rescale the linear model so that interior stars' rows sum to 1
        if m.normalized_shape_model:
            m.psf_w = m.psf_w / np.log10(m.mean_model_integral)
        m._get_mean_model()
        r0 = d["row_offset"] if "row_offset" in d.files else 0
        inner = ((d["cat_row"] - r0 > 8) & (d["cat_row"] - r0 < nr - 9)
                 & (d["cat_col"] - d["column_offset"] > 8)
                 & (d["cat_col"] - d["column_offset"] < nc - 9))
        sums = np.asarray(m.mean_model.sum(axis=1)).ravel()
        m.mean_model = m.mean_model.multiply(1.0 / np.median(sums[inner[:len(sums)]])).tocsr()
    t2 = time.perf_counter()
    m.build_time_model(plot=False)
    t3 = time.perf_counter()
    m.fit_model(fit_va=True)
    t4 = time.perf_counter()
    runs.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))
t_init, t_shape, t_time, t_fit = np.median(runs, axis=0)
# which catalog rows survived (Machine drops sources without pixels)
out = dict(ws=np.asarray(m.ws), ws_va=np.asarray(m.ws_va),
           ra=np.asarray(m.sources["ra"]), dec=np.asarray(m.sources["dec"]),
           mean_model_sum=np.asarray(m.mean_model.sum(axis=1)).ravel(),
           t_init=t_init, t_shape=t_shape, t_time=t_time, t_fit=t_fit,
           t_first=sum(runs[0]),
           version=psfmachine.__version__)
np.savez(sys.argv[3], **out)
'''


def _scenes():
    spec = importlib.util.spec_from_file_location("test_linpsf", ROOT / "tests" / "test_linpsf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def scored_stars(truth, size):
    """Indices of the scored stars and the set of crowded ones (as bench_linpsf)."""
    out = []
    for k in range(len(truth["tmag"])):
        r, c = truth["rows"][k], truth["cols"][k] - 44
        if 8 <= truth["tmag"][k] <= 13 and 7 <= r <= size - 8 and 7 <= c <= size - 8:
            out.append(k)
    return out


def score(flux, truth, k, good):
    """(scale, scatter / ideal, |amp - 1|) of one light curve of star k."""
    from photometry.sim.evaluation import compare_to_truth
    true = truth["flux"][k]
    flux = np.asarray(flux, dtype=float)
    scale = float(np.median(flux[good]) / np.median(true[good]))
    if not np.all(np.isfinite(flux[good])) or np.median(flux[good]) <= 0:
        return scale, np.nan, np.nan
    scatter, amp = compare_to_truth(flux, true, good)
    ratio = scatter / (truth["ideal_noise"][k] / np.median(true[good]))
    return scale, float(ratio), (abs(amp - 1) if truth["amp"][k] > 0 else np.nan)


def run_linpsf(T, source, truth, targets):
    """Shape fit + linpsf photometry of every target; per-star scores and timings."""
    t0 = time.perf_counter()
    group, res = T.shape_group(source, truth, T._settings()["linpsf"])
    t_shape = time.perf_counter() - t0
    source.models["linpsf_shape"] = group
    out, t_phot = {}, 0.0
    for k in targets:
        t0 = time.perf_counter()
        phot = T.LinPSFPhotometry(k + 1, source, settings=T._settings())
        phot.photometry()
        t_phot += time.perf_counter() - t0
        good = np.asarray(phot.lightcurve["quality"]) == 0
        out[k] = score(phot.lightcurve["flux"], truth, k, good)
    return out, {"shape": t_shape, "photometry": t_phot}


def _clear_caches():
    """Forget linpsf's per-process look-up tables, so every repeat starts cold."""
    from photometry_linpsf import model
    for cache in (model._TABLES, model._SIMPSON, model._LATTICE, model._DESIGNS):
        cache.clear()


def run_scene(T, source, truth, targets, rebuild_tolerance=0.03, repeat=1):
    """Shape fit + :func:`photometry_linpsf.linpsf.fit_scene_two_pass` (every star at once),
    ``repeat`` times from cold caches; the median times."""
    runs = []
    for _ in range(repeat):
        _clear_caches()
        out, t = _run_scene_once(T, source, truth, targets, rebuild_tolerance)
        runs.append(t)
    t = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
    t["first"] = runs[0]["shape"] + runs[0]["scene"]
    return out, t


def _run_scene_once(T, source, truth, targets, rebuild_tolerance):
    from photometry_linpsf.linpsf import fit_scene_two_pass
    from photometry_linpsf.stage import load_shape_model
    from photometry.hooks.utilities import mag2flux
    t0 = time.perf_counter()
    group, _ = T.shape_group(source, truth, T._settings()["linpsf"])
    t_shape = time.perf_counter() - t0
    cat = source.catalog_table()
    kern = source.movement_kernel
    good = source.quality == 0
    t0 = time.perf_counter()
    cfg = T._settings()["linpsf"]
    flux, _, _, info = fit_scene_two_pass(source._cubes["images"], source._cubes["errors"],
                                 np.asarray(cat["row"], float), np.asarray(cat["column"], float),
                                 mag2flux(np.asarray(cat["tmag"], float)),
                                 load_shape_model(group), drow=kern.drow, dcol=kern.dcol,
                                 good=good, window=cfg["neighbour_smoothing"],
                                 clip=cfg["neighbour_clip"],
                                 origin=(source.row_offset, source.column_offset),
                                 rebuild_tolerance=rebuild_tolerance)
    t_fit = time.perf_counter() - t0
    out = {k: score(flux[:, k], truth, k, good) for k in targets}
    return out, {"shape": t_shape, "scene": t_fit, "n_designs": info["n_designs"]}


def run_psfmachine(source, truth, targets, python, arcsec_per_px, time_resolution, sky,
                   fix_norm=False, repeat=1):
    """psfmachine on the same cube in its own interpreter; per-star scores and timings."""
    cat = source.catalog_table()
    from photometry.hooks.utilities import mag2flux
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "scene.npz", images=source._cubes["images"],
                 errors=source._cubes["errors"], time=source.time, quality=source.quality,
                 column_offset=source.column_offset, row_offset=source.row_offset, sky=sky,
                 cat_row=np.asarray(cat["row"], float), cat_col=np.asarray(cat["column"], float),
                 cat_flux=mag2flux(np.asarray(cat["tmag"], float)))
        (tmp / "pm.py").write_text(PM_SCRIPT)
        # psfmachine creates ~/.psfmachine-cache (and config dirs) at import: keep them in tmp
        env = dict(os.environ, HOME=str(tmp), MPLBACKEND="Agg")
        opt = json.dumps({"arcsec_per_px": arcsec_per_px, "time_resolution": time_resolution,
                          "fix_norm": fix_norm, "repeat": repeat})
        t0 = time.perf_counter()
        proc = subprocess.run([python, str(tmp / "pm.py"), str(tmp / "scene.npz"), opt,
                               str(tmp / "out.npz")], env=env, capture_output=True, text=True)
        t_proc = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"psfmachine run failed:\n{proc.stderr[-3000:]}")
        r = dict(np.load(tmp / "out.npz"))
    deg = arcsec_per_px / 3600.0
    # map psfmachine's (possibly reduced) source list back to catalog rows by position
    crow, ccol = np.asarray(cat["row"], float), np.asarray(cat["column"], float)
    idx = {}
    for j, (ra, dec) in enumerate(zip(r["ra"], r["dec"])):
        k = int(np.argmin(np.hypot(ccol - ra / deg, crow - dec / deg)))
        idx[k] = j
    good = source.quality == 0
    out = {"va": {}, "novA": {}}
    for k in targets:
        if k not in idx:
            out["va"][k] = out["novA"][k] = (np.nan, np.nan, np.nan)
            continue
        out["va"][k] = score(r["ws_va"][:, idx[k]], truth, k, good)
        out["novA"][k] = score(r["ws"][:, idx[k]], truth, k, good)
    times = {key[2:]: float(r[key]) for key in ("t_init", "t_shape", "t_time", "t_fit",
                                                 "t_first")}
    times["process"] = t_proc
    info = {"version": str(r["version"]), "n_sources": len(r["ra"]),
            "row_sum": float(np.median(r["mean_model_sum"]))}
    return out, times, info


def summarise(scores, keys):
    """Median scale, median |scale/median - 1|, median ratio, median |amp-1| over keys."""
    a = np.array([scores[k] for k in keys], dtype=float)
    if not len(a):
        return [np.nan] * 4
    sc = a[:, 0]
    ok = np.isfinite(sc) & (sc > 0)
    med = np.median(sc[ok]) if ok.any() else np.nan
    dev = np.median(np.abs(sc[ok] / med - 1)) if ok.any() else np.nan
    return [med, dev, np.nanmedian(a[:, 1]), np.nanmedian(a[:, 2])]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--nstar", type=int, default=170)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--cadences", type=int, default=120)
    ap.add_argument("--arcsec-per-px", type=float, nargs="+", default=[21.0])
    ap.add_argument("--time-resolution", type=int, default=6)
    ap.add_argument("--pm-python", default=".venv-psfmachine/bin/python")
    ap.add_argument("--skip-linpsf", action="store_true")
    ap.add_argument("--skip-psfmachine", action="store_true")
    ap.add_argument("--rebuild-tolerance", type=float, default=0.03,
                    help="fit_scene: px of motion before a new design is built")
    ap.add_argument("--repeat", type=int, default=5,
                    help="time each tool this many times (median; ours from cold caches)")
    ap.add_argument("--fix-norm", action="store_true",
                    help="also run psfmachine with its normalisation undone and the model rows "
                         "rescaled to a unit sum (diagnostic of algorithms.md 1.6)")
    args = ap.parse_args(argv)
    T = _scenes()
    source, truth = T.make_crowded(seed=args.seed, shape=(args.size, args.size),
                                   n=args.cadences, nstar=args.nstar)
    targets = scored_stars(truth, args.size)
    crowded = set(T._crowded_targets(truth, (args.size, args.size)))
    print(f"scene: {args.nstar} stars in {args.size}x{args.size} px, {args.cadences} cadences, "
          f"seed {args.seed}; {len(targets)} scored stars ({len(crowded)} crowded)")
    results = {}
    sc, t = run_scene(T, source, truth, targets, args.rebuild_tolerance, args.repeat)
    results["linpsf scene"] = (sc, t["shape"] + t["scene"])
    print(f"linpsf scene mode (median of {args.repeat}): shape {t['shape']:.2f} s, two-pass "
          f"fit_scene {t['scene']:.2f} s ({t['n_designs']:.0f} designs) for all {args.nstar} "
          f"stars; total {t['shape'] + t['scene']:.2f} s (first run {t['first']:.2f} s)")
    if not args.skip_linpsf:
        sc, t = run_linpsf(T, source, truth, targets)
        results["linpsf"] = (sc, t["shape"] + t["photometry"])
        print(f"linpsf: shape {t['shape']:.1f} s, photometry {t['photometry']:.1f} s for "
              f"{len(targets)} targets ({t['photometry'] / len(targets):.2f} s each)")
    runs = [] if args.skip_psfmachine else [(s, False) for s in args.arcsec_per_px]
    runs += [(s, True) for s in args.arcsec_per_px] if args.fix_norm else []
    for scale, fix in runs:
        try:
            pm, t, info = run_psfmachine(source, truth, targets, args.pm_python, scale,
                                         args.time_resolution, T.SKY, fix, args.repeat)
        except (RuntimeError, OSError) as err:
            print(f"psfmachine ({scale:g}\"/px) failed: {err}")
            continue
        total = t["init"] + t["shape"] + t["time"] + t["fit"]
        tag = f"pm{scale:g}{'fix' if fix else ''}"
        print(f"psfmachine {info['version']}{' + norm fix' if fix else ''} at {scale:g}\"/px: "
              f"{info['n_sources']} sources, "
              f"init {t['init']:.2f} s, shape {t['shape']:.2f} s, time model {t['time']:.2f} s, "
              f"fit_model(fit_va) {t['fit']:.2f} s; total {total:.2f} s (median of {args.repeat}; "
              f"first run {t['first']:.2f} s; process with import "
              f"{t['process']:.1f} s); median mean_model row sum {info['row_sum']:.3f}")
        results[f"{tag} VA"] = (pm["va"], total)
        results[f"{tag} noVA"] = (pm["novA"], total)
    print(f"{'tool':14s} {'stars':8s} {'n':>3s} {'scale':>7s} {'|s/med-1|':>9s} {'ratio':>7s} "
          f"{'|amp-1|':>8s} {'time s':>7s}")
    for name, (sc, total) in results.items():
        for label, keys in (("crowded", [k for k in targets if k in crowded]),
                            ("others", [k for k in targets if k not in crowded]),
                            ("all", targets)):
            med, dev, ratio, amp = summarise(sc, keys)
            print(f"{name:14s} {label:8s} {len(keys):3d} {med:7.3f} {dev:9.4f} {ratio:7.2f} "
                  f"{amp:8.4f} {total:7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
