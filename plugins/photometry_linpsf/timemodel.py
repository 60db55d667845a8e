"""The time model of the linpsf shape: small smooth PRF changes during a sector.

Why: the shape stage fits one PRF to the sum image, i.e. the sector-mean PRF. TESS's focus
changes with temperature and the velocity aberration changes the plate scale, so the PRF width
drifts by a few per cent during a sector. A fixed PRF then mis-weights the pixels of every star
by an amount that changes in time, and the fitted fluxes follow: on the crowded test scene a 3 %
width ramp made the light curves 22 x the ideal noise (median, 8 <= Tmag <= 13; a flux trend),
against 1.15 x without the ramp. The change is small, so it is modelled as a *linear
perturbation of the shape weights*:

    w(t) = w0 + sum_j p_j(t) dw_j,     j = 1 .. time_degree,

``p_j`` the Legendre polynomials of the time normalised to [-1, 1] over the good cadences, ``w0``
the stage's mean shape (unchanged). A PRF image at time ``t`` is the mean-shape image plus
``sum_j p_j(t)`` component images (linear in the weights: :func:`time_varying_images`), so the
photometry's designs stay linear. With the model the test scene's light curves are at 1.17 x
(the true time-varying PRF gives 1.15 x).

Fit (:func:`fit_time_model`), on the shape stage's used stars:

* The good cadences are cut into ``time_bins`` contiguous bins of equal size; per bin the mean of
  each star's box and its variance (:class:`TimeBinner`, accumulated block by block in the same
  pass over the cube as the stage's variance: no second read of a CCD's cube).
* Per bin each star's mean-shape image is its mean over ``blur_samples`` cadences of the bin,
  moved by the movement kernel (momentum dumps and jitter smear the bin means); the light of
  every other catalog star (and of the other shape stars) is subtracted the same way at catalog
  (fitted) flux, and ``(time_neighbour_error x that light)^2`` is added to the pixel
  variances. Neighbours brighter than ``NEIGHBOUR_FRACTION`` of the star get the same
  perturbation in the design (their focus change is in the box too).
* Per star the nuisance parameters are projected out exactly (Schur complement): a flux per bin
  (variability) and a constant per pixel (the mean shape's own error at that star's sub-pixel
  position, the static sky: whatever is the same in every bin). The sky change of each bin is a
  polynomial over the CCD shared by all stars (a free sky per star and bin traded with the
  wing of the perturbation), of the lowest order up to ``time_sky_order`` whose next order is
  not both significant and a ``SKY_ORDER_GAIN`` drop of chi^2. The perturbation weights
  ``dw_1 .. dw_d`` and the sky terms are then one small linear solve with a Gaussian prior
  on the weights (``time_prior_sigma``) and stiff pseudo-observations keeping every
  ``dw_j``'s sum over the pixel lattice zero at every sub-pixel phase: the flux scale stays
  that of the mean shape.
* Stars whose reduced chi^2 is a ``clip_sigma`` outlier (unsubtracted neighbours) are dropped.
* Kept only if significant: chi^2 with the sky terms alone and with the time terms,
  ``z = (dchi2 / max(chi2_red, 1) - n) / sqrt(2 n)`` for the ``n`` effective extra parameters
  (the trace of the hat matrix); the model is used when ``z >= time_min_significance`` and
  it removes at least ``time_min_chi2_drop`` of the sky-only chi^2.

Stored with the shape in ``models/linpsf_shape`` (:meth:`TimeModel.write`): datasets
``time_components`` (degree, n_coeffs), ``time_bin_times``, ``time_width`` (relative effective
width at the bin times), attrs ``time_use``, ``time_degree``, ``time_t0``, ``time_t1``,
``time_chi2_static`` (sky terms only), ``time_chi2``, ``time_dof``, ``time_significance``,
``time_n_parameters``, ``time_n_stars``, ``time_n_bins``, ``time_sky_order``,
``time_seconds``. See ``docs/linpsf.md`` "Time model".
"""
import logging
import time as _time
import warnings

import numpy as np
from numpy.polynomial import legendre
from scipy.spatial import cKDTree


from .model import SplinePRF, _make_table, lattice_design, single_thread_blas

__all__ = ["TimeBinner", "TimeModel", "ComponentPRF", "fit_time_model", "fit_shape_time_model",
           "bin_shifts", "load_time_model", "time_varying_images", "effective_width",
           "cache_binner"]

logger = logging.getLogger(__name__)

#: neighbours at least this fraction of a shape star's flux get the perturbation in its box
#: (fainter ones change its pixels by < 1 % of the star's own change)
NEIGHBOUR_FRACTION = 0.01

#: shape stars needed per term of the time model's sky polynomial (identifiability)
MIN_STARS_PER_SKY_TERM = 3

#: a higher order of the time model's sky polynomial must lower its chi^2 by this fraction
#: (see _fit_time_model: a real sky change does it by far, a trade with the wing does not)
SKY_ORDER_GAIN = 0.1


def cache_binner(f, good, found, shape, cfg):
    """A :class:`TimeBinner` for the shape stage's candidate stars, or None.

    None when the time model is off (``time_degree`` 0), there are no candidates (``found``
    is the stage's star selection: rows, cols, ...) or the cache has no ``time``.
    """
    if int(cfg["time_degree"]) <= 0 or found is None or "time" not in f:
        return None
    return TimeBinner.for_shape(f["time"][()], good, found[0], found[1], shape, cfg)


class TimeBinner:
    """Per-time-bin means of the boxes around candidate shape stars, fed block by block.

    Parameters
    ----------
    time : ndarray (N,)
        Cadence times (BTJD); only their order and bin means are used.
    good : ndarray (N,) of bool
        Cadences that go into the bins (the others are ignored).
    n_bins : int
        Number of contiguous bins of (nearly) equal numbers of good cadences.
    rows, cols : array_like (S,)
        Star positions (cube pixels) around which boxes are kept.
    half : int
        Half-side of the fitted stamps; the boxes get ``pad`` more pixels per side so that a
        stamp centred on a star moved by up to ~``pad`` px still lies inside.
    shape : tuple
        (R, C) of the image.
    """

    pad = 2

    @classmethod
    def for_shape(cls, time, good, rows, cols, shape, cfg):
        """The binner of the ``[linpsf]`` settings: ``time_bins``, stamps of the shape model's
        size (``2 ceil(rmax) + 1``, as the photometry's PRF stamps). Larger stamps, for more
        sky pixels beyond ``rmax``, held more neighbours in the crowded test scene and fitted
        worse (fewer stars inside the image, 3x the flux trend)."""
        return cls(np.asarray(time, float), good, int(cfg["time_bins"]), rows, cols,
                   int(np.ceil(float(cfg["rmax"]))), shape)

    def __init__(self, time, good, n_bins, rows, cols, half, shape):
        time = np.asarray(time, dtype=float)
        good = np.asarray(good, dtype=bool) & np.isfinite(time)
        idx = np.flatnonzero(good)
        self.n_bins = int(min(max(int(n_bins), 1), idx.size))
        if self.n_bins < 1:
            raise ValueError("linpsf time model: no good cadence to bin")
        self.bin_of = np.full(time.size, -1, dtype=np.int64)
        self.bin_of[idx] = (np.arange(idx.size) * self.n_bins) // idx.size
        self.members = [idx[self.bin_of[idx] == b] for b in range(self.n_bins)]
        self.bin_time = np.array([time[m].mean() for m in self.members])
        self.t_range = (float(time[idx].min()), float(time[idx].max()))
        self.shape = tuple(shape)
        self.rows = np.atleast_1d(np.asarray(rows, dtype=float))
        self.cols = np.atleast_1d(np.asarray(cols, dtype=float))
        self.half = int(half)
        side = 2 * (self.half + self.pad) + 1
        self.side = side
        self.r0 = np.round(self.rows).astype(np.int64) - self.half - self.pad
        self.c0 = np.round(self.cols).astype(np.int64) - self.half - self.pad
        self.inside = (self.r0 >= 0) & (self.c0 >= 0) & (self.r0 + side <= shape[0]) \
            & (self.c0 + side <= shape[1])
        steps = np.arange(side)
        self._ri = np.clip(self.r0[:, None] + steps, 0, shape[0] - 1)      # (S, side)
        self._ci = np.clip(self.c0[:, None] + steps, 0, shape[1] - 1)
        S = self.rows.size
        self._sum = np.zeros((self.n_bins, S, side, side))
        self._var = np.zeros((self.n_bins, S, side, side))
        self._n = np.zeros((self.n_bins, S, side, side))

    def add(self, frames, images, errors, bad=None):
        """Accumulate the frames ``frames`` (slice or indices) of the cube.

        ``images``, ``errors`` (n, R, C) are those frames; ``bad`` (n, R, C) bool marks pixels
        to ignore (saturated, excluded); non-finite values are ignored too.
        """
        index = np.arange(len(self.bin_of))[frames]
        bins = self.bin_of[index]
        keep = bins >= 0
        if not keep.any() or self.rows.size == 0:
            return
        ri, ci = self._ri[:, :, None], self._ci[:, None, :]
        for b in np.unique(bins[keep]):
            # gather only the boxes (a block of full frames is ~0.5 GB): (n, S, side, side)
            sel = np.flatnonzero(bins == b)[:, None, None, None]
            img = np.asarray(np.asarray(images)[sel, ri, ci], dtype=float)
            err = np.asarray(np.asarray(errors)[sel, ri, ci], dtype=float)
            ok = np.isfinite(img) & np.isfinite(err) & (err > 0)
            if bad is not None:
                ok &= ~np.asarray(bad)[sel, ri, ci]
            self._sum[b] += np.where(ok, img, 0.0).sum(axis=0)
            self._var[b] += np.where(ok, err ** 2, 0.0).sum(axis=0)
            self._n[b] += ok.sum(axis=0)

    def means(self):
        """(mean, variance of the mean) per bin and box, (n_bins, S, side, side); NaN / inf
        where a pixel had no valid frame."""
        with np.errstate(all="ignore"):
            mean = np.where(self._n > 0, self._sum / self._n, np.nan)
            var = np.where(self._n > 0, self._var / self._n ** 2, np.inf)
        return mean, var


def bin_shifts(kernel, members, rows, cols, samples=8):
    """(drow, dcol), each (n_bins, K, n): movement of ``rows, cols`` at K cadences per bin.

    The K cadences are spread evenly over each bin's members: the bin mean image is the stars
    smeared over them. Why not the bin-mean position alone: a momentum dump inside a bin makes
    its mean image a blend of two pointings 0.1-0.3 px apart, i.e. a wider PRF in that bin
    only, which the time terms would otherwise take for a focus change.
    ``kernel`` has the movement-kernel interface (``shift(x, y, frames)`` -> (dx, dy) arrays
    (n_frames, n_positions), ``x`` = column); None = no movement. Frames without a
    measurement (NaN) get the mean of the bin's other samples (0 if none).
    """
    rows = np.atleast_1d(np.asarray(rows, dtype=float))
    cols = np.atleast_1d(np.asarray(cols, dtype=float))
    nb, K = len(members), max(int(samples), 1)
    if kernel is None:
        return np.zeros((nb, 1, rows.size)), np.zeros((nb, 1, rows.size))
    # K evenly spread members (their centres: K = 1 is the middle cadence)
    frames = np.array([np.asarray(m)[((np.arange(K) + 0.5) * len(m) / K).astype(int)]
                       for m in members])                                    # (nb, K)
    dx, dy = kernel.shift(cols, rows, frames.ravel())
    out = []
    for d in (dy, dx):
        d = np.asarray(d, float).reshape(nb, K, rows.size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)      # all-NaN bins -> 0 below
            fill = np.nan_to_num(np.nanmean(d, axis=1, keepdims=True))
        out.append(np.where(np.isfinite(d), d, fill))
    return out[0], out[1]


def _stamps_on(prf, rows, cols, r0, c0, size):
    """Unit-flux stamps (n, size, size) of stars at ``rows, cols`` on given origins ``r0, c0``.

    ``prf.stamps`` centres each stamp on the star's nearest pixel; a smear sample may sit
    across a pixel edge from the bin-mean position that fixed the box, so a larger stamp is
    cut to the box (a sample more than ~1.5 px from it is dropped: no light).
    """
    pad = 2
    big, rb, cb = prf.stamps(rows, cols, size + 2 * pad)
    di, dj = np.asarray(r0) - rb, np.asarray(c0) - cb
    ok = (di >= 0) & (di <= 2 * pad) & (dj >= 0) & (dj <= 2 * pad)
    steps = np.arange(size)
    ii = np.clip(di, 0, 2 * pad)[:, None] + steps
    jj = np.clip(dj, 0, 2 * pad)[:, None] + steps
    out = big[np.arange(len(rb))[:, None, None], ii[:, :, None], jj[:, None, :]]
    return np.where(ok[:, None, None], out, 0.0)


def _legendre(u, degree):
    """(n, degree + 1) Legendre polynomials P_0 .. P_degree at ``u`` (clipped to [-1, 1])."""
    return legendre.legvander(np.clip(np.asarray(u, dtype=float), -1.0, 1.0), int(degree))


class ComponentPRF(SplinePRF):
    """A perturbation ``dw`` of the shape weights as a :class:`photometry.data.prf.PRFModel`.

    Its "stamps" are the change of the PRF per unit time coefficient: signed, not normalised.
    Why a subclass: :class:`SplinePRF` clips negative model values (right for a PRF, wrong for
    a perturbation); only the look-up table is built differently: the unclipped pixel-integrated
    basis (``basis.design``) times ``dw`` every 0.05 px, with the curvature terms of the
    shape's tables (``model._make_table``; plain bilinear look-ups were off by 6e-6 of the flux
    per pixel for a 4e-3 component).
    """

    name = "linpsf-time"
    oversample = 20
    _cache = {}

    def _table(self, key):
        w = self.weights[key]
        ident = (w.tobytes(), tuple(self.basis.to_attrs().items()), self.oversample)
        if ident not in self._cache:
            ext = np.ceil(self.basis.rmax) + 1
            axis = np.arange(-ext, ext + 0.5 / self.oversample, 1.0 / self.oversample)
            n, c = axis.size, axis.size // 2
            if len(self._cache) >= 16:
                self._cache.pop(next(iter(self._cache)))
            folded = getattr(self.basis, "n_outer", 1) == 0 and n % 2 == 1
            # circular: even in dr and dc, one quadrant (as the shape's tables)
            nodes = axis[c:] if folded else axis
            dr, dc = np.meshgrid(nodes, nodes, indexing="ij")
            values = (self.basis.design(dr, dc) @ w).reshape(dr.shape)
            self._cache[ident] = _make_table(values, self.oversample, float(ext), folded)
        return self._cache[ident]


class TimeModel:
    """The fitted PRF time model: ``w(t) = w0 + sum_j p_j(t) dw_j``.

    Parameters
    ----------
    components : ndarray (degree, n_coeffs)
        ``dw_1 .. dw_degree`` (one set for the whole CCD, added to every grid cell's weights).
    t_range : (float, float)
        First and last good cadence time (BTJD): the time is normalised to [-1, 1] over it.
    use : bool
        Whether the fit was significant (see the module doc); the photometry should apply the
        model only then (:func:`load_time_model` returns None otherwise).
    stats : dict, optional
        Fit figures (``chi2_static``, ``chi2``, ``dof``, ``significance``, ``n_stars``,
        ``n_bins``, ``bin_times``, ``width``, ``seconds``).
    """

    def __init__(self, components, t_range, use=True, stats=None):
        self.components = np.atleast_2d(np.asarray(components, dtype=float))
        self.degree = self.components.shape[0]
        self.t_range = (float(t_range[0]), float(t_range[1]))
        self.use = bool(use)
        self.stats = dict(stats or {})
        self._prfs = {}

    def coefficients(self, time):
        """(n, degree) ``p_1(t) .. p_degree(t)`` at times (BTJD; clipped to the fitted span).

        For cadence indices of a photometry run pass its ``time`` array (e.g.
        ``BasePhotometry.time``), or ``np.repeat(time, n_stars)`` for a flattened design.
        """
        t0, t1 = self.t_range
        u = 2.0 * (np.asarray(time, dtype=float) - t0) / (t1 - t0) - 1.0 if t1 > t0 \
            else np.zeros(np.shape(time))
        return _legendre(np.atleast_1d(u), self.degree)[:, 1:]

    def weights(self, time, base_weights):
        """Per-time shape weights, shape ``(n,) + base_weights.shape``."""
        p = self.coefficients(time)
        base = np.asarray(base_weights, dtype=float)
        return base[None] + (p @ self.components).reshape((-1,) + (1,) * (base.ndim - 1)
                                                           + (base.shape[-1],))

    def component_prfs(self, prf):
        """One :class:`ComponentPRF` per ``dw_j`` with the basis of ``prf`` (a SplinePRF)."""
        key = id(prf.basis)
        if key not in self._prfs:
            self._prfs[key] = [ComponentPRF(prf.basis, dw, [0.0], [0.0])
                               for dw in self.components]
        return self._prfs[key]

    def prf_at(self, prf, time):
        """The full :class:`SplinePRF` at one time (a new look-up table: diagnostics, plots)."""
        w = self.weights([time], prf.weights)[0]
        return SplinePRF(prf.basis, w, prf.cell_rows, prf.cell_cols)

    # ------------------------------------------------------------------ storage
    def write(self, group):
        """Datasets ``time_*`` and attrs ``time_*`` in the ``models/linpsf_shape`` group."""
        group.create_dataset("time_components", data=self.components)
        for key in ("bin_times", "width"):
            if key in self.stats:
                group.create_dataset(f"time_{key}", data=np.asarray(self.stats[key], float))
        group.attrs["time_use"] = self.use
        group.attrs["time_degree"] = self.degree
        group.attrs["time_t0"], group.attrs["time_t1"] = self.t_range
        for key in ("chi2_static", "chi2", "dof", "significance", "n_parameters", "n_stars",
                    "n_bins", "sky_order", "seconds"):
            if key in self.stats:
                group.attrs[f"time_{key}"] = self.stats[key]

    @classmethod
    def from_group(cls, group):
        """The model stored by :meth:`write` (whatever its ``time_use``), or None."""
        if group is None or "time_components" not in group:
            return None
        a = group.attrs
        stats = {k[5:]: a[k] for k in a if str(k).startswith("time_")}
        for key in ("bin_times", "width"):
            if f"time_{key}" in group:
                stats[key] = group[f"time_{key}"][()]
        return cls(group["time_components"][()], (a["time_t0"], a["time_t1"]),
                   bool(a.get("time_use", False)), stats)


def load_time_model(group):
    """The time model of a ``models/linpsf_shape`` group if fitted and significant, else None."""
    model = TimeModel.from_group(group)
    return model if model is not None and model.use else None


def time_varying_images(prf, time_model, rows, cols, times, shape, origin, images_fn):
    """Unit-flux PRF images of stars at ``rows, cols``, each at its own time.

    ``images = base + sum_j p_j(time) * component_j``: ``images_fn(model, rows, cols, shape,
    origin) -> (n, R, C)`` renders any PRF model (e.g. ``LinPSFPhotometry._images``); it is
    called once for the mean shape and once per time component, so the cost is
    ``1 + time_degree`` times that of the static images. ``time_model`` None: the static images.

    Parameters
    ----------
    prf : SplinePRF
        The mean shape (``linpsf_shape``).
    time_model : TimeModel or None
    rows, cols, times : ndarray (n,)
        CCD positions and the BTJD time of each image (e.g. for every cadence x star of a
        flattened design, ``np.repeat(time, n_stars)``).
    """
    images = images_fn(prf, rows, cols, shape, origin)
    if time_model is None or time_model.degree == 0:
        return images
    p = time_model.coefficients(np.broadcast_to(np.asarray(times, float), np.shape(rows)))
    for j, comp in enumerate(time_model.component_prfs(prf)):
        images = images + p[:, j, None, None] * images_fn(comp, rows, cols, shape, origin)
    return images


def effective_width(basis, weights, n_phase=3):
    """Effective width ``sqrt(1 / sum P^2)`` (px) of the PRF of each weight vector.

    ``1 / sum_i P_i^2`` is the noise-equivalent area of the pixel-integrated PRF (the number
    of pixels whose noise a PRF fit collects); for a Gaussian PSF it grows as the width
    squared. Averaged over ``n_phase`` x ``n_phase`` sub-pixel positions of the star.

    Parameters
    ----------
    weights : ndarray (..., n_coeffs)
    """
    half = int(np.ceil(basis.rmax)) + 1
    steps = np.arange(-half, half + 1)
    phases = (np.arange(n_phase) + 0.5) / n_phase - 0.5
    dr = np.concatenate([np.repeat(steps - p, steps.size) for p in phases for _ in phases])
    dc = np.concatenate([np.tile(steps - q, steps.size) for _ in phases for q in phases])
    D = basis.design(dr, dc)                                       # (n_phase^2 * npix, nc)
    w = np.asarray(weights, dtype=float)
    P = np.clip(w.reshape(-1, w.shape[-1]) @ D.T, 0.0, None)
    P = P.reshape(P.shape[0], n_phase ** 2, -1)
    nea = 1.0 / np.sum(P ** 2, axis=2)
    return np.sqrt(nea.mean(axis=1)).reshape(w.shape[:-1])


def fit_shape_time_model(binner, shape, scene, kernel, cfg):
    """The time model of a shape fit: :func:`fit_time_model` on its used stars.

    Parameters
    ----------
    binner : TimeBinner
        Filled with the cube (cube pixel coordinates, as the shape fit).
    shape : dict
        The result of :func:`photometry_linpsf.stage.fit_shape_model` (usable).
    scene : tuple (rows, cols, fluxes) or None
        The other catalog stars (the shape fit's ``scene``), subtracted at catalog flux; the
        shape stars the fit did not use are subtracted at their fitted flux.
    kernel : movement kernel or None
        Cube-pixel movement kernel (``shift(x, y, frames)``), see :func:`bin_shifts`.
    """
    st = shape["stars"]
    used = np.asarray(st["used"], bool)
    prf = SplinePRF(shape["basis"], shape["weights"], shape["cell_rows"], shape["cell_cols"])
    others = [np.asarray(st[k], float)[~used] for k in ("row", "col", "flux")]
    if scene is not None:
        others = [np.concatenate([o, np.asarray(x, float)]) for o, x in zip(others, scene)]
    return fit_time_model(binner, prf, [np.asarray(st[k], float)[used]
                                        for k in ("row", "col", "flux")], others,
                          lambda r, c: bin_shifts(kernel, binner.members, r, c,
                                                  int(cfg["blur_samples"])), cfg)


def fit_time_model(binner, prf, stars, others, shifts, cfg):
    """Fit the time model (see the module doc); BLAS on one thread (small solves).

    Parameters
    ----------
    binner : TimeBinner
        Bin means of boxes around candidate stars (cube pixels).
    prf : SplinePRF
        The mean shape, in the same pixel coordinates as the binner (``cell_rows/cols`` too).
    stars : tuple (rows, cols, fluxes)
        The shape stars that fit the model (the stage's used stars: refitted positions and
        sum-image fluxes); each must lie within ~1.5 px of one of the binner's boxes.
    others : tuple (rows, cols, fluxes)
        Every other star whose light reaches the boxes (catalog stars at catalog flux, the
        unused shape stars at their fitted flux); subtracted with the mean shape.
    shifts : callable
        ``shifts(rows, cols) -> (drow, dcol)``, each (n_bins, K, n): movement at K smear
        samples per bin (e.g. ``lambda r, c: bin_shifts(kernel, binner.members, r, c)``).
    cfg : dict
        ``[linpsf]`` settings: ``time_degree``, ``time_prior_sigma``,
        ``time_min_significance``, ``time_neighbour_error``, ``time_sky_order``,
        ``clip_sigma``.

    Returns
    -------
    TimeModel or None
        None when no star is usable.
    """
    start = _time.perf_counter()
    with single_thread_blas():
        model = _fit_time_model(binner, prf, stars, others, shifts, cfg)
    if model is not None:
        model.stats["seconds"] = _time.perf_counter() - start
    return model


def _fit_time_model(binner, prf, stars, others, shifts, cfg):
    degree = int(cfg["time_degree"])
    basis = prf.basis
    nc = basis.n_coeffs
    rows, cols, fluxes = (np.atleast_1d(np.asarray(a, dtype=float)) for a in stars)
    # each star's box in the binner (nearest candidate within 1.5 px)
    d = np.hypot(rows[:, None] - binner.rows[None], cols[:, None] - binner.cols[None])
    box = np.argmin(d, axis=1) if binner.rows.size else np.zeros(rows.size, int)
    ok = (d[np.arange(rows.size), box] < 1.5) & binner.inside[box] & (fluxes > 0) \
        if binner.rows.size else np.zeros(rows.size, bool)
    rows, cols, fluxes, box = rows[ok], cols[ok], fluxes[ok], box[ok]
    S, nb = rows.size, binner.n_bins
    if S == 0 or degree < 1 or nb < degree + 2:
        logger.warning("linpsf time model: %d stars, %d bins, degree %d; no time model", S, nb,
                       degree)
        return None
    mean, var = binner.means()
    size = 2 * binner.half + 1
    orow, ocol, oflux = (np.atleast_1d(np.asarray(a, dtype=float)) for a in others)
    all_rows = np.concatenate([rows, orow])
    all_cols = np.concatenate([cols, ocol])
    all_flux = np.concatenate([fluxes, oflux])
    # only the other stars whose PRF reaches a box
    reach = binner.half + binner.pad + size
    near = np.ones(all_rows.size, bool)
    if orow.size:
        dist, _ = cKDTree(np.column_stack([rows, cols])).query(np.column_stack([orow, ocol]))
        near[S:] = dist < reach * np.sqrt(2)
    all_rows, all_cols, all_flux = all_rows[near], all_cols[near], all_flux[near]
    # movement at K smear samples per bin, (nb, K, n); the bin-mean position fixes the box
    # and the perturbation's design (the smear's effect on the small perturbation is of
    # second order), the mean shape and the other stars' light are averaged over the samples
    sdr, sdc = (np.asarray(a, float) for a in shifts(all_rows, all_cols))
    sdr = sdr.reshape(nb, -1, all_rows.size)
    sdc = sdc.reshape(nb, -1, all_rows.size)
    drow, dcol = sdr.mean(axis=1), sdc.mean(axis=1)
    # bounding region of the boxes: the "others" image is rendered only there
    lo_r, lo_c = int(binner.r0[box].min()), int(binner.c0[box].min())
    hi_r = int(binner.r0[box].max()) + binner.side
    hi_c = int(binner.c0[box].max()) + binner.side
    region = (hi_r - lo_r, hi_c - lo_c)

    P = _legendre(2.0 * (binner.bin_time - binner.t_range[0])
                  / max(binner.t_range[1] - binner.t_range[0], 1e-12) - 1.0, degree)  # (nb, J)
    # per bin: each shape star's unit-flux stamp and the light of all other stars on it
    stamps = []
    steps = np.arange(size)
    for b in range(nb):
        r0 = np.floor(rows + drow[b, :S] + 0.5).astype(np.int64) - size // 2
        c0 = np.floor(cols + dcol[b, :S] + 0.5).astype(np.int64) - size // 2
        K = sdr.shape[1]
        full, vals = 0.0, 0.0
        for k in range(K):
            r_k, c_k = all_rows + sdr[b, k], all_cols + sdc[b, k]
            full = full + prf.evaluate(r_k, c_k, region, origin=(lo_r, lo_c), flux=all_flux,
                                       size=size) / K
            vals = vals + _stamps_on(prf, r_k[:S], c_k[:S], r0, c0, size) / K
        rr = np.clip((r0 - lo_r)[:, None] + steps, 0, region[0] - 1)[:, :, None]
        cc = np.clip((c0 - lo_c)[:, None] + steps, 0, region[1] - 1)[:, None, :]
        stamps.append((full[rr, cc] - fluxes[:, None, None] * vals, vals, r0, c0))
    tree = cKDTree(np.column_stack([all_rows, all_cols]))
    # sky polynomial terms up to time_sky_order (at least MIN_STARS_PER_SKY_TERM stars per
    # term), sorted by degree: the order actually used is chosen after the projection
    max_order = int(cfg["time_sky_order"])
    while max_order > 0 and (max_order + 1) * (max_order + 2) // 2 * MIN_STARS_PER_SKY_TERM > S:
        max_order -= 1
    powers = sorted(((i, j) for i in range(max_order + 1) for j in range(max_order + 1 - i)),
                    key=lambda q: (q[0] + q[1], q))
    nq = len(powers)
    xs = 2.0 * cols / max(binner.shape[1], 1) - 1.0
    ys = 2.0 * rows / max(binner.shape[0], 1) - 1.0
    sky_terms = np.stack([xs ** i * ys ** j for i, j in powers], axis=1)      # (S, nq)
    parts = []
    for s in range(S):
        block = _star_bins(s, box[s], binner, mean, var, stamps, rows, cols, drow, dcol, size,
                           float(cfg["time_neighbour_error"]))
        if block is None:            # the star moved out of its box (> pad px): not used
            continue
        y, w, m, (dr, dc) = block
        X = basis.design(dr, dc).reshape(nb, -1, nc)
        # the neighbours' PRFs change too: their light in the box, at their catalog (fitted)
        # flux, gets the same perturbation (else their focus change biases dw)
        nbrs = [j for j in tree.query_ball_point((rows[s], cols[s]), basis.rmax + size / 1.4)
                if j != s and all_flux[j] >= NEIGHBOUR_FRACTION * fluxes[s]]
        if nbrs:
            nbrs = np.asarray(nbrs)
            ddr = (dr.reshape(nb, -1)[:, None, :] + (rows[s] + drow[:, s])[:, None, None]
                   - (all_rows[nbrs][None, :, None] + drow[:, nbrs, None]))
            ddc = (dc.reshape(nb, -1)[:, None, :] + (cols[s] + dcol[:, s])[:, None, None]
                   - (all_cols[nbrs][None, :, None] + dcol[:, nbrs, None]))
            Xn = basis.design(ddr.ravel(), ddc.ravel()).reshape(nb, nbrs.size, -1, nc)
            Xn = np.einsum("k,bkpc->bpc", all_flux[nbrs], Xn)
        else:
            Xn = 0.0
        # linearisation point of the flux x perturbation product: each bin's flux at w0
        G = np.stack([np.einsum("bp,bp,bp->b", w, m, m), np.einsum("bp,bp->b", w, m),
                      np.einsum("bp,bp->b", w, m), w.sum(axis=1)], axis=1).reshape(nb, 2, 2)
        rhs = np.stack([np.einsum("bp,bp,bp->b", w, m, y), np.einsum("bp,bp->b", w, y)], 1)
        G[:, [0, 1], [0, 1]] *= 1 + 1e-12
        flux_b = np.linalg.solve(G, rhs[..., None])[:, 0, 0]
        flux_b = np.where(flux_b > 0, flux_b, fluxes[s])
        Z = ((X * flux_b[:, None, None] + Xn)[:, :, None, :]
             * P[:, None, 1:, None]).reshape(nb, -1, degree * nc)
        # the sky of each bin: a polynomial over the CCD shared by every star (a free sky per
        # star and bin traded with the wing of the perturbation: a focus change moves light
        # from the core to the wing, which looks locally like a sky change; shared, the sky
        # cannot follow the stars' fluxes)
        Zs = np.zeros((nb, Z.shape[1], nb * nq))
        for b in range(nb):
            Zs[b, :, b * nq:(b + 1) * nq] = sky_terms[s]
        parts.append(_project_star(y, w, m, np.concatenate([Z, Zs], axis=2)))
    if not parts:
        logger.warning("linpsf time model: no star stayed inside its box; no time model")
        return None
    # stars whose bins the mean shape fits badly (an uncatalogued or unsubtracted neighbour,
    # variability within a bin) are dropped, as in the shape fit: they would dominate
    red_s = np.array([p[2] / max(p[3], 1) for p in parts])
    med = np.median(red_s)
    mad = 1.4826 * np.median(np.abs(red_s - med))
    keep = red_s < med + float(cfg["clip_sigma"]) * max(mad, 0.05 * med)
    H = np.sum([p[0] for p, k in zip(parts, keep) if k], axis=0)
    g = np.sum([p[1] for p, k in zip(parts, keep) if k], axis=0)
    chi2_static = float(np.sum([p[2] for p, k in zip(parts, keep) if k]))
    dof_static = int(np.sum([p[3] for p, k in zip(parts, keep) if k]))
    n_used = int(np.count_nonzero(keep))

    # every dw_j: a prior, and stiff pseudo-observations of a zero sum over the pixel lattice
    # at every sub-pixel phase (the flux scale is the mean shape's); the sky terms: a tiny
    # ridge (their mean over the bins is the pixel constants' business)
    T = degree * nc
    L = lattice_design(basis)
    LtL = L.T @ L
    stiff = 1e4 * np.trace(H[:T, :T]) / degree / max(np.trace(LtL), 1e-300)
    A = H.copy()
    A[:T, :T] += np.kron(np.eye(degree), stiff * LtL
                         + np.eye(nc) / float(cfg["time_prior_sigma"]) ** 2)
    sky = np.arange(T, H.shape[0])
    A[sky, sky] += 1e-9 * np.maximum(np.diag(H)[sky], 1e-300)

    def fit(idx):
        """(solution, chi2, effective number of parameters) with the parameters ``idx``."""
        sol = np.linalg.solve(A[np.ix_(idx, idx)], g[idx])
        Hi = H[np.ix_(idx, idx)]
        edf = float(np.trace(np.linalg.solve(A[np.ix_(idx, idx)], Hi)))
        return sol, float(chi2_static - 2 * sol @ g[idx] + sol @ Hi @ sol), edf

    def significance(small, big):
        """z of the chi^2 drop from fit ``small`` to fit ``big`` (their extra parameters'
        effective number: the trace of the hat matrix, which the prior and the lattice
        constraint lower), chi^2 scaled by the reduced chi^2 of ``big`` when the model errors
        exceed the noise but never below 1 (the neighbour term inflates some variances, so a
        reduced chi^2 < 1 is not "too little noise")."""
        n = max(big[2] - small[2], 1e-3)
        red = max(big[1] / max(dof_static - big[2], 1.0), 1.0)
        return ((small[1] - big[1]) / red - n) / np.sqrt(2.0 * n), n, red

    threshold = float(cfg["time_min_significance"])
    t_idx = np.arange(T)

    def sky_idx(o):
        k = (o + 1) * (o + 2) // 2
        return (T + np.arange(nb)[:, None] * nq + np.arange(k)[None, :]).ravel()

    # the sky order: raised while the next order's terms, fitted with the time terms, are
    # significant and lower the chi^2 by at least SKY_ORDER_GAIN. Why chosen by the data:
    # on a simulated sector with scattered light (13 stars) one level per bin overestimated
    # the width change by 18 % and a plane recovered it to 0.3 % (chi^2 2.0e6 -> 1.1e5); on
    # the crowded test scene (flat sky, 16 stars) the plane, though "significant" (chi^2
    # 6010 -> 5857), took up part of the perturbation's wing (light curves 1.33 x ideal
    # instead of 1.17 x with one level per bin)
    order = 0
    full = fit(np.concatenate([t_idx, sky_idx(0)]))
    while order < max_order:
        nxt = fit(np.concatenate([t_idx, sky_idx(order + 1)]))
        if significance(full, nxt)[0] < threshold or nxt[1] > (1 - SKY_ORDER_GAIN) * full[1]:
            break
        order, full = order + 1, nxt
    sky = sky_idx(order)
    static = fit(sky)
    beta, chi2, edf = full
    chi2_sky = static[1]
    z, n_extra, red = significance(static, full)
    dof = max(dof_static - edf, 1.0)
    components = beta[:T].reshape(degree, nc)
    base = prf.weights.reshape(-1, nc).mean(axis=0)
    widths = effective_width(basis, base[None] + P[:, 1:] @ components) \
        / effective_width(basis, base)
    # significant AND a large share of the misfit: on simulated sectors without a focus change
    # the z test alone passed (z = 56-90, chi^2 down 1.4-1.8 %: the mean shape's misfit,
    # reduced chi^2 11-22) and those models cost the light curves 6 % and 2x of precision; a
    # real focus change removes most of the chi^2 (3 % ramp: 98.5 %, 4 % ramp: 95 %)
    drop = 1.0 - chi2 / chi2_sky if chi2_sky > 0 else 0.0
    use = bool(z >= threshold) and drop >= float(cfg["time_min_chi2_drop"])
    stats = dict(chi2_static=chi2_sky, chi2=chi2, dof=float(dof), significance=float(z),
                 n_parameters=n_extra, n_stars=n_used, n_bins=int(nb), sky_order=order,
                 bin_times=binner.bin_time, width=widths)
    model = TimeModel(components, binner.t_range, use, stats)
    logger.info("linpsf time model: %d stars x %d bins, chi2 %.6g -> %.6g (reduced %.3g), "
                "significance %.1f -> %s; width %.4f .. %.4f", n_used, nb, chi2_sky, chi2,
                red, z, "used" if use else "not used", widths.min(), widths.max())
    return model


def _star_bins(s, k, binner, mean, var, stamps, rows, cols, drow, dcol, size, other_error):
    """One star's data per bin: (y, w, m, (dr, dc)) or None if a stamp leaves its box.

    ``y`` (nb, npix) the bin means minus every other star's light, ``w`` their inverse
    variances (0 = no data), ``m`` the star's unit-flux mean-shape image, ``dr, dc`` the
    pixel offsets from the star (flattened over bins, for the basis design).
    The variance includes ``(other_error * light of the other stars)^2``: their fluxes are
    catalog values (and may vary), so pixels they dominate carry little shape information.
    Why: on the crowded test scene the neighbours' 0.5-3 % variability left residuals of
    100-500 e-/s in the shape stars' boxes, a reduced chi^2 of ~5e4.
    """
    steps = np.arange(size)
    ys, ws, ms, drs, dcs = [], [], [], [], []
    for b, (other, vals, r0, c0) in enumerate(stamps):
        i0, j0 = r0[s] - binner.r0[k], c0[s] - binner.c0[k]
        if not (0 <= i0 <= binner.side - size and 0 <= j0 <= binner.side - size):
            return None
        data = mean[b, k, i0:i0 + size, j0:j0 + size]
        vv = var[b, k, i0:i0 + size, j0:j0 + size] + (other_error * other[s]) ** 2
        good = np.isfinite(data) & np.isfinite(vv) & (vv > 0)
        ys.append(np.where(good, data - other[s], 0.0).ravel())
        ws.append(np.where(good, 1.0 / np.where(good, vv, 1.0), 0.0).ravel())
        ms.append(vals[s].ravel())
        dr = (r0[s] + steps)[:, None] - (rows[s] + drow[b, s]) + 0.0 * steps[None, :]
        dc = (c0[s] + steps)[None, :] - (cols[s] + dcol[b, s]) + 0.0 * steps[:, None]
        drs.append(dr.ravel())
        dcs.append(dc.ravel())
    return (np.array(ys), np.array(ws), np.array(ms),
            (np.concatenate(drs), np.concatenate(dcs)))


def _project_star(y, w, m, Z):
    """One star's contribution to the normal equations of the time (and sky) terms.

    The star's own nuisance parameters are projected out exactly (Schur complement): a flux
    per bin (variability) and a constant per pixel. Why the pixel constants: they take up
    whatever is the same in every bin, above all the mean shape's own error at this star's
    sub-pixel position (~1e-4 of the flux per pixel) and the static sky; without them the
    stars' drift across the pixels turned that error into a trend in time that the
    perturbation absorbed (a 1.5e-4 error in the PRF core at the end of a sector, light
    curves 2.2 x the ideal noise instead of 1.6 x).

    Parameters
    ----------
    y, w, m : ndarray (nb, npix)
        Data (other stars subtracted), inverse variances, unit-flux mean-shape image.
    Z : ndarray (nb, npix, T)
        Design of the shared parameters (time terms, sky terms).

    Returns
    -------
    (H, g, chi2, dof) : the projected ``Z^T W Z``, ``Z^T W y``, ``y^T W y`` and the number
    of data minus the star's nuisance parameters.
    """
    nb, npix = y.shape
    K = nb + npix
    Nn = np.zeros((K, K))
    fb, cp = np.arange(nb), nb + np.arange(npix)
    Nn[fb, fb] = np.einsum("bp,bp,bp->b", w, m, m)
    Nn[cp, cp] = w.sum(axis=0)
    Nn[np.ix_(fb, cp)] = w * m
    Nn[np.ix_(cp, fb)] = (w * m).T
    # a common flux change and pixel constants equal to the image are nearly the same
    # thing (not exactly: the star moves); a tiny ridge picks one solution
    Nn[np.diag_indices(K)] += 1e-9 * np.maximum(np.diag(Nn), 1e-300)
    wy, wZ = w * y, w[..., None] * Z
    Ny = np.concatenate([np.einsum("bp,bp->b", wy, m), wy.sum(axis=0)])
    NZ = np.concatenate([np.einsum("bpt,bp->bt", wZ, m), wZ.sum(axis=0)])
    sol = np.linalg.solve(Nn, np.column_stack([Ny, NZ]))
    H = np.einsum("bpt,bpu->tu", wZ, Z) - NZ.T @ sol[:, 1:]
    g = np.einsum("bpt,bp->t", wZ, y) - NZ.T @ sol[:, 0]
    chi2 = float(np.sum(wy * y) - Ny @ sol[:, 0])
    return H, g, chi2, int(np.count_nonzero(w)) - K
