"""Lookup tables of the linpsf shape model: exact pixel integration, curvature-corrected
interpolation, position derivatives and the scene-mode design matrices, against direct
evaluation of the splines (many-node Gauss-Legendre integration over each pixel)."""
import numpy as np
import pytest

from photometry.data.prf import AnalyticPRF, PRFModel
from photometry_linpsf import model as M
from photometry_linpsf.model import (BlurredBasis, PolarBasis, SplinePRF, design_matrices,
                                     fit_weights, lattice_sum, normalise)


class _Plain(PRFModel):
    """A PRF model that only has stamps (no table gradients)."""

    def __init__(self, prf):
        self.prf = prf

    def default_size(self, flux=None):
        return self.prf.default_size()

    def stamps(self, row, col, size):
        return self.prf.stamps(row, col, size)


def _integrated(basis, weights, dr, dc, nodes=16):
    """The model integrated over each pixel with nodes x nodes Gauss-Legendre points."""
    shape = np.shape(dr)
    dr, dc = np.ravel(dr), np.ravel(dc)
    u, w = np.polynomial.legendre.leggauss(nodes)
    out = 0.0
    for ur, wr in zip(0.5 * u, 0.5 * w):
        for uc, wc in zip(0.5 * u, 0.5 * w):
            out = out + wr * wc * (basis._design_point(dr + ur, dc + uc) @ weights)
    return np.clip(out, 0.0, None).reshape(shape)


@pytest.fixture(scope="module")
def model():
    """The circular default basis fitted (noiseless) to a pixel-integrated PSF."""
    basis = PolarBasis(8.0, 17, 0, 0.5, 6)
    prf = AnalyticPRF(sigma=0.85, wing_sigma=2.4, wing_fraction=0.2)
    rng = np.random.default_rng(0)
    pos = rng.uniform(30, 31, (200, 2))
    vals, r0, c0 = prf.stamps(pos[:, 0], pos[:, 1], 17)
    st = np.arange(17)
    dr = (r0[:, None] + st)[:, :, None] - pos[:, 0, None, None] + 0 * st[None, None, :]
    dc = (c0[:, None] + st)[:, None, :] - pos[:, 1, None, None] + 0 * st[None, :, None]
    w = fit_weights(basis, dr.ravel(), dc.ravel(), vals.ravel(), np.full(vals.size, 1e8))
    return basis, normalise(basis, w)


def test_tables_match_direct_pixel_integration(model):
    """Simpson-integrated tables at 0.05 px with curvature terms: within 2e-6 of the flux
    per pixel of the splines integrated directly (measured 9e-7; plain bilinear look-ups of
    a 0.025 px table were off by 3e-5); the design of every basis function as well."""
    basis, w = model
    rng = np.random.default_rng(1)
    dr, dc = rng.uniform(-9, 9, (2, 20000))
    exact = _integrated(basis, w, dr, dc)
    assert np.abs(basis.evaluate(w, dr, dc) - exact).max() < 2e-6
    prf = SplinePRF(basis, w, [0.0], [0.0])
    rows, cols = rng.uniform(30, 31, (2, 50))
    stamps, r0, c0 = prf.stamps(rows, cols, 17)
    st = np.arange(17)
    sdr = (r0[:, None] + st)[:, :, None] - rows[:, None, None] + 0 * st[None, None, :]
    sdc = (c0[:, None] + st)[:, None, :] - cols[:, None, None] + 0 * st[None, :, None]
    assert np.abs(stamps - _integrated(basis, w, sdr, sdc)).max() < 2e-6
    # the design (basis functions one by one) gives the same model
    assert np.abs(basis.design(dr, dc) @ w - exact).max() < 2e-6
    assert lattice_sum(basis, w)[0] == pytest.approx(1.0, abs=1e-12)


def test_normalise_rescales_the_cached_table(model):
    """normalise() moves the table of the unscaled weights to the scaled ones: identical to
    building it afresh."""
    basis, w = model
    raw = 1.7 * w
    scaled = normalise(basis, raw)
    assert np.allclose(scaled, w, rtol=1e-9)
    kept = basis.table(scaled).array.copy()
    M._TABLES.clear()
    assert np.allclose(basis.table(scaled).array, kept, rtol=0, atol=1e-15)


def test_stamp_gradients_and_scene_designs(model):
    """d stamp / d position from the table look-up equals central differences of the stamps,
    and design_matrices gives prf.design_matrix plus a constant column and the same
    derivatives as the finite-difference route of any other PRF model."""
    basis, w = model
    prf = SplinePRF(basis, w, [0.0], [0.0])
    rng = np.random.default_rng(2)
    rows, cols = rng.uniform(5, 25, (2, 30))
    rows, cols = np.round(rows) + 0.3, np.round(cols) - 0.2   # away from stamp re-centring
    vals, gr, gc, r0, c0 = prf.stamp_gradients(rows, cols, 17)
    h = 1e-5
    fd_r = (prf.stamps(rows + h, cols, 17)[0] - prf.stamps(rows - h, cols, 17)[0]) / (2 * h)
    fd_c = (prf.stamps(rows, cols + h, 17)[0] - prf.stamps(rows, cols - h, 17)[0]) / (2 * h)
    assert np.abs(gr - fd_r).max() < 1e-6 and np.abs(gc - fd_c).max() < 1e-6
    assert np.abs(gr).max() > 0.05
    A, Gr, Gc = design_matrices(prf, rows, cols, (30, 30), origin=(0, 0), constant=True)
    ref = prf.design_matrix(rows, cols, (30, 30)).toarray()
    assert np.allclose(A.toarray()[:, :-1], ref, rtol=0, atol=1e-15)
    assert np.all(A.toarray()[:, -1] == 1)

    # the same model without table gradients: central differences of 0.01 px, good to
    # ~h**2 / 6 of the third derivative (measured 5.6e-5)
    A2, Gr2, Gc2 = design_matrices(_Plain(prf), rows, cols, (30, 30))
    assert np.allclose(A2.toarray(), ref, rtol=0, atol=1e-15)
    assert np.abs(Gr.toarray() - Gr2.toarray()).max() < 1.5e-4
    assert np.abs(Gc.toarray() - Gc2.toarray()).max() < 1.5e-4


def test_smeared_table_is_the_mean_over_motion_samples(model):
    """The smeared model's table (strided slices of the unsmeared one per motion sample)
    equals the mean of the unsmeared model over the samples, within the 0.1 px table's
    interpolation error."""
    basis, w = model
    shifts = np.column_stack([np.linspace(-0.05, 0.05, 8), np.linspace(0.07, -0.07, 8)])
    blurred = BlurredBasis(basis, shifts)
    rng = np.random.default_rng(3)
    dr, dc = rng.uniform(-8, 8, (2, 5000))
    direct = blurred.evaluate(w, dr, dc)
    table = SplinePRF(blurred, w, [0.0], [0.0])._lookup((0, 0), dr, dc)
    assert np.abs(table - direct).max() < 1e-5
