"""linpsf on PRFs that are not the simulator's (issue 16), side by side with aperture photometry
and psfmachine.

Scenes: :func:`photometry.sim.foreign_scene.make_foreign_scene` (none of ``tessphot simulate``'s
code: affine motion about a far boresight with in-exposure jitter, rotated TAN WCS, a steeper
luminosity function, isolated stars per magnitude bin, a 1.6 px blend), with

* ``spoc``: the real SPOC PRF models of camera 1 / CCD 4 (``../shared/data/real/prf``),
* ``spoc_smooth``: the same models with their sample-to-sample noise removed
  (:func:`photometry.sim.foreign_scene.smooth_prf`, a Gaussian of two samples, 0.22 px: the
  files' sample noise, 0.2 % of the peak, is measurement noise of the model, not a real
  star's PRF; it leaves them as smooth as the analytic families, docs/linpsf.md),
* ``moffat``: an elliptical Moffat (beta 2.6, FWHM 1.7 px, e = 0.12 + 0.15 q radial), wider
  with the field distance,
* ``elliptical``: double Gaussian with e = 0.2, a wing displaced by 0.4 px (coma), 10 % wider
  at the field edge,

placed at CCD (700, 900). The shape model is the ``linpsf_shape`` stage's fit on the scene
(:func:`photometry_linpsf.stage.fit_source_shape`, default settings). Per family it reports,
on good cadences: per magnitude bin the median scatter / ideal PRF-weighted noise of the
isolated constant stars for linpsf, linpsf with the true PRF (the solver's floor) and aperture;
the median |amplitude - 1| of the isolated variables; the blend's amplitude errors; crowding
(``photometry.core.crowding``) against the aperture / linpsf noise of all 8-13 mag stars; the
trust gates NOISE_VS_APERTURE and SLOW_NOISE_VS_APERTURE (docs/checks.md): how many of the
targets whose linpsf light curve is noisier than the aperture plugin's they flag, and which
pass; times.
``--psfmachine``: psfmachine 1.1.4 on the same pixels (``bench_psfmachine.run_psfmachine``).

Usage::

    python benchmarks/bench_linpsf_prf.py [--family spoc moffat elliptical] [--size 96]
        [--cadences 80] [--seed 1] [--psfmachine] [--set linpsf.key=value ...]
"""
import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

from photometry.core.crowding import target_crowding
from photometry.sim.evaluation import score_lightcurve
from photometry.sim.foreign_scene import make_foreign_scene, smooth_prf
from photometry.data.memory_source import MemorySource
from photometry.data.prf import FieldPRF, SpocPRF
from photometry.hooks.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
SPOC = ROOT.parent / "shared" / "data" / "real" / "prf" / "Sectors1_2_3" / "cam1_ccd4"

FAMILIES = {
    "spoc": lambda: SpocPRF(SPOC),
    "spoc_smooth": lambda: smooth_prf(SpocPRF(SPOC), 2.0 / 9.0),
    "moffat": lambda: FieldPRF("moffat", fwhm=1.7, beta=2.6, ellipticity=0.12, angle=35,
                               field_ellipticity=0.15, field_width=0.15),
    "elliptical": lambda: FieldPRF("elliptical", sigma=0.75, wing_sigma=2.2,
                                   wing_fraction=0.2, ellipticity=0.2, angle=-20, coma=0.4,
                                   field_width=0.1),
}


def settings(overrides=()):
    s = load_settings()
    s["photometry"]["background"] = ""
    for item in overrides:
        key, value = item.split("=", 1)
        sec, name = key.split(".", 1)
        s[sec][name] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    return s


def run_family(name, size, cadences, seed, overrides=(), psfmachine=None):
    from photometry_aperture.aperture import AperturePhotometry
    from photometry_linpsf.linpsf import LinPSFPhotometry
    from photometry_linpsf.stage import fit_source_shape

    prf = FAMILIES[name]()
    t0 = time.process_time()
    src, tr = make_foreign_scene(prf, seed=seed, shape=(size, size), n=cadences)
    t_scene = time.process_time() - t0
    s = settings(overrides)
    t0 = time.process_time()
    group, res = fit_source_shape(src, s)
    t_shape = time.process_time() - t0
    src.models["linpsf_shape"] = group
    bare = MemorySource(src._cubes, src._catalog, src.time, src.quality,
                        row_offset=src.row_offset, column_offset=src.column_offset,
                        movement_kernel=src.movement_kernel)

    class TruePRF(LinPSFPhotometry):
        pass
    TruePRF.prf = prf
    o = tr["origin"]
    inner = (tr["rows"] >= o[0] + 7) & (tr["rows"] <= o[0] + size - 8) \
        & (tr["cols"] >= o[1] + 7) & (tr["cols"] <= o[1] + size - 8)
    scored = np.flatnonzero((tr["tmag"] >= 8) & (tr["tmag"] <= 13) & inner)
    crowd = target_crowding(tr["rows"], tr["cols"], tr["tmag"], scored, prf)
    rows, times = [], {"linpsf": 0.0, "aperture": 0.0}
    for k, c in zip(scored, crowd):
        row = {"k": int(k), "tmag": float(tr["tmag"][k]), "crowding": float(c),
               "iso": bool(tr["isolated"][k]), "iso_var": bool(tr["isolated_variable"][k]),
               "blend": bool(k in tr["blend"])}
        t0 = time.process_time()
        ph = LinPSFPhotometry(int(k) + 1, src, settings=s)
        row["status"] = str(ph.photometry())
        times["linpsf"] += time.process_time() - t0
        checks = ph.details.get("checks", {})
        row["codes"] = list(checks.get("codes", []))
        row["vs_ap"] = checks.get("metrics", {}).get("noise_vs_aperture")
        row["vs_dec"] = checks.get("metrics", {}).get("noise_vs_decorrelated")
        row["lin"], row["lin_amp"] = score_lightcurve(ph.lightcurve, tr["flux"][k],
                                                      tr["ideal_noise"][k])
        if row["iso"] or row["iso_var"] or row["blend"]:
            ph = TruePRF(int(k) + 1, bare, settings=s)
            ph.photometry()
            row["true"], row["true_amp"] = score_lightcurve(ph.lightcurve, tr["flux"][k],
                                                            tr["ideal_noise"][k])
        t0 = time.process_time()
        ap = AperturePhotometry(int(k) + 1, bare, settings=s)
        ap.photometry()
        times["aperture"] += time.process_time() - t0
        row["ap"], row["ap_amp"] = score_lightcurve(ap.lightcurve, tr["flux"][k],
                                                    tr["ideal_noise"][k])
        rows.append(row)
    out = {"family": name, "size": size, "cadences": cadences, "seed": seed,
           "n_stars": int(len(tr["tmag"])), "n_scored": len(rows),
           "basis": group.attrs.get("basis", "polar"), "time_use": bool(
               group.attrs.get("time_use", False)),
           "shape": {k: float(res[k]) for k in ("n_stars", "chi2_reduced", "residual_rms",
                                                 "flux_captured", "shape_residual")},
           "seconds": {"scene": t_scene, "shape": t_shape, **times}, "rows": rows}
    if psfmachine:
        import importlib.util as iu
        spec = iu.spec_from_file_location("bench_psfmachine", ROOT / "benchmarks" /
                                          "bench_psfmachine.py")
        bpm = iu.module_from_spec(spec)
        spec.loader.exec_module(bpm)
        sky = _sky(src)
        pm, t_pm, info = bpm.run_psfmachine(src, tr, list(scored), psfmachine, 21.0, 6, sky)
        for row in rows:
            scale, ratio, amp = pm["va"][row["k"]]
            row["pm"], row["pm_amp"], row["pm_scale"] = ratio, amp, scale
        out["psfmachine"] = {"seconds": t_pm, **info}
    return out


def _sky(src):
    """The scene's sky plane (psfmachine wants background-subtracted pixels): the median
    image's lowest-quartile level per row/column is good enough for a flat-ish sky."""
    med = np.median(src._cubes["images"][src.quality == 0], axis=0)
    return np.percentile(med, 25)


def summary(out):
    rows = out["rows"]
    lines = [f"## {out['family']}: {out['n_stars']} stars, {out['n_scored']} scored 8-13 mag, "
             f"{out['size']}x{out['size']} px, {out['cadences']} cadences, seed {out['seed']}; "
             f"basis {out['basis']}, time model {out['time_use']}, shape {out['shape']}"]
    lines.append("| Tmag bin | n iso | linpsf | lin-true | aperture |" +
                 (" psfmachine |" if "psfmachine" in out else ""))
    for b in range(8, 13):
        sel = [r for r in rows if r["iso"] and b <= r["tmag"] < b + 1]
        if not sel:
            continue
        med = [np.median([r[key] for r in sel]) for key in ("lin", "true", "ap")]
        pm = f" {np.median([r['pm'] for r in sel]):.3f} |" if "psfmachine" in out else ""
        lines.append(f"| {b}-{b + 1} | {len(sel)} | {med[0]:.3f} | {med[1]:.3f} | "
                     f"{med[2]:.3f} |{pm}")
    iso = [r for r in rows if r["iso"]]
    lines.append(f"| all isolated | {len(iso)} | {np.median([r['lin'] for r in iso]):.3f} | "
                 f"{np.median([r['true'] for r in iso]):.3f} | "
                 f"{np.median([r['ap'] for r in iso]):.3f} |" +
                 (f" {np.median([r['pm'] for r in iso]):.3f} |" if "psfmachine" in out else ""))
    var = [r for r in rows if r["iso_var"]]
    lines.append("isolated variables |amp-1|: linpsf %.4f, true %.4f, aperture %.4f" % tuple(
        np.median([abs(r[k] - 1) for r in var]) for k in ("lin_amp", "true_amp", "ap_amp")))
    for r in rows:
        if r["blend"]:
            lines.append(f"blend star Tmag {r['tmag']:.1f}: |amp-1| linpsf "
                         f"{abs(r['lin_amp'] - 1):.4f}, true {abs(r['true_amp'] - 1):.4f}, "
                         f"aperture {abs(r['ap_amp'] - 1):.4f}; noise {r['lin']:.2f} / "
                         f"{r['ap']:.2f}")
    for lo, hi in ((0, 0.01), (0.01, 0.05), (0.05, 0.2), (0.2, 1.0)):
        sel = [r for r in rows if lo <= r["crowding"] < hi]
        if sel:
            lines.append(f"crowding {lo}-{hi}: n {len(sel)}, linpsf "
                         f"{np.median([r['lin'] for r in sel]):.3f}, aperture "
                         f"{np.median([r['ap'] for r in sel]):.3f}")
    lines.append("statuses: " + ", ".join(sorted({r["status"] for r in rows})))
    for code, key in (("NOISE_VS_APERTURE", "vs_ap"), ("SLOW_NOISE_VS_APERTURE", "vs_dec")):
        flagged = [r for r in rows if code in r["codes"]]
        worse = [r for r in rows if r["lin"] > r["ap"]]
        worse11 = [r for r in rows if r["lin"] > 1.1 * r["ap"]]
        judged = [r[key] for r in rows if r.get(key) is not None]
        lines.append(f"{code}: {len(flagged)} of {len(rows)} flagged ({len(judged)} judged); "
                     f"linpsf noisier than aperture: {len(worse)}, of them flagged "
                     f"{sum(code in r['codes'] for r in worse)}; > 1.1 x aperture: "
                     f"{len(worse11)}, flagged {sum(code in r['codes'] for r in worse11)}; "
                     f"flagged with linpsf <= aperture: {sum(r['lin'] <= r['ap'] for r in flagged)}"
                     f"; ratio median {np.median(judged) if judged else float('nan'):.2f}")
    lines.append("linpsf noisier than aperture, not flagged: " + ", ".join(
        f"Tmag {r['tmag']:.1f} {r['lin']:.2f}/{r['ap']:.2f} (ratio {r['vs_dec'] or 0:.2f})"
        for r in rows if r["lin"] > r["ap"] and "SLOW_NOISE_VS_APERTURE" not in r["codes"]
        and "NOISE_VS_APERTURE" not in r["codes"]))
    lines.append("codes: " + ", ".join(sorted({c for r in rows for c in r["codes"]})))
    sec = out["seconds"]
    lines.append(f"CPU s: shape {sec['shape']:.1f}, linpsf {sec['linpsf']:.1f} "
                 f"({sec['linpsf'] / len(rows):.2f}/star), aperture {sec['aperture']:.1f}")
    if "psfmachine" in out:
        lines.append(f"psfmachine {out['psfmachine']}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", nargs="+", default=["spoc", "moffat", "elliptical"],
                   choices=list(FAMILIES))
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--cadences", type=int, default=80)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--psfmachine", nargs="?", const=str(ROOT / ".venv-psfmachine" / "bin" /
                                                        "python"), default=None)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    results = []
    for name in a.family:
        out = run_family(name, a.size, a.cadences, a.seed, a.set, a.psfmachine)
        print(summary(out), flush=True)
        results.append(out)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
