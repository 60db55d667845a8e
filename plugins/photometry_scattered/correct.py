"""Evaluate the scattered-light cube at any stamp and cadence, and correct a stamp with it.

The interpolant is linear in the cube values: a natural cubic spline over the bin centres
along rows, then along columns, then in time within each data segment (orbit). Being linear,
it is written as three weight matrices, so the uncertainty propagates exactly
(``err**2 = Wt**2 . Wr**2 . Wc**2 . errors**2`` for independent bins) and a stamp costs a few
small matrix products. Pixels beyond the outermost bin centre (the half bin at a CCD edge) use
the spline's end value and slope (natural end conditions, linear continuation: no noise
amplification by an extrapolated cubic); beyond half a bin spacing the value there is held. Times before/after a segment hold the end value.
"""
import logging

import numpy as np

from photometry import ConfigurationError, InputError, LightCurveQualityFlags, StampCorrection

from .cube import SLCube, read_fits
from .interp import axis_weights, segments, time_weights

__all__ = ["evaluate", "axis_weights", "time_weights", "ScatteredLightCorrection",
           "unreliable_cadences", "load_window", "frame_flags", "denoise"]

logger = logging.getLogger(__name__)


def _window(centres, lo, hi, pad):
    """Index range of bins needed to interpolate between ``lo`` and ``hi``."""
    i0 = max(int(np.searchsorted(centres, lo)) - pad, 0)
    i1 = min(int(np.searchsorted(centres, hi)) + pad, centres.size)
    if i1 - i0 < min(4, centres.size):
        i0 = max(min(i0, centres.size - 4), 0)
        i1 = min(i0 + 4, centres.size)
    return i0, i1


def evaluate(cube, bin_rows, bin_cols, times, rows, cols, t, errors=None, method="cubic",
             time_method=None, gap_factor=3.0, pad=6):
    """Scattered light at CCD pixels ``rows x cols`` and times ``t``.

    Pure function: usable on any (nt, ny, nx) cube without BasePhotometry.

    Parameters
    ----------
    cube : (nt, ny, nx) array
        Bin values (e-/s).
    bin_rows, bin_cols : (ny,), (nx,) arrays
        Bin centres in the same coordinates as ``rows``/``cols`` (0-based CCD), increasing.
    times : (nt,) array
        Cube times (same scale as ``t``).
    rows, cols : 1-D arrays
        Pixel grid to evaluate (a stamp: ``arange(row_min, row_max)``).
    t : 1-D array
        Times to evaluate.
    errors : (nt, ny, nx) array, optional
        Bin uncertainties; if given, the propagated uncertainty is returned too.
    method : "cubic" or "linear"
        Spatial interpolant; ``time_method`` (default: the same) in time.
    pad : int
        Bins beyond the requested range used by the spline (the cubic spline's weights fall
        by ~4x per bin, so 6 bins reproduce the global spline to < 1e-3).

    Returns
    -------
    values : (len(t), len(rows), len(cols)); and errors of the same shape if ``errors``.
    """
    cube = np.asarray(cube, dtype=float)
    bin_rows = np.asarray(bin_rows, dtype=float)
    bin_cols = np.asarray(bin_cols, dtype=float)
    rows = np.atleast_1d(np.asarray(rows, dtype=float))
    cols = np.atleast_1d(np.asarray(cols, dtype=float))
    nt, ny, nx = cube.shape
    if bin_rows.size != ny or bin_cols.size != nx or np.size(times) != nt:
        raise ValueError(f"cube shape {cube.shape} does not match bin_rows ({bin_rows.size}), "
                         f"bin_cols ({bin_cols.size}) and times ({np.size(times)})")
    r0, r1 = _window(bin_rows, rows.min(), rows.max(), pad)
    c0, c1 = _window(bin_cols, cols.min(), cols.max(), pad)
    wr = axis_weights(bin_rows[r0:r1], rows, method)
    wc = axis_weights(bin_cols[c0:c1], cols, method)
    times = np.asarray(times, dtype=float)
    t = np.atleast_1d(np.asarray(t, dtype=float))
    same = t.size == nt and np.allclose(t, times, rtol=0, atol=1e-7)
    wt = None if same else time_weights(times, t, time_method or method, gap_factor)

    def apply(data, square=False):
        d = data[:, r0:r1, c0:c1]
        a, b = (wr ** 2, wc ** 2) if square else (wr, wc)
        if wt is not None:
            d = np.tensordot(wt ** 2 if square else wt, d, axes=(1, 0))
        return np.matmul(np.matmul(a, d), b.T)

    values = apply(cube)
    if errors is None:
        return values
    var = apply(np.asarray(errors, dtype=float) ** 2, square=True)
    return values, np.sqrt(np.maximum(var, 0.0))


def load_window(group, rows, cols, pad=6):
    """Read only the bins a stamp needs from a cache group (a CCD cube is ~100 MB)."""
    bin_rows = group["bin_rows"][()]
    bin_cols = group["bin_cols"][()]
    r0, r1 = _window(bin_rows, np.min(rows), np.max(rows), pad)
    c0, c1 = _window(bin_cols, np.min(cols), np.max(cols), pad)
    a = group.attrs

    def get(name):
        return group[name][:, r0:r1, c0:c1] if name in group else None

    static = group["static"][r0:r1, c0:c1] if "static" in group else None
    return SLCube(values=get("values"), errors=get("errors"),
                  counts=group["counts"][r0:r1, c0:c1], time=group["time"][()],
                  bin_rows=bin_rows[r0:r1], bin_cols=bin_cols[c0:c1],
                  bin_size=int(a["bin_size"]), static=static,
                  column_gain=group["column_gain"][()] if "column_gain" in group else None,
                  gain_column_offset=int(a.get("gain_column_offset", 44)),
                  cadenceno=group["cadenceno"][()] if "cadenceno" in group else None,
                  quality=group["quality"][()] if "quality" in group else None,
                  flags=group["flags"][()] if "flags" in group else None,
                  time_binned=bool(a.get("time_binned", 0)),
                  time_bin_hours=float(a.get("time_bin_hours", 0.0)),
                  reference=_text(a.get("reference", "none")), sector=int(a.get("sector", 0)),
                  camera=int(a.get("camera", 0)), ccd=int(a.get("ccd", 0)))


def _smoothing_matrix(time, hours, gap_factor):
    """Sparse (nt, nt) local-quadratic (LOESS, tricube weights) smoother within each segment.

    A local quadratic keeps the curvature of a glow rising at an orbit end (a boxcar would
    flatten its peak); the window is truncated at segment ends, where the fit becomes
    one-sided rather than biased towards the other orbit.
    """
    from scipy import sparse

    t = np.asarray(time, dtype=float) * 24.0
    nt = t.size
    rows, cols, vals = [], [], []
    for a, b in segments(time, gap_factor):
        tt = t[a:b]
        n = tt.size
        step = np.median(np.diff(tt)) if n > 1 else 1.0
        half = max(int(np.ceil(hours / step)), 1) if hours > 0 else 0
        if half == 0 or n < 4:
            rows += list(range(a, b))
            cols += list(range(a, b))
            vals += [1.0] * n
            continue
        offs = np.arange(-half, half + 1)
        j = np.arange(n)[:, None] + offs[None, :]
        ok = (j >= 0) & (j < n)
        jc = np.clip(j, 0, n - 1)
        dt = np.where(ok, tt[jc] - tt[:, None], 0.0)
        w = np.where(ok, (1 - np.clip(np.abs(dt) / (hours * (1 + 1e-9)), 0, 1) ** 3) ** 3,
                     0.0)
        w = np.where(ok & (w == 0) & (offs[None, :] == 0), 1.0, w)
        x = dt / hours
        X = np.stack([np.ones_like(x), x, x * x], axis=-1)            # (n, m, 3)
        A = np.einsum("nm,nmi,nmj->nij", w, X, X) + 1e-9 * np.eye(3)
        coef = np.linalg.solve(A, np.broadcast_to(np.array([1.0, 0, 0]), (n, 3))[..., None])
        row_w = w * np.einsum("nmi,ni->nm", X, coef[..., 0])
        keep = ok & (w > 0)
        rr = np.broadcast_to(np.arange(n)[:, None], j.shape)
        rows += (rr[keep] + a).tolist()
        cols += (j[keep] + a).tolist()
        vals += row_w[keep].tolist()
    return sparse.csr_matrix((vals, (rows, cols)), shape=(nt, nt))


def denoise(values, errors, time, hours=0.0, shrink=True, gap_factor=3.0, level=True):
    """Smooth each bin's time series and shrink its time variation by its significance.

    Why: when the cube is built on top of a background model (``reference = "backdrop"``)
    that already follows the glow, a bin's values are mostly the bin median's own noise;
    added to every stamp pixel, it is noise correlated over the whole aperture, and made
    aperture photometry 0.5-2 % worse on weak-glow scenes. Two linear-ish steps:

    * ``hours > 0``: a local quadratic in time within each segment (the glow is smooth over
      hours; noise falls as the square root of the cadences in the window);
    * ``shrink``: per bin, the variation about its time median is multiplied by the
      positive-part James-Stein factor ``k = max(0, 1 - sum(var) / sum(dev**2))``: ~0 when
      the bin's variation is what its errors predict (nothing to correct, so nothing added),
      ~1 when the residual glow is many sigma (a strong glow is corrected in full).

    ``level=False`` also drops each bin's time median (the correction then carries only the
    time variation): on top of a background model the cube's constant level is the bin
    medians' star-wing bias, and subtracting it shrank faint stars' apertures.

    Returns the new (values, errors); errors scale by the same factors (variance of the
    smoothed values through the squared weights, times ``k**2``).
    """
    values = np.asarray(values, dtype=float)
    nt = values.shape[0]
    v = values.reshape(nt, -1)
    e2 = np.asarray(errors, dtype=float).reshape(nt, -1) ** 2
    if hours > 0 and nt > 3:
        sm = _smoothing_matrix(time, hours, gap_factor)
        v = sm @ v
        e2 = sm.multiply(sm) @ e2
    c = np.median(v, axis=0) if nt > 1 else np.zeros(v.shape[1])
    d = v - c
    if shrink and nt > 1:
        ss = (d * d).sum(axis=0)
        k = np.clip(1.0 - e2.sum(axis=0) / np.maximum(ss, 1e-30), 0.0, 1.0)
        d = k * d
        e2 = e2 * k * k
    v = c + d if level else d
    return v.reshape(values.shape), np.sqrt(e2).reshape(values.shape)


def frame_flags(cube, t, gap_factor=3.0):
    """(len(t),) int32: the cube frames' own flags on the cadences they are used for.

    A cadence gets a frame's flags if that frame carries weight in its linear time
    interpolation (its own frame, or the two around it in a binned cube): a frame the
    builder had to guess from its neighbours makes those cadences' correction a guess too.
    """
    t = np.atleast_1d(np.asarray(t, dtype=float))
    fl = np.asarray(cube.flags, dtype=np.int64)
    out = np.zeros(t.size, dtype=np.int32)
    if not fl.any():
        return out
    w = time_weights(cube.time, t, "linear", gap_factor)
    for bit in np.unique(fl[fl != 0]):
        used = (np.abs(w[:, fl == bit]) > 1e-6).any(axis=1)
        out[used] |= int(bit)
    return out


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def unreliable_cadences(model, model_alt, time, static, settings):
    """(N,) bool: cadences whose correction cannot be trusted, and the three criteria.

    * ``level``: the time-varying scattered light (model minus dark level), stamp maximum,
      above ``flag_level`` e-/s (near-saturated sky, non-linear response, huge photon noise);
    * ``rate``: its change above ``flag_rate`` e-/s per hour (structure changes within one
      exposure that no cadence-sampled cube follows);
    * ``error``: the stamp maximum of |cubic - linear| interpolation, the interpolation error
      estimate, above ``flag_error`` e-/s (structure finer than the bins or the time step).
    """
    var = model - static[None]
    level = np.max(np.abs(var), axis=(1, 2))
    mean = var.mean(axis=(1, 2))
    if len(time) > 1:
        rate = np.abs(np.gradient(mean, np.asarray(time) * 24.0))
    else:
        rate = np.zeros(len(time))
    err = np.max(np.abs(model - model_alt), axis=(1, 2))
    flags = (level > float(settings["flag_level"])) | (rate > float(settings["flag_rate"])) \
        | (err > float(settings["flag_error"]))
    return flags, {"level": level, "rate": rate, "interp_error": err}


class ScatteredLightCorrection(StampCorrection):
    """Subtract the scattered-light model from a stamp, propagating its uncertainty.

    How it combines with the background BasePhotometry already subtracted depends on what
    the cube was built against (its ``reference``, ``docs/scattered_light.md``):

    * ``"none"`` (the cube is the total sky): the cube replaces the background;
    * a BackgroundModel name (e.g. ``"backdrop"``; the cube holds what that model left): the
      new background is that model plus the cube;
    * ``"dark"`` (a tess-backml cube, flux above its darkest frames): the stamp keeps the time
      median of its old background per pixel and takes the time variation from the cube.

    So the glow is never subtracted twice. Sets ``phot.scattered_light_quality`` ((N,)
    LightCurveQualityFlags, ``ScatteredLightUnreliable``) and ``phot.details['scattered_light']``.
    Apply it after the stamp is final: a stamp resize re-reads the cubes and drops the
    correction.
    """

    name = "scattered_light"
    version = "1.0"

    def __init__(self, settings):
        super().__init__(settings)
        try:
            self.options = dict(settings["scattered_light"])
        except (KeyError, TypeError):
            raise ConfigurationError("settings: missing section [scattered_light]") from None
        if self.options.get("interpolation", "cubic") not in ("cubic", "linear"):
            raise ConfigurationError("scattered_light.interpolation: 'cubic' or 'linear'")
        self._file_cube = None

    def available(self, phot):
        """A cube is in the cache (prepare stage ``scattered_light``) or ``cube_file`` is set."""
        source = phot.source
        if hasattr(source, "model_group") and source.model_group(self.name) is not None:
            return True
        return bool(str(self.options.get("cube_file", "") or ""))

    def cube_for(self, phot, rows, cols):
        """The cube (window) for this target: the cache's group, else ``cube_file``."""
        source = phot.source
        group = source.model_group(self.name) if hasattr(source, "model_group") else None
        if group is not None:
            return load_window(group, rows, cols)
        path = str(self.options.get("cube_file", "") or "")
        if not path:
            where = getattr(source, "path", "data source")
            raise InputError(f"{where}: no scattered-light cube (run prepare with "
                             "'scattered_light' in prepare.stages, or set "
                             "scattered_light.cube_file)")
        if self._file_cube is None:
            self._file_cube = read_fits(path, sector=phot.sector, camera=phot.camera,
                                        ccd=phot.ccd)
        return self._file_cube

    def model(self, phot):
        """(values, errors, alternative-interpolation values, static) on the stamp (N, r, c)."""
        r1, r2, c1, c2 = phot.stamp
        rows, cols = np.arange(r1, r2), np.arange(c1, c2)
        cube = self.cube_for(phot, rows, cols)
        hours = float(self.options.get("time_smooth", 0.0))
        shrink = bool(self.options.get("shrink", False))
        on_model = cube.reference not in ("none", "dark")
        keep_level = bool(self.options.get("model_level", True)) or not on_model
        if (hours > 0 or shrink or not keep_level) and (
                on_model or bool(self.options.get("denoise_total", False))):
            import dataclasses
            vals, errs = denoise(cube.values, cube.errors, cube.time, hours, shrink,
                                 float(self.options["gap_factor"]), level=keep_level)
            cube = dataclasses.replace(cube, values=vals, errors=errs)
        method = self.options.get("interpolation", "cubic")
        gap = float(self.options["gap_factor"])
        args = (cube.values, cube.bin_rows, cube.bin_cols, cube.time, rows, cols, phot.time)
        val, err = evaluate(*args, errors=cube.errors, method=method, gap_factor=gap)
        alt = evaluate(*args, method="linear" if method == "cubic" else "cubic",
                       gap_factor=gap)
        static = evaluate(cube.static[None], cube.bin_rows, cube.bin_cols, [0.0], rows, cols,
                          [0.0])[0]
        gain = cube.gain_at(cols)[None, None, :]
        return cube, val * gain, err * gain, alt * gain, static * gain[0]

    def apply(self, phot):
        cube, sl, sl_err, alt, static = self.model(phot)
        old_bkg = np.asarray(phot.backgrounds_cube, dtype=float)
        old_bkg_err = np.asarray(phot.backgrounds_err_cube, dtype=float)
        raw = np.asarray(phot.images_cube, dtype=float) + old_bkg
        base_var = np.maximum(np.asarray(phot.images_err_cube, dtype=float) ** 2
                              - np.asarray(old_bkg_err) ** 2, 0.0)
        ref = cube.reference
        if ref == "none":
            new_bkg, new_err = sl, sl_err
        elif ref == "dark":
            with np.errstate(invalid="ignore"):
                new_bkg = sl + np.nanmedian(old_bkg - sl, axis=0)[None]
            new_err = sl_err
        else:
            ref_bkg, ref_err = self._reference_background(phot, ref, old_bkg, old_bkg_err)
            new_bkg = ref_bkg + sl
            new_err = np.sqrt(ref_err ** 2 + sl_err ** 2)
        phot.images_cube = raw - new_bkg
        phot.images_err_cube = np.sqrt(base_var + new_err ** 2)
        phot.backgrounds_cube = new_bkg
        phot.backgrounds_err_cube = np.broadcast_to(new_err, new_bkg.shape).copy()
        phot.__dict__.pop("sumimage", None)
        flags, crit = unreliable_cadences(sl, alt, phot.time, static, self.options)
        q = np.zeros(len(phot.time), dtype=np.int32)
        q[flags] = int(LightCurveQualityFlags.ScatteredLightUnreliable)
        q |= frame_flags(cube, phot.time, float(self.options["gap_factor"]))
        phot.scattered_light_quality = q
        if hasattr(phot, "correction_quality"):
            phot.correction_quality |= q
        phot.details["scattered_light"] = {
            "reference": ref, "n_unreliable": int(np.count_nonzero(q)),
            "n_guessed_frames": int(np.count_nonzero(cube.flags)),
            "peak": float(np.max(crit["level"])) if len(q) else 0.0,
            "max_rate": float(np.max(crit["rate"])) if len(q) else 0.0,
            "max_interp_error": float(np.max(crit["interp_error"])) if len(q) else 0.0,
        }
        return q

    @staticmethod
    def _reference_background(phot, name, old_bkg, old_err):
        """The named BackgroundModel at the stamp (reused if BasePhotometry already used it)."""
        if phot.details.get("background") == name:
            return old_bkg, np.broadcast_to(old_err, old_bkg.shape)
        group = phot.source.model_group(name) if hasattr(phot.source, "model_group") else None
        if group is None:
            raise InputError(f"{getattr(phot.source, 'path', 'source')}: the scattered-light "
                             f"cube was built on top of '{name}', which the cache lacks")
        from photometry import background_model_class
        cls = background_model_class(name)
        rs, cs = phot._slices()
        frames = phot._frames
        bkg = np.broadcast_to(cls.evaluate(group, rs, cs, frames), old_bkg.shape)
        try:
            err = np.broadcast_to(cls.evaluate_error(group, rs, cs, frames), old_bkg.shape)
        except NotImplementedError:
            err = np.zeros(old_bkg.shape)
        return np.asarray(bkg, dtype=float), np.asarray(err, dtype=float)
