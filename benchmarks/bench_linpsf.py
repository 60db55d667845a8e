"""Benchmark of the linear PRF plugin against simulation truth, side by side with aperture.

Scenes are the in-memory ones of ``tests/test_linpsf.py`` (:func:`make_crowded`: stars on a
flat sky, a PRF wider than the analytic default, half the stars variable, a 0.15 px linear
drift followed by the movement kernel, 1800 s cadences with photon + read noise). The shape
model is fitted by the ``linpsf_shape`` code on the scene's sum image. For every star with
8 <= Tmag <= 13 away from the edges it reports, on good cadences:

* ``ratio``: scatter of ``flux/median - true/median`` over the ideal PRF-weighted noise;
* ``amp``: recovered / injected relative amplitude (variable stars);
* ``scale``: median flux / median true flux (linpsf only: its flux is the total flux);

for ``linpsf`` (fitted shape), ``linpsf-true`` (the true PRF given as ``phot.prf``: the
solver's floor) and ``aperture``; separately for "crowded" stars (a neighbour < 3 px and
< 2.5 mag fainter) and the others, plus the time per target.

Usage::

    python benchmarks/bench_linpsf.py [--nstar 170] [--size 64] [--cadences 120]
        [--seed 3] [--no-drift] [--aperture-every 2]
"""
import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np

from photometry.data.memory_source import MemorySource

ROOT = Path(__file__).resolve().parents[1]


def _scenes():
    spec = importlib.util.spec_from_file_location("test_linpsf", ROOT / "tests" / "test_linpsf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(nstar=170, size=64, cadences=120, seed=3, drift=True, aperture_every=2):
    T = _scenes()
    from photometry.data.prf import AnalyticPRF

    t0 = time.perf_counter()
    source, truth = T.make_crowded(seed=seed, shape=(size, size), n=cadences, nstar=nstar,
                                   drift_px=0.15 if drift else 0.0)
    t_scene = time.perf_counter() - t0
    t0 = time.perf_counter()
    group, res = T.shape_group(source, truth, T._settings()["linpsf"])
    t_shape = time.perf_counter() - t0
    source.models["linpsf_shape"] = group

    class TruePRF(T.LinPSFPhotometry):
        prf = AnalyticPRF(**T.TRUE_PRF)

    bare = MemorySource(source._cubes, source._catalog, source.time, source.quality,
                        movement_kernel=source.movement_kernel)
    crowded = set(T._crowded_targets(truth, (size, size)))
    rows = []
    times = {"linpsf": [], "aperture": []}
    for k in range(len(truth["tmag"])):
        r, c = truth["rows"][k], truth["cols"][k] - 44
        if not (8 <= truth["tmag"][k] <= 13 and 7 <= r <= size - 8 and 7 <= c <= size - 8):
            continue
        row = {"k": k, "tmag": truth["tmag"][k], "crowded": k in crowded}
        t0 = time.perf_counter()
        phot = T.LinPSFPhotometry(k + 1, source, settings=T._settings())
        phot.photometry()
        times["linpsf"].append(time.perf_counter() - t0)
        row["ratio"], row["amp"] = T.measure(phot, truth, k)
        good = np.asarray(phot.lightcurve["quality"]) == 0
        row["scale"] = np.median(np.asarray(phot.lightcurve["flux"])[good]) / \
            np.median(truth["flux"][k][good])
        true = TruePRF(k + 1, bare, settings=T._settings())
        true.photometry()
        row["ratio_true"], row["amp_true"] = T.measure(true, truth, k)
        row["ratio_ap"] = row["amp_ap"] = np.nan
        if len(rows) % aperture_every == 0:
            t0 = time.perf_counter()
            aper = T.AperturePhotometry(k + 1, source, settings=T._settings())
            aper.photometry()
            times["aperture"].append(time.perf_counter() - t0)
            row["ratio_ap"], row["amp_ap"] = T.measure(aper, truth, k)
        rows.append(row)
    return rows, res, {"scene": t_scene, "shape": t_shape,
                       "linpsf": float(np.mean(times["linpsf"])),
                       "aperture": float(np.mean(times["aperture"])) if times["aperture"] else
                       float("nan")}


def _med(rows, key, absdev=False):
    v = np.array([r[key] for r in rows], dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return float("nan"), 0
    return float(np.median(np.abs(v - 1)) if absdev else np.median(v)), v.size


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nstar", type=int, default=170)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--cadences", type=int, default=120)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--no-drift", action="store_true")
    ap.add_argument("--aperture-every", type=int, default=2)
    args = ap.parse_args(argv)
    rows, res, times = run(args.nstar, args.size, args.cadences, args.seed, not args.no_drift,
                           args.aperture_every)
    print(f"scene: {args.nstar} stars in {args.size}x{args.size} px, {args.cadences} cadences, "
          f"drift {'off' if args.no_drift else '0.15 px'}, seed {args.seed}")
    print(f"shape model: {res['n_stars']} stars, flux captured {res['flux_captured']:.4f}, "
          f"residual rms {res['residual_rms']:.2e} of the flux per pixel, lattice spread "
          f"{res['lattice_spread']:.2e}, fit {times['shape']:.1f} s")
    print(f"time per target: linpsf {times['linpsf']:.2f} s, aperture {times['aperture']:.2f} s")
    print(f"{'stars':10s} {'n':>4s} {'linpsf':>8s} {'lin-true':>8s} {'aperture':>8s} "
          f"{'|amp-1| lin':>11s} {'lin-true':>8s} {'aperture':>8s} {'scale':>7s}")
    for name, sel in (("crowded", [r for r in rows if r["crowded"]]),
                      ("others", [r for r in rows if not r["crowded"]]), ("all", rows)):
        if not sel:
            continue
        print(f"{name:10s} {len(sel):4d} {_med(sel, 'ratio')[0]:8.3f} "
              f"{_med(sel, 'ratio_true')[0]:8.3f} {_med(sel, 'ratio_ap')[0]:8.3f} "
              f"{_med(sel, 'amp', True)[0]:11.4f} {_med(sel, 'amp_true', True)[0]:8.4f} "
              f"{_med(sel, 'amp_ap', True)[0]:8.4f} {_med(sel, 'scale')[0]:7.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
