"""Benchmarks of the HDF5 cache and prepare (prints its figures; not a test).

Part ``throughput``: ``tessphot prepare`` on full-size 2136x2078 SPOC-format frames versus
reading the same FITS files with astropy (image + uncertainty HDUs), as a ratio (goal <= 2).
Part ``stamp``: 15x15 stamps over all cadences of a 512x512, 1000-cadence cache built with
CacheWriter from synthetic arrays: time per stamp with a fresh file handle and the read
amplification (chunks touched x chunk bytes / stamp bytes; goal <= 4, < 20 ms).

Part ``compression``: one simulated scene prepared with each ``prepare.compression`` and
``prepare.precision``: bytes per pixel per frame of the whole cache, and the aperture
light-curve noise of the isolated 8-13 mag stars against the lossless cache of the same scene.

Usage::

    python benchmarks/bench_prepare.py [--part stamp|throughput|compression|all]
        [--workdir DIR] [--frames 20] [--keep]
"""
import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from photometry.cache import CacheWriter, FFICache
from photometry.settings import load_settings


def build_stamp_cache(path, n_frames=1000, size=512, settings=None):
    """A 512x512 x 1000-frame cache from synthetic frames (noise + a few stars)."""
    settings = settings or load_settings()
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:size, 0:size]
    sky = (100 + 0.05 * xx + 0.03 * yy).astype(np.float32)
    stars = np.zeros((size, size), np.float32)
    for x, y, f in zip(rng.uniform(0, size, 300), rng.uniform(0, size, 300),
                       10 ** rng.uniform(2, 4.5, 300)):
        stars += (f * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / 0.8 ** 2)).astype(np.float32)
    meta = dict(sector=1, camera=1, ccd=1, cadence=1800.0, data_rel=1, procver="bench",
                row_offset=0, column_offset=44)
    files = [f"bench{i:05d}_ffic.fits" for i in range(n_frames)]
    w = CacheWriter(path, settings, ffi_files=files, shape=(size, size), meta=meta,
                    overwrite=True)
    base = sky + stars
    noise = np.sqrt(base / 1000.0).astype(np.float32)
    t0 = time.perf_counter()
    for i in range(n_frames):
        img = base + noise * rng.standard_normal((size, size), dtype=np.float32)
        w.add_frame(img, noise, time=1000 + i / 48, time_start=1000 + (i - 0.5) / 48,
                    time_stop=1000 + (i + 0.5) / 48, timecorr=0.0, cadenceno=i, quality=0)
    w.finish_ingest(usable=np.ones(n_frames, bool))
    w.close(complete=True)
    return time.perf_counter() - t0


def bench_stamps(workdir, n_stamps=200, stamp=15):
    path = Path(workdir) / "sector0001_camera1_ccd1.hdf5"
    if not path.exists():
        dt = build_stamp_cache(path)
        print(f"built 512x512x1000 cache in {dt:.1f} s ({path.stat().st_size / 1e9:.2f} GB)")
    with h5py.File(path, "r") as f:
        ds = f["images"]
        chunks, shape = ds.chunks, ds.shape
        comp = ds.compression
    chunk_bytes = int(np.prod(chunks)) * 4
    rng = np.random.default_rng(2)
    times, amps = [], []
    for _ in range(n_stamps):
        r0 = int(rng.integers(0, shape[1] - stamp))
        c0 = int(rng.integers(0, shape[2] - stamp))
        # drop the page cache effect as far as we can without root: fresh handle every time
        t0 = time.perf_counter()
        with FFICache(path) as cache:
            cube = cache.stamp("images", slice(r0, r0 + stamp), slice(c0, c0 + stamp))
        times.append(time.perf_counter() - t0)
        n_t = math.ceil(shape[0] / chunks[0])
        n_r = (r0 + stamp - 1) // chunks[1] - r0 // chunks[1] + 1
        n_c = (c0 + stamp - 1) // chunks[2] - c0 // chunks[2] + 1
        touched = n_t * n_r * n_c
        amps.append(touched * chunk_bytes / cube.nbytes)
    times = np.array(times) * 1000
    amps = np.array(amps)
    print(f"stamp {stamp}x{stamp} x {shape[0]} cadences, chunks {chunks}, compression {comp}")
    print(f"  time per stamp (fresh FFICache each): median {np.median(times):.1f} ms, "
          f"p95 {np.percentile(times, 95):.1f} ms, max {times.max():.1f} ms")
    print(f"  read amplification: mean {amps.mean():.2f}, max {amps.max():.2f} "
          f"(best case {math.ceil(stamp / chunks[1]) * math.ceil(stamp / chunks[2]) * chunks[1] * chunks[2] / stamp ** 2:.2f}, "
          f"worst case {(math.ceil(stamp / chunks[1]) + 1) * (math.ceil(stamp / chunks[2]) + 1) * chunks[1] * chunks[2] / stamp ** 2:.2f})")
    return times, amps


def _write_full_frames(outdir, n_frames):
    """Full 2136x2078 SPOC-format FFIs: the simulator's if available, else fail loudly."""
    cmd = [sys.executable, "-m", "photometry.cli", "simulate", str(outdir), "--cadences",
           str(n_frames), "--full-frame", "--seed", "3"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"simulated {n_frames} full frames in {time.perf_counter() - t0:.1f} s")


def bench_throughput(workdir, n_frames=20):
    """Wall and CPU time of prepare vs reading the same files with astropy / read_ffi.

    CPU time (``time.process_time``) is reported next to wall time because on a shared machine
    the wall time mostly measures the other jobs.
    """
    from astropy.io import fits

    from photometry.ffi import read_ffi
    from photometry.prepare import prepare

    sim = Path(workdir) / "fullsim"
    if not (sim / "ffi").exists():
        _write_full_frames(sim, n_frames)
    files = sorted((sim / "ffi").glob("*_ffic.fits*"))
    for p in files:  # warm the page cache so every timing reads from memory
        Path(p).read_bytes()

    def clock():
        return time.perf_counter(), time.process_time()

    w0, c0 = clock()
    for p in files:
        with fits.open(p, memmap=False) as hdul:
            a, b = hdul[1].data, hdul[2].data
            float(a[0, 0]) + float(b[0, 0])
    w1, c1 = clock()
    t_read, c_read = w1 - w0, c1 - c0
    w0, c0 = clock()
    for p in files:
        read_ffi(p)
    w1, c1 = clock()
    t_reader, c_reader = w1 - w0, c1 - c0
    cache = Path(workdir) / "fullcache"
    shutil.rmtree(cache, ignore_errors=True)
    # ingest only: prepare-stage plugins (settings prepare.stages) are benchmarked by their
    # owners and would swamp the figure
    no_stages = ["prepare.stages=[]"]
    w0, c0 = clock()
    prepare(sim / "ffi", sim / "catalog.csv", cache, load_settings(assignments=no_stages),
            progress=False)
    w1, c1 = clock()
    t_prep, c_prep = w1 - w0, c1 - c0
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "photometry.cli", "prepare", str(sim / "ffi"),
                    "--catalog", str(sim / "catalog.csv"), "--cache", str(cache),
                    "--no-progress", "--set", no_stages[0]], check=True, capture_output=True)
    t_cli = time.perf_counter() - t0
    n = len(files)
    print(f"{n} full 2136x2078 frames (image + uncertainty HDUs, {files[0].stat().st_size / 1e6:.0f} MB each)")
    print(f"  astropy fits.open + data of both HDUs: wall {t_read:.2f} s, CPU {c_read:.2f} s "
          f"({c_read / n * 1000:.0f} ms CPU/frame)")
    print(f"  photometry.ffi.read_ffi:               wall {t_reader:.2f} s, CPU {c_reader:.2f} s")
    print(f"  prepare in-process:                    wall {t_prep:.2f} s, CPU {c_prep:.2f} s "
          f"-> ratio to astropy wall {t_prep / t_read:.1f}, CPU {c_prep / c_read:.1f}")
    print(f"  tessphot prepare (CLI, incl. start-up): wall {t_cli:.2f} s")
    bench_steady_state(files, c_read / n)
    return t_read, t_prep


def bench_steady_state(files, astropy_cpu, n_frames=96, warmup=64):
    """Per-frame CPU of ingest in a long sector, where the fixed costs (catalog, kernel-star
    selection, imports) vanish: ``read_ffi`` + ``CacheWriter.add_frame`` over ``n_frames``
    full frames (the files cycled), against the bare astropy read.

    The first ``warmup`` frames (two blocks: both block-buffer sets, 2.4 GB, are touched for
    the first time, a page fault per 4 KiB) are ingested but not timed: a sector has 1000s of
    frames, and the buffers' first touch is a fixed cost like the catalog import. The figure
    includes the movement-kernel centroids of 200 stars and the per-frame WCS text, as in
    ``prepare``.
    """
    from photometry.prepare import _wcs_text
    from photometry.ffi import read_ffi

    with tempfile.TemporaryDirectory(dir=Path(files[0]).parent.parent) as tmp:
        first = read_ffi(files[0], wcs=False)
        meta = dict(sector=1, camera=1, ccd=1, cadence=1800.0, data_rel=1, procver="bench",
                    row_offset=0, column_offset=44)
        settings = load_settings()
        w = CacheWriter(Path(tmp) / "sector0001_camera1_ccd1.hdf5", settings,
                        ffi_files=[f"f{i:05d}_ffic.fits" for i in range(warmup + n_frames)],
                        shape=first.shape, meta=meta)
        catalog = Path(files[0]).parent.parent / "catalog.csv"
        if catalog.exists():  # the kernel stars prepare would pick
            from photometry.catalog import read_catalog
            from photometry.prepare import kernel_star_candidates
            full = read_ffi(files[0])
            w.set_kernel_stars(*kernel_star_candidates(read_catalog(catalog), full.wcs,
                                                       full.time, full.shape,
                                                       settings["prepare"], image=full.image))
        else:
            w.set_kernel_stars(np.empty(0, np.int64), np.empty(0), np.empty(0))
        c_all = c_main = 0.0
        n_stars = w.kernel_stars["starid"].size
        for i in range(warmup + n_frames):
            if i == warmup:
                w._commit()  # the warm-up blocks' writes are not part of the window
                t0 = time.perf_counter()
            c0, m0 = time.process_time(), time.thread_time()
            frame = read_ffi(files[i % len(files)])
            w.add_frame(frame.image, frame.uncert, time=1000 + i / 48, time_start=1000,
                        time_stop=1000, timecorr=0.0, cadenceno=i, quality=0,
                        wcs_header=_wcs_text(frame.wcs))
            if i >= warmup:
                c_all += time.process_time() - c0
                c_main += time.thread_time() - m0
        c0 = time.process_time()
        w.flush()
        w.close()
        c_all += time.process_time() - c0  # the last block's write
        wall = time.perf_counter() - t0
    # process_time counts the writer thread too, so only the total is a clean figure
    print(f"  steady state, {n_frames} frames after {warmup} ({n_stars} kernel stars), "
          f"{settings['prepare']['compression']}, precision {settings['prepare']['precision']}: "
          f"read_ffi + add_frame {c_all / n_frames * 1000:.0f} ms CPU/frame "
          f"({wall / n_frames * 1000:.0f} ms wall; main thread alone {c_main / n_frames * 1000:.0f} "
          f"ms CPU, the rest is the writer thread) -> ratio to astropy CPU "
          f"{c_all / n_frames / astropy_cpu:.1f}")


def bench_compression(workdir, size=128, cadences=100, seed=5):
    """Cache size and light-curve noise for each compression / precision (one scene)."""
    import h5py

    from photometry.base import STATUS
    from photometry.evaluation import score_lightcurve
    from photometry.prepare import prepare
    from photometry.simulate import simulate
    from photometry_aperture.aperture import AperturePhotometry

    sim = Path(workdir) / "compression_scene"
    if not (sim / "ffi").exists():
        simulate(sim, load_settings(extra={"simulate": {"cadences": cadences, "rows": size,
                                                         "cols": size, "seed": seed}}),
                 progress=False)
    with h5py.File(sim / "truth.h5") as t:
        stars = {k: t["stars"][k][()] for k in ("starid", "tmag", "ideal_noise", "isolated",
                                                "row", "column")}
        flux = t["flux"][()]
    pick = np.flatnonzero(stars["isolated"] & (stars["tmag"] >= 8) & (stars["tmag"] <= 13)
                          & np.isfinite(stars["ideal_noise"]))
    rows = []
    base = None
    for comp, prec in (("none", 0.0), ("bitshuffle-lz4", 0.0), ("bitshuffle-zstd", 0.0),
                       ("bitshuffle-lz4", 0.1), ("bitshuffle-lz4", 0.25),
                       ("bitshuffle-zstd", 0.25), ("bitshuffle-lz4", 0.5)):
        settings = load_settings(assignments=[f'prepare.compression="{comp}"',
                                              f"prepare.precision={prec}"])
        out = Path(workdir) / f"cache_{comp}_{prec}"
        shutil.rmtree(out, ignore_errors=True)
        c0 = time.process_time()
        path, _ = prepare(sim / "ffi", sim / "catalog.csv", out, settings, progress=False)
        cpu = time.process_time() - c0
        with FFICache(path) as cache:
            n, r, c = cache._file["images"].shape
            ratios = {}
            for k in pick:
                phot = AperturePhotometry(int(stars["starid"][k]), cache, settings=settings)
                if phot.photometry() in (STATUS.OK, STATUS.WARNING):
                    ratios[k] = score_lightcurve(phot.lightcurve, flux[k],
                                                 stars["ideal_noise"][k])[0]
        bpp = path.stat().st_size / (n * r * c)
        if base is None:
            base = ratios
        common = [k for k in ratios if k in base]
        change = np.median([ratios[k] / base[k] for k in common]) - 1
        worst = np.max(np.abs([ratios[k] / base[k] - 1 for k in common]))
        rows.append((comp, prec, bpp, np.median(list(ratios.values())), change, worst, cpu))
        print(f"{comp:16s} precision {prec:4.2f}: {bpp:5.2f} B/px/frame, noise/ideal median "
              f"{rows[-1][3]:.4f}, change vs lossless median {100 * change:+.3f} % "
              f"(worst star {100 * worst:.3f} %), prepare CPU {cpu:.1f} s ({len(common)} stars)")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["stamp", "throughput", "compression", "all"],
                        default="all")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prepare_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.part in ("stamp", "all"):
            bench_stamps(workdir)
        if args.part in ("throughput", "all"):
            bench_throughput(workdir, args.frames)
        if args.part in ("compression", "all"):
            bench_compression(workdir)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
