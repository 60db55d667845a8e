"""The sector simulator: SPOC layout, reproducibility, and the truth checked against the pixels."""
import filecmp
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from photometry.hooks.errors import InputError
from photometry.data.prf import AnalyticPRF
from photometry.hooks.settings import load_settings
from photometry.sim.simulate import (FRAME_COLS, FRAME_ROWS, Geometry, apply_kernel,
                                     cadence_for_sector, simulate)

REAL_FFI = Path(__file__).parent / "data" / "tess2018206192942-s0001-1-4-0120-s_ffic.fits"


def _settings(**simulate_options):
    return load_settings(extra={"simulate": simulate_options})


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """96x96 cutout at the CCD corner, 40 cadences: contains a momentum dump (frame ~28)."""
    out = tmp_path_factory.mktemp("sim")
    settings = _settings(rows=96, cols=96, cadences=40, seed=7)
    simulate(out, settings, progress=False)
    files = sorted((out / "ffi").glob("*_ffic.fits"))
    with h5py.File(out / "truth.h5") as h5:
        truth = {key: h5[key][()] for key in ("time", "quality", "shifts", "wcs_error", "flux",
                                                "background", "mean_expected_image", "cadenceno")}
        truth["stars"] = {key: h5["stars"][key][()] for key in h5["stars"]}
        truth["attrs"] = dict(h5.attrs)
        truth["shift_attrs"] = dict(h5["shifts"].attrs)
        truth["dump_frames"] = h5["dumps/frame"][()]
        truth["kernel_before"] = h5["dumps/kernel_before"][()]
        truth["kernel_after"] = h5["dumps/kernel_after"][()]
        truth["variable_index"] = h5["variability/index"][()]
        truth["variability"] = {key: h5["variability"][key][()] for key in h5["variability"]}
    return {"dir": out, "files": files, "truth": truth, "settings": settings}


def _read(path):
    with fits.open(path) as hdul:
        return (hdul[0].header, hdul[1].header, hdul[1].data.astype(float),
                hdul[2].data.astype(float))


def _true_positions(truth, i, with_wcs_error=False):
    kernel = truth["shifts"][i].copy()
    if with_wcs_error:
        kernel[:2] += truth["wcs_error"][i]
    x0, y0 = truth["shift_attrs"]["ccd_x0"], truth["shift_attrs"]["ccd_y0"]
    return apply_kernel(kernel, truth["stars"]["column"], truth["stars"]["row"], (x0, y0))


def test_layout_and_headers_match_real_spoc_file(scene):
    files = scene["files"]
    assert len(files) == 40
    assert [f.name for f in files] == sorted(f.name for f in files)
    assert files[0].name.endswith("-s0001-1-4-0120-s_ffic.fits")
    primary, cal, image, uncert = _read(files[0])
    # 44 leading collateral columns because the cutout starts at science column 1
    assert image.shape == (96, 44 + 96) == uncert.shape
    assert cal["EXTNAME"] == "CAMERA.CCD 1.4 cal"
    assert fits.getheader(files[0], 2)["EXTNAME"] == "CAMERA.CCD 1.4 uncert"
    assert (cal["CRVAL1P"], cal["CRVAL2P"]) == (1, 1)
    assert primary["SECTOR"] == 1 and primary["TELESCOP"] == "TESS"
    assert primary["FFIINDEX"] == scene["truth"]["cadenceno"][0]
    real_primary = fits.getheader(REAL_FFI, 0)
    real_cal = fits.getheader(REAL_FFI, 1)
    # our reference WCS has 2nd-order SIP (astrocut's full-frame example), the real one 4th
    skip = {"CHECKSUM"} | {k for k in real_cal if k.split("_")[0] in ("A", "B", "AP", "BP")
                           and k.split("_")[1].isdigit() and sum(map(int, k.split("_")[1:])) > 2}
    assert [k for k in real_primary if k not in primary and k not in skip] == []
    assert [k for k in real_cal if k not in cal and k not in skip] == []
    assert cal["BUNIT"] == "electrons/s" and cal["BACKAPP"] is False
    assert cal["EXPOSURE"] == pytest.approx(1800 * 0.792 / 86400)
    assert cal["NUM_FRM"] == 900 and cal["NREADOUT"] == 720
    assert cal["TSTOP"] - cal["TSTART"] == pytest.approx(1800 / 86400)
    # the SPOC collateral columns hold ~0 (calibrated), the science region the sky
    assert abs(np.median(image[:, :44])) < 0.1
    assert np.median(image[:, 44:]) > 50


def test_quality_flags_and_dump(scene):
    truth = scene["truth"]
    quality = truth["quality"]
    dumps = truth["dump_frames"]
    assert dumps.size == 1                                  # 0.6 d after the start
    assert np.all(quality[dumps] & 32)
    assert np.sum((quality & 32) != 0) == dumps.size
    assert np.sum((quality & 128) != 0) == 2 and np.sum((quality & 4) != 0) == 1
    jump = np.hypot(*(truth["kernel_after"][0, :2] - truth["kernel_before"][0, :2]))
    assert 0.1 <= jump <= 0.35
    for path, q in zip(scene["files"], quality):
        assert fits.getheader(path, 1)["DQUALITY"] == q


def test_wcs_matches_true_positions(scene):
    truth = scene["truth"]
    stars = truth["stars"]
    years = truth["attrs"]["position_epoch"] - truth["attrs"]["catalog_epoch"]
    dec = stars["dec"] + stars["pmdec"] / 3.6e6 * years
    ra = stars["ra"] + stars["pmra"] / 3.6e6 * years / np.cos(np.radians(dec))
    for i in (0, int(truth["dump_frames"][0]), 39):
        _, cal, _, _ = _read(scene["files"][i])
        x, y = WCS(cal).all_world2pix(ra, dec, 0)
        x += cal["CRVAL1P"] - 1
        y += cal["CRVAL2P"] - 1
        xt, yt = _true_positions(truth, i, with_wcs_error=True)
        assert np.max(np.hypot(x - xt, y - yt)) < 1e-4       # exact map, SIP included
        xs, ys = _true_positions(truth, i)
        assert np.max(np.hypot(x - xs, y - ys)) < 0.03       # only the ~0.005 px WCS error


def test_noise_matches_uncertainty_image(scene):
    truth = scene["truth"]
    starlight = truth["mean_expected_image"] - truth["background"].mean(axis=0)
    free = starlight < 0.01
    assert free.sum() > 300
    z = []
    for i, path in enumerate(scene["files"]):
        _, _, image, uncert = _read(path)
        z.append(((image[:, 44:] - truth["background"][i]) / uncert[:, 44:])[free])
    z = np.concatenate(z)
    assert np.std(z) == pytest.approx(1.0, abs=0.05)
    assert abs(np.mean(z)) < 0.02


def _model_sum(truth, i, box, prf):
    """Sum of all stars' true light inside a CCD box, from the truth alone."""
    r0, r1, c0, c1 = box
    x, y = _true_positions(truth, i)
    image = prf.evaluate(y, x, (r1 - r0, c1 - c0), origin=(r0, c0), flux=truth["flux"][:, i],
                         size=31)
    return image.sum()


def test_box_flux_of_isolated_stars_equals_truth(scene):
    truth = scene["truth"]
    stars = truth["stars"]
    prf = AnalyticPRF()
    isolated = np.flatnonzero(stars["isolated"] & (stars["tmag"] < 11))
    assert isolated.size >= 3
    good = np.flatnonzero(truth["quality"] == 0)[:10]
    col_off, row_off = truth["attrs"]["column_offset"], truth["attrs"]["row_offset"]
    for k in isolated:
        r, c = int(round(stars["row"][k])), int(round(stars["column"][k]))
        box = (r - 7, r + 8, c - 7, c + 8)
        z = []
        for i in good:
            _, _, image, uncert = _read(scene["files"][i])
            sl = (slice(box[0] - row_off, box[1] - row_off), slice(box[2], box[3]))
            bg = truth["background"][i][box[0] - row_off:box[1] - row_off,
                                        box[2] - col_off:box[3] - col_off]
            measured = (image[sl] - bg).sum()
            expected = _model_sum(truth, i, box, prf)
            assert truth["flux"][k, i] > 0.9 * expected          # the star dominates its box
            z.append((measured - expected) / np.sqrt((uncert[sl] ** 2).sum()))
        assert np.max(np.abs(z)) < 4.5
        assert abs(np.mean(z)) < 3.0 / np.sqrt(len(z)) + 0.5


def test_bleed_conserves_flux(scene):
    truth = scene["truth"]
    stars = truth["stars"]
    k = int(np.flatnonzero(stars["kind"] == 4)[0])
    assert stars["tmag"][k] < 6.5
    well = truth["attrs"]["full_well_rate"]
    r, c = int(round(stars["row"][k])), int(round(stars["column"][k]))
    box = (r - 20, r + 21, c - 12, c + 13)
    _, _, image, _ = _read(scene["files"][0])
    science = image[:, 44:]
    col_off = truth["attrs"]["column_offset"]
    cut = science[box[0]:box[1], box[2] - col_off:box[3] - col_off]
    bg = truth["background"][0][box[0]:box[1], box[2] - col_off:box[3] - col_off]
    assert np.sum(cut > 0.97 * well) >= 3                   # a bleed column exists
    assert cut.max() < 1.03 * well
    expected = _model_sum(truth, 0, box, AnalyticPRF())
    assert (cut - bg).sum() == pytest.approx(expected, rel=0.01)


def test_ideal_noise_matches_optimal_estimator_scatter(scene):
    """Scatter of the optimal PRF-weighted flux estimate equals stars/ideal_noise."""
    truth = scene["truth"]
    stars = truth["stars"]
    prf = AnalyticPRF()
    variable = np.zeros(stars["tmag"].size, bool)
    variable[truth["variable_index"]] = True
    chosen = np.flatnonzero(stars["isolated"] & ~variable)
    assert chosen.size >= 5
    col_off, row_off = truth["attrs"]["column_offset"], truth["attrs"]["row_offset"]
    frames = np.flatnonzero(truth["quality"] == 0)
    images = [_read(scene["files"][i])[2][:, 44:] for i in frames]
    ratios = []
    var = None
    for k in chosen:
        errors = []
        for j, i in enumerate(frames):
            x, y = _true_positions(truth, i)
            values, r0, c0 = prf.stamps([y[k]], [x[k]], 13)
            rr = slice(r0[0] - row_off, r0[0] - row_off + 13)
            cc = slice(c0[0] - col_off, c0[0] - col_off + 13)
            if min(rr.start, cc.start) < 0 or rr.stop > 96 or cc.stop > 96:
                break
            model_all = prf.evaluate(y, x, (13, 13), origin=(r0[0], c0[0]),
                                     flux=truth["flux"][:, i])
            others = model_all - truth["flux"][k, i] * values[0]
            data = images[j][rr, cc] - truth["background"][i][rr, cc] - others
            exposure = truth["attrs"]["exposure"]
            read_var = truth["attrs"]["read_noise"] ** 2 * truth["attrs"]["nreadout"]
            var = (truth["mean_expected_image"][rr, cc] * exposure + read_var) / exposure ** 2
            p = values[0]
            estimate = np.sum(p * data / var) / np.sum(p ** 2 / var)
            errors.append(estimate - truth["flux"][k, i])
        if len(errors) == frames.size:
            ratios.append(np.std(errors) / stars["ideal_noise"][k])
    assert len(ratios) >= 5
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.12)


def test_variability_truth(scene):
    """Injected signals are in the true fluxes: transit depths, sinusoid amplitudes, flares."""
    truth = scene["truth"]
    var = truth["variability"]
    stars = truth["stars"]
    n_on = np.sum((stars["row"] > -0.5) & (stars["row"] < 95.5)
                  & (stars["column"] > 43.5) & (stars["column"] < 139.5))
    assert var["index"].size == pytest.approx(0.2 * n_on, abs=2)
    rel = truth["flux"][var["index"]] / stars["flux_mean"][var["index"], None]
    constant = np.setdiff1d(np.arange(stars["tmag"].size), var["index"])
    assert np.all(truth["flux"][constant] == stars["flux_mean"][constant, None])
    types = var["type"].astype(str)
    for j in np.flatnonzero(types == "transit"):
        # the first transit is inside the span; depth reached on fully covered cadences
        assert rel[j].min() >= 1 - var["amplitude"][j] - 1e-9
        assert rel[j].max() == pytest.approx(1.0)
    deep = [j for j in np.flatnonzero(types == "transit")
            if var["duration"][j] > 2.5 / 24]
    assert deep, "seed 7 has long transits"
    assert any(rel[j].min() == pytest.approx(1 - var["amplitude"][j], abs=1e-9) for j in deep)
    for j in np.flatnonzero(types == "sinusoid"):
        assert np.abs(rel[j] - 1).max() <= var["amplitude"][j]
    for j in np.flatnonzero(types == "flare"):
        assert rel[j].min() >= 1.0 and rel[j].max() > 1.0


def test_same_seed_gives_identical_files(tmp_path):
    settings = _settings(rows=32, cols=40, cadences=3, seed=3, first_row=500, first_col=700)
    simulate(tmp_path / "a", settings, progress=False)
    simulate(tmp_path / "b", settings, progress=False)
    names = sorted(p.name for p in (tmp_path / "a" / "ffi").iterdir())
    assert len(names) == 3
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a" / "ffi", tmp_path / "b" / "ffi",
                                               names, shallow=False)
    assert mismatch == [] and errors == []
    assert filecmp.cmp(tmp_path / "a" / "catalog.csv", tmp_path / "b" / "catalog.csv", shallow=False)
    with h5py.File(tmp_path / "a" / "truth.h5") as a, h5py.File(tmp_path / "b" / "truth.h5") as b:
        assert np.array_equal(a["flux"][()], b["flux"][()])
        assert np.array_equal(a["background"][()], b["background"][()])
    # a cutout away from the edges has no collateral columns and its physical WCS says where
    cal = fits.getheader(tmp_path / "a" / "ffi" / names[0], 1)
    assert (cal["NAXIS1"], cal["NAXIS2"]) == (40, 32)
    assert (cal["CRVAL1P"], cal["CRVAL2P"]) == (44 + 700 + 1, 500 + 1)
    other = _settings(rows=32, cols=40, cadences=3, seed=4, first_row=500, first_col=700)
    simulate(tmp_path / "c", other, progress=False)
    assert not filecmp.cmp(tmp_path / "a" / "catalog.csv", tmp_path / "c" / "catalog.csv",
                           shallow=False)


def test_spoc_prf_scene_conserves_light(tmp_path):
    """With the real PRF models the frame holds exactly the truth's starlight plus background."""
    from photometry.data.prf import SpocPRF

    prf_dir = Path(__file__).parent / "data" / "prf"
    settings = _settings(rows=40, cols=48, cadences=2, seed=11, first_row=700, first_col=600,
                         prf=str(prf_dir))
    simulate(tmp_path, settings, progress=False)
    prf = SpocPRF(prf_dir / "cam1_ccd4")
    with h5py.File(tmp_path / "truth.h5") as h5:
        assert "SpocPRF" in h5["prf"].attrs["model"]
        truth = {"shifts": h5["shifts"][()], "flux": h5["flux"][()],
                 "shift_attrs": dict(h5["shifts"].attrs),
                 "stars": {k: h5["stars"][k][()] for k in ("row", "column")}}
        background = h5["background"][()]
    for i, path in enumerate(sorted((tmp_path / "ffi").glob("*_ffic.fits"))):
        _, cal, image, uncert = _read(path)
        assert (cal["CRVAL1P"], cal["CRVAL2P"]) == (645, 701)
        x, y = _true_positions(truth, i)
        model = prf.evaluate(y, x, (40, 48), origin=(700, 644), flux=truth["flux"][:, i])
        resid = (image - background[i] - model) / uncert
        assert np.std(resid) == pytest.approx(1.0, abs=0.1)
        assert abs(np.mean(resid)) < 0.1


def test_geometry_and_cadence_rules():
    full = Geometry(0, 0, 2048, 2048)
    assert full.frame_shape == (FRAME_ROWS, FRAME_COLS)
    assert full.science_slices == (slice(0, 2048), slice(44, 2092))
    inner = Geometry(100, 200, 32, 32)
    assert inner.frame_box == (100, 132, 244, 276)
    assert [cadence_for_sector(s) for s in (1, 26, 27, 55, 56)] == [1800, 1800, 600, 600, 200]
    with pytest.raises(InputError, match="does not fit"):
        Geometry(2040, 0, 32, 32)


def test_cli_short_cadence_and_bad_input(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "photometry.cli", "simulate", str(out), "--size", "32", "32",
           "--cadences", "2", "--sector", "60", "--no-progress", "--set", "simulate.first_row=300"]
    subprocess.run(cmd, check=True, capture_output=True)
    files = sorted((out / "ffi").glob("*-s0060-1-4-0120-s_ffic.fits"))
    assert len(files) == 2
    assert fits.getheader(files[0], 1)["TIMEDEL"] == pytest.approx(200 / 86400)
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "already holds FFI files" in again.stderr
    bad = subprocess.run([sys.executable, "-m", "photometry.cli", "simulate", str(tmp_path / "x"),
                          "--size", "4", "4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--size" in bad.stderr
