"""Scoring a measured light curve against the simulator's truth (tests and benchmarks).

One definition for every plugin's tests and benchmarks, so their figures compare.
"""
import numpy as np

__all__ = ["compare_to_truth", "score_lightcurve"]


def compare_to_truth(flux, true_flux, good=None):
    """Scatter and recovered amplitude of ``flux`` against ``true_flux``.

    Both curves are normalised by their median over the good, finite cadences.

    Returns
    -------
    scatter : float
        Standard deviation of the normalised residual (relative units; divide by the ideal
        relative noise for the "noise ratio" of the issues).
    amplitude : float
        Least-squares slope, with an offset term, of the measured relative variation against
        the true one (1 = injected signal fully recovered); NaN when the truth does not vary.
        The offset keeps the noise of the measured median out of the slope.
    """
    flux = np.asarray(flux, dtype=float)
    true = np.asarray(true_flux, dtype=float)
    keep = np.isfinite(flux) if good is None else np.asarray(good, bool) & np.isfinite(flux)
    f = flux[keep] / np.median(flux[keep])
    t = true[keep] / np.median(true[keep])
    x = t - np.mean(t)
    amplitude = np.sum(x * (f - np.mean(f))) / np.sum(x * x) if np.ptp(t) > 1e-4 else np.nan
    return float(np.std(f - t)), float(amplitude)


def score_lightcurve(lightcurve, true_flux, ideal_noise):
    """(noise ratio, amplitude) of a light curve Table on its quality-0 cadences.

    The noise ratio is the scatter of :func:`compare_to_truth` divided by the ideal relative
    noise, ``ideal_noise`` (e-/s, e.g. truth.h5 ``stars/ideal_noise``) over the median true flux.
    """
    good = np.asarray(lightcurve["quality"]) == 0
    true = np.asarray(true_flux, dtype=float)
    scatter, amplitude = compare_to_truth(lightcurve["flux"], true, good)
    return scatter / (ideal_noise / np.median(true[good])), amplitude
