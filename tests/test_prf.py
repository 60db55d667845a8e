"""PRF models: normalisation, sub-pixel behaviour and the real SPOC PRF files."""
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from photometry.hooks.errors import InputError
from photometry.data.prf import AnalyticPRF, SpocPRF, load_prf

PRF_DIR = Path(__file__).parent / "data" / "prf" / "cam1_ccd4"


def test_analytic_prf_sums_to_one_and_is_centred():
    prf = AnalyticPRF()
    values, r0, c0 = prf.stamps([100.3, 40.0], [60.7, 200.0], 25)
    assert values.sum(axis=(1, 2)) == pytest.approx([1.0, 1.0], abs=1e-6)
    # centroid of the stamp equals the star position
    rr = r0[:, None, None] + np.arange(25)[None, :, None]
    cc = c0[:, None, None] + np.arange(25)[None, None, :]
    assert (values * rr).sum(axis=(1, 2)) == pytest.approx([100.3, 40.0], abs=1e-4)
    assert (values * cc).sum(axis=(1, 2)) == pytest.approx([60.7, 200.0], abs=1e-4)
    # a centred star puts about a quarter of its light in one pixel, like the SPOC PRF
    assert 0.2 < values[1].max() < 0.3


def test_evaluate_adds_stars_and_clips_at_edges():
    prf = AnalyticPRF()
    image = prf.evaluate([10.0, 10.0, -30.0], [20.0, 25.2, 20.0], (40, 50), flux=[100.0, 50.0, 7.0],
                         size=19)
    assert image.sum() == pytest.approx(150.0, rel=1e-6)       # the third star is off the image
    # default stamps grow with flux: what a faint star loses beyond its stamp stays < 0.35 e-/s
    for flux in (150.0, 900.0, 5e4, 1e6):
        assert flux - prf.evaluate([20.0], [25.0], (40, 50), flux=flux).sum() < 0.35
    half = prf.evaluate([-0.5], [25.0], (40, 50))
    assert half.sum() == pytest.approx(0.5, abs=1e-3)           # a star on the image's edge
    a = prf.design_matrix([10.0, 12.5], [20.0, 22.5], (40, 50))
    assert a.shape == (2000, 2)
    direct = prf.evaluate([10.0, 12.5], [20.0, 22.5], (40, 50), flux=[3.0, 4.0], size=19)
    assert np.allclose(a @ np.array([3.0, 4.0]), direct.ravel())


def test_analytic_prf_rejects_bad_options():
    with pytest.raises(InputError, match="wing_fraction"):
        AnalyticPRF(wing_fraction=1.5)


@pytest.fixture(scope="module")
def spoc():
    return SpocPRF(PRF_DIR)


def test_spoc_prf_reproduces_grid_model(spoc):
    assert spoc.grid_rows.tolist() == [512.0, 1024.0]       # 0-based (CCD_RREF 513, 1025)
    assert spoc.grid_cols.tolist() == [556.0, 1068.0]
    path = PRF_DIR / "tess2018243163600-prf-1-4-row0513-col0557.fits.gz"
    data = fits.getdata(path)
    values, r0, c0 = spoc.stamps([512.0], [556.0], 13)
    assert (r0[0], c0[0]) == (506, 550)
    # integer pixel offsets sample every 9th super-sample around the centre sample (58, 58)
    expected = data[58 - 54:58 + 55:9, 58 - 54:58 + 55:9] * 81 / data.sum()
    assert np.allclose(values[0], expected, rtol=1e-12, atol=1e-15)
    assert values[0].sum() == pytest.approx(1.0, abs=2e-3)


def test_spoc_prf_interpolates_between_grid_positions(spoc):
    a = fits.getdata(PRF_DIR / "tess2018243163600-prf-1-4-row0513-col0557.fits.gz")
    b = fits.getdata(PRF_DIR / "tess2018243163600-prf-1-4-row1025-col0557.fits.gz")
    mid = spoc.model_at([768.0], [556.0])[0]
    assert np.allclose(mid, 0.5 * (a * 81 / a.sum() + b * 81 / b.sum()))
    # outside the grid the edge model is used, not extrapolated
    assert np.allclose(spoc.model_at([5.0], [556.0])[0], a * 81 / a.sum())
    # a sub-pixel shift moves the light the right way and keeps the total
    v0, _, _ = spoc.stamps([700.0], [800.0], 13)
    v1, _, _ = spoc.stamps([700.0], [800.3], 13)
    assert v1[0].sum() == pytest.approx(v0[0].sum(), abs=2e-3)
    cols = np.arange(13)
    assert (v1[0].sum(axis=0) * cols).sum() - (v0[0].sum(axis=0) * cols).sum() == \
        pytest.approx(0.3, abs=0.05)


def test_load_prf_resolves_camera_folder(tmp_path):
    assert isinstance(load_prf("analytic"), AnalyticPRF)
    prf = load_prf(PRF_DIR.parent, camera=1, ccd=4)
    assert isinstance(prf, SpocPRF) and (prf.camera, prf.ccd) == (1, 4)
    with pytest.raises(InputError, match="no SPOC PRF files"):
        load_prf(tmp_path)
    with pytest.raises(InputError, match="analytic"):
        load_prf(tmp_path / "missing")
