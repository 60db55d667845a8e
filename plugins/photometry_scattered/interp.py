"""Interpolation weights shared by the cube builder and the corrector (linear operators)."""
import numpy as np
from scipy.interpolate import CubicSpline

__all__ = ["axis_weights", "time_weights", "segments"]


def segments(t, gap_factor):
    """(start, stop) index ranges of ``t`` split at gaps > gap_factor x median step."""
    t = np.asarray(t, dtype=float)
    if t.size < 2:
        return [(0, t.size)]
    dt = np.diff(t)
    step = np.median(dt)
    cuts = np.flatnonzero(dt > float(gap_factor) * step) + 1
    bounds = np.concatenate([[0], cuts, [t.size]])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def axis_weights(x, xi, method="cubic"):
    """(len(xi), len(x)) interpolation weights from samples at ``x`` to points ``xi``.

    Why weights: the spline is linear in its data, so its response to the unit vectors is a
    matrix that interpolates values and propagates variances alike.
    """
    x = np.asarray(x, dtype=float)
    xi = np.atleast_1d(np.asarray(xi, dtype=float))
    n = x.size
    if n == 1:
        return np.ones((xi.size, 1))
    pad = 0.5 * (np.median(np.diff(x)) if n > 1 else 0.0)
    xi = np.clip(xi, x[0] - pad, x[-1] + pad)
    eye = np.eye(n)
    if method == "linear" or n < 3:
        # linear with linear extrapolation over the half bin
        idx = np.clip(np.searchsorted(x, xi) - 1, 0, n - 2)
        frac = (xi - x[idx]) / (x[idx + 1] - x[idx])
        w = np.zeros((xi.size, n))
        w[np.arange(xi.size), idx] = 1.0 - frac
        w[np.arange(xi.size), idx + 1] += frac
        return w
    # natural end conditions and linear continuation beyond the outermost centres: an end
    # cubic extrapolated over half a bin amplifies the noise of the edge bins several times
    spline = CubicSpline(x, eye, axis=0, bc_type="natural", extrapolate=True)
    w = spline(xi)
    for end, side in ((x[0], xi < x[0]), (x[-1], xi > x[-1])):
        if side.any():
            w[side] = spline(end)[None, :] + (xi[side] - end)[:, None] * spline(end, 1)[None, :]
    return w


def time_weights(times, t, method="cubic", gap_factor=3.0):
    """(len(t), len(times)) weights interpolating the cube in time within data segments.

    Each requested time uses only the segment (orbit) it falls in, or the nearest one; a
    cube that is not binned in time, asked at its own times, gives the identity.
    """
    times = np.asarray(times, dtype=float)
    t = np.atleast_1d(np.asarray(t, dtype=float))
    w = np.zeros((t.size, times.size))
    segs = segments(times, gap_factor)
    starts = np.array([times[a] for a, _ in segs])
    stops = np.array([times[b - 1] for _, b in segs])
    dist = np.maximum(starts[None, :] - t[:, None], 0) + np.maximum(t[:, None] - stops[None, :], 0)
    which = np.argmin(dist, axis=1)
    for k, (a, b) in enumerate(segs):
        sel = which == k
        if not sel.any():
            continue
        ts = times[a:b]
        tt = np.clip(t[sel], ts[0], ts[-1])
        if ts.size == 1:
            w[sel, a] = 1.0
            continue
        w[np.ix_(sel, np.arange(a, b))] = axis_weights(ts, tt, method)
    return w


