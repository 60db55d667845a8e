"""One-dimensional bases whose tensor products make the backdrop model.

The model of one frame is ``B(r, c) = sum_{(a, b) in pairs} w_ab R_a(r) C_b(c) + s(c)``: the
row basis ``R`` and column basis ``C`` each hold Legendre polynomials (large scales) followed
by quadratic B-splines on a uniform knot grid (intermediate scales), and ``s`` is one offset
per column (straps). Keeping the bases separable is what makes every product cheap: a frame
is evaluated as ``R @ W @ C.T`` and never as a dense (pixels x terms) matrix.
"""
import numpy as np
from numpy.polynomial import legendre
from scipy.interpolate import BSpline

__all__ = ["Axis", "tensor_pairs"]

SPLINE_DEGREE = 2


class Axis:
    """Basis functions along one axis of the science region (rows or columns).

    Parameters
    ----------
    n : int
        Number of pixels along the axis; pixel ``i`` covers ``[i - 0.5, i + 0.5]``.
    poly_degree : int
        Highest Legendre degree (the polynomial spans the whole axis).
    knot_spacing : float
        Target spacing of the spline knots in pixels; the knots are uniform and the number of
        intervals is ``ceil(n / knot_spacing)`` so they end exactly on the axis edges.
    """

    def __init__(self, n, poly_degree, knot_spacing):
        self.n = int(n)
        self.poly_degree = int(poly_degree)
        n_int = max(1, int(np.ceil(self.n / float(knot_spacing))))
        self.knots = np.linspace(-0.5, self.n - 0.5, n_int + 1)
        k = SPLINE_DEGREE
        self._t = np.r_[[self.knots[0]] * k, self.knots, [self.knots[-1]] * k]
        self.n_spline = len(self._t) - k - 1
        self.size = self.poly_degree + 1 + self.n_spline

    @classmethod
    def from_attrs(cls, n, poly_degree, knots):
        """Rebuild an axis exactly as stored (knots as written, not recomputed)."""
        self = cls.__new__(cls)
        self.n = int(n)
        self.poly_degree = int(poly_degree)
        self.knots = np.asarray(knots, dtype=float)
        k = SPLINE_DEGREE
        self._t = np.r_[[self.knots[0]] * k, self.knots, [self.knots[-1]] * k]
        self.n_spline = len(self._t) - k - 1
        self.size = self.poly_degree + 1 + self.n_spline
        return self

    def basis(self, x):
        """(len(x), size) basis values at pixel positions ``x`` (0-based, may be fractional)."""
        x = np.clip(np.asarray(x, dtype=float), self.knots[0], self.knots[-1])
        u = 2.0 * (x - self.knots[0]) / (self.knots[-1] - self.knots[0]) - 1.0
        poly = legendre.legvander(u, self.poly_degree)
        spl = BSpline.design_matrix(x, self._t, SPLINE_DEGREE).toarray()
        return np.hstack([poly, spl])

    def binned(self, bin_size):
        """Mean and slope of the basis within bins of ``bin_size`` pixels.

        Returns ``(mean, slope, centre)``: over the pixels ``r`` of bin ``i`` the basis is
        ``mean[i] + (r - centre[i]) * slope[i]`` to first order. The slope lets a binned fit
        stay exact when a star mask removes pixels unevenly from a bin (their mean row moves
        off the bin centre, and in a steep gradient that shift would otherwise bias the fit).
        """
        n_bins = -(-self.n // bin_size)
        full = self.basis(np.arange(self.n))
        mean = np.empty((n_bins, self.size))
        slope = np.zeros((n_bins, self.size))
        centre = np.empty(n_bins)
        for i in range(n_bins):
            r = np.arange(i * bin_size, min(self.n, (i + 1) * bin_size))
            vals = full[r]
            centre[i] = r.mean()
            mean[i] = vals.mean(axis=0)
            if len(r) > 1:
                d = r - centre[i]
                slope[i] = d @ (vals - mean[i]) / (d @ d)
        return mean, slope, centre


def tensor_pairs(rows, cols):
    """(n_terms, 2) index pairs into (row basis, column basis) used by the model.

    Polynomial terms of total degree <= the polynomial degree, then every spline x spline
    term. Polynomial x spline cross terms are left out: they would duplicate the spline.
    """
    d = min(rows.poly_degree, cols.poly_degree)
    pairs = [(i, j) for i in range(d + 1) for j in range(d + 1 - i)]
    r0, c0 = rows.poly_degree + 1, cols.poly_degree + 1
    pairs += [(r0 + k, c0 + m) for k in range(rows.n_spline) for m in range(cols.n_spline)]
    return np.array(pairs, dtype=np.int32)
