"""Scenes made outside ``tessphot simulate``'s code path, for tests and benchmarks.

Why: an algorithm developed and judged on one simulator learns that simulator (issue 16:
linpsf was 1.147x the ideal noise on a scene made elsewhere, 1.04x on ours). This generator
shares no rendering, motion, WCS or catalog code with :mod:`photometry.sim.simulate`:

* **PRF**: any :class:`photometry.data.prf.PRFModel` (the SPOC models, the :class:`~photometry.prf.
  FieldPRF` families), with a focus change for the families (:meth:`FieldPRF.focused`).
* **Motion**: an affine :class:`photometry.data.movement.MovementKernel` about a boresight far off
  the cutout (rotation and plate-scale drift, so stars move differently), a curved drift in
  both axes, momentum-dump jumps, random jitter between frames *and within* each exposure
  (every frame is the mean of ``smear`` sub-exposures jittered about the kernel's position:
  the data's PRF is blurred, differently in every frame, as in real FFIs).
* **WCS / catalog**: a rotated TAN WCS (21 arcsec px, not aligned with the pixel axes) gives
  the catalog's ra/dec; row/column are the reference-frame positions (``catalog_error`` adds
  astrometric errors to them).
* **Crowding**: a steeper luminosity function than ``simulate``'s (counts ~ 10**(0.35 Tmag)),
  a configurable density, isolated stars placed per magnitude bin (no star brighter than
  Tmag + 3 within 4 px), and one blended pair at ``blend_sep`` px.
* **Noise**: photon noise of stars and sky (a tilted plane), read noise; the ``errors`` cube is
  the true per-pixel sigma; half the field stars and some isolated ones vary (sinusoids).

``truth["ideal_noise"]`` is the ideal PRF-weighted photon noise of each star (e-/s per cadence):
``1 / sqrt(sum_p P_p^2 / var_p)`` with the true PRF at the star's mean position and the
expected variance of each pixel (all stars, sky and read noise), the floor a PSF fit can reach.
"""
import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from photometry.data.memory_source import MemorySource
from photometry.data.movement import MovementKernel
from photometry.hooks.utilities import mag2flux

__all__ = ["make_foreign_scene", "smooth_prf", "sample_roughness"]


def smooth_prf(prf, sigma):
    """A copy of a sampled PRF whose super-samples are convolved with a Gaussian of ``sigma`` px.

    Why (issue 16): the SPOC PRF files' super-samples carry sample-to-sample noise (in the
    core, fourth differences of white noise of 5.7e-4 of the flux per sample, 0.2 % of the
    peak; the analytic families' 4e-6, :func:`sample_roughness`). A star drifting over those
    0.11 px wiggles changes its fitted flux in a way no smooth model follows (and, we expect,
    no real star's PRF does): a scene with them as its truth measures a learned smooth model
    against the files' noise (docs/linpsf.md "Session 6"). ``sigma = 2 / 9`` px (two SPOC
    samples, the benchmark's ``spoc_smooth``) leaves 1.4e-5, one sample 4.9e-5. Every
    sub-pixel lattice keeps its unit sum (the convolution of unit lattice sums); the support
    grows by ``4 sigma``; the second moments by ``sigma**2`` (more near the files' box edge).

    Parameters
    ----------
    prf : photometry.data.prf.SampledPRF
        E.g. :class:`~photometry.data.prf.SpocPRF` or :class:`~photometry.data.prf.FieldPRF`.
    sigma : float
        Gaussian standard deviation, px.
    """
    from scipy.ndimage import gaussian_filter

    from photometry.data.prf import SampledPRF

    _ensure_all(prf)
    s = float(sigma) * prf.nsamp
    pad = int(np.ceil(4.0 * s))
    models = np.pad(prf.models, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    models = gaussian_filter(models, (0, 0, s, s), mode="constant", truncate=4.0)
    return SampledPRF(models, prf.grid_rows, prf.grid_cols, prf.nsamp,
                      (prf.center[0] + pad, prf.center[1] + pad))


def _ensure_all(prf):
    """Tabulate every grid model of a (lazy) sampled PRF."""
    gr, gc = prf.grid_rows.size, prf.grid_cols.size
    prf._ensure(np.arange(gr).repeat(gc), np.tile(np.arange(gc), gr))


def sample_roughness(prf, radius=2.0):
    """Sample-to-sample noise of a sampled PRF (see :func:`smooth_prf`).

    The rms per sample (fraction of the flux) of white noise with the same fourth
    differences as the samples within ``radius`` px of the star, median over the grid
    models. A smooth PRF's fourth differences are ~h^4 times its fourth derivative
    (h = 1 / nsamp): tiny.
    """
    _ensure_all(prf)
    k = int(round(radius * prf.nsamp))
    (cr, cc), out = prf.center, []
    for model in prf.models.reshape(-1, *prf.models.shape[2:]):
        core = model[cr - k:cr + k + 1, cc - k:cc + k + 1]
        d4 = np.concatenate([np.diff(core, 4, axis=0).ravel(), np.diff(core, 4, axis=1).ravel()])
        out.append(np.sqrt(np.mean(d4 ** 2) / 70.0))      # 70 = sum of (1, 4, 6, 4, 1)^2
    return float(np.median(out))


def _wcs(origin, shape, rotation_deg=23.0):
    """A TAN WCS rotated by ``rotation_deg``, 21 arcsec px, centred on the cutout (0-based)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [84.3, -62.1]
    w.wcs.crpix = [origin[1] + shape[1] / 2 + 1, origin[0] + shape[0] / 2 + 1]
    a = np.deg2rad(rotation_deg)
    scale = 21.0 / 3600
    w.wcs.cd = scale * np.array([[-np.cos(a), np.sin(a)], [np.sin(a), np.cos(a)]])
    return w


def _place_isolated(rng, shape, origin, tmags, margin, min_sep):
    """Positions of stars of ``tmags`` at least ``min_sep`` px from each other and the edges."""
    rows, cols = [], []
    for _ in tmags:
        for _try in range(5000):
            r = rng.uniform(origin[0] + margin, origin[0] + shape[0] - 1 - margin)
            c = rng.uniform(origin[1] + margin, origin[1] + shape[1] - 1 - margin)
            if all(np.hypot(r - r2, c - c2) >= min_sep for r2, c2 in zip(rows, cols)):
                break
        else:
            raise ValueError(f"foreign scene: {len(tmags)} isolated stars do not fit "
                             f"{min_sep} px apart in a {shape[0]} x {shape[1]} px cutout")
        rows.append(r)
        cols.append(c)
    return np.array(rows), np.array(cols)


def _kernel(rng, time, quality, shape, jitter, drift, dump_every, dump_jump, rotation, scale):
    """(N, 6) affine movement kernel (cube pixels, x = column) about a far boresight."""
    n = time.size
    u = (time - time[0]) / max(time[-1] - time[0], 1e-9)            # 0..1
    dx = drift * (u - 0.5) + 0.4 * drift * (u - 0.5) ** 2
    dy = -0.7 * drift * (u - 0.5) + 0.3 * drift * np.sin(3 * u)
    if dump_every > 0:
        k = np.floor((time - time[0]) / dump_every)
        jumps = rng.uniform(-dump_jump, dump_jump, (int(k.max()) + 1, 2))
        jumps[0] = 0.0
        dx, dy = dx + np.cumsum(jumps[:, 0])[k.astype(int)], dy + np.cumsum(jumps[:, 1])[
            k.astype(int)]
        first = np.flatnonzero(np.diff(k) > 0) + 1
        quality[first] |= 32                                           # reaction wheel desat
    dx = dx + rng.normal(0, jitter, n)
    dy = dy + rng.normal(0, jitter, n)
    theta = rotation * (u - 0.5)
    s = scale * (u - 0.5)
    kern = np.column_stack([dx, dy, s + np.cos(theta) - 1, -np.sin(theta),
                            np.sin(theta), s + np.cos(theta) - 1])
    ref = int(np.argmin(np.abs(u - 0.5)))
    kern -= kern[ref]                                                 # reference frame: zero
    return kern, ref


def make_foreign_scene(prf, *, seed=0, shape=(64, 64), origin=(700, 900), n=60,
                       cadence_s=1800.0, density=0.02, tmag_range=(7.5, 17.0),
                       isolated_per_bin=3, variable_isolated_per_bin=1, blend_sep=1.6,
                       sky=150.0, read_noise=10.0, jitter=0.01, drift=0.05, dump_every=1.1,
                       dump_jump=0.05, rotation=5e-5, scale=3e-5, smear=3,
                       smear_jitter=0.01, focus_change=0.0, catalog_error=0.0):
    """A MemorySource scene and its truth (see the module docstring).

    Parameters
    ----------
    prf : photometry.data.prf.PRFModel
        The true PRF (e.g. :class:`~photometry.data.prf.SpocPRF`, :class:`~photometry.data.prf.FieldPRF`).
    shape, origin : (int, int)
        Cutout size and 0-based CCD (row, column) of its first pixel.
    n, cadence_s : int, float
        Frames and seconds per frame.
    density : float
        Field stars per pixel (cutout + 6 px margin) over ``tmag_range``.
    isolated_per_bin, variable_isolated_per_bin : int
        Isolated constant / variable stars per magnitude bin 8-9 ... 12-13.
    blend_sep : float
        Separation (px) of one blended pair (Tmag 10 and 10.8, both variable); 0 = none.
    jitter, drift, dump_every, dump_jump : float
        Frame-to-frame jitter rms (px), peak-to-peak drift (px), days between momentum dumps,
        max jump per axis at a dump (px).
    rotation, scale : float
        Peak-to-peak rotation (rad) and plate-scale change of the affine motion.
    smear, smear_jitter : int, float
        Sub-exposures per frame and their jitter rms (px) about the frame's position.
    focus_change : float
        Peak-to-peak relative PRF width change (linear ramp); needs ``prf.focused``.
    catalog_error : float
        rms (px) of the catalog positions' error (0 = exact).

    Returns
    -------
    source : MemorySource
    truth : dict
        ``rows, cols`` (true reference positions, CCD), ``tmag``, ``flux`` (K, N) true fluxes,
        ``amp``, ``ideal_noise`` (K,), ``isolated`` (K,) bool (constant isolated stars),
        ``isolated_variable`` (K,) bool, ``blend`` (2,) indices, ``focus_scale`` (N,),
        ``var`` (N, R, C) expected pixel variance, ``exposure``.
    """
    rng = np.random.default_rng(seed)
    R, C = shape
    # isolated stars per bin (constant first, then variable), then the blended pair
    bins = np.arange(8, 13)
    iso_t = np.concatenate([rng.uniform(b, b + 1, isolated_per_bin + variable_isolated_per_bin)
                            for b in bins])
    iso_var = np.tile(np.arange(isolated_per_bin + variable_isolated_per_bin)
                      >= isolated_per_bin, bins.size)
    n_blend = 1 if blend_sep > 0 else 0
    pr, pc = _place_isolated(rng, shape, origin, np.arange(iso_t.size + n_blend), 9.0, 7.0)
    rows, cols, tmag = list(pr[:iso_t.size]), list(pc[:iso_t.size]), list(iso_t)
    blend = []
    if n_blend:
        ang = rng.uniform(0, np.pi)
        blend = [len(rows), len(rows) + 1]
        rows += [pr[-1], pr[-1] + blend_sep * np.sin(ang)]
        cols += [pc[-1], pc[-1] + blend_sep * np.cos(ang)]
        tmag += [10.0, 10.8]
    protected = np.array(rows), np.array(cols), np.array(tmag)
    # field: counts ~ 10**(0.35 Tmag), none brighter than Tmag + 3 within 4 px of a protected star
    area = (R + 12) * (C + 12)
    nfield = rng.poisson(density * area)
    lo, hi = 10 ** (0.35 * tmag_range[0]), 10 ** (0.35 * tmag_range[1])
    ftm = np.log10(rng.uniform(lo, hi, nfield)) / 0.35
    fr = rng.uniform(origin[0] - 6, origin[0] + R + 6, nfield)
    fc = rng.uniform(origin[1] - 6, origin[1] + C + 6, nfield)
    d = np.hypot(fr[:, None] - protected[0][None], fc[:, None] - protected[1][None])
    ok = ~np.any((d < 4.0) & (ftm[:, None] < protected[2][None] + 3.0), axis=1)
    rows = np.concatenate([protected[0], fr[ok]])
    cols = np.concatenate([protected[1], fc[ok]])
    tmag = np.concatenate([protected[2], ftm[ok]])
    K = rows.size
    isolated = np.zeros(K, bool)
    isolated[:iso_t.size] = ~iso_var
    isolated_variable = np.zeros(K, bool)
    isolated_variable[:iso_t.size] = iso_var

    time = 2200.0 + np.arange(n) * cadence_s / 86400
    amp = np.zeros(K)
    field_var = np.arange(K) >= iso_t.size + len(blend)
    amp[field_var] = np.where(rng.uniform(size=field_var.sum()) < 0.5,
                              rng.uniform(0.003, 0.03, field_var.sum()), 0.0)
    amp[isolated_variable] = rng.uniform(0.01, 0.03, isolated_variable.sum())
    if blend:
        amp[blend] = [0.02, 0.03]
    period = rng.uniform(0.4, 2.0, K)
    phase = rng.uniform(0, 2 * np.pi, K)
    true_flux = mag2flux(tmag)[:, None] * (
        1 + amp[:, None] * np.sin(2 * np.pi * time[None, :] / period[:, None] + phase[:, None]))

    quality = np.zeros(n, dtype=np.int64)
    x0 = 1024.0 - origin[1]                                             # boresight, cube px
    y0 = 1024.0 - origin[0] + 900.0
    kern, ref = _kernel(rng, time, quality, shape, jitter, drift, dump_every, dump_jump,
                        rotation, scale)
    mk = MovementKernel(kern, time, x0, y0, ref_frame=ref)
    cx, cy = mk.positions_at(np.arange(n), cols - origin[1], rows - origin[0])   # (N, K)
    prow, pcol = cy + origin[0], cx + origin[1]

    if focus_change:
        u = (time - time[0]) / max(time[-1] - time[0], 1e-9)
        focus = 1.0 + focus_change * (u - 0.5)
    else:
        focus = np.ones(n)
    size = prf.default_size()
    scene = np.zeros((n, R, C))
    for i in range(n):
        p = prf if focus[i] == 1 else prf.focused(focus[i])
        # sub-exposures about the frame's position (their mean is the kernel's: the kernel
        # is the measured centroid of the frame, the smear a blur around it)
        m = max(int(smear), 1)
        sub = rng.normal(0, smear_jitter, (m, 2)) if m > 1 else np.zeros((1, 2))
        sub -= sub.mean(axis=0)
        for er, ec in sub:
            scene[i] += p.evaluate(prow[i] + er, pcol[i] + ec, shape, origin=origin,
                                   flux=true_flux[:, i], size=size) / m
    gr, gc = np.mgrid[0:R, 0:C]
    skyimg = sky * (1 + 0.05 * (gc - C / 2) / C - 0.03 * (gr - R / 2) / R)
    exposure = 0.8 * cadence_s                                  # 0.8 duty cycle: 2 s frames
    nread = cadence_s / 2.0
    read_var = nread * read_noise ** 2
    var = ((scene + skyimg) * exposure + read_var) / exposure ** 2
    images = scene + skyimg + rng.normal(size=scene.shape) * np.sqrt(var)
    quality[rng.choice(n, max(n // 40, 1), replace=False)] |= 128     # manual exclude
    good = quality == 0

    # ideal PRF-weighted noise at each star's mean position (expected pixel variance)
    mvar = var[good].mean(axis=0).ravel()
    mean_r, mean_c = prow[good].mean(axis=0), pcol[good].mean(axis=0)
    mat = prf.design_matrix(mean_r, mean_c, shape, origin=origin, size=size)
    ideal = 1.0 / np.sqrt(np.asarray(mat.multiply(mat).T @ (1.0 / mvar)).ravel())

    w = _wcs(origin, shape)
    cat_r = rows + rng.normal(0, catalog_error, K) if catalog_error else rows
    cat_c = cols + rng.normal(0, catalog_error, K) if catalog_error else cols
    ra, dec = w.wcs_pix2world(cat_c, cat_r, 0)
    cat = Table({"starid": np.arange(1, K + 1), "ra": ra, "dec": dec, "tmag": tmag,
                 "row": cat_r, "column": cat_c})
    source = MemorySource({"images": images, "errors": np.sqrt(var),
                           "pixel_flags": np.zeros(scene.shape, np.uint8)},
                          cat, time, quality, row_offset=origin[0], column_offset=origin[1],
                          movement_kernel=mk)
    source.reference_wcs = w
    truth = {"rows": rows, "cols": cols, "tmag": tmag, "flux": true_flux, "amp": amp,
             "ideal_noise": ideal, "isolated": isolated, "isolated_variable": isolated_variable,
             "blend": np.array(blend, int), "focus_scale": focus, "var": var,
             "exposure": exposure, "origin": origin, "prf": prf, "positions": (prow, pcol)}
    return source, truth
