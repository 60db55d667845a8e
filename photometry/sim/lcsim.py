"""Synthetic CCD light-curve ensembles with known systematics, and signal measurements.

For testing and benchmarking light-curve corrections without pixels, on systematics whose
shapes and CCD dependence differ from ``tessphot simulate``'s (which makes them by focus and
pointing in the pixels): a TESS-like time axis (two orbits, a gap, momentum dumps), stars over
a CCD with photon/sky/read noise from their Tmag, three common systematics with
position-dependent, star-to-star scattered coefficients, and variable stars. Everything is
multiplicative: ``flux = F (1 + signal) (1 + systematic) + noise``.
"""
import numpy as np

from photometry.hooks.utilities import mag2flux

__all__ = ["synthetic_ensemble", "inject_sinusoid", "inject_transit", "sinusoid_amplitude",
           "transit_depth", "systematic_rms", "transit_model", "in_transit"]


def _time_axis(n, cadence):
    """BTJD mid-times of ``n`` cadences over two orbits with a 1-day gap, and cadence numbers."""
    step = cadence / 86400.0
    half = n // 2
    gap = int(round(1.0 / step))
    cadenceno = np.concatenate([np.arange(half), np.arange(half, n) + gap]) + 4697
    return 1325.3 + (cadenceno - 4697) * step, cadenceno


def synthetic_ensemble(n_stars=300, n_cadences=1000, cadence=1800, seed=0, scale=1.0,
                       scatter=0.1, variable_fraction=0.15, dump_interval=2.5,
                       systematics="orbit"):
    """A CCD's SAP light curves with known systematics and variability.

    Parameters
    ----------
    scale : float
        Multiplies the three systematics: a focus-like settle-and-ramp per orbit (0.1 % at
        the CCD centre, growing with the square of the distance to 0.4 % at the corners), a pointing-like drift that jumps at each momentum dump
        (+-0.2 %, changing sign across the CCD) and a scattered-light decay after each orbit
        start (0.1 %, stronger at low rows).
    systematics : {"orbit", "steps"}
        ``"orbit"`` the three shapes above; ``"steps"`` others, so that a correction is not
        tuned to one set: a focus ramp over the whole sector (no settling), pointing offsets
        that jump by random amounts at each momentum dump and stay (a random walk, no drift)
        and a 1.7-d thermal oscillation, with the same CCD dependences.
    scatter : float
        Relative star-to-star scatter of the systematic coefficients about their smooth
        dependence on position.

    Returns
    -------
    ensemble : photometry.scheduler.correct.Ensemble
    truth : dict
        ``systematic`` and ``signal`` (S, N) relative, ``sigma`` (S,) relative white noise per
        cadence, ``variable`` (S,) bool, ``dumps`` (cadence indices flagged 32); for oracle
        fits, ``shapes`` (3, N), each star's ``coeff`` (S, 3) (``systematic = coeff @
        shapes``) and ``coeff_mean`` (S, 3), their smooth dependence on the CCD position
        (``coeff`` scatters about it by ``scatter``).
    """
    from photometry.hooks.quality import fit_cadences
    from photometry.scheduler.correct import Ensemble
    rng = np.random.default_rng(seed)
    time, cadenceno = _time_axis(n_cadences, cadence)
    tmag = rng.uniform(8.0, 14.0, n_stars)
    row = rng.uniform(0, 2048, n_stars)
    column = rng.uniform(44, 2092, n_stars)
    flux0 = mag2flux(tmag)
    exposure = cadence * 0.792
    npix = np.clip(4 + 3 * (14 - tmag), 4, 40)
    var = (flux0 + npix * 100.0) * exposure + npix * 720 * (cadence / 1800) * 100.0
    sigma = np.sqrt(var) / exposure / flux0

    orbit = (time >= time[n_cadences // 2]).astype(int)
    t0 = np.where(orbit == 0, time[0], time[n_cadences // 2])
    since = time - t0
    focus = (1 - np.exp(-since / 1.5)) * 0.7 + 0.3 * since / 13.0
    focus -= focus.mean()
    dumps = np.flatnonzero(np.diff(np.floor((time - time[0]) / dump_interval)) > 0) + 1
    pointing = ((time - time[0]) % dump_interval) / dump_interval - 0.5
    scattered = np.exp(-since / 0.8)
    scattered -= scattered.mean()
    if systematics == "steps":
        focus = (time - time.mean()) / np.ptp(time)
        pointing = np.cumsum(np.isin(np.arange(n_cadences), dumps)
                             * rng.normal(0.0, 0.4, n_cadences))
        pointing -= pointing.mean()
        scattered = np.sin(2 * np.pi * (time - time[0]) / 1.7)
    elif systematics != "orbit":
        raise ValueError(f"systematics = {systematics!r}: 'orbit' or 'steps'")
    shapes = np.array([focus / np.abs(focus).max(), pointing, scattered])
    radius = np.hypot(row - 1024, column - 1068) / 1448
    coeff = np.column_stack([3e-3 * (0.3 + radius ** 2), 2e-3 * (column - 1068) / 1024,
                             1e-3 * (1 - row / 2048)])
    coeff_mean = scale * coeff
    coeff = coeff_mean * (1 + scatter * rng.standard_normal(coeff.shape))
    systematic = coeff @ shapes

    signal = np.zeros((n_stars, n_cadences))
    variable = rng.random(n_stars) < variable_fraction
    for i in np.flatnonzero(variable):
        period = np.exp(rng.uniform(np.log(0.5), np.log(10.0)))
        signal[i] = rng.uniform(0.005, 0.05) * np.sin(2 * np.pi * time / period
                                                      + rng.uniform(0, 2 * np.pi))
    noise = rng.standard_normal((n_stars, n_cadences)) * sigma[:, None]
    flux = flux0[:, None] * ((1 + signal) * (1 + systematic) + noise)
    quality = np.zeros((n_stars, n_cadences), dtype=np.int64)
    quality[:, dumps] = 32
    flux_err = np.broadcast_to((sigma * flux0)[:, None], flux.shape).copy()
    ens = Ensemble(1, 1, 1, int(cadence), "synthetic", time, cadenceno,
                   np.arange(n_stars, dtype=np.int64) + 1000, tmag, row, column, flux,
                   flux_err, quality, fit_cadences(quality, flux))
    return ens, {"systematic": systematic, "signal": signal, "sigma": sigma,
                 "variable": variable, "dumps": dumps, "shapes": shapes, "coeff": coeff,
                 "coeff_mean": coeff_mean}


def inject_sinusoid(flux, time, period, amplitude, phase=0.0):
    """``flux`` times ``1 + amplitude sin(2 pi t / period + phase)``."""
    return flux * (1 + amplitude * np.sin(2 * np.pi * time / period + phase))


def in_transit(time, period, epoch, duration):
    """(N,) bool: the cadences inside a box transit of this ephemeris.

    The one definition that injection and measurement share: a transit whose edge falls on
    a cadence (a 3-h box centred on a 30-min cadence) puts that cadence in or out by rounding,
    and a measurement deciding it on its own put an in-transit cadence into the baseline
    (1/35 of the depth: the benchmark's 10-mmag transits "lost" 0.6 %).
    """
    phase = (np.asarray(time, dtype=float) - epoch + 0.5 * period) % period - 0.5 * period
    return np.abs(phase) < 0.5 * duration


def transit_model(time, period, epoch, duration, depth):
    """Relative flux of a box transit (1 - depth in transit)."""
    return 1.0 - depth * in_transit(time, period, epoch, duration)


def inject_transit(flux, time, period, epoch, duration, depth):
    """``flux`` times a box transit."""
    return flux * transit_model(time, period, epoch, duration, depth)


def sinusoid_amplitude(time, rel, period, good):
    """Least-squares amplitude of a sinusoid of known period (with an offset and a line)."""
    t = time[good]
    a = np.column_stack([np.sin(2 * np.pi * t / period), np.cos(2 * np.pi * t / period),
                         np.ones_like(t), t - t.mean()])
    c = np.linalg.lstsq(a, rel[good], rcond=None)[0]
    return float(np.hypot(c[0], c[1]))


def transit_depth(time, rel, period, epoch, duration, good):
    """Least-squares depth of a box transit of known ephemeris against its local baseline.

    The baseline is a line fitted per transit over three durations either side, so slow
    trends do not bias the depth.
    """
    depths, weights = [], []
    box = in_transit(time, period, epoch, duration)
    n0 = int(np.floor((time.min() - epoch) / period))
    n1 = int(np.ceil((time.max() - epoch) / period))
    for k in range(n0, n1 + 1):
        tc = epoch + k * period
        near = good & (np.abs(time - tc) < 3.5 * duration)
        inside = near & box
        if inside.sum() < 2 or (near & ~inside).sum() < 6:
            continue
        t = time[near] - tc
        a = np.column_stack([np.ones_like(t), t, -box[near].astype(float)])
        c = np.linalg.lstsq(a, rel[near], rcond=None)[0]
        depths.append(c[2])
        weights.append(inside.sum())
    if not depths:
        return float("nan")
    return float(np.average(depths, weights=weights))


def systematic_rms(time, residual, good, bin_days=0.5):
    """RMS of the slow part of ``residual`` (relative), with the white noise taken out.

    The residual is averaged in ``bin_days`` bins; the bins' scatter expected from the
    residual's own point-to-point noise is subtracted in quadrature.
    """
    r = residual[good]
    t = time[good]
    white = 1.4826 * np.median(np.abs(np.diff(r))) / np.sqrt(2)
    edges = np.arange(t.min(), t.max() + bin_days, bin_days)
    idx = np.digitize(t, edges)
    means, counts = [], []
    for b in np.unique(idx):
        sel = idx == b
        if sel.sum() >= 3:
            means.append(r[sel].mean())
            counts.append(sel.sum())
    means, counts = np.array(means), np.array(counts)
    total = np.mean((means - np.average(means, weights=counts)) ** 2)
    noise = np.mean(white ** 2 / counts)
    return float(np.sqrt(max(total - noise, 0.0)))
