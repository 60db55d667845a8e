"""LinPSFPhotometry: the target and its neighbours fitted together, cadence by cadence.

Per cadence the background-subtracted stamp is modelled as ``sum_k f_k P(x - x_k(t)) + b``:
``P`` is the ``linpsf_shape`` model from the cache (else ``BasePhotometry.prf``, logged), the
positions ``x_k(t)`` are the catalog positions moved by the movement kernel, ``f_k`` the fluxes
of the target and of every catalog neighbour that puts light into the stamp, ``b`` an optional
residual background. Neighbours too faint to matter are subtracted at their catalog flux.

Why these choices (``algorithms.md`` §1.8, §5):

* **Fixed noise model.** Pixel weights are ``1 / median_t(err^2)``, not the cadence's own
  errors: data-dependent Poisson weights bias faint sources, and fixed weights let one
  Cholesky factorisation serve every cadence when no star moves by more than
  ``fixed_tolerance`` px (all cadences are then one multi-right-hand-side solve).
  Otherwise the per-cadence normal matrices are built and solved as one batched call.
* **Priors.** Neighbour fluxes get ``N(catalog flux, (prior_width * flux)^2)`` so that a
  degenerate blend stays near the catalog instead of trading flux with the target; the
  target has no prior (its light curve must not be pulled).
* **Errors** from the diagonal of the inverse normal matrix (the flux covariance).
* **Aperture.** A PRF-shaped aperture (target model above a level chosen to maximise
  completeness + crowding, as psfmachine) gives ``FLFRCSAP`` / ``CROWDSAP`` and the
  centroid; the light-curve flux is the fitted PRF flux.
"""
import logging
import warnings

import numpy as np
from scipy import sparse
from scipy.linalg import cho_factor, cho_solve

from photometry import (AlgorithmFailure, BasePhotometry, ConfigurationError, mag2flux,
                        PixelQualityFlags, STATUS, TESSQualityFlags)

from .model import design_matrices, single_thread_blas
from .stage import load_shape_model, shape_quality_problem
from .timemodel import load_time_model, time_varying_images

__all__ = ["LinPSFPhotometry", "solve_fluxes", "fit_scene", "fit_scene_two_pass",
           "held_fluxes"]

logger = logging.getLogger(__name__)

#: bytes of moving-star designs built at once (see ``do_photometry``); a module constant so
#: tests can make it small
DESIGN_BLOCK_BYTES = 256 * 1024 ** 2


def solve_fluxes(design, data, weights, prior_mu, prior_ivar):
    """Gaussian-prior weighted least squares for every cadence.

    Parameters
    ----------
    design : ndarray, (npix, n) or (N, npix, n)
        One design for all cadences (one factorisation) or one per cadence.
    data : ndarray (N, npix)
        Pixel values (NaN allowed: those pixels get zero weight in that cadence).
    weights : ndarray (npix,)
        Inverse variances of the fixed noise model.
    prior_mu, prior_ivar : ndarray (n,)
        Prior mean and inverse variance per parameter (0 ivar = no prior).

    Returns
    -------
    x, err : ndarray (N, n)
        Solutions and 1-sigma errors (sqrt of the covariance diagonal).
    """
    finite = np.isfinite(data)
    y = np.where(finite, data, 0.0)
    n = design.shape[-1]
    if sparse.issparse(design):
        return _solve_sparse(sparse.csr_matrix(design), y, finite, weights, prior_mu,
                             prior_ivar)
    prior = np.diag(prior_ivar)
    rhs_prior = prior_ivar * prior_mu
    if design.ndim == 2 and finite.all():
        Aw = design * weights[:, None]
        normal = design.T @ Aw + prior
        factor = cho_factor(normal)
        x = cho_solve(factor, (y @ Aw + rhs_prior).T).T
        cov = cho_solve(factor, np.eye(n))
        err = np.broadcast_to(np.sqrt(np.diag(cov)), x.shape).copy()
        return x, err
    W = weights[None, :] * finite                              # (N, npix)
    A = design if design.ndim == 3 else np.broadcast_to(design, (len(y),) + design.shape)
    normal = np.einsum("tpi,tp,tpj->tij", A, W, A) + prior[None]
    rhs = np.einsum("tpi,tp->ti", A, W * y) + rhs_prior[None]
    x = np.linalg.solve(normal, rhs[..., None])[..., 0]
    cov = np.linalg.inv(normal)
    err = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    return x, err


def _factorise(A, weights, prior_ivar):
    """(Cholesky factor, ``A^T W`` as CSR (n x npix), 1-sigma errors) of the normal matrix of
    the sparse design ``A`` with pixel weights and the priors' inverse variances.

    The errors are the inverse's diagonal from the factor (LAPACK potri: 2x cheaper than
    solving for the identity)."""
    from scipy.linalg import lapack
    A = sparse.csc_matrix(A)
    Aw = sparse.csc_matrix((A.data * weights[A.indices], A.indices, A.indptr), shape=A.shape)
    normal = (A.T @ Aw).toarray()
    normal[np.diag_indices_from(normal)] += prior_ivar
    factor = cho_factor(normal)
    err = np.sqrt(np.diag(lapack.dpotri(factor[0], lower=factor[1])[0]))
    return factor, Aw.T.tocsr(), err


def _solve_sparse(A, y, finite, weights, prior_mu, prior_ivar):
    """:func:`solve_fluxes` for one sparse design: one Cholesky factorisation per distinct
    pattern of missing pixels (normally one for all cadences), normal matrix built sparse."""
    N, n = len(y), A.shape[1]
    x = np.empty((N, n))
    err = np.empty((N, n))
    rhs_prior = (prior_ivar * prior_mu)[:, None]
    patterns = {}                      # (np.unique(axis=0) on the masks cost 20 ms a call)
    for t, key in enumerate(np.packbits(finite, axis=1)):
        patterns.setdefault(key.tobytes(), []).append(t)
    for members in patterns.values():
        idx = np.asarray(members)
        factor, Aw, err[idx] = _factorise(A, weights * finite[idx[0]], prior_ivar)
        x[idx] = cho_solve(factor, Aw @ y[idx].T + rhs_prior).T
    return x, err


def fit_scene(images, errors, rows, cols, fluxes, prf, drow=None, dcol=None, good=None,
              origin=(0, 0), prior_width=1.0, free=None, fit_background=True,
              rebuild_tolerance=0.03, taylor=True, bad=None, held=None, static=None,
              designs=None, time_model=None, times=None):
    """Every star of a scene fitted at once, cadence by cadence (scene mode).

    Why: :class:`LinPSFPhotometry` solves one target's stamp, refitting its ~35 neighbours,
    so a crowded CCD fits every star again in every stamp it reaches. Here the whole image
    is one sparse design matrix (``prf.design_matrix``: pixels x stars, one PRF stamp per
    column), with the same fixed noise model and neighbour priors as the per-target solve
    (:func:`solve_fluxes`). Cadences whose star positions agree within
    ``rebuild_tolerance`` px share one design and one Cholesky factorisation; the design is
    rebuilt at each group's mean position (exact PRFs; a 0.15 px drift over a sector is a
    few tens of groups, each a sparse build and a small dense factorisation).

    Parameters
    ----------
    images, errors : ndarray (N, R, C)
        Pixels (sky included if ``fit_background``) and their 1-sigma errors.
    rows, cols : ndarray (K,)
        CCD positions of the stars at zero shift (``origin`` is the CCD position of pixel 0, 0).
    fluxes : ndarray (K,)
        Catalog fluxes: the prior means ``N(flux, (prior_width * flux)^2)``.
    prf : photometry.data.prf.PRFModel
        The shape (``SplinePRF`` of the ``linpsf_shape`` stage, or any PRF model).
    drow, dcol : ndarray (N,) or (N, K), optional
        Position shifts per cadence (per star), e.g. from the movement kernel.
    good : ndarray (N,) of bool, optional
        Cadences the fixed noise model is estimated on (default all).
    free : ndarray (K,) of bool, optional
        Stars with no flux prior (e.g. the targets).
    rebuild_tolerance : float
        px; cadences within this of a group's first cadence (every star) share its design.
    taylor : bool
        Correct each cadence to first order for its offset from the group's mean position
        (PRF gradients from the same table look-up as the design for a ``SplinePRF``, else
        central differences; one extra solve with the same design).
        Why: without it a 0.005 px tolerance already biased bright stars by up to 2 sigma
        in a sawtooth along the drift; with it 0.02-0.03 px groups match the exact positions.
    bad : ndarray (R, C) or (N, R, C) of bool, optional
        Pixels to ignore.
    held : (ndarray (N, K), ndarray (N, K)), optional
        Second pass (:func:`held_fluxes` of a first pass over all cadences: the fluxes held
        and their variance): each star and a constant under its stamp are refitted with every
        other star held (:func:`_held_refit`), as :func:`target_pass` does for one target;
        no joint solve then.
    static : ndarray (R * C,), optional
        Second pass: subtracted from the data (the first pass's ``info["static"]``).
    designs : list, optional
        Second pass: the first pass's ``info["designs"]`` (same cadences and positions), so
        the designs are not built again (they carry the first pass's time terms).
    time_model : photometry_linpsf.timemodel.TimeModel, optional
        The PRF's change in time (``prf`` must be the mean shape it was fitted with): the PRF
        at cadence ``t`` is ``prf + sum_j p_j(t) C_j``, linear in the component designs
        ``C_j``, which are built once per group of cadences (at its position, as the design)
        and enter as a correction term like the first-order position one: the first pass
        subtracts it at the first-pass fluxes and solves again with the same factorisation;
        the second pass subtracts it for every star at the held fluxes, the star's own
        included, and refits the star with its mean-shape column. That is an error of
        ``(flux - held) x p_j C_j``, second order (the component is ~1 % of the PRF at the
        ends of a sector, ``flux - held`` the noise). Why: the shape is the sector-mean PRF;
        on the crowded test scene with a 3 % width ramp the two-pass scene light curves were
        19.6 x the ideal noise with the static shape, 1.07 x with the time model (1.05 x on
        the scene without a ramp; ``docs/linpsf.md``, "Time model").
    times : ndarray (N,), optional
        BTJD of the cadences, required with ``time_model`` (NaN: the mean shape there).

    Returns
    -------
    flux, flux_err : ndarray (N, K)
    background : ndarray (N,) or (N, K)
        The fitted constant level (zeros without ``fit_background``); with ``held`` the
        constant fitted under each star.
    info : dict
        ``n_designs``: designs built (= factorisations for NaN-free data); first pass:
        ``static``, the median residual image over the good cadences (NaN where never
        finite), and ``designs`` (per group of cadences, :func:`_solve_groups`).
    """
    images = np.asarray(images, dtype=float)
    N, R, C = images.shape
    rows, cols, fluxes = (np.atleast_1d(np.asarray(a, dtype=float)) for a in (rows, cols, fluxes))
    K = rows.size
    drow = np.zeros((N, K)) if drow is None else np.broadcast_to(
        np.asarray(drow, float).reshape(N, -1), (N, K))
    dcol = np.zeros((N, K)) if dcol is None else np.broadcast_to(
        np.asarray(dcol, float).reshape(N, -1), (N, K))
    good = np.ones(N, bool) if good is None or not np.any(good) else np.asarray(good, bool)
    coeffs = None                        # (N, degree) p_j(t) of the time model
    if time_model is not None and time_model.degree > 0:
        if times is None or np.shape(times) != (N,):
            raise ValueError(f"fit_scene: a time model needs times (N,) = ({N},) of the "
                             f"cadences, got {None if times is None else np.shape(times)}")
        if not hasattr(prf, "basis"):
            raise ValueError("fit_scene: a time model needs the linpsf_shape SplinePRF it was "
                             f"fitted with, not {type(prf).__name__}")
        coeffs = np.nan_to_num(time_model.coefficients(np.asarray(times, float)))
    var = median_over_cadences(
        np.asarray(errors, float)[good].reshape(np.count_nonzero(good), -1) ** 2)
    weights = np.where(np.isfinite(var) & (var > 0), 1.0 / np.where(var > 0, var, 1), 0.0)
    data = images.reshape(N, -1)
    if bad is not None:
        data = np.where(np.broadcast_to(np.asarray(bad, bool), images.shape).reshape(N, -1),
                        np.nan, data)
    free = np.zeros(K, bool) if free is None else np.asarray(free, bool)
    nb = 1 if fit_background else 0
    mu = np.concatenate([fluxes, np.zeros(nb)])
    width = float(prior_width) * np.abs(fluxes)
    ivar = np.concatenate([np.where(free | (width <= 0), 0.0,
                                    1.0 / np.where(width > 0, width, 1.0) ** 2), np.zeros(nb)])
    # group cadences by position: a new design when any star moved more than the tolerance
    groups, start = [], 0
    for t in range(1, N + 1):
        if t == N or np.max(np.hypot(drow[t] - drow[start], dcol[t] - dcol[start])) \
                > float(rebuild_tolerance):
            groups.append(np.arange(start, t))
            start = t
    if held is not None:
        data = data - (0.0 if static is None else np.asarray(static, float).ravel()[None])
        flux, flux_err, sky = np.empty((N, K)), np.empty((N, K)), np.empty((N, K))
        gain2 = None
        with single_thread_blas():
            if designs is None:
                designs = _solve_groups(groups, prf, rows, cols, drow, dcol, None, weights,
                                        mu, ivar, (R, C), origin, 0, taylor,
                                        time_model=time_model, coeffs=coeffs)
            for group in designs:
                idx = group["cadences"]
                # the position and time terms of every star at the held fluxes, its own
                # included (its column is the mean shape: a second-order error, see above)
                y = data[idx] - group["correction"](held[0][idx])
                flux[idx], flux_err[idx], sky[idx], gain2 = _held_refit(
                    group["design"], y, weights, held[0][idx], held[1][idx], gain2)
        return flux, flux_err, sky, {"n_designs": len(groups)}
    x = np.empty((N, K + nb))
    err = np.empty((N, K + nb))
    with single_thread_blas():
        kept = _solve_groups(groups, prf, rows, cols, drow, dcol, data, weights, mu, ivar,
                             (R, C), origin, nb, taylor, x, err, time_model, coeffs)
    # the part of the scene the model gets wrong the same way at every cadence (shape error
    # at the typical position, uncatalogued stars), for a second pass to subtract
    resid = np.concatenate([data[g["cadences"]] - g["design"].dot(x[g["cadences"]].T).T
                            - g["correction"](x[g["cadences"], :K]) for g in kept])
    static = median_over_cadences(resid[good[np.concatenate([g["cadences"] for g in kept])]])
    background = x[:, K] if nb else np.zeros(N)
    return x[:, :K], err[:, :K], background, {"n_designs": len(groups), "static": static,
                                              "designs": kept}


def fit_scene_two_pass(images, errors, rows, cols, fluxes, prf, drow=None, dcol=None,
                       good=None, window=15, clip=3.0, time_model=None, times=None,
                       **kwargs):
    """:func:`fit_scene`, then its second pass with every star's neighbours held at their
    time-smoothed first-pass fluxes (what ``linpsf_scene`` does block by block).

    ``time_model``, ``times``: the PRF's change in time, applied in both passes (see
    :func:`fit_scene`). Returns the second pass's ``flux, flux_err, sky`` and the first
    pass's ``info``.
    """
    kwargs.update(time_model=time_model, times=times)
    flux, err, _, info = fit_scene(images, errors, rows, cols, fluxes, prf, drow, dcol, good,
                                   **kwargs)
    ok = np.ones(len(flux), bool) if good is None else np.asarray(good, bool)
    held = held_fluxes(flux, err, ok, window, clip)
    flux, err, sky, _ = fit_scene(images, errors, rows, cols, fluxes, prf, drow, dcol, good,
                                  held=held, static=np.nan_to_num(info["static"]),
                                  designs=info.pop("designs"), **kwargs)
    return flux, err, sky, info


def _solve_groups(groups, prf, rows, cols, drow, dcol, data, weights, mu, ivar, shape,
                  origin, nb, taylor, x=None, err=None, time_model=None, coeffs=None):
    """The per-group design builds and solves of :func:`fit_scene` (fills ``x``, ``err``).

    ``data`` None: the designs only (the second pass solves its own way). ``time_model``
    with ``coeffs`` (N, degree), its ``p_j`` at every cadence: the component designs ``C_j``
    are built at each group's position and ``sum_j p_j(t) C_j f`` joins the correction.

    Returns
    -------
    list of dict
        Per group: ``cadences`` (indices), ``design`` (sparse npix x (K + nb), background
        column included), ``correction`` (``f (n, K) -> (n, npix)``, the first-order term of
        each cadence's offset from the group position at fluxes ``f``, plus the time model's
        term; 0 without either) and,
        with data, ``solve`` (``y -> (x, err)`` with the group's factorisation,
        :func:`_group_solver`).
    """
    R, C = shape
    K = rows.size
    kept = []
    comps = [] if coeffs is None else time_model.component_prfs(prf)
    for idx in groups:
        r0, c0 = rows + drow[idx].mean(axis=0), cols + dcol[idx].mean(axis=0)
        dr, dc = drow[idx] - (r0 - rows), dcol[idx] - (c0 - cols)
        first_order = taylor and np.any(np.hypot(dr, dc) > 1e-4)
        A, gr, gc = design_matrices(prf, r0, c0, (R, C), origin, gradients=first_order,
                                    constant=bool(nb))
        # the time model's component designs (npix x K, signed), at the group's position
        cj = [design_matrices(comp, r0, c0, (R, C), origin, gradients=False)[0]
              for comp in comps]
        p = None if coeffs is None else coeffs[idx]

        def correction(f, gr=gr, gc=gc, dr=dr, dc=dc, cj=cj, p=p):
            """d(model)/d(position) x offset at fluxes ``f`` (n, K), the first-order term,
            plus ``sum_j p_j(t) C_j f``, the time model's change of the PRF."""
            if gr is None and not cj:
                return 0.0
            out = 0.0 if gr is None else gr @ (dr * f).T + gc @ (dc * f).T
            for j, comp in enumerate(cj):
                out = out + comp @ (p[:, j, None] * f).T
            return out.T

        group = {"cadences": idx, "design": A, "correction": correction}
        kept.append(group)
        if data is None:
            continue
        solve = _group_solver(A, data[idx], weights, mu, ivar)
        x[idx], err[idx] = solve(data[idx])
        if first_order or cj:
            # first order in the offset from the group's position (and the time terms): the
            # data are corrected at the first-pass fluxes and solved again with the same
            # design (the error of using first-pass fluxes is second order)
            x[idx], err[idx] = solve(data[idx] - correction(x[idx, :K]))
        group["solve"] = solve
    return kept


def _group_solver(A, data, weights, mu, ivar):
    """``y -> (x, err)``: :func:`solve_fluxes` of the sparse design ``A`` for data with the
    missing pixels of ``data``, factorising once when ``data`` has none.

    Why: :func:`_solve_groups` solves every group twice (first pass, then the first-order
    corrected data) with the same normal matrix; building and factorising it was two thirds
    of a solve. Data with missing pixels go through :func:`solve_fluxes` (one factorisation
    per missing-pixel pattern) at every call.
    """
    if not np.isfinite(data).all():
        return lambda y: solve_fluxes(A, y, weights, mu, ivar)
    factor, Aw, err = _factorise(A, weights, ivar)
    rhs_prior = (ivar * mu)[:, None]

    def solve(y):
        x = cho_solve(factor, Aw @ np.asarray(y).T + rhs_prior).T
        return x, np.broadcast_to(err, x.shape).copy()
    return solve


def median_over_cadences(values):
    """Median along axis 0 (cadences) of (N, ...) values, NaN ignored.

    Why not plain ``np.nanmedian``: for short axes it goes through masked arrays, and on the
    usual NaN-free data a partition of contiguous rows is 5x faster; NaN-free data take that
    path, the rest ``np.nanmedian`` (all-NaN columns give NaN, without a warning).
    """
    values = np.asarray(values, dtype=float)
    flat = values.reshape(len(values), -1)
    if len(flat) and np.isfinite(flat).all():
        m, h = len(flat), len(flat) // 2
        part = np.partition(np.ascontiguousarray(flat.T), [h] if m % 2 else [h - 1, h], axis=1)
        out = part[:, h] if m % 2 else 0.5 * (part[:, h - 1] + part[:, h])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = np.nanmedian(flat, axis=0)
    return out.reshape(values.shape[1:])


def smooth_in_time(values, good, window):
    """Savitzky-Golay smoothing (cubic, ``window`` cadences) along axis 0, over good cadences.

    Returns the smoothed values at every cadence (bad ones interpolated) and the factor by
    which the smoother reduces white-noise variance (the sum of its squared central weights).
    The edges get the cubic fitted to the first / last window (scipy's ``mode="interp"``);
    written out because importing ``scipy.signal`` costs more than a scene fit (1.2 s).
    """
    values = np.asarray(values, dtype=float)
    idx = np.flatnonzero(good & np.all(np.isfinite(values), axis=1))
    window = int(window) | 1                       # odd, and no longer than the series
    if window > idx.size:
        window = idx.size if idx.size % 2 else idx.size - 1
    if window < 5:
        return values.copy(), 1.0
    half = window // 2
    V = np.vander(np.arange(-half, half + 1), 4, increasing=True)
    P = np.linalg.pinv(V)                          # samples -> cubic coefficients
    v = values[idx]
    smooth = np.empty_like(v)
    smooth[half:len(v) - half] = np.lib.stride_tricks.sliding_window_view(
        v, window, axis=0) @ P[0]
    smooth[:half] = V[:half] @ (P @ v[:window])
    smooth[len(v) - half:] = V[half + 1:] @ (P @ v[-window:])
    out = np.empty_like(values)
    for j in range(values.shape[1]):
        out[:, j] = np.interp(np.arange(len(values)), idx, smooth[:, j])
    return out, float(P[0] @ P[0])


def held_fluxes(flux, err, good, window, clip):
    """First-pass fluxes smoothed in time, for holding neighbours fixed in a second pass.

    Returns ``held`` (N, K): the Savitzky-Golay smooth of each star (:func:`smooth_in_time`),
    except where a star departs from it by more than ``clip`` sigma (flares, eclipses, fast
    variability: its first-pass value is kept there); and ``var_held``, the variance of the
    held values (the smoother's white-noise reduction times ``err^2``; 0 where the
    first-pass value is kept).
    """
    smooth, reduction = smooth_in_time(flux, good, window)
    deviant = ~(np.abs(flux - smooth) <= clip * err)
    return np.where(deviant, flux, smooth), np.where(deviant, 0.0, reduction * err ** 2)


def _held_refit(A, data, weights, held, var_held, gain2=None):
    """Every star's flux and a constant under its stamp, all other stars held fixed.

    For each star k, over the pixels of its PRF stamp (the stored entries of design column
    k), a 2 x 2 weighted least-squares fit of ``data - sum_{j != k} held_j P_j`` by
    ``f_k P_k + b_k``; every star's normal equations come from a few sparse products.

    Parameters
    ----------
    A : sparse (npix, >= K)
        Design; its first K columns are the stars (a background column after them is ignored).
    data : ndarray (n, npix)
        Pixels (NaN = missing).
    weights : ndarray (npix,)
    held, var_held : ndarray (n, K)
        Held fluxes and their variance (:func:`held_fluxes`).
    gain2 : ndarray (K, K), optional
        ``(d flux_k / d held_j)^2`` from an earlier call (it barely changes between groups
        of cadences); computed when None.

    Returns
    -------
    flux, flux_err, sky : ndarray (n, K)
        ``flux_err`` includes the held stars' noise propagated through the PRF overlaps.
    gain2 : ndarray (K, K)
    """
    K = held.shape[1]
    A = sparse.csc_matrix(A)[:, :K]
    stamp = A.copy()
    stamp.data[:] = 1.0
    finite = np.isfinite(data)
    # per-cadence weights only when pixels are missing (else one set for all cadences)
    W = weights[None, :] * finite if not finite.all() else weights[None, :]
    WR = (W * (np.where(finite, data, 0.0) - (A @ held.T).T)).T
    a_r, f_r = (A.T @ WR).T, (stamp.T @ WR).T
    aa, a1, ff = (A.multiply(A).T @ W.T).T, (A.T @ W.T).T, (stamp.T @ W.T).T
    rhs1, rhs2 = a_r + held * aa, f_r + held * a1          # star k's own light put back
    det = aa * ff - a1 ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = det > 1e-12 * np.maximum(aa * ff, 1e-300)
        flux = np.where(ok, (ff * rhs1 - a1 * rhs2) / det, np.nan)
        sky = np.where(ok, (aa * rhs2 - a1 * rhs1) / det, np.nan)
        var = np.where(ok, ff / det, np.nan)
        if gain2 is None:
            # d flux_k / d held_j with all pixels present: the held stars' noise reaching k
            AW = A.multiply(weights[:, None]).tocsc()
            awa, fwa = (A.T @ AW).toarray(), (stamp.T @ AW).toarray()
            aa0, a10, ff0 = np.diag(awa), A.T @ weights, stamp.T @ weights
            gain = (ff0[:, None] * awa - a10[:, None] * fwa) / (aa0 * ff0 - a10 ** 2)[:, None]
            np.fill_diagonal(gain, 0.0)
            gain2 = np.nan_to_num(gain) ** 2
    return flux, np.sqrt(var + var_held @ gain2.T), sky, gain2


def target_pass(A, data, weights, x, err, t, nfit, good, window, clip, held=None):
    """Second pass: the target's flux (and the background) with its neighbours held at their
    first-pass fluxes smoothed in time.

    Why: in the joint per-cadence solve a blended neighbour trades flux with the target, so
    the target's noise is the conditional one of a joint fit (1.27 x the ideal PRF-weighted
    noise for the blends of the test scene with the true PRF). The first pass is unbiased
    for every star, so its neighbour fluxes smoothed over ``window`` cadences keep their
    variability on longer time scales while their noise, and with it the trade, shrinks by
    the smoother's factor. Cadences where a neighbour departs from its smooth curve by more
    than ``clip`` sigma (a flare, an eclipse, fast variability) keep its first-pass value
    there, which leaves the target's first-pass flux unchanged for that cadence.

    Parameters
    ----------
    A : ndarray (npix, n) or (N, npix, n)
        Design of the first pass (fitted stars, then the background column if any).
    data : ndarray (N, npix)
        Pixels minus the fixed stars and the static residual.
    x, err : ndarray (N, n)
        First-pass solution.
    t : int
        Column of the target; columns ``< nfit`` other than ``t`` are neighbours.

    held : (ndarray, ndarray) (N, nfit - 1), optional
        :func:`held_fluxes` of the neighbours, when they were computed over more cadences
        than these (a block of a longer series).

    Returns
    -------
    x, err : ndarray (N, n)
        ``x`` with the smoothed neighbours and the refitted target / background; ``err`` of
        the target includes the smoothed neighbours' noise propagated to it.
    """
    nb = np.array([j for j in range(nfit) if j != t])
    keep = np.array([t] + list(range(nfit, A.shape[-1])))
    held, var_held = held if held is not None else held_fluxes(x[:, nb], err[:, nb], good,
                                                                window, clip)
    if A.ndim == 2:
        y = data - held @ A[:, nb].T
    else:
        y = data - np.einsum("tpj,tj->tp", A[:, :, nb], held)
    zero = np.zeros(keep.size)
    xk, ek = solve_fluxes(A[..., keep], y, weights, zero, zero)
    # the held neighbours' noise reaches the target through the overlap of the PRFs
    As, An = A[..., keep], A[..., nb]
    if A.ndim == 2:
        gain = np.linalg.solve((As * weights[:, None]).T @ As, (As * weights[:, None]).T @ An)
        gain = np.broadcast_to(gain[0], held.shape)
    else:
        normal = np.einsum("tpi,p,tpj->tij", As, weights, As)
        gain = np.linalg.solve(normal, np.einsum("tpi,p,tpj->tij", As, weights, An))[:, 0]
    out, out_err = x.copy(), err.copy()
    out[:, nb] = held
    out[:, keep] = xk
    out_err[:, keep] = ek
    out_err[:, t] = np.sqrt(ek[:, 0] ** 2 + np.sum(gain ** 2 * var_held, axis=1))
    return out, out_err


#: name of the prepare stage of the scene mode (``linpsf.mode = 'scene'``) and its cache group
SCENE = "linpsf_scene"


class LinPSFPhotometry(BasePhotometry):
    """Simultaneous linear PRF photometry of a target and its neighbours (see module doc)."""

    name = "linpsf"
    version = "1.0"
    flux_kind = "total"

    # ------------------------------------------------------------------ model
    def _shape_model(self):
        """(PRFModel, description): the cache's linpsf_shape model, else ``self.prf``."""
        group = None
        if hasattr(self.source, "model_group"):
            group = self.source.model_group("linpsf_shape")
        model = load_shape_model(group)
        if model is not None:
            return model, "linpsf_shape"
        logger.info("TIC %d: no linpsf_shape model in the data source; using the %s PRF",
                    self.starid, self.psettings.get("prf", "analytic"))
        return self.prf, f"prf:{getattr(self.prf, 'name', 'prf')}"

    def _time_model(self, model_name):
        """The shape model's time model when the stage found a significant one, else None."""
        if model_name != "linpsf_shape":
            return None
        return load_time_model(self.source.model_group("linpsf_shape"))

    def _grow_stamp(self, cfg):
        """The default stamp grown by ``stamp_margin`` px per side (room for the neighbours'
        PRFs); a TPF's stamp is what it is."""
        margin = int(cfg["stamp_margin"])
        if margin > 0 and self.datasource != "tpf":
            self.resize_stamp(down=margin, up=margin, left=margin, right=margin)

    def _set_prf_aperture(self, target_img, tflux, others, bad):
        """The PRF-shaped aperture (:func:`_prf_aperture`) as ``final_phot_mask``, with its
        ``FLFRCSAP`` / ``CROWDSAP`` / ``PSF_CONT`` headers; returns the aperture."""
        aperture, completeness, crowding = _prf_aperture(target_img, tflux, others, bad)
        self.final_phot_mask = aperture
        self.additional_headers.update({
            "FLFRCSAP": (float(completeness), "fraction of target PRF flux in aperture"),
            "CROWDSAP": (float(crowding), "fraction of aperture model flux from target"),
            "PSF_CONT": (float(1 - crowding) if np.isfinite(crowding) else float("nan"),
                         "PSF contamination in the PRF aperture"),
        })
        return aperture

    def _images(self, prf, rows, cols, shape, origin):
        """(n, r, c) unit-flux PRF images of stars at CCD ``rows, cols`` over the stamp.

        One vectorised ``prf.stamps`` call for all positions (all stars of all cadences at
        once when the positions move), then a scatter into the stamp grid.
        """
        rows = np.atleast_1d(np.asarray(rows, dtype=float))
        cols = np.atleast_1d(np.asarray(cols, dtype=float))
        R, C = shape
        out = np.zeros((rows.size, R * C))
        if rows.size == 0:
            return out.reshape(0, R, C)
        size = int(prf.default_size())
        vals, r0, c0 = prf.stamps(rows, cols, size)
        steps = np.arange(size)
        rr = ((r0 - origin[0])[:, None] + steps[None, :])[:, :, None]
        cc = ((c0 - origin[1])[:, None] + steps[None, :])[:, None, :]
        ok = (rr >= 0) & (rr < R) & (cc >= 0) & (cc < C)
        star = np.broadcast_to(np.arange(rows.size)[:, None, None], vals.shape)
        flat = np.broadcast_to(rr * C + cc, vals.shape)
        out[star[ok], flat[ok]] = vals[ok]
        return out.reshape(rows.size, R, C)

    def _sources(self, cfg, prf, shape, origin):
        """(fitted index array, subtracted index array, catalog fluxes) of the catalog stars."""
        cat = self.catalog
        tmag = np.asarray(cat["tmag"], dtype=float)
        flux = mag2flux(tmag)
        imgs = self._images(prf, np.asarray(cat["row"], float), np.asarray(cat["column"], float),
                            shape, origin)
        in_stamp = imgs.reshape(len(cat), -1).sum(axis=1) * flux
        is_target = np.asarray(cat["starid"]) == self.starid
        if not is_target.any():
            raise AlgorithmFailure(f"TIC {self.starid}: the target is not in its stamp catalog")
        fit = is_target | ((tmag <= self.target["tmag"] + float(cfg["max_delta_mag"]))
                           & (in_stamp >= float(cfg["min_stamp_flux"])))
        order = np.argsort(np.where(is_target, -np.inf, -in_stamp), kind="stable")
        fitted = [k for k in order if fit[k]][:int(cfg["max_sources"])]
        rest = np.setdiff1d(np.arange(len(cat)), fitted)
        rest = rest[in_stamp[rest] > 0]
        return np.asarray(fitted, dtype=int), rest, flux

    def _decline_saturated(self):
        """Refuse a saturated target (reason code SATURATED; the method policy gives those to
        aperture). Why: the PRF model describes none of the charge that bled along the
        columns, so a fit to the unsaturated wings returned about half the flux of the real
        saturated Pi Men (0.485 x SPOC's SAP_FLUX), with a reduced chi^2 of 999."""
        saturated = self.saturated_target_pixels()
        if saturated is not None:
            self.decline("SATURATED", f"{int(saturated.sum())} saturated pixels (core and "
                         "bleed columns) that the PRF model does not describe; use the "
                         "aperture method")

    # ------------------------------------------------------------------ algorithm
    def do_photometry(self):
        cfg = self.settings["linpsf"]
        self._decline_saturated()
        if cfg.get("mode", "target") != "target":   # scene mode: read the prepare-time fit
            return scene_photometry(self)
        status = STATUS.OK
        self._grow_stamp(cfg)
        prf, model_name = self._shape_model()
        time_model = self._time_model(model_name)
        quality = shape_quality_problem(self.source.model_group("linpsf_shape"), cfg) \
            if model_name == "linpsf_shape" else None
        if quality:
            # the CCD's model failed its own check: the flux may be biased or noisy
            self.report_flag("SHAPE_MODEL", quality)
        images = np.asarray(self.images_cube, dtype=float)
        N, R, C = images.shape
        origin = (self.stamp[0], self.stamp[2])
        fitted, rest, cat_flux = self._sources(cfg, prf, (R, C), origin)
        cat = self.catalog
        nfit = fitted.size

        # positions per cadence (movement kernel) and whether they can be treated as fixed
        rows0 = np.asarray(cat["row"], dtype=float)
        cols0 = np.asarray(cat["column"], dtype=float)
        drow = np.zeros((N, len(cat)))
        dcol = np.zeros((N, len(cat)))
        if self.movement_kernel is not None:
            for i in range(N):
                drow[i], dcol[i] = self.movement_at(rows0, cols0, i)
        elif self.datasource == "tpf":
            pos = np.asarray(self.lightcurve["pos_corr"], dtype=float)
            if np.all(np.isfinite(pos)):
                dcol[:] = pos[:, :1]
                drow[:] = pos[:, 1:2]
        # frames without a motion measurement (NaN pos_corr / kernel row) get the median
        # position, not the reference one (the kernel returns 0 shift there)
        pos = np.asarray(self.lightcurve["pos_corr"], dtype=float)
        unknown = ~np.all(np.isfinite(pos), axis=1)
        if unknown.any() and not unknown.all():
            drow[unknown] = np.median(drow[~unknown], axis=0)
            dcol[unknown] = np.median(dcol[~unknown], axis=0)
        mean_dr, mean_dc = np.median(drow, axis=0), np.median(dcol, axis=0)
        moving = np.max(np.hypot(drow - mean_dr, dcol - mean_dc)) > float(cfg["fixed_tolerance"])
        moving = moving or time_model is not None       # the PRF changes from cadence to cadence

        # data, fixed noise model, bad pixels
        nbkg = 1 if bool(cfg["fit_background"]) else 0
        good = TESSQualityFlags.filter(self.quality)
        if not good.any():
            good[:] = True
        # with a fitted background level, the background model's error (common to all
        # pixels) is not pixel noise: BasePhotometry.pixel_err_cube
        errors = self.pixel_err_cube if nbkg else self.images_err_cube
        var = median_over_cadences(np.asarray(errors, float)[good] ** 2)
        bad = (np.asarray(self.pixelflags_cube) & PixelQualityFlags.PRF_FIT_BITMASK) != 0
        data = np.where(bad, np.nan, images).reshape(N, -1)
        weights = np.where(np.isfinite(var) & (var > 0), 1.0 / np.where(var > 0, var, 1), 0.0)
        weights = weights.ravel()
        if not np.any(weights > 0):
            raise AlgorithmFailure(f"TIC {self.starid}: no pixel with a finite error")

        n = nfit + nbkg
        is_target = np.asarray(cat["starid"])[fitted] == self.starid
        mu = np.zeros(n)
        ivar = np.zeros(n)
        mu[:nfit] = cat_flux[fitted]
        width = float(cfg["prior_width"]) * cat_flux[fitted]
        ivar[:nfit] = np.where(is_target, 0.0, 1.0 / width ** 2)

        def design_at(dr, dc):
            imgs = self._images(prf, np.concatenate([rows0[fitted] + dr[fitted],
                                                     rows0[rest] + dr[rest]]),
                                np.concatenate([cols0[fitted] + dc[fitted],
                                                cols0[rest] + dc[rest]]), (R, C), origin)
            A = imgs[:nfit].reshape(nfit, -1).T
            if nbkg:
                A = np.hstack([A, np.ones((R * C, 1))])
            fixed = (cat_flux[rest, None, None] * imgs[nfit:]).sum(axis=0).ravel()
            return A, fixed

        order = np.concatenate([fitted, rest])

        def moving_design(idx):
            """Design and fixed stars of cadences ``idx``: each star at each cadence in one
            PRF evaluation."""
            imgs = time_varying_images(
                prf, time_model, (rows0[order][None, :] + drow[idx][:, order]).ravel(),
                (cols0[order][None, :] + dcol[idx][:, order]).ravel(),
                np.repeat(self.time[idx], order.size), (R, C), origin,
                self._images).reshape(len(idx), order.size, R * C)
            A = np.transpose(imgs[:, :nfit], (0, 2, 1))
            if nbkg:
                A = np.concatenate([A, np.ones((len(idx), R * C, 1))], axis=2)
            return A, np.einsum("k,tkp->tp", cat_flux[rest], imgs[:, nfit:])

        # Memory: the moving designs take (fitted + all stars) x pixels x 8 bytes per cadence
        # (~0.4 MB: 4.7 GB at 11 800 cadences). Beyond DESIGN_BLOCK_BYTES they are built for
        # blocks of cadences, again in each pass, so a worker's memory stays bounded; every
        # step is per cadence (the static image and the held fluxes are computed over all
        # cadences between the passes), so the light curves are the same.
        per_cadence = 8 * R * C * (nfit + nbkg + order.size)
        if not moving:
            A, fixed = design_at(mean_dr, mean_dc)
            blocks = [(np.arange(N), A, np.broadcast_to(fixed, (N, R * C)))]
        elif per_cadence * N <= DESIGN_BLOCK_BYTES:
            blocks = [(np.arange(N),) + moving_design(np.arange(N))]
        else:
            size = max(1, DESIGN_BLOCK_BYTES // per_cadence)
            blocks = [idx for idx in np.array_split(np.arange(N), -(-N // size))]

        def designs():
            for block in blocks:
                yield block if isinstance(block, tuple) else (block,) + moving_design(block)

        def predict(A, fixed, x):
            return (x @ A.T if A.ndim == 2 else np.einsum("tpi,ti->tp", A, x)) + fixed

        # Static residual correction: the median residual image over good cadences is the
        # part of the scene the PRF model gets wrong (shape errors, uncatalogued stars); it is
        # constant in time, so it is subtracted and the fluxes solved again. Why: a shape
        # error of 0.1 % of the flux per pixel is hundreds of sigma for a bright star and
        # would otherwise leak into every flux as the stars move over the pixels.
        static = np.zeros(R * C)
        x, err, model = np.empty((N, n)), np.empty((N, n)), np.empty((N, R * C))
        for _ in range(int(cfg["residual_iterations"]) + 1):
            for idx, A, fixed in designs():
                x[idx], err[idx] = solve_fluxes(A, data[idx] - fixed - static[None], weights,
                                                mu, ivar)
                model[idx] = predict(A, fixed, x[idx])
            static = np.nan_to_num(median_over_cadences((data - model)[good])) + static
        t = int(np.flatnonzero(is_target)[0])
        window = int(cfg["neighbour_smoothing"])
        second = window > 2 and nfit > 1
        if second:
            nb = np.array([j for j in range(nfit) if j != t])
            held = held_fluxes(x[:, nb], err[:, nb], good, window, float(cfg["neighbour_clip"]))
        target_col = np.empty((N, R * C))
        n_blocks = len(blocks)
        for idx, A, fixed in designs():
            if second:
                x[idx], err[idx] = target_pass(A, data[idx] - fixed - static[None], weights,
                                               x[idx], err[idx], t, nfit, good[idx], window,
                                               float(cfg["neighbour_clip"]),
                                               held=(held[0][idx], held[1][idx]))
                model[idx] = predict(A, fixed, x[idx])
            target_col[idx] = A[:, t] if A.ndim == 2 else A[:, :, t]
        del blocks, A, fixed
        model = model + static[None]
        self.static_residual = static.reshape(R, C)
        flux, flux_err = x[:, t], err[:, t]
        bkg_fit = x[:, nfit] if nbkg else np.zeros(N)
        resid = (data - model).reshape(N, R, C)
        self.residuals_cube = resid
        self.model_cube = model.reshape(N, R, C)

        # PRF-shaped aperture from the reference-position models and the mean fluxes
        ref = self._images(prf, rows0[fitted], cols0[fitted], (R, C), origin)
        mean_flux = np.nanmedian(x[good][:, :nfit], axis=0)
        target_img = ref[t]
        self.target_model_image = target_img      # what the core's expected noise weights
        others = np.tensordot(np.delete(mean_flux, t), np.delete(ref, t, axis=0), axes=1)
        if rest.size:
            others = others + np.tensordot(
                cat_flux[rest], self._images(prf, rows0[rest], cols0[rest], (R, C), origin), 1)
        tflux = max(float(mean_flux[t]), 0.0)
        aperture = self._set_prf_aperture(target_img, tflux, others, bad.all(0))

        # centroid of the target-only image in the aperture, background in the aperture
        contrib = x[:, t, None] * target_col
        target_only = (data - model + contrib).reshape(N, R, C)
        rr, cc = np.mgrid[0:R, 0:C]
        w = np.where(aperture[None] & np.isfinite(target_only), target_only, 0.0)
        w = np.clip(w, 0, None)
        tot = w.sum(axis=(1, 2))
        with np.errstate(all="ignore"):
            cen_r = (w * rr).sum(axis=(1, 2)) / tot + origin[0]
            cen_c = (w * cc).sum(axis=(1, 2)) / tot + origin[1]
        background = np.asarray(self.backgrounds_cube, float)[:, aperture].sum(axis=1) \
            + bkg_fit * np.count_nonzero(aperture)

        lc = self.lightcurve
        lc["flux"] = flux
        lc["flux_err"] = flux_err
        lc["flux_background"] = background
        lc["pos_centroid"] = np.column_stack([cen_c, cen_r])

        # model quality: reduced chi^2 and residual RMS relative to the target peak
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            chi2 = float(np.nanmean((resid[good] ** 2) * weights.reshape(R, C)[None]))
            # the same over the target's PRF aperture: what its flux rests on (a neighbour's
            # bleed far from the target raises the stamp's chi^2, not the target's error)
            chi2_ap = float(np.nanmean(((resid[good] ** 2) * weights.reshape(R, C)[None])
                                       [:, aperture]))
            rrms = float(np.sqrt(np.nanmean(np.nanmean(resid[good], axis=0)[aperture] ** 2))
                         / max(tflux * target_img.max(), 1e-12))
            # the misfit beyond the noise relative to the target's own model in the aperture:
            # chi^2 - 1 = misfit^2 x mean(model^2 / var), so a bright star's percent-level
            # shape error (chi^2 of tens) and a failed fit (the same chi^2 on a faint star,
            # or hundreds on a bright one) are told apart
            snr2 = float(np.mean(((tflux * target_img) ** 2 * weights.reshape(R, C))[aperture]))
            misfit = float(np.sqrt(max(chi2_ap - 1.0, 0.0) / snr2)) if snr2 > 0 else np.inf
        self.details["linpsf"] = {"model": model_name, "n_sources": int(nfit),
                                  "n_subtracted": int(rest.size), "moving": bool(moving),
                                  "time_model": time_model is not None,
                                  "design_blocks": int(n_blocks),
                                  "chi2": chi2, "chi2_aperture": chi2_ap,
                                  "misfit": misfit, "residual_rms": rrms,
                                  "model_quality": quality or "ok"}
        if tflux <= 0:
            self.report_flag("FLUX_NOT_POSITIVE", "fitted target flux is not positive")
            status = STATUS.WARNING
        if not (chi2_ap <= float(cfg["max_chi2"]) or misfit <= float(cfg["max_misfit"])):
            # the model does not describe the target's pixels: its flux cannot be trusted
            self.report_flag("FIT_CHI2", f"reduced chi^2 {chi2_ap:.4g} in the target's "
                             f"aperture (misfit {misfit:.3g} of its model) above "
                             f"linpsf.max_chi2 = {cfg['max_chi2']} and max_misfit = "
                             f"{cfg['max_misfit']}", STATUS.ERROR)
        self.additional_headers.update({
            "PSF_NSRC": (int(nfit), "PSF stars fitted simultaneously"),
            "PSF_NSUB": (int(rest.size), "PSF faint stars subtracted at catalog flux"),
            "PSF_MODL": (model_name, "PSF shape model used"),
            "PSF_CHI2": (chi2, "PSF mean reduced chi^2 of the stamp fit"),
            "PSF_CHIA": (chi2_ap, "PSF mean reduced chi^2 in the PRF aperture"),
            "PSF_MISF": (misfit, "PSF rms misfit beyond noise / target model"),
            "PSF_RRMS": (rrms, "PSF mean residual RMS / target peak in aperture"),
            "PSF_MOVE": (bool(moving), "PSF positions follow the movement kernel"),
            "PSF_TIME": (time_model is not None, "PSF shape follows the time model"),
        })
        return status


def _prf_aperture(target, tflux, others, bad, n_levels=40):
    """Aperture maximising completeness + crowding over isophotes of the target PRF.

    Returns (mask, FLFRCSAP, CROWDSAP). ``target`` is the unit-flux PRF image (its stamp sum
    is the fraction of the flux falling in the stamp), ``others`` the model flux of every
    other star.
    """
    levels = np.quantile(target[target > 0], np.linspace(0.0, 0.98, n_levels)) \
        if np.any(target > 0) else [0.0]
    best = (-np.inf, None, np.nan, np.nan)
    for level in levels:
        mask = (target >= level) & (target > 0) & ~bad
        if not mask.any():
            continue
        comp = float(target[mask].sum())
        tot = tflux * comp + float(others[mask].sum())
        crowd = tflux * comp / tot if tot > 0 else 0.0
        score = comp + crowd
        if score > best[0]:
            best = (score, mask, comp, crowd)
    if best[1] is None:
        mask = np.zeros(target.shape, bool)
        mask[np.unravel_index(np.argmax(target), target.shape)] = True
        return mask, float(target[mask].sum()), np.nan
    return best[1], best[2], best[3]


def scene_photometry(phot):
    """Fill a :class:`LinPSFPhotometry`'s light curve from the ``linpsf_scene`` result.

    The flux and its error are the stored scene fit of the target; the aperture (and with it
    ``FLFRCSAP``, ``CROWDSAP``, ``flux_background``) is the per-target mode's PRF-shaped one,
    with the neighbours at their scene median fluxes. ``pos_centroid`` stays NaN: a measured
    centroid needs the other stars' models at every cadence, i.e. the stamp fit this mode
    avoids. No stamp correction enters the fluxes (the scene was fitted at prepare time).

    Returns
    -------
    STATUS
        OK, or WARNING when the target's median flux is not positive.

    Raises
    ------
    ConfigurationError
        ``linpsf.mode`` is neither "target" nor "scene".
    AlgorithmFailure
        No scene result in the data source, or the target is not in it.
    """
    cfg = phot.settings["linpsf"]
    mode = str(cfg.get("mode", "target"))
    if mode != "scene":
        raise ConfigurationError(f"linpsf.mode = {mode!r}: must be 'target' or 'scene'")
    group = phot.source.model_group(SCENE) if hasattr(phot.source, "model_group") else None
    if group is None or not bool(group.attrs.get("usable", False)):
        raise AlgorithmFailure(
            f"TIC {phot.starid}: linpsf.mode = 'scene' but the data source has no {SCENE} "
            f"result; add \"{SCENE}\" to prepare.stages (after \"linpsf_shape\") and prepare "
            f"the cache again")
    ids = np.asarray(group["starid"][()])
    hit = np.flatnonzero(ids == phot.starid)
    if hit.size == 0:
        raise AlgorithmFailure(
            f"TIC {phot.starid}: not in the {SCENE} result (Tmag {phot.target['tmag']:.2f}; "
            f"the stage fits Tmag <= {float(group.attrs['tmag_max']):g} on the CCD)")
    k = int(hit[0])
    frames = phot._frames                 # the source frames BasePhotometry keeps
    flux = np.asarray(group["flux"][:, k], dtype=float)[frames]
    flux_err = np.asarray(group["flux_err"][:, k], dtype=float)[frames]
    tile = int(group["tile"][k])
    bkg_fit = np.asarray(group["sky"][:, k], dtype=float)[frames]

    # the per-target mode's stamp and PRF-shaped aperture, neighbours at their scene fluxes
    phot._grow_stamp(cfg)
    prf, _ = phot._shape_model()
    cat = phot.catalog
    r1, r2, c1, c2 = phot.stamp
    imgs = phot._images(prf, np.asarray(cat["row"], float), np.asarray(cat["column"], float),
                        (r2 - r1, c2 - c1), (r1, c1))
    mean = mag2flux(np.asarray(cat["tmag"], float))
    med = np.asarray(group["flux_median"][()])
    sorter = np.argsort(ids)
    pos = np.clip(np.searchsorted(ids, np.asarray(cat["starid"]), sorter=sorter), 0,
                  len(ids) - 1)
    known = ids[sorter[pos]] == np.asarray(cat["starid"])
    mean[known] = np.where(np.isfinite(med[sorter[pos[known]]]), med[sorter[pos[known]]],
                           mean[known])
    t = int(np.flatnonzero(np.asarray(cat["starid"]) == phot.starid)[0])
    tflux = max(float(mean[t]), 0.0)
    others = np.tensordot(np.delete(mean, t), np.delete(imgs, t, axis=0), axes=1)
    bad = ((np.asarray(phot.pixelflags_cube) & PixelQualityFlags.PRF_FIT_BITMASK)
           != 0).all(axis=0)
    aperture = phot._set_prf_aperture(imgs[t], tflux, others, bad)
    npix = np.count_nonzero(aperture)
    background = bkg_fit * npix
    if group.attrs.get("background_model", ""):
        background = background + np.asarray(phot.backgrounds_cube, float)[:, aperture].sum(1)

    lc = phot.lightcurve
    lc["flux"] = flux
    lc["flux_err"] = flux_err
    lc["flux_background"] = background
    lc["pos_centroid"] = np.full((len(flux), 2), np.nan)
    if phot.details.get("corrections"):
        logger.info("TIC %d: stamp corrections %s are not in the scene fluxes (fitted at "
                    "prepare time)", phot.starid, phot.details["corrections"])
    n_src = int(group["tile_fitted"][tile])
    model = str(group.attrs.get("prf_model", ""))
    timed = bool(group.attrs.get("time_model", False))
    phot.details["linpsf"] = {"mode": "scene", "model": model, "tile": tile,
                              "n_sources": n_src, "time_model": timed}
    phot.additional_headers.update({
        "PSF_NSRC": (n_src, "PSF stars fitted simultaneously (scene tile)"),
        "PSF_MODL": (model, "PSF shape model used"),
        "PSF_MOVE": (bool(group.attrs.get("moving", False)),
                     "PSF positions follow the movement kernel"),
        "PSF_TIME": (timed, "PSF shape follows the time model"),
        "PSF_MODE": ("scene", "PSF fluxes from the prepare-time scene fit"),
        "PSF_TILE": (tile, "PSF scene tile that owns the target"),
    })
    if not tflux > 0:
        logger.warning("TIC %d: scene flux of the target is not positive", phot.starid)
        return STATUS.WARNING
    quality = shape_quality_problem(phot.source.model_group("linpsf_shape"),
                                    phot.settings["linpsf"]) if model == "linpsf_shape" else None
    phot.details["linpsf"]["model_quality"] = quality or "ok"
    if quality:
        phot.report_flag("SHAPE_MODEL", quality)     # the CCD's model failed its check
        return STATUS.WARNING
    return STATUS.OK
