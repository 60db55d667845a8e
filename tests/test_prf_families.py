"""PRF families that are not the simulator's default (issue 16): moments and ellipticity of the
analytic families, their field and focus variation, the SPOC PRF interpolation (exact at the
grid positions, continuous between them), and the per-target crowding of the method policy."""
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from photometry.core.crowding import prf_autocorrelation, target_crowding
from photometry.data.prf import AnalyticPRF, FieldPRF, SpocPRF, load_prf
from photometry.sim.simulate import focused_prf

SPOC_DIR = Path(__file__).parent / "data" / "prf" / "cam4_ccd2"


def _moments(prf, row, col, size=25):
    """(Mrr, Mcc, Mrc, total) of a star's stamp about its position (pixel-integrated PRF)."""
    values, r0, c0 = prf.stamps([row], [col], size)
    v = values[0]
    rr, cc = np.mgrid[r0[0]:r0[0] + size, c0[0]:c0[0] + size]
    dr, dc = rr - row, cc - col
    t = v.sum()
    return (np.sum(v * dr * dr) / t, np.sum(v * dc * dc) / t, np.sum(v * dr * dc) / t, t)


def _ellipticity(m):
    mrr, mcc, mrc = m[:3]
    return np.hypot(mcc - mrr, 2 * mrc) / (mcc + mrr), 0.5 * np.arctan2(2 * mrc, mcc - mrr)


def test_elliptical_family_moments_follow_the_definition():
    """Gaussian core only: pixel-integrated moments = sigma^2 (1 -+ e cos 2a, e sin 2a) + 1/12."""
    sigma, e, angle = 0.9, 0.3, 25.0
    prf = FieldPRF("elliptical", sigma=sigma, wing_fraction=0.0, ellipticity=e, angle=angle,
                   axis=(1000.0, 1000.0), size=25)
    a = np.deg2rad(angle)
    mrr, mcc, mrc, total = _moments(prf, 1000.3, 1000.6)
    assert total == pytest.approx(1.0, abs=1e-5)
    assert mrr == pytest.approx(sigma ** 2 * (1 - e * np.cos(2 * a)) + 1 / 12, abs=2e-3)
    assert mcc == pytest.approx(sigma ** 2 * (1 + e * np.cos(2 * a)) + 1 / 12, abs=2e-3)
    assert mrc == pytest.approx(sigma ** 2 * e * np.sin(2 * a), abs=2e-3)
    # the pixel-integrated PRF is rounder than the PSF by the pixel's own 1/12 px^2
    ell, theta = _ellipticity((mrr - 1 / 12, mcc - 1 / 12, mrc))
    assert ell == pytest.approx(e, abs=0.005) and np.rad2deg(theta) == pytest.approx(angle, abs=1)


def test_round_elliptical_family_is_the_analytic_prf_and_moffat_is_elliptical():
    ours = FieldPRF("elliptical", size=25).stamps([500.2], [700.7], 19)[0]
    assert np.abs(ours - AnalyticPRF().stamps([500.2], [700.7], 19)[0]).max() < 2e-6
    moffat = FieldPRF("moffat", fwhm=1.7, beta=3.0, ellipticity=0.2, angle=-40,
                      axis=(600.0, 600.0), size=31)
    m = _moments(moffat, 600.0, 600.0, 31)
    assert m[3] > 0.99                              # power-law wings: ~0.6 % beyond 15 px
    ell, theta = _ellipticity((m[0] - 1 / 12, m[1] - 1 / 12, m[2]))
    assert ell == pytest.approx(0.2, abs=0.02) and np.rad2deg(theta) == pytest.approx(-40, abs=2)


def test_field_variation_and_focus():
    """Width grows with the distance from the optical axis; ellipticity turns radial; the
    focused PRF's moments scale with the width squared."""
    prf = FieldPRF("elliptical", sigma=0.8, wing_fraction=0.0, field_width=0.2,
                   field_ellipticity=0.25, axis=(2047.0, 2091.0), size=25)
    at_axis = _moments(prf, 2047.0 - 0.3, 2091.0 - 0.4)
    corner = _moments(prf, 0.3, 44.2)
    w_axis = at_axis[0] + at_axis[1] - 1 / 6
    w_corner = corner[0] + corner[1] - 1 / 6
    assert w_corner / w_axis == pytest.approx(1.2 ** 2, rel=0.03)   # grid interpolation
    assert _ellipticity(at_axis)[0] < 0.01
    ell, theta = _ellipticity((corner[0] - 1 / 12, corner[1] - 1 / 12, corner[2]))
    assert ell == pytest.approx(0.25, abs=0.02)
    assert abs(abs(np.rad2deg(theta)) - 45) < 3     # radial: along the diagonal to the axis
    wide = focused_prf(prf, 1.03)
    m = _moments(wide, 1000.2, 1000.1)
    m0 = _moments(prf, 1000.2, 1000.1)
    assert (m[0] + m[1] - 1 / 6) / (m0[0] + m0[1] - 1 / 6) == pytest.approx(1.03 ** 2, rel=0.01)


def test_spoc_prf_exact_at_grid_positions_and_continuous_between():
    prf = SpocPRF(SPOC_DIR)
    path = sorted(SPOC_DIR.glob("*row0513-col2092*"))[0]        # the grid's far corner
    with fits.open(path) as h:
        data, hdr = h[0].data.astype(float), h[0].header
    row, col = hdr["CCD_RREF"] - 1.0, hdr["CCD_CREF"] - 1.0
    ns = int(hdr["NSAMP"])
    cr, cc = int(hdr["CRPIX2P"]) - 1, int(hdr["CRPIX1P"]) - 1
    # a star at the grid position, moved by whole samples (k/9 px) away from the grid (the
    # nearest model alone): the file's samples, normalised
    for fr, fc in ((0, 0), (2, 3), (4, 1)):
        values, r0, c0 = prf.stamps([row + fr / ns], [col + fc / ns], 11)
        ii = cr + (np.arange(11) + r0[0] - row) * ns - fr
        jj = cc + (np.arange(11) + c0[0] - col) * ns - fc
        expect = data[np.ix_(ii.astype(int), jj.astype(int))] * ns ** 2 / data.sum()
        assert np.abs(values[0] - expect).max() < 1e-12
    # continuous in position: across a sample boundary, between grid positions, and across
    # a stamp re-centring (a 1e-6 px step changes no pixel by more than ~1e-6)
    for r, c in ((row - 0.5 / ns, col - 1.5 / ns), (256.0, 1835.0), (100.5, 2000.0)):
        a, ra, ca = prf.stamps([r - 5e-7], [c - 5e-7], 15)
        b, rb, cb = prf.stamps([r + 5e-7], [c + 5e-7], 15)
        big = np.zeros((2, 20, 20))
        big[0, ra[0] - rb[0] + 2:ra[0] - rb[0] + 17, ca[0] - cb[0] + 2:ca[0] - cb[0] + 17] = a[0]
        big[1, 2:17, 2:17] = b[0]
        assert np.abs(big[0] - big[1]).max() < 2e-6
    # linear in CCD position between the grid rows (0 and 512): the midpoint is the mean
    mid = prf.stamps([256.0], [1579.0], 11)[0]
    ends = [prf.stamps([x], [1579.0], 11)[0] for x in (0.0, 512.0)]
    assert np.abs(mid - 0.5 * (ends[0] + ends[1])).max() < 1e-12
    assert prf.stamps([256.0], [1700.3], 15)[0].sum() == pytest.approx(1.0, abs=1e-6)
    assert isinstance(load_prf(str(SPOC_DIR.parent), camera=4, ccd=2), SpocPRF)


def test_crowding_from_catalog_and_prf():
    """0 for an isolated star, 1/2 for an equal star on top of it, falling with distance as
    the PRF's autocorrelation; fainter neighbours count by their flux."""
    prf = AnalyticPRF()
    d, A = prf_autocorrelation(prf, 500.0, 500.0)
    assert np.all(np.diff(A) <= 1e-12) and A[0] > 0
    rows = np.array([100.0, 100.0, 200.0, 200.0 + 1.5, 300.0, 300.0, 400.0])
    cols = np.array([100.0, 100.0, 200.0, 200.0, 300.0, 303.0, 400.0])
    tmag = np.array([10.0, 10.0, 10.0, 10.0, 10.0, 12.5, 10.0])
    c = target_crowding(rows, cols, tmag, [0, 2, 4, 6], prf)
    assert c[0] == pytest.approx(0.5, abs=1e-9)
    assert c[3] == 0.0
    expect = np.interp(1.5, d, A) / (A[0] + np.interp(1.5, d, A))
    assert c[1] == pytest.approx(expect, rel=1e-6) and 0.1 < c[1] < 0.5
    assert 0 < c[2] < 0.02 * c[1]


def test_simulate_with_a_family_and_its_focus_change(tmp_path):
    """``tessphot simulate --prf moffat`` (+ [simulate] prf_* settings) writes that PRF and
    changes its width with --focus-change; the truth file names the model."""
    import h5py

    from photometry.cli import main as cli_main
    out = tmp_path / "sim"
    assert cli_main(["simulate", str(out), "--size", "40", "40", "--cadences", "2", "--seed",
                     "4", "--prf", "moffat", "--focus-change", "0.2", "--no-progress",
                     "--set", "simulate.bright_star=false", "--set",
                     "simulate.prf_ellipticity=0.2"]) == 0
    with h5py.File(out / "truth.h5") as h5:
        assert h5["prf"].attrs["name"] == "moffat"
        assert "ellipticity=0.2" in h5["prf"].attrs["model"]
        assert np.allclose(h5["focus_scale"][()], [0.9, 1.1])


def test_todo_stores_crowding_and_the_policy_routes_crowded_targets(tmp_path):
    """``tessphot todo`` writes each task's crowding (catalog + PRF, fainter stars included);
    the built-in policy then sends the crowded ones to ``policy_crowded_method``."""
    from test_todo import make_fake_ccd

    from photometry.hooks.settings import load_settings
    from photometry.data.taskstore import TaskStore
    from photometry.scheduler.todo import make_todo
    from photometry_aperture import choose_method
    stars = [(1, 10.0, 20.0, 70.0), (2, 10.5, 21.5, 70.0),   # a 1.5 px pair
             (3, 11.0, 40.0, 90.0),                          # isolated
             (4, 12.0, 50.0, 60.0), (5, 16.5, 50.0, 62.0)]   # a faint (not a task) neighbour
    make_fake_ccd(tmp_path, stars=stars)
    path, n = make_todo(tmp_path, faint_limit=15)
    assert n == 4
    with TaskStore(path) as store:
        tasks = {r["starid"]: r for r in store.db.query("SELECT * FROM todolist")}
    s = np.array(stars, dtype=float)
    expect = target_crowding(s[:, 2], s[:, 3], s[:, 1], [0, 1, 2, 3], load_prf("analytic"))
    got = [tasks[i]["crowding"] for i in (1, 2, 3, 4)]
    assert np.allclose(got, expect, rtol=1e-9)
    assert got[2] == 0.0 and 0.2 < got[0] < got[1] < 0.5 and 0 < got[3] < 0.01
    settings = load_settings(assignments=["aperture.policy_crowded_method=linpsf",
                                          "aperture.policy_crowding_limit=0.2"])   # docs/linpsf.md
    assert [choose_method(tasks[i], settings) for i in (1, 2, 3, 4)] == \
        ["linpsf", "linpsf", "aperture", "aperture"]
    assert choose_method(tasks[1], load_settings()) == "aperture"   # the default: rule off


def test_smooth_prf_removes_the_spoc_sample_noise_and_keeps_the_flux():
    """The SPOC files' super-samples are rough (fourth differences of white noise of ~5e-4 of
    the flux per sample, 100x the analytic families'); ``smooth_prf`` makes them as smooth
    as the families while every stamp keeps its flux (docs/linpsf.md). (Its lattice
    centroid is the raw one's averaged over the Gaussian's sub-pixel phases: it varies with
    the phase by up to 0.1 px in these files, so it moves by up to 0.02 px.)"""
    from photometry.sim.foreign_scene import sample_roughness, smooth_prf
    spoc = SpocPRF(SPOC_DIR)
    smooth = smooth_prf(spoc, 2.0 / 9.0)
    family = FieldPRF("moffat", fwhm=1.7, beta=2.6, ellipticity=0.12)
    rough = sample_roughness(spoc)
    assert rough > 1e-4
    assert sample_roughness(smooth) < 0.05 * rough
    assert sample_roughness(smooth) < 5 * sample_roughness(family)
    for row, col in ((300.2, 1700.4), (1000.37, 100.81), (1900.0, 2000.45)):
        assert _moments(smooth, row, col)[3] == pytest.approx(_moments(spoc, row, col)[3],
                                                              abs=1e-6)
