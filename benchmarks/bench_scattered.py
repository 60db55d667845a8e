"""Benchmark of the scattered-light cube (build time per full-size frame) and corrector
(time per stamp), plus the accuracy figures on a simulated sector with a strong glow.

Timing: full 2048x2048 synthetic frames (smooth sky + glow + noise + stars masked through a
sum image) go through :func:`photometry_scattered.build_cube` exactly as the prepare stage
feeds it; the corrector's :func:`evaluate` is timed on a full-CCD cube (1300 cadences x
128 x 128 bins, the size of a 30-min sector at 16-px bins) for a 15x15 stamp.

Accuracy (``--sim``): ``tessphot simulate`` + ``prepare`` with the ``scattered_light`` stage,
then for non-variable Tmag 13-15 stars: the largest time-varying background residual in their
stamps (vs truth, as a fraction of the glow peak), and the scatter of a fixed 2-px-radius
aperture sum during the glow (amplitude > 25 % of its maximum) over outside it
(< 10 %), raw and normalised by the per-cadence noise, for the local background,
the scattered-light correction and the true background.

Usage::

    python benchmarks/bench_scattered.py [--frames 16] [--sim] [--size 128] [--cadences 100]
    python benchmarks/bench_scattered.py --pipeline [--size 128] [--cadences 100] [--seed 42]
        [--glow-peak 1000] [--tmag 13 15] [--workdir DIR]   # aperture plugin, with/without
"""
import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from photometry.hooks.settings import load_settings
from photometry_scattered import build_cube, evaluate


def bench_build(n_frames, bin_size=16):
    rng = np.random.default_rng(0)
    R = C = 2048
    rr, cc = np.meshgrid(np.arange(R), np.arange(C) + 44, indexing="ij")
    glow = np.exp(-np.hypot(rr + 300, cc + 300) / 600.0).astype(np.float32)
    stars = np.zeros((R, C), np.float32)
    idx = rng.integers(0, R * C, 40000)
    stars.flat[idx] = rng.uniform(50, 5000, idx.size)
    sumimage = 100 + 150 * glow + stars
    s = load_settings()
    s["scattered_light"].update(bin_size=bin_size, progress=False)
    times = 1325.3 + np.arange(n_frames) / 48.0

    def blocks():
        block = 8
        for start in range(0, n_frames, block):
            n = min(block, n_frames - start)
            amp = 300 * np.exp(-(times[start:start + n] - times[0]) / 0.6)
            img = (100 + amp[:, None, None] * glow[None] + stars[None]
                   + rng.normal(0, 0.6, (n, R, C)).astype(np.float32))
            yield slice(start, start + n), img.astype(np.float32), None, None

    # frame generation is not part of the cost: time it separately and subtract
    t0 = time.perf_counter()
    for _ in blocks():
        pass
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    cube = build_cube(blocks(), (R, C), times, s, sumimage=sumimage, row_offset=0,
                      column_offset=44)
    t_tot = time.perf_counter() - t0
    per = (t_tot - t_gen) / n_frames
    print(f"cube build: {n_frames} full frames, {bin_size}px bins -> {cube.shape}: "
          f"{per:.3f} s/frame (total {t_tot:.1f} s, frame generation {t_gen:.1f} s excluded)")
    return per


def bench_evaluate(nt=1300, ny=128, repeat=20):
    rng = np.random.default_rng(1)
    cube = rng.normal(100, 1, (nt, ny, ny))
    err = np.full(cube.shape, 0.05)
    bins = np.arange(ny) * 16 + 7.5
    t = 1325.3 + np.arange(nt) / 48.0
    rows, cols = np.arange(1000, 1015), np.arange(1044, 1059)
    evaluate(cube, bins, bins + 44, t, rows, cols, t, errors=err)
    t0 = time.perf_counter()
    for _ in range(repeat):
        evaluate(cube, bins, bins + 44, t, rows, cols, t, errors=err)
    per = (time.perf_counter() - t0) / repeat
    tb = t[::4]
    t0 = time.perf_counter()
    for _ in range(repeat):
        evaluate(cube[::4], bins, bins + 44, tb, rows, cols, t, errors=err[::4])
    per_b = (time.perf_counter() - t0) / repeat
    print(f"corrector evaluate, 15x15 stamp x {nt} cadences (value + error): {per * 1e3:.1f} ms "
          f"(cube at the stamp's cadences), {per_b * 1e3:.1f} ms (time-binned cube, "
          f"interpolated in time)")
    return per, per_b


def bench_sim(size, cadences, workdir):
    import h5py

    from photometry.core.base import BasePhotometry
    from photometry.data.cache import FFICache
    from photometry.scheduler.prepare import prepare
    from photometry.sim.simulate import simulate
    from photometry_scattered import ScatteredLightCorrection

    s = load_settings()
    s["simulate"].update(cadences=cadences, rows=size, cols=size)
    s["prepare"]["stages"] = ["scattered_light"]
    s["scattered_light"]["progress"] = False
    workdir = Path(workdir)
    simulate(workdir, s, progress=False)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path, _ = prepare(workdir / "ffi", workdir / "catalog.csv", workdir / "cache", s,
                          progress=False)
    print(f"prepare (ingest + cube) {size}x{size} x {cadences}: {time.perf_counter() - t0:.1f} s")
    corr = ScatteredLightCorrection(s)
    with h5py.File(workdir / "truth.h5") as tr, FFICache(path) as cache:
        bkg = tr["background"][()]
        amp = tr["glow_amplitude"][()]
        peak = float(tr["glow"][()].max())
        st = tr["stars"]
        tm, r, c = st["tmag"][()], st["row"][()], st["column"][()]
        sel = np.flatnonzero((tm > 13) & (tm < 15) & ~st["variable"][()] & (r > 8)
                             & (r < size - 9) & (c > 52) & (c < size + 44 - 9))
        ids = st["starid"][()][sel]
        glow_t = amp > 0.25 * amp.max()
        quiet = amp < 0.1 * amp.max()
        rows, worst, times = [], 0.0, []
        for sid in ids:
            p = BasePhotometry(int(sid), cache, settings=s)
            rr, cc = np.mgrid[p.stamp[0]:p.stamp[1], p.stamp[2]:p.stamp[3]]
            ap = (rr - p.target_pos_row) ** 2 + (cc - p.target_pos_column) ** 2 <= 4.0
            rs, cs = p._slices()
            f_local = p.images_cube[:, ap].sum(axis=1)
            f_true = (p._raw_images - bkg[:, rs, cs])[:, ap].sum(axis=1)
            t0 = time.perf_counter()
            corr.apply(p)
            times.append(time.perf_counter() - t0)
            f_sl = p.images_cube[:, ap].sum(axis=1)
            tv = p.backgrounds_cube - bkg[:, rs, cs]
            worst = max(worst, float(np.abs(tv - np.median(tv, axis=0)).max()))
            et = np.sqrt((p.images_err_cube[:, ap] ** 2).sum(axis=1))
            row = []
            for f in (f_local, f_sl, f_true):
                z = (f - np.median(f)) / et
                row += [np.std(f[glow_t]) / np.std(f[quiet]), np.std(z[glow_t]) / np.std(z[quiet])]
            rows.append(row)
    rows = np.array(rows)
    med = np.median(rows, axis=0)
    print(f"glow peak in the cutout {peak:.0f} e-/s; {len(ids)} stars Tmag 13-15; "
          f"apply() {np.median(times) * 1e3:.0f} ms per stamp (cache read included)")
    print(f"largest time-varying background residual in their stamps: {worst:.2f} e-/s "
          f"= {100 * worst / peak:.2f} % of the glow peak")
    print("scatter during glow / outside (median over stars):   raw  noise-normalised")
    for k, name in enumerate(("local background", "scattered-light corrected",
                              "true background")):
        print(f"  {name:28s} {med[2 * k]:.2f}  {med[2 * k + 1]:.2f}")


def pipeline_scatter(truth_path, cache_path, settings, tmag_range=(13.0, 15.0), corrections=None,
                     glow_frac=0.25, quiet_frac=0.1):
    """Aperture-plugin light curves of non-variable stars: scatter during vs outside the glow.

    For each star (``tmag_range``, not variable, default stamp fully on the data) the aperture
    plugin runs through ``BasePhotometry.photometry()`` (so with whatever
    ``photometry.corrections`` says). Residual ``r = flux/median - true/median`` on good
    cadences; glow cadences: glow amplitude above ``glow_frac`` of its maximum, quiet: below
    ``quiet_frac``. Returns per-star rows: ``raw`` = std(r, glow) / std(r, quiet);
    ``norm`` = the same for ``(flux - true * median ratio) / flux_err`` (the per-cadence
    expected noise, which includes the glow's photon noise); ``ratio`` = std(r) / ideal noise.
    """
    import h5py

    from photometry.data.sources import open_source
    from photometry.hooks.quality import TESSQualityFlags
    from photometry_aperture.aperture import AperturePhotometry

    s = {k: (dict(v) if isinstance(v, dict) else v) for k, v in settings.items()}
    if corrections is not None:
        s["photometry"]["corrections"] = list(corrections)
    with h5py.File(truth_path, "r") as h5:
        st = {k: h5["stars"][k][:] for k in ("starid", "tmag", "ideal_noise", "row", "column",
                                             "variable")}
        true_flux = h5["flux"][:]
        amp = h5["glow_amplitude"][()]
        rows, cols = h5.attrs["rows"], h5.attrs["cols"]
        r0, c0 = h5.attrs["row_offset"], h5.attrs["column_offset"]
    sel = np.flatnonzero((st["tmag"] >= tmag_range[0]) & (st["tmag"] <= tmag_range[1])
                         & ~st["variable"].astype(bool) & np.isfinite(st["ideal_noise"])
                         & (st["row"] > r0 + 8) & (st["row"] < r0 + rows - 9)
                         & (st["column"] > c0 + 8) & (st["column"] < c0 + cols - 9))
    glow_t = amp > glow_frac * amp.max()
    quiet_t = amp < quiet_frac * amp.max()
    out = []
    source = open_source(cache_path)
    for k in sel:
        phot = AperturePhotometry(int(st["starid"][k]), source, settings=s)
        phot.photometry()
        flux = np.asarray(phot.lightcurve["flux"], float)
        err = np.asarray(phot.lightcurve["flux_err"], float)
        good = TESSQualityFlags.filter(phot.quality) & np.isfinite(flux) & (err > 0)
        true = true_flux[k]
        mf, mt = np.median(flux[good]), np.median(true[good])
        r = flux / mf - true / mt
        z = (flux - true * mf / mt) / err
        g, q = good & glow_t, good & quiet_t
        if g.sum() < 5 or q.sum() < 5:
            continue
        out.append({"starid": int(st["starid"][k]), "tmag": float(st["tmag"][k]),
                    "raw": float(np.std(r[g]) / np.std(r[q])),
                    "norm": float(np.std(z[g]) / np.std(z[q])),
                    "ratio": float(np.std(r[good]) / (st["ideal_noise"][k] / np.mean(true))),
                    "corrections": list(phot.details.get("corrections", []))})
    return out


def bench_pipeline(size, cadences, seed, glow_peak, workdir, stages=("backdrop", "scattered_light"),
                   tmag_range=(13.0, 15.0)):
    """simulate + prepare (backdrop, scattered_light) + aperture with/without the correction."""
    from photometry.scheduler.prepare import prepare
    from photometry.sim.simulate import simulate

    s = load_settings()
    s["simulate"].update(cadences=cadences, rows=size, cols=size, seed=seed,
                         glow_peak=glow_peak)
    s["prepare"]["stages"] = list(stages)
    s["scattered_light"]["progress"] = False
    workdir = Path(workdir)
    if not (workdir / "truth.h5").exists():
        simulate(workdir, s, progress=False)
    caches = sorted((workdir / "cache").glob("sector*.hdf5"))
    if caches:
        path = caches[0]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path, _ = prepare(workdir / "ffi", workdir / "catalog.csv", workdir / "cache", s,
                              progress=False)
    import h5py
    with h5py.File(workdir / "truth.h5") as tr:
        peak = float(tr["glow"][()].max())
    print(f"scene {size}x{size} x {cadences}, seed {seed}, glow_peak {glow_peak}: "
          f"glow max in the cutout {peak:.0f} e-/s; stages {list(stages)}")
    res = {}
    for name, corr in (("without correction", []), ("with scattered_light", ["scattered_light"])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = pipeline_scatter(workdir / "truth.h5", path, s, tmag_range, corr)
        res[name] = rows
        med = {k: float(np.median([r[k] for r in rows])) for k in ("raw", "norm", "ratio")}
        print(f"  {name:22s} {len(rows)} stars Tmag {tmag_range}: glow/quiet scatter raw "
              f"{med['raw']:.3f}, normalised {med['norm']:.3f}; noise/ideal {med['ratio']:.3f}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--bin", type=int, default=16)
    ap.add_argument("--sim", action="store_true", help="also run the simulated-sector figures")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--cadences", type=int, default=100)
    ap.add_argument("--pipeline", action="store_true",
                    help="only the aperture-plugin figures (simulate + prepare + photometry)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--glow-peak", type=float, default=300.0)
    ap.add_argument("--tmag", type=float, nargs=2, default=(13.0, 15.0))
    ap.add_argument("--stages", nargs="+", default=["backdrop", "scattered_light"])
    ap.add_argument("--workdir", default=None, help="reuse/keep the scene here")
    args = ap.parse_args(argv)
    if args.pipeline:
        if args.workdir:
            Path(args.workdir).mkdir(parents=True, exist_ok=True)
            bench_pipeline(args.size, args.cadences, args.seed, args.glow_peak, args.workdir,
                           args.stages, tuple(args.tmag))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                bench_pipeline(args.size, args.cadences, args.seed, args.glow_peak, tmp,
                               args.stages, tuple(args.tmag))
        return
    bench_build(args.frames, args.bin)
    bench_evaluate()
    if args.sim:
        with tempfile.TemporaryDirectory() as tmp:
            bench_sim(args.size, args.cadences, tmp)


if __name__ == "__main__":
    main()
