"""A whole CCD-sector through prepare, todo and run, measured and projected (not a test).

Full 2048 x 2048 frames (SPOC format with collateral columns, written by a fast renderer:
the simulator's scene, headers and background, its 100 000-star image rendered once, a
Gaussian noise draw per frame; the headers are the simulator writer's, bytes identical)
go through ``tessphot prepare`` (default stages, i.e. the backdrop fit), ``tessphot todo``
(100 000 targets to Tmag 15) and ``tessphot run`` on a position-ordered share of the
targets (aperture with 1 and 2 workers, linpsf with 2). The same at a cut-down frame size
for 200, 1 282 and 11 800 frames (the 30-minute and 200-s sectors), on the same
position-ordered targets at every frame count. From the measured points: the growth laws
(prepare time = a + b N, per-target time = a + b N, peak memory, disk), and the
full-sector projection for 1 282 and 11 800 frames at full size on this machine (2 cores;
see ``project``). Every process runs under a small wrapper that reports its CPU time and
peak RSS (the largest of it and its children: a run's coordinator and workers).

Usage::

    python benchmarks/bench_sector.py [--workdir DIR] [--full-frames 40 200] [--small 128]
        [--small-frames 200 1282 11800] [--run-targets 1200] [--one-worker-targets 400]
        [--linpsf-targets 60] [--small-run-targets 200] [--small-linpsf-targets 20]
        [--write-docs] [--keep] [--json FILE]
    python benchmarks/bench_sector.py --merge A.json B.json [--write-docs]

``--merge`` projects from the figures of earlier runs (``--json``), so the full-frame and the
cut-down parts can be run one after the other or side by side (CPU times are what is
projected).

Disk: the full-frame part needs ~36 MB per frame of FITS plus ~6 MB per frame of cache
(200 frames: ~8 GB); the 11 800-frame cut-down sector 2.5 GB of FITS. The FITS files are
deleted as soon as each cache is written, and everything at the end unless ``--keep``.
"""
import argparse
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs" / "benchmarks.md"
TARGETS = 100_000
FULL = 2048
#: stars per pixel (Tmag 7-15 over the cutout and its margin) giving 100 000 targets
DENSITY = 0.0235

_WRAPPER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
code = subprocess.call(sys.argv[1:])
wall = time.perf_counter() - t
r = resource.getrusage(resource.RUSAGE_CHILDREN)
sys.stderr.write("BENCH_RUSAGE " + json.dumps({"wall": wall, "cpu": r.ru_utime + r.ru_stime,
                 "maxrss_mb": r.ru_maxrss / 1024.0, "code": code}) + "\n")
sys.exit(code)
"""


def measured(args, log=None):
    """Run ``python -m photometry.cli ARGS`` under the wrapper: wall, CPU, peak RSS."""
    cmd = [sys.executable, "-c", _WRAPPER, sys.executable, "-m", "photometry.cli", *map(str, args)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    stats = None
    for line in proc.stderr.splitlines():
        if line.startswith("BENCH_RUSAGE "):
            stats = json.loads(line.split(" ", 1)[1])
    if log is not None:
        Path(log).write_text(proc.stdout + proc.stderr)
    if proc.returncode or stats is None:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return stats


# ------------------------------------------------------------------------------ renderer
#: the WCS cards the simulator's writer copies from ``wcs_cards`` (with the SIP terms)
_WCS_KEYS = ("CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2", "CD2_1", "CD2_2")


class _FastWriter:
    """The simulator's FFI writer, ~10x cheaper per file: the first frame is written by it,
    later frames reuse that file's headers with the per-frame cards set (times, barycentric
    correction, quality, WCS) and are written as raw FITS bytes. Building ~320 astropy cards
    and verifying them cost ~40 ms per file, most of the renderer's time at a cut-down frame
    size (11 800 files). The bytes are the writer's own (checked in ``tests``)."""

    def __init__(self, writer):
        self.writer = writer
        self.headers = None

    def write(self, i, image, uncert):
        from astropy.io import fits

        w = self.writer
        if self.headers is None:
            path = w.write(i, image, uncert)
            with fits.open(path) as hdul:
                self.headers = [hdu.header.copy() for hdu in hdul]
            return path
        sc = w.scene
        primary, *images = self.headers
        for key, value in (("TSTART", w.tjd_start[i]), ("TSTOP", w.tjd_stop[i]),
                           ("DATE-OBS", w.utc_tjd_start[i]), ("DATE-END", w.utc_tjd_stop[i]),
                           ("FFIINDEX", int(sc.cadenceno[i]))):
            primary[key] = value
        wcs = w.wcs_cards(i)
        frame = {"TSTART": sc.tstart[i], "TSTOP": sc.tstop[i], "DATE-OBS": w.utc_start[i],
                 "DATE-END": w.utc_stop[i], "BARYCORR": sc.barycorr[i],
                 "DQUALITY": int(sc.quality[i])}
        chunks = [primary.tostring().encode("ascii")]
        for h, data in zip(images, (image, uncert)):
            for key, value in frame.items():
                h[key] = value
            for key, value in wcs.items():
                if key in _WCS_KEYS or key.split("_")[0] in ("A", "B", "AP", "BP"):
                    h[key] = value[0] if isinstance(value, tuple) else value
            raw = np.ascontiguousarray(data, dtype=">f4").tobytes()
            chunks += [h.tostring().encode("ascii"), raw, b"\0" * (-len(raw) % 2880)]
        path = w.ffidir / w.filename(i)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_bytes(b"".join(chunks))
        os.replace(tmp, path)
        return path


def render(outdir, n_frames, size, seed=7, progress=True, fast=True):
    """SPOC-format FFIs of a static 100 000-star-per-CCD scene with the simulator's sky,
    glow and straps; ~0.1 s per full frame (the simulator renders every star per frame).

    Returns the number of catalog stars on the science area brighter than Tmag 15.
    """
    from photometry.data.prf import load_prf
    from photometry.hooks.settings import load_settings
    from photometry.sim.simulate import _Renderer, _Writer, _write_catalog, build_scene

    cfg = {"rows": size, "cols": size, "first_row": 0, "first_col": 0, "cadences": n_frames,
           "star_density": DENSITY, "tmag_max": 15.0, "seed": seed, "bright_star": False,
           "jitter_rms": 0.0, "drift_px": 0.0, "dump_jump": [0.0, 0.0], "wcs_error_px": 0.0,
           "coarse_point": 0, "manual_exclude": 0}
    settings = load_settings(extra={"simulate": cfg})
    scene = build_scene(settings)
    s = settings["simulate"]
    prf = load_prf(s["prf"], camera=scene.camera, ccd=scene.ccd, sigma=float(s["prf_sigma"]),
                   wing_sigma=float(s["prf_wing_sigma"]),
                   wing_fraction=float(s["prf_wing_fraction"]))
    renderer = _Renderer(scene, prf)
    outdir = Path(outdir)
    writer = _Writer(scene, outdir)
    if fast:
        writer = _FastWriter(writer)
    _write_catalog(outdir / "catalog.csv", scene)
    stars = renderer.stars_image(scene.kernels[0], scene.flux_mean).astype(np.float32)
    g = scene.geometry
    sci = g.science_slices
    T = renderer.exposure
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((3,) + stars.shape, dtype=np.float32)
    collateral = np.float32(np.sqrt(renderer.read_var) / T)
    t0 = time.perf_counter()
    for i in range(n_frames):
        bg, _ = renderer.background(i)
        expected = stars + bg.astype(np.float32)
        sigma = np.sqrt(np.clip(expected, 0, None) * T + renderer.read_var) / T
        shift = int(rng.integers(0, stars.size))
        noise = np.roll(pool[i % 3].ravel(), shift).reshape(stars.shape)
        image = np.full(g.frame_shape, 0.0, dtype=np.float32)
        uncert = np.full(g.frame_shape, collateral, dtype=np.float32)
        image[sci] = expected + sigma * noise
        uncert[sci] = sigma
        writer.write(i, image, uncert)
        if progress and (i + 1) % 100 == 0:
            print(f"  rendered {i + 1}/{n_frames} frames ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    on = (scene.row > -0.5) & (scene.row < size - 0.5) & (scene.col > 43.5) \
        & (scene.col < 43.5 + size)
    return int(np.count_nonzero(on & (scene.tmag < 15.0)))


# ------------------------------------------------------------------------------ one sector
def _steady_rate(todo, method, owner_since):
    """Results per second between the first and the last result of a run (start-up and
    the last straggler excluded), and the median per-target elaptime."""
    with sqlite3.connect(todo) as con:
        rows = con.execute(
            "SELECT r.finished_at, d.elaptime FROM results r LEFT JOIN diagnostics d "
            "USING (priority, method) WHERE r.method = ? AND r.finished_at >= ? "
            "AND r.status IS NOT NULL ORDER BY r.finished_at", (method, owner_since)).fetchall()
        status = dict(con.execute("SELECT status, COUNT(*) FROM results WHERE method = ? "
                                  "AND finished_at >= ? GROUP BY status",
                                  (method, owner_since)).fetchall())
    t = np.array([r[0] for r in rows], float)
    el = np.array([r[1] for r in rows if r[1] is not None], float)
    k = max(1, len(t) // 20)               # drop the first and last 5 %
    rate = (len(t[k:-k]) - 1) / (t[-k - 1] - t[k]) if len(t) > 3 * k + 2 else float("nan")
    return {"n": len(t), "rate": rate, "elaptime_median": float(np.median(el)) if el.size
            else float("nan"), "elaptime_mean": float(np.mean(el)) if el.size else float("nan"),
            "status": {int(k_): v for k_, v in status.items()}}


#: the runs are photometry only: the light-curve correction that ``tessphot run`` does at
#: its end (``correct.finish_run``, every light curve of the folder) is measured on its own,
#: once, after them (a run per worker count would re-correct the earlier runs' files)
NO_CORRECTION = ["--set", 'photometry.lightcurve_correction=""']


def _floor(files):
    """The read floor: astropy, both HDUs, page cache warm (as bench_prepare)."""
    from astropy.io import fits
    sample = files[:min(len(files), 50)]
    for p in sample:
        p.read_bytes()
    c0 = time.process_time()
    for p in sample:
        with fits.open(p, memmap=False) as hdul:
            float(hdul[1].data[0, 0]) + float(hdul[2].data[0, 0])
    return (time.process_time() - c0) / len(sample)


def sector(work, label, n_frames, size, run_targets, linpsf_targets, one_worker=None,
           progress=True):
    """Render, prepare, todo and run one sector; returns its measured figures.

    ``one_worker`` aperture targets are run with one worker (default a third of
    ``run_targets``, at least 20; 0 skips that run).
    """
    base = Path(work) / label
    sim, cache = base / "sim", base / "cache"
    shutil.rmtree(base, ignore_errors=True)
    sim.mkdir(parents=True)
    t0 = time.perf_counter()
    n_stars = render(sim, n_frames, size, progress=progress)
    res = {"label": label, "frames": n_frames, "size": size, "stars_tmag15": n_stars,
           "render_wall": time.perf_counter() - t0}
    files = sorted((sim / "ffi").glob("*_ffic.fits"))
    res["ffi_bytes"] = sum(p.stat().st_size for p in files)
    res["astropy_cpu_per_frame"] = _floor(files)
    res["prepare"] = measured(["prepare", sim / "ffi", "--catalog", sim / "catalog.csv",
                               "--cache", cache, "--no-progress"], log=base / "prepare.log")
    shutil.rmtree(sim / "ffi")                       # disk: the cache is all we need now
    return _measure_cache(res, base, run_targets, linpsf_targets, one_worker)


def resume(base, n_frames, size, run_targets, linpsf_targets, one_worker=None):
    """:func:`sector` on the cache an interrupted one left in ``base`` (its prepare figures
    from ``prepare.log``; FFI size and read floor from a 10-frame render of the scene)."""
    base = Path(base)
    stats = [json.loads(line.split(" ", 1)[1]) for line in
             (base / "prepare.log").read_text().splitlines() if line.startswith("BENCH_RUSAGE ")]
    sample = Path(tempfile.mkdtemp(prefix="bench_sector_sample_"))
    try:
        n_stars = render(sample, min(10, n_frames), size, progress=False)
        files = sorted((sample / "ffi").glob("*_ffic.fits"))
        res = {"label": base.name, "frames": n_frames, "size": size, "stars_tmag15": n_stars,
               "ffi_bytes": files[-1].stat().st_size * n_frames,
               "astropy_cpu_per_frame": _floor(files), "prepare": stats[-1]}
    finally:
        shutil.rmtree(sample, ignore_errors=True)
    return _measure_cache(res, base, run_targets, linpsf_targets, one_worker)


def _measure_cache(res, base, run_targets, linpsf_targets, one_worker):
    """The cache's figures, then todo, the runs and the correction on it."""
    cache, out = base / "cache", base / "lc"
    n_frames, size = res["frames"], res["size"]
    shutil.rmtree(out, ignore_errors=True)
    h5 = next(cache.glob("sector*.hdf5"))
    res["cache_bytes"] = h5.stat().st_size
    res["cache_bytes_per_px_frame"] = res["cache_bytes"] / (size * size * n_frames)
    import h5py
    with h5py.File(h5, "r") as f:
        g = f["models/backdrop"]
        res["backdrop_setup"] = float(g.attrs["time_setup"])
        res["backdrop_fit_per_frame"] = float(g.attrs["time_fit"]) / n_frames
    res["todo"] = measured(["todo", cache, "--overwrite"])
    with sqlite3.connect(cache / "todo.sqlite") as con:
        res["tasks"] = con.execute("SELECT COUNT(*) FROM todolist").fetchone()[0]
    runs = {}
    n1 = max(20, run_targets // 3) if one_worker is None else one_worker
    plan = [("aperture_1w", "aperture", 1, n1), ("aperture_2w", "aperture", 2, run_targets),
            ("linpsf_2w", "linpsf", 2, linpsf_targets)]
    for name, method, workers, limit in plan:
        if limit <= 0:
            continue
        since = time.time()
        stats = measured(["run", cache, "--output", out, "--method", method, "--workers",
                          workers, "--limit", limit, "--no-progress", *NO_CORRECTION],
                         log=base / f"{name}.log")
        stats.update(_steady_rate(cache / "todo.sqlite", method, since))
        stats["cpu_per_target"] = stats["cpu"] / max(1, stats["n"])
        runs[name] = stats
        print(f"  {name}: {json.dumps(stats)}", flush=True)
    res["runs"] = runs
    a1, a2 = runs.get("aperture_1w"), runs.get("aperture_2w")
    if a1 and a2:
        res["speedup_1_to_2"] = a2["rate"] / a1["rate"]
    res["lc_files"] = sum(1 for _ in out.rglob("*_lc.fits"))
    if res["lc_files"]:
        res["correct"] = measured(["correct", cache, "--output", out],
                                  log=base / "correct.log")
        res["correct"]["cpu_per_lc"] = res["correct"]["cpu"] / res["lc_files"]
    res["load_average"] = os.getloadavg()[0]
    res["lc_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shutil.rmtree(cache)
    shutil.rmtree(out, ignore_errors=True)
    return res


# ------------------------------------------------------------------------------ projection
def _fit(x, y):
    """Least-squares a + b x (a straight line through two points)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2:
        return float(y[0]), 0.0
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def _growth(points, n, n0):
    """``f(n) - f(n0)`` of a quantity measured at some frame counts: straight lines between
    the measured points (exact at them), the end segments' slopes beyond."""
    x = np.array([p[0] for p in points], float)
    y = np.array([p[1] for p in points], float)
    order = np.argsort(x)
    x, y = x[order], y[order]

    def f(v):
        if len(x) == 1:
            return y[0]
        if v < x[0]:
            return y[0] + (v - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
        if v > x[-1]:
            return y[-1] + (v - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
        return float(np.interp(v, x, y))
    return float(f(n) - f(n0))


def project(full, small, targets=TARGETS, cores=2):
    """Growth laws from the measured points and the full-sector projection.

    Times are projected from CPU seconds, not wall: on a shared machine the wall time of a
    run says more about the other jobs than about ours. A run's CPU per target (its
    coordinator and workers, start-up included, over the targets of that run) is taken at
    the largest full-frame point and grown by what the cut-down sectors measured between
    that frame count and the sector's (straight lines between the measured cut-down points,
    so at 1 282 and 11 800 frames the measured difference itself; frame size does not enter
    a target's cost except through the catalog). The same for the peak RSS of a run's
    largest process and of prepare (what prepare holds per frame does not depend on the
    frame size beyond the block it works on). The run's wall time on an idle machine is
    that CPU over ``cores`` workers (the 1 -> 2 worker speedup measured here is printed
    beside it). Prepare is one process: its CPU, a + b N fitted to the full-frame points, is
    its wall time on an idle core; so is the light-curve correction at the end of a run
    (``tessphot correct``, measured on its own: CPU per light curve, grown like a run's).
    The fitted straight lines (``laws``) are reported alongside; the projection does not
    extrapolate them.
    """
    laws = {}
    xs = [r["frames"] for r in full]
    for key, get in (("prepare_cpu", lambda r: r["prepare"]["cpu"]),
                     ("prepare_wall", lambda r: r["prepare"]["wall"]),
                     ("prepare_rss_mb", lambda r: r["prepare"]["maxrss_mb"]),
                     ("cache_bytes", lambda r: r["cache_bytes"])):
        laws[key] = _fit(xs, [get(r) for r in full])
    sx = [r["frames"] for r in small]
    for name in ("aperture_1w", "aperture_2w", "linpsf_2w"):
        pts = [(r["frames"], r["runs"][name]) for r in small if name in r.get("runs", {})]
        if len(pts) >= 2:
            laws[f"{name}_cpu"] = _fit([p[0] for p in pts],
                                       [p[1]["cpu_per_target"] for p in pts])
            laws[f"{name}_rss_mb"] = _fit([p[0] for p in pts],
                                          [p[1]["maxrss_mb"] for p in pts])
    prss = [(r["frames"], r["prepare"]["maxrss_mb"]) for r in small
            if np.isfinite(r["prepare"]["maxrss_mb"])]
    if len(prss) >= 2:
        laws["prepare_rss_small_mb"] = _fit([p[0] for p in prss], [p[1] for p in prss])
        laws["prepare_cpu_small"] = _fit(sx, [r["prepare"]["cpu"] for r in small])
    out = {"laws": laws, "sectors": {}}
    ref = full[-1]
    n0 = ref["frames"]
    for n in (1282, 11800):
        a, b = laws["prepare_cpu"]
        prep = a + b * n
        a, b = laws["cache_bytes"]
        proj = {"prepare_h": prep / 3600, "cache_gb": (a + b * n) / 1e9,
                "ffi_gb": ref["ffi_bytes"] / ref["frames"] * n / 1e9,
                "todo_s": ref["todo"]["cpu"], "measured_small": n in sx}
        for name in ("aperture_2w", "linpsf_2w"):
            pts = [(r["frames"], r["runs"][name]) for r in small if name in r.get("runs", {})]
            if not pts or name not in ref["runs"]:
                continue
            per_target = ref["runs"][name]["cpu_per_target"] + _growth(
                [(f, p["cpu_per_target"]) for f, p in pts], n, n0)
            proj[f"{name}_per_target_ms"] = 1000 * per_target
            proj[f"{name}_run_h"] = targets * per_target / cores / 3600
            proj[f"{name}_rss_mb"] = ref["runs"][name]["maxrss_mb"] + _growth(
                [(f, p["maxrss_mb"]) for f, p in pts], n, n0)
        proj["prepare_rss_mb"] = ref["prepare"]["maxrss_mb"] + (
            _growth(prss, n, n0) if prss else 0.0)
        # the correction (one process, every light curve once): CPU per light curve
        cpts = [(r["frames"], r["correct"]["cpu_per_lc"]) for r in small if "correct" in r]
        if "correct" in ref:
            per_lc = ref["correct"]["cpu_per_lc"] + (_growth(cpts, n, n0) if cpts else 0.0)
            proj["correct_per_lc_ms"] = 1000 * per_lc
            proj["correct_h"] = targets * per_lc / 3600
            proj["correct_rss_mb"] = ref["correct"]["maxrss_mb"] + (_growth(
                [(r["frames"], r["correct"]["maxrss_mb"]) for r in small if "correct" in r],
                n, n0) if cpts else 0.0)
        proj["total_aperture_h"] = proj["prepare_h"] + proj["todo_s"] / 3600 + proj.get(
            "aperture_2w_run_h", float("nan")) + proj.get("correct_h", 0.0)
        out["sectors"][n] = proj
    return out


# ------------------------------------------------------------------------------ report
def _nan(d, key):
    return d.get(key, float("nan")) if d else float("nan")


def report(full, small, proj, machine):
    nan = float("nan")
    lines = [f"`python benchmarks/bench_sector.py` ({machine}). Measured points (each "
             "command under a wrapper: wall, CPU of it and its children, peak RSS of the "
             "largest process; a run's CPU per target is its whole CPU, coordinator and "
             "workers, start-up included, over the targets it ran):", "",
             "| sector | frames | size | prepare wall / CPU (s) | prepare CPU per frame "
             "(x astropy floor) | prepare peak RSS (MB) | backdrop setup + fit/frame | "
             "cache B/px/frame | todo CPU (s) | tasks | aperture targets 1w / 2w | "
             "aperture 2w CPU/target (ms) | aperture run peak RSS (MB) | linpsf targets, "
             "CPU/target (ms), peak RSS (MB) | correction light curves, CPU/light curve "
             "(ms), peak RSS (MB) | load average at the end |",
             "|" + "---|" * 16]
    for r in full + small:
        p = r["prepare"]
        runs = r["runs"]
        a1, a2, lp = runs.get("aperture_1w", {}), runs.get("aperture_2w", {}), \
            runs.get("linpsf_2w", {})
        floor = r.get("astropy_cpu_per_frame", nan)
        per = p["cpu"] / r["frames"]
        lines.append(
            f"| {r['label']} | {r['frames']} | {r['size']} | {p['wall']:.0f} / {p['cpu']:.0f} | "
            f"{1000 * per:.0f} ms ({per / floor:.0f}x) | {p['maxrss_mb']:.0f} | "
            f"{r['backdrop_setup']:.1f} s + {1000 * r['backdrop_fit_per_frame']:.0f} ms | "
            f"{r['cache_bytes_per_px_frame']:.2f} | {r['todo']['cpu']:.1f} | {r['tasks']} | "
            f"{a1.get('n', 0)} / {a2.get('n', 0)} | "
            f"{1000 * _nan(a2, 'cpu_per_target'):.0f} | {_nan(a2, 'maxrss_mb'):.0f} | "
            f"{lp.get('n', 0)}, {1000 * _nan(lp, 'cpu_per_target'):.0f}, "
            f"{_nan(lp, 'maxrss_mb'):.0f} | {r.get('lc_files', 0) if 'correct' in r else 0}, "
            f"{1000 * _nan(r.get('correct'), 'cpu_per_lc'):.0f}, "
            f"{_nan(r.get('correct'), 'maxrss_mb'):.0f} | {r.get('load_average', nan):.1f} |")
    laws = proj["laws"]
    lines += ["", "Growth laws (least squares through the measured points, N = frames; "
              "per-target CPU in s, RSS in MB):", ""]
    for key, (a, b) in ((k, v) for k, v in laws.items() if isinstance(v, (tuple, list))):
        lines.append(f"- `{key}` = {a:.4g} + {b:.4g} N")
    lines += ["", "Projection for one CCD-sector, full 2048 x 2048 frames, 100 000 targets, "
              "2 idle cores, from CPU seconds (see `project`: the full-frame per-target cost "
              "plus the growth measured on the cut-down sectors; aperture for every target, "
              "linpsf shown for what it would cost):", "",
              "| frames | cut-down point | prepare (h) | run, aperture (h) | correction (h) | "
              "end to end (h) | aperture per target (ms) | correction per light curve (ms) | "
              "linpsf per target (ms) / run (h) | peak RSS prepare / aperture run / linpsf "
              "run / correction (MB) | cache (GB) | input FFIs (GB) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, s in proj["sectors"].items():
        lines.append(
            f"| {n} | {'measured' if s.get('measured_small') else 'extrapolated'} | "
            f"{s['prepare_h']:.2f} | {_nan(s, 'aperture_2w_run_h'):.2f} | "
            f"{_nan(s, 'correct_h'):.2f} | **{s['total_aperture_h']:.2f}** | "
            f"{_nan(s, 'aperture_2w_per_target_ms'):.0f} | {_nan(s, 'correct_per_lc_ms'):.0f} | "
            f"{_nan(s, 'linpsf_2w_per_target_ms'):.0f} / {_nan(s, 'linpsf_2w_run_h'):.1f} | "
            f"{s['prepare_rss_mb']:.0f} / {_nan(s, 'aperture_2w_rss_mb'):.0f} / "
            f"{_nan(s, 'linpsf_2w_rss_mb'):.0f} / {_nan(s, 'correct_rss_mb'):.0f} | "
            f"{s['cache_gb']:.0f} | {s['ffi_gb']:.0f} |")
    return "\n".join(lines)


def write_docs(text):
    begin, end = "<!-- bench_sector: begin -->", "<!-- bench_sector: end -->"
    doc = DOCS.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in doc:
        doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda m: block, doc,
                     flags=re.S)
    else:
        doc = doc.rstrip() + "\n\n## Whole sector\n\n" + block + "\n"
    DOCS.write_text(doc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--full-frames", type=int, nargs="*", default=[40, 200],
                    help="frame counts of the full-size sectors (>= 200 for the goal)")
    ap.add_argument("--full-size", type=int, default=FULL,
                    help="frame size of the 'full' part (smaller only to try the script)")
    ap.add_argument("--small", type=int, default=128, help="cut-down frame size (px)")
    ap.add_argument("--small-frames", type=int, nargs="*", default=[200, 1282, 11800])
    ap.add_argument("--run-targets", type=int, default=1200,
                    help="aperture targets of the full-frame sectors, run with 2 workers")
    ap.add_argument("--one-worker-targets", type=int, default=400,
                    help="aperture targets run with one worker (full frames; 0: none)")
    ap.add_argument("--linpsf-targets", type=int, default=60,
                    help="linpsf targets of the full-frame sectors, 2 workers")
    ap.add_argument("--small-run-targets", type=int, default=200,
                    help="aperture targets of the cut-down sectors (the same stars at every "
                         "frame count; 0: their share of the 100 000, by area)")
    ap.add_argument("--small-linpsf-targets", type=int, default=20,
                    help="linpsf targets of the cut-down sectors")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path, default=None,
                    help="also write the figures here (after every sector)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="project from these --json files instead of measuring")
    ap.add_argument("--resume", nargs=3, default=None, metavar=("DIR", "FRAMES", "SIZE"),
                    help="todo, run and correct on the cache an interrupted sector left in "
                         "DIR (WORKDIR/LABEL, kept with its prepare.log), then stop")
    args = ap.parse_args(argv)
    if args.resume:
        base, n, size = Path(args.resume[0]), int(args.resume[1]), int(args.resume[2])
        small = size < FULL
        share = args.small_run_targets or max(1, round(TARGETS * size ** 2 / FULL ** 2))
        res = resume(base, n, size, share if small else args.run_targets,
                     args.small_linpsf_targets if small else args.linpsf_targets,
                     0 if small else args.one_worker_targets)
        print(json.dumps(res, default=float), flush=True)
        _save(args.json, [] if small else [res], [res] if small else [],
              _machine(os.getloadavg()[0]))
        return 0
    if args.merge:
        full, small, machines = [], [], []
        for path in args.merge:
            figures = json.loads(path.read_text())
            full += figures["full"]
            small += figures["small"]
            machines.append(figures.get("machine", ""))
        full.sort(key=lambda r: r["frames"])
        small.sort(key=lambda r: r["frames"])
        return _finish(full, small, "; ".join(m for m in machines if m), args)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_sector_"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    full, small = [], []
    try:
        for n in args.full_frames:
            print(f"== full frames: {n}", flush=True)
            full.append(sector(work, f"full{n}", n, args.full_size, args.run_targets,
                               args.linpsf_targets, args.one_worker_targets))
            print(json.dumps(full[-1], default=float), flush=True)
            _save(args.json, full, small, _machine(load))
        for n in args.small_frames:
            print(f"== {args.small} px frames: {n}", flush=True)
            k = args.small_run_targets or max(1, round(TARGETS * args.small ** 2 / FULL ** 2))
            lp = args.small_linpsf_targets
            small.append(sector(work, f"small{n}", n, args.small, k, min(k, lp), 0))
            print(json.dumps(small[-1], default=float), flush=True)
            _save(args.json, full, small, _machine(load))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if not full or not small:
        print("projection needs full-frame and cut-down sectors (see --merge)")
        return 0
    return _finish(full, small, _machine(load), args)


def _machine(load):
    return (f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}, load average "
            f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")


def _save(path, full, small, machine):
    if path is not None:
        path.write_text(json.dumps({"full": full, "small": small, "machine": machine},
                                   default=float, indent=1))


def _finish(full, small, machine, args):
    proj = project(full, small)
    text = report(full, small, proj, machine)
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
