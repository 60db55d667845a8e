"""The linear PRF shape model: polar B-splines in pixel units, fitted in linear space.

Why this form (``/work/shared/reference/algorithms.md`` §1 and §5):

* **Pixel units.** Offsets ``(drow, dcol)`` from the star to the pixel centre, in pixels, so
  no Kepler-tuned arcsecond constants and no cos(dec) problem.
* **Effective PRF.** The model value at an offset is the fraction of the star's flux landing
  in a pixel whose centre is at that offset (pixel-integrated, like the SPOC PRF samples), so
  a stamp is just the model evaluated at the stamp's pixel centres. With ``n_sub >= 2`` the
  splines describe the PSF and every value is integrated over the pixel: a circular PSF
  integrated over square pixels is not circular, and the circular spline on pixel centres
  (``n_sub = 1``) left a phase-dependent error of ~1e-3 of the flux per pixel.
* **Tables.** Models and basis functions are integrated once onto 0.05 px grids (Simpson's
  rule, :func:`_pixel_mean`) and interpolated with curvature terms (:func:`_interp`, within
  1e-6 of the flux per pixel): stamps, designs, position derivatives and smeared models are
  then look-ups, 5x faster for a shape fit plus scene fit than the previous Gauss-Legendre
  evaluations and plain bilinear tables, and more accurate.
* **Linear space.** ``P(dr, dc) = sum_k w_k B_k(r, phi)``. Fitting ``pixel / flux`` in linear
  space makes the normalisation a plain rescaling of the weights (sum over the pixel lattice
  = 1); psfmachine fits ``log10`` and "normalises" by multiplying the log-weights, which
  changes the shape and left its fluxes off by factors of 0.4-2 (§1.6). Negative model
  values in the far wings are clipped at evaluation.
* **Basis.** Even cubic B-splines in r (uniform knots mirrored about 0, so no cusp at the
  centre; psfmachine's sqrt(r) spacing put knots at 0.05 px that TESS pixels cannot
  constrain), times periodic cubic B-splines in phi; radial functions reaching inside
  ``core_radius`` carry no phi dependence (phi is singular at r = 0). The two outermost
  radial functions are dropped so the model and its slope reach 0 at ``rmax``.
* **Position dependence.** An optional ``grid x grid`` set of models over the CCD; a star
  gets the bilinear interpolation of the surrounding cell models (interpolating linear
  weights interpolates the PRFs themselves).
"""
import hashlib
from collections import namedtuple

import numpy as np
from scipy import sparse
from scipy.interpolate import BSpline

from photometry import PRFModel

__all__ = ["PolarBasis", "CartesianBasis", "HybridBasis", "make_basis", "BlurredBasis", "SplinePRF", "fit_weights", "lattice_sum",
           "normalise", "design_matrices", "single_thread_blas"]

def single_thread_blas():
    """Context limiting BLAS to one thread (no-op without threadpoolctl).

    Why: the linpsf solves are small (a few hundred unknowns) and many; on a shared 2-core
    machine OpenBLAS's threads fought the other processes: a 171 x 171 Cholesky took 130 ms
    instead of 0.5 ms, and fit_scene 4.8 s instead of 0.8 s, the shape fit 6.8 s vs 4.3 s.
    """
    global _CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:                      # pragma: no cover
        import contextlib
        return contextlib.nullcontext()
    if _CONTROLLER is None:
        # one controller per process: building it scans the loaded libraries (~5 ms a call)
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


_CONTROLLER = None

#: lookup tables of models (keyed by weights) and of basis functions, shared by every target
#: of a worker
_TABLES = {}

#: A function sampled every ``1 / oversample`` px: ``array`` (n * n, 3 * channels) holds per
#: node the values, then half their second differences along rows and along columns (the
#: curvature terms of the interpolation); for one channel it is (3, n * n) (contiguous
#: planes: the look-ups then work on 1-D arrays, 10x faster than on (M, 3) ones; a plain
#: table without curvature terms is (1, n * n)); ``folded``: a quadrant (even in both
#: offsets), nodes at ``i / oversample``, else nodes at ``-extent + i / oversample``.
_Table = namedtuple("_Table", "array n channels oversample extent folded")


def _cache(key, build, limit=16):
    """``_TABLES[key]``, built on first use; the least recently used entry goes beyond
    ``limit`` (a shape fit makes ~12 tables; the basis tables it uses in every round must
    not be the ones dropped)."""
    if key in _TABLES:
        _TABLES[key] = _TABLES.pop(key)          # most recently used last
    else:
        value = build()
        if len(_TABLES) >= limit:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = value
    return _TABLES[key]


def _weights_key(weights):
    return hashlib.sha1(np.ascontiguousarray(weights, dtype=float).tobytes()).hexdigest()


_SIMPSON = {}


def _pixel_mean(f, oversample):
    """Mean over one pixel along axes 0 and 1 of samples spaced ``1 / oversample`` px.

    ``f`` (S, S, ...) with S = n + oversample; output (n, n, ...), node i = the pixel whose
    edges are samples i and i + oversample. Composite Simpson rule (error O(step**4): a
    fitted PSF integrates to < 1e-8 of the flux per pixel at 0.05 px steps, where
    ``n_sub = 6`` Gauss-Legendre nodes per axis gave ~1e-6), applied as a sparse band
    matrix along each axis: O(table size) instead of n_sub**2 profile interpolations per
    node (the table builds were a third of a scene fit).
    """
    S, m = f.shape[0], int(oversample)
    n = S - m
    key = (n, m)
    if key not in _SIMPSON:
        w = np.full(m + 1, 2.0)
        w[1::2] = 4.0
        w[[0, -1]] = 1.0
        rows = np.repeat(np.arange(n), m + 1)
        cols = (np.arange(n)[:, None] + np.arange(m + 1)[None, :]).ravel()
        _SIMPSON[key] = sparse.csr_matrix((np.tile(w / (3.0 * m), n), (rows, cols)),
                                          shape=(n, S))
    M = _SIMPSON[key]
    rest = f.shape[2:]
    g = (M @ f.reshape(S, -1)).reshape((n, S) + rest)
    g = np.ascontiguousarray(np.swapaxes(g, 0, 1))
    g = (M @ g.reshape(S, -1)).reshape((n, n) + rest)
    return np.swapaxes(g, 0, 1)


def _make_table(values, oversample, extent, folded):
    """A :data:`_Table` of ``values`` (n, n[, C]) with its curvature terms."""
    v = np.asarray(values, dtype=float)
    n = v.shape[0]
    C = 1 if v.ndim == 2 else v.shape[2]
    if C == 1:
        arr = planes = np.empty((3, n, n))
    else:
        # many channels (a basis): node-major, float32 (halves the memory traffic of the
        # look-ups, which are memory-bound; its rounding, 6e-8 of a basis value, is far
        # below the interpolation error); written in place, 5x faster than building
        # float64 planes and converting them
        arr = np.empty((n, n, 3, C), dtype=np.float32)
        planes = np.moveaxis(arr, 2, 0)
    planes[0] = v
    for term, axis in ((1, 0), (2, 1)):
        u = np.moveaxis(v, axis, 0)
        d = np.moveaxis(planes[term], axis, 0)
        d[1:-1] = 0.5 * (u[2:] + u[:-2]) - u[1:-1]
        # beyond the edges: zero (outside the support), or the mirror image at a quadrant's
        # symmetry axis
        d[0] = (u[1] - u[0]) if folded else (0.5 * u[1] - u[0])
        d[-1] = 0.5 * u[-2] - u[-1]
    arr = arr.reshape(3, n * n) if C == 1 else arr.reshape(n * n, 3 * C)
    return _Table(arr, n, C, int(oversample), float(extent), bool(folded))


#: points per chunk of :func:`_interp`
_CHUNK = 8192


def _interp(table, drow, dcol, gradient=False):
    """Values (M, C) of a :data:`_Table` at offsets (and d/d drow, d/d dcol if ``gradient``).

    Bilinear interpolation corrected for curvature: minus ``fy (1 - fy)`` times the
    interpolated half second difference along rows (same along columns), which cancels the
    bilinear error to second order. Why: plain bilinear interpolation of a pixel-integrated
    PRF at 0.025 px steps was off by 3e-5 of the flux per pixel at the peak (~1 sigma of a
    Tmag 8 star's peak pixel, changing with the sub-pixel phase); corrected, a 0.05 px table
    is within 1e-6 (0.1 px: 8e-6) and a quarter the size. Zero outside the table.

    Works in chunks of :data:`_CHUNK` points: the temporaries then stay in the CPU cache
    (6x faster per point than on 50 000 points at once).
    """
    dr = np.asarray(drow, dtype=float).ravel()
    dc = np.asarray(dcol, dtype=float).ravel()
    if dr.size > _CHUNK:
        parts = [_interp(table, dr[k:k + _CHUNK], dc[k:k + _CHUNK], gradient)
                 for k in range(0, dr.size, _CHUNK)]
        if not gradient:
            return np.concatenate(parts)
        return tuple(np.concatenate(p) for p in zip(*parts))
    n, C, os_ = table.n, table.channels, table.oversample
    i, fy, fx, inside = _locate(table, dr, dc)
    a = table.array
    if C == 1:
        return _interp_one(a, n, os_, i, fy, fx, inside, gradient,
                           (np.sign(dr), np.sign(dc)) if table.folded else None)
    if not gradient:
        return _interp_many(a, C, n, i, fy, fx, inside)
    raise ValueError("linpsf: gradients of many-channel tables are not implemented")


def _locate(table, dr, dc):
    """(node index, fy, fx, inside) of 1-D offsets in a :data:`_Table`: the lower-left
    node of each point's cell, its fractional position in the cell, inside the table."""
    n, os_, ext = table.n, table.oversample, table.extent
    ar, ac = np.abs(dr), np.abs(dc)
    if table.folded:
        y, x = ar * os_, ac * os_
    else:
        y, x = (dr + ext) * os_, (dc + ext) * os_
    y0 = np.clip(y.astype(np.int64), 0, n - 2)
    x0 = np.clip(x.astype(np.int64), 0, n - 2)
    return (y0 * n + x0, np.clip(y - y0, 0.0, 1.0), np.clip(x - x0, 0.0, 1.0),
            (ar < ext) & (ac < ext))


def _interp_mean(table, drow, dcol):
    """(M, C) mean over axis 1 of a many-channel table's values at (M, K) offsets: one
    sparse matrix of 12 K weights per row (a motion-smeared design in one product), in
    chunks of rows (cache)."""
    drow, dcol = np.broadcast_arrays(np.asarray(drow, dtype=float), np.asarray(dcol, dtype=float))
    M, K = drow.shape
    out = np.empty((M, table.channels))
    step = max(_CHUNK // K, 1)
    for k in range(0, M, step):
        i, fy, fx, inside = _locate(table, drow[k:k + step].ravel(), dcol[k:k + step].ravel())
        out[k:k + step] = _interp_many(table.array, table.channels, table.n, i, fy, fx,
                                       inside, K)
    return out


def _interp_one(planes, n, os_, i, fy, fx, inside, gradient, signs):
    """:func:`_interp` of a one-channel table, on 1-D arrays; outputs (M, 1)."""
    corners = (i, i + 1, i + n, i + n + 1)
    gy, gx = 1 - fy, 1 - fx
    vals, grads_y, grads_x = [], [], []
    for p in planes:                       # value, then the two curvature terms
        c00, c01, c10, c11 = (p.take(k) for k in corners)
        top = c00 * gx + c01 * fx
        bot = c10 * gx + c11 * fx
        vals.append(top * gy + bot * fy)
        if gradient:
            grads_y.append((bot - top) * os_)
            grads_x.append(((c01 - c00) * gy + (c11 - c10) * fy) * os_)
    cy, cx = fy * gy, fx * gx
    val = vals[0]
    if len(planes) == 3:
        val = val - cy * vals[1] - cx * vals[2]
    val = val * inside                     # zero outside the table
    if not gradient:
        return val[:, None]
    dy, dx = grads_y[0], grads_x[0]
    if len(planes) == 3:
        dy = dy - os_ * (1 - 2 * fy) * vals[1] - cy * grads_y[1] - cx * grads_y[2]
        dx = dx - cy * grads_x[1] - os_ * (1 - 2 * fx) * vals[2] - cx * grads_x[2]
    sy, sx = (inside, inside) if signs is None else (signs[0] * inside, signs[1] * inside)
    return val[:, None], (dy * sy)[:, None], (dx * sx)[:, None]


def _interp_many(a, C, n, i, fy, fx, inside, group=1):
    """:func:`_interp` values of a many-channel (basis) table, as one sparse matrix of the
    12 weights per point (4 nodes x value and curvature terms) times the table: 4x faster
    than the node gathers when every node carries 3 x 16 numbers. ``group`` > 1: the mean
    over consecutive groups of that many points (one output row per group)."""
    M = i.size
    bil = np.empty((M, 4))
    bil[:, 0] = (1 - fy) * (1 - fx)
    bil[:, 1] = (1 - fy) * fx
    bil[:, 2] = fy * (1 - fx)
    bil[:, 3] = fy * fx
    w = np.empty((M, 4, 3))
    w[:, :, 0] = bil
    w[:, :, 1] = bil * -(fy * (1 - fy))[:, None]
    w[:, :, 2] = bil * -(fx * (1 - fx))[:, None]
    w *= (inside / group)[:, None, None]
    nodes = i[:, None] + np.array([0, 1, n, n + 1])
    cols = 3 * nodes[:, :, None] + np.arange(3)
    k = 12 * group                        # entries per output row (duplicates add up)
    mat = sparse.csr_matrix((w.ravel().astype(a.dtype), cols.ravel(),
                             np.arange(0, 12 * M + 1, k)), shape=(M // group, a.shape[0] * 3))
    return (mat @ a.reshape(-1, C)).astype(float)


def _interp_grid(table, start_r, start_c, shape, step=1.0, gradient=False, total=False):
    """:func:`_interp` of a one-channel full-plane table on K regular grids: point (k, i, j)
    at ``(start_r[k] + i * step, start_c[k] + j * step)``; returns (K, ni, nj) arrays
    (``total``: their sum over the K grids, (1, ni, nj)).

    Why: stamps, lattices and shifted tables are grids whose points share one sub-node
    phase, so the 12 interpolation weights are computed per grid, not per point; a single
    grid (a shifted table) or a sum of grids (a motion-smeared table) is then a sum of
    strided slices, without gathers, each slice once with the summed weight of the grids
    sharing it (a smeared table's 8 motion samples share ~half their slices). ``step`` must
    be a whole number of table nodes. Grids reaching beyond the table go to :func:`_interp`.
    """
    start_r = np.atleast_1d(np.asarray(start_r, dtype=float))
    start_c = np.atleast_1d(np.asarray(start_c, dtype=float))
    ni, nj = shape
    n, os_, ext = table.n, table.oversample, table.extent
    m = int(round(step * os_))
    y, x = (start_r + ext) * os_, (start_c + ext) * os_
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    if (table.folded or table.channels != 1 or abs(m - step * os_) > 1e-9
            or y0.min() < 0 or x0.min() < 0 or max(y0.max(), x0.max()) + (max(ni, nj) - 1) * m
            + 1 > n - 1):
        steps_r, steps_c = np.arange(ni) * step, np.arange(nj) * step
        dr = np.broadcast_to(start_r[:, None, None] + steps_r[None, :, None], (len(y), ni, nj))
        dc = np.broadcast_to(start_c[:, None, None] + steps_c[None, None, :], (len(y), ni, nj))
        out = _interp(table, dr, dc, gradient)
        out = tuple(o.reshape(dr.shape) for o in out) if gradient else (out.reshape(dr.shape),)
        if total:
            out = tuple(o.sum(axis=0, keepdims=True) for o in out)
        return out if gradient else out[0]
    fy, fx = y - y0, x - x0
    gy, gx = 1 - fy, 1 - fx
    bil = [gy * gx, gy * fx, fy * gx, fy * fx]               # corners 00, 01, 10, 11
    cy, cx = fy * gy, fx * gx
    planes = table.array
    weights = [[b for b in bil]]
    if len(planes) == 3:
        weights += [[-cy * b for b in bil], [-cx * b for b in bil]]
    if gradient:
        # d/dy of the weights: fy' = os, (fy (1 - fy))' = os (1 - 2 fy)
        by = [-os_ * gx, -os_ * fx, os_ * gx, os_ * fx]
        bx = [-os_ * gy, os_ * gy, -os_ * fy, os_ * fy]
        wy, wx = [by], [bx]
        if len(planes) == 3:
            py, px = os_ * (1 - 2 * fy), os_ * (1 - 2 * fx)
            wy += [[-py * b - cy * d for b, d in zip(bil, by)], [-cx * d for d in by]]
            wx += [[-cy * d for d in bx], [-px * b - cx * d for b, d in zip(bil, bx)]]
    corners = (0, 1, n, n + 1)
    outs = [weights] + ([wy, wx] if gradient else [])
    if len(y) == 1 or total:
        # one grid or a sum of grids: strided slices of the planes, no gathers; the summed
        # weight of every distinct slice first
        coef = {}
        for k in range(len(y)):
            for p in range(len(planes)):
                for c, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
                    key = (p, y0[k] + dy, x0[k] + dx)
                    add = [w[p][c][k] for w in outs]
                    coef[key] = [a + b for a, b in zip(coef[key], add)] if key in coef else add
        result = [np.zeros((1, ni, nj)) for _ in outs]
        for (p, oy, ox), ws in coef.items():
            sl = planes[p].reshape(n, n)[oy:oy + (ni - 1) * m + 1:m, ox:ox + (nj - 1) * m + 1:m]
            for res, w in zip(result, ws):
                res[0] += w * sl
        return tuple(result) if gradient else result[0]
    # several grids: per grid a (outputs x 12) weight matrix times the (12 x points) node
    # values, gathered for a few grids at a time (the temporaries stay in the CPU cache)
    W = np.stack([np.stack([np.broadcast_to(c, y.shape) for wp in o for c in wp], axis=1)
                  for o in outs], axis=1)                              # (K, outputs, 12)
    pattern = ((np.arange(ni) * m * n)[:, None] + np.arange(nj) * m).ravel()
    rel = (np.arange(len(planes))[:, None] * n * n + np.array(corners)).ravel()[:, None] \
        + pattern[None, :]                                             # (12, points)
    flat, base = planes.ravel(), y0 * n + x0
    out = np.empty((len(y), len(outs), ni * nj))
    step_k = max(2048 // (ni * nj), 1)
    for k in range(0, len(y), step_k):
        np.matmul(W[k:k + step_k], flat.take(base[k:k + step_k, None, None] + rel[None]),
                  out=out[k:k + step_k])
    out = out.reshape(len(y), len(outs), ni, nj)
    return tuple(out[:, k] for k in range(len(outs))) if gradient else out[:, 0]


def _periodic_cubic(phi, n):
    """(M, n) periodic cardinal cubic B-splines on ``n`` uniform knots over [0, 2 pi)."""
    u = (np.mod(phi, 2 * np.pi) / (2 * np.pi)) * n
    d = np.abs(((u[:, None] - np.arange(n)[None, :]) + n / 2) % n - n / 2)
    out = np.where(d < 1, 2.0 / 3.0 - d ** 2 + 0.5 * d ** 3, 0.0)
    return np.where((d >= 1) & (d < 2), (2.0 - d) ** 3 / 6.0, out)


class _FullPlaneTable:
    """The model look-up table of every shape basis (:class:`PolarBasis`,
    :class:`CartesianBasis`, :class:`HybridBasis`) from its ``model_values`` on full-plane
    nodes, clipped at 0 and cached per weights and basis."""

    def _key(self, oversample):
        return tuple(sorted(self.to_attrs().items())), int(oversample)

    def table(self, weights, oversample=None, prebuilt=None):
        """The model of ``weights`` as a lookup table (:data:`_Table`, cached per weights;
        ``prebuilt``: the table to cache for them, see :func:`normalise`).

        Why: a table build is O(table size) (:func:`_pixel_mean`) and a look-up costs a few
        operations per pixel, against n_sub**2 spline evaluations per pixel of every star.
        The table covers the full plane to ``ceil(rmax) + 2`` px (zeros beyond the model's
        reach, so that stamps and lattices of regular pixel grids fit in it,
        :func:`_interp_grid`); a circular model is computed on a quadrant and mirrored (the
        pixel-integrated model is even in both offsets). Negative values (far wings) are
        clipped to 0.
        """
        os_ = 2 * ((int(oversample or self.table_oversample) + 1) // 2)
        w = np.asarray(weights, dtype=float)

        def build():
            ext, v = self.model_values(w, os_)
            return _make_table(np.clip(v, 0.0, None), os_, ext, False)
        return _cache(("model", _weights_key(w)) + self._key(os_),
                      build if prebuilt is None else (lambda: prebuilt))


class PolarBasis(_FullPlaneTable):
    """The design-matrix columns of the polar spline model.

    Parameters
    ----------
    rmax : float
        Pixels; the model is zero beyond it.
    n_r_knots : int
        Radial knots, uniform over [0, rmax], ends included (mirrored to negative r so the
        radial functions are even: no cusp at the centre).
    n_phi : int
        Periodic angular basis functions (0 = circular model).
    core_radius : float
        Radial functions whose support ends inside this radius have no angular dependence.
    n_sub : int
        1: the splines are the effective PRF itself, sampled at pixel centres (version 1.0).
        >= 2: the splines are the PSF and every design value is its integral over the pixel.
        Why: a pixel-integrated circular PSF is not circular (it is squarish), so a circular
        spline on pixel centres has a shape error of ~0.1 % of the flux per pixel that
        changes with the sub-pixel phase, which the pointing drift turns into flux scatter;
        integrating exactly removes that model error. Model tables and the design of a
        circular basis integrate with Simpson's rule on a 0.05 px grid (exact to < 1e-8
        of the flux per pixel, :func:`_pixel_mean`); ``n_sub x n_sub`` Gauss-Legendre nodes
        remain for the design of an angular basis (``n_phi > 0``).
    """

    def __init__(self, rmax=6.0, n_r_knots=12, n_phi=8, core_radius=1.0, n_sub=1):
        self.rmax = float(rmax)
        self.n_sub = max(int(n_sub), 1)
        # Gauss-Legendre nodes and weights over a unit pixel (n_sub = 1: the pixel centre)
        nodes, wts = np.polynomial.legendre.leggauss(self.n_sub)
        self._sub = 0.5 * nodes
        self._subw = 0.5 * wts
        self.n_r_knots = int(n_r_knots)
        self.n_phi = int(n_phi)
        self.core_radius = float(core_radius)
        if self.n_r_knots < 4 or self.rmax <= 0:
            raise ValueError("linpsf: need n_r_knots >= 4 and rmax > 0")
        # uniform knots over [-rmax, rmax]; basis functions are folded into even functions of
        # r (B_j(r) + B_j(-r)), so the model is smooth at r = 0 with zero slope there
        x = np.linspace(-self.rmax, self.rmax, 2 * self.n_r_knots - 1)
        self.knots = np.concatenate([[x[0]] * 3, x, [x[-1]] * 3])
        nb = len(self.knots) - 4
        self._nb = nb
        self._mid = (nb - 1) // 2
        # keep j = mid .. nb-3: the two outermost are dropped (value and slope 0 at rmax)
        self._cols = np.arange(self._mid, nb - 2)
        self.n_radial = self._cols.size
        # a function touching the core (its support starts inside core_radius) is circular
        self.radial_only = (self.knots[self._cols] < self.core_radius) | (self.n_phi == 0)
        self.n_core = int(np.count_nonzero(self.radial_only))
        self.n_outer = self.n_radial - self.n_core
        # columns: every radial function alone (the circular PRF), then the outer radial
        # functions times zero-mean angular splines (deviations from circular), so a prior
        # on the latter shrinks the model towards a circular PRF rather than towards zero
        self.n_coeffs = self.n_radial + self.n_outer * max(self.n_phi, 0)
        self.angular = np.zeros(self.n_coeffs, dtype=bool)
        self.angular[self.n_radial:] = True

    def to_attrs(self):
        return {"rmax": self.rmax, "n_r_knots": self.n_r_knots, "n_phi": self.n_phi,
                "core_radius": self.core_radius, "n_sub": self.n_sub}

    def _sub_nodes(self):
        """(dr, dc, weight) of the integration nodes inside a pixel."""
        for ur, wr in zip(self._sub, self._subw):
            for uc, wc in zip(self._sub, self._subw):
                yield ur, uc, wr * wc

    #: step (px) of the radial lookup table used when integrating over pixels
    _table_step = 2e-3

    def _radial_fast(self, r):
        """Radial functions by linear interpolation in a table (error < 1e-7 of the peak).

        Why: the tables sample the radial functions at ~50 000 points per table, and the
        angular design at n_sub**2 points per pixel; B-spline design matrices for that many
        points dominated the shape fit.
        """
        if not hasattr(self, "_rtab"):
            def build():
                grid = np.arange(0.0, self.rmax + 2 * self._table_step, self._table_step)
                return self._radial_exact(grid) * (grid < self.rmax)[:, None]
            # shared by every basis with these parameters (each model load makes a new one)
            self._rtab = _cache(("radial",) + self._key(0), build)
        # the two interpolation weights of every point as a sparse matrix times the table:
        # 6x faster than gathering table rows (40 000 points x 16 functions per basis table)
        x = np.asarray(r, dtype=float).ravel() / self._table_step
        n = self._rtab.shape[0]
        i0 = np.minimum(x.astype(np.int64), n - 2)
        f = np.clip(x - i0, 0.0, 1.0)
        interp = sparse.csr_matrix((np.column_stack([1 - f, f]).ravel(),
                                    np.column_stack([i0, i0 + 1]).ravel(),
                                    np.arange(0, 2 * x.size + 1, 2)), shape=(x.size, n))
        return interp @ self._rtab

    def _radial(self, r):
        if self.n_sub > 1:
            return self._radial_fast(r)
        return self._radial_exact(r)

    def _radial_exact(self, r):
        r = np.clip(r, 0.0, np.nextafter(self.rmax, 0.0))
        pos = BSpline.design_matrix(r, self.knots, 3, extrapolate=False).toarray()
        # the knots are symmetric about 0, so B_j(-r) = B_{nb-1-j}(r): the mirrored half
        # is the same design with the columns reversed (one B-spline evaluation, not two)
        out = pos[:, self._cols] + pos[:, self._nb - 1 - self._cols]
        out[:, 0] = pos[:, self._mid]          # the central function is already even
        return out

    def design(self, drow, dcol):
        """(M, n_coeffs) basis values (pixel-integrated if ``n_sub > 1``) at pixel offsets.

        A circular pixel-integrated basis is interpolated in a table of every basis function
        (:meth:`basis_table`, exact integration): the 58 000 motion-smeared pixel values of
        the test scene's shape fit took 0.29 s with 36 Gauss-Legendre nodes, 0.015 s so.
        """
        drow = np.asarray(drow, dtype=float).ravel()
        dcol = np.asarray(dcol, dtype=float).ravel()
        if self.n_sub == 1:
            return self._design_point(drow, dcol)
        if self.n_outer == 0:
            return _interp(self.basis_table(), drow, dcol)
        out = 0.0
        for ur, uc, w in self._sub_nodes():
            out = out + w * self._design_point(drow + ur, dcol + uc)
        return out

    def _design_point(self, drow, dcol):
        """(M, n_coeffs) basis values at points; zero rows beyond ``rmax``."""
        r = np.hypot(drow, dcol)
        inside = r < self.rmax
        rad = self._radial(r) * inside[:, None]
        if self.n_outer == 0:
            return rad
        ang = _periodic_cubic(np.arctan2(drow, dcol), self.n_phi) - 1.0 / self.n_phi
        outer = rad[:, ~self.radial_only]
        tensor = (outer[:, :, None] * ang[:, None, :]).reshape(len(r), -1)
        return np.hstack([rad, tensor])

    #: samples per pixel of the lookup tables (curvature-corrected bilinear interpolation,
    #: within 1e-6 of the flux per pixel of the exact model at 20)
    table_oversample = 20

    def _grid_values(self, weights, oversample, margin):
        """(extent, values on the table nodes) of the model of an angular basis (``weights``
        (n_coeffs,)), pixel-integrated if ``n_sub > 1`` (the splines sampled between the
        nodes, then :func:`_pixel_mean`); nodes over the full plane up to ``ceil(rmax) +
        margin`` px. (Circular models come from :meth:`_basis_values`.)"""
        ext = float(np.ceil(self.rmax) + margin)
        half = int(round(ext * oversample))
        pad = oversample // 2 if self.n_sub > 1 else 0
        s = np.arange(-half - pad, half + pad + 1) / oversample
        dr, dc = np.meshgrid(s, s, indexing="ij")
        w = np.asarray(weights, dtype=float)
        f = np.concatenate([self._design_point(a, b) @ w for a, b in
                            zip(np.array_split(dr.ravel(), max(dr.size // 20000, 1)),
                                np.array_split(dc.ravel(), max(dr.size // 20000, 1)))])
        f = f.reshape(dr.shape)
        return ext, (_pixel_mean(f, oversample) if self.n_sub > 1 else f)

    def _integrate_basis(self, oversample):
        """(extent, (n, n, n_radial) values) of every radial function on a quadrant of nodes
        ``oversample`` per px to ``ceil(rmax) + 1`` px, pixel-integrated if ``n_sub > 1``
        (samples between the nodes, then :func:`_pixel_mean`).

        Each function is computed on the square of nodes whose pixel reaches its support
        (zero beyond): 2.6x fewer samples than all functions on the whole quadrant, and
        small temporaries (the 5 MB ones of the latter cost as much in page faults as in
        arithmetic)."""
        ext = float(np.ceil(self.rmax) + 1)
        half = int(round(ext * oversample))
        pad = oversample // 2 if self.n_sub > 1 else 0
        s = np.arange(-pad, half + pad + 1) / oversample
        if not hasattr(self, "_rtab"):
            self._radial_fast(np.zeros(1))
        # linear interpolation in the radial table (as :meth:`_radial_fast`): node and
        # weight of every sample, shared by the functions
        x = np.hypot(s[:, None], s[None, :]) / self._table_step
        i0 = np.minimum(x.astype(np.int64), self._rtab.shape[0] - 2)
        f1 = np.clip(x - i0, 0.0, 1.0)
        f0 = 1.0 - f1
        rtab = np.ascontiguousarray(self._rtab.T)
        out = np.zeros((half + 1, half + 1, self.n_radial))
        for k in range(self.n_radial):
            # r where function k has ended (the table is zero from there on)
            nonzero = np.flatnonzero(rtab[k])
            reach = (nonzero[-1] + 1) * self._table_step if nonzero.size else 0.0
            n = min(half + 1, int(np.ceil((reach + 0.5) * oversample)) + 2)
            sl = (slice(0, n + 2 * pad), slice(0, n + 2 * pad))
            f = rtab[k].take(i0[sl]) * f0[sl] + rtab[k].take(i0[sl] + 1) * f1[sl]
            out[:n, :n, k] = _pixel_mean(f, oversample) if self.n_sub > 1 else f
        return ext, out

    def model_values(self, weights, oversample):
        """(extent, unclipped model on the full-plane table nodes to ``ceil(rmax) + 2`` px,
        ``oversample`` per px, even)."""
        w = np.asarray(weights, dtype=float)
        if self.n_outer == 0:
            # the basis functions' integrated values times the weights (integration is
            # linear): a matrix-vector product instead of sampling and integrating the
            # model, 3x faster per table (a shape fit builds one per round); nodes
            # beyond the basis values' reach (ceil(rmax) + 1 px) hold no light
            ext = float(np.ceil(self.rmax) + 2)
            _, values = self._basis_values(oversample)
            v = np.zeros((int(round(ext * oversample)) + 1,) * 2)
            v[:values.shape[0], :values.shape[1]] = values @ w
            v = np.concatenate([v[:0:-1], v])
            return ext, np.concatenate([v[:, :0:-1], v], axis=1)
        return self._grid_values(w, oversample, margin=2)

    #: samples per pixel of :meth:`basis_table`
    basis_oversample = 20

    def _basis_values(self, oversample):
        """(extent, (n, n, n_coeffs) values) of every basis function of a circular basis on
        a quadrant of nodes ``oversample`` per px (pixel-integrated if ``n_sub > 1``;
        cached): the source of :meth:`basis_table` and of every model :meth:`table`."""
        if self.n_outer:
            raise ValueError("linpsf: basis tables need a circular basis (n_phi = 0)")
        return _cache(("basis values",) + self._key(oversample),
                      lambda: self._integrate_basis(oversample))

    def basis_table(self):
        """Every basis function of a circular pixel-integrated basis as one table (cached)."""
        os_ = 2 * ((int(self.basis_oversample) + 1) // 2)

        def build():
            ext, v = self._basis_values(os_)
            return _make_table(v, os_, ext, True)
        return _cache(("basis",) + self._key(os_), build)

    def evaluate(self, weights, drow, dcol):
        """Model values at offsets (same shape as ``drow``), negative values clipped to 0,
        interpolated in the model's :meth:`table`."""
        drow, dcol = np.broadcast_arrays(np.asarray(drow, dtype=float),
                                         np.asarray(dcol, dtype=float))
        out = _interp(self.table(weights), drow, dcol)[:, 0]
        return np.clip(out, 0.0, None).reshape(drow.shape)


class CartesianBasis(_FullPlaneTable):
    """Tensor-product cubic B-splines of the PSF in (drow, dcol), integrated exactly over pixels.

    Why (issue 16): the polar basis is circular unless ``n_phi > 0``, and its angular terms
    are products of radial and periodic splines whose pixel integrals need n_sub**2
    Gauss-Legendre nodes (195 s for a shape fit of 15 stars with ``n_phi = 8``). The real
    SPOC PRF is lopsided and the field families are elliptical, with coma: a circular model
    left light curves at 4.7x the ideal noise on the SPOC PRF (true PRF: 1.04x). A tensor
    product of 1-D splines represents any shape the knots resolve (ellipticity at any angle,
    displaced wings, a triangular core), and its pixel integral is separable and exact: the
    1-D antiderivatives of the B-splines at the pixel edges, so a design row is an outer
    product of two short vectors and a model table is ``I_r W I_c^T``.

    Knots: every ``step`` px within ``core`` px of the star, every ``wing_step`` px from there
    to ``rmax`` (value and slope reach 0 there); the functions whose support ends inside
    ``rmax`` are kept.

    Parameters
    ----------
    rmax : float
        Half-side (px) of the square support.
    step, core, wing_step : float
        Knot spacing in the core, the core's half-width, the knot spacing in the wings.
    """

    kind = "cartesian"
    #: the design is pixel-integrated (kept for the code that asks; exact integration)
    n_sub = 0
    #: not a folded (circular) basis: tables cover the full plane
    n_outer = 1
    n_phi = -1
    table_oversample = 20

    def __init__(self, rmax=8.0, step=0.5, core=3.0, wing_step=1.0):
        self.rmax, self.step = float(rmax), float(step)
        self.core, self.wing_step = float(min(core, rmax)), float(wing_step)
        if not (self.rmax > 0 and self.step > 0 and self.wing_step > 0):
            raise ValueError("linpsf cartesian basis: rmax, step and wing_step must be > 0")
        inner = np.arange(-self.core, self.core + 0.5 * self.step, self.step)
        outer = np.arange(self.core + self.wing_step, self.rmax + 0.5 * self.wing_step,
                          self.wing_step)
        outer = outer[outer < self.rmax - 1e-9]
        knots = np.unique(np.round(np.concatenate([-outer[::-1], inner, outer, [-self.rmax,
                                                                             self.rmax]]), 9))
        # 3 more knots beyond each end: the spline's base interval then covers every kept
        # function's support (kept: supports inside [-rmax, rmax])
        lo, hi = knots[0], knots[-1]
        w = self.wing_step
        self._knots = np.concatenate([lo - w * np.arange(3, 0, -1), knots,
                                      hi + w * np.arange(1, 4)])
        n_all = self._knots.size - 4
        start = self._knots[:n_all]
        end = self._knots[4:4 + n_all]
        self._keep = np.flatnonzero((start >= lo - 1e-9) & (end <= hi + 1e-9))
        self.n1 = self._keep.size
        if self.n1 < 2:
            raise ValueError("linpsf cartesian basis: rmax too small for the knot spacing")
        eye = np.eye(n_all)[:, self._keep]
        self._anti = BSpline(self._knots, eye, 3, extrapolate=True).antiderivative()
        self._range = (self._knots[3], self._knots[-4])
        self._a0 = self._anti(self._range[0])
        self.n_coeffs = self.n1 * self.n1
        self.angular = np.zeros(self.n_coeffs, dtype=bool)

    def to_attrs(self):
        return {"basis": self.kind, "rmax": self.rmax, "cart_step": self.step,
                "cart_core": self.core, "cart_wing_step": self.wing_step}

    def integrated_1d(self, x):
        """(M, n1) integral of every 1-D function over the unit pixel centred at ``x``."""
        x = np.asarray(x, dtype=float).ravel()

        def anti(u):
            return self._anti(np.clip(u, *self._range)) - self._a0
        return anti(x + 0.5) - anti(x - 0.5)

    def design(self, drow, dcol):
        """(M, n_coeffs) pixel-integrated basis values at pixel offsets (outer products)."""
        ir = self.integrated_1d(drow)
        ic = self.integrated_1d(dcol)
        return (ir[:, :, None] * ic[:, None, :]).reshape(ir.shape[0], -1)

    def evaluate(self, weights, drow, dcol):
        """Model values at offsets (exact, not tabulated), negative values clipped to 0."""
        drow, dcol = np.broadcast_arrays(np.asarray(drow, dtype=float),
                                         np.asarray(dcol, dtype=float))
        W = np.asarray(weights, dtype=float).reshape(self.n1, self.n1)
        out = np.einsum("mi,ij,mj->m", self.integrated_1d(drow), W, self.integrated_1d(dcol))
        return np.clip(out, 0.0, None).reshape(drow.shape)

    def model_values(self, weights, oversample, extent=None):
        """(extent, unclipped model on full-plane nodes ``oversample`` per px to ``extent``
        (default ``ceil(rmax) + 2``) px)."""
        ext = float(np.ceil(self.rmax) + 2) if extent is None else float(extent)
        axis = np.arange(-int(round(ext * oversample)), int(round(ext * oversample)) + 1) \
            / oversample
        ia = self.integrated_1d(axis)
        w = np.asarray(weights, dtype=float).reshape(self.n1, self.n1)
        return ext, ia @ w @ ia.T


class HybridBasis(_FullPlaneTable):
    """A circular :class:`PolarBasis` PSF plus a :class:`CartesianBasis` core (issue 16).

    Why both: the circular part carries the wings, which hold little light and which, in a
    crowded field, the shape stars constrain only together with their neighbours' light (a
    free 2-D wing, :class:`CartesianBasis` to ``rmax``, fitted the crowded test scene's
    wings to 3e-4 of the flux where the truth has 1e-5); the tensor-product core (every
    ``cart_step`` px within ``cart_core`` px) carries what is not circular: ellipticity at
    any angle, coma, a lopsided core (the SPOC PRF). The core weights have the angular prior
    (``angular_prior_sigma``): they are deviations from the circular PSF, shrunk towards it
    where the stars do not constrain them. Both parts are pixel-integrated exactly.
    """

    kind = "hybrid"
    n_sub = 0
    n_outer = 1
    table_oversample = 20

    def __init__(self, polar, core):
        if polar.n_outer:
            raise ValueError("linpsf hybrid basis: the polar part must be circular (n_phi = 0)")
        self.polar, self.core = polar, core
        self.rmax = polar.rmax
        self.n_phi = 0
        self.n_coeffs = polar.n_coeffs + core.n_coeffs
        self._split = polar.n_coeffs
        self.angular = np.zeros(self.n_coeffs, dtype=bool)
        self.angular[self._split:] = True

    def to_attrs(self):
        return dict(self.polar.to_attrs(), basis=self.kind, cart_step=self.core.step,
                    cart_core=self.core.rmax)

    def design(self, drow, dcol):
        return np.hstack([self.polar.design(drow, dcol), self.core.design(drow, dcol)])

    def model_values(self, weights, oversample):
        w = np.asarray(weights, dtype=float)
        ext, v = self.polar.model_values(w[:self._split], oversample)
        _, c = self.core.model_values(w[self._split:], oversample, extent=ext)
        return ext, v + c

    def evaluate(self, weights, drow, dcol):
        drow, dcol = np.broadcast_arrays(np.asarray(drow, dtype=float),
                                         np.asarray(dcol, dtype=float))
        out = _interp(self.table(weights), drow, dcol)[:, 0]
        return np.clip(out, 0.0, None).reshape(drow.shape)


def make_basis(attrs):
    """The shape basis described by settings or stored attrs: ``basis = "polar"`` (caches
    written before issue 16 have no ``basis``), ``"cartesian"`` (tensor splines to ``rmax``)
    or ``"hybrid"``; the stage resolves ``"auto"`` to one of the first two
    (:func:`photometry_linpsf.stage.fit_shape_model`)."""
    kind = str(attrs.get("basis", "polar"))
    if kind not in ("hybrid", "polar", "cartesian"):
        raise ValueError(f"linpsf: unknown shape basis {kind!r} (hybrid, polar or cartesian)")
    if kind == "cartesian":
        return CartesianBasis(float(attrs["rmax"]), float(attrs.get("cart_step", 0.5)),
                              float(attrs.get("cart_core", 3.0)),
                              float(attrs.get("cart_wing_step", 1.0)))
    polar = PolarBasis(float(attrs["rmax"]), int(attrs["n_r_knots"]),
                       0 if kind == "hybrid" else int(attrs["n_phi"]),
                       float(attrs["core_radius"]), int(attrs.get("n_sub", 1)))
    if kind == "polar":
        return polar
    core = float(attrs.get("cart_core", 3.0))
    return HybridBasis(polar, CartesianBasis(core, float(attrs.get("cart_step", 0.5)), core,
                                             float(attrs.get("cart_step", 0.5))))


class BlurredBasis:
    """A :class:`PolarBasis` averaged over the stars' motion: what a sum image holds.

    Why: the sum image is the mean over all frames, so each star in it is its PRF smeared
    along the pointing drift (0.1-0.2 px in a sector, in one direction). Fitting the PRF to
    that directly would put the smear into the angular terms, and the photometry, which
    moves the PRF itself with the movement kernel, would then apply it twice. Averaging the
    design over the measured shifts fits the unsmeared PRF.

    Parameters
    ----------
    basis : PolarBasis
    shifts : ndarray (K, 2)
        (drow, dcol) samples of the motion over the frames of the sum image.
    """

    def __init__(self, basis, shifts):
        self.base = basis
        self.shifts = np.atleast_2d(np.asarray(shifts, dtype=float))

    def __getattr__(self, name):
        return getattr(self.base, name)

    def design(self, drow, dcol):
        drow = np.asarray(drow, dtype=float).ravel()
        dcol = np.asarray(dcol, dtype=float).ravel()
        b = self.base
        if b.n_sub > 1 and b.n_outer == 0:
            # tabulated basis: every motion sample of a pixel in one sparse row; pixels that
            # miss the disc r < rmax at every sample, by more than the two table nodes an
            # interpolation reaches, are zero rows and not looked up (the corners of a
            # star's box: a third of its pixels)
            table = b.basis_table()
            dr = drow[:, None] - self.shifts[:, 0]
            dc = dcol[:, None] - self.shifts[:, 1]
            reach = 0.5 + 2.0 / table.oversample
            near = np.hypot(np.clip(np.abs(dr) - reach, 0.0, None),
                            np.clip(np.abs(dc) - reach, 0.0, None)).min(axis=1) < b.rmax
            out = np.zeros((drow.size, table.channels))
            out[near] = _interp_mean(table, dr[near], dc[near])
            return out
        out = 0.0
        for sr, sc in self.shifts:
            out = out + b.design(drow - sr, dcol - sc)
        return out / len(self.shifts)

    #: samples per pixel of the smeared model's table (:meth:`table`; smoother than the PRF,
    #: and interpolated with curvature terms: within 8e-6 of the flux per pixel at 10)
    table_oversample = 10

    def evaluate(self, weights, drow, dcol):
        """The smeared model: the mean of the unsmeared one over the motion samples."""
        drow = np.asarray(drow, dtype=float)
        dcol = np.asarray(dcol, dtype=float)
        out = 0.0
        for sr, sc in self.shifts:
            out = out + self.base.evaluate(weights, drow - sr, dcol - sc)
        return out / len(self.shifts)

    def table(self, weights, oversample=None):
        """The smeared model as a full-plane lookup table (cached per weights and shifts).

        Why: rendering a whole scene (neighbour subtraction) needs each star's smeared
        model; one table of it costs K look-ups per node instead of per stamp pixel."""
        os_ = 2 * ((int(oversample or self.table_oversample) + 1) // 2)
        w = np.asarray(weights, dtype=float)

        def build():
            # the unsmeared table summed over the motion samples' shifted grids (strided slices)
            ext = float(np.ceil(self.rmax) + 1)
            n = 2 * int(round(ext * os_)) + 1
            base = self.base.table(w)
            v = _interp_grid(base, -ext - self.shifts[:, 0], -ext - self.shifts[:, 1], (n, n),
                             1.0 / os_, total=True)[0]
            # plus a 1 px margin of zeros (no light reaches it for shifts under 0.5 px), so
            # that the shape stars' boxes (2 ceil(rmax) + 3 px) fit in the table: regular-grid
            # look-ups (:func:`_interp_grid`), 4x faster than per point
            return _make_table(np.pad(v / len(self.shifts), os_), os_, ext + 1, False)
        key = ("smeared", _weights_key(w), self.shifts.tobytes()) + self.base._key(os_)
        return _cache(key, build)


_LATTICE = {}


def lattice_design(basis, n_sub=5):
    """(n_sub**2, n_coeffs): each basis function summed over the pixel lattice, per phase.

    Cached per basis (it depends on nothing else; every shape solve needs it)."""
    key = (tuple(sorted(basis.to_attrs().items())), type(basis).__name__, int(n_sub))
    if key not in _LATTICE:
        _LATTICE[key] = _lattice_design(basis, n_sub)
    return _LATTICE[key]


def _lattice_design(basis, n_sub=5):
    half = int(np.ceil(basis.rmax)) + 1
    steps = np.arange(-half, half + 1)
    phases = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    # every phase's lattice in one design call (25 calls of 361 points were 10 ms)
    pr, pc = np.meshgrid(phases, phases, indexing="ij")
    dr = steps[None, :, None] - pr.reshape(-1, 1, 1)
    dc = steps[None, None, :] - pc.reshape(-1, 1, 1)
    dr, dc = np.broadcast_arrays(dr, dc)
    return basis.design(dr, dc).reshape(n_sub * n_sub, steps.size ** 2, -1).sum(axis=1)


def lattice_sum(basis, weights, n_sub=5):
    """(mean, relative spread) of the model summed over the pixel lattice, over sub-pixel phases.

    For a correct effective PRF every sub-pixel position of the star sums to the same total;
    the spread measures how far the fitted model is from that. A :class:`BlurredBasis`
    gives the sums of its unsmeared model (the one stored and used by the photometry; a
    smear averages phases and keeps the sum), 8x fewer look-ups.
    """
    basis = getattr(basis, "base", basis)
    half = int(np.ceil(basis.rmax)) + 1
    phases = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    pr, pc = np.meshgrid(phases, phases, indexing="ij")
    # one lattice grid per phase (the model is clipped per pixel, as in the photometry)
    vals = _interp_grid(basis.table(weights), -half - pr.ravel(), -half - pc.ravel(),
                        (2 * half + 1, 2 * half + 1))
    sums = np.clip(vals, 0.0, None).sum(axis=(1, 2))
    return float(sums.mean()), float(sums.std() / sums.mean())


def release_tables(weights):
    """Drop the cached tables (model, smeared model) of ``weights``.

    Why: a shape fit's rounds each make a model table (3 x 401 x 401 values) and a smeared
    one that the next rounds never use; kept in the cache until pushed out, every new table
    took fresh memory, and its page faults (~2.5 us per 4 kB page on the test machine) cost
    as much as computing it.
    """
    key = _weights_key(weights)
    for k in [k for k in _TABLES if k[1] == key]:
        del _TABLES[k]


def normalise(basis, weights):
    """``weights`` scaled to a unit :func:`lattice_sum` (mean over phases).

    The model table of the scaled weights is the one built for the sums, rescaled (the
    clipped model scales with positive weights), so the next rounds do not rebuild it."""
    total = lattice_sum(basis, weights)[0]
    base = getattr(basis, "base", basis)
    table = base.table(weights)
    scaled = np.asarray(weights, dtype=float) / total
    # the unscaled weights are not used again: their table is rescaled in place and moved
    for key in [k for k, v in _TABLES.items() if v is table]:
        del _TABLES[key]
    table.array[...] /= total
    base.table(scaled, prebuilt=table)
    return scaled


#: the last few shape-fit designs (the stage refits the same pixels several times)
_DESIGNS = {}


def _cached_design(basis, drow, dcol):
    """``basis.design(drow, dcol)``, reused when the same basis and offsets come again.

    Why: with motion smear a design costs blur_samples look-ups per pixel (0.33 s for 400
    shape stars; ~40 s with n_sub**2 Gauss-Legendre nodes per sample), and the stage's
    rounds refit the same pixels (fixed catalog positions) with new fluxes and skies only.
    """
    drow = np.ascontiguousarray(drow, dtype=float)
    dcol = np.ascontiguousarray(dcol, dtype=float)
    shifts = getattr(basis, "shifts", None)
    key = (tuple(sorted(basis.to_attrs().items())),
           None if shifts is None else shifts.tobytes(),
           hashlib.sha1(drow.tobytes() + dcol.tobytes()).hexdigest())
    if key not in _DESIGNS:
        if len(_DESIGNS) >= 2:
            _DESIGNS.pop(next(iter(_DESIGNS)))
        _DESIGNS[key] = basis.design(drow, dcol)
    return _DESIGNS[key]


def fit_weights(basis, drow, dcol, values, inv_var, prior_mu=0.0, prior_sigma=1.0,
                angular_sigma=None, extra=None, design=None):
    """Gaussian-prior linear least squares for the weights of normalised pixel values.

    ``values`` are ``(pixel - background) / star flux`` and ``inv_var`` their inverse
    variances; the prior is ``N(prior_mu, prior_sigma**2)`` per weight (prior_mu may be an
    array, e.g. a global model when fitting one cell of the position grid);
    ``angular_sigma`` (if given) is the prior width of the angular (non-circular) weights.
    ``extra`` (M, E): further columns fitted together with the shape, without a prior (e.g.
    each star's sky / flux); then ``(weights, extra coefficients)`` is returned.
    ``design``: ``basis.design(drow, dcol)`` when the caller already has it.
    """
    A = _cached_design(basis, drow, dcol) if design is None else design
    n_extra = 0 if extra is None else extra.shape[1]
    if n_extra:
        A = np.hstack([A, extra])
    Aw = A * inv_var[:, None]
    normal = A.T @ Aw
    rhs = Aw.T @ values
    # The same sum over the pixel lattice at every sub-pixel phase, as stiff pseudo-
    # observations (the scale itself is set afterwards by :func:`lattice_sum`). Why: that
    # sum is the flux scale of the photometry; if it changes with the phase, the pointing
    # jitter turns into flux changes (0.4 % spread seen on a simulated sector without this).
    S = lattice_design(getattr(basis, "base", basis))
    D = S - S.mean(axis=0)
    if n_extra:
        D = np.hstack([D, np.zeros((D.shape[0], n_extra))])
        S = np.hstack([S, np.zeros((S.shape[0], n_extra))])
    stiff = 1e4 * np.trace(normal) / max(np.trace(S.T @ S), 1e-300)
    normal = normal + stiff * (D.T @ D)
    sigma = np.where(basis.angular, float(angular_sigma), float(prior_sigma)) \
        if angular_sigma is not None else np.full(basis.n_coeffs, float(prior_sigma))
    prior_ivar = np.concatenate([1.0 / sigma ** 2, np.zeros(n_extra)])
    normal[np.diag_indices_from(normal)] += prior_ivar
    mu = np.concatenate([np.broadcast_to(prior_mu, (basis.n_coeffs,)), np.zeros(n_extra)])
    sol = np.linalg.solve(normal, rhs + prior_ivar * mu)
    if n_extra:
        return sol[:basis.n_coeffs], sol[basis.n_coeffs:]
    return sol


class SplinePRF(PRFModel):
    """A :class:`photometry.data.prf.PRFModel` backed by fitted polar-spline weights.

    Parameters
    ----------
    basis : PolarBasis
    weights : ndarray, shape (G, G, n_coeffs)
        Model weights of a G x G grid of CCD cells (G = 1: one model for the CCD).
    cell_rows, cell_cols : ndarray, shape (G,)
        0-based CCD row / column of the cell centres.
    """

    name = "linpsf"

    def __init__(self, basis, weights, cell_rows, cell_cols):
        self.basis = basis
        self.weights = np.asarray(weights, dtype=float)
        if self.weights.ndim == 1:
            self.weights = self.weights[None, None, :]
        self.cell_rows = np.atleast_1d(np.asarray(cell_rows, dtype=float))
        self.cell_cols = np.atleast_1d(np.asarray(cell_cols, dtype=float))

    @classmethod
    def from_group(cls, group):
        """The model stored by :class:`photometry_linpsf.stage.LinPSFShapeModel`."""
        basis = make_basis(group.attrs)
        return cls(basis, group["weights"][()], group["cell_rows"][()], group["cell_cols"][()])

    #: samples per pixel of the lookup table the stamps are interpolated from (None: the
    #: basis's ``table_oversample``)
    oversample = None

    def default_size(self, flux=None):
        return 2 * int(np.ceil(self.basis.rmax)) + 1

    def _table(self, key):
        """Model ``key`` as a lookup table over [-rmax-1, rmax+1] (cached per weights).

        Why: evaluating the spline basis for every pixel of every star at every cadence
        dominated the photometry (~0.8 M points per target); curvature-corrected bilinear
        interpolation in a table sampled at 0.05 px is within 1e-6 of the flux per pixel
        of the model (:func:`_interp`).
        """
        return self.basis.table(self.weights[key], self.oversample)

    def _lookup(self, key, dr, dc, gradient=False):
        """Model ``key`` at offsets ``dr, dc`` (same shape; with d/d dr, d/d dc if
        ``gradient``). The table holds the clipped (non-negative) model."""
        dr, dc = np.broadcast_arrays(np.asarray(dr, dtype=float), np.asarray(dc, dtype=float))
        table = self._table(key)
        if not isinstance(table, _Table):
            table = self._plain_table(table)
        out = _interp(table, dr, dc, gradient)
        if not gradient:
            return out[:, 0].reshape(dr.shape)
        return tuple(o[:, 0].reshape(dr.shape) for o in out)

    def _plain_table(self, table):
        """A subclass's ``(extent, full-plane 2-D array)`` table (``timemodel.ComponentPRF``)
        as a :data:`_Table` without curvature terms (plain bilinear look-ups)."""
        ext, arr = table
        return _Table(arr.reshape(1, -1), arr.shape[0], 1, int(self.oversample), ext, False)

    def _interp(self, pos, centres):
        """Indices (lo, hi) and weight of hi for bilinear interpolation between cells."""
        if centres.size == 1:
            z = np.zeros(pos.shape, dtype=int)
            return z, z, np.zeros(pos.shape)
        x = np.clip(np.interp(pos, centres, np.arange(centres.size)), 0, centres.size - 1)
        lo = np.minimum(np.floor(x).astype(int), centres.size - 2)
        return lo, lo + 1, x - lo

    def stamps(self, row, col, size):
        values, r0, c0 = self._stamps(row, col, size, False)
        return values[0], r0, c0

    def stamp_gradients(self, row, col, size):
        """(values, d values / d row, d values / d col, row0, col0): :meth:`stamps` and its
        derivatives with respect to the star position, from one table look-up.

        The cells of a position grid are blended with their weights at the star position
        (the change of those weights with the position, over hundreds of px, is ignored).
        """
        (values, gr, gc), r0, c0 = self._stamps(row, col, size, True)
        return values, gr, gc, r0, c0

    def _stamps(self, row, col, size, gradient):
        row = np.atleast_1d(np.asarray(row, dtype=float))
        col = np.atleast_1d(np.asarray(col, dtype=float))
        r0 = np.floor(row + 0.5).astype(np.int64) - size // 2
        c0 = np.floor(col + 0.5).astype(np.int64) - size // 2
        start_r, start_c = r0 - row, c0 - col        # offsets of each stamp's first pixel

        def lookup(key, sel):
            table = self._table(key)
            if not isinstance(table, _Table):
                table = self._plain_table(table)
            out = _interp_grid(table, start_r[sel], start_c[sel], (size, size), 1.0,
                               gradient)
            # d/d row of P(pixel - row) = -dP/d dr
            return (out[0], -out[1], -out[2]) if gradient else (out,)
        if self.weights.shape[0] == 1 and self.weights.shape[1] == 1:
            return lookup((0, 0), slice(None)), r0, c0
        ri0, ri1, fr = self._interp(row, self.cell_rows)
        ci0, ci1, fc = self._interp(col, self.cell_cols)
        values = [np.zeros((row.size, size, size)) for _ in range(3 if gradient else 1)]
        # bilinear blend of the four surrounding cell models, one pass per distinct model
        for ri, wr in ((ri0, 1 - fr), (ri1, fr)):
            for ci, wc in ((ci0, 1 - fc), (ci1, fc)):
                wgt = wr * wc
                for key in set(zip(ri.tolist(), ci.tolist())):
                    sel = (ri == key[0]) & (ci == key[1]) & (wgt > 0)
                    if np.any(sel):
                        for v, o in zip(values, lookup(key, sel)):
                            v[sel] += wgt[sel, None, None] * o
        return tuple(values), r0, c0

    def __repr__(self):
        g = self.weights.shape[0]
        return f"SplinePRF(rmax={self.basis.rmax}, coeffs={self.basis.n_coeffs}, grid={g}x{g})"


def _stamps_to_csc(stamps, r0, c0, shape, origin, constant=False):
    """Sparse (npix x nstars) CSC matrices, one per stamp array (N, size, size) in
    ``stamps``, all with the same pattern: stars' stamps clipped to the image (the first
    with a last column of ones if ``constant``).

    Built directly in CSC order (a column is a star, its stamp pixels already sorted), so no
    COO sort: the scene fit builds one design per group of cadences."""
    N, size = stamps[0].shape[:2]
    nrows, ncols = shape
    npix = nrows * ncols
    steps = np.arange(size)
    rr = (r0 - origin[0])[:, None] + steps[None, :]
    cc = (c0 - origin[1])[:, None] + steps[None, :]
    ok = (((rr >= 0) & (rr < nrows))[:, :, None] & ((cc >= 0) & (cc < ncols))[:, None, :])
    keep = np.flatnonzero(ok)
    index = (rr[:, :, None] * ncols + cc[:, None, :]).ravel()[keep]
    counts = ok.reshape(N, -1).sum(axis=1)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    data = [v.ravel()[keep] for v in stamps]
    if constant:
        data[0] = np.concatenate([data[0], np.ones(npix)])
    out = []
    for k, d in enumerate(data):
        extra = constant and k == 0
        out.append(sparse.csc_matrix(
            (d, np.concatenate([index, np.arange(npix)]) if extra else index,
             np.append(indptr, indptr[-1] + npix) if extra else indptr),
            shape=(npix, N + 1 if extra else N)))
    return out


def design_matrices(prf, row, col, shape, origin=(0, 0), gradients=True, step=0.01,
                    constant=False):
    """``prf.design_matrix`` and, if ``gradients``, its derivatives d/d row and d/d col of
    the star positions (sparse, npix x nstars each; else ``(A, None, None)``); with
    ``constant``, ``A`` has a last column of ones (a background level).

    A :class:`SplinePRF` gives all three from one table look-up (:meth:`SplinePRF.
    stamp_gradients`); any other :class:`photometry.data.prf.PRFModel` gets central differences
    of ``step`` px (four more designs).
    """
    row = np.atleast_1d(np.asarray(row, dtype=float))
    col = np.atleast_1d(np.asarray(col, dtype=float))
    if hasattr(prf, "stamp_gradients"):
        size = int(prf.default_size())
        if not gradients:
            values, r0, c0 = prf.stamps(row, col, size)
            return _stamps_to_csc((values,), r0, c0, shape, origin, constant)[0], None, None
        values, gr, gc, r0, c0 = prf.stamp_gradients(row, col, size)
        return tuple(_stamps_to_csc((values, gr, gc), r0, c0, shape, origin, constant))
    A = prf.design_matrix(row, col, shape, origin)
    if constant:
        A = sparse.hstack([A, np.ones((A.shape[0], 1))], format="csc")
    if not gradients:
        return A, None, None
    gr = (prf.design_matrix(row + step, col, shape, origin)
          - prf.design_matrix(row - step, col, shape, origin)) / (2 * step)
    gc = (prf.design_matrix(row, col + step, shape, origin)
          - prf.design_matrix(row, col - step, shape, origin)) / (2 * step)
    return A, gr, gc
