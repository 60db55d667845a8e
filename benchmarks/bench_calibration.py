"""Benchmark of raw-FFI calibration on full-size 2136x2078 frames (prints its figures; not a test).

Writes ``--frames`` simulated raw frames of the real TESS geometry (a star field with sky, the
instrument of ``photometry.sim.rawsim``) and their model file, then measures, per frame:

* ``calibrate_file`` end to end (read the raw FITS, six stages, science-region FFIFrame with
  uncertainty and WCS), warm, one frame at a time (what ``tessphot prepare`` does);
* each stage in memory;
* reading the raw FITS alone with astropy, for scale;
* the accuracy: residual RMS / expected noise against the calibrated truth.

TICA, for reference, takes 0.44-0.53 s per CCD on its own synthetic frame
(../shared/reference/algorithms.md, section 4.4).

Usage::

    python benchmarks/bench_calibration.py [--frames 5] [--workdir DIR] [--keep]
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from photometry.data import calibration
from photometry.sim import rawsim
from photometry.data.ffi import read_ffi
from photometry.hooks.settings import load_settings

TEMPLATE = Path(__file__).resolve().parents[1] / "tests" / "data" / \
    "tess2018206192942-s0001-1-4-0120-s_ffic.fits"


def star_field(n, rng, n_stars=3000):
    yy, xx = np.mgrid[0:n, 0:n]
    image = 100.0 + 0.02 * xx + 0.01 * yy
    for _ in range(n_stars):
        r, c, flux = rng.uniform(0, n), rng.uniform(0, n), 10 ** rng.uniform(2, 5.3)
        box = (slice(max(int(r) - 6, 0), int(r) + 7), slice(max(int(c) - 6, 0), int(c) + 7))
        image[box] += flux * np.exp(-((yy[box] - r) ** 2 + (xx[box] - c) ** 2) / 2.0) / (2 * np.pi)
    return image


def build(workdir, n_frames, settings):
    rng = np.random.default_rng(7)
    template = read_ffi(TEMPLATE)
    geometry = calibration.CCDGeometry.standard()
    n_read = rawsim.readouts_for_cadence(1800)
    models = rawsim.make_models(geometry, 1, 4, n_read, settings, rng)
    models_dir = workdir / "calmodels"
    calibration.write_model(models_dir / "cam1_ccd4_1800s.fits", cadence=1800.0,
                            **{k: v for k, v in models.items() if not k.startswith("_")})
    truth = star_field(2048, rng)
    paths, sigmas = [], []
    for k in range(n_frames):
        header = template.header.copy()
        for key in ("TSTART", "TSTOP"):
            header[key] = float(header[key]) + k / 48.0
        raw, sigma, _ = rawsim.render_raw(truth, geometry, models, template.time + k / 48.0, rng)
        primary, image = rawsim.raw_headers(header, geometry, models, 1, 4, 1800.0)
        path = workdir / "raw" / f"tess20182061{k:05d}-s0001-1-4-0120-s_ffir.fits"
        rawsim._write_fits_atomic(path, [fits.PrimaryHDU(header=primary),
                                         fits.ImageHDU(raw, header=image)])
        paths.append(path)
        sigmas.append(sigma)
    return paths, models_dir, truth, sigmas


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    settings = load_settings()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_calibration_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        paths, models_dir, truth, sigmas = build(workdir, args.frames, settings)
        print(f"built {len(paths)} full-size raw frames in {time.perf_counter() - t0:.1f} s "
              f"({paths[0].stat().st_size / 1e6:.1f} MB each)")

        models = calibration.CalibrationModels(models_dir)
        stages = calibration.load_stages(settings)
        calibration.calibrate_file(paths[0], models, settings, stages)   # warm: model load

        read_times, total_times, cpu_times, ratios = [], [], [], []
        stage_times = {s.name: [] for s in stages}
        for path, sigma in zip(paths, sigmas):
            t = time.perf_counter()
            with fits.open(path, memmap=False) as hdul:
                np.asarray(hdul[1].data, dtype=np.float64)
            read_times.append(time.perf_counter() - t)

            t, c = time.perf_counter(), time.process_time()
            frame = calibration.calibrate_file(path, models, settings, stages)
            total_times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
            z = (frame.image - truth) / sigma
            ratios.append(float(np.sqrt(np.mean(z ** 2))))

            raw = calibration.read_raw(path)
            model = models.for_frame(raw)
            for stage in stages:
                t = time.perf_counter()
                stage.apply(raw, model)
                stage_times[stage.name].append(time.perf_counter() - t)

        print(f"calibrate_file per full frame: median {np.median(total_times):.3f} s "
              f"(min {min(total_times):.3f}, max {max(total_times):.3f}) over {len(paths)} frames; "
              f"CPU time median {np.median(cpu_times):.3f} s")
        print(f"  raw FITS read alone (astropy, float64): median {np.median(read_times):.3f} s")
        print("  stages in memory: " + ", ".join(f"{name} {np.median(v) * 1e3:.0f} ms"
                                                 for name, v in stage_times.items()))
        print(f"  stages total: {sum(np.median(v) for v in stage_times.values()):.3f} s")
        print(f"residual RMS / expected noise: {np.mean(ratios):.4f} "
              f"(per frame {', '.join(f'{r:.4f}' for r in ratios)})")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
