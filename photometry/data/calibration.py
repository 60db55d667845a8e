"""Raw-FFI calibration: from raw SPOC ``*_ffir`` counts to calibrated e-/s frames.

The core owns everything that is not an algorithm: the CCD geometry read from the headers,
the raw frame in memory (:class:`RawFrame`), the calibration model files the user supplies
(:class:`CalibrationModels`), and running the registered calibration stages in their ``order``
(:func:`calibrate_raw`). The stages themselves (2-D bias, pedestal, gain, linearity, smear,
flat) are plugins, registered through ``register_calibration_stages`` exactly as a third-party
stage would be, so a user can replace or add one without touching this module.

What comes out is a :class:`photometry.data.ffi.FFIFrame` identical in form to what
:func:`photometry.data.ffi.read_ffi` returns for a calibrated file: the header parsing (times,
cadence number, WCS, science-region crop) is done by the FFI reader on the raw file's own
header, and only the pixels and their uncertainty come from here.

Model file format (one FITS file per camera/CCD and exposure class; see docs/calibration.md):

* primary header: ``CAMERA``, ``CCD``, ``NREADOUT`` (co-added 2 s readouts per cadence, the
  exposure class: 720 for 30 min, 240 for 10 min, 80 for 200 s), ``INT_TIME`` (s), ``CADENCE``
  (s, informative);
* ``BIAS2D``: float image of the full raw frame shape, ADU in the units of the co-added raw sum;
* ``FLAT``: float image of the full raw frame shape, relative response (1 on collateral pixels);
* ``GAIN_LINEARITY``: table, one row per output ``A``-``D``: ``OUTPUT``, ``GAIN`` (e-/ADU),
  ``READNOISE`` (e- per single readout), ``LINCOEF`` (polynomial ``c0, c1, ...`` in ``x``, the
  mean ADU per readout: the true charge is ``e * sum(c_k x**k)``).
"""
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from photometry.hooks.errors import ConfigurationError, InputError

__all__ = ["OUTPUTS", "OutputGeometry", "CCDGeometry", "RawFrame", "CCDModel",
           "CalibrationModels", "read_raw", "write_model", "load_stages", "calibrate_raw",
           "calibrate_file", "calibrate_frames", "median_variance_factor"]

logger = logging.getLogger(__name__)

#: CCD readout outputs, in column order.
OUTPUTS = ("A", "B", "C", "D")
#: Collateral sizes of the SPOC layout: columns per output before/after the science columns,
#: and buffer, smear and virtual rows after the science rows.
LEADING_COLUMNS = TRAILING_COLUMNS = 11
BUFFER_ROWS = SMEAR_ROWS = VIRTUAL_ROWS = 10
#: The calibrated SPOC full frame (0-based array indices): 2078 rows x 2136 columns, the
#: 2048 x 2048 science pixels starting at column 44.
SCIENCE_SIZE = 2048
FRAME_ROWS = 2078
FRAME_COLS = 2136
LEAD_COLS = 44                      # serial-register (virtual) columns before the science ones


# --------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class OutputGeometry:
    """0-based half-open column ranges of one readout output."""

    name: str
    leading: slice
    science: slice
    trailing: slice
    increasing: bool = True

    @property
    def blocks(self):
        """The output's column blocks (leading, science, trailing): all it reads out."""
        return (self.leading, self.science, self.trailing)


@dataclass(frozen=True)
class CCDGeometry:
    """Where the science pixels and each kind of collateral pixel are in a full raw frame."""

    shape: tuple
    outputs: tuple
    science_rows: slice
    buffer_rows: slice
    smear_rows: slice
    virtual_rows: slice

    @property
    def science_columns(self):
        """The contiguous science columns of all outputs."""
        return slice(self.outputs[0].science.start, self.outputs[-1].science.stop)

    @property
    def science(self):
        """(rows, columns) slices of the science region."""
        return (self.science_rows, self.science_columns)

    @classmethod
    def from_header(cls, header, shape, source="raw frame"):
        """Geometry from the SPOC keywords (1-based inclusive ranges), checked against ``shape``.

        Raises
        ------
        InputError
            A keyword is missing, or a range lies outside the image or overlaps another.
        """
        def rng(start_key, end_key):
            for key in (start_key, end_key):
                if header.get(key) is None:
                    raise InputError(f"{source}: header lacks CCD geometry keyword {key}")
            return slice(int(header[start_key]) - 1, int(header[end_key]))

        outputs = []
        for o in OUTPUTS:
            outputs.append(OutputGeometry(
                name=o, leading=rng(f"LVCS{o}", f"LVCE{o}"), science=rng(f"SCCS{o}", f"SCCE{o}"),
                trailing=rng(f"TVCS{o}", f"TVCE{o}"),
                increasing=bool(header.get(f"SCICOLH{o}", o in "AC"))))
        geometry = cls(shape=tuple(int(n) for n in shape), outputs=tuple(outputs),
                       science_rows=rng("SCIROWS", "SCIROWE"),
                       buffer_rows=(rng("BFROWS", "BFROWE") if header.get("BFROWS") is not None
                                    else slice(0, 0)),
                       smear_rows=rng("SMROWS", "SMROWE"), virtual_rows=rng("VROWS", "VROWE"))
        geometry.validate(source)
        return geometry

    @classmethod
    def standard(cls, n_rows=2048, n_cols=2048):
        """The SPOC layout around a science region of ``n_rows`` x ``n_cols`` pixels.

        ``standard()`` is the real 2078 x 2136 TESS frame; smaller sizes keep every collateral
        region at its real size (11 columns per output each side, 10 buffer, smear and virtual
        rows) so that tests can use small frames with the same code path.
        """
        if n_cols % len(OUTPUTS) or n_cols <= 0 or n_rows <= 0:
            raise InputError(f"science size {n_rows}x{n_cols}: columns must be a positive "
                             f"multiple of {len(OUTPUTS)} (one block per output)")
        width = n_cols // len(OUTPUTS)
        lead0 = 0
        sci0 = LEADING_COLUMNS * len(OUTPUTS)
        trail0 = sci0 + n_cols
        outputs = tuple(
            OutputGeometry(
                name=o,
                leading=slice(lead0 + i * LEADING_COLUMNS, lead0 + (i + 1) * LEADING_COLUMNS),
                science=slice(sci0 + i * width, sci0 + (i + 1) * width),
                trailing=slice(trail0 + i * TRAILING_COLUMNS, trail0 + (i + 1) * TRAILING_COLUMNS),
                increasing=o in "AC")
            for i, o in enumerate(OUTPUTS))
        r = n_rows
        return cls(shape=(n_rows + BUFFER_ROWS + SMEAR_ROWS + VIRTUAL_ROWS,
                          trail0 + TRAILING_COLUMNS * len(OUTPUTS)),
                   outputs=outputs, science_rows=slice(0, r),
                   buffer_rows=slice(r, r + BUFFER_ROWS),
                   smear_rows=slice(r + BUFFER_ROWS, r + BUFFER_ROWS + SMEAR_ROWS),
                   virtual_rows=slice(r + BUFFER_ROWS + SMEAR_ROWS,
                                      r + BUFFER_ROWS + SMEAR_ROWS + VIRTUAL_ROWS))

    def validate(self, source):
        nrows, ncols = self.shape
        col_ranges = [(f"{kind} columns of output {o.name}", s)
                      for o in self.outputs
                      for kind, s in (("leading", o.leading), ("science", o.science),
                                      ("trailing", o.trailing))]
        row_ranges = [(f"{kind} rows", s) for kind, s in (
            ("science", self.science_rows), ("buffer", self.buffer_rows),
            ("smear", self.smear_rows), ("virtual", self.virtual_rows))]
        for label, s, limit in ([(lab, s, ncols) for lab, s in col_ranges]
                                + [(lab, s, nrows) for lab, s in row_ranges]):
            if s.stop - s.start == 0 and label == "buffer rows":
                continue
            if not 0 <= s.start < s.stop <= limit:
                raise InputError(f"{source}: {label} {s.start + 1}-{s.stop} (1-based) lie outside "
                                 f"the {nrows}x{ncols} image")
        for ranges in (col_ranges, row_ranges):
            spans = sorted((s.start, s.stop, lab) for lab, s in ranges if s.stop > s.start)
            for (a0, a1, la), (b0, b1, lb) in zip(spans, spans[1:]):
                if b0 < a1:
                    raise InputError(f"{source}: {la} overlap {lb}")
        sci = [o.science for o in self.outputs]
        for a, b in zip(sci, sci[1:]):
            if a.stop != b.start:
                raise InputError(f"{source}: science columns of the outputs are not contiguous")

    def to_header(self, header):
        """Write the SPOC geometry keywords (1-based inclusive) into ``header``."""
        for o in self.outputs:
            header[f"LVCS{o.name}"] = (o.leading.start + 1, f"serial register col start, output {o.name}")
            header[f"LVCE{o.name}"] = (o.leading.stop, f"serial register col end, output {o.name}")
            header[f"TVCS{o.name}"] = (o.trailing.start + 1, f"trailing virtual col start, output {o.name}")
            header[f"TVCE{o.name}"] = (o.trailing.stop, f"trailing virtual col end, output {o.name}")
            header[f"SCCS{o.name}"] = (o.science.start + 1, f"science col start, output {o.name}")
            header[f"SCCE{o.name}"] = (o.science.stop, f"science col end, output {o.name}")
            header[f"SCICOLH{o.name}"] = (o.increasing, "T science cols are read increasing order")
        for key, s, label in (("SCIROWS", self.science_rows, "science rows"),
                              ("BFROWS", self.buffer_rows, "buffer rows"),
                              ("SMROWS", self.smear_rows, "smear rows"),
                              ("VROWS", self.virtual_rows, "virtual rows")):
            header[key] = (s.start + 1, f"{label} start")
            header[key[:-1] + "E"] = (s.stop, f"{label} end (inclusive)")
        return header


# --------------------------------------------------------------------------------------------
# Raw frame


@dataclass
class RawFrame:
    """A full raw frame being calibrated, passed from stage to stage.

    ``data`` is float64 over the whole frame (collateral included). ``units`` is ``"ADU"``
    until the gain stage turns it into ``"electrons"`` (per cadence, not yet per second);
    ``variance`` (e-^2) is ``None`` until then. ``diagnostics`` collects per-stage numbers
    (pedestals, smear level) that end up in the calibrated header; ``applied`` the stage names.
    """

    path: Path
    data: np.ndarray
    header: fits.Header
    geometry: CCDGeometry
    camera: int
    ccd: int
    n_readouts: int
    int_time: float
    units: str = "ADU"
    variance: np.ndarray | None = None
    diagnostics: dict = field(default_factory=dict)
    applied: list = field(default_factory=list)

    @property
    def exposure(self):
        """Seconds of photon collection per cadence: co-added readouts x integration time."""
        return self.n_readouts * self.int_time

    def require_units(self, units, stage):
        """Refuse a stage running on data in the wrong units (a stage ordering mistake)."""
        if self.units != units:
            raise ConfigurationError(f"calibration stage '{stage}' needs data in {units}, "
                                     f"got {self.units} (stages: {', '.join(self.applied)})")


def _merged_header(primary, image_header):
    skip = {"SIMPLE", "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "PCOUNT",
            "GCOUNT", "CHECKSUM", "DATASUM", "NEXTEND", "INHERIT", "BZERO", "BSCALE"}
    merged = fits.Header([c for c in primary.cards if c.keyword not in skip])
    merged.extend([c for c in image_header.cards if c.keyword not in skip], update=True)
    return merged


def read_raw(path, exposure_tolerance=0.01):
    """Read a raw SPOC frame (``*_ffir.fits[.gz]``: empty primary + raw image extension).

    Raises
    ------
    InputError
        Not a readable FITS file, no 2-D image, an already calibrated frame, a cutout (the
        collateral pixels are needed), missing CAMERA/CCD/NREADOUT/INT_TIME or geometry keywords,
        or an EXPOSURE that disagrees with NREADOUT x INT_TIME (the frame's exposure class would
        be ambiguous).
    """
    path = Path(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            index = next((i for i, h in enumerate(hdul)
                          if h.header.get("NAXIS", 0) == 2), None)
            if index is None:
                raise InputError(f"{path}: not a raw FFI (no 2-D image)")
            header = _merged_header(hdul[0].header, hdul[index].header)
            data = np.array(hdul[index].data, dtype=np.float64)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except InputError:
        raise
    except Exception as exc:  # astropy raises many types for damaged files
        raise InputError(f"{path}: not a readable FITS file ({exc})") from None
    kind = str(header.get("IMAGTYPE", "raw")).strip().lower()
    if kind != "raw":
        raise InputError(f"{path}: IMAGTYPE is {kind!r}, not a raw frame (already calibrated?)")
    if float(header.get("CRVAL1P", 1)) != 1 or float(header.get("CRVAL2P", 1)) != 1:
        raise InputError(f"{path}: a cutout; calibration needs full raw frames with their "
                         "collateral pixels")
    for key in ("CAMERA", "CCD", "INT_TIME"):
        if header.get(key) is None:
            raise InputError(f"{path}: raw frame header has no {key}")
    camera, ccd = int(header["CAMERA"]), int(header["CCD"])
    if camera not in (1, 2, 3, 4) or ccd not in (1, 2, 3, 4):
        raise InputError(f"{path}: unknown camera/CCD {camera}/{ccd} (TESS has cameras and "
                         "CCDs 1-4)")
    if header.get("NREADOUT") is not None:
        n_readouts = int(header["NREADOUT"])
    elif header.get("NUM_FRM") is not None:
        # on-board cosmic-ray mitigation drops 2 of every 10 readouts
        n_readouts = int(round(int(header["NUM_FRM"]) * (0.8 if header.get("CRMITEN", True) else 1)))
    else:
        raise InputError(f"{path}: raw frame header has neither NREADOUT nor NUM_FRM")
    int_time = float(header["INT_TIME"])
    if n_readouts <= 0 or not int_time > 0:
        raise InputError(f"{path}: NREADOUT {n_readouts} / INT_TIME {int_time} must be positive")
    if header.get("EXPOSURE") is not None:
        exposure = float(header["EXPOSURE"]) * 86400.0
        expected = n_readouts * int_time
        if abs(exposure - expected) > exposure_tolerance * expected:
            raise InputError(f"{path}: EXPOSURE {exposure:.1f} s disagrees with NREADOUT x "
                             f"INT_TIME = {expected:.1f} s")
    geometry = CCDGeometry.from_header(header, data.shape, source=str(path))
    return RawFrame(path=path, data=data, header=header, geometry=geometry, camera=camera,
                    ccd=ccd, n_readouts=n_readouts, int_time=int_time)


# --------------------------------------------------------------------------------------------
# Calibration models


@dataclass
class CCDModel:
    """Calibration model of one camera/CCD for one exposure class (see the module docstring)."""

    path: Path
    camera: int
    ccd: int
    n_readouts: int
    int_time: float
    cadence: float
    bias2d: np.ndarray
    flat: np.ndarray
    gain: dict
    read_noise: dict
    lincoef: dict

    def check(self, frame):
        """Refuse a model that does not fit the frame (image size, exposure class).

        Raises
        ------
        InputError
        """
        for label, image in (("BIAS2D", self.bias2d), ("FLAT", self.flat)):
            if image.shape != frame.data.shape:
                raise InputError(f"{self.path}: {label} is {image.shape[0]}x{image.shape[1]} "
                                 f"but raw frame {frame.path.name} is "
                                 f"{frame.data.shape[0]}x{frame.data.shape[1]}")
        if self.n_readouts != frame.n_readouts:
            raise InputError(
                f"{self.path}: model is for {self.n_readouts} co-added readouts "
                f"({self.cadence:g} s cadence) but {frame.path.name} has {frame.n_readouts}")


def write_model(path, *, camera, ccd, n_readouts, int_time, bias2d, flat, gain, read_noise,
                lincoef, cadence=None):
    """Write a calibration model file (format in the module docstring), atomically.

    ``gain``, ``read_noise`` and ``lincoef`` map an output letter to its value (``lincoef``:
    polynomial coefficients, lowest order first).
    """
    path = Path(path)
    primary = fits.PrimaryHDU()
    h = primary.header
    h["CAMERA"] = (int(camera), "camera the model applies to")
    h["CCD"] = (int(ccd), "CCD the model applies to")
    h["NREADOUT"] = (int(n_readouts), "co-added readouts per cadence (exposure class)")
    h["INT_TIME"] = (float(int_time), "[s] photon accumulation time per readout")
    if cadence is None:
        cadence = n_readouts / 0.8 * (int_time + 0.02)
    h["CADENCE"] = (float(cadence), "[s] cadence (informative)")
    h["MODELFMT"] = (1, "photometry calibration model format version")
    ncoef = max(len(np.atleast_1d(lincoef[o])) for o in OUTPUTS)
    coefs = np.zeros((len(OUTPUTS), ncoef))
    for i, o in enumerate(OUTPUTS):
        c = np.atleast_1d(np.asarray(lincoef[o], dtype=float))
        coefs[i, :len(c)] = c
    table = fits.BinTableHDU.from_columns([
        fits.Column(name="OUTPUT", format="1A", array=np.array(OUTPUTS)),
        fits.Column(name="GAIN", format="D", unit="electron/adu",
                    array=[float(gain[o]) for o in OUTPUTS]),
        fits.Column(name="READNOISE", format="D", unit="electron",
                    array=[float(read_noise[o]) for o in OUTPUTS]),
        fits.Column(name="LINCOEF", format=f"{ncoef}D", array=coefs),
    ], name="GAIN_LINEARITY")
    hdul = fits.HDUList([primary,
                         fits.ImageHDU(np.asarray(bias2d, dtype=np.float32), name="BIAS2D"),
                         fits.ImageHDU(np.asarray(flat, dtype=np.float32), name="FLAT"),
                         table])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    hdul.writeto(tmp, overwrite=True)
    os.replace(tmp, path)
    return path


class CalibrationModels:
    """The model files of a folder, indexed by (camera, CCD, co-added readouts).

    Only the primary headers are read at construction; images are loaded on first use and
    kept (one model per CCD and exposure class is about 35 MB).

    Raises
    ------
    InputError
        The folder does not exist, holds no model file, or a file lacks CAMERA/CCD/NREADOUT.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise InputError(f"{self.directory}: calibration model folder not found")
        self._index = {}
        self._loaded = {}
        files = sorted(p for p in self.directory.iterdir()
                       if p.name.endswith((".fits", ".fits.gz")))
        if not files:
            raise InputError(f"{self.directory}: no calibration model files (*.fits)")
        for path in files:
            try:
                header = fits.getheader(path, 0)
            except Exception as exc:  # noqa: BLE001 - any damage is an input problem
                raise InputError(f"{path}: not a readable calibration model ({exc})") from None
            for key in ("CAMERA", "CCD", "NREADOUT"):
                if header.get(key) is None:
                    raise InputError(f"{path}: calibration model header has no {key}")
            key = (int(header["CAMERA"]), int(header["CCD"]), int(header["NREADOUT"]))
            if key in self._index:
                raise InputError(f"{path}: duplicate calibration model for camera {key[0]} "
                                 f"CCD {key[1]} with {key[2]} readouts "
                                 f"(also {self._index[key].name})")
            self._index[key] = path

    def available(self):
        """``"camC/ccdD (N readouts)"`` for each model, for error messages."""
        return ", ".join(f"cam{c}/ccd{d} ({n} readouts)" for c, d, n in sorted(self._index))

    def for_frame(self, frame):
        """The model of ``frame``'s camera, CCD and exposure class, checked against it.

        Raises
        ------
        InputError
            No model for that camera/CCD, none for its number of co-added readouts (TICA's rule:
            a 30-minute model is never applied to 10-minute data), or a wrong image size.
        """
        same_ccd = {k: p for k, p in self._index.items() if k[:2] == (frame.camera, frame.ccd)}
        if not same_ccd:
            raise InputError(f"{frame.path}: no calibration model for camera {frame.camera} "
                             f"CCD {frame.ccd} in {self.directory} (have: {self.available()})")
        key = (frame.camera, frame.ccd, frame.n_readouts)
        if key not in same_ccd:
            have = ", ".join(f"{same_ccd[k].name} ({k[2]} readouts)" for k in sorted(same_ccd))
            raise InputError(
                f"{frame.path}: {frame.n_readouts} co-added readouts ({frame.exposure:g} s "
                f"exposure) but the models of camera {frame.camera} CCD {frame.ccd} are for "
                f"another exposure class: {have}")
        model = self._load(key)
        model.check(frame)
        return model

    def _load(self, key):
        if key in self._loaded:
            return self._loaded[key]
        path = self._index[key]
        try:
            with fits.open(path, memmap=False) as hdul:
                primary = hdul[0].header
                names = [h.name for h in hdul]
                for name in ("BIAS2D", "FLAT", "GAIN_LINEARITY"):
                    if name not in names:
                        raise InputError(f"{path}: calibration model has no {name} HDU")
                bias2d = np.asarray(hdul["BIAS2D"].data, dtype=np.float64)
                flat = np.asarray(hdul["FLAT"].data, dtype=np.float64)
                table = hdul["GAIN_LINEARITY"].data
                rows = {str(r).strip(): i for i, r in enumerate(table["OUTPUT"])}
                missing = [o for o in OUTPUTS if o not in rows]
                if missing:
                    raise InputError(f"{path}: GAIN_LINEARITY has no row for output(s) "
                                     f"{', '.join(missing)}")
                gain = {o: float(table["GAIN"][rows[o]]) for o in OUTPUTS}
                noise = {o: float(table["READNOISE"][rows[o]]) for o in OUTPUTS}
                lincoef = {o: np.atleast_1d(np.asarray(table["LINCOEF"][rows[o]], dtype=float))
                           for o in OUTPUTS}
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{path}: not a readable calibration model ({exc})") from None
        if bias2d.ndim != 2 or flat.ndim != 2:
            raise InputError(f"{path}: BIAS2D and FLAT must be 2-D images")
        if not all(g > 0 and np.isfinite(g) for g in gain.values()):
            raise InputError(f"{path}: gains must be positive ({gain})")
        if not all(r >= 0 and np.isfinite(r) for r in noise.values()):
            raise InputError(f"{path}: read noise must be non-negative ({noise})")
        if not np.all(np.isfinite(flat)) or np.any(flat <= 0):
            raise InputError(f"{path}: FLAT has non-positive or non-finite values")
        model = CCDModel(path=path, camera=key[0], ccd=key[1], n_readouts=key[2],
                         int_time=float(primary.get("INT_TIME", 1.98)),
                         cadence=float(primary.get("CADENCE", np.nan)), bias2d=bias2d,
                         flat=flat, gain=gain, read_noise=noise, lincoef=lincoef)
        if len(self._loaded) >= 4:  # keep memory bounded when many CCDs share a folder
            self._loaded.pop(next(iter(self._loaded)))
        self._loaded[key] = model
        return model


# --------------------------------------------------------------------------------------------
# Running the stages


@functools.lru_cache(maxsize=None)
def median_variance_factor(n):
    """Variance of the median of ``n`` Gaussian values, in units of sigma^2 / n.

    pi/2 only for large ``n``; the smear estimate uses about 7 rows, where the factor is
    smaller, so it is computed once (seeded Monte Carlo, 0.5 % precision).
    """
    if n <= 2:
        return 1.0
    rng = np.random.default_rng(12345)
    samples = np.median(rng.standard_normal((200000, n)), axis=1)
    return float(np.var(samples) * n)


def load_stages(settings, pm=None):
    """Instances of the calibration stages named in ``settings['calibration']['stages']``,
    sorted by their ``order``.

    Raises
    ------
    ConfigurationError
        An unknown stage name (listing the known ones).
    """
    from photometry.hooks.plugins import default_plugin_manager, registry

    pm = pm or default_plugin_manager()
    classes = registry(pm, "register_calibration_stages")
    names = list(settings["calibration"]["stages"])
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise ConfigurationError(f"unknown calibration stage(s) {', '.join(unknown)} "
                                 f"(known: {', '.join(sorted(classes)) or 'none'})")
    stages = [classes[n](settings) for n in names]
    return sorted(stages, key=lambda s: s.order)


def calibrate_raw(frame, model, stages):
    """Run ``stages`` (already ordered) on ``frame`` in memory; no I/O.

    Raises
    ------
    ConfigurationError
        If the stages did not bring the frame to electrons with a variance image (the gain
        stage is missing).
    """
    for stage in stages:
        frame = stage.apply(frame, model)
        frame.applied.append(stage.name)
    if frame.units != "electrons" or frame.variance is None:
        raise ConfigurationError("calibration stages "
                                 f"({', '.join(frame.applied) or 'none'}) did not convert the "
                                 "frame to electrons with an uncertainty (no gain stage?)")
    return frame


def _to_ffi_frame(frame, stages):
    """The calibrated science region as an FFIFrame, headers parsed by the FFI reader."""
    from photometry.data.ffi import read_ffi

    ffi = read_ffi(frame.path, header_only=True, wcs=True)
    rows, cols = frame.geometry.science
    if (ffi.row_offset, ffi.column_offset) != (rows.start, cols.start) or \
            ffi.shape != (rows.stop - rows.start, cols.stop - cols.start):
        raise InputError(f"{frame.path}: science region of the header disagrees with the CCD "
                         "geometry keywords")
    scale = 1.0 / frame.exposure
    ffi.image = (frame.data[rows, cols] * scale).astype(np.float32)
    ffi.uncert = (np.sqrt(np.maximum(frame.variance[rows, cols], 0.0)) * scale).astype(np.float32)
    h = ffi.header
    h["IMAGTYPE"] = ("cal", "FFI image type: raw, cal, uncert")
    h["BUNIT"] = ("electrons/s", "physical units of image data")
    h["CALEXPO"] = (frame.exposure, "[s] exposure the e- were divided by")
    h["CALSTAGE"] = (",".join(f"{s.name}:{s.version}" for s in stages), "calibration stages")
    for key, value in frame.diagnostics.items():
        if isinstance(value, dict):
            for o, v in value.items():
                kw = f"{key[:6].upper()}{o}"
                h[kw] = (float(v), f"calibration {key}, output {o}")
        elif np.isscalar(value):
            h[key[:8].upper()] = (float(value), f"calibration {key}")
    return ffi


def calibrate_file(path, models, settings=None, stages=None):
    """Calibrate one raw FFI into a :class:`photometry.data.ffi.FFIFrame` (e-/s, science region).

    Parameters
    ----------
    path : str or Path
        A raw ``*_ffir.fits[.gz]`` full frame.
    models : CalibrationModels or str or Path
        The models, or the folder holding them.
    settings : dict, optional
        Full settings (default: the defaults); ``[calibration]`` is used.
    stages : list, optional
        Stage instances from :func:`load_stages` (built from ``settings`` when omitted).

    Raises
    ------
    InputError
        Bad raw file, or missing/mismatched models (see :meth:`CalibrationModels.for_frame`).
    """
    if settings is None:
        from photometry.hooks.settings import load_settings
        settings = load_settings()
    if not isinstance(models, CalibrationModels):
        models = CalibrationModels(models)
    if stages is None:
        stages = load_stages(settings)
    cfg = settings["calibration"]
    frame = read_raw(path, exposure_tolerance=cfg["exposure_tolerance"])
    model = models.for_frame(frame)
    frame = calibrate_raw(frame, model, stages)
    return _to_ffi_frame(frame, stages)


def calibrate_frames(paths, models_dir, settings, progress=False):
    """Calibrate raw FFIs one at a time, yielding :class:`photometry.data.ffi.FFIFrame` in order.

    One frame is in memory at a time (about 70 MB of float64 for a full frame), so a whole
    sector streams. Models are loaded once per camera/CCD and exposure class.

    Raises
    ------
    InputError
        From the first bad file or model problem, naming it.
    """
    from tqdm import tqdm

    models = models_dir if isinstance(models_dir, CalibrationModels) else \
        CalibrationModels(models_dir)
    stages = load_stages(settings)
    paths = list(paths)
    for path in tqdm(paths, desc="calibrate", unit="frame", disable=not progress or None):
        yield calibrate_file(path, models, settings=settings, stages=stages)
