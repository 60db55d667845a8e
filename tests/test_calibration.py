"""Raw-FFI calibration: each stage against its analytic expectation, the whole chain against
the truth of simulated raw frames, and every model/input problem as a clear InputError."""
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from photometry.data import calibration
from photometry.sim import rawsim
from photometry.data.calibration import (CCDGeometry, CCDModel, CalibrationModels, RawFrame,
                                         calibrate_file, calibrate_frames, calibrate_raw, load_stages)
from photometry.hooks.errors import ConfigurationError, InputError
from photometry.data.ffi import read_ffi
from photometry.hooks.plugins import get_plugin_manager, registry
from photometry.hooks.settings import load_settings

TEMPLATE = Path(__file__).parent / "data" / "tess2018206192942-s0001-1-4-0120-s_ffic.fits"
STAGES = ["bias2d", "pedestal", "gain", "linearity", "smear", "flat"]


@pytest.fixture(scope="module")
def settings():
    return load_settings()


@pytest.fixture(scope="module")
def template():
    return read_ffi(TEMPLATE)


def stage(name, settings):
    return registry(get_plugin_manager(), "register_calibration_stages")[name](settings)


def scene(n, rng, n_stars=15):
    """Sky with a gradient plus Gaussian stars from 100 to 3e5 e-/s (e-/s per pixel)."""
    yy, xx = np.mgrid[0:n, 0:n]
    image = 100.0 + 0.2 * xx + 0.1 * yy
    for _ in range(n_stars):
        r, c, flux = rng.uniform(2, n - 2), rng.uniform(2, n - 2), 10 ** rng.uniform(2, 5.5)
        box = (slice(max(int(r) - 8, 0), int(r) + 9), slice(max(int(c) - 8, 0), int(c) + 9))
        image[box] += flux * np.exp(-((yy[box] - r) ** 2 + (xx[box] - c) ** 2) / 2.0) / (2 * np.pi)
    return image


def make_raw_set(tmp_path, template, settings, n=64, n_frames=1, seed=1, cadence=1800.0,
                 camera=1, ccd=4, models=None, name_tag="", smear_estimator="mean"):
    """Raw frames of a star scene plus the model file; returns what the tests compare with."""
    rng = np.random.default_rng(seed)
    geometry = CCDGeometry.standard(n, n)
    n_read = rawsim.readouts_for_cadence(cadence)
    if models is None:
        models = rawsim.make_models(geometry, camera, ccd, n_read, settings, rng)
    models_dir = tmp_path / f"calmodels{name_tag}"
    calibration.write_model(models_dir / f"cam{camera}_ccd{ccd}_{int(cadence)}s.fits",
                            cadence=cadence,
                            **{k: v for k, v in models.items() if not k.startswith("_")})
    truth = scene(n, rng, n_stars=max(15, n * n // 20000))
    paths, sigmas, pedestals = [], [], []
    for k in range(n_frames):
        header = template.header.copy()
        for key in ("TSTART", "TSTOP"):
            header[key] = float(header[key]) + k * cadence / 86400.0
        time = template.time + k * cadence / 86400.0
        raw, sigma, ped = rawsim.render_raw(truth, geometry, models, time, rng,
                                            smear_estimator=smear_estimator)
        primary, image = rawsim.raw_headers(header, geometry, models, camera, ccd, cadence)
        path = tmp_path / f"raw{name_tag}" / f"tess20182061{k:05d}-s0001-{camera}-{ccd}-0120-s_ffir.fits"
        rawsim._write_fits_atomic(path, [fits.PrimaryHDU(header=primary),
                                         fits.ImageHDU(raw, header=image)])
        paths.append(path)
        sigmas.append(sigma)
        pedestals.append(ped)
    return {"paths": paths, "models_dir": models_dir, "truth": truth, "sigma": sigmas,
            "pedestal": pedestals, "models": models, "geometry": geometry}


def frame_and_model(data, geometry, n_readouts=720, gain=5.0, read_noise=10.0, lincoef=(1.0,),
                    bias2d=None, flat=None, units="ADU"):
    shape = geometry.shape
    model = CCDModel(path=Path("model.fits"), camera=1, ccd=4, n_readouts=n_readouts,
                     int_time=1.98, cadence=1800.0,
                     bias2d=np.zeros(shape) if bias2d is None else bias2d,
                     flat=np.ones(shape) if flat is None else flat,
                     gain={o: gain for o in "ABCD"}, read_noise={o: read_noise for o in "ABCD"},
                     lincoef={o: np.asarray(lincoef, dtype=float) for o in "ABCD"})
    frame = RawFrame(path=Path("raw_ffir.fits"), data=np.array(data, dtype=float),
                     header=fits.Header(), geometry=geometry, camera=1, ccd=4,
                     n_readouts=n_readouts, int_time=1.98, units=units)
    if units == "electrons":
        frame.variance = np.zeros(shape)
    return frame, model


# ------------------------------------------------------------------ registration and geometry


def test_stages_registered_in_order(settings):
    classes = registry(get_plugin_manager(), "register_calibration_stages")
    assert set(STAGES) <= set(classes)
    assert [s.name for s in load_stages(settings)] == STAGES
    with pytest.raises(ConfigurationError, match="unknown calibration stage"):
        load_stages(load_settings(assignments=['calibration.stages=["gain", "nope"]']))


def test_standard_geometry_is_the_spoc_layout(template):
    real = CCDGeometry.from_header(template.header, (2078, 2136))
    std = CCDGeometry.standard()
    assert std == real
    assert std.shape == (2078, 2136)
    assert std.science == (slice(0, 2048), slice(44, 2092))
    assert std.outputs[1].science == slice(556, 1068) and std.outputs[3].trailing == slice(2125, 2136)
    assert std.smear_rows == slice(2058, 2068) and std.virtual_rows == slice(2068, 2078)
    header = std.to_header(fits.Header())
    assert CCDGeometry.from_header(header, std.shape) == std
    with pytest.raises(InputError, match="SCCSC"):
        del header["SCCSC"]
        CCDGeometry.from_header(header, std.shape)
    with pytest.raises(InputError, match="outside"):
        CCDGeometry.from_header(std.to_header(fits.Header()), (2078, 2000))


# ------------------------------------------------------------------ each stage on its own


def test_bias2d_stage(settings):
    geom = CCDGeometry.standard(16, 16)
    rng = np.random.default_rng(3)
    bias = rng.normal(5000, 30, geom.shape)
    signal = rng.normal(100, 10, geom.shape)
    frame, model = frame_and_model(bias + signal, geom, bias2d=bias)
    stage("bias2d", settings).apply(frame, model)
    np.testing.assert_allclose(frame.data, signal, atol=1e-9)


def test_pedestal_stage_uses_late_rows_and_late_columns(settings):
    geom = CCDGeometry.standard(2048, 16)   # full height: rows >= 750 are used
    levels = {"A": 4.6e6, "B": 4.7e6, "C": 4.55e6, "D": 4.65e6}
    data = np.zeros(geom.shape)
    rng = np.random.default_rng(4)
    for out in geom.outputs:
        for block in out.blocks:
            data[:, block] = levels[out.name]
        data[:, out.science] += rng.uniform(0, 1e4, (geom.shape[0], 4))
        # ringing in the low rows and scattered charge in the first 3 virtual columns: ignored
        data[:750, out.trailing] += 500.0
        data[:, out.trailing.start:out.trailing.start + 3] += 800.0
    expected = data.copy()
    for out in geom.outputs:
        for block in out.blocks:
            expected[:, block] -= levels[out.name]
    frame, model = frame_and_model(data, geom)
    stage("pedestal", settings).apply(frame, model)
    np.testing.assert_allclose(frame.data, expected, atol=1e-6)
    for o in "ABCD":
        assert frame.diagnostics["pedest"][o] == pytest.approx(levels[o], abs=1e-6)


def test_gain_stage_and_variance(settings):
    geom = CCDGeometry.standard(16, 16)
    adu = np.random.default_rng(5).uniform(-50, 2e4, geom.shape)
    gains = {"A": 5.1, "B": 5.2, "C": 5.3, "D": 5.4}
    frame, model = frame_and_model(adu, geom, read_noise=9.0)
    model.gain = gains
    stage("gain", settings).apply(frame, model)
    for out in geom.outputs:
        for block in out.blocks:
            e = adu[:, block] * gains[out.name]
            np.testing.assert_allclose(frame.data[:, block], e, rtol=1e-12)
            np.testing.assert_allclose(frame.variance[:, block],
                                       720 * 81.0 + np.maximum(e, 0), rtol=1e-12)
    assert frame.units == "electrons"


def test_linearity_stage_inverts_the_polynomial(settings):
    geom = CCDGeometry.standard(16, 16)
    n, g = 720, 5.2
    coef = np.array([1.0, 3e-7, 2e-12])
    true_e = np.random.default_rng(6).uniform(0, 2e7, geom.shape)   # up to 5300 ADU/readout
    measured = rawsim._invert_linearity(true_e, n, g, coef)
    assert np.max(np.abs(true_e - measured)) > 1e4   # the effect is large
    frame, model = frame_and_model(measured, geom, n_readouts=n, gain=g, lincoef=coef,
                                   units="electrons")
    frame.variance[:] = 720 * 100.0 + measured
    stage("linearity", settings).apply(frame, model)
    sc = geom.science_columns
    np.testing.assert_allclose(frame.data[:, sc], true_e[:, sc], rtol=1e-12)
    # collateral columns are not corrected
    np.testing.assert_array_equal(frame.data[:, :sc.start], measured[:, :sc.start])
    # variance: read noise through the derivative, Poisson of the corrected charge
    h = 1.0
    deriv = (rawsim._invert_linearity(true_e + h, n, g, coef) -
             rawsim._invert_linearity(true_e - h, n, g, coef)) / (2 * h)
    expected = 72000.0 / deriv ** 2 + true_e
    np.testing.assert_allclose(frame.variance[:, sc], expected[:, sc], rtol=1e-6)


def test_smear_stage_removes_a_star_columns_smear_exactly(settings):
    geom = CCDGeometry.standard(64, 64)
    image = np.zeros((64, 64))
    image[30:33, 20:23] = 1e6               # a bright star
    image += 50.0
    smear = 1e-3 * image.sum(axis=0)        # charge collected while the frame is transferred
    data = np.zeros(geom.shape)
    sr, sc = geom.science
    data[sr, sc] = image
    data[sr.start:geom.virtual_rows.start, sc] += smear
    frame, model = frame_and_model(data, geom, units="electrons")
    stage("smear", settings).apply(frame, model)
    np.testing.assert_allclose(frame.data[sr, sc], image, atol=1e-6)
    assert smear[21] > 1000 * smear[0] / 1000 and smear[21] > 100 * 50 * 64e-3
    for estimator in ("median",):
        f2, _ = frame_and_model(data, geom, units="electrons")
        stage("smear", load_settings(assignments=[f"calibration.smear_estimator={estimator}"])
              ).apply(f2, model)
        np.testing.assert_allclose(f2.data[sr, sc], image, atol=1e-6)


def test_flat_stage(settings):
    geom = CCDGeometry.standard(16, 16)
    rng = np.random.default_rng(7)
    flat = rng.uniform(0.9, 1.1, geom.shape)
    truth = rng.uniform(0, 1e5, geom.shape)
    frame, model = frame_and_model(truth * flat, geom, flat=flat, units="electrons")
    frame.variance[:] = (truth * flat)
    stage("flat", settings).apply(frame, model)
    np.testing.assert_allclose(frame.data, truth, rtol=1e-12)
    np.testing.assert_allclose(frame.variance, truth / flat, rtol=1e-12)


def test_stage_order_is_enforced(settings):
    geom = CCDGeometry.standard(16, 16)
    frame, model = frame_and_model(np.zeros(geom.shape), geom)
    with pytest.raises(ConfigurationError, match="needs data in electrons"):
        stage("smear", settings).apply(frame, model)
    frame, model = frame_and_model(np.zeros(geom.shape), geom)
    with pytest.raises(ConfigurationError, match="no gain stage"):
        calibrate_raw(frame, model, [stage("bias2d", settings), stage("pedestal", settings)])


# ------------------------------------------------------------------ the whole chain


def test_full_frame_recovers_truth_within_noise(tmp_path, template, settings):
    """Real geometry (2078 x 2136): residual RMS / expected noise within 5 %."""
    made = make_raw_set(tmp_path, template, settings, n=2048)
    frame = calibrate_file(made["paths"][0], made["models_dir"], settings)
    assert frame.image.shape == (2048, 2048) and frame.image.dtype == np.float32
    assert (frame.row_offset, frame.column_offset) == (0, 44)
    z = (frame.image - made["truth"]) / made["sigma"][0]
    ratio = float(np.sqrt(np.mean(z ** 2)))
    print(f"residual RMS / expected noise = {ratio:.4f}, mean z = {z.mean():+.4f}")
    assert 0.95 < ratio < 1.05
    assert abs(z.mean()) < 0.05
    # the uncertainty image predicts the noise
    assert np.median(frame.uncert / made["sigma"][0]) == pytest.approx(1.0, abs=0.01)
    assert np.std(z * made["sigma"][0] / frame.uncert) == pytest.approx(1.0, abs=0.05)
    # bright pixels (non-linearity matters there) are unbiased too
    bright = made["truth"] > 2e4
    assert bright.sum() > 20
    assert abs(np.mean(z[bright])) < 0.3
    # pedestals recovered to a small fraction of the per-pixel noise (about 50 ADU)
    for o in "ABCD":
        assert frame.header[f"PEDEST{o}"] == pytest.approx(made["pedestal"][0][o], abs=2.0)
    # same sky WCS as the calibrated template
    np.testing.assert_allclose(frame.wcs.all_pix2world([[10.0, 20.0]], 0),
                               template.wcs.all_pix2world([[10.0, 20.0]], 0), atol=1e-9)
    assert frame.time == template.time and frame.header["BUNIT"] == "electrons/s"


def test_calibrate_frames_streams_a_series(tmp_path, template, settings):
    made = make_raw_set(tmp_path, template, settings, n=64, n_frames=3)
    frames = list(calibrate_frames(made["paths"], made["models_dir"], settings))
    assert [f.time for f in frames] == sorted(f.time for f in frames)
    peds = np.array([[f.header[f"PEDEST{o}"] for o in "ABCD"] for f in frames])
    truth_peds = np.array([[p[o] for o in "ABCD"] for p in made["pedestal"]])
    np.testing.assert_allclose(peds, truth_peds, atol=5.0)   # time-variable pedestal tracked
    z = np.array([(f.image - made["truth"]) / s for f, s in zip(frames, made["sigma"])])
    assert 0.93 < np.sqrt(np.mean(z ** 2)) < 1.07


def test_median_smear_estimator_noise_is_predicted(tmp_path, template):
    settings = load_settings(assignments=["calibration.smear_estimator=median"])
    made = make_raw_set(tmp_path, template, settings, n=256, n_frames=2,
                        smear_estimator="median")
    frames = list(calibrate_frames(made["paths"], made["models_dir"], settings))
    z = np.array([(f.image - made["truth"]) / s for f, s in zip(frames, made["sigma"])])
    assert 0.97 < np.sqrt(np.mean(z ** 2)) < 1.03
    assert np.median(frames[0].uncert / made["sigma"][0]) == pytest.approx(1.0, abs=0.01)


# ------------------------------------------------------------------ bad models and inputs


def test_missing_models(tmp_path, template, settings):
    made = make_raw_set(tmp_path, template, settings, n=32)
    with pytest.raises(InputError, match="calibration model folder not found"):
        list(calibrate_frames(made["paths"], tmp_path / "nowhere", settings))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no calibration model files"):
        list(calibrate_frames(made["paths"], tmp_path / "empty", settings))
    model_file = next(made["models_dir"].glob("*.fits"))
    (made["models_dir"] / "copy.fits").write_bytes(model_file.read_bytes())
    with pytest.raises(InputError, match="duplicate calibration model for camera 1 CCD 4"):
        CalibrationModels(made["models_dir"])
    (made["models_dir"] / "copy.fits").write_bytes(b"not fits")
    with pytest.raises(InputError, match="copy.fits: not a readable calibration model"):
        CalibrationModels(made["models_dir"])


def test_model_of_other_ccd_or_exposure_class(tmp_path, template, settings):
    made = make_raw_set(tmp_path, template, settings, n=32)
    other = make_raw_set(tmp_path, template, settings, n=32, camera=2, ccd=3, name_tag="b")
    with pytest.raises(InputError, match="no calibration model for camera 1 CCD 4"):
        list(calibrate_frames(made["paths"], other["models_dir"], settings))
    ten_min = make_raw_set(tmp_path, template, settings, n=32, cadence=600.0, name_tag="c")
    # a 30-minute model is never applied to 10-minute data (and the reverse)
    with pytest.raises(InputError, match="240 co-added readouts.*another exposure class"):
        list(calibrate_frames(ten_min["paths"], made["models_dir"], settings))
    with pytest.raises(InputError, match="720 co-added readouts"):
        list(calibrate_frames(made["paths"], ten_min["models_dir"], settings))


def test_model_of_wrong_size(tmp_path, template, settings):
    made = make_raw_set(tmp_path, template, settings, n=32)
    small = make_raw_set(tmp_path, template, settings, n=16, name_tag="s")
    with pytest.raises(InputError, match="BIAS2D is 46x104 but raw frame .* is 62x120"):
        list(calibrate_frames(made["paths"], small["models_dir"], settings))


def test_unknown_camera_and_bad_raw_files(tmp_path, template, settings):
    made = make_raw_set(tmp_path, template, settings, n=32)
    path = made["paths"][0]
    with fits.open(path) as hdul:
        hdul[1].header["CAMERA"] = 5
        hdul.writeto(tmp_path / "cam5_ffir.fits")
        hdul[1].header["CAMERA"] = 1
        hdul[1].header["IMAGTYPE"] = "cal"
        hdul.writeto(tmp_path / "cal_ffir.fits")
        hdul[1].header["IMAGTYPE"] = "raw"
        hdul[1].header["EXPOSURE"] = 0.5
        hdul.writeto(tmp_path / "expo_ffir.fits")
        del hdul[1].header["EXPOSURE"]
        del hdul[1].header["SMROWS"]
        hdul.writeto(tmp_path / "geom_ffir.fits")
    for name, message in (("cam5", "unknown camera/CCD 5/4"), ("cal", "not a raw frame"),
                          ("expo", "EXPOSURE .* disagrees"), ("geom", "SMROWS")):
        with pytest.raises(InputError, match=message):
            list(calibrate_frames([tmp_path / f"{name}_ffir.fits"], made["models_dir"], settings))
    with pytest.raises(InputError, match="file not found"):
        calibrate_file(tmp_path / "missing_ffir.fits", made["models_dir"], settings)


def test_prepare_cli_exit_code_2_on_model_mismatch(tmp_path, template, settings, capsys):
    pytest.importorskip("photometry.scheduler.prepare")
    from photometry.cli import main
    made = make_raw_set(tmp_path, template, settings, n=32, n_frames=2)
    ten_min = make_raw_set(tmp_path, template, settings, n=32, cadence=600.0, name_tag="c")
    catalog = tmp_path / "catalog.csv"
    ra, dec = template.wcs.all_pix2world([[16.0, 16.0]], 0)[0]
    catalog.write_text(f"starid,ra,dec,tmag\n1,{ra},{dec},10.0\n")
    raw_dir = made["paths"][0].parent
    code = main(["prepare", str(raw_dir), "--catalog", str(catalog), "--cache",
                 str(tmp_path / "cache"), "--calibration-models", str(ten_min["models_dir"]),
                 "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "another exposure class" in err and err.count("\n") == 1


# ------------------------------------------------------------------ simulate --raw, then prepare


def test_simulate_raw_then_prepare_matches_calibrated_input(tmp_path):
    """`tessphot simulate --raw` then `tessphot prepare RAW --calibration-models`: the cache
    holds the calibrated truth within the noise, with the same times and WCS as the cache made
    from the calibrated frames."""
    pytest.importorskip("photometry.sim.simulate")
    pytest.importorskip("photometry.scheduler.prepare")
    import h5py

    from photometry.cli import main
    sim = tmp_path / "sim"
    assert main(["simulate", str(sim), "--cadences", "4", "--size", "64", "64", "--raw",
                 "--no-progress"]) == 0
    assert len(list((sim / "raw").glob("*_ffir.fits"))) == 4
    for src, cache, extra in (("raw", "c_raw", ["--calibration-models", str(sim / "calmodels")]),
                              ("ffi", "c_cal", [])):
        assert main(["prepare", str(sim / src), "--catalog", str(sim / "catalog.csv"), "--cache",
                     str(tmp_path / cache), "--no-progress", *extra]) == 0
    name = "sector0001_camera1_ccd4.hdf5"
    with h5py.File(tmp_path / "c_raw" / name, "r") as a, \
            h5py.File(tmp_path / "c_cal" / name, "r") as b, \
            h5py.File(sim / "raw_truth.h5", "r") as truth:
        for key in ("time", "cadenceno", "quality", "timecorr"):
            np.testing.assert_array_equal(a[key][:], b[key][:])
        assert list(a["wcs"].asstr()[:]) == list(b["wcs"].asstr()[:])
        z = (a["images"][:] - truth["image"][:]) / truth["sigma"][:]
        assert 0.95 < float(np.sqrt(np.mean(z ** 2))) < 1.05
        assert np.median(a["errors"][:] / truth["sigma"][:]) == pytest.approx(1.0, abs=0.01)
        np.testing.assert_allclose(a["movement_kernel"][:, :2], b["movement_kernel"][:, :2],
                                   atol=0.01)
