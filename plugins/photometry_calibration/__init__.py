"""Built-in raw-FFI calibration stages (2-D bias, pedestal, gain, linearity, smear, flat).

Each stage is one plugin class working in place on a :class:`photometry.data.calibration.RawFrame`
with the :class:`photometry.data.calibration.CCDModel` of its camera/CCD. The order follows TICA
(Fausnaugh et al. 2020): the electronic offsets come off first, in ADU; the gain turns ADU into
electrons, which is where the variance image starts (read noise + Poisson); the non-linearity
is a function of the charge per readout, so it must see the charge before the smear is removed;
the smear is an additive charge per column, removed before the flat, which is a multiplicative
response of each pixel. Changing the order changes the answer, so every stage checks the units
it receives.
"""
import numpy as np

import photometry
from photometry import CalibrationStage, ConfigurationError, InputError, median_variance_factor

__all__ = ["Bias2D", "Pedestal", "Gain", "Linearity", "Smear", "FlatField"]


class Bias2D(CalibrationStage):
    """Subtract the fixed-pattern 2-D bias (``BIAS2D``) of the frame's exposure class.

    The pattern includes the start-of-frame ringing in the low rows, which would otherwise bias
    the per-output pedestal measured next.
    """

    name = "bias2d"
    version = "1"
    order = 10

    def apply(self, frame, models):
        frame.require_units("ADU", self.name)
        frame.data -= models.bias2d
        return frame


class Pedestal(CalibrationStage):
    """Subtract each output's time-variable scalar bias measured on its trailing virtual columns.

    The mean over rows from ``pedestal_first_row`` on (scaled to a reduced science height) and
    over the virtual columns after the first ``pedestal_skip_columns``, which see scattered
    charge from the last science columns; the low rows carry start-of-frame ringing. The
    value and its standard error go into the diagnostics (header ``PEDESTx``/``PEDERRx``).
    """

    name = "pedestal"
    version = "1"
    order = 20

    def apply(self, frame, models):
        frame.require_units("ADU", self.name)
        cfg = self.settings["calibration"]
        geom = frame.geometry
        n_sci = geom.science_rows.stop - geom.science_rows.start
        first = geom.science_rows.start + min(int(cfg["pedestal_first_row"]),
                                              int(round(cfg["pedestal_first_row"] * n_sci / 2048)))
        skip = int(cfg["pedestal_skip_columns"])
        values, errors = {}, {}
        for out in geom.outputs:
            cols = slice(out.trailing.start + skip, out.trailing.stop)
            pixels = frame.data[first:, cols]
            if pixels.size < 2:
                raise InputError(
                    f"{frame.path}: no trailing virtual pixels left for the pedestal of output "
                    f"{out.name} (pedestal_skip_columns={skip})")
            value = float(pixels.mean())
            values[out.name] = value
            errors[out.name] = float(pixels.std(ddof=1) / np.sqrt(pixels.size))
            for block in out.blocks:
                frame.data[:, block] -= value
        frame.diagnostics["pedest"] = values
        frame.diagnostics["pederr"] = errors
        return frame


class Gain(CalibrationStage):
    """Multiply each output's pixels by its gain (e-/ADU) and start the variance image.

    Variance per pixel: ``NREADOUT x READNOISE^2`` (each co-added readout adds its read noise),
    the pedestal's standard error, and the Poisson variance of the charge.
    """

    name = "gain"
    version = "1"
    order = 30

    def apply(self, frame, models):
        frame.require_units("ADU", self.name)
        frame.variance = np.zeros_like(frame.data)
        pederr = frame.diagnostics.get("pederr", {})
        for out in frame.geometry.outputs:
            g = models.gain[out.name]
            electronic = (frame.n_readouts * models.read_noise[out.name] ** 2
                          + (g * pederr.get(out.name, 0.0)) ** 2)
            for block in out.blocks:
                data = frame.data[:, block]
                data *= g
                frame.variance[:, block] = electronic + np.maximum(data, 0.0)
        frame.units = "electrons"
        frame.diagnostics["gain"] = dict(models.gain)
        return frame


class Linearity(CalibrationStage):
    """Undo the output amplifiers' non-linearity on the science columns (all rows).

    The charge read as ``e`` is truly ``e * P(x)`` with ``x = e / (NREADOUT * gain)`` the mean
    ADU of one readout (the non-linearity acts on each 2 s readout, not on the co-added sum) and
    ``P`` the output's polynomial ``LINCOEF``. The read-noise part of the variance is scaled by
    the squared derivative of the correction and the Poisson part recomputed from the
    corrected charge, so the uncertainty stays right for bright pixels.
    """

    name = "linearity"
    version = "1"
    order = 40

    #: rows per block: keeps the temporaries in cache (3x faster than whole-frame arrays)
    block_rows = 128

    def apply(self, frame, models):
        frame.require_units("electrons", self.name)
        for out in frame.geometry.outputs:
            coef = np.asarray(models.lincoef[out.name], dtype=float)
            if np.all(coef[1:] == 0) and coef[0] == 1.0:
                continue
            # x * P'(x) has coefficients k * c_k: the derivative of e * P(e / (N g)) in e is
            # P(x) + x P'(x)
            xdp = coef * np.arange(coef.size)
            scale = 1.0 / (frame.n_readouts * models.gain[out.name])
            cols = out.science
            for r0 in range(0, frame.data.shape[0], self.block_rows):
                rows = slice(r0, r0 + self.block_rows)
                e = frame.data[rows, cols]
                var = frame.variance[rows, cols]
                x = e * scale
                p = _horner(x, coef)
                deriv = _horner(x, xdp)
                deriv += p
                np.maximum(e, 0.0, out=x)
                var -= x                      # the read-noise (electronic) part
                deriv *= deriv
                var *= deriv
                e *= p                        # corrected charge, in place in frame.data
                np.maximum(e, 0.0, out=x)
                var += x                      # Poisson part of the corrected charge
        return frame


def _horner(x, coef):
    """sum(coef[k] * x**k), evaluated in place with one temporary."""
    out = np.full_like(x, coef[-1])
    for c in coef[-2::-1]:
        out *= x
        out += c
    return out


class Smear(CalibrationStage):
    """Remove the frame-transfer smear: the per-column level of the smear rows.

    TESS has no shutter, so while the image is shifted out every pixel of a column collects
    light from all rows; the smear rows, read after the image, hold only that charge. The
    estimate (mean by default; median as an option against bleed) uses the smear rows after
    the first ``smear_skip_rows``; its own variance is added to every pixel of the column.
    """

    name = "smear"
    version = "1"
    order = 50

    def apply(self, frame, models):
        frame.require_units("electrons", self.name)
        cfg = self.settings["calibration"]
        geom = frame.geometry
        rows = slice(geom.smear_rows.start + int(cfg["smear_skip_rows"]), geom.smear_rows.stop)
        n = rows.stop - rows.start
        if n < 1:
            raise ConfigurationError(
                f"calibration.smear_skip_rows={cfg['smear_skip_rows']} leaves no smear row")
        cols = geom.science_columns
        block = frame.data[rows, cols]
        block_var = frame.variance[rows, cols]
        estimator = cfg["smear_estimator"]
        if estimator == "mean":
            smear = block.mean(axis=0)
            smear_var = block_var.sum(axis=0) / n ** 2
        elif estimator == "median":
            smear = np.median(block, axis=0)
            smear_var = median_variance_factor(n) * block_var.mean(axis=0) / n
        else:
            raise ConfigurationError(
                f"calibration.smear_estimator must be 'mean' or 'median', not {estimator!r}")
        frame.data[:, cols] -= smear
        frame.variance[:, cols] += smear_var
        frame.diagnostics["smear"] = float(np.mean(smear))
        return frame


class FlatField(CalibrationStage):
    """Divide by the relative pixel response (``FLAT``), data and uncertainty alike."""

    name = "flat"
    version = "1"
    order = 60

    def apply(self, frame, models):
        frame.require_units("electrons", self.name)
        frame.data /= models.flat
        frame.variance /= models.flat ** 2
        return frame


@photometry.hookimpl
def register_calibration_stages():
    return [Bias2D, Pedestal, Gain, Linearity, Smear, FlatField]
