"""Aperture masks as pure functions of arrays: sum image, per-pixel noise, catalog and PRF.

The method follows TASOC's K2P2 (threshold above the background noise, then a watershed
seeded at catalog stars that separates blended neighbours, plus saturated-column overflow),
and then, unlike K2P2, trims the target's segment to the pixel set that maximises the
predicted signal-to-noise ratio. Keeping these steps free of any I/O or BasePhotometry state
lets them be tested on hand-made arrays and reused by other algorithms.

All positions are 0-based (row, column) array indices of the stamp, pixel centres at integers.
"""
import heapq

import numpy as np
from astropy.stats import sigma_clipped_stats
from scipy import ndimage
from scipy.special import erf

__all__ = ["MaskResult", "gaussian_prf_stack", "background_threshold", "segment",
           "optimal_aperture", "bleed_columns", "extend_bleed_columns", "contamination",
           "edge_sides", "stars_inside_mask", "find_mask", "aperture_sums",
           "residual_background", "median0"]

#: 8-connectivity: diagonal pixels belong to the same segment (a star's core can be diagonal)
_EIGHT = np.ones((3, 3), dtype=bool)


class MaskResult(dict):
    """The mask and how it was obtained (a dict, so it is easy to log and to put in headers).

    Keys: ``mask`` (bool array), ``segment`` (bool array, the target's watershed segment),
    ``labels`` (int array, 0 = below threshold, k+1 = catalog star k), ``threshold``,
    ``noise`` (robust sum-image noise), ``snr`` (predicted per-cadence S/N of the mask),
    ``saturated`` (bool), ``contamination`` (fraction of expected flux in the mask coming from
    other stars), ``neighbour_flux_fraction`` (same, relative to the target's own expected
    flux in the mask), ``edges`` (stamp sides the mask touches), ``skip`` (catalog indices of
    fainter stars whose centre pixel is in the mask), ``flux_fraction`` (expected fraction of
    the target's flux falling in the mask).
    """

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def median0(values, overwrite_input=False):
    """``np.median(values, axis=0)``, the same numbers (NaN where a column holds one; the sign
    of a zero median may differ), faster.

    Why: ``np.median`` partitions at three indices (the middle pair and the last, for NaNs)
    and averages through ``np.mean``; one partition at the upper middle, the maximum of the
    part below it (the lower middle value) and ``(a + b) / 2`` give the same order
    statistics and the same arithmetic (``np.mean`` of two values is their sum over 2) at a
    quarter of the cost: the clip loop of :func:`residual_background` took three medians
    over all sky pixels and 1 282 cadences, ~10 ms a target (issue 15). With
    ``overwrite_input`` a float array is partitioned in place (as ``np.median``'s option):
    for a temporary of the caller's own, one cube copy fewer.
    """
    values = np.asarray(values)
    n = values.shape[0] if values.ndim else 0
    if n == 0 or values.dtype.kind != "f":
        return np.median(values, axis=0)
    m = n // 2
    if overwrite_input:
        values.partition(m, axis=0)
        part = values
    else:
        part = np.partition(values, m, axis=0)
    med = part[m] if n % 2 else (part[:m].max(axis=0) + part[m]) / 2.0
    nan = np.isnan(part).any(axis=0)    # a partition keeps each column's values
    if np.any(nan):
        med = np.where(nan, np.nan, med)
    return med


def gaussian_prf_stack(shape, rows, cols, sigma=0.75):
    """Pixel-integrated circular Gaussian PRFs of unit flux, one plane per star.

    The fallback when no instrument PRF is available: it keeps the method usable (and the
    segmentation and contamination estimates sensible) for any data source.
    """
    rows = np.atleast_1d(np.asarray(rows, dtype=float))
    cols = np.atleast_1d(np.asarray(cols, dtype=float))
    r_edges = np.arange(shape[0] + 1) - 0.5
    c_edges = np.arange(shape[1] + 1) - 0.5
    scale = np.sqrt(2.0) * sigma
    fr = np.diff(0.5 * erf((r_edges[None, :] - rows[:, None]) / scale), axis=1)
    fc = np.diff(0.5 * erf((c_edges[None, :] - cols[:, None]) / scale), axis=1)
    return fr[:, :, None] * fc[:, None, :]


def background_threshold(sumimage, nsigma):
    """Cut level separating stars from background: robust mode + ``nsigma`` x robust noise.

    The noise is the sigma-clipped scatter of the (background-subtracted) sum image, which
    includes faint unresolved stars and background-model residuals: the level that decides
    whether a pixel is "star" in the image, not the photon noise of one cadence.

    Returns
    -------
    threshold, mode, noise : float
    """
    values = sumimage[np.isfinite(sumimage)]
    if values.size == 0:
        return np.nan, np.nan, np.nan
    # as K2P2: the brightest 15 % never tell the background, and on a small stamp filled by
    # one bright star, clipping alone would take the star's wings for the sky
    values = values[values <= np.percentile(values, 85)]
    _, median, std = sigma_clipped_stats(values, sigma=3.0, maxiters=10)
    if not np.isfinite(std) or std <= 0:
        std = 1.4826 * np.median(np.abs(values - np.median(values))) or 1.0
    return median + nsigma * std, median, std


def _watershed(image, markers, allowed):
    """Marker-seeded watershed (Meyer flooding) of ``image`` from its bright peaks down.

    Each pixel of ``allowed`` reachable from a marker through ``allowed`` pixels gets the label
    of the marker whose flood reaches it first when pixels are flooded in order of decreasing
    value (8-connectivity). Written out (heap, O(n log n)) because scipy's ``watershed_ift``
    needs integer images and mis-assigns plateaus between close peaks, and scikit-image is
    not a dependency.
    """
    labels = markers.astype(np.int32).copy()
    nrow, ncol = image.shape
    value = np.where(np.isfinite(image), image, -np.inf)
    heap = []
    counter = 0
    for r, c in zip(*np.nonzero(labels)):
        heapq.heappush(heap, (-value[r, c], counter, r, c))
        counter += 1
    while heap:
        _, _, r, c = heapq.heappop(heap)
        lab = labels[r, c]
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                if 0 <= rr < nrow and 0 <= cc < ncol and labels[rr, cc] == 0 \
                        and allowed[rr, cc]:
                    labels[rr, cc] = lab
                    heapq.heappush(heap, (-value[rr, cc], counter, rr, cc))
                    counter += 1
    return labels


def segment(sumimage, threshold, models, star_rows, star_cols, target_index,
            dominance=0.5):
    """Watershed segmentation of the sum image seeded at the catalog stars that matter.

    A star seeds a segment when its expected flux in its own centre pixel is above the
    threshold and it dominates that pixel (at least ``dominance`` of the expected flux there),
    i.e. when it makes its own peak rather than sitting on a brighter star's wing; a seed on a
    wing would cut the brighter star's segment in two. The target always seeds.

    Parameters
    ----------
    sumimage : (R, C) array, background-subtracted mean image
    threshold : float
    models : (n, R, C) array, expected flux of each catalog star in each pixel
    star_rows, star_cols : (n,) arrays of stamp positions
    target_index : int, the target's index in the arrays

    Returns
    -------
    labels : (R, C) int array, 0 below threshold, k+1 for the segment seeded by star k
    """
    shape = sumimage.shape
    markers = np.zeros(shape, dtype=np.int32)
    total = models.sum(axis=0) if len(models) else np.zeros(shape)
    ri = np.rint(star_rows).astype(int)
    ci = np.rint(star_cols).astype(int)
    inside = (ri >= 0) & (ri < shape[0]) & (ci >= 0) & (ci < shape[1])
    order = np.argsort(-models.reshape(len(models), -1).sum(axis=1)) if len(models) else []
    for k in order:  # faintest last, so a brighter star keeps a shared pixel
        if k == target_index or not inside[k]:
            continue
        own = models[k, ri[k], ci[k]]
        if own >= threshold and own >= dominance * total[ri[k], ci[k]] \
                and markers[ri[k], ci[k]] == 0:
            markers[ri[k], ci[k]] = k + 1
    if inside[target_index]:
        markers[ri[target_index], ci[target_index]] = target_index + 1
    if not markers.any():
        return np.zeros(shape, dtype=np.int32)
    above = np.isfinite(sumimage) & (sumimage > threshold)
    labels = _watershed(sumimage, markers, above | (markers > 0))
    labels[~above] = 0
    return labels


def _component_at(mask, row, col):
    """The 8-connected component of ``mask`` containing (row, col) (empty if not in mask)."""
    lab, _ = ndimage.label(mask, structure=_EIGHT)
    if not (0 <= row < mask.shape[0] and 0 <= col < mask.shape[1]) or lab[row, col] == 0:
        return np.zeros_like(mask)
    return lab == lab[row, col]


def optimal_aperture(signal, variance, allowed, bkg_error=None, correlated_background=True,
                     seed=None):
    """The pixel set of ``allowed`` with the highest predicted per-cadence S/N.

    Pixels are ranked by signal/variance (the order that maximises the S/N of a sum) and added
    while the S/N of the running sum grows; the S/N of the sum is
    ``sum(s) / sqrt(sum(var) + B)``, with ``B = (sum bkg_error)**2`` when the background
    errors are correlated between pixels (a smooth background model) or ``sum(bkg_error**2)``
    otherwise. Only the connected part that contains ``seed`` (row, col) is kept.

    Returns
    -------
    mask : bool array
    snr : float, the predicted S/N of the mask
    """
    signal = np.where(np.isfinite(signal), signal, 0.0)
    ok = allowed & np.isfinite(variance) & (variance > 0) & (signal > 0)
    if bkg_error is None:
        bkg_error = np.zeros_like(signal)
    bkg_error = np.where(np.isfinite(bkg_error), bkg_error, 0.0)
    idx = np.flatnonzero(ok)
    mask = np.zeros(signal.shape, dtype=bool)
    if idx.size == 0:
        return mask, 0.0
    s = signal.flat[idx]
    v = variance.flat[idx]
    b = bkg_error.flat[idx]
    order = np.argsort(-(s / (v + b ** 2)))
    cs = np.cumsum(s[order])
    if correlated_background:
        cv = np.cumsum(v[order]) + np.cumsum(b[order]) ** 2
    else:
        cv = np.cumsum(v[order] + b[order] ** 2)
    snr = cs / np.sqrt(cv)
    best = int(np.argmax(snr))
    mask.flat[idx[order[:best + 1]]] = True
    if seed is not None:
        comp = _component_at(mask, *seed)
        if comp.any():
            mask = comp
    # the S/N of what is finally kept
    sel = mask.ravel()[idx]
    bsum = b[sel].sum() ** 2 if correlated_background else np.sum(b[sel] ** 2)
    return mask, float(s[sel].sum() / np.sqrt(v[sel].sum() + bsum))


def bleed_columns(mask, sumimage, saturated_pixels=None, flat_fraction=0.5):
    """Columns of ``mask`` that carry saturated charge.

    A column bleeds if it holds a pixel flagged saturated, or (no flags, e.g. TESScut) if at
    least two of its mask pixels are above ``flat_fraction`` of the brightest mask pixel,
    which is what a saturated, flat-topped column looks like.
    """
    cols = set()
    if saturated_pixels is not None and np.any(saturated_pixels & mask):
        cols.update(np.flatnonzero(np.any(saturated_pixels & mask, axis=0)).tolist())
    vals = np.where(mask & np.isfinite(sumimage), sumimage, -np.inf)
    peak = np.max(vals) if mask.any() else -np.inf
    if np.isfinite(peak) and peak > 0:
        high = vals >= flat_fraction * peak
        cols.update(np.flatnonzero(high.sum(axis=0) >= 2).tolist())
    return sorted(cols)


def extend_bleed_columns(mask, sumimage, threshold, columns):
    """Grow ``mask`` up and down each of ``columns`` until the flux drops to the threshold.

    Bleed trails of saturated stars run along CCD columns and hold flux of the star; the
    watershed often leaves their tails in other segments or below the segment of the core.
    """
    out = mask.copy()
    nrow = mask.shape[0]
    for c in columns:
        rows = np.flatnonzero(out[:, c])
        if rows.size == 0:
            continue
        r = rows.max() + 1
        while r < nrow and np.isfinite(sumimage[r, c]) and sumimage[r, c] > threshold:
            out[r, c] = True
            r += 1
        r = rows.min() - 1
        while r >= 0 and np.isfinite(sumimage[r, c]) and sumimage[r, c] > threshold:
            out[r, c] = True
            r -= 1
        out[rows.min():rows.max() + 1, c] |= (sumimage[rows.min():rows.max() + 1, c]
                                               > threshold)
    return out


def contamination(mask, models, target_index):
    """Expected flux in the mask from other stars / all expected flux in the mask.

    Uses catalog fluxes and the PRF (so it is the contamination of the *mean* flux, from the
    catalog, as Lund & Handberg 2014 but pixel-resolved instead of whole-pixel magnitudes).

    Returns
    -------
    contamination : float in [0, 1]
    flux_fraction : float, expected fraction of the target's flux inside the mask
    """
    if not mask.any():
        return np.nan, 0.0
    in_mask = models[:, mask].sum(axis=1)
    total = in_mask.sum()
    target = in_mask[target_index]
    target_all = models[target_index].sum()
    cont = float((total - target) / total) if total > 0 else np.nan
    frac = float(target / target_all) if target_all > 0 else 0.0
    return min(max(cont, 0.0), 1.0), frac


def edge_sides(mask):
    """Stamp sides the mask touches, as resize_stamp keyword names."""
    sides = []
    if mask[0, :].any():
        sides.append("down")
    if mask[-1, :].any():
        sides.append("up")
    if mask[:, 0].any():
        sides.append("left")
    if mask[:, -1].any():
        sides.append("right")
    return sides


def stars_inside_mask(mask, star_rows, star_cols, fluxes, target_index):
    """Indices of stars fainter than the target whose centre pixel lies inside the mask."""
    ri = np.rint(star_rows).astype(int)
    ci = np.rint(star_cols).astype(int)
    inside = (ri >= 0) & (ri < mask.shape[0]) & (ci >= 0) & (ci < mask.shape[1])
    out = []
    for k in np.flatnonzero(inside):
        if k != target_index and mask[ri[k], ci[k]] and fluxes[k] <= fluxes[target_index]:
            out.append(int(k))
    return out


def find_mask(sumimage, variance, models, star_rows, star_cols, fluxes, target_index, *,
              bkg_error=None, saturated_pixels=None, saturated=False, threshold_sigma=1.0,
              dominance=0.5, correlated_background=True, min_pixels=1, pixel_noise=None):
    """The target's aperture: threshold, watershed, S/N-optimal trimming or saturated path.

    Parameters
    ----------
    sumimage : (R, C) background-subtracted mean image of good cadences (e-/s)
    variance : (R, C) per-cadence variance of one pixel ((e-/s)^2, image noise)
    models : (n, R, C) expected flux of every catalog star (catalog flux x PRF)
    star_rows, star_cols, fluxes : (n,) catalog stamp positions and expected fluxes
    target_index : the target's index
    bkg_error : (R, C) per-cadence 1-sigma error of the background estimate
    saturated_pixels : (R, C) bool, pixels flagged saturated in any good cadence
    saturated : force the saturated path (bright star)
    pixel_noise : callable, optional
        Instead of ``variance`` and ``bkg_error``: ``pixel_noise(selection)`` gives both
        ((R, C) arrays) at least at the pixels of the bool ``selection``; only the target's
        segment (and a saturated mask's pixels) are asked for, so they can be computed for
        those alone.

    Returns
    -------
    MaskResult
    """
    sumimage = np.asarray(sumimage, dtype=float)
    threshold, mode, noise = background_threshold(sumimage, threshold_sigma)
    labels = segment(sumimage, threshold, models, star_rows, star_cols, target_index,
                     dominance=dominance)
    tr, tc = int(np.rint(star_rows[target_index])), int(np.rint(star_cols[target_index]))
    seed = (min(max(tr, 0), sumimage.shape[0] - 1), min(max(tc, 0), sumimage.shape[1] - 1))
    seg = _component_at(labels == target_index + 1, *seed)
    if saturated_pixels is not None and np.any(saturated_pixels & seg):
        saturated = True
    if pixel_noise is not None:
        variance, bkg_error = pixel_noise(seg)
    total = models.sum(axis=0)
    share = np.divide(models[target_index], total, out=np.zeros_like(total), where=total > 0)
    # data-driven signal (robust to PRF or catalog-flux errors), model share of the target
    signal = np.clip(sumimage, 0, None) * share
    signal = np.where(np.isfinite(signal), signal, models[target_index])
    mask, snr = optimal_aperture(signal, variance, seg, bkg_error=bkg_error,
                                 correlated_background=correlated_background, seed=seed)
    cols = []
    if saturated:
        # saturated pixels hold charge of the star whatever their S/N: keep all of them and
        # the bleed columns, then the S/N-optimal wings around them
        if saturated_pixels is not None:
            mask |= saturated_pixels & seg
        cols = bleed_columns(seg, sumimage, saturated_pixels)
        for c in cols:
            mask[:, c] |= seg[:, c]
        mask = extend_bleed_columns(mask, sumimage, threshold, cols)
        if saturated_pixels is not None:
            # flagged bleed pixels joined to the mask, even past a dip below the threshold
            lab, _ = ndimage.label(mask | saturated_pixels, structure=_EIGHT)
            keep = np.unique(lab[mask])
            mask |= saturated_pixels & np.isin(lab, keep[keep > 0])
        if pixel_noise is not None:
            variance, bkg_error = pixel_noise(mask)
        ok = mask & np.isfinite(variance)
        be = np.where(ok, bkg_error if bkg_error is not None else 0.0, 0.0)
        bterm = be.sum() ** 2 if correlated_background else np.sum(be ** 2)
        snr = float(np.clip(np.where(ok, sumimage, 0.0), 0, None).sum()
                    / np.sqrt(np.sum(np.where(ok, variance, 0.0)) + bterm)) if ok.any() else 0.0
    if mask.sum() < min_pixels or not mask[seed]:
        # the target pixel at least: a star fainter than the noise still gets a light curve
        mask = mask.copy()
        mask[seed] = True
    cont, frac = contamination(mask, models, target_index)
    return MaskResult(
        mask=mask, segment=seg, labels=labels, models_total=models.sum(axis=0),
        target_model=models[target_index], threshold=float(threshold), mode=float(mode),
        noise=float(noise), snr=float(snr), saturated=bool(saturated), bleed_columns=cols,
        contamination=cont, flux_fraction=frac, edges=edge_sides(mask),
        skip=stars_inside_mask(mask, star_rows, star_cols, fluxes, target_index))


def aperture_sums(images, errors, bkg_errors, mask, backgrounds=None,
                  correlated_background=True):
    """Per-cadence sums over ``mask``: flux, its error, background, flux-weighted centroid.

    ``errors`` are the per-pixel errors of the background-subtracted images with the
    background error already added in quadrature (what BasePhotometry gives). With
    ``correlated_background`` the background part is re-added as fully correlated over the
    mask (``(sum bkg_err)**2`` instead of ``sum bkg_err**2``): a smooth or flat background
    estimate errs the same way in neighbouring pixels, so the quadrature sum would
    underestimate the error of a many-pixel aperture.

    Parameters
    ----------
    images : (N, R, C) background-subtracted flux
    errors : (N, R, C) its 1-sigma errors
    bkg_errors : (N, R, C) 1-sigma errors of the background, or None
    mask : (R, C) bool
    backgrounds : (N, R, C) the subtracted background (only summed for reporting), or None

    Returns
    -------
    flux, flux_err, background : (N,) arrays
    centroid : (N, 2) array of flux-weighted (row, column) stamp positions
    """
    n = images.shape[0]
    if not mask.any():
        nan = np.full(n, np.nan)
        return nan, nan.copy(), nan.copy(), np.full((n, 2), np.nan)
    pix = images[:, mask]
    all_bad = ~np.isfinite(pix).any(axis=1)
    flux = np.nansum(pix, axis=1)
    var = np.nansum(errors[:, mask] ** 2, axis=1)
    if bkg_errors is not None and correlated_background:
        be = np.where(np.isfinite(bkg_errors[:, mask]), bkg_errors[:, mask], 0.0)
        var = np.clip(var - np.sum(be ** 2, axis=1), 0, None) + be.sum(axis=1) ** 2
    flux_err = np.sqrt(var)
    if backgrounds is None:
        background = np.zeros(n)
    else:
        background = np.nansum(backgrounds[:, mask], axis=1)
    rr, cc = np.nonzero(mask)
    w = np.clip(np.where(np.isfinite(pix), pix, 0.0), 0, None)
    wsum = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        centroid = np.column_stack([(w * rr).sum(axis=1) / wsum, (w * cc).sum(axis=1) / wsum])
    centroid[wsum <= 0] = np.nan
    for arr in (flux, flux_err, background):
        arr[all_bad] = np.nan
    return flux, flux_err, background, centroid


def _distinct_rows(values):
    """(index of each distinct row of the 2-D ``values``, index of each row's distinct row):
    ``values[first][inverse]`` is ``values``, rows compared bit for bit (NaN rows apart)."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
    order = np.lexsort(values.T[::-1])
    ordered = values[order]
    new = np.r_[True, np.any(ordered[1:] != ordered[:-1], axis=1)]
    inverse = np.empty(len(values), dtype=np.intp)
    inverse[order] = np.cumsum(new) - 1
    return order[new], inverse


def _masked_fits(A, y, keep, columns=None):
    """Least-squares coefficients (k, N) of ``y[:, i] ~ A`` over the rows ``keep[:, i]``, for
    every column ``i`` at once (only the ``columns`` given, if any: (k, len(columns))).

    Why: one ``lstsq`` per cadence and clip iteration cost 0.1 ms each, 0.4 s per target at
    1 282 cadences (issue 15). The k x k normal equations of all cadences are built and
    solved in one batch (the polynomial basis on centred, scaled coordinates is well
    conditioned); cadences whose system is singular or badly conditioned (too few pixels
    kept) get ``lstsq``'s minimum-norm solution as before. The two matrix products are
    always taken over every column: BLAS rounds a column's sums differently when it sits at
    another place of a smaller product, and they are the cheap part.
    """
    k = A.shape[1]
    w = keep.astype(float)
    normal = (w.T @ (A[:, :, None] * A[:, None, :]).reshape(len(A), k * k)).reshape(-1, k, k)
    rhs = np.where(keep, y, 0.0).T @ A                             # (N, k)
    if columns is not None:
        normal, rhs, keep, y = normal[columns], rhs[columns], keep[:, columns], y[:, columns]
    with np.errstate(divide="ignore", invalid="ignore"):
        # 2-norm condition number of the symmetric normal matrices from their eigenvalues
        # (np.linalg.cond's batched SVD was ~10 ms a target at 1 282 cadences); only the
        # gate below uses it. Cadences that keep the same pixels (all of them, mostly) have
        # the same matrix: each distinct one is decomposed once
        uniq, inverse = _distinct_rows(normal.reshape(len(normal), -1))
        eig = np.abs(np.linalg.eigvalsh(normal[uniq]))[inverse]
        cond = eig.max(axis=-1) / eig.min(axis=-1)
    ok = np.isfinite(cond) & (cond < 1e8)
    coef = np.empty((A.shape[1], y.shape[1]))
    if ok.any():
        coef[:, ok] = np.linalg.solve(normal[ok], rhs[ok][..., None])[..., 0].T
    for i in np.flatnonzero(~ok):
        rows = keep[:, i]
        coef[:, i] = np.linalg.lstsq(A[rows], y[rows, i], rcond=None)[0]
    return coef


def _clipped_fits(A, y, iterations=3):
    """((k, N) coefficients, (N,) robust sigma) of ``y[:, i] ~ A`` with a 3-sigma clip, each
    cadence (column) refitted only while its clip mask changes.

    Why: a cadence whose kept pixels did not change gets the same fit, residuals, sigma and
    clip mask again, so only the changed ones are solved, and their residuals and medians
    taken (the medians were most of the cost, issue 15): the same numbers as refitting every
    cadence on each of the ``iterations`` passes until none changes. The solves and medians
    are per cadence; the matrix products stay over all cadences (see :func:`_masked_fits`).
    """
    keep = np.ones(y.shape, dtype=bool)
    coef = _masked_fits(A, y, keep)
    res = np.subtract(y, A @ coef)
    res = np.abs(res, out=res)        # in place: a fresh cube costs its page faults
    sigma = 1.4826 * median0(res)
    active = np.arange(y.shape[1])
    for _ in range(iterations - 1):
        new = res <= 3 * np.maximum(sigma[active], 1e-12)
        changed = np.any(new != keep[:, active], axis=0)
        if not changed.any():
            break
        active = active[changed]
        keep[:, active] = new[:, changed]
        coef[:, active] = _masked_fits(A, y, keep, active)
        res = np.subtract(y[:, active], (A @ coef)[:, active])
        res = np.abs(res, out=res)
        sigma[active] = 1.4826 * median0(res)
    return coef, sigma


def residual_background(images, sky, order=1, min_pixels=12, reference=None):
    """Per-cadence polynomial surface fitted to the source-free pixels ``sky`` of the stamp.

    Why: what is left of the sky after the cache's background model (a flat local level, or
    a CCD-wide model) is a smooth offset and gradient across the stamp that changes with
    time (scattered light); fitted on the stamp's own empty pixels it is removed where the
    aperture is. ``order`` 0 is a constant, 1 a plane, 2 a quadratic surface. Each cadence is
    fitted with a 3-sigma clip (faint uncatalogued stars, cosmic rays). With ``reference``
    (the mean image) the static part is fitted once on it and each cadence's fit is of
    ``image - reference``, so faint static structure (wings, unresolved stars) does not
    inflate the error estimate, which is then the scatter of the time-variable part only.

    Returns
    -------
    surface, error : (N, R, C) arrays, or (None, None) if there are too few sky pixels
    """
    n, nrow, ncol = images.shape
    rr, cc = np.mgrid[:nrow, :ncol]
    rr = (rr - nrow / 2) / max(nrow, 1)
    cc = (cc - ncol / 2) / max(ncol, 1)
    terms = [np.ones_like(rr, dtype=float)]
    if order >= 1:
        terms += [rr, cc]
    if order >= 2:
        terms += [rr * rr, rr * cc, cc * cc]
    basis = np.stack([t.ravel() for t in terms], axis=1)       # (npix, k)
    flat = images.reshape(n, -1)
    use = np.asarray(sky, dtype=bool).ravel().copy()
    use[use] = np.all(np.isfinite(flat[:, use]), axis=0)   # finiteness of the sky pixels only
    if use.sum() < max(min_pixels, 3 * basis.shape[1]):
        return None, None
    if reference is not None:
        use &= np.isfinite(reference).ravel()
    A = basis[use]
    y = flat[:, use].T                                           # (nuse, N)
    static = np.zeros(basis.shape[0])
    if reference is not None:
        ref = reference.ravel()[use]
        ok = np.ones(ref.size, dtype=bool)
        for _ in range(3):
            c = np.linalg.lstsq(A[ok], ref[ok], rcond=None)[0]
            r = ref - A @ c
            ok = np.abs(r) <= 3 * max(1.4826 * np.median(np.abs(r[ok])), 1e-12)
        static = basis @ c
        y = y - ref[:, None]
    coef, sigma = _clipped_fits(A, y)
    surface = basis @ coef
    surface += static[:, None]
    surface = surface.T.reshape(n, nrow, ncol)
    # error of the fitted surface: residual scatter x sqrt(leverage) of each pixel
    cov = np.linalg.pinv(A.T @ A)
    lev = np.sqrt(np.einsum("ij,jk,ik->i", basis, cov, basis)).reshape(nrow, ncol)
    error = sigma[:, None, None] * lev[None]
    return surface, error
