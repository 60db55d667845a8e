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

    python benchmarks/bench_prepare.py [--part stamp|throughput|compression|rate|...|all]
        [--workdir DIR] [--frames 20] [--keep]
        [--counts 40 104] [--compare OLD_CODE_DIR] [--stages ingest default]
        [--set prepare.preview_frames=32]
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

from photometry.data.cache import CacheWriter, FFICache
from photometry.hooks.settings import load_settings


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

    from photometry.data.ffi import read_ffi
    from photometry.scheduler.prepare import prepare

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
    print(f"  photometry.data.ffi.read_ffi:               wall {t_reader:.2f} s, CPU {c_reader:.2f} s")
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
    from photometry.scheduler.prepare import _wcs_text
    from photometry.data.ffi import read_ffi

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
            from photometry.data.catalog import read_catalog
            from photometry.scheduler.prepare import kernel_star_candidates
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

    from photometry.core.base import STATUS
    from photometry.sim.evaluation import score_lightcurve
    from photometry.scheduler.prepare import prepare
    from photometry.sim.simulate import simulate
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


def clone_series(template_dir, out_dir, n_frames):
    """``n_frames`` FFIs made from the template frames (cycled), each with its own time.

    Only TSTART/TSTOP (every HDU that has them) and FFIINDEX change, by one cadence per
    frame, so ``prepare`` sees a regular series as long as a real 200-s sector; the pixels
    repeat with the template's period. Much faster than simulating 11 800 frames.
    """
    from astropy.io import fits
    template = sorted(Path(template_dir).glob("*_ffic.fits"))
    out_dir = Path(out_dir)
    if out_dir.exists() and len(list(out_dir.glob("*_ffic.fits"))) == n_frames:
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    with fits.open(template[0]) as h:
        step = float(h[1].header["TSTOP"]) - float(h[1].header["TSTART"])
        delta = float(h[1].header.get("TIMEDEL", step))
        t0 = float(h[1].header["TSTART"])
        i0 = int(h[0].header.get("FFIINDEX", 0))
        sector, camera, ccd = (int(h[0].header[k]) for k in ("SECTOR", "CAMERA", "CCD"))
    for i in range(n_frames):
        with fits.open(template[i % len(template)]) as h:
            for hdu in h:
                if "TSTART" in hdu.header:
                    hdu.header["TSTART"] = t0 + i * delta
                    hdu.header["TSTOP"] = t0 + i * delta + step
                if "FFIINDEX" in hdu.header:
                    hdu.header["FFIINDEX"] = i0 + i
            h.writeto(out_dir / f"tess{1000000000 + i:013d}-s{sector:04d}-{camera}-{ccd}"
                      "-0120-s_ffic.fits", output_verify="ignore")
    return out_dir


def _run_measured(cmd, env=None, cwd=None):
    """(wall s, CPU s, peak RSS GiB) of a child process (``os.wait4``)."""
    import os
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    if status != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024 ** 2


def bench_memory(workdir, small=(1282, 4000, 11800), small_size=64, full=(),
                 stages=None):
    """Peak RSS of ``tessphot prepare`` (default stages) against the number of frames.

    Cut-down frames (``small_size`` px square) at 1 282, 4 000 and 11 800 frames (200-s
    cadence), and full 2048 x 2048 frames at the counts in ``full`` (``--part rate``
    measures those too, beside the read floor): each prepare runs as its own process, its
    peak RSS from ``wait4``; a straight line through the points gives the fixed part and the
    growth per frame.
    """
    results = []
    sets = []
    if small:
        tpl = Path(workdir) / f"mem_template_{small_size}"
        if not (tpl / "ffi").exists():
            subprocess.run([sys.executable, "-m", "photometry.cli", "simulate", str(tpl),
                            "--cadences", "40", "--size", str(small_size), str(small_size),
                            "--cadence", "200", "--sector", "60", "--seed", "7",
                            "--no-progress"], check=True)
        sets += [(f"{small_size}x{small_size}", n, tpl) for n in small]
    if full:
        tpl = Path(workdir) / "mem_template_full"
        if not (tpl / "ffi").exists():
            subprocess.run([sys.executable, "-m", "photometry.cli", "simulate", str(tpl),
                            "--cadences", "12", "--full-frame", "--cadence", "200",
                            "--sector", "60", "--seed", "3", "--no-progress"], check=True)
        sets += [("2048x2048", n, tpl) for n in full]
    for label, n, tpl in sets:
        ffi = clone_series(tpl / "ffi", Path(workdir) / f"mem_{label}_{n}", n)
        cache = Path(workdir) / f"mem_cache_{label}_{n}"
        shutil.rmtree(cache, ignore_errors=True)
        cmd = [sys.executable, "-m", "photometry.cli", "prepare", str(ffi), "--catalog",
               str(tpl / "catalog.csv"), "--cache", str(cache), "--no-progress",
               "--set", "backdrop.progress=false"]
        if stages is not None:
            cmd += ["--set", f"prepare.stages={stages}"]
        wall, cpu, rss = _run_measured(cmd)
        size = sum(p.stat().st_size for p in cache.glob("*.hdf5"))
        results.append((label, n, wall, cpu, rss, size))
        print(f"  prepare {label} x {n:5d} frames: peak RSS {rss:.2f} GiB, CPU {cpu:.1f} s "
              f"({cpu / n * 1000:.1f} ms/frame), wall {wall:.1f} s, cache {size / 1e9:.2f} GB",
              flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    for label in sorted({r[0] for r in results}):
        pts = np.array([(r[1], r[4]) for r in results if r[0] == label])
        if len(pts) >= 2:
            slope, icpt = np.polyfit(pts[:, 0], pts[:, 1], 1)
            print(f"  {label}: peak RSS = {icpt:.2f} GiB + {slope * 1024 ** 2:.1f} kB/frame "
                  f"x frames (at 11 800 frames: {icpt + slope * 11800:.2f} GiB)")
    return results


def bench_rate(workdir, counts=(100, 300), template=None, compare=None,
               stages=("ingest", "default"), settings=()):
    """Prepare per full frame against the bare astropy read of the same files, in one run.

    Full 2136 x 2078 frames (``clone_series`` of a 12-frame simulated template) at two
    frame counts; for each: the astropy floor (``fits.open`` + data of both image HDUs,
    every file, page cache warm), ``tessphot prepare`` ingest only (``prepare.stages=[]``)
    and with the default stages, each as its own process (CPU from ``wait4``, so every
    thread counts). The per-frame figures are the differences between the two counts
    divided by the difference in frames: the fixed per-CCD costs (imports, catalog,
    kernel-star selection, the stages' set-up) cancel, as in a sector of thousands of frames.

    ``settings``: ``--set`` assignments for every prepare, e.g. ``prepare.preview_frames=32``
    so that the preview (``prepare.preview_frames`` frames, 100 by default: 40 at 40 frames,
    100 at 104) is the same at both counts and cancels from the per-frame figure.

    ``compare``: a folder holding another version of the ``photometry`` package (e.g.
    ``git archive main | tar -x -C DIR``); every prepare then also runs with that code
    (``PYTHONPATH``), alternating with this one, so both see the same load.
    """
    import os

    from astropy.io import fits
    tpl = Path(template or Path(workdir) / "mem_template_full")
    if not (tpl / "ffi").exists():
        subprocess.run([sys.executable, "-m", "photometry.cli", "simulate", str(tpl),
                        "--cadences", "12", "--full-frame", "--cadence", "200", "--sector",
                        "60", "--seed", "3", "--no-progress"], check=True)
    codes = [("this", None)] + ([("compare", str(compare))] if compare else [])
    extras = {"ingest": ["--set", "prepare.stages=[]"], "default": []}
    rows = {}
    for n in counts:
        ffi = clone_series(tpl / "ffi", Path(workdir) / f"mem_2048x2048_{n}", n)
        files = sorted(ffi.glob("*_ffic.fits"))
        for p in files:
            p.read_bytes()   # page cache warm for every reader
        w0, c0 = time.perf_counter(), time.process_time()
        for p in files:
            with fits.open(p, memmap=False) as hdul:
                a, b = hdul[1].data, hdul[2].data
                float(a[0, 0]) + float(b[0, 0])
        floor = (time.perf_counter() - w0, time.process_time() - c0)
        runs = {}
        for label in stages:
            for code, path in codes[::1 if n == counts[0] else -1]:
                cache = Path(workdir) / f"rate_cache_{n}_{label}"
                shutil.rmtree(cache, ignore_errors=True)
                env = dict(os.environ)
                if path:
                    env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
                runs[label, code] = _run_measured(
                    [sys.executable, "-m", "photometry.cli", "prepare", str(ffi), "--catalog",
                     str(tpl / "catalog.csv"), "--cache", str(cache), "--no-progress",
                     "--set", "backdrop.progress=false", *extras[label],
                     *[a for value in settings for a in ("--set", value)]], env=env,
                    cwd=workdir)   # not a checkout: PYTHONPATH decides the code
                shutil.rmtree(cache, ignore_errors=True)
        rows[n] = (floor, runs)
        print(f"  {n} full frames (load {os.getloadavg()[0]:.1f}): astropy floor CPU "
              f"{floor[1]:.2f} s (wall {floor[0]:.2f}); "
              + "; ".join(f"prepare {k[0]} ({k[1]}): CPU {v[1]:.1f} s, wall {v[0]:.1f} s, "
                          f"peak RSS {v[2]:.2f} GiB" for k, v in runs.items()), flush=True)
    a, b = counts[0], counts[-1]
    dn = b - a
    floor_cpu = (rows[b][0][1] - rows[a][0][1]) / dn
    floor_wall = (rows[b][0][0] - rows[a][0][0]) / dn
    print(f"  per frame (frames {a} -> {b}): astropy floor {1000 * floor_cpu:.1f} ms CPU, "
          f"{1000 * floor_wall:.1f} ms wall")
    for key in rows[a][1]:
        cpu = (rows[b][1][key][1] - rows[a][1][key][1]) / dn
        wall = (rows[b][1][key][0] - rows[a][1][key][0]) / dn
        print(f"  prepare {key[0]:7s} ({key[1]:7s}): {1000 * cpu:.0f} ms CPU "
              f"({cpu / floor_cpu:.1f}x the floor), {1000 * wall:.0f} ms wall "
              f"({wall / floor_wall:.1f}x)")
    return rows


def bench_trim_masks(workdir, size=128, cadences=100, seeds=(5, 11, 17), precision=0.1):
    """What the precision trim does to aperture photometry, with the mask choice held fixed.

    Each scene is prepared lossless and trimmed (``prepare.precision``). The aperture plugin
    runs on the lossless cache recording each star's final stamp and mask (its
    ``MaskResult``: aperture, segmentation, sky pixels), then on the trimmed cache twice:
    choosing its masks again ("own masks", what a user gets) and with the recorded ones
    ("fixed masks"), and with the recorded masks on a copy of the trimmed cache holding the
    lossless cache's models (backdrop, movement kernel): the trim's effect on the photometry
    alone, without the prepare-stage models re-fitted on trimmed data. Per star: noise/ideal
    ratio change against the lossless cache, and whether the mask changed.
    """
    import h5py

    from photometry.core.base import STATUS
    from photometry.sim.evaluation import score_lightcurve
    from photometry.scheduler.prepare import prepare
    from photometry.sim.simulate import simulate
    from photometry_aperture.aperture import AperturePhotometry

    class Recording(AperturePhotometry):
        masks = {}
        replay = False

        def find_mask(self):
            if Recording.replay:
                stamp, res = Recording.masks[self.starid]
                self._set_stamp(stamp)
                return res
            res = super().find_mask()
            Recording.masks[self.starid] = (tuple(self._stamp), res)
            return res

    def ratios(cache_path, settings, pick, stars, flux, cls, replay):
        from photometry.data.cache import FFICache
        cls.replay = replay
        out, masks = {}, {}
        with FFICache(cache_path) as cache:
            for k in pick:
                phot = cls(int(stars["starid"][k]), cache, settings=settings)
                if phot.photometry() in (STATUS.OK, STATUS.WARNING):
                    out[k] = score_lightcurve(phot.lightcurve, flux[k], stars["ideal_noise"][k])[0]
                    masks[k] = (tuple(phot._stamp), phot.final_phot_mask.copy())
        return out, masks

    lines = []
    for seed in seeds:
        sim = Path(workdir) / f"trim_scene_{size}_{cadences}_{seed}"
        if not (sim / "ffi").exists():
            simulate(sim, load_settings(extra={"simulate": {"cadences": cadences, "rows": size,
                                                             "cols": size, "seed": seed}}),
                     progress=False)
        with h5py.File(sim / "truth.h5") as t:
            stars = {k: t["stars"][k][()] for k in ("starid", "tmag", "ideal_noise", "isolated")}
            flux = t["flux"][()]
        pick = np.flatnonzero(stars["isolated"] & (stars["tmag"] >= 8) & (stars["tmag"] <= 13)
                              & np.isfinite(stars["ideal_noise"]))
        paths = {}
        for prec in (0.0, precision):
            settings = load_settings(assignments=[f"prepare.precision={prec}",
                                                  "backdrop.progress=false"])
            out = Path(workdir) / f"trim_cache_{seed}_{prec}"
            shutil.rmtree(out, ignore_errors=True)
            paths[prec] = (prepare(sim / "ffi", sim / "catalog.csv", out, settings,
                                   progress=False)[0], settings)
        # the trimmed pixels with the lossless cache's models (backdrop, movement kernel):
        # what the trim does to the photometry itself, without the models re-fitted on it
        hybrid_dir = Path(workdir) / f"trim_cache_{seed}_hybrid"
        shutil.rmtree(hybrid_dir, ignore_errors=True)
        shutil.copytree(paths[precision][0].parent, hybrid_dir)
        hybrid = hybrid_dir / paths[precision][0].name
        with h5py.File(paths[0.0][0], "r") as src, h5py.File(hybrid, "r+") as dst:
            for name in ("models", "movement_kernel"):
                del dst[name]
                src.copy(src[name], dst, name)
        Recording.masks = {}
        base, base_masks = ratios(*paths[0.0], pick, stars, flux, Recording, False)
        own, own_masks = ratios(*paths[precision], pick, stars, flux, AperturePhotometry, False)
        fixed, _ = ratios(*paths[precision], pick, stars, flux, Recording, True)
        pure, _ = ratios(hybrid, paths[precision][1], pick, stars, flux, Recording, True)
        for k in sorted(base):
            if k not in own or k not in fixed or k not in pure:
                continue
            same = own_masks[k][0] == base_masks[k][0] and np.array_equal(own_masks[k][1],
                                                                          base_masks[k][1])
            lines.append((seed, int(stars["starid"][k]), float(stars["tmag"][k]), base[k],
                          own[k] / base[k] - 1, fixed[k] / base[k] - 1, same,
                          pure[k] / base[k] - 1))
    arr = np.array([(r[4], r[5], r[6], r[7]) for r in lines])
    print(f"precision trim {precision} vs lossless, aperture noise/ideal change per star "
          f"({len(lines)} isolated 8-13 mag stars, {len(seeds)} scenes {size}x{size}x{cadences})")
    for r in lines:
        print(f"  seed {r[0]:3d} TIC {r[1]:6d} Tmag {r[2]:5.2f}: lossless {r[3]:.4f}, own masks "
              f"{100 * r[4]:+7.3f} %, fixed masks {100 * r[5]:+7.3f} %, fixed masks and "
              f"models {100 * r[7]:+7.3f} %, mask {'same' if r[6] else 'CHANGED'}")
    changed = ~arr[:, 2].astype(bool)
    for label, col in (("own masks", 0), ("fixed masks", 1), ("fixed masks and models", 3)):
        v = arr[:, col]
        print(f"  {label:22s}: median {100 * np.median(v):+.4f} %, mean {100 * np.mean(v):+.4f} %, "
              f"max |change| {100 * np.max(np.abs(v)):.3f} %")
    print(f"  masks changed by the trim: {int(changed.sum())} of {len(arr)} stars; their own-mask "
          f"changes: {', '.join(f'{100 * v:+.2f} %' for v in arr[changed, 0])}")
    return lines


def bench_onepass(workdir, size=128, cadences=200, seeds=(5, 11), previews=(32, 100)):
    """Backdrop fitted in one pass (streaming, masks from the preview) against the second
    pass over the same cache (masks from the full sum image): model - true background.

    Each scene is prepared once per ``prepare.preview_frames`` value; the second-pass model
    is re-fitted with ``Backdrop.run`` on that cache (the way the stage worked before) and
    both are scored with ``photometry_backdrop.scene.background_metrics`` (star-free rms,
    bias near bright stars; also with each frame's constant removed).
    """
    import h5py

    from photometry.scheduler.prepare import prepare
    from photometry.sim.simulate import simulate
    from photometry_backdrop import Backdrop
    from photometry.sim.stage_input import load_simulation
    from photometry_backdrop.scene import background_metrics
    from photometry.data.cache import CacheWriter  # noqa: F401 - same writer prepare uses

    rows = []
    for seed in seeds:
        sim_dir = Path(workdir) / f"onepass_{size}_{cadences}_{seed}"
        if not (sim_dir / "ffi").exists():
            simulate(sim_dir, load_settings(extra={"simulate": {
                "cadences": cadences, "rows": size, "cols": size, "seed": seed}}),
                progress=False)
        sim = load_simulation(sim_dir)
        for preview in previews:
            settings = load_settings(assignments=[f"prepare.preview_frames={preview}",
                                                  "backdrop.progress=false"])
            out = Path(workdir) / f"onepass_cache_{seed}_{preview}"
            shutil.rmtree(out, ignore_errors=True)
            path, _ = prepare(sim_dir / "ffi", sim_dir / "catalog.csv", out, settings,
                              progress=False)
            with h5py.File(path, "r+") as f:
                one = Backdrop.evaluate(f["models/backdrop"], slice(None), slice(None))
                if preview == previews[0]:
                    group = f.require_group("models").create_group("backdrop_2pass")

                    class _Cache:  # the second pass as prepare ran it before
                        file = f
                        block = int(f.attrs["time_chunk"])
                        usable_frames = f["frame_check"][()] == 0

                        def iter_frame_blocks(self):
                            n = f["images"].shape[0]
                            for a in range(0, n, self.block):
                                sl = slice(a, min(n, a + self.block))
                                yield sl, f["images"][sl], f["errors"][sl], f["pixel_flags"][sl]

                    Backdrop(settings).run(_Cache(), group)
                    two = Backdrop.evaluate(group, slice(None), slice(None))
                    rows.append((seed, "2-pass (sum image)", two, sim))
            rows.append((seed, f"1-pass (preview {preview})", one, sim))
    print(f"backdrop one pass vs second pass, {size}x{size}, {cadences} cadences "
          "(model - true background, e-/s)")
    for seed, label, model, sim in rows:
        m = background_metrics(model, sim["background"], sim["stars"], sim["row_offset"],
                               sim["column_offset"])
        c = background_metrics(model, sim["background"], sim["stars"], sim["row_offset"],
                               sim["column_offset"], remove_constant=True)
        print(f"  seed {seed:3d} {label:24s}: star-free rms {m['rms_star_free']:.4f}, bias near "
              f"bright {m['bias_bright']:+.4f}; constant removed: rms {c['rms_star_free']:.4f}, "
              f"bias {c['bias_bright']:+.4f}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["stamp", "throughput", "compression", "onepass",
                                           "trim", "memory", "rate", "all"],
                        default="all")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--counts", type=int, nargs=2, default=(100, 300),
                        help="--part rate: the two frame counts")
    parser.add_argument("--compare", default=None, metavar="DIR",
                        help="--part rate: also run the photometry package in DIR "
                             "(alternating with this one)")
    parser.add_argument("--stages", nargs="+", default=["ingest", "default"],
                        choices=["ingest", "default"], help="--part rate: which prepares")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="--part rate: a setting for every prepare (repeatable)")
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
        if args.part in ("rate", "all"):
            bench_rate(workdir, counts=args.counts, compare=args.compare,
                       stages=args.stages, settings=args.set)
        if args.part in ("memory", "all"):
            bench_memory(workdir)
        if args.part in ("trim", "all"):
            bench_trim_masks(workdir)
        if args.part in ("onepass", "all"):
            bench_onepass(workdir)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
