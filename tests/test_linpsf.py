"""Linear PRF plugin: shape model against a known PRF, crowded-scene photometry against truth,
the prepare stage on a cache-like file, and the real TPF / TESScut files."""
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.table import Table

from photometry.core.base import STATUS
from photometry.hooks.errors import AlgorithmFailure
from photometry.sim.evaluation import score_lightcurve
from photometry.data.memory_source import MemorySource
from photometry.data.prf import AnalyticPRF
from photometry.hooks.settings import load_settings
from photometry.sim.simulate import focus_scale, focused_prf
from photometry.data.tpf import TPFSource, TranslationKernel
from photometry.hooks.utilities import mag2flux
from photometry_aperture.aperture import AperturePhotometry
from photometry_linpsf.linpsf import LinPSFPhotometry, solve_fluxes
from photometry_linpsf.model import SplinePRF
from photometry_linpsf.stage import (LinPSFShapeModel, fit_shape_model, load_shape_model,
                                     motion_samples, select_stars)

DATA = Path(__file__).parent / "data"
TPF = DATA / "tess25155310-s01-first-cadences.fits.gz"
PIMEN = DATA / "tess-s0001-4-2_84.291190_-80.469170_6x6_astrocut.fits"
# the real SPOC PRF models of ../shared (beside the clone), when present
SPOC_PRF = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "prf" / "Sectors1_2_3"

#: the "true" PRF of the scenes: wider than the analytic default, so the fallback is wrong
TRUE_PRF = dict(sigma=0.85, wing_sigma=2.4, wing_fraction=0.2)
EXPOSURE, READ_VAR, SKY = 1440.0, 900 * 10.0 ** 2, 80.0


def _settings():
    s = load_settings()
    s["photometry"]["background"] = ""
    return s


class _Group(dict):
    """Stands in for an h5py group (``attrs``, ``[name][()]``, ``in``)."""

    def __init__(self, data, attrs):
        super().__init__(data)
        self.attrs = attrs

    def create_dataset(self, name, data):
        self[name] = np.asarray(data)


def make_crowded(seed=3, shape=(64, 64), n=120, nstar=170, drift_px=0.15, focus_change=0.0):
    """A crowded field (0.04 stars/px) with blended pairs, variability and a linear drift.

    ``focus_change``: peak-to-peak relative PRF width change, a linear ramp over the cadences
    (``photometry.sim.simulate.focus_scale``; truth ``focus_scale``); 0 leaves the scene as it was.
    """
    rng = np.random.default_rng(seed)
    rows = rng.uniform(-3, shape[0] + 3, nstar)
    cols = 44 + rng.uniform(-3, shape[1] + 3, nstar)
    tmag = rng.uniform(8.0, 16.5, nstar)
    # blended pairs: a second star 1.2-2.5 px from some bright ones
    for k in range(12):
        j = nstar - 1 - k
        ang, sep = rng.uniform(0, 2 * np.pi), rng.uniform(1.2, 2.5)
        rows[j], cols[j] = rows[k] + sep * np.sin(ang), cols[k] + sep * np.cos(ang)
        tmag[k], tmag[j] = rng.uniform(9, 12), rng.uniform(9.5, 12.5)
    time = 1325.0 + np.arange(n) * 1800 / 86400
    amp = np.where(rng.uniform(size=nstar) < 0.5, rng.uniform(0.005, 0.03, nstar), 0.0)
    period = rng.uniform(0.5, 2.0, nstar)
    true_flux = mag2flux(tmag)[:, None] * (
        1 + amp[:, None] * np.sin(2 * np.pi * time[None, :] / period[:, None]))
    drift = np.linspace(-drift_px / 2, drift_px / 2, n)
    dcol, drow = drift, -0.6 * drift
    prf = AnalyticPRF(**TRUE_PRF)
    focus = focus_scale(time, focus_change)
    scene = np.empty((n,) + shape)
    for i in range(n):
        scene[i] = focused_prf(prf, focus[i]).evaluate(
            rows + drow[i], cols + dcol[i], shape, origin=(0, 44), flux=true_flux[:, i], size=25)
    var = ((scene + SKY) * EXPOSURE + READ_VAR) / EXPOSURE ** 2
    images = scene + SKY + rng.normal(size=scene.shape) * np.sqrt(var)
    quality = np.zeros(n, dtype=np.int64)
    quality[::37] = 32
    cat = Table({"starid": np.arange(1, nstar + 1), "ra": np.zeros(nstar),
                 "dec": np.zeros(nstar), "tmag": tmag, "row": rows, "column": cols})
    mat = prf.design_matrix(rows, cols, shape, origin=(0, 44), size=25).toarray()
    ideal = np.sqrt(1.0 / np.sum(mat ** 2 / ((scene.mean(0).ravel() + SKY) * EXPOSURE
                                              + READ_VAR)[:, None] * EXPOSURE ** 2, axis=0))
    source = MemorySource({"images": images, "errors": np.sqrt(var),
                           "pixel_flags": np.zeros(scene.shape, np.uint8)},
                          cat, time, quality, movement_kernel=TranslationKernel(dcol, drow))
    truth = {"rows": rows, "cols": cols, "tmag": tmag, "flux": true_flux, "amp": amp,
             "ideal_noise": ideal, "images": images, "var": var, "focus_scale": focus}
    return source, truth


def measure(phot, truth, k):
    """(scatter / ideal noise, recovered / injected amplitude) of star k on good cadences."""
    ratio, amp = score_lightcurve(phot.lightcurve, truth["flux"][k], truth["ideal_noise"][k])
    return ratio, (amp if truth["amp"][k] > 0 else np.nan)


def shape_group(source, truth, cfg):
    """The stage's fit on the scene's sum image, as the group the photometry reads."""
    shape = source.sumimage.shape
    rows, cols = truth["rows"], truth["cols"] - 44
    keep = select_stars(rows, cols, truth["tmag"], shape, cfg)
    var = np.mean(truth["var"], axis=0) / truth["var"].shape[0]
    others = np.setdiff1d(np.arange(len(rows)), keep)
    scene = (rows[others], cols[others], mag2flux(truth["tmag"][others]))
    kern = source.movement_kernel
    shifts = motion_samples(kern.drow, kern.dcol, source.quality == 0,
                            int(cfg["blur_samples"]))
    res = fit_shape_model(source.sumimage, var, rows[keep], cols[keep], cfg, scene=scene,
                          shifts=shifts)
    assert res["usable"]
    print({k: v for k, v in res.items() if np.isscalar(v)})
    attrs = dict(res["basis"].to_attrs(), usable=True)
    return _Group({"weights": res["weights"], "cell_rows": res["cell_rows"],
                   "cell_cols": res["cell_cols"] + 44}, attrs), res


@pytest.fixture(scope="module")
def crowded():
    source, truth = make_crowded()
    group, res = shape_group(source, truth, _settings()["linpsf"])
    source.models["linpsf_shape"] = group
    return source, truth, res


def test_shape_model_recovers_true_prf(crowded):
    source, truth, res = crowded
    assert res["n_stars"] >= 5
    assert res["lattice_spread"] < 0.005          # unit sum at every sub-pixel phase
    assert abs(res["flux_captured"] - 1) < 0.03
    model = SplinePRF.from_group(source.model_group("linpsf_shape"))
    prf = AnalyticPRF(**TRUE_PRF)
    rng = np.random.default_rng(0)
    for r, c in rng.uniform(30, 31, (6, 2)):
        ours, r0, c0 = model.stamps([r], [c], 13)
        true, r1, c1 = prf.stamps([r], [c], 13)
        assert (r0, c0) == (r1, c1)
        # within 0.05 % of the flux in any pixel (true peak pixel holds ~20 %); measured
        # 1.6e-4 with the pixel-integrated model, rmax 8 and joint skies (1.3e-3 in 1.0)
        assert np.abs(ours - true).max() < 0.0005
        assert ours.sum() == pytest.approx(true.sum(), abs=0.01)


def test_pixel_integrated_basis_fits_a_pixel_integrated_psf():
    """A circular PSF integrated over square pixels is not circular: a circular spline on
    pixel centres (n_sub = 1) misses it by ~1e-3 of the flux per pixel in the core, the
    pixel-integrated splines (n_sub >= 2) fit it 10x better (noiseless, 400 sub-pixel
    phases, no normalisation: the model is truncated at rmax, the truth is not)."""
    from photometry_linpsf.model import PolarBasis, fit_weights
    true_prf = AnalyticPRF(**TRUE_PRF)
    rng = np.random.default_rng(0)
    pos = rng.uniform(30, 31, (400, 2))
    vals, r0, c0 = true_prf.stamps(pos[:, 0], pos[:, 1], 15)
    st = np.arange(15)
    dr = (r0[:, None] + st)[:, :, None] - pos[:, 0, None, None] + 0 * st[None, None, :]
    dc = (c0[:, None] + st)[:, None, :] - pos[:, 1, None, None] + 0 * st[None, :, None]
    test = rng.uniform(30, 31, (30, 2))
    true, _, _ = true_prf.stamps(test[:, 0], test[:, 1], 15)
    core = []
    for n_sub in (1, 4):
        basis = PolarBasis(6.0, 13, 0, 0.5, n_sub)
        w = fit_weights(basis, dr.ravel(), dc.ravel(), vals.ravel(), np.full(vals.size, 1e8))
        ours, _, _ = SplinePRF(basis, w, [0.0], [0.0]).stamps(test[:, 0], test[:, 1], 15)
        core.append(np.abs(ours - true)[:, 6:9, 6:9].max())
    assert core[0] > 5e-4            # measured 8.3e-4
    assert core[1] < 1e-4            # measured 4.4e-5
    assert core[1] < 0.1 * core[0]


def _crowded_targets(truth, shape=(64, 64)):
    out = []
    for k in range(len(truth["tmag"])):
        r, c = truth["rows"][k], truth["cols"][k] - 44
        if not (8 <= truth["tmag"][k] <= 13 and 7 <= r <= shape[0] - 8
                and 7 <= c <= shape[1] - 8):
            continue
        d = np.hypot(truth["rows"] - truth["rows"][k], truth["cols"] - truth["cols"][k])
        dm = truth["tmag"] - truth["tmag"][k]
        if np.any((d > 0) & (d < 3) & (dm < 2.5)):
            out.append(k)
    return out


def test_crowded_stars_amplitudes_flux_scale_and_better_than_aperture(crowded):
    """Blended stars (a neighbour < 3 px, < 2.5 mag fainter) with the fitted shape model.

    Measured (see docs/benchmarks.md, 2026-11-23): median scatter / ideal noise 1.07 for
    linpsf (1.05 with the true PRF; 1.21 without the second pass, which holds the neighbours
    at their time-smoothed fluxes) against 22-37 for aperture photometry; amplitudes recovered
    to a median of 0.7 %.
    """
    source, truth, _ = crowded
    targets = _crowded_targets(truth)
    assert len(targets) >= 20
    lin, ap, amps, scale, lin_sub, pulls = [], [], [], [], [], []
    for i, k in enumerate(targets):
        phot = LinPSFPhotometry(k + 1, source, settings=_settings())
        assert phot.photometry() in (STATUS.OK, STATUS.WARNING)
        assert phot.details["linpsf"]["model"] == "linpsf_shape"
        assert phot.details["linpsf"]["moving"]
        ratio, amp = measure(phot, truth, k)
        lin.append(ratio)
        if np.isfinite(amp):
            amps.append(amp)
        good = np.asarray(phot.lightcurve["quality"]) == 0
        flux = np.asarray(phot.lightcurve["flux"])[good]
        scale.append(np.median(flux) / np.median(truth["flux"][k][good]))
        diff = flux - truth["flux"][k][good]
        pulls.append(np.std(diff) / np.median(np.asarray(phot.lightcurve["flux_err"])[good]))
        if i % 4 == 0:   # aperture photometry is slow in this field: a quarter of them
            aper = AperturePhotometry(k + 1, source, settings=_settings())
            aper.photometry()
            ap.append(measure(aper, truth, k)[0])
            lin_sub.append(ratio)
    print("linpsf", np.round(lin, 3), "aperture", np.round(ap, 3), "amps", np.round(amps, 4),
          "flux scale", np.round(scale, 4))
    assert np.median(lin_sub) < 0.25 * np.median(ap)
    assert np.median(lin) < 1.12
    # the reported errors are the scatter (fixed noise model of the pixels alone)
    assert 0.85 < np.median(pulls) < 1.15
    assert len(amps) >= 5
    assert abs(np.median(amps) - 1) <= 0.015
    assert abs(np.median(scale) - 1) <= 0.02


def test_headers_errors_and_fallback(crowded, caplog):
    source, truth, _ = crowded
    k = _crowded_targets(truth)[0]
    phot = LinPSFPhotometry(k + 1, source, settings=_settings())
    phot.photometry()
    h = phot.additional_headers
    assert 0 < h["FLFRCSAP"][0] <= 1 and 0 < h["CROWDSAP"][0] <= 1
    assert h["PSF_CONT"][0] == pytest.approx(1 - h["CROWDSAP"][0])
    assert h["PSF_NSRC"][0] >= 2
    assert phot.final_phot_mask.any()
    err = np.asarray(phot.lightcurve["flux_err"])
    assert np.all(np.isfinite(err)) and np.all(err > 0)
    # without a cache model: phot.prf, and the log says so
    bare = MemorySource(source._cubes, source._catalog, source.time, source.quality,
                        movement_kernel=source.movement_kernel)
    with caplog.at_level(logging.INFO, logger="photometry_linpsf"):
        phot = LinPSFPhotometry(k + 1, bare, settings=_settings())
        phot.photometry()
    assert phot.details["linpsf"]["model"] == "prf:analytic"
    assert "no linpsf_shape model" in caplog.text


def test_designs_in_blocks_of_cadences_give_the_same_light_curve(crowded, monkeypatch):
    """Issue 15 (memory): moving-star designs built for blocks of cadences (as beyond
    DESIGN_BLOCK_BYTES at 11 800 cadences) give the light curve of one block."""
    import photometry_linpsf.linpsf as linpsf
    source, truth, _ = crowded
    k = _crowded_targets(truth)[1]
    whole = LinPSFPhotometry(k + 1, source, settings=_settings())
    whole.photometry()
    assert whole.details["linpsf"]["moving"]
    assert whole.details["linpsf"]["design_blocks"] == 1
    monkeypatch.setattr(linpsf, "DESIGN_BLOCK_BYTES", 2 * 1024 ** 2)
    blocked = LinPSFPhotometry(k + 1, source, settings=_settings())
    blocked.photometry()
    assert blocked.details["linpsf"]["design_blocks"] == 10      # 120 cadences, 12 a block
    for col in ("flux", "flux_err", "flux_background", "pos_centroid"):
        np.testing.assert_allclose(np.asarray(blocked.lightcurve[col]),
                                   np.asarray(whole.lightcurve[col]), rtol=1e-12, atol=0)
    assert np.array_equal(blocked.final_phot_mask, whole.final_phot_mask)


def test_solver_fixed_and_batched_agree():
    rng = np.random.default_rng(1)
    A = rng.uniform(size=(50, 4))
    x = rng.uniform(1, 2, size=(7, 4))
    y = x @ A.T + rng.normal(scale=0.01, size=(7, 50))
    w = np.full(50, 1e4)
    mu, ivar = np.zeros(4), np.array([0, 1e-6, 1e-6, 0])
    x1, e1 = solve_fluxes(A, y, w, mu, ivar)
    x2, e2 = solve_fluxes(np.broadcast_to(A, (7, 50, 4)).copy(), y, w, mu, ivar)
    assert np.allclose(x1, x2) and np.allclose(e1, e2)
    assert np.allclose(x1, x, atol=0.05)
    y[0, 3] = np.nan       # a missing pixel drops out of that cadence only
    x3, e3 = solve_fluxes(A, y, w, mu, ivar)
    assert np.all(np.isfinite(x3)) and np.allclose(x3[1:], x1[1:])
    # the sparse path (scene mode): same answers, one factorisation per missing-pixel pattern
    from scipy import sparse
    x4, e4 = solve_fluxes(sparse.csr_matrix(A), y, w, mu, ivar)
    assert np.allclose(x4, x3) and np.allclose(e4, e3)


class _Writer:
    """The part of CacheWriter a prepare stage uses."""

    def __init__(self, f, images, errors, flags):
        self.file, self._blocks = f, (images, errors, flags)

    def iter_frame_blocks(self):
        images, errors, flags = self._blocks
        for start in range(0, len(images), 16):
            sl = slice(start, start + 16)
            yield sl, images[sl], errors[sl], flags[sl]


def test_prepare_stage_from_kernel_stars(tmp_path):
    """No catalog SQLite yet (prepare writes it after the stages): kernel stars, positions
    refitted from first-frame guesses."""
    source, truth = make_crowded(seed=8, shape=(80, 80), n=32, nstar=60)
    cfg = _settings()
    # an 80 x 80 px scene has too few stars with 9 px of clear margin for rmax = 8
    cfg["linpsf"].update(rmax=6.0, n_r_knots=13)
    rows, cols = truth["rows"], truth["cols"] - 44
    strict = dict(cfg["linpsf"], isolation_radius=7.0, isolation_contrast=4.0)
    keep = select_stars(rows, cols, truth["tmag"], (80, 80), strict)   # as prepare's kernel
    with h5py.File(tmp_path / "cache.hdf5", "w") as f:
        f.attrs.update(row_offset=0, column_offset=44, sector=1, camera=1, ccd=1)
        f["sumimage"] = source.sumimage
        f["quality"] = source.quality
        rng = np.random.default_rng(2)
        f["movement/row"] = rows[keep] + rng.normal(scale=0.1, size=keep.size)
        f["movement/column"] = cols[keep] + rng.normal(scale=0.1, size=keep.size)
        group = f.create_group("models/linpsf_shape")
        writer = _Writer(f, truth["images"], np.sqrt(truth["var"]),
                         source._cubes["pixel_flags"])
        LinPSFShapeModel(cfg).run(writer, group)
        group.attrs["complete"] = True
        assert group.attrs["usable"] and group.attrs["star_source"] == "kernel stars"
        assert abs(group.attrs["flux_captured"] - 1) < 0.03
        stars = group["stars"][()]
        used = stars["used"]
        # refitted positions land on the truth (guesses were 0.1 px off) up to a common
        # offset (a shift of all positions and of the model centre is degenerate)
        dr = stars["row"][used] - rows[keep][used]
        dc = stars["col"][used] - 44 - cols[keep][used]
        assert np.max(np.hypot(dr - np.median(dr), dc - np.median(dc))) < 0.02
        assert np.hypot(np.median(dr), np.median(dc)) < 0.06
        model = load_shape_model(group)
        ours, _, _ = model.stamps([40.3 + np.median(dr)], [84.6 + np.median(dc)], 13)
        true, _, _ = AnalyticPRF(**TRUE_PRF).stamps([40.3], [84.6], 13)
        # five stars with free positions: within 1.2 % of the flux per pixel (peak ~20 %)
        assert np.abs(ours - true).max() < 0.012


# ---------------------------------------------------------------- real data
@pytest.mark.skipif(not SPOC_PRF.is_dir(), reason="SPOC PRF models not available")
def test_tic25155310_tpf_ratio_to_aperture_stable():
    s = load_settings()
    s["photometry"]["prf"] = str(SPOC_PRF)
    phot = LinPSFPhotometry(25155310, TPFSource(TPF), settings=s)
    # the fitted total flux is 0.81 x SPOC's PDCSAP (7484 against 9247 e-/s), less than the
    # 8 core pixels hold: the core's FLUX_VS_REFERENCE check makes that an ERROR
    # (docs/checks.md) until the shape model handles real PRFs (issue 16)
    status = phot.photometry()
    assert status in (STATUS.OK, STATUS.WARNING) or \
        phot.details["checks"]["codes"] == ["FLUX_VS_REFERENCE"]
    aper = AperturePhotometry(25155310, TPFSource(TPF), settings=s)
    aper.photometry()
    f = np.asarray(phot.lightcurve["flux"])
    e = np.asarray(phot.lightcurve["flux_err"])
    fa = np.asarray(aper.lightcurve["flux"])
    assert np.all(np.isfinite(f)) and np.all(np.isfinite(e))
    good = np.asarray(phot.lightcurve["quality"]) == 0
    ratio = f[good] / fa[good]
    assert 0.85 < np.median(ratio) < 1.1
    # the ratio varies less than the PSF flux errors
    assert np.std(ratio) / np.median(ratio) < np.median(e[good] / f[good])


def test_pi_men_tesscut_declined_as_saturated():
    """Pi Men (Tmag 5.1): the fit to the unsaturated wings gave 0.485 x SPOC's SAP flux; a
    saturated target is declined (the method policy gives it to aperture, docs/checks.md)."""
    phot = LinPSFPhotometry(261136679, TPFSource(PIMEN, starid=261136679, tmag=5.1))
    with pytest.raises(AlgorithmFailure, match="SATURATED"):
        phot.photometry()
    assert phot.details["checks"]["codes"] == ["SATURATED"]


def test_scene_mode_matches_per_target_solve(crowded):
    """``fit_scene_two_pass`` (every star in one sparse solve per design, then every star
    refitted with its neighbours held at their smoothed fluxes) gives the per-target fluxes
    to within their errors, and the truth as well as they do."""
    from photometry_linpsf.linpsf import fit_scene_two_pass
    source, truth, _ = crowded
    prf = load_shape_model(source.model_group("linpsf_shape"))
    kern = source.movement_kernel
    good = source.quality == 0
    cfg = _settings()["linpsf"]
    flux, err, sky, info = fit_scene_two_pass(
        source._cubes["images"], source._cubes["errors"], truth["rows"], truth["cols"],
        mag2flux(truth["tmag"]), prf, drow=kern.drow, dcol=kern.dcol, good=good,
        origin=(0, 44), window=cfg["neighbour_smoothing"], clip=cfg["neighbour_clip"])
    assert 4 <= info["n_designs"] <= 12             # 0.15 px drift in 0.03 px groups
    targets = _crowded_targets(truth)
    assert np.median(sky[good][:, targets]) == pytest.approx(SKY, rel=0.01)
    for k in targets[:4]:
        phot = LinPSFPhotometry(k + 1, source, settings=_settings())
        phot.photometry()
        f1 = np.asarray(phot.lightcurve["flux"])
        e1 = np.asarray(phot.lightcurve["flux_err"])
        # cadence to cadence (the levels differ by up to 0.45 % on the brightest blend, both
        # within 0.25 % of the truth: checked below)
        diff = flux[:, k] - f1
        z = (diff - np.median(diff[good])) / np.hypot(err[:, k], e1)
        true = np.median(truth["flux"][k][good])
        d_scene = abs(np.median(flux[good, k]) / true - 1)
        d_target = abs(np.median(f1[good]) / true - 1)
        print(k, "median |z|", np.median(np.abs(z)), "max", np.abs(z).max(),
              "|scale - 1| scene", d_scene, "per target", d_target)
        # the per-target stamp holds its faint neighbours at catalog flux and fits its own
        # background; the scene fits them all: different noise, same signal
        assert np.median(np.abs(z)) < 0.5 and np.abs(z[good]).max() < 1.5   # measured 0.04-0.12, 0.39
        assert d_scene < 0.006
    ratios = [score_lightcurve({"flux": flux[:, k], "quality": source.quality},
                               truth["flux"][k], truth["ideal_noise"][k])[0] for k in targets]
    print("scene two-pass scatter / ideal, crowded:", np.median(ratios))
    assert np.median(ratios) < 1.12                 # measured 1.06 (first pass alone 1.18)
    scale = np.median(flux[good][:, targets], axis=0) / np.median(
        truth["flux"][targets][:, good], axis=1)
    assert abs(np.median(scale) - 1) < 0.005


def test_second_pass_lowers_blend_noise_and_keeps_neighbour_flares_out():
    """``target_pass`` on a 1.2 px blend: the target's scatter drops towards the noise of a
    fit with known neighbours, and a neighbour's 3-cadence flare does not leak into it."""
    from photometry_linpsf.linpsf import target_pass
    rng = np.random.default_rng(4)
    prf = AnalyticPRF(**TRUE_PRF)
    shape, N = (15, 15), 400
    rows, cols = np.array([7.0, 7.6]), np.array([7.0, 8.05])
    A = prf.design_matrix(rows, cols, shape, size=15).toarray()
    A = np.hstack([A, np.ones((A.shape[0], 1))])
    true = np.tile([20000.0, 15000.0, 50.0], (N, 1))
    true[200:203, 1] *= 1.3                                     # the neighbour flares
    var = (true[0] @ A.T) / 1800.0 + 1.0
    data = true @ A.T + rng.normal(size=(N, A.shape[0])) * np.sqrt(var)
    w = 1.0 / var
    x, err = solve_fluxes(A, data, w, np.zeros(3), np.zeros(3))
    good = np.ones(N, bool)
    x2, err2 = target_pass(A, data, w, x, err, 0, 2, good, 15, 3.0)
    known = np.sqrt(1.0 / np.sum(A[:, 0] ** 2 * w))             # neighbour flux known
    quiet = np.r_[0:195, 210:N]
    s1, s2 = np.std(x[quiet, 0]), np.std(x2[quiet, 0])
    print("joint", s1 / known, "second pass", s2 / known, "err", np.median(err2[:, 0]) / s2)
    assert s1 / known > 1.3                     # the blend's flux trade in the joint fit
    assert s2 / known < 1.1
    assert 0.85 < np.median(err2[quiet, 0]) / s2 < 1.2
    # the flare stays in the neighbour, not in the target (joint-fit noise there at most)
    assert np.all(np.abs(x2[200:203, 0] - 20000.0) < 4 * err[200:203, 0])
    assert np.all(x2[200:203, 1] > 1.2 * 15000.0)
