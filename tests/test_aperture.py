"""Aperture photometry plugin: mask algorithm on known arrays, the full algorithm on an
in-memory FFI scene with injected signals (truth known exactly), the saturated Pi Men TESScut,
and (when the simulator and prepare are installed) a simulated sector end to end."""
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from scipy import ndimage

from photometry.core.base import STATUS
from photometry.sim.evaluation import score_lightcurve
from photometry.data.memory_source import MemorySource
from photometry.data.prf import AnalyticPRF
from photometry.hooks.quality import PixelQualityFlags
from photometry.hooks.settings import default_settings
from photometry.hooks.utilities import mag2flux
from photometry_aperture import masks
from photometry_aperture.aperture import AperturePhotometry

DATA = Path(__file__).parent / "data"
PIMEN = DATA / "tess-s0001-4-2_84.291190_-80.469170_6x6_astrocut.fits"


# ---------------------------------------------------------------- pure mask functions
def _scene(rows, cols, tmags, shape=(15, 15), sky_var=4.0):
    fluxes = mag2flux(np.asarray(tmags, dtype=float))
    models = fluxes[:, None, None] * masks.gaussian_prf_stack(shape, rows, cols, sigma=0.8)
    variance = sky_var + models.sum(axis=0) / 1440.0
    return models, variance, fluxes


def test_watershed_separates_blended_neighbour():
    rows, cols, tmags = [7.0, 8.8, 2.0], [7.0, 9.7, 12.0], [10.0, 9.5, 12.0]
    models, variance, fluxes = _scene(rows, cols, tmags)
    res = masks.find_mask(models.sum(axis=0), variance, models, np.array(rows),
                          np.array(cols), fluxes, 0)
    # each star got its own segment, holding its own centre
    assert res.labels[7, 7] == 1 and res.labels[9, 10] == 2 and res.labels[2, 12] == 3
    assert not res.mask[9, 10] and res.mask[7, 7]
    assert res.contamination < 0.05
    assert res.edges == [] and res.skip == []


def test_mask_snr_beats_every_circular_aperture():
    """S/N-optimal growth: no circle centred on the star does better."""
    models, variance, fluxes = _scene([7.3], [6.8], [11.0], sky_var=60.0)
    img = models.sum(axis=0)
    res = masks.find_mask(img, variance, models, np.array([7.3]), np.array([6.8]), fluxes, 0)
    rr, cc = np.mgrid[:15, :15]
    best_circle = 0.0
    for radius in np.arange(0.5, 6.0, 0.1):
        m = (rr - 7.3) ** 2 + (cc - 6.8) ** 2 <= radius ** 2
        best_circle = max(best_circle, img[m].sum() / np.sqrt(variance[m].sum()))
    assert res.snr >= best_circle
    ideal = np.sqrt(np.sum(img ** 2 / variance))  # PRF-weighted (optimal) S/N
    assert res.snr > 0.85 * ideal


def test_fainter_star_inside_mask_is_skipped_brighter_is_not():
    rows, cols, tmags = [7.0, 7.4, 7.0], [7.0, 7.5, 12.5], [9.0, 13.0, 8.0]
    models, variance, fluxes = _scene(rows, cols, tmags)
    res = masks.find_mask(models.sum(axis=0), variance, models, np.array(rows),
                          np.array(cols), fluxes, 0)
    assert res.skip == [1]
    assert 0 < res.contamination < 0.05


def test_bleed_columns_extend_to_background():
    img = np.zeros((40, 9))
    img[10:31, 4] = 1e5        # saturated column: 21 rows
    img[20, 3:6] = 5e4
    img[9, 4] = img[31, 4] = 200.0  # partly filled ends
    img += np.random.default_rng(1).normal(size=img.shape)
    seg = np.zeros(img.shape, bool)
    seg[18:23, 3:6] = True
    cols = masks.bleed_columns(seg, img)
    assert cols == [4]
    out = masks.extend_bleed_columns(seg, img, threshold=5.0, columns=cols)
    assert out[9:32, 4].all() and not out[8, 4] and not out[32, 4]


def test_aperture_sums_errors_and_centroid():
    n = 3
    images = np.zeros((n, 5, 5))
    images[:, 2, 2] = 100.0
    images[:, 2, 3] = 100.0
    err = np.full((n, 5, 5), 2.0)
    berr = np.full((n, 5, 5), 1.0)
    mask = np.zeros((5, 5), bool)
    mask[1:4, 1:5] = True  # 12 pixels
    flux, ferr, _, cen = masks.aperture_sums(images, err, berr, mask)
    assert flux == pytest.approx([200.0] * n)
    # per-pixel part 12 * (4 - 1), background fully correlated (12 * 1)^2
    assert ferr == pytest.approx([np.sqrt(12 * 3 + 144)] * n)
    assert cen[0] == pytest.approx([2.0, 2.5])
    _, ferr_q, _, _ = masks.aperture_sums(images, err, berr, mask, correlated_background=False)
    assert ferr_q == pytest.approx([np.sqrt(12 * 4)] * n)


# ---------------------------------------------------------------- in-memory FFI scene
#: effective exposure (s) of an 1800 s FFI and read noise (e-) per 2 s read, 900 reads
EXPOSURE, READ_VAR = 1440.0, 900 * 10.0 ** 2
SKY = 80.0
SAT = np.uint8(int(PixelQualityFlags.Saturated))


def make_scene(seed=7, shape=(60, 60), n=150, saturated=False):
    """Stars with injected sinusoids on a flat sky; returns the source and the truth."""
    rng = np.random.default_rng(seed)
    nstar = 60
    rows = rng.uniform(-3, shape[0] + 3, nstar)
    cols = 44 + rng.uniform(-3, shape[1] + 3, nstar)
    tmag = rng.uniform(8.0, 16.0, nstar)
    if saturated:
        rows[0], cols[0], tmag[0] = 30.2, 44 + 30.4, 5.5
    time = 1325.0 + np.arange(n) * 1800 / 86400
    amp = np.where(rng.uniform(size=nstar) < 0.5, rng.uniform(0.005, 0.03, nstar), 0.0)
    period = rng.uniform(0.5, 2.0, nstar)
    rel = 1 + amp[:, None] * np.sin(2 * np.pi * time[None, :] / period[:, None])
    true_flux = mag2flux(tmag)[:, None] * rel            # (nstar, n)
    prf = AnalyticPRF()
    mat = prf.design_matrix(rows, cols, shape, origin=(0, 44), size=21).toarray()
    scene = (true_flux.T @ mat.T).reshape(n, *shape)   # (n, R, C) e-/s
    flags = np.zeros(scene.shape, np.uint8)
    if saturated:  # bleed: charge above full well spills up and down the column
        well = 8.0e3  # e-/s at which a pixel saturates in this scene
        for k in range(n):
            frame = scene[k]
            for c in range(shape[1]):
                excess = np.clip(frame[:, c] - well, 0, None).sum()
                if excess <= 0:
                    continue
                sat = frame[:, c] >= well
                frame[sat, c] = well
                flags[k, sat, c] |= SAT
                top, bot = np.flatnonzero(sat).min(), np.flatnonzero(sat).max()
                while excess > 0 and (top > 0 or bot < shape[0] - 1):
                    for r in (top - 1, bot + 1):
                        if 0 <= r < shape[0] and excess > 0:
                            add = min(well - frame[r, c], excess)
                            frame[r, c] += add
                            excess -= add
                            flags[k, r, c] |= SAT
                    top, bot = max(top - 1, 0), min(bot + 1, shape[0] - 1)
    var = ((scene + SKY) * EXPOSURE + READ_VAR) / EXPOSURE ** 2
    images = scene + SKY + rng.normal(size=scene.shape) * np.sqrt(var)
    quality = np.zeros(n, dtype=np.int64)
    quality[::37] = 32  # momentum dumps: excluded from the statistics
    cat = Table({"starid": np.arange(1, nstar + 1), "ra": np.zeros(nstar),
                 "dec": np.zeros(nstar), "tmag": tmag, "row": rows, "column": cols})
    source = MemorySource({"images": images, "errors": np.sqrt(var), "pixel_flags": flags},
                          cat, time, quality)
    ideal = np.sqrt(1.0 / np.sum(mat ** 2 / ((scene.mean(0).ravel() + SKY) * EXPOSURE
                                              + READ_VAR)[:, None] * EXPOSURE ** 2, axis=0))
    truth = {"rows": rows, "cols": cols, "tmag": tmag, "flux": true_flux, "amp": amp,
             "ideal_noise": ideal, "period": period, "time": time}
    return source, truth


def _settings():
    s = default_settings()
    s["photometry"]["background"] = ""
    return s


def measure(phot, truth, k):
    """(scatter / ideal noise, recovered / injected amplitude) of star k."""
    ratio, amp = score_lightcurve(phot.lightcurve, truth["flux"][k], truth["ideal_noise"][k])
    return ratio, (amp if truth["amp"][k] > 0 else np.nan)


@pytest.fixture(scope="module")
def scene():
    return make_scene()


def test_residual_background_fits_all_cadences_at_once_as_one_by_one():
    """Issue 15: the batched clipped plane fits equal per-cadence ``lstsq``, also where a
    cadence keeps too few pixels for a plane (its minimum-norm solution), and a known plane
    with outliers is recovered."""
    rng = np.random.default_rng(4)
    A = np.column_stack([np.ones(60), rng.uniform(-.5, .5, 60), rng.uniform(-.5, .5, 60)])
    y = rng.normal(size=(60, 40))
    keep = rng.uniform(size=y.shape) > 0.2
    keep[:, 3] = False
    keep[:2, 3] = True                                   # two pixels: rank 2
    keep[:, 7] = False                                   # none
    loop = np.array([np.linalg.lstsq(A[keep[:, i]], y[keep[:, i], i], rcond=None)[0]
                     for i in range(40)]).T
    np.testing.assert_allclose(masks._masked_fits(A, y, keep), loop, rtol=1e-9, atol=1e-12)
    n, R, C = 30, 11, 11
    rr, cc = np.mgrid[:R, :C]
    truth = 5.0 + 0.3 * (rr - 5)[None] - 0.2 * (cc - 5)[None] + np.arange(n)[:, None, None]
    images = truth + rng.normal(0, 0.01, (n, R, C))
    images[::3, 4, 4] += 500.0                            # outliers the clip removes
    surface, error = masks.residual_background(images, np.ones((R, C), bool))
    np.testing.assert_allclose(surface, truth, atol=0.02)
    assert np.all(error < 0.01)


def test_isolated_stars_reach_ideal_noise_and_amplitudes(scene):
    source, truth = scene
    ratios, amps = [], []
    for k in range(len(truth["tmag"])):
        r, c = truth["rows"][k], truth["cols"][k] - 44
        if not (8 <= truth["tmag"][k] <= 13 and 9 <= r <= 51 and 9 <= c <= 51):
            continue
        d = np.hypot(truth["rows"] - truth["rows"][k], truth["cols"] - truth["cols"][k])
        dm = truth["tmag"] - truth["tmag"][k]
        if np.any((d > 0) & (d < 4) & (dm < 3)):
            continue  # not isolated
        phot = AperturePhotometry(k + 1, source, settings=_settings())
        assert phot.photometry() in (STATUS.OK, STATUS.WARNING)
        ratio, amp = measure(phot, truth, k)
        ratios.append(ratio)
        if np.isfinite(amp):
            amps.append(amp)
    assert len(ratios) >= 5
    assert np.median(ratios) <= 1.15
    assert abs(np.median(amps) - 1) <= 0.02


def test_light_curve_columns_and_headers(scene):
    source, truth = scene
    interior = (np.abs(truth["rows"] - 30) < 20) & (np.abs(truth["cols"] - 44 - 30) < 20)
    k = int(np.argmin(np.abs(truth["tmag"] - 10) + 100 * ~interior))
    phot = AperturePhotometry(k + 1, source, settings=_settings())
    assert phot.photometry() in (STATUS.OK, STATUS.WARNING)
    lc = phot.lightcurve
    assert np.all(np.isfinite(lc["flux"])) and np.all(np.asarray(lc["flux_err"]) > 0)
    cen = np.asarray(lc["pos_centroid"])  # 0-based CCD (column, row)
    assert np.median(cen[:, 0]) == pytest.approx(truth["cols"][k], abs=0.15)
    assert np.median(cen[:, 1]) == pytest.approx(truth["rows"][k], abs=0.15)
    # the reported error matches the scatter of a constant part of the light curve
    resid = np.asarray(lc["flux"]) / np.median(lc["flux"]) - truth["flux"][k] / np.median(
        truth["flux"][k])
    assert np.std(resid) * np.median(lc["flux"]) == pytest.approx(
        np.median(lc["flux_err"]), rel=0.35)
    for key in ("AP_CONT", "AP_NPIX", "AP_SNR", "AP_THRSH", "AP_SAT", "AP_CCORR"):
        assert key in phot.additional_headers
    assert phot.additional_headers["AP_NPIX"][0] == phot.final_phot_mask.sum()
    assert phot.details["contamination"] == phot.additional_headers["AP_CONT"][0]


def test_saturated_star_grows_stamp_and_covers_bleed():
    source, truth = make_scene(seed=11, shape=(120, 60), n=40, saturated=True)
    phot = AperturePhotometry(1, source, settings=_settings())
    status = phot.photometry()
    assert status in (STATUS.OK, STATUS.WARNING)
    assert phot.additional_headers["AP_SAT"][0]
    flags = source._cubes["pixel_flags"]
    saturated = np.any(flags & PixelQualityFlags.Saturated, axis=0)   # scene pixels
    labels, _ = ndimage.label(saturated, structure=np.ones((3, 3)))
    bleed = labels == labels[30, 30]   # the target's saturated core and bleed trail
    assert np.ptp(np.nonzero(bleed)[0]) > 30  # longer than the default stamp is tall
    r1, r2, c1, c2 = phot.stamp
    assert phot.details["stamp_resizes"] >= 1
    sub = bleed[r1:r2, c1 - 44:c2 - 44]
    assert sub.sum() == bleed.sum()  # the stamp grew to hold the whole bleed trail
    assert np.all(phot.final_phot_mask[sub])
    flux = np.asarray(phot.lightcurve["flux"])
    assert np.all(np.isfinite(flux))
    assert np.median(flux) == pytest.approx(mag2flux(5.5), rel=0.05)
    # fainter stars inside the mask are handed over as skip targets
    for sid in phot.details["skip_targets"]:
        assert truth["tmag"][sid - 1] > 5.5


# ---------------------------------------------------------------- real data: Pi Men
def test_pi_men_saturated_tesscut():
    from photometry.data.tpf import TPFSource
    source = TPFSource(PIMEN, starid=261136679, tmag=5.1)
    phot = AperturePhotometry(261136679, source)
    status = phot.photometry()
    # the bleed runs off this 6x6 cutout, which cannot grow: a warning, not an error
    assert status == STATUS.WARNING
    assert phot.additional_headers["AP_SAT"][0]
    mask = phot.final_phot_mask
    assert mask[1:, 2:4].all()          # the two saturated columns, down to the edge
    assert not mask[0, 2:4].any()       # row 0 is back to sky level
    assert 2 in phot.mask_result.bleed_columns and 3 in phot.mask_result.bleed_columns
    flux = np.asarray(phot.lightcurve["flux"])
    assert flux.shape == (50,) and np.all(np.isfinite(flux))
    assert np.all(np.isfinite(phot.lightcurve["flux_err"]))
    assert np.std(flux) / np.median(flux) < 0.01


# ---------------------------------------------------------------- simulated sector end to end
@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    pytest.importorskip("photometry.sim.simulate")
    pytest.importorskip("photometry.scheduler.prepare")
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "bench_aperture", Path(__file__).parents[1] / "benchmarks" / "bench_aperture.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    truth, cache = bench.simulate_and_prepare(tmp_path_factory.mktemp("apsim"), size=128,
                                              cadences=100, seed=5)
    return bench, truth, cache


def test_simulated_sector_isolated_stars(simulated):
    """128x128 px, 100 cadences: isolated 8 <= Tmag <= 13 stars against truth.h5."""
    bench, truth, cache = simulated
    results = bench.evaluate(truth, cache, radii=())
    assert len(results) >= 10
    assert all(r["status"] in (STATUS.OK, STATUS.WARNING) for r in results)
    ratios = [r["ratio"] for r in results]
    amps = [r["amp"] for r in results if np.isfinite(r["amp"])]
    assert np.median(ratios) <= 1.15, sorted(ratios)
    assert len(amps) >= 3
    assert abs(np.median(amps) - 1) <= 0.02, amps


# ------------------------------------------------- per-target cost (issue 15): same numbers
def test_median0_is_numpy_median_bit_for_bit():
    """``masks.median0`` (one partition) gives ``np.median(axis=0)``'s bits: odd and even
    lengths, ties, NaN columns, 1-D and 3-D input, infinities."""
    rng = np.random.default_rng(11)
    cases = [rng.normal(size=(1282, 37)), rng.normal(size=(1281, 5, 7)),
             np.abs(np.round(rng.normal(size=(100, 50)), 1)),          # many ties
             rng.normal(size=(1,)), rng.normal(size=(2, 3)), rng.normal(size=(7,))]
    with_nan = rng.normal(size=(64, 9))
    with_nan[5, 2] = np.nan
    with_nan[[1, 3], 7] = [np.inf, -np.inf]
    cases.append(with_nan)
    for values in cases:
        expected = np.median(values, axis=0)
        got = masks.median0(values)
        assert np.shape(got) == np.shape(expected)
        assert np.asarray(got).tobytes() == np.asarray(expected).tobytes()
    assert np.isnan(masks.median0(with_nan)[2]) and np.isfinite(masks.median0(with_nan)[7])
    signed = np.round(rng.normal(size=(100, 50)), 1)      # -0.0 and 0.0: equal, sign may not be
    np.testing.assert_array_equal(masks.median0(signed), np.median(signed, axis=0))


def _enclosed_flux_whole_stamp(prf, rows, cols, mask, origin, size):
    """The previous formula: the running sum over every pixel of each stamp, the pixels
    outside the mask zeroed (kept here as the reference the faster one must equal)."""
    values, r0, c0 = prf.stamps(np.asarray(rows, float), np.asarray(cols, float), size)
    nrows, ncols = mask.shape
    rr = (r0 - origin[0])[:, None] + np.arange(size)[None, :]
    cc = (c0 - origin[1])[:, None] + np.arange(size)[None, :]
    inside = mask[np.clip(rr, 0, nrows - 1)[:, :, None], np.clip(cc, 0, ncols - 1)[:, None, :]]
    inside &= ((rr >= 0) & (rr < nrows))[:, :, None] & ((cc >= 0) & (cc < ncols))[:, None, :]
    return np.cumsum(np.where(inside, values, 0.0).reshape(len(values), -1), axis=1)[:, -1]


def test_enclosed_flux_equals_whole_stamp_sum():
    """The aperture-loss flux (mask pixels only, each distinct position once) equals the sum
    over whole stamps bit for bit, for positions crossing pixel centres (several stamp
    origins), repeated positions, masks at the stamp edge, and matches the design matrix."""
    from photometry_aperture.aperture import _enclosed_flux
    prf = AnalyticPRF()
    rng = np.random.default_rng(3)
    shape, origin = (15, 13), (100, 200)
    for centre, mask in [((107.4, 206.45), None), ((100.6, 200.2), "edge")]:
        m = np.zeros(shape, dtype=bool)
        if mask is None:
            m[5:10, 4:9] = True
            m[7, 9] = True
        else:
            m[:3, :4] = True                                   # the stamp's corner
        rows = centre[0] + rng.normal(0, 0.3, 400)
        cols = centre[1] + rng.normal(0, 0.3, 400)
        rows[50:60], cols[50:60] = rows[0], cols[0]            # repeated positions
        size = int(prf.default_size())
        got = _enclosed_flux(prf, rows, cols, m, origin, size)
        ref = _enclosed_flux_whole_stamp(prf, rows, cols, m, origin, size)
        assert got.tobytes() == ref.tobytes()
        mat = prf.design_matrix(rows, cols, shape, origin=origin, size=size)
        np.testing.assert_allclose(got, np.asarray(mat[np.flatnonzero(m.ravel())].sum(axis=0))
                                   .ravel(), rtol=1e-12, atol=1e-15)
        assert len({(a, b) for a, b in zip(np.floor(rows + 0.5), np.floor(cols + 0.5))}) > 1


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_pixel_noise_on_demand_equals_the_full_medians():
    """``_PixelNoise`` computes the mask inputs' variance and background error only where
    asked, and gives there exactly the numbers of the medians over every pixel (NaN pixels
    and cadences, correlated background)."""
    from photometry_aperture.aperture import _PixelNoise, _nanmedian0
    rng = np.random.default_rng(8)
    n, shape = 301, (9, 8)
    errors = rng.uniform(1, 3, (n,) + shape)
    bkg = 0.5 * np.abs(rng.normal(size=n))[:, None, None] * rng.uniform(0, 1, shape)[None]
    errors[4, 2, 3] = np.nan
    errors[:, 0, 0] = np.nan
    good = rng.uniform(size=n) > 0.1
    full_var = _nanmedian0(errors[good] ** 2)
    full_bkg = _nanmedian0(bkg[good])
    full_bkg = np.where(np.isfinite(full_bkg), full_bkg, 0.0)
    full_var = np.clip(full_var - full_bkg ** 2, 0, None)
    noise = _PixelNoise(errors, bkg, good, correlated=True)
    first = np.zeros(shape, dtype=bool)
    first[2:5, 2:6] = True
    first[0, 0] = True
    var, b = noise(first)
    assert var[first].tobytes() == full_var[first].tobytes()
    assert b[first].tobytes() == full_bkg[first].tobytes()
    assert np.all(np.isnan(var[~first])) and np.all(b[~first] == 0)
    var, b = noise(np.ones(shape, dtype=bool))                   # the rest, on a second call
    np.testing.assert_array_equal(var, full_var)
    assert var.tobytes() == full_var.tobytes() and b.tobytes() == full_bkg.tobytes()


def test_find_mask_with_pixel_noise_equals_find_mask_with_arrays():
    """find_mask given ``pixel_noise`` (computed on demand) returns the same mask, S/N and
    threshold as with the full variance and background-error arrays."""
    rows, cols, tmags = [7.2, 4.0, 10.5], [7.1, 9.5, 3.2], [9.0, 11.0, 10.5]
    models, variance, fluxes = _scene(rows, cols, tmags)
    bkg_error = np.full(variance.shape, 0.3)
    asked = []

    def pixel_noise(selection):
        asked.append(int(selection.sum()))
        return np.where(selection, variance, np.nan), np.where(selection, bkg_error, 0.0)

    args = (models.sum(axis=0), None, models, np.array(rows), np.array(cols), fluxes, 0)
    lazy = masks.find_mask(*args, pixel_noise=pixel_noise)
    full = masks.find_mask(models.sum(axis=0), variance, *args[2:], bkg_error=bkg_error)
    assert np.array_equal(lazy.mask, full.mask) and lazy.snr == full.snr
    assert lazy.threshold == full.threshold and asked and max(asked) < variance.size


def _clipped_fits_every_cadence(A, y, iterations=3):
    """The previous clip loop: every cadence refitted on each pass until none changes."""
    keep = np.ones(y.shape, dtype=bool)
    for _ in range(iterations):
        coef = masks._masked_fits(A, y, keep)
        res = y - A @ coef
        sigma = 1.4826 * masks.median0(np.abs(res))
        new = np.abs(res) <= 3 * np.maximum(sigma, 1e-12)
        if np.array_equal(new, keep):
            break
        keep = new
    return coef, sigma


def test_clipped_fits_refit_only_changed_cadences_bit_for_bit():
    """Issue 15: refitting only the cadences whose clip mask changed gives the bits of
    refitting every cadence on every pass (outliers, a cadence clipped to too few pixels for
    a plane, 1 282 cadences as in a 30-min sector and a cadence count that is not a multiple
    of any BLAS block)."""
    rng = np.random.default_rng(21)
    for npix, n in ((60, 1282), (23, 997), (100, 5)):
        A = np.column_stack([np.ones(npix), rng.uniform(-.5, .5, npix),
                             rng.uniform(-.5, .5, npix)])
        y = rng.normal(size=(npix, n)) + A @ rng.normal(size=(3, n))
        y[rng.uniform(size=y.shape) < 0.02] += 50.0              # cosmic rays, faint stars
        y[:npix - 3, 1] = 1e4                                     # keeps 3 pixels only
        expected = _clipped_fits_every_cadence(A, y)
        got = masks._clipped_fits(A, y)
        assert all(g.tobytes() == e.tobytes() for g, e in zip(got, expected)), (npix, n)
    values = rng.normal(size=(1282, 41))
    expected = masks.median0(values)
    assert masks.median0(values.copy(), overwrite_input=True).tobytes() == expected.tobytes()


def test_distinct_rows():
    """The rows of each group are equal bit for bit, NaN rows stay apart."""
    values = np.array([[1.0, 2.0], [0.5, 2.0], [1.0, 2.0], [np.nan, 1.0], [np.nan, 1.0],
                       [1.0, np.nextafter(2.0, 3.0)]])
    first, inverse = masks._distinct_rows(values)
    np.testing.assert_array_equal(values[first][inverse], values)
    assert len(first) == 5 and inverse[0] == inverse[2] and inverse[3] != inverse[4]


def test_expected_noise_is_kept_until_the_result_changes(scene):
    """BasePhotometry keeps the expected noise between the metrics and the file, and
    computes it again when the mask or the flux changes."""
    source, truth = scene
    inside = (truth["rows"] > 9) & (truth["rows"] < 51) & (truth["cols"] > 53) \
        & (truth["cols"] < 95)
    k = int(np.argmin(np.where(inside, np.abs(truth["tmag"] - 10.0), np.inf)))
    phot = AperturePhotometry(k + 1, source, settings=_settings())
    assert phot.photometry() in (STATUS.OK, STATUS.WARNING)
    first = phot.expected_noise()
    assert phot.expected_noise() is first
    mask = phot.final_phot_mask.copy()
    mask[np.unravel_index(np.argmin(np.where(mask, np.inf, phot.sumimage)), mask.shape)] = True
    phot.final_phot_mask = mask
    again = phot.expected_noise()
    assert again is not first and again.relative() != first.relative()


def test_tune_malloc_applies_on_glibc():
    """``scheduler.target.tune_malloc`` (the allocator setting every worker applies, issue 15) sets
    all three glibc options; in a child process, as it is process-wide."""
    import platform
    import subprocess
    import sys
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("no glibc")
    code = ("from photometry.scheduler.target import tune_malloc; import numpy as np; "
            "ok = tune_malloc(); a = np.arange(3e6).reshape(1000, -1); b = a.sum(); del a; "
            "print(ok, b == 3e6 * (3e6 - 1) / 2)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "True"]
    from photometry.scheduler.target import tune_malloc
    with pytest.raises(ValueError):
        tune_malloc(trim_threshold=1 << 40)   # ctypes would mask it to 0: refused first
