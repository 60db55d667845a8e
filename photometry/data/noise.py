"""The CCD noise model: what a pixel's uncertainty is, from the frame header.

One place for the detector numbers that every noise estimate needs: the read noise of each
output, the number of co-added 2-s readouts per cadence and the time on source. The FFI reader
uses it to estimate uncertainties where a file has none (TICA frames, third-party cutouts, NaN
regions of SPOC's uncertainty image); the light-curve noise model (:class:`ApertureNoise`)
uses it to predict the photon-noise limit of a star's flux as its method measured it (the sum
over its actual aperture, or the PRF-weighted fit: :func:`prf_fit_weights`), which the light-curve
file writes beside the measured CDPP (:func:`measured_cdpp`) of SAP_FLUX and PDCSAP_FLUX.

Units (checked on the real sector-1 FFI: its ``uncert`` image squared is
``0.0395 + flux / 1343 s`` in (e-/s)^2, against ``0.0359 + flux / 1426 s`` from its header;
the model is 3.5 % below SPOC's uncertainty, which adds flat-field and smear terms):

* ``READNOIA..D``: e- per pixel per 2-s readout (10.06, 7.46, 7.31, 9.17 in that file);
* ``NREADOUT``: co-added readouts per cadence (720 at 1800 s: cosmic-ray mitigation keeps
  8 of every 10 frames); else ``NUM_FRM`` x 0.8 (``CRMITEN`` true), else cadence / 2 s x 0.8;
* ``EXPOSURE``: time on source (d); else cadence x ``DEADC`` (0.792 with mitigation, 0.99
  without).

A pixel of calibrated flux ``F`` (e-/s, sky included) then has variance
``(max(F, 0) x T + NREADOUT x RN^2) / T^2`` with ``T`` the exposure in seconds.
"""
from dataclasses import dataclass

import numpy as np

__all__ = ["CCDNoise", "INT_TIME", "CRM_KEEP", "DEADC", "DEFAULT_READ_NOISE",
           "output_of_column", "ApertureNoise", "prf_fit_weights", "measured_cdpp",
           "cdpp_cadences", "SYSTEMATIC_FLOOR_PPM"]

INT_TIME = 1.98                     # s, photon accumulation per 2-s frame
CRM_KEEP = 0.8                      # cosmic-ray mitigation keeps 8 of every 10 frames
DEADC = 0.99 * CRM_KEEP             # = 0.792, SPOC's DEADC for FFIs
DEFAULT_READ_NOISE = 10.0           # e- per readout (TESS Instrument Handbook: about 10 e-)
OUTPUTS = "ABCD"
#: ppm in one hour: the systematic noise floor TESS light curves reach for bright stars (the
#: TESS mission requirement, used by the TASOC and QLP papers' CDPP-versus-Tmag figures)
SYSTEMATIC_FLOOR_PPM = 60.0

#: 0-based first CCD column of the science pixels of outputs A-D (SCCSA..SCCSD - 1).
_DEFAULT_OUTPUT_STARTS = (44, 556, 1068, 1580)


def output_of_column(columns, starts=_DEFAULT_OUTPUT_STARTS):
    """Index 0-3 (outputs A-D) of 0-based CCD columns; collateral columns get the nearest."""
    return np.clip(np.searchsorted(np.asarray(starts), np.asarray(columns), side="right") - 1,
                   0, 3)


@dataclass(frozen=True)
class CCDNoise:
    """Read noise per output, readouts per cadence and time on source of one frame.

    Attributes
    ----------
    read_noise : tuple of 4 float
        e- per pixel per readout, outputs A-D.
    n_readouts : int
        Co-added readouts per cadence.
    exposure : float
        Seconds on source per cadence.
    output_starts : tuple of 4 int
        0-based CCD column where each output's science pixels start.
    defaulted : tuple of str
        Header keywords that were missing, so a documented default was used.
    """

    read_noise: tuple
    n_readouts: int
    exposure: float
    output_starts: tuple = _DEFAULT_OUTPUT_STARTS
    defaulted: tuple = ()

    @classmethod
    def from_header(cls, header, cadence_s):
        """The noise parameters of a frame header (defaults for what it lacks).

        Parameters
        ----------
        header : mapping
            Merged primary + image header (``FFIFrame.header``, a TPF's pixel header).
        cadence_s : float
            Cadence in seconds, for the defaults.
        """
        defaulted = []
        read_noise = []
        for out in OUTPUTS:
            value = _finite_or_none(header.get(f"READNOI{out}"))
            if value is None or value <= 0:
                defaulted.append(f"READNOI{out}")
                value = DEFAULT_READ_NOISE
            read_noise.append(value)
        crm = bool(header.get("CRMITEN", float(cadence_s) > 20.0))
        n = _finite_or_none(header.get("NREADOUT"))
        if n is None or n <= 0:
            defaulted.append("NREADOUT")
            frames = _finite_or_none(header.get("NUM_FRM")) or float(cadence_s) / 2.0
            n = frames * (CRM_KEEP if crm else 1.0)
        exposure = _finite_or_none(header.get("EXPOSURE"))
        if exposure is None or exposure <= 0:
            defaulted.append("EXPOSURE")
            exposure = float(cadence_s) * (DEADC if crm else 0.99)
        else:
            exposure *= 86400.0
        starts = []
        for k, out in enumerate(OUTPUTS):
            value = _finite_or_none(header.get(f"SCCS{out}"))
            starts.append(int(value) - 1 if value is not None else _DEFAULT_OUTPUT_STARTS[k])
        return cls(tuple(float(v) for v in read_noise), int(round(n)), float(exposure),
                   tuple(starts), tuple(defaulted))

    def read_sigma(self, columns):
        """1-sigma read noise (e-/s) of one pixel per cadence at 0-based CCD ``columns``."""
        rn = np.asarray(self.read_noise, dtype=float)[output_of_column(columns,
                                                                       self.output_starts)]
        return np.sqrt(self.n_readouts) * rn / self.exposure

    def pixel_variance(self, flux, columns):
        """Expected variance ((e-/s)^2) of calibrated pixels ``flux`` (sky included).

        ``columns`` (0-based CCD) broadcast against ``flux``; negative or NaN flux counts
        as zero photons (the read noise remains).
        """
        photons = np.where(np.isfinite(flux), np.maximum(flux, 0.0), 0.0)
        return photons / self.exposure + self.read_sigma(columns) ** 2

    def to_attrs(self):
        """A flat dict for HDF5 attributes or FITS cards (``from_attrs`` reads it back)."""
        return {"noise_read_noise": list(self.read_noise), "noise_n_readouts": self.n_readouts,
                "noise_exposure": self.exposure, "noise_output_starts": list(self.output_starts),
                "noise_defaulted": ",".join(self.defaulted)}

    @classmethod
    def from_attrs(cls, attrs):
        """Inverse of :meth:`to_attrs`."""
        defaulted = str(attrs.get("noise_defaulted", ""))
        return cls(tuple(float(v) for v in attrs["noise_read_noise"]),
                   int(attrs["noise_n_readouts"]), float(attrs["noise_exposure"]),
                   tuple(int(v) for v in attrs["noise_output_starts"]),
                   tuple(k for k in defaulted.split(",") if k))


def cdpp_cadences(hours, cadence_s):
    """Cadences in a ``hours`` window (at least one): the running mean of a CDPP."""
    return max(1, int(round(float(hours) * 3600.0 / float(cadence_s))))


@dataclass(frozen=True)
class ApertureNoise:
    """Expected noise of one star's flux per cadence, by source of noise.

    Why: a light curve is judged by its scatter against the photon-noise limit of the pixels
    its flux actually came from, weighted as the method weighted them (an aperture sums its
    pixels, a PRF fit weights them by :func:`prf_fit_weights`); SPOC and TASOC give the
    measured CDPP only. All sigmas are e-/s per
    cadence (1-sigma); the relative numbers refer to ``flux``, the star's measured flux.

    Attributes
    ----------
    flux : float
        Median flux of the star (e-/s) the relative noise refers to.
    source : float
        Photon noise of the stars' light in the aperture (target and neighbours).
    sky : float
        Photon noise of the sky background in the aperture.
    read : float
        Read noise of the aperture's pixels (read noise of each pixel's output).
    n_pixels : int
        Pixels in the aperture (of non-zero weight).
    cadence : float
        Seconds per cadence (for the CDPP).
    """

    flux: float
    source: float
    sky: float
    read: float
    n_pixels: int
    cadence: float

    @classmethod
    def of_aperture(cls, noise, star_image, sky_image, mask, columns, flux, cadence):
        """The noise of the sum over ``mask`` of a stamp (:meth:`of_weights` with weights 1)."""
        return cls.of_weights(noise, star_image, sky_image, np.asarray(mask, dtype=bool),
                              columns, flux, cadence)

    @classmethod
    def of_weights(cls, noise, star_image, sky_image, weights, columns, flux, cadence):
        """The noise of the linear flux estimate ``sum(weights * pixels)`` of a stamp.

        Why weights: every linear method's flux is such a sum, an aperture's with weights 1
        in the mask, a PRF fit's with :func:`prf_fit_weights`; its variance per cadence is
        ``sum(weights^2 * pixel variance)``, split here by source of noise.

        Parameters
        ----------
        noise : CCDNoise
        star_image, sky_image : (r, c) arrays
            Mean background-subtracted flux and mean sky background (e-/s per pixel).
        weights : (r, c) float or bool
            The estimator's weight of each pixel (0 or False: not used).
        columns : (r, c) or (c,) array
            0-based CCD columns of the pixels (for the read noise of their output).
        flux : float
            The star's measured median flux (e-/s).
        cadence : float
            Seconds per cadence.
        """
        w = np.nan_to_num(np.asarray(weights, dtype=float))
        used = w != 0
        w2 = w[used] ** 2
        columns = np.broadcast_to(np.asarray(columns), used.shape)
        star = np.asarray(star_image, dtype=float)[used]
        sky = np.asarray(sky_image, dtype=float)[used]
        t = noise.exposure
        var_source = np.nansum(w2 * np.clip(star, 0.0, None)) / t
        var_sky = np.nansum(w2 * np.clip(sky, 0.0, None)) / t
        var_read = float(np.sum(w2 * noise.read_sigma(columns[used]) ** 2))
        return cls(float(flux), float(np.sqrt(var_source)), float(np.sqrt(var_sky)),
                   float(np.sqrt(var_read)), int(used.sum()), float(cadence))

    @property
    def total(self):
        """Total expected sigma per cadence (e-/s)."""
        return float(np.sqrt(self.source ** 2 + self.sky ** 2 + self.read ** 2))

    def relative(self, sigma=None):
        """``sigma`` (default: the total) in ppm of the star's flux (NaN if flux <= 0)."""
        sigma = self.total if sigma is None else sigma
        return float(1e6 * sigma / self.flux) if self.flux > 0 else float("nan")

    def cdpp(self, hours=1.0):
        """Expected CDPP (ppm) over ``hours``: white noise averaged over the window's cadences."""
        return self.relative() / np.sqrt(cdpp_cadences(hours, self.cadence))


def prf_fit_weights(prf, variance, background=True):
    """Pixel weights ``w`` of a PRF fit's flux: the fitted flux is ``sum(w * pixels)``.

    Why: a PRF fit does not sum its aperture. Its flux is the weighted least-squares
    amplitude of the target's PRF ``P`` (unit total flux, as the fit's design), whose
    variance ``1 / sum(P^2 / var)`` is well below the aperture sum's where the sky and read
    noise of the wing pixels dominate (measured / expected 1-h CDPP of linpsf was 0.66-0.83
    for 11.5-13 mag with the aperture formula). With ``background`` a constant level is fitted
    jointly (linpsf's ``fit_background``): the weights then sum to zero and the variance rises
    by the amplitude's share of the 2 x 2 inverse normal matrix (a few % for a stamp of
    hundreds of pixels). Neighbours fitted at the same time (deblending) add noise that this
    lone-star bound does not hold.

    Parameters
    ----------
    prf : (r, c) array
        The target's unit-flux PRF over the stamp.
    variance : (r, c) array
        Each pixel's variance; pixels with NaN or non-positive variance get weight 0.
    background : bool
        Whether a constant background level is fitted together with the flux.

    Returns
    -------
    (r, c) array
    """
    prf = np.asarray(prf, dtype=float)
    variance = np.asarray(variance, dtype=float)
    ok = np.isfinite(prf) & np.isfinite(variance) & (variance > 0)
    ivar = np.where(ok, 1.0 / np.where(ok, variance, 1.0), 0.0)
    p = np.where(ok, prf, 0.0)
    columns = [p, ok.astype(float)] if background else [p]
    normal = np.array([[np.sum(a * b * ivar) for b in columns] for a in columns])
    if not np.all(np.isfinite(normal)) or np.linalg.matrix_rank(normal) < len(columns):
        return np.zeros(prf.shape)
    row = np.linalg.inv(normal)[0]
    return sum(r * a for r, a in zip(row, columns)) * ivar


def measured_cdpp(time, flux, cadence, hours=1.0, window_days=2.0, sigma=5.0,
                  gap_factor=5.0):
    """Measured CDPP (ppm) of a light curve over ``hours``, as lightkurve's ``estimate_cdpp``.

    The relative flux is flattened with a quadratic Savitzky-Golay filter ``window_days`` long
    (each stretch between gaps longer than ``gap_factor`` cadences on its own), points more
    than ``sigma`` robust sigma off are dropped, and the standard deviation of the running mean
    over ``hours`` (within each stretch) is returned. Why a time window and not lightkurve's
    fixed 101 cadences: the same filter then acts alike on 30-, 10- and 3.3-min data, and 2 d
    keeps the filter's own noise suppression below 2 % for 30-min data.

    Returns NaN when fewer than ``2 * n + 3`` good points remain.
    """
    time = np.asarray(time, dtype=float)
    flux = np.asarray(flux, dtype=float)
    ok = np.isfinite(time) & np.isfinite(flux)
    n = cdpp_cadences(hours, cadence)
    if np.count_nonzero(ok) < 2 * n + 3:
        return float("nan")
    flattened = _flattened(time[ok], flux[ok], cadence, window_days, sigma, gap_factor)
    if flattened is None:
        return float("nan")
    resid, good = flattened
    means = []
    start = 0
    for seg in resid:
        keep = good[start:start + seg.size]
        start += seg.size
        y = seg[keep]
        if y.size >= n:
            c = np.cumsum(np.insert(y, 0, 0.0))
            means.append((c[n:] - c[:-n]) / n)
    means = np.concatenate(means) if means else np.array([])
    if means.size < 3:
        return float("nan")
    return float(1e6 * np.std(means))


#: (inputs, result) of the last :func:`_flattened` call: a light curve's CDPPs over 0.5, 1
#: and 2 h (and the run's own 1-h figure) share one flattening
_LAST_FLATTENED = [None, None]


def _flattened(time, flux, cadence, window_days, sigma, gap_factor):
    """Savitzky-Golay-flattened relative flux of :func:`measured_cdpp` by stretch, and the
    mask of points within ``sigma``; None if the median flux is not positive."""
    from astropy.stats import mad_std
    from scipy.signal import savgol_filter

    key = (time.tobytes(), flux.tobytes(), float(cadence), window_days, sigma, gap_factor)
    if _LAST_FLATTENED[0] == key:
        return _LAST_FLATTENED[1]
    result = None
    med = np.median(flux)
    if med > 0:
        rel = flux / med
        breaks = np.flatnonzero(np.diff(time) > gap_factor * cadence / 86400.0) + 1
        window = int(round(window_days * 86400.0 / cadence)) | 1
        resid = []
        for seg in np.split(np.arange(rel.size), breaks):
            y = rel[seg]
            w = min(window, y.size if y.size % 2 else y.size - 1)
            trend = savgol_filter(y, w, 2) if w > 3 else np.full(y.size, np.median(y))
            resid.append(y / trend - 1.0)
        flat = np.concatenate(resid)
        result = resid, np.abs(flat - np.median(flat)) <= sigma * mad_std(flat)
    _LAST_FLATTENED[:] = [key, result]
    return result


def _finite_or_none(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None
