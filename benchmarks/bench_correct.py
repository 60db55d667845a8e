"""Benchmark of the light-curve correction "cbv" against lightkurve's correctors, side by side.

Two kinds of input, both with known truth:

1. **Synthetic CCD ensembles** (``photometry.sim.lcsim``: 400 stars x 1000 cadences at 30 min, two
   orbits, three common systematics whose coefficients vary over the CCD and scatter from star
   to star, 15 % variable stars), in several configurations and two families of shapes
   (`systematics="orbit"`, TESS-like per-orbit ramps and drifts; `"steps"`, a sector-long
   ramp, pointing steps at the dumps and a 1.7-d oscillation).
2. **A simulated sector through the pixel pipeline** (``tessphot simulate --focus-change``, a
   PRF-width ramp that the apertures lose flux to; ``prepare``, ``todo``, ``run``), its SAP
   light curves as written.

Into both, sinusoids (1 %, periods 0.5-10 d) and box transits (1-10 mmag, 3 h) are injected
into quiet stars' SAP fluxes. Then on the same light curves and the same co-trending vectors
(ours, from the CCD's quiet stars):

* ``cbv``: our correction (MAP fit with the neighbours' prior and red-noise weighting);
  ``cbv, own fits`` the same, but the light curves without the injections fitted as an
  ensemble of their own (other basis stars, so other vector noise in the difference);
* ``lk_regression``: lightkurve's ``RegressionCorrector`` (least squares, 5-sigma clipping);
* ``lk_cbv``: lightkurve's ``CBVCorrector.correct`` (its L2 prior width optimised with its
  over-fitting metric; the under-fitting metric needs MAST neighbours, so it is off).

Figures: the fraction of each injected sinusoid's amplitude and transit's depth that the
correction keeps (measured on the corrected light curve with the injection minus the one
without, both through the one CCD fit, so free of noise; 1 = kept), the 10th percentile and
median of the systematic reduction of constant stars whose systematic is 3x their noise
(binned 0.5 d, noise subtracted; larger = better),
CPU seconds per star. Part 2 also writes the CCD's CDPP-versus-Tmag plot
(``--figure docs/cdpp_summary.png``) and prints the measured/expected CDPP ratio by magnitude.

Usage::

    python benchmarks/bench_correct.py [--quick] [--workdir DIR] [--figure PNG] [--skip-scene]
        [--skip-synthetic] [--no-peers | --peer-configs I ...] [--peers NAME ...]
        [--lk-constant N] [--scene-seeds S ...]
        [--set cbv.KEY=VALUE ...]
    python benchmarks/bench_correct.py --oracle     # 5-10 d sinusoids: ours against two oracles
"""
import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from photometry.scheduler.correct import correct_ensemble
from photometry.sim.lcsim import (inject_sinusoid, inject_transit, sinusoid_amplitude,
                                  synthetic_ensemble, systematic_rms, transit_depth)
from photometry.hooks.settings import load_settings
from photometry import STATUS
from photometry_cbv import CBVCorrection

PERIODS = (0.5, 1.0, 2.0, 5.0, 10.0)
DEPTHS = (1e-3, 3e-3, 1e-2)
#: ``section.key=value`` settings of our correction (``--set``)
ASSIGNMENTS = []
CONFIGS = [  # (seed, systematics scale, coefficient scatter, lcsim systematics family)
    (0, 1.0, 0.1, "orbit"), (3, 2.0, 0.05, "orbit"), (7, 1.0, 0.2, "orbit"),
    (11, 3.0, 0.1, "orbit"), (7, 1.0, 0.2, "steps")]


def _lk_correct(kind, time, flux, err, vectors, good):
    """lightkurve's corrected relative flux of one star, with our vectors as its regressors."""
    import lightkurve as lk
    from lightkurve.correctors import CBVCorrector, DesignMatrix, RegressionCorrector
    import astropy.units as u
    lc = lk.LightCurve(time=time, flux=flux * u.electron / u.s,
                       flux_err=err * u.electron / u.s)
    lc.meta.update({"MISSION": "TESS", "SECTOR": 1, "CAMERA": 1, "CCD": 1})
    dm = DesignMatrix(vectors.T, name="cbv").append_constant()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "lk_regression":
            out = RegressionCorrector(lc).correct(dm, cadence_mask=good)
        else:
            corr = CBVCorrector(lc, do_not_load_cbvs=True)
            import contextlib
            import io
            with contextlib.redirect_stdout(io.StringIO()):      # it prints its alpha
                out = corr.correct(cbv_type=None, cbv_indices=None, ext_dm=dm,
                                   cadence_mask=good, target_under_score=-1)
    return np.asarray(out.flux.value, float)


def inject(ens, quiet, rng):
    """20 sinusoids into quiet stars, 18 transits into bright quiet ones; {index: spec}."""
    chosen = rng.choice(quiet, 20, replace=False)
    bright = np.setdiff1d(quiet[ens.tmag[quiet] < 11.0], chosen)
    hosts = rng.choice(bright, min(18, bright.size), replace=False)
    specs = {}
    for j, i in enumerate(chosen):
        ens.flux[i] = inject_sinusoid(ens.flux[i], ens.time, PERIODS[j % 5], 0.01, phase=j)
        specs[int(i)] = ("sinusoid", PERIODS[j % 5], 0.01)
    for j, i in enumerate(hosts):
        spec = ("transit", 3.1 + 0.37 * j, ens.time[0] + 0.5 + 0.13 * j, 0.125, DEPTHS[j % 3])
        ens.flux[i] = inject_transit(ens.flux[i], ens.time, *spec[1:])
        specs[int(i)] = spec
    return specs


def signal_kept(ens, specs, inj, plain):
    """Per injected star: (kind, size, fraction of the signal kept by the correction, whether
    its photometry STATUS is OK).

    The signal that survives is the corrected light curve with the injection minus the one
    without (same noise, same systematics, each corrected on its own ensemble), so the ratio
    is free of noise: 1 = kept, 0 = removed.
    """
    out = []
    for i, spec in specs.items():
        if inj.get(i) is None or plain.get(i) is None:
            continue
        g = ens.good[i]
        diff = (inj[i] - plain[i]) / np.median(plain[i][g])
        if spec[0] == "sinusoid":
            r = sinusoid_amplitude(ens.time, diff, spec[1], g) / spec[2]
        else:
            r = transit_depth(ens.time, diff, *spec[1:4], g) / spec[4]
        ok = ens.status is None or ens.status[i] == STATUS.OK
        out.append((spec[0], spec[-1] if spec[0] == "transit" else spec[1], float(r), ok))
    return out


def reduction(ens, ideal_rel, corrected, constant, noise):
    """Systematic rms before / after for constant stars whose systematic is 3x their noise;
    (all, those whose photometry STATUS is OK). A WARNING light curve (a 1-pixel or
    truncated aperture, noise far above the photon limit) responds to pointing and focus in
    its own way, which no co-trending vector common to the CCD holds; its flag says so."""
    red, ok = [], []
    for i in constant:
        if corrected.get(i) is None:
            continue
        g = ens.good[i]
        before = systematic_rms(ens.time, ens.flux[i] / np.median(ens.flux[i][g]) - 1
                                - ideal_rel[i], g)
        if before < 3 * noise[i]:
            continue
        after = systematic_rms(ens.time, corrected[i] / np.median(corrected[i][g]) - 1
                               - ideal_rel[i], g)
        red.append(before / max(after, 1e-9))
        if ens.status is None or ens.status[i] == STATUS.OK:
            ok.append(red[-1])
    return red, ok


def compare(plain, ens, ideal_rel, specs, constant, noise, n_lk_constant=80, rng=None,
            peers=("lk_regression", "lk_cbv"), contamination=None):
    """The three methods on one ensemble, with (``ens``) and without (``plain``) the
    injections; {method: (signal_kept, reductions, CPU s per star, vectors)}.
    ``contamination`` (per star) is what the correction's candidates see (default 0)."""
    out = {}
    t0 = time.process_time()
    corr = CBVCorrection(load_settings(assignments=ASSIGNMENTS))
    results = correct_ensemble(corr, ens, contamination)
    cpu = (time.process_time() - t0) / len(results)
    # without the injection, through the same CCD fit (vectors and prior of the ensemble
    # with it, as the lightkurve peers below use the same vectors for both): the difference
    # is what the star's own fit does to its signal. Fitted on its own, the ensemble without
    # the injections has other basis stars, so other vector noise, and the difference also
    # carries the two sets' noise times the star's coefficients ("cbv, own fits")
    with threadpool_limits(1):
        base = [corr.correct(plain.star(i)) for i in range(len(plain.starid))]
    own = correct_ensemble(CBVCorrection(load_settings(assignments=ASSIGNMENTS)), plain,
                           contamination)
    inj = {i: r.flux for i, r in enumerate(results)}
    for name, without in (("cbv", base), ("cbv, own fits", own)):
        # a star corrected with the injection and left alone without it (or the other way:
        # the noise rule, PDC_NOI near its limit) has no "kept" fraction: the difference of
        # the two would be the systematic itself; such stars are counted, not measured
        same = {i: (r.flux if r.method == b.method else None)
                for i, (r, b) in enumerate(zip(results, without))}
        flips = [i for i in specs if same[i] is None]
        if flips:
            print(f"  {name}: {len(flips)} injected star(s) corrected with the injection and "
                  f"not without it, or the reverse (not measured): {flips}", file=sys.stderr)
        out[name] = (signal_kept(ens, specs, same, {i: r.flux for i, r in enumerate(without)}),
                     reduction(ens, ideal_rel, inj, constant, noise), cpu,
                     corr.vectors.shape[0])
    vectors = corr.vectors
    some = list(rng.choice(constant, min(n_lk_constant, len(constant)), replace=False))
    for kind in peers:
        t0 = time.process_time()
        inj = {int(i): _lk_correct(kind, ens.time, ens.flux[i], ens.flux_err[i], vectors,
                                   ens.good[i]) for i in list(specs) + some}
        cpu = (time.process_time() - t0) / len(inj)
        without = {int(i): _lk_correct(kind, plain.time, plain.flux[i], plain.flux_err[i],
                                       vectors, plain.good[i]) for i in specs}
        out[kind] = (signal_kept(ens, specs, inj, without),
                     reduction(ens, ideal_rel, inj, some, noise), cpu, vectors.shape[0])
    return out


def synthetic_part(quick=False, peers=("lk_regression", "lk_cbv"), peer_configs=None,
                   n_lk_constant=80):
    """Every configuration of CONFIGS (the first with ``quick``); the lightkurve peers on
    those whose index is in ``peer_configs`` (None: all; lightkurve's CBVCorrector costs
    seconds per star)."""
    rows = []
    for n, (seed, scale, scatter, family) in enumerate(CONFIGS[:1] if quick else CONFIGS):
        print(f"synthetic {family} seed {seed} ...", file=sys.stderr, flush=True)
        ens, truth = synthetic_ensemble(n_stars=400, n_cadences=1000, seed=seed, scale=scale,
                                        scatter=scatter, systematics=family)
        rng = np.random.default_rng(99)
        quiet = np.flatnonzero(~truth["variable"] & (ens.tmag < 12.5))
        plain = ens.subset(np.arange(len(ens.starid)))
        specs = inject(ens, quiet, rng)
        ideal = {}
        for i in range(len(ens.starid)):
            g = ens.good[i]
            f = ens.flux[i] / (1 + truth["systematic"][i])
            ideal[i] = f / np.median(f[g]) - 1
        constant = [i for i in np.flatnonzero(~truth["variable"]) if i not in specs]
        res = compare(plain, ens, ideal, specs, constant, truth["sigma"], rng=rng,
                      n_lk_constant=n_lk_constant,
                      peers=peers if peer_configs is None or n in peer_configs else ())
        rows.append({"input": f"synthetic {family} seed {seed}, scale {scale}, "
                              f"scatter {scatter}",
                     "results": res})
    return rows


def oracle_part():
    """The 5-10 d sinusoids of each synthetic ensemble: what our correction keeps beside two
    oracles, our own MAP fit with the true systematic shapes and the true prior (their smooth
    CCD dependence and star-to-star scatter), and a fit that also knows the signal's period
    (a free sinusoid beside the true shapes and prior). Rows of (input, ours, oracle MAP,
    oracle with the period: each min, max)."""
    from photometry_cbv.basis import map_fit, normalise
    rows = []
    for seed, scale, scatter, family in CONFIGS:
        ens, truth = synthetic_ensemble(n_stars=400, n_cadences=1000, seed=seed, scale=scale,
                                        scatter=scatter, systematics=family)
        quiet = np.flatnonzero(~truth["variable"] & (ens.tmag < 12.5))
        plain = ens.subset(np.arange(len(ens.starid)))
        specs = inject(ens, quiet, np.random.default_rng(99))
        inj = correct_ensemble(CBVCorrection(load_settings(assignments=ASSIGNMENTS)), ens)
        base = correct_ensemble(CBVCorrection(load_settings(assignments=ASSIGNMENTS)), plain)
        t, shapes = ens.time, truth["shapes"]
        norm = np.linalg.norm(shapes, axis=1)
        vectors = shapes / norm[:, None]
        got = {"ours": [], "oracle MAP": [], "oracle with period": []}
        for i, spec in specs.items():
            if spec[0] != "sinusoid" or spec[1] < 5:
                continue
            g, period = ens.good[i], spec[1]

            def kept(with_, without):
                return sinusoid_amplitude(t, (with_ - without) / np.median(without[g]),
                                          period, g) / spec[2]
            got["ours"].append(kept(inj[i].flux, base[i].flux))
            mean = truth["coeff_mean"][i] * norm
            var = (scatter * mean) ** 2
            fits = [f / (1 + map_fit(normalise(f, g)[0], vectors, g, mean, var,
                                     time=t).systematic) for f in (ens.flux[i], plain.flux[i])]
            got["oracle MAP"].append(kept(*fits))
            y = normalise(ens.flux[i], g)[0]
            x = np.vstack([vectors, np.sin(2 * np.pi * t / period),
                           np.cos(2 * np.pi * t / period), np.ones_like(t)])[:, g]
            lam = np.diag(np.r_[1 / var, 0.0, 0.0, 0.0])
            s2 = truth["sigma"][i] ** 2
            c = np.linalg.solve(x @ x.T / s2 + lam, x @ y[g] / s2 + lam @ np.r_[mean, 0, 0, 0])
            ideal = ens.flux[i] / (1 + truth["systematic"][i])
            corr = ens.flux[i] / (1 + c[:3] @ vectors)
            got["oracle with period"].append(
                sinusoid_amplitude(t, corr / np.median(corr[g]) - 1, period, g)
                / sinusoid_amplitude(t, ideal / np.median(ideal[g]) - 1, period, g))
        rows.append((f"{family} seed {seed}, scale {scale}, scatter {scatter}",
                     {k: (min(v), max(v)) for k, v in got.items()}))
    return rows


def scene_ensemble(workdir):
    """The scene's SAP light curves (Tmag >= 7.5) as an :class:`Ensemble`, with the truth:
    (ensemble, index of each star in truth.h5, variable (all truth stars), true flux (all),
    contamination of each light curve (1 - CROWDSAP, what the pipeline's candidates see)).
    Each light curve's photometry STATUS comes from todo.sqlite, as the pipeline's does."""
    import h5py
    from astropy.io import fits
    from photometry.scheduler.correct import Ensemble, finished_lightcurves, fit_cadences
    workdir = Path(workdir)
    done = finished_lightcurves(workdir / "cache", workdir / "lc")
    status_of = dict(zip(done["starid"], done["status"]))
    with h5py.File(workdir / "sim" / "truth.h5") as tr:
        ids = tr["stars/starid"][()]
        variable = tr["stars/variable"][()]
        true = tr["flux"][()]
    files = sorted((workdir / "lc").rglob("*_lc.fits"))
    rows, flux, err, quality, tmag, rc, ok_ids, ff, cont = [], [], [], [], [], [], [], [], []
    for f in files:
        with fits.open(f) as hdul:
            d, h = hdul["LIGHTCURVE"].data, hdul[0].header
            if h["TESSMAG"] < 7.5:
                continue
            i = int(np.flatnonzero(ids == h["TICID"])[0])
            rows.append(i)
            flux.append(np.array(d["SAP_FLUX"], float))
            err.append(np.array(d["SAP_FLUX_ERR"], float))
            quality.append(np.array(d["QUALITY"], np.int64))
            tmag.append(h["TESSMAG"])
            rc.append((np.nanmedian(d["MOM_CENTR2"]) - 1, np.nanmedian(d["MOM_CENTR1"]) - 1))
            ff.append(hdul["LIGHTCURVE"].header.get("FLFRCSAP") or np.nan)
            # the pipeline's candidates() sees AP_CONT = 1 - CROWDSAP (todo.sqlite)
            cont.append(1.0 - (hdul["LIGHTCURVE"].header.get("CROWDSAP") or np.nan))
            ok_ids.append(h["TICID"])
            t, cad = np.array(d["TIME"], float), np.array(d["CADENCENO"])
    flux, err, quality = np.array(flux), np.array(err), np.array(quality)
    rc = np.array(rc)
    ens = Ensemble(1, 1, 4, 1800, "aperture", t, cad, np.array(ok_ids), np.array(tmag),
                   rc[:, 0], rc[:, 1], flux.copy(), err, quality, fit_cadences(quality, flux),
                   np.array(ff, float),
                   status=np.array([status_of[i] for i in ok_ids], np.int64))
    return ens, rows, variable, true, np.array(cont, float)


def scene_part(workdir, quick=False, figure=None, peers=("lk_regression", "lk_cbv"),
               n_lk_constant=80, seed=8):
    """The simulated sector (``simulate --seed seed``) through the pixel pipeline, then the
    same comparison."""
    print("simulated sector ...", file=sys.stderr, flush=True)
    from photometry.output.summary import ratio_by_magnitude
    from astropy.table import Table

    workdir = Path(workdir)
    size, cadences = (128, 600) if quick else (192, 1000)
    t0 = time.perf_counter()
    if not (workdir / "lc" / "summary").exists():      # --workdir of an earlier run: reused
        _pipeline(workdir, size, cadences, seed)
    pipeline = time.perf_counter() - t0
    summary = Table.read(workdir / "lc" / "summary" / "s0001-1-4-c1800_summary.fits")
    ratios = {c: ratio_by_magnitude(summary, c) for c in ("ratio_sap", "ratio_pdcsap")}
    if figure:
        shutil.copy(workdir / "lc" / "summary" / "s0001-1-4-c1800_cdpp.png", figure)

    ens, rows, variable, true, contamination = scene_ensemble(workdir)
    flux = ens.flux.copy()
    rng = np.random.default_rng(5)
    quiet = np.flatnonzero(~variable[rows] & (ens.tmag < 12.5))
    plain = ens.subset(np.arange(len(rows)))
    specs = inject(ens, quiet, rng)
    ideal = {}
    # without systematics, same noise: SAP / true is systematic x (1 + noise), so the light
    # curve divided by the 0.5-d running median of SAP / true keeps signal and noise only
    for k in range(len(rows)):
        g = ens.good[k]
        r = flux[k] / true[rows[k]]
        r = r / np.median(r[g])
        slow = _running_median(ens.time, r, g, 0.5)
        base = ens.flux[k] / slow
        ideal[k] = base / np.median(base[g]) - 1
    constant = [k for k in np.flatnonzero(~variable[rows]) if k not in specs]
    noise = np.array([1.4826 * np.median(np.abs(np.diff((flux[k] / true[rows[k]])[ens.good[k]])))
                      / np.sqrt(2) / np.median((flux[k] / true[rows[k]])[ens.good[k]])
                      for k in range(len(rows))])
    res = compare(plain, ens, ideal, specs, constant, noise, rng=rng, peers=peers,
                  n_lk_constant=n_lk_constant, contamination=contamination)
    return {"input": f"simulated sector seed {seed}, {size}x{size} px, {cadences} cadences, "
                     f"focus ramp 5 %",
            "results": res, "ratios": ratios, "pipeline_s": pipeline, "stars": len(rows)}


def _pipeline(workdir, size, cadences, seed=8):
    """simulate (5 % focus ramp), prepare, todo and run (which co-trends) into ``workdir``."""
    exe = [sys.executable, "-m", "photometry.cli"]
    for args in (["simulate", workdir / "sim", "--cadences", cadences, "--size", size, size,
                  "--seed", seed, "--focus-change", 0.05, "--no-progress"],
                 ["prepare", workdir / "sim" / "ffi", "--catalog", workdir / "sim" / "catalog.csv",
                  "--cache", workdir / "cache", "--set", "backdrop.progress=false"],
                 ["todo", workdir / "cache"],
                 ["run", workdir / "cache", "--output", workdir / "lc", "--no-progress"]):
        subprocess.run(exe + [str(a) for a in args], check=True, capture_output=True)


def _running_median(t, r, good, width):
    out = np.empty_like(r)
    tg, rg = t[good], r[good]
    for j, tj in enumerate(t):
        sel = np.abs(tg - tj) <= width / 2
        out[j] = np.median(rg[sel]) if sel.any() else 1.0
    return out


def _p10_median(red):
    return (f"{np.percentile(red, 10):.1f} / {np.median(red):.0f} (n={len(red)})" if red
            else "-")


def report(rows):
    lines = []
    for row in rows:
        lines.append(f"\n### {row['input']}")
        lines.append("| method | vectors | sinusoid kept min / median / max (by period: min) "
                     "| transits kept, by depth min/mean/max | systematics reduced: p10 / median, all "
                     "(OK light curves) | CPU s/star |")
        lines.append("|---|---|---|---|---|---|")
        for name, (rec, (red, red_ok), cpu, k) in row["results"].items():
            sin = [r for kind, _, r, _ in rec if kind == "sinusoid"]
            per = {p: min(r for kind, s, r, _ in rec if kind == "sinusoid" and s == p)
                   for p in PERIODS
                   if any(kind == "sinusoid" and s == p for kind, s, _, _ in rec)}
            tr = [r for kind, _, r, _ in rec if kind == "transit"]
            per_text = ", ".join(f"{p:g} d {v:.3f}" for p, v in per.items())
            dep = {}
            for d in DEPTHS:
                got = [r for kind, s, r, _ in rec if kind == "transit" and s == d]
                if got:
                    dep[d] = (min(got), np.mean(got), max(got))
            dep_text = ", ".join(f"{d * 1e3:g} mmag {lo:.3f}/{mid:.3f}/{hi:.3f}"
                                 for d, (lo, mid, hi) in dep.items())
            lines.append(f"| {name} | {k} | {min(sin):.3f} / {np.median(sin):.3f} / "
                         f"{max(sin):.3f} ({per_text}) | {dep_text} | "
                         f"{_p10_median(red)} ({_p10_median(red_ok)}) | {cpu:.4f} |")
            ok = [r for _, _, r, good in rec if good]
            if len(ok) < len(rec):
                lines.append(f"|  | {name}, injected stars OK ({len(ok)} of {len(rec)}) | "
                             f"all signals {min(ok):.3f}-{max(ok):.3f} | | | |")
        if "ratios" in row:
            for col, vals in row["ratios"].items():
                lines.append(f"\n{col} (measured / expected 1-h CDPP) by Tmag: " + ", ".join(
                    f"{lo:.0f}-{hi:.0f}: {r:.2f} (n={n})" for lo, hi, n, r in vals))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one synthetic configuration, a "
                    "smaller scene")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="the scene's folder (reused if it holds a finished run); with "
                    "several --scene-seeds, one sub-folder seedN per seed")
    ap.add_argument("--scene-seeds", type=int, nargs="+", default=[8],
                    help="simulate seeds of the pixel scene (default 8)")
    ap.add_argument("--peers", nargs="+", default=["lk_regression", "lk_cbv"],
                    choices=["lk_regression", "lk_cbv"], help="lightkurve correctors to run")
    ap.add_argument("--figure", default=None, help="copy the scene's CDPP plot here")
    ap.add_argument("--skip-scene", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-peers", action="store_true", help="our correction only")
    ap.add_argument("--oracle", action="store_true", help="only the oracle comparison of the "
                    "5-10 d sinusoids (oracle_part)")
    ap.add_argument("--peer-configs", type=int, nargs="+", default=None,
                    help="indices into CONFIGS of the synthetic ensembles the lightkurve "
                    "peers run on (default all; the scene always)")
    ap.add_argument("--lk-constant", type=int, default=80,
                    help="constant stars per ensemble whose systematics reduction the peers "
                    "are measured on")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting of our correction, e.g. cbv.correlated_fraction=1.0")
    args = ap.parse_args()
    ASSIGNMENTS.extend(args.set)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    if args.oracle:
        with threadpool_limits(1):
            for name, got in oracle_part():
                print(f"| {name} | " + " | ".join(f"{lo:.3f}-{hi:.3f}"
                                                  for lo, hi in got.values()) + " |")
        return 0
    rows = []
    peers = () if args.no_peers else tuple(args.peers)
    with threadpool_limits(1):
        if not args.skip_synthetic:
            rows += synthetic_part(args.quick, peers, args.peer_configs, args.lk_constant)
        if not args.skip_scene:
            for seed in args.scene_seeds:
                work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_correct_"))
                if len(args.scene_seeds) > 1 and args.workdir:
                    work = args.workdir / f"seed{seed}"
                try:
                    rows.append(scene_part(work, args.quick, args.figure, peers,
                                           args.lk_constant, seed))
                finally:
                    if args.workdir is None:
                        shutil.rmtree(work, ignore_errors=True)
    print(report(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    sys.exit(main())
