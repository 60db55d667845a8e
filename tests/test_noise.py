"""CCD noise model against the real SPOC FFI's own uncertainty image and header."""
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from photometry.data.noise import CCDNoise, output_of_column
from photometry.data.prf import AnalyticPRF

REAL = Path(__file__).parent / "data" / "tess2018206192942-s0001-1-4-0120-s_ffic.fits"


def test_real_ffi_header_values():
    with fits.open(REAL) as hdul:
        header = dict(hdul[0].header) | dict(hdul[1].header)
    noise = CCDNoise.from_header(header, 1800.0)
    assert noise.defaulted == ()
    assert noise.read_noise == (10.057999610900879, 7.464599609375, 7.307999610900879,
                                9.168599128723145)
    assert noise.n_readouts == 720
    assert abs(noise.exposure - 0.016499994018 * 86400) < 1e-9
    assert noise.output_starts == (44, 556, 1068, 1580)
    assert list(output_of_column([0, 44, 555, 556, 1579, 1580, 2135])) == [0, 0, 0, 1, 2, 3, 3]
    assert CCDNoise.from_attrs(noise.to_attrs()) == noise


def test_model_matches_spoc_uncertainty_within_10_percent():
    """SPOC's uncert image (where it covers the science pixels: CCD columns 44-127, output A)."""
    with fits.open(REAL) as hdul:
        header = dict(hdul[0].header) | dict(hdul[1].header)
        image = hdul[1].data[:, 44:128].astype(float)
        uncert = hdul[2].data[:, 44:128].astype(float)
    noise = CCDNoise.from_header(header, 1800.0)
    model = np.sqrt(noise.pixel_variance(image, np.arange(44, 128)[None, :]))
    ratio = uncert / model
    assert 1.0 < np.nanmedian(ratio) < 1.10      # measured 1.035 (1.026-1.045): SPOC adds flat-field terms
    assert np.nanpercentile(ratio, 99) < 1.12


def test_defaults_without_keywords():
    noise = CCDNoise.from_header({}, 1800.0)
    assert set(noise.defaulted) == {"READNOIA", "READNOIB", "READNOIC", "READNOID",
                                    "NREADOUT", "EXPOSURE"}
    assert noise.n_readouts == 720 and abs(noise.exposure - 1425.6) < 1e-9
    fast = CCDNoise.from_header({}, 20.0)        # 20-s data: no cosmic-ray mitigation
    assert fast.n_readouts == 10 and abs(fast.exposure - 19.8) < 1e-9
    # read-noise-only pixel: sqrt(720) * 10 e- / 1425.6 s
    assert abs(np.sqrt(noise.pixel_variance(np.array([-5.0]), 100))[0]
               - np.sqrt(720) * 10 / 1425.6) < 1e-12


def test_aperture_noise_by_source():
    """Photons of star and sky and the read noise of each pixel's output, added over the mask."""
    from photometry.data.noise import ApertureNoise
    noise = CCDNoise.from_header({"READNOIA": 10.0, "READNOIB": 5.0, "NREADOUT": 720,
                                  "EXPOSURE": 1425.6 / 86400}, 1800.0)
    star = np.array([[100.0, 1000.0], [-3.0, 200.0]])
    sky = np.full((2, 2), 50.0)
    mask = np.array([[True, True], [True, False]])
    columns = np.array([554, 556])                      # output A | output B
    ap = ApertureNoise.of_aperture(noise, star, sky, mask, columns, 1100.0, 1800.0)
    t = 1425.6
    assert ap.source == pytest.approx(np.sqrt(1100.0 / t))      # negative pixel: no photons
    assert ap.sky == pytest.approx(np.sqrt(150.0 / t))
    rn2 = 720 * (2 * 10.0 ** 2 + 5.0 ** 2) / t ** 2
    assert ap.read == pytest.approx(np.sqrt(rn2))
    assert ap.n_pixels == 3
    total = np.sqrt(1250.0 / t + rn2)
    assert ap.relative() == pytest.approx(1e6 * total / 1100.0)
    assert ap.cdpp(1.0) == pytest.approx(1e6 * total / 1100.0 / np.sqrt(2))   # 2 cadences
    assert ap.cdpp(0.5) == pytest.approx(ap.relative())


def test_measured_cdpp_white_noise_and_lightkurve():
    """White noise of sigma gives sigma / sqrt(n); lightkurve's estimate_cdpp with the same
    filter length agrees."""
    import lightkurve as lk
    from photometry.data.noise import measured_cdpp
    rng = np.random.default_rng(1)
    t = 1325.3 + np.arange(1200) / 48.0
    sigma = 1e-3
    f = 1e4 * (1 + sigma * rng.standard_normal(t.size) + 2e-3 * np.sin(t / 3.0))
    ours = measured_cdpp(t, f, 1800.0, hours=1.0)
    assert ours == pytest.approx(1e6 * sigma / np.sqrt(2), rel=0.06)
    theirs = lk.LightCurve(time=t, flux=f).estimate_cdpp(transit_duration=2,
                                                         savgol_window=97).value
    assert ours == pytest.approx(theirs, rel=0.03)
    # a gap splits the filter; too few points give NaN
    assert np.isfinite(measured_cdpp(np.r_[t[:500], t[600:] + 1], np.r_[f[:500], f[600:]],
                                     1800.0))
    assert np.isnan(measured_cdpp(t[:4], f[:4], 1800.0))


def test_prf_fit_weights_are_the_least_squares_estimator():
    """The weights reproduce a weighted least-squares fit of the PRF (+ constant) exactly:
    unit response to the PRF, none to a constant, variance 1 / sum(P^2 / var) without it."""
    from photometry.data.noise import prf_fit_weights
    rng = np.random.default_rng(4)
    prf = AnalyticPRF().evaluate(np.array([5.3]), np.array([6.8]), (11, 13), flux=[1.0])
    var = rng.uniform(0.5, 2.0, prf.shape)
    var[0, 0] = np.nan                                   # unusable pixel: weight 0
    data = 1234.0 * prf + 17.0 + rng.normal(size=prf.shape) * np.sqrt(np.nan_to_num(var))
    ok = np.isfinite(var)
    A = np.column_stack([prf[ok], np.ones(ok.sum())]) / np.sqrt(var[ok])[:, None]
    fit = np.linalg.lstsq(A, data[ok] / np.sqrt(var[ok]), rcond=None)[0][0]
    w = prf_fit_weights(prf, var)
    assert w[0, 0] == 0
    assert np.sum(w * np.where(ok, data, 0)) == pytest.approx(fit, rel=1e-10)
    assert np.sum(w * prf) == pytest.approx(1.0) and abs(np.sum(w)) < 1e-9
    alone = prf_fit_weights(prf, var, background=False)
    assert np.nansum(alone ** 2 * var) == pytest.approx(1.0 / np.sum(prf[ok] ** 2 / var[ok]))
    assert np.nansum(w ** 2 * var) > np.nansum(alone ** 2 * var)     # the constant's share


def test_expected_noise_follows_the_method():
    """Measured / expected 1-h CDPP of constant, isolated stars (8-13 mag) near 1 for both a
    PRF fit (linpsf, PRF-weighted expectation) and an aperture sum. Scene: test_linpsf's
    analytic PRF wider than the default, drifting, the shape model from the stage; not
    ``tessphot simulate``. Measured (200 cadences, 25 stars): linpsf 0.98 (0.90 with the
    aperture formula: 0.66-0.83 at 11.5-13 mag), aperture 1.01; linpsf's expectation is
    1.01-1.03 x the scene's ideal (optimally weighted true PRF) noise."""
    from test_linpsf import EXPOSURE, _settings, make_crowded, shape_group
    from photometry_aperture.aperture import AperturePhotometry
    from photometry_linpsf.linpsf import LinPSFPhotometry
    source, truth = make_crowded(seed=5, shape=(112, 112), n=200, nstar=160)
    source.models["linpsf_shape"] = shape_group(source, truth, _settings()["linpsf"])[0]
    source.noise = CCDNoise((10.0,) * 4, 900, EXPOSURE)     # the scene's READ_VAR, EXPOSURE
    r, c, m = truth["rows"], truth["cols"] - 44, truth["tmag"]
    inside = (r > 3) & (r < 109) & (c > 3) & (c < 109)
    stars = [k for k in np.flatnonzero((truth["amp"] == 0) & (m >= 8) & (m <= 13) & inside)
             if not np.any((np.hypot(r - r[k], c - c[k]) < 5) & (m < m[k] + 3)
                           & (np.arange(m.size) != k))]
    assert len(stars) >= 20
    ratios = {}
    for cls in (AperturePhotometry, LinPSFPhotometry):
        ratio, vs_ideal = [], []
        for k in stars:
            phot = cls(k + 1, source, settings=_settings())
            phot.photometry()
            ratio.append(phot.details["cdpp_sap"] / phot.details["cdpp_expected"])
            ideal = 1e6 * truth["ideal_noise"][k] / np.median(truth["flux"][k]) / np.sqrt(2)
            vs_ideal.append(phot.details["cdpp_expected"] / ideal)
        ratios[cls.name] = np.median(ratio)
        assert np.min(vs_ideal) > 0.97          # never below the photon limit
        if cls is LinPSFPhotometry:
            assert np.max(vs_ideal) < 1.1       # the PRF fit's bound, not its aperture's sum
    assert 0.85 < ratios["linpsf"] < 1.2, ratios
    assert 0.9 < ratios["aperture"] < 1.15, ratios
