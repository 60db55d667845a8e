"""Crowding of every target from the catalog and the PRF, computed when the task list is built.

Why: the method policy (``choose_method``, ``[aperture] policy_crowding_limit``) sends crowded
targets to a PRF-fitting method, but no task carried a crowding value, so the rule never fired
(issue 16). Computed at ``tessphot todo`` it costs one neighbour search per CCD and no pixels.

Definition (the PRF-weighted contamination, the quantity a PRF fit weights pixels by):

    crowding = sum_j F_j A(d_j) / (F_t A(0) + sum_j F_j A(d_j))

with ``F`` the catalog fluxes, ``d_j`` the distance of star ``j`` from the target and ``A(d)``
the PRF's autocorrelation ``sum_pixels P(p) P(p - d)`` (angle-averaged, for stars at random
sub-pixel phases): the share of the light in the target's PRF-weighted aperture that belongs to
other stars, 0 for an isolated star, 0.5 for an equal pair on top of each other. It is SPOC's
``1 - CROWDSAP`` with the PRF itself as the (soft) aperture, so it needs no aperture choice.
"""
import numpy as np
from scipy.spatial import cKDTree

from photometry.hooks.utilities import mag2flux

__all__ = ["prf_autocorrelation", "target_crowding", "cache_crowding"]

#: px: neighbours farther than this add nothing measurable (A(8 px) < 1e-4 A(0) for TESS)
REACH = 8.0


def prf_autocorrelation(prf, row, col, reach=REACH, step=0.25, n_angles=8, n_phases=3):
    """(d, A(d)): the PRF's angle- and phase-averaged autocorrelation at distances ``d`` (px).

    ``prf`` is a :class:`photometry.data.prf.PRFModel` evaluated around CCD ``(row, col)``."""
    d = np.arange(0.0, reach + step / 2, step)
    size = 2 * int(np.ceil(reach)) + prf.default_size() + 2
    size += 1 - size % 2
    half = size // 2
    phases = (np.arange(n_phases) + 0.5) / n_phases - 0.5
    angles = np.pi * np.arange(n_angles) / n_angles
    r0, c0 = int(np.floor(row)) - half, int(np.floor(col)) - half
    out = np.zeros(d.size)
    for pr in phases:
        for pc in phases:
            rt, ct = np.floor(row) + pr, np.floor(col) + pc
            target = prf.evaluate([rt], [ct], (size, size), origin=(r0, c0))
            # every (distance, angle) neighbour in one call of the PRF: one image each
            nr = rt + np.outer(d, np.sin(angles)).ravel()
            nc = ct + np.outer(d, np.cos(angles)).ravel()
            values, sr, sc = prf.stamps(nr, nc, prf.default_size())
            s = values.shape[1]
            ii = (sr - r0)[:, None, None] + np.arange(s)[None, :, None]
            jj = (sc - c0)[:, None, None] + np.arange(s)[None, None, :]
            ok = (ii >= 0) & (ii < size) & (jj >= 0) & (jj < size)
            t = np.where(ok, target[np.clip(ii, 0, size - 1), np.clip(jj, 0, size - 1)], 0.0)
            out += np.sum(values * t, axis=(1, 2)).reshape(d.size, n_angles).mean(axis=1)
    return d, out / n_phases ** 2


def target_crowding(rows, cols, tmag, targets, prf, reach=REACH):
    """Crowding (module docstring) of the stars ``targets`` (indices) among all catalog stars.

    Parameters
    ----------
    rows, cols, tmag : array_like (K,)
        Every catalog star that can put light on the targets (fainter ones too).
    targets : array_like of int
        Indices of the targets into those arrays.
    prf : photometry.data.prf.PRFModel
        The CCD's PRF (its autocorrelation at the targets' median position is used).

    Returns
    -------
    ndarray (len(targets),), values in [0, 1).
    """
    rows, cols, tmag = (np.asarray(a, float) for a in (rows, cols, tmag))
    targets = np.asarray(targets, dtype=np.int64)
    out = np.zeros(targets.size)
    if targets.size == 0:
        return out
    ok = np.isfinite(rows) & np.isfinite(cols) & np.isfinite(tmag)
    d, A = prf_autocorrelation(prf, float(np.median(rows[targets])),
                               float(np.median(cols[targets])), reach)
    flux = np.where(ok, mag2flux(np.where(ok, tmag, 30.0)), 0.0)
    idx = np.flatnonzero(ok)
    tree = cKDTree(np.column_stack([rows[idx], cols[idx]]))
    t_ok = ok[targets]
    pts = np.column_stack([rows[targets[t_ok]], cols[targets[t_ok]]])
    sdm = tree.sparse_distance_matrix(cKDTree(pts), reach, output_type="coo_matrix")
    star, tgt, dist = idx[sdm.row], sdm.col, sdm.data
    own = star == targets[t_ok][tgt]
    other = np.bincount(tgt[~own], weights=flux[star[~own]] * np.interp(dist[~own], d, A),
                        minlength=pts.shape[0])
    total = flux[targets[t_ok]] * A[0] + other
    out[t_ok] = np.where(total > 0, other / np.where(total > 0, total, 1.0), 0.0)
    out[~t_ok] = np.nan
    return out


def cache_crowding(info, targets, settings):
    """Crowding of one CCD's targets for ``tessphot todo``: all stars of the cache's catalog
    SQLite (fainter than the task limit too) and the PRF of ``[photometry] prf`` (the
    analytic PRF or the SPOC models of the cache's camera/CCD).

    ``info`` is :func:`photometry.scheduler.todo.find_caches`'s entry, ``targets`` the CCD's selected
    targets (``starid`` column)."""
    import sqlite3

    from photometry.data.prf import load_prf

    path = info["path"].with_name(f"catalog_sector{info['sector']:04d}_camera"
                                  f"{info['camera']}_ccd{info['ccd']}.sqlite")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        table = np.array(con.execute('SELECT starid, tmag, "row", "column" FROM catalog')
                         .fetchall(), dtype=float).reshape(-1, 4)
    starid = np.asarray(targets["starid"], dtype=np.int64)
    if starid.size == 0:
        return np.zeros(0)
    order = np.argsort(table[:, 0], kind="stable")
    where = order[np.searchsorted(table[order, 0], starid)]
    prf = load_prf((settings.get("photometry") or {}).get("prf", "analytic"),
                   info.get("camera"), info.get("ccd"))
    return target_crowding(table[:, 2], table[:, 3], table[:, 1], where, prf)
