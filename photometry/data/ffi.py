"""Reader of SPOC full-frame images (FFIs) and of whole folders of them.

A SPOC calibrated FFI (``*_ffic.fits``) holds an empty primary HDU, the calibrated image
(``CAMERA.CCD c.d cal``, 2078 rows x 2136 columns with collateral columns and rows) and its
uncertainty (``CAMERA.CCD c.d uncert``). Cutouts of FFIs keep the same headers; their physical
WCS (``CRVAL1P``/``CRVAL2P``, 1-based) gives the CCD position of their first pixel.

Everything downstream works on the science pixels only, so :func:`read_ffi` crops the image to
the science region given by the header (``SCCSA``..``SCCED``, ``SCIROWS``..``SCIROWE``) and
returns a sky WCS whose pixel indices are those of the cropped array. Positions on the CCD are
recovered with ``row_offset``/``column_offset`` (0-based CCD position of ``image[0, 0]``).

Decisions (also in ``docs/architecture.md``):

* ``time`` is the mid-exposure BTJD ``(TSTART + TSTOP) / 2`` of the *image* HDU (the primary
  header's TSTART/TSTOP are spacecraft TJD without the barycentric correction).
* ``cadenceno`` is ``FFIINDEX`` when present. Otherwise (SPOC sectors 1-5) it is derived from the
  spacecraft clock time ``time - BARYCORR`` (regular, unlike BTJD, which drifts by minutes over a
  sector) as ``4697 + round((t_sc - 1325.3235172) * 86400 / cadence_s)``: the anchor time is the
  first FFI of sector 1 (``tess2018206192942``), the anchor number TASOC's 4697 (not checked
  against a SPOC FFIINDEX). The numbers are therefore the same whichever subset of frames is read.
* The uncertainty HDU is mapped onto the image by its own physical WCS (``CRVAL1P/2P``) and
  shape; one without a physical WCS but with the image HDU's shape is taken as aligned with it;
  one with neither cannot be placed and is ignored (the real sector-1 cutout has a 128x128
  uncertainty covering CCD columns 0-127, i.e. only the first 84 of its 129 science columns).
* Uncertainties are always real for a calibrated frame: where the file has none (no
  uncertainty HDU, as in TICA frames and many third-party cutouts; pixels the HDU does not
  cover; NaN values) they are estimated from the pixel values with
  :class:`photometry.data.noise.CCDNoise` (the header's read noise per output, readouts and
  exposure, documented defaults for what it lacks). ``uncert_estimated`` is the fraction of
  finite image pixels so estimated and ``noise_defaulted`` the keywords that took a default;
  the cache records both (docs/architecture.md). Raw frames get NaN (calibration computes
  their uncertainty).
* Uncompressed files in the usual layout are read without astropy's HDU list (headers block
  by block, only the science rows of the pixels; :func:`_plain_layout`), which makes
  ``read_ffi`` 1.3x instead of 2x the bare astropy read; everything else, and every damaged
  file, goes through astropy, and both paths give bit-identical frames.
"""
import dataclasses
import gzip
import io
import math
import os
import re
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from photometry.hooks.errors import InputError

__all__ = ["FFIFrame", "read_ffi", "estimate_missing_uncert", "wcs_header", "find_ffi_files", "scan_ffi_headers",
           "is_raw_ffi", "cadence_for_sector", "derive_cadenceno", "SCIENCE_ROWS",
           "SCIENCE_COLUMNS", "SCAN_KEYWORDS"]

#: 0-based half-open science region of a full SPOC frame, used when the header lacks the keys.
SCIENCE_ROWS = (0, 2048)
SCIENCE_COLUMNS = (44, 2092)

#: Anchor of the derived cadence numbers (see the module docstring).
CADENCE_ANCHOR = 4697
CADENCE_ANCHOR_TJD = 1325.3235172

_FLUX_UNITS = {"electrons/s", "electron/s", "e-/s", "e/s", "electrons/second"}
_CALIBRATED = re.compile(r"_ffic\.fits(\.gz)?$")
_RAW = re.compile(r"_ffir\.fits(\.gz)?$")
_SECTOR_IN_NAME = re.compile(r"-s(\d{4})-")
_STRUCTURAL = {"SIMPLE", "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND",
               "PCOUNT", "GCOUNT", "CHECKSUM", "DATASUM", "NEXTEND", "INHERIT", "BZERO",
               "BSCALE"}


@dataclass
class FFIFrame:
    """One FFI in memory: science pixels, their uncertainty, WCS and timing.

    ``image`` and ``uncert`` are ``None`` when read with ``header_only=True``, and ``wcs`` is
    ``None`` when WCS construction was skipped (:func:`scan_ffi_headers`).
    """

    path: Path
    image: np.ndarray | None
    uncert: np.ndarray | None
    header: fits.Header
    wcs: WCS | None
    row_offset: int
    column_offset: int
    sector: int
    camera: int
    ccd: int
    cadence_s: float
    time: float
    tstart: float
    tstop: float
    timecorr: float
    cadenceno: int
    quality: int
    data_rel: int
    procver: str
    uncert_estimated: float = 0.0
    noise_defaulted: tuple = ()
    science_shape: tuple | None = None

    @property
    def shape(self):
        """(rows, columns) of the science region, known even for a header-only read."""
        if self.science_shape is not None:
            return self.science_shape
        return (int(self.header["PHOT_NR"]), int(self.header["PHOT_NC"]))


def is_raw_ffi(path):
    """True for a raw (uncalibrated, ``*_ffir``) SPOC frame, judged by its file name."""
    return bool(_RAW.search(Path(path).name))


def cadence_for_sector(sector):
    """FFI cadence in seconds of a TESS sector: 1800 (1-26), 600 (27-55), 200 (56 on)."""
    if sector <= 26:
        return 1800.0
    if sector <= 55:
        return 600.0
    return 200.0


def derive_cadenceno(time_sc, cadence_s):
    """Cadence number of a frame without FFIINDEX, from its spacecraft-clock mid time (TJD)."""
    return int(CADENCE_ANCHOR + round((time_sc - CADENCE_ANCHOR_TJD) * 86400.0 / cadence_s))


def find_ffi_files(directory, raw=False):
    """FFI files under ``directory`` (recursively), sorted by name.

    Parameters
    ----------
    directory : str or Path
    raw : bool
        ``False``: calibrated ``*_ffic.fits[.gz]``; ``True``: raw ``*_ffir.fits[.gz]`` (they need
        the calibration stage, so a caller asks for them explicitly).

    Raises
    ------
    InputError
        If the folder does not exist or holds no FFI of the requested kind (the message says
        when files of the other kind are there, which is the usual mistake).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: FFI folder not found")
    wanted, other = (_RAW, _CALIBRATED) if raw else (_CALIBRATED, _RAW)
    found, n_other = [], 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if wanted.search(name):
                found.append(Path(root) / name)
            elif other.search(name):
                n_other += 1
    if not found:
        kind = "raw *_ffir.fits[.gz]" if raw else "calibrated *_ffic.fits[.gz]"
        other_kind = "calibrated" if raw else "raw"
        hint = f" ({n_other} {other_kind} FFI files are there)" if n_other else ""
        raise InputError(f"{directory}: no {kind} FFI files found{hint}")
    return sorted(found, key=lambda p: (p.name, str(p)))


def _sector_from(primary, path):
    if "SECTOR" in primary:
        return int(primary["SECTOR"])
    match = _SECTOR_IN_NAME.search(Path(path).name)
    if match:
        return int(match.group(1))
    raise InputError(f"{path}: no SECTOR keyword and no -sNNNN- sector in the file name")


def _classify_hdus(headers):
    """Indices of the image and uncertainty HDUs among the extension ``headers`` (index 1
    on); either may be None."""
    image = uncert = None
    for index, header in enumerate(headers, start=1):
        if header.get("NAXIS", 0) != 2:
            continue
        kind = str(header.get("IMAGTYPE", "")).strip().lower()
        extname = str(header.get("EXTNAME", "")).strip().lower()
        if kind == "uncert" or extname.endswith("uncert"):
            if uncert is None:
                uncert = index
        elif image is None:
            image = index
    return image, uncert


def _find_hdus(hdul, path):
    """Indices of the image and uncertainty HDUs (the latter may be None)."""
    image, uncert = _classify_hdus(hdul[index].header for index in range(1, len(hdul)))
    if image is None:
        raise InputError(f"{path}: not a TESS FFI (no image extension)")
    return image, uncert


#: The header keywords a folder scan needs (:func:`_fast_headers` and :func:`_describe`
#: without the WCS): :func:`scan_ffi_headers` parses only these cards of each file.
#: ``tests/test_ffi.py`` checks that a scan with them gives the frames a full parse gives.
SCAN_KEYWORDS = frozenset(
    ["SIMPLE", "NAXIS", "NAXIS1", "NAXIS2", "IMAGTYPE", "TELESCOP", "CAMERA", "CCD",
     "SECTOR", "TSTART", "TSTOP", "BARYCORR", "TIMEDEL", "FFIINDEX", "DQUALITY", "DATA_REL",
     "PROCVER", "BUNIT", "CRPIX1", "CRPIX2", "CRVAL1P", "CRVAL2P", "CRPIX1P", "CRPIX2P",
     "CDELT1P", "CDELT2P", "SCIROWS", "SCIROWE"]
    + [f"SCC{e}{o}" for e in "SE" for o in "ABCD"])


def _select_cards(text, keywords):
    """The cards of header ``text`` whose keyword is in ``keywords`` (each with the CONTINUE
    cards of a long string value that follow it), up to END."""
    cards, keep = [], False
    for i in range(0, len(text), 80):
        keyword = text[i:i + 8].rstrip()
        if keyword == "END":
            break
        keep = keyword in keywords or (keep and keyword == "CONTINUE")
        if keep:
            cards.append(text[i:i + 80])
    return "".join(cards)


def _read_raw_header(stream, keywords=None):
    """The next FITS header of ``stream`` from its 2880-byte blocks, and the blocks it took;
    None when the stream ends first or no END card comes within 100 blocks.

    ``keywords``: parse only the cards of these keywords (astropy's card parsing consults its
    configuration for every value; the two headers of a SPOC FFI have ~150-190 cards, a
    scan needs ~36).
    """
    blocks = []
    while True:
        block = stream.read(2880)
        if len(block) < 2880:
            return None
        blocks.append(block)
        if any(block[i:i + 8] == b"END     " for i in range(0, 2880, 80)):
            text = b"".join(blocks).decode("ascii")
            if keywords is not None:
                text = _select_cards(text, keywords)
            return fits.Header.fromstring(text), len(blocks)
        if len(blocks) > 100:
            return None


def _fast_headers(path, gzipped, keywords=None):
    """Primary and first-extension headers read as raw 2880-byte blocks, or None (only the
    cards of ``keywords`` when given).

    Why: astropy, even with lazy loading, skips a compressed file's first data block by
    decompressing it (0.2 s for a full .gz frame), which would make a scan of a sector's 20 000
    headers take an hour. Any surprise (no extension, data in the primary HDU, damage) returns
    None, and the caller falls back to astropy, which then reports the problem.
    """
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rb") as stream:
            headers = []
            for _ in range(2):
                read = _read_raw_header(stream, keywords)
                if read is None:
                    return None
                headers.append(read[0])
                if len(headers) == 1 and (headers[0].get("NAXIS", 0) != 0
                                          or headers[0].get("SIMPLE") is not True):
                    return None
    except (OSError, EOFError, ValueError, UnicodeDecodeError, zlib.error, gzip.BadGzipFile):
        return None
    primary, image_header = headers
    if (image_header.get("NAXIS", 0) != 2
            or str(image_header.get("IMAGTYPE", "")).strip().lower() == "uncert"):
        return None
    return primary, image_header


def _first_image_hdu(hdul, path):
    """The image HDU when it is the first extension (SPOC order), without reading further."""
    try:
        header = hdul[1].header
    except IndexError:
        raise InputError(f"{path}: not a TESS FFI (no image extension)") from None
    except (OSError, TypeError, ValueError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: truncated or damaged FITS file ({exc})") from None
    kind = str(header.get("IMAGTYPE", "")).strip().lower()
    if header.get("NAXIS", 0) == 2 and kind != "uncert":
        return 1, None
    return _find_hdus(hdul, path)


def _merge_headers(primary, image_header):
    """Primary keywords overridden by the image HDU's (built in one go: ``extend`` is O(n^2))."""
    own = set(image_header.keys())
    keep = {"COMMENT", "HISTORY", ""}
    cards = [card for card in primary.cards if card.keyword not in _STRUCTURAL
             and (card.keyword not in own or card.keyword in keep)]
    cards += [card for card in image_header.cards if card.keyword not in _STRUCTURAL]
    return fits.Header(cards)


_WCS_KEY = re.compile(r"^(WCSAXES|CTYPE[12]|CUNIT[12]|CRVAL[12]|CRPIX[12]|CDELT[12]|CD[12]_[12]|"
                      r"PC[12]_[12]|CROTA2|[AB]P?_(ORDER|\d+_\d+|DMAX)|RADESYS|EQUINOX|LONPOLE|"
                      r"LATPOLE)$")


def wcs_header(header):
    """Only the sky-WCS keywords of ``header`` (without the physical ``P`` WCS)."""
    return fits.Header([card for card in header.cards if _WCS_KEY.match(card.keyword)])


def _ccd_origin(header):
    """0-based CCD (row, column) of array pixel [0, 0], from the physical WCS."""
    # 1-based CCD coordinate of array pixel 1 is CRVALP + (1 - CRPIXP) * CDELTP; minus 1 -> 0-based
    col = float(header.get("CRVAL1P", 1)) + (1.0 - float(header.get("CRPIX1P", 1))) * float(
        header.get("CDELT1P", 1))
    row = float(header.get("CRVAL2P", 1)) + (1.0 - float(header.get("CRPIX2P", 1))) * float(
        header.get("CDELT2P", 1))
    return int(round(row - 1.0)), int(round(col - 1.0))


def _uncert_origin(uncert_header, image_shape, image_origin):
    """0-based CCD (row, column) of the uncertainty array's [0, 0], or None if unplaceable.

    Placed by its own physical WCS; without one, taken as aligned with the image HDU (whole
    array shape ``image_shape``, [0, 0] at CCD ``image_origin``) when the shapes agree
    (TICA-like and hand-made files); otherwise None (ignored, then estimated).
    """
    if "CRVAL1P" in uncert_header and "CRVAL2P" in uncert_header:
        return _ccd_origin(uncert_header)
    shape = (int(uncert_header["NAXIS2"]), int(uncert_header["NAXIS1"]))
    if shape == tuple(image_shape):
        return tuple(image_origin)
    return None


def _uncert_overlap(uncert_header, image_header, rows, cols, row_offset, column_offset):
    """(target, source) slice pairs of the science pixels an uncertainty HDU covers, or None.

    ``rows, cols`` are the science slices of the image array, whose [rows.start, cols.start]
    is CCD (row_offset, column_offset).
    """
    nr, nc = rows.stop - rows.start, cols.stop - cols.start
    image_shape = (int(image_header["NAXIS2"]), int(image_header["NAXIS1"]))
    origin = _uncert_origin(uncert_header, image_shape,
                            (row_offset - rows.start, column_offset - cols.start))
    if origin is None:
        return None
    u_row, u_col = origin
    u_nr, u_nc = int(uncert_header["NAXIS2"]), int(uncert_header["NAXIS1"])
    r0, r1 = max(row_offset, u_row), min(row_offset + nr, u_row + u_nr)
    c0, c1 = max(column_offset, u_col), min(column_offset + nc, u_col + u_nc)
    if r1 <= r0 or c1 <= c0:
        return None
    return ((slice(r0 - row_offset, r1 - row_offset), slice(c0 - column_offset, c1 - column_offset)),
            (slice(r0 - u_row, r1 - u_row), slice(c0 - u_col, c1 - u_col)))


def estimate_missing_uncert(frame):
    """Fill the frame's missing uncertainties (NaN where the image is finite) from the pixels.

    Uses :class:`photometry.data.noise.CCDNoise` of the frame header: photon noise of the pixel's
    own flux plus the read noise of its output. Sets ``frame.uncert_estimated`` (fraction of
    finite image pixels estimated) and ``frame.noise_defaulted``; returns the frame.
    """
    from photometry.data.noise import CCDNoise

    image, uncert = frame.image, frame.uncert
    if uncert.size and float(uncert.min()) > 0 and float(uncert.max()) < np.inf:
        return frame   # every uncertainty finite and positive (NaN fails both): two passes
    finite = np.isfinite(image)
    missing = finite & ~(np.isfinite(uncert) & (uncert > 0))
    n_missing = int(np.count_nonzero(missing))
    if not n_missing:
        return frame
    noise = CCDNoise.from_header(frame.header, frame.cadence_s)
    columns = frame.column_offset + np.arange(image.shape[1])
    if n_missing == image.size:
        uncert[...] = np.sqrt(noise.pixel_variance(image, columns[None, :]))
    else:
        rows, cols = np.nonzero(missing)
        uncert[rows, cols] = np.sqrt(noise.pixel_variance(image[rows, cols], columns[cols]))
    frame.uncert_estimated = n_missing / max(int(np.count_nonzero(finite)), 1)
    frame.noise_defaulted = tuple(noise.defaulted)
    return frame


def _science_box(header):
    """0-based half-open CCD (row0, row1, col0, col1) of the science region."""
    starts = [header.get(f"SCCS{o}") for o in "ABCD"]
    ends = [header.get(f"SCCE{o}") for o in "ABCD"]
    if all(v is not None for v in starts + ends):
        col0, col1 = int(min(starts)) - 1, int(max(ends))
    else:
        col0, col1 = SCIENCE_COLUMNS
    if header.get("SCIROWS") is not None and header.get("SCIROWE") is not None:
        row0, row1 = int(header["SCIROWS"]) - 1, int(header["SCIROWE"])
    else:
        row0, row1 = SCIENCE_ROWS
    return row0, row1, col0, col1


def _crop(header, path, science_only=True):
    """Array slices of the science part of an image HDU and the CCD offsets of its corner."""
    nrows, ncols = int(header["NAXIS2"]), int(header["NAXIS1"])
    origin_row, origin_col = _ccd_origin(header)
    if not science_only:
        return slice(0, nrows), slice(0, ncols), origin_row, origin_col
    row0, row1, col0, col1 = _science_box(header)
    r0, r1 = max(row0, origin_row), min(row1, origin_row + nrows)
    c0, c1 = max(col0, origin_col), min(col1, origin_col + ncols)
    if r1 <= r0 or c1 <= c0:
        raise InputError(f"{path}: image holds no science pixels (CCD rows {origin_row}-"
                         f"{origin_row + nrows - 1}, columns {origin_col}-"
                         f"{origin_col + ncols - 1})")
    return (slice(r0 - origin_row, r1 - origin_row), slice(c0 - origin_col, c1 - origin_col),
            r0, c0)


def _build_wcs(header, path):
    """Sky WCS of the cropped image (its CRPIX already shifted), checked to be usable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(wcs_header(header), relax=True)
        wcs.pixel_shape = (int(header["PHOT_NC"]), int(header["PHOT_NR"]))
        if not wcs.has_celestial or wcs.naxis != 2:
            raise ValueError("no celestial WCS")
        cd = [header.get(f"CD{i}_{j}") for i in (1, 2) for j in (1, 2)]
        if all(v is not None for v in cd) and float(np.linalg.det(
                np.reshape(np.asarray(cd, dtype=float), (2, 2)))) == 0.0:
            raise ValueError("singular CD matrix")  # wcslib would silently ignore it
        matrix = wcs.pixel_scale_matrix
        det = np.linalg.det(matrix)
        if not np.all(np.isfinite(matrix)) or not math.isfinite(det) or abs(det) < 1e-14:
            raise ValueError("singular or non-finite CD matrix")
        if not 1e-6 < math.sqrt(abs(det)) < 0.1:
            raise ValueError(f"implausible pixel scale {math.sqrt(abs(det)) * 3600:.3g} arcsec")
        ny, nx = int(header["PHOT_NR"]), int(header["PHOT_NC"])
        x = np.array([0.0, nx - 1.0, 0.0, nx - 1.0, (nx - 1) / 2])
        y = np.array([0.0, 0.0, ny - 1.0, ny - 1.0, (ny - 1) / 2])
        ra, dec = wcs.all_pix2world(x, y, 0)
        if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
            raise ValueError("pixels map to non-finite sky positions")
        xx, yy = wcs.all_world2pix(ra, dec, 0, tolerance=1e-6, maxiter=50)
        if np.max(np.hypot(xx - x, yy - y)) > 0.01:
            raise ValueError("pixel -> sky -> pixel round trip fails")
    except InputError:
        raise
    except Exception as exc:  # astropy/wcslib raise many types for malformed keywords
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"{path}: broken WCS ({message})") from None
    return wcs


def _open(path, whole_gzip=False):
    """Open lazily; a .gz file read in full is decompressed once into memory.

    Why: astropy reads a compressed file as a stream, so reaching the image data after the
    uncertainty header (or both images one after the other) restarts the decompression; one
    pass into memory halves the time of a full read.
    """
    source = path
    if whole_gzip:
        try:
            with gzip.open(path, "rb") as stream:
                source = io.BytesIO(stream.read())
        except FileNotFoundError:
            raise InputError(f"{path}: file not found") from None
        except (EOFError, zlib.error) as exc:
            raise InputError(f"{path}: truncated or damaged gzip file ({exc})") from None
        except (OSError, gzip.BadGzipFile) as exc:
            raise InputError(f"{path}: not a gzip-compressed FITS file ({exc})") from None
    try:
        return fits.open(source, memmap=not whole_gzip, lazy_load_hdus=True, checksum=False,
                         do_not_scale_image_data=False)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, TypeError, ValueError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(f"{path}: not a FITS file ({exc})") from None


def _check_size(hdu, path, gzipped):
    """A truncated uncompressed file: the data run past the end of the file."""
    if gzipped:
        return
    info = hdu.fileinfo()
    header = hdu.header
    nbytes = abs(int(header["BITPIX"])) // 8 * int(header["NAXIS1"]) * int(header["NAXIS2"])
    size = os.path.getsize(path)
    if info["datLoc"] + nbytes > size:
        raise InputError(f"{path}: truncated file ({size} bytes, the headers need "
                         f"{info['datLoc'] + nbytes})")


def _read_array(hdu, path, rows, cols):
    """Native float32 copy of a slice of an HDU's data, raising InputError on damage."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            data = hdu.data
        if data is None or data.ndim != 2:
            raise ValueError("no 2-D data")
        out = np.asarray(data[rows, cols], dtype=np.float32)
    except (OSError, TypeError, ValueError, EOFError, zlib.error, UserWarning,
            IndexError) as exc:
        raise InputError(f"{path}: truncated or unreadable image data ({exc})") from None
    if out.base is not None or not out.flags.owndata:
        out = out.copy()
    return out


def read_ffi(path, header_only=False, wcs=True, science_only=True, out=None, *,
             keywords=None):
    """Read one SPOC FFI (or cutout of one), cropped to its science region.

    Parameters
    ----------
    path : str or Path
        ``*.fits`` or ``*.fits.gz``.
    header_only : bool
        Skip the pixel data (``image``/``uncert`` are ``None``): what a folder scan needs.
    wcs : bool
        Build and validate the sky WCS (about 6 ms); scans of many headers skip it.
    science_only : bool
        ``False`` keeps the whole array with its collateral pixels (what the calibration of
        raw frames needs); ``row_offset``/``column_offset``, the WCS and the header then refer
        to that whole array.
    out : (ndarray, ndarray), optional
        Native float32 arrays of the science shape to read the image and the uncertainty
        into (prepare passes its block buffers: no copy per frame); ignored when the file's
        shape differs.
    keywords : set of str, optional
        With ``header_only``: parse only the header cards of these keywords (e.g.
        :data:`SCAN_KEYWORDS`, what a folder scan needs); ``FFIFrame.header`` then holds
        only those. Files the fast header reader cannot take get the full parse.

    Returns
    -------
    FFIFrame

    Raises
    ------
    InputError
        Not a FITS file, a truncated file, not a TESS FFI, or a broken WCS; the message names
        the file.
    """
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            frame = _read_ffi(path, header_only, wcs, science_only, out, keywords)
            error = None
        except InputError as exc:
            frame, error = None, exc
    # astropy only warns when the data are shorter than the header says
    truncated = [w for w in caught if "truncated" in str(w.message)]
    if truncated:
        raise InputError(f"{path}: truncated file ({str(truncated[0].message).splitlines()[0]})")
    if error is not None:
        raise error
    for w in caught:  # pass on what the caller should see; the FITS fix-ups are noise
        if not issubclass(w.category, FITSFixedWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if frame.image is not None and not _is_raw_frame(frame):
        estimate_missing_uncert(frame)
    return frame


def _is_raw_frame(frame):
    """A raw (uncalibrated) frame: by file name or IMAGTYPE."""
    return is_raw_ffi(frame.path) or str(frame.header.get("IMAGTYPE", "")).strip().lower() == "raw"


def _describe(path, primary, image_header, wcs, science_only=True):
    """Validated metadata of one FFI from its primary and image headers."""
    telescope = str(image_header.get("TELESCOP", primary.get("TELESCOP", ""))).strip()
    if telescope != "TESS":
        raise InputError(f"{path}: not a TESS FFI (TELESCOP is {telescope!r})")
    for key in ("CAMERA", "CCD"):
        if key not in image_header and key not in primary:
            raise InputError(f"{path}: not a TESS FFI (no {key} keyword)")
    for key in ("TSTART", "TSTOP"):
        if key not in image_header:
            raise InputError(f"{path}: image header has no {key}")
    kind = str(image_header.get("IMAGTYPE", "")).strip().lower()
    unit = str(image_header.get("BUNIT", "electrons/s")).strip().lower().replace(" ", "")
    if kind != "raw" and not is_raw_ffi(path) and unit not in _FLUX_UNITS:
        raise InputError(f"{path}: image unit (BUNIT) is {image_header['BUNIT']!r}, "
                         "expected electrons/s for a calibrated FFI")
    rows, cols, row_offset, column_offset = _crop(image_header, path, science_only)

    header = _merge_headers(primary, image_header)
    nr, nc = rows.stop - rows.start, cols.stop - cols.start
    # The merged header describes the cropped array: shift the sky and physical WCS.
    if "CRPIX1" in header:
        header["CRPIX1"] = float(header["CRPIX1"]) - cols.start
    if "CRPIX2" in header:
        header["CRPIX2"] = float(header["CRPIX2"]) - rows.start
    header["CRPIX1P"], header["CRVAL1P"], header["CDELT1P"] = 1, column_offset + 1, 1.0
    header["CRPIX2P"], header["CRVAL2P"], header["CDELT2P"] = 1, row_offset + 1, 1.0
    header["PHOT_NR"] = (nr, "science rows in the cropped image")
    header["PHOT_NC"] = (nc, "science columns in the cropped image")
    header["PHOT_R0"] = (row_offset, "0-based CCD row of image[0, 0]")
    header["PHOT_C0"] = (column_offset, "0-based CCD column of image[0, 0]")

    sector = _sector_from(primary, path)
    camera = int(image_header.get("CAMERA", primary.get("CAMERA")))
    ccd = int(image_header.get("CCD", primary.get("CCD")))
    tstart, tstop = float(image_header["TSTART"]), float(image_header["TSTOP"])
    time = 0.5 * (tstart + tstop)
    timecorr = float(image_header.get("BARYCORR", 0.0))
    if image_header.get("TIMEDEL"):
        cadence_s = round(float(image_header["TIMEDEL"]) * 86400.0, 3)
    else:
        cadence_s = cadence_for_sector(sector)
    if "FFIINDEX" in header:
        cadenceno = int(header["FFIINDEX"])
    else:
        cadenceno = derive_cadenceno(time - timecorr, cadence_s)
    if not all(math.isfinite(v) for v in (tstart, tstop, timecorr)):
        raise InputError(f"{path}: non-finite TSTART/TSTOP/BARYCORR")
    sky_wcs = _build_wcs(header, path) if wcs else None
    return dict(path=path, header=header, wcs=sky_wcs, row_offset=row_offset,
                column_offset=column_offset, sector=sector, camera=camera, ccd=ccd,
                cadence_s=cadence_s, time=time, tstart=tstart, tstop=tstop, timecorr=timecorr,
                cadenceno=cadenceno, quality=int(header.get("DQUALITY", 0)),
                data_rel=int(header.get("DATA_REL", 0)),
                procver=str(header.get("PROCVER", "")).strip()), rows, cols


def _plain_layout(path):
    """Headers and data offsets of an uncompressed FITS file read block by block, or None.

    Why: astropy's HDU list costs 8-10 ms per full frame on top of the pixel read (header
    objects for every HDU, card-by-card parsing, data-size bookkeeping), a third of the whole
    read. Here every header is parsed once from its raw 2880-byte blocks and the data are
    skipped by seeking. Any surprise (no or damaged extensions, data in the primary HDU,
    scaled or non-float32 data, the data running past the end of the file, a size that is
    not whole FITS blocks, fewer extensions than NEXTEND) returns None, and the caller takes
    the astropy path, which reports the problem with its usual message.

    Returns
    -------
    list of (fits.Header, int)
        Each HDU's header and the byte offset of its data, primary first.
    """
    try:
        size = os.path.getsize(path)
        if size % 2880 or size < 2 * 2880:
            return None
        hdus = []
        with open(path, "rb", buffering=0) as stream:
            offset = 0
            while offset < size:
                read = _read_raw_header(stream)
                if read is None:
                    return None
                header, n_blocks = read
                offset += 2880 * n_blocks
                naxis = int(header.get("NAXIS", 0))
                nbytes = 0
                if naxis:
                    nbytes = abs(int(header["BITPIX"])) // 8 * int(header.get("GCOUNT", 1))
                    for i in range(1, naxis + 1):
                        nbytes *= int(header[f"NAXIS{i}"])
                    nbytes += int(header.get("PCOUNT", 0))
                if offset + nbytes > size:
                    return None
                hdus.append((header, offset))
                offset += -(-nbytes // 2880) * 2880
                stream.seek(offset)
    except Exception:  # noqa: BLE001 - any damage: the astropy path reports it
        return None
    primary = hdus[0][0]
    if primary.get("SIMPLE") is not True or int(primary.get("NAXIS", 0)) != 0:
        return None
    if len(hdus) < 2 or len(hdus) < 1 + int(primary.get("NEXTEND", 0) or 0):
        return None
    for header, _ in hdus[1:]:
        if header.get("XTENSION") not in ("IMAGE", "BINTABLE", "TABLE"):
            return None
        if header.get("XTENSION") == "IMAGE" and int(header.get("NAXIS", 0)) == 2 and (
                header.get("BITPIX") != -32 or header.get("BZERO", 0) != 0
                or header.get("BSCALE", 1) != 1):
            return None  # scaled or integer data: astropy's conversion rules apply
    return hdus


def _read_plain_array(path, offset, header, rows, cols, out=None):
    """Native float32 copy of ``[rows, cols]`` of big-endian float32 data at ``offset``.

    Only the rows needed are read, into a re-used big-endian buffer; the byte swap and the
    crop are then one copy. Why not a memory map: it was 2-4 ms faster per array alone, but
    not measurably in prepare (its page faults compete with the writer thread), and a file
    truncated while mapped kills the process with SIGBUS instead of raising an error.
    """
    ncols = int(header["NAXIS1"])
    data = _scratch((rows.stop - rows.start, ncols))
    view = memoryview(data).cast("B")
    with open(path, "rb", buffering=0) as stream:
        stream.seek(offset + rows.start * ncols * 4)
        while view.nbytes:
            got = stream.readinto(view)
            if not got:
                raise OSError("short read")
            view = view[got:]
    if out is None:
        return data[:, cols].astype(np.float32)
    np.copyto(out, data[:, cols])
    return out


_SCRATCH = threading.local()


def _scratch(shape):
    """A per-thread re-used big-endian buffer (a fresh 17 MB array costs a page fault per
    4 KiB on every frame)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < shape[0] * shape[1]:
        buf = _SCRATCH.buf = np.empty(shape[0] * shape[1], ">f4")
    return buf[:shape[0] * shape[1]].reshape(shape)


def _read_plain(path, wcs, science_only, out=None):
    """:func:`_read_ffi` for an uncompressed file in the usual layout, or None (see
    :func:`_plain_layout`); the checks and the result are those of the astropy path."""
    hdus = _plain_layout(path)
    if hdus is None:
        return None
    image, uncert = _classify_hdus(header for header, _ in hdus[1:])
    if image is None:
        return None
    meta, rows, cols = _describe(path, hdus[0][0], hdus[image][0], wcs, science_only)
    try:
        return _read_plain_pixels(path, hdus, image, uncert, meta, rows, cols, out)
    except (OSError, ValueError) as exc:  # e.g. the file shrank since its headers were read
        raise InputError(f"{path}: truncated or unreadable image data ({exc})") from None


def _read_plain_pixels(path, hdus, image, uncert, meta, rows, cols, out=None):
    """The :class:`FFIFrame` of :func:`_read_plain` once the headers are checked; the
    pixels go straight into ``out`` (byte swap and crop in one copy) when it is given."""
    image_header, image_offset = hdus[image]
    row_offset, column_offset = meta["row_offset"], meta["column_offset"]
    nr, nc = rows.stop - rows.start, cols.stop - cols.start
    out = _usable_out(out, (nr, nc))
    pixels = _read_plain_array(path, image_offset, image_header, rows, cols,
                               out=None if out is None else out[0])
    errors = None
    overlap = None
    if uncert is not None:
        uh, u_offset = hdus[uncert]
        overlap = _uncert_overlap(uh, image_header, rows, cols, row_offset, column_offset)
    if overlap is not None:
        target, source = overlap
        if (target[0].stop - target[0].start, target[1].stop - target[1].start) == (nr, nc):
            # covers it all: no NaN fill
            errors = _read_plain_array(path, u_offset, uh, *source,
                                       out=None if out is None else out[1])
        else:
            errors = np.empty((nr, nc), np.float32) if out is None else out[1]
            errors.fill(np.nan)
            _read_plain_array(path, u_offset, uh, *source, out=errors[target])
    if errors is None:
            errors = np.empty((nr, nc), np.float32) if out is None else out[1]
            errors.fill(np.nan)
    return FFIFrame(image=pixels, uncert=errors, **meta)


def _usable_out(out, shape):
    """``out`` if it is two native float32 arrays of ``shape``, else None."""
    if out is None or any(a.shape != tuple(shape) or a.dtype != np.float32
                          or not a.dtype.isnative for a in out):
        return None
    return out


def _read_ffi(path, header_only, wcs, science_only, out=None, keywords=None):
    """:func:`read_ffi` without the handling of warnings."""
    path = Path(path)
    gzipped = path.name.endswith(".gz")
    if not header_only and not gzipped:
        frame = _read_plain(path, wcs, science_only, out)
        if frame is not None:
            return frame
    if header_only:
        headers = _fast_headers(path, gzipped, keywords)
        if headers is not None:
            meta, _rows, _cols = _describe(path, *headers, wcs, science_only)
            return FFIFrame(image=None, uncert=None, **meta)
    hdul = _open(path, whole_gzip=gzipped and not header_only)
    try:
        try:
            primary = hdul[0].header
        except (OSError, TypeError, ValueError, EOFError, zlib.error, IndexError) as exc:
            raise InputError(f"{path}: not a FITS file ({exc})") from None
        if header_only:
            # Do not count the HDUs: that would read (and for .gz decompress) the whole file.
            img_index, unc_index = _first_image_hdu(hdul, path)
        else:
            try:
                n_hdus = len(hdul)
            except (OSError, TypeError, ValueError, EOFError, zlib.error, IndexError) as exc:
                raise InputError(f"{path}: truncated or damaged FITS file ({exc})") from None
            nextend = int(primary.get("NEXTEND", 0) or 0)
            if n_hdus < 2:
                hint = f"; NEXTEND is {nextend}: truncated?" if nextend else ""
                raise InputError(f"{path}: not a TESS FFI (no image extension{hint})")
            if n_hdus < 1 + nextend:
                raise InputError(f"{path}: truncated file (NEXTEND is {nextend} but only "
                                 f"{n_hdus - 1} extensions are complete)")
            img_index, unc_index = _find_hdus(hdul, path)
        img_hdu = hdul[img_index]
        image_header = img_hdu.header
        if not gzipped and os.path.getsize(path) % 2880:
            raise InputError(f"{path}: truncated file ({os.path.getsize(path)} bytes is not "
                             "a whole number of 2880-byte FITS blocks)")
        _check_size(img_hdu, path, gzipped)
        meta, rows, cols = _describe(path, primary, image_header, wcs, science_only)
        row_offset, column_offset = meta["row_offset"], meta["column_offset"]
        nr, nc = rows.stop - rows.start, cols.stop - cols.start

        image = uncert = None
        if not header_only:
            image = _read_array(img_hdu, path, rows, cols)
            uncert = np.full((nr, nc), np.nan, dtype=np.float32)
            if unc_index is not None:
                unc_hdu = hdul[unc_index]
                _check_size(unc_hdu, path, gzipped)
                overlap = _uncert_overlap(unc_hdu.header, image_header, rows, cols,
                                          row_offset, column_offset)
                if overlap is not None:
                    target, source = overlap
                    uncert[target] = _read_array(unc_hdu, path, *source)
    except InputError:
        raise
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(f"{path}: truncated or unreadable file ({exc})") from None
    finally:
        hdul.close()

    out = _usable_out(out, (nr, nc)) if image is not None else None
    if out is not None:
        np.copyto(out[0], image)
        np.copyto(out[1], uncert)
        image, uncert = out
    return FFIFrame(image=image, uncert=uncert, **meta)


def scan_ffi_headers(paths, progress=True):
    """Headers of many FFIs, sorted by mid time and checked to form one consistent series.

    Only headers are read (no pixels, no WCS), and of them only the cards of
    :data:`SCAN_KEYWORDS`, so tens of thousands of files take seconds.

    Returns
    -------
    list of FFIFrame
        Header-only frames (``image``, ``uncert``, ``wcs`` and ``header`` are ``None``), by
        increasing time.

    Raises
    ------
    InputError
        * a file cannot be read (see :func:`read_ffi`);
        * sector, camera, CCD, cadence or science-region geometry differ from the first file
          (the message names the offending file and both values);
        * after sorting by time, two frames share a time or a cadence number, or the cadence
          numbers do not increase strictly with time ("frames out of order": two copies of a
          frame, or FFIINDEX inconsistent with TSTART/TSTOP).
    """
    from tqdm import tqdm

    paths = list(paths)
    if not paths:
        raise InputError("no FFI files given")
    # the merged headers are dropped (``header`` None, the shape kept): at ~80 kB of
    # Python objects each (tracemalloc) they were 0.9 GB of a prepare at 11 800 frames
    frames = []
    for p in tqdm(paths, desc="FFI headers", unit="file", disable=not progress or None):
        frame = read_ffi(p, header_only=True, wcs=False, keywords=SCAN_KEYWORDS)
        frames.append(dataclasses.replace(frame, header=None, science_shape=frame.shape))
    first = frames[0]
    for frame in frames[1:]:
        for name, a, b in (("sector", first.sector, frame.sector),
                           ("camera", first.camera, frame.camera),
                           ("CCD", first.ccd, frame.ccd),
                           ("cadence (s)", first.cadence_s, frame.cadence_s),
                           ("science region (rows, columns)", first.shape, frame.shape),
                           ("CCD offset (row, column)", (first.row_offset, first.column_offset),
                            (frame.row_offset, frame.column_offset))):
            if a != b:
                raise InputError(f"{frame.path}: {name} is {b}, but {first.path.name} has {a}")
    frames.sort(key=lambda f: (f.time, f.cadenceno))
    for prev, frame in zip(frames, frames[1:]):
        if frame.time == prev.time or frame.cadenceno <= prev.cadenceno:
            raise InputError(f"{frame.path}: frames out of order: time {frame.time:.6f} cadence "
                             f"{frame.cadenceno} vs {prev.path.name} time {prev.time:.6f} "
                             f"cadence {prev.cadenceno}")
    return frames
