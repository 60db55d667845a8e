"""Backdrop background model vs tess-backdrop 0.1.6 on the same simulated full-size frames.

Usage::

    python benchmarks/bench_backdrop.py WORKDIR [--cadences 20] [--seed 21] [--no-peer] [--repeat 1]

Simulates (once, kept in WORKDIR/sim) a full CCD with ``tessphot simulate --full-frame``,
then fits, each in its own subprocess so that peak memory is measured separately:

* ours: the ``backdrop`` prepare stage on the cache subset it reads (written once, uncompressed);
* peer: ``tess_backdrop.BackDrop`` on the FFI files (``pip install tess-backdrop==0.1.6
  --no-deps --ignore-requires-python fitsio fbpca``; its intermediate ``save()`` calls, which
  write into site-packages, are disabled, which only helps it).

``--repeat N`` runs ours and the peer alternately N times (a shared machine's load changes
from minute to minute) and reports each run and the median ratio.

Reports fit time per frame (wall and CPU, the frame loop only; setup reported apart), peak RSS of the
process and the residual model - true background over star-free pixels and the bias within
3 px of bright stars, on the pixels both models cover (tess-backdrop reads CCD columns
45..2092, i.e. our cube columns 1..2047). tess-backdrop models the background relative to its
average image, so residuals are also given with a per-frame constant removed, for both.
Heavy: ~5 GB and a few minutes on 2 cores for 20 frames.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

#: tess-backdrop models CCD columns 45..2092 (0-based); our cube starts at column 44
PEER_COLUMN_SHIFT = 1


def _peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def _truth(sim_dir):
    import h5py
    h5 = h5py.File(Path(sim_dir) / "truth.h5", "r")
    stars = {k: h5["stars"][k][()] for k in ("row", "column", "tmag")}
    return h5, stars, int(h5.attrs["row_offset"]), int(h5.attrs["column_offset"])


def _metrics(model, sim_dir, region):
    from photometry_backdrop.scene import background_metrics
    h5, stars, r0, c0 = _truth(sim_dir)
    truth = h5["background"]
    out = {
        "raw": background_metrics(model, truth, stars, r0, c0, region=region),
        "minus_frame_constant": background_metrics(model, truth, stars, r0, c0, region=region,
                                                   remove_constant=True),
    }
    h5.close()
    return out


def worker_ours(stage_file, sim_dir):
    import h5py

    from photometry.hooks.settings import load_settings
    from photometry_backdrop import Backdrop
    from photometry_backdrop.scene import BlockReader

    settings = load_settings(assignments=["backdrop.progress=false"])
    with h5py.File(stage_file, "r+") as f:
        if "models/backdrop" in f:
            del f["models/backdrop"]
        group = f.require_group("models").create_group("backdrop")
        t0 = time.perf_counter()
        Backdrop(settings).run(BlockReader(f, block=32), group)
        total = time.perf_counter() - t0
        rss = _peak_rss_gb()
        n = group["weights"].shape[0]
        state_bytes = sum(group[k].nbytes for k in group if isinstance(group[k], h5py.Dataset))
        result = {
            "n_frames": n, "setup_s": float(group.attrs["time_setup"]),
            "fit_s": float(group.attrs["time_fit"]), "total_s": total,
            "per_frame_s": float(group.attrs["time_fit"]) / n, "peak_rss_gb": rss,
            "per_frame_cpu_s": float(group.attrs["time_fit_cpu"]) / n,
            "state_mb": state_bytes / 1e6, "image_mb": f["images"].nbytes / 1e6,
        }

        class Lazy:
            def __len__(self):
                return n

            def __getitem__(self, i):
                return Backdrop.evaluate(group, slice(None), slice(None), [i])[0]

        result["metrics"] = _metrics(Lazy(), sim_dir, (slice(None), slice(PEER_COLUMN_SHIFT, None)))
    return result


def worker_peer(sim_dir):
    import tess_backdrop as tbd

    fnames = sorted(str(p) for p in (Path(sim_dir) / "ffi").glob("*_ffic.fits"))
    t0 = time.perf_counter()
    b = tbd.BackDrop(fnames, cutout_size=2048)
    b.save = lambda *a, **k: None        # 0.1.6 writes into site-packages; skip (helps it)
    b._build_mask()
    b._build_matrices()
    setup = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), time.process_time()
    b.fit_model()
    fit, fit_cpu = time.perf_counter() - t1, time.process_time() - c1
    rss = _peak_rss_gb()
    n = len(fnames)
    result = {"n_frames": n, "setup_s": setup, "fit_s": fit, "total_s": setup + fit,
              "per_frame_s": fit / n, "per_frame_cpu_s": fit_cpu / n, "peak_rss_gb": rss}
    # Evaluate with the matrices the fit itself used: 0.1.6's build_correction centres the
    # radial term on bore_pixel[1] for rows too, wrong for CCDs 2 and 4 (our CCD 4), so it
    # would charge the peer with an evaluation bug rather than its model.
    size = b.cutout_size

    def peer_frame(i):
        m = np.asarray(b._poly_X.dot(b.poly_w[i].ravel())).reshape(size, size)
        m = m + np.asarray(b._spline_X.dot(b.spline_w[i].ravel())).reshape(size, size)
        return m + b.strap_w[i][None, :size]

    class Shifted:
        # peer column j is our cube column j + 1: compare our columns 1..2047 with its 0..2046
        def __len__(self):
            return n

        def __getitem__(self, i):
            out = np.full((2048, 2048), np.nan)
            out[:, PEER_COLUMN_SHIFT:] = peer_frame(i)[:, :2048 - PEER_COLUMN_SHIFT]
            return out

    result["metrics"] = _metrics(Shifted(), sim_dir, (slice(None), slice(PEER_COLUMN_SHIFT, None)))
    return result


def photometry_comparison(cache_dir, sim_dir, out_dir, tmag_range=(8.0, 13.0)):
    """Aperture photometry of the simulator's isolated stars with the backdrop background and
    with the local (default fallback) background; scatter of FLUX / true flux per star."""
    import h5py
    from astropy.io import fits

    with h5py.File(Path(sim_dir) / "truth.h5", "r") as h5:
        st = h5["stars"]
        sid, tmag = st["starid"][()], st["tmag"][()]
        sel = np.flatnonzero(st["isolated"][()].astype(bool) & (tmag > tmag_range[0])
                             & (tmag < tmag_range[1]))
        flux = h5["flux"][()]
    rows = []
    for i in sel:
        res = {}
        for label, bkg in (("backdrop", "backdrop"), ("local", '""')):
            out = Path(out_dir) / label
            subprocess.run([sys.executable, "-m", "photometry.cli", "star", str(sid[i]),
                            "--cache", str(cache_dir), "--output", str(out), "--method",
                            "aperture", "--set", f"photometry.background={bkg}"],
                           check=True, capture_output=True)
            path = next(out.rglob(f"tess{int(sid[i]):011d}-*_lc.fits"))
            with fits.open(path) as hdul:
                d = hdul["LIGHTCURVE"].data
                f = np.asarray(d["SAP_FLUX"], float)
                ok = np.isfinite(f) & (np.asarray(d["QUALITY"]) == 0)
            ratio = f[ok] / flux[i][ok]
            res[label] = {"rel_rms": float(np.std(ratio / np.median(ratio))),
                          "scale": float(np.median(ratio))}
        rows.append({"starid": int(sid[i]), "tmag": float(tmag[i]), **res})
    return rows


def _run_worker(kind, *args):
    cmd = [sys.executable, __file__, "--worker", kind, *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", nargs="?")
    p.add_argument("--cadences", type=int, default=20)
    p.add_argument("--seed", type=int, default=21)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--repeat", type=int, default=1,
                   help="run ours and the peer alternately this many times")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--photometry", nargs=2, metavar=("CACHE_DIR", "SIM_DIR"),
                   help="only compare aperture photometry with backdrop vs local background "
                        "on a prepared cache (prepare.stages = [\"backdrop\"]) of SIM_DIR")
    args = p.parse_args(argv)
    if args.photometry:
        rows = photometry_comparison(*args.photometry, Path(args.workdir) / "lc")
        for r in rows:
            print(f"{r['starid']} Tmag {r['tmag']:5.2f}: rel rms backdrop "
                  f"{r['backdrop']['rel_rms']:.5f} local {r['local']['rel_rms']:.5f}; "
                  f"scale {r['backdrop']['scale']:.4f} / {r['local']['scale']:.4f}")
        b = np.array([r["backdrop"]["rel_rms"] for r in rows])
        loc = np.array([r["local"]["rel_rms"] for r in rows])
        print(f"median rms ratio backdrop/local {np.median(b / loc):.3f}; backdrop better or "
              f"equal for {np.sum(b <= loc * 1.0001)} of {len(rows)} stars")
        (Path(args.workdir) / "photometry.json").write_text(json.dumps(rows, indent=1))
        return 0
    if args.worker:
        kind, *rest = args.worker
        res = worker_ours(*rest) if kind == "ours" else worker_peer(*rest)
        print(json.dumps(res))
        return 0

    from photometry.sim.stage_input import load_simulation, write_stage_input

    work = Path(args.workdir)
    sim_dir = work / "sim"
    if not (sim_dir / "truth.h5").exists():
        # --full-frame: tess-backdrop reads the SPOC frame layout (collateral columns too)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "photometry.cli", "simulate", str(sim_dir),
                        "--cadences", str(args.cadences), "--seed", str(args.seed),
                        "--full-frame", "--no-progress"], check=True)
        print(f"simulated {args.cadences} full frames in {time.perf_counter() - t0:.0f} s")
    stage_file = work / "sector0001_camera1_ccd4.hdf5"
    if not stage_file.exists():
        write_stage_input(stage_file, load_simulation(sim_dir, with_background=False))
    runs = []
    for k in range(max(1, args.repeat)):
        run = {"ours": _run_worker("ours", stage_file, sim_dir)}
        if not args.no_peer:
            run["peer"] = _run_worker("peer", sim_dir)
            print(f"run {k + 1}: ours {run['ours']['per_frame_s'] * 1e3:.0f} ms/frame "
                  f"({run['ours']['per_frame_cpu_s'] * 1e3:.0f} CPU), tess-backdrop "
                  f"{run['peer']['per_frame_s'] * 1e3:.0f} ms/frame "
                  f"({run['peer']['per_frame_cpu_s'] * 1e3:.0f} CPU)", flush=True)
        runs.append(run)
    results = runs[-1]
    if len(runs) > 1 and not args.no_peer:
        wall = [r["peer"]["per_frame_s"] / r["ours"]["per_frame_s"] for r in runs]
        cpu = [r["peer"]["per_frame_cpu_s"] / r["ours"]["per_frame_cpu_s"] for r in runs]
        print(f"per-frame speed-up over {len(runs)} alternating runs: wall "
              f"{', '.join(f'{x:.1f}' for x in wall)} (median {np.median(wall):.1f}x); CPU "
              f"{', '.join(f'{x:.1f}' for x in cpu)} (median {np.median(cpu):.1f}x)")
        results = dict(results, runs=runs)
    print(json.dumps(results, indent=1))
    o = results["ours"]
    print(f"\nbackdrop: {o['n_frames']} frames, setup {o['setup_s']:.1f} s, "
          f"{o['per_frame_s'] * 1e3:.0f} ms/frame ({o['per_frame_cpu_s'] * 1e3:.0f} ms CPU), peak RSS {o['peak_rss_gb']:.2f} GB, "
          f"state {o['state_mb']:.1f} MB ({o['image_mb']:.0f} MB of images)")
    for name in ("ours", "peer"):
        if name not in results:
            continue
        r = results[name]
        m, mc = r["metrics"]["raw"], r["metrics"]["minus_frame_constant"]
        print(f"{name:9s} rms star-free {m['rms_star_free']:.3f} (minus frame constant "
              f"{mc['rms_star_free']:.3f}) e-/s; bias near bright stars {m['bias_bright']:+.3f} "
              f"({mc['bias_bright']:+.3f}) e-/s")
    if "peer" in results:
        q = results["peer"]
        print(f"tess-backdrop: setup {q['setup_s']:.1f} s, {q['per_frame_s'] * 1e3:.0f} ms/frame "
              f"({q['per_frame_cpu_s'] * 1e3:.0f} ms CPU), "
              f"peak RSS {q['peak_rss_gb']:.2f} GB")
        print(f"ratios: per-frame speed-up {q['per_frame_s'] / o['per_frame_s']:.1f}x "
              f"(CPU {q['per_frame_cpu_s'] / o['per_frame_cpu_s']:.1f}x), "
              f"total-time speed-up {q['total_s'] / o['total_s']:.1f}x, "
              f"peak memory {o['peak_rss_gb'] / q['peak_rss_gb']:.2f} of the peer's")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
