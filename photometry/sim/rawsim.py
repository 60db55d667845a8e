"""Raw-FFI simulation: turn calibrated e-/s images into raw SPOC ``*_ffir`` frames with a
known instrument, so raw calibration can be tested against truth.

``tessphot simulate --raw`` calls :func:`write_raw` after writing the calibrated sector. For
each calibrated frame of ``OUTDIR/ffi/`` it writes ``OUTDIR/raw/<same name>_ffir.fits``: the
full SPOC layout (science region plus 11 leading and 11 trailing virtual columns per output,
10 buffer, 10 smear and 10 virtual rows) in ADU, and once ``OUTDIR/calmodels/`` with the
model file of the CCD, and ``OUTDIR/raw_truth.h5`` with the calibrated truth.

The truth is the noise-free expected image in e-/s when ``truth.h5`` holds one (a dataset
``expected``, ``model`` or ``noiseless`` of shape (frames, rows, columns)); otherwise the
calibrated FFI image itself is taken as the true e-/s image and all raw-level noise is added
on top of it (its own simulated noise is then part of "the sky", which does not matter for
testing the calibration: the truth is whatever went into the raw frame).

Forward model, the exact reverse of the calibration stages (per cadence of ``N`` co-added
readouts of ``INT_TIME`` seconds):

1. charge ``Q = FLAT * S * N * INT_TIME`` on science pixels (``S`` the true e-/s, clipped at
   0), plus the frame-transfer smear ``N * t_row * sum_rows(FLAT * S)`` on every row of the
   science columns except the virtual rows (``t_row = READTIME / 2078``, the transfer time of
   one row);
2. Poisson noise on ``Q``;
3. amplifier non-linearity: the measured charge ``e`` solves ``e * P(e / (N g)) = Q``;
4. ADU ``e / g`` plus read noise ``sqrt(N) * READNOISE / g``;
5. plus each output's pedestal ``N * (black level + drift(time))`` on all its columns;
6. plus the fixed 2-D bias ``N * pattern``; rounded to integers.

Saturation, bleed, cosmic rays, undershoot and crosstalk are not simulated.
"""
import logging
import os
import re
from pathlib import Path

import numpy as np
from astropy.io import fits

from photometry.data.calibration import (LEADING_COLUMNS, OUTPUTS, CCDGeometry,
                                         median_variance_factor, write_model)
from photometry.hooks.errors import InputError

__all__ = ["write_raw", "make_models", "render_raw", "raw_headers", "readouts_for_cadence",
           "FULL_FRAME_ROWS", "INT_TIME", "READTIME"]

logger = logging.getLogger(__name__)

#: Rows of a real TESS frame: the frame-transfer time per row is READTIME / FULL_FRAME_ROWS.
FULL_FRAME_ROWS = 2078
INT_TIME = 1.98     # s of photon collection per 2 s readout
READTIME = 0.02     # s of frame transfer per readout
TRUTH_DATASETS = ("expected", "model", "noiseless")


def readouts_for_cadence(cadence_s):
    """Co-added readouts of one cadence: 2 s frames, 2 of every 10 dropped by on-board
    cosmic-ray mitigation (720 at 30 min, 240 at 10 min, 80 at 200 s)."""
    return int(round(cadence_s / 2.0 * 0.8))


def make_models(geometry, camera, ccd, n_readouts, settings, rng):
    """A random but realistic instrument for one CCD: the arguments of
    :func:`photometry.data.calibration.write_model` plus the pedestal parameters.

    Parameters
    ----------
    geometry : CCDGeometry
    settings : dict
        Full settings: ``[calibration.rawsim]`` and ``simulate.read_noise``.
    rng : numpy.random.Generator
    """
    cfg = settings["calibration"]["rawsim"]
    read_noise0 = float(settings["simulate"]["read_noise"])
    nrows, ncols = geometry.shape
    n_out = len(OUTPUTS)
    gains = rng.uniform(cfg["gain_min"], cfg["gain_max"], n_out)
    noise = read_noise0 * (1 + cfg["read_noise_scatter"] * rng.uniform(-1, 1, n_out))
    # non-linearity: P(x) = 1 + c1 x + c2 x^2 reaching `nonlinearity` at 30 000 ADU/readout
    amp = cfg["nonlinearity"] * rng.uniform(0.8, 1.2, n_out)
    x0 = 30000.0
    lincoef = {o: np.array([1.0, 0.8 * a / x0, 0.2 * a / x0 ** 2]) for o, a in zip(OUTPUTS, amp)}

    # fixed-pattern bias per readout: pixel noise, column pattern, start-of-frame ringing
    rows = np.arange(nrows)[:, None]
    pattern = cfg["bias2d_rms"] * rng.standard_normal((nrows, ncols))
    pattern += 0.5 * cfg["bias2d_rms"] * rng.standard_normal((1, ncols))
    ringing = cfg["bias2d_ringing"] * np.exp(-rows / 20.0) * np.cos(rows / 3.0)
    pattern += ringing
    bias2d = n_readouts * pattern

    # flat: vignetting towards the corners times pixel-to-pixel response; 1 on collateral
    flat = np.ones((nrows, ncols))
    sr, sc = geometry.science
    yy, xx = np.mgrid[0:sr.stop - sr.start, 0:sc.stop - sc.start]
    r2 = ((yy - yy.mean()) / max(yy.max(), 1)) ** 2 + ((xx - xx.mean()) / max(xx.max(), 1)) ** 2
    flat[sr, sc] = (1 - cfg["flat_vignetting"] * r2 / 0.5) * \
        (1 + cfg["flat_rms"] * rng.standard_normal(r2.shape))

    black = cfg["black_level"] + cfg["black_level_scatter"] * rng.standard_normal(n_out)
    return {
        "camera": camera, "ccd": ccd, "n_readouts": n_readouts, "int_time": INT_TIME,
        "bias2d": bias2d, "flat": flat,
        "gain": dict(zip(OUTPUTS, gains)), "read_noise": dict(zip(OUTPUTS, noise)),
        "lincoef": lincoef,
        # pedestal per readout: black level + drift amplitude * sin(2 pi phase + time / period)
        "_black": dict(zip(OUTPUTS, black)),
        "_drift_phase": dict(zip(OUTPUTS, rng.uniform(0, 2 * np.pi, n_out))),
        "_drift": float(cfg["pedestal_drift"]),
    }


def pedestal_for(models, output, time):
    """ADU per readout of an output's pedestal at BTJD ``time`` (drift period 13.7 d)."""
    return models["_black"][output] + models["_drift"] * np.sin(
        models["_drift_phase"][output] + 2 * np.pi * time / 13.7)


def _invert_linearity(charge, n_readouts, gain, coef):
    """Measured charge e with e * P(e / (N g)) = charge (Newton; P is monotonic here)."""
    poly = np.polynomial.polynomial
    dcoef = poly.polyder(coef)
    scale = 1.0 / (n_readouts * gain)
    e = charge / poly.polyval(charge * scale, coef)
    for _ in range(4):
        x = e * scale
        p = poly.polyval(x, coef)
        e -= (e * p - charge) / (p + x * poly.polyval(x, dcoef))
    return e


def render_raw(truth, geometry, models, time, rng, smear_skip_rows=3, smear_estimator="mean"):
    """One raw frame (int32 ADU, full layout) from a true e-/s science image.

    Returns
    -------
    raw : ndarray of int32, ``geometry.shape``
    sigma : ndarray of float32, science shape
        The expected 1-sigma noise of the calibrated image (e-/s) for the default stages:
        Poisson and read noise through the non-linearity and flat, plus the noise of the smear
        and pedestal estimates.
    pedestals : dict
        Output -> co-added pedestal in ADU.
    """
    n = models["n_readouts"]
    t_exp = n * models["int_time"]
    t_row = READTIME / FULL_FRAME_ROWS
    sr, sc = geometry.science
    truth = np.clip(np.asarray(truth, dtype=np.float64), 0.0, None)
    if truth.shape != (sr.stop - sr.start, sc.stop - sc.start):
        raise InputError(f"truth image {truth.shape} does not fit the science region")
    flat = models["flat"]
    rate = flat[sr, sc] * truth
    smear = n * t_row * rate.sum(axis=0)        # e- per pixel per cadence, per science column
    charge = np.zeros(geometry.shape)
    charge[sr, sc] = rate * t_exp
    smeared_rows = slice(sr.start, geometry.virtual_rows.start)
    charge[smeared_rows, sc] += smear
    observed = rng.poisson(charge).astype(np.float64)

    raw = np.empty(geometry.shape)
    variance_e = np.zeros(geometry.shape)   # expected variance in calibrated electrons
    pedestals = {}
    poly = np.polynomial.polynomial
    for out in geometry.outputs:
        g = models["gain"][out.name]
        coef = np.asarray(models["lincoef"][out.name])
        rn2 = n * models["read_noise"][out.name] ** 2
        cols = out.science
        e = _invert_linearity(observed[:, cols], n, g, coef)
        x = _invert_linearity(charge[:, cols], n, g, coef) / (n * g)
        deriv = poly.polyval(x, coef) + x * poly.polyval(x, poly.polyder(coef))
        variance_e[:, cols] = charge[:, cols] + rn2 * deriv ** 2
        pedestals[out.name] = n * pedestal_for(models, out.name, time)
        for block in out.blocks:
            if block == cols:
                electrons = e
            else:  # collateral columns: no non-linearity correction is applied there
                electrons = observed[:, block]
                variance_e[:, block] = charge[:, block] + rn2
            noise = rng.normal(0.0, np.sqrt(rn2) / g, (geometry.shape[0], block.stop - block.start))
            raw[:, block] = electrons / g + noise + pedestals[out.name]
    raw += models["bias2d"]
    raw = np.rint(raw).astype(np.int32)

    # expected noise of the calibrated science pixels
    rows = slice(geometry.smear_rows.start + smear_skip_rows, geometry.smear_rows.stop)
    n_smear = rows.stop - rows.start
    smear_var = variance_e[rows, sc].sum(axis=0) / n_smear ** 2
    if smear_estimator == "median":
        smear_var = median_variance_factor(n_smear) * variance_e[rows, sc].mean(axis=0) / n_smear
    var = variance_e[sr, sc] + smear_var
    sigma = np.sqrt(var) / flat[sr, sc] / t_exp
    return raw, sigma.astype(np.float32), pedestals


def raw_headers(header, geometry, models, camera, ccd, cadence_s):
    """Primary and image headers of a raw frame from a calibrated frame's merged header.

    ``header`` is an :class:`photometry.data.ffi.FFIFrame` header (sky WCS in science-region pixels,
    physical WCS giving the CCD offset). The raw frame is a full frame, so its sky WCS is
    shifted to the raw array (science region at the geometry's position) and its physical
    WCS starts at CCD pixel 1.
    """
    n = models["n_readouts"]
    image = fits.Header()
    skip = re.compile(r"^(PHOT_|IMAGTYPE|BUNIT|EXTNAME|CHECKSUM|DATASUM|CRPIX[12]P|CRVAL[12]P"
                      r"|CDELT[12]P|HISTORY|COMMENT)")
    for card in header.cards:
        if not skip.match(card.keyword):
            image.append(card, end=True)
    sr, sc = geometry.science
    if "CRPIX1" in image:
        image["CRPIX1"] = float(image["CRPIX1"]) + sc.start
        image["CRPIX2"] = float(image["CRPIX2"]) + sr.start
    image["EXTNAME"] = f"CAMERA.CCD {camera}.{ccd} raw"
    image["IMAGTYPE"] = ("raw", "FFI image type: raw, cal, uncert")
    image["BUNIT"] = ("counts", "raw co-added ADU")
    image["CAMERA"], image["CCD"] = (camera, "Camera number"), (ccd, "CCD chip number")
    image["INT_TIME"] = (INT_TIME, "[s] photon accumulation time per frame")
    image["READTIME"] = (READTIME, "[s] readout time per frame")
    image["FRAMETIM"] = (INT_TIME + READTIME, "[s] frame time (INT_TIME + READTIME)")
    image["NUM_FRM"] = (int(round(cadence_s / 2.0)), "number of frames per time stamp")
    image["NREADOUT"] = (n, "number of read per cadence")
    image["EXPOSURE"] = (n * INT_TIME / 86400.0, "[d] time on source")
    image["TIMEDEL"] = (cadence_s / 86400.0, "[d] time resolution of data")
    for o in OUTPUTS:
        image[f"GAIN{o}"] = (models["gain"][o], f"[electrons/count] CCD output {o} gain")
        image[f"READNOI{o}"] = (models["read_noise"][o], f"[electrons] read noise output {o}")
    for i, key in enumerate(("1", "2")):
        image[f"CTYPE{key}P"] = ("RAWX", "physical WCS axis 1 type CCD col") if i == 0 else \
            ("RAWY", "physical WCS axis 2 type CCD row")
        image[f"CRPIX{key}P"] = 1
        image[f"CRVAL{key}P"] = 1
        image[f"CDELT{key}P"] = 1.0
    geometry.to_header(image)
    primary = fits.Header()
    for key in ("TELESCOP", "INSTRUME", "ORIGIN", "DATE", "PROCVER", "DATA_REL", "SECTOR",
                "CAMERA", "CCD", "CRMITEN", "CRBLKSZ"):
        if key in header:
            primary[key] = (header[key], header.comments[key])
    primary["TELESCOP"] = "TESS"
    primary["SIMDATA"] = (True, "file is based on simulated data")
    return primary, image


def _write_fits_atomic(path, hdus):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    fits.HDUList(hdus).writeto(tmp, overwrite=True)
    os.replace(tmp, path)


def _truth_source(outdir, n_frames):
    """The noise-free truth cube in truth.h5 (if any) as an h5py dataset, else None."""
    path = Path(outdir) / "truth.h5"
    if not path.exists():
        return None, None
    import h5py
    f = h5py.File(path, "r")
    for name in TRUTH_DATASETS:
        if name in f and f[name].ndim == 3 and f[name].shape[0] == n_frames:
            return f, f[name]
    f.close()
    return None, None


def write_raw(outdir, settings, seed, progress=True):
    """Write raw frames, calibration models and calibrated truth for a simulated sector.

    Parameters
    ----------
    outdir : str or Path
        The ``tessphot simulate`` output folder (calibrated frames in ``ffi/``).
    settings : dict
        Full settings (``[calibration.rawsim]``, ``[calibration]``, ``simulate.read_noise``).
    seed : int

    Returns
    -------
    dict
        ``raw_files``, ``models_dir``, ``truth`` paths.

    Raises
    ------
    InputError
        No calibrated frames in ``OUTDIR/ffi``, or a science width not a multiple of 4.
    """
    import h5py
    from tqdm import tqdm

    from photometry.data.ffi import find_ffi_files, read_ffi

    outdir = Path(outdir)
    paths = find_ffi_files(outdir / "ffi")
    rng = np.random.default_rng([int(seed), 0x7A3])
    first = read_ffi(paths[0], header_only=True, wcs=False)
    nr, nc = first.shape
    if (first.row_offset, first.column_offset) != (0, LEADING_COLUMNS * len(OUTPUTS)):
        raise InputError(
            f"{paths[0]}: science region starts at CCD row {first.row_offset}, column "
            f"{first.column_offset}; raw frames are whole (possibly reduced) CCDs with their "
            "collateral pixels, so simulate with first_row = first_col = 0")
    geometry = CCDGeometry.standard(nr, nc)
    n = readouts_for_cadence(first.cadence_s)
    models = make_models(geometry, first.camera, first.ccd, n, settings, rng)
    model_path = outdir / "calmodels" / f"cam{first.camera}_ccd{first.ccd}_{int(first.cadence_s)}s.fits"
    write_model(model_path, cadence=first.cadence_s,
                **{k: v for k, v in models.items() if not k.startswith("_")})
    cal = settings["calibration"]

    truth_file, truth_cube = _truth_source(outdir, len(paths))
    raw_dir = outdir / "raw"
    raw_files = []
    truth_path = outdir / "raw_truth.h5"
    tmp = truth_path.with_name(truth_path.name + ".partial")
    try:
        with h5py.File(tmp, "w") as out:
            out.attrs["seed"] = int(seed)
            out.attrs["n_readouts"] = n
            out.attrs["exposure"] = n * INT_TIME
            out.attrs["truth_source"] = truth_cube.name if truth_cube is not None else "ffi images"
            out.attrs["model_file"] = model_path.name
            images = out.create_dataset("image", (len(paths), nr, nc), dtype="f4")
            sigmas = out.create_dataset("sigma", (len(paths), nr, nc), dtype="f4")
            peds = out.create_dataset("pedestal", (len(paths), len(OUTPUTS)), dtype="f8")
            out["gain"] = [models["gain"][o] for o in OUTPUTS]
            out["read_noise"] = [models["read_noise"][o] for o in OUTPUTS]
            names = []
            for i, path in enumerate(tqdm(paths, desc="raw frames", unit="frame",
                                          disable=not progress or None)):
                frame = read_ffi(path)
                truth = truth_cube[i] if truth_cube is not None else frame.image
                truth = np.nan_to_num(np.asarray(truth, dtype=np.float64), nan=0.0)
                raw, sigma, ped = render_raw(truth, geometry, models, frame.time, rng,
                                             smear_skip_rows=cal["smear_skip_rows"],
                                             smear_estimator=cal["smear_estimator"])
                primary, image = raw_headers(frame.header, geometry, models, frame.camera,
                                             frame.ccd, frame.cadence_s)
                name = re.sub(r"_ffic\.fits(\.gz)?$", "_ffir.fits", path.name)
                raw_path = raw_dir / name
                _write_fits_atomic(raw_path, [fits.PrimaryHDU(header=primary),
                                              fits.ImageHDU(raw, header=image)])
                raw_files.append(raw_path)
                names.append(name)
                images[i] = np.clip(truth, 0.0, None)
                sigmas[i] = sigma
                peds[i] = [ped[o] for o in OUTPUTS]
            out["files"] = np.array(names, dtype=h5py.string_dtype())
        os.replace(tmp, truth_path)
    finally:
        if truth_file is not None:
            truth_file.close()
    return {"raw_files": raw_files, "models_dir": model_path.parent, "truth": truth_path}
