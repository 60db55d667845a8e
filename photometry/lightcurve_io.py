"""The light-curve FITS file: its path, its content, and writing it atomically.

Layout (``docs/coordinates_and_formats.md`` has the full description):

``LC_DIR/c{cadence:04d}/{first 5 digits of starid:011d}/
tess{starid:011d}-s{sector:04d}-{camera}-{ccd}-c{cadence:04d}-{method}_lc.fits``

The nesting keeps every directory small (at most 10^6 stars per 5-digit prefix, spread over
all sectors) while one star's files, all sectors and methods, sit side by side.

HDUs: PRIMARY (target, method, versions, settings hash), LIGHTCURVE (table), SUMIMAGE and
APERTURE (images with the stamp WCS). The primary header has no ``CREATOR`` keyword on
purpose: lightkurve then uses its generic reader, which takes ``FLUX``/``FLUX_ERR`` and the
time format from ``BJDREFI`` (btjd), so ``lightkurve.read(path)`` works with no arguments.
"""
import datetime
import os
from pathlib import Path

import numpy as np
from astropy.io import fits

from . import __version__, hookimpl
from .settings import settings_hash
from .utilities import BTJD_TIME_CARDS

__all__ = ["lightcurve_path", "write_lightcurve", "build_hdulist", "primary_header",
           "write_atomic", "FILE_VERSION"]

FILE_VERSION = "1.0"


def lightcurve_path(output_folder, starid, sector, camera, ccd, cadence, method):
    """Where the light curve of one target, sector and method goes (see module docstring)."""
    tic = f"{int(starid):011d}"
    name = (f"tess{tic}-s{int(sector):04d}-{int(camera)}-{int(ccd)}-c{int(cadence):04d}-"
            f"{method}_lc.fits")
    return Path(output_folder) / f"c{int(cadence):04d}" / tic[:5] / name


def write_atomic(hdulist, path):
    """Write ``hdulist`` to ``path`` through a temporary file in the same folder and a rename,
    so a reader (or a crash) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        hdulist.writeto(tmp, overwrite=True, checksum=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _card_value(value):
    if value is None:
        return None
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _stamp_wcs_header(phot):
    """Stamp WCS keywords plus the 1-based physical WCS giving the CCD pixel of [0, 0]."""
    header = fits.Header()
    wcs = phot.wcs
    if wcs is not None:
        header.extend(wcs.to_header(relax=True), update=True)
    r1, _, c1, _ = phot.stamp
    header["WCSNAMEP"] = ("PHYSICAL", "name of world coordinate system alternate P")
    header["WCSAXESP"] = (2, "number of WCS physical axes")
    header["CTYPE1P"] = ("RAWX", "physical WCS axis 1 type CCD col")
    header["CUNIT1P"] = ("PIXEL", "physical WCS axis 1 unit")
    header["CRPIX1P"] = (1, "reference CCD column")
    header["CRVAL1P"] = (int(c1) + 1, "value at reference CCD column (1-based)")
    header["CDELT1P"] = (1.0, "physical WCS axis 1 step")
    header["CTYPE2P"] = ("RAWY", "physical WCS axis 2 type CCD row")
    header["CUNIT2P"] = ("PIXEL", "physical WCS axis 2 units")
    header["CRPIX2P"] = (1, "reference CCD row")
    header["CRVAL2P"] = (int(r1) + 1, "value at reference CCD row (1-based)")
    header["CDELT2P"] = (1.0, "physical WCS axis 2 step")
    return header


def primary_header(phot, creator=None, filever=FILE_VERSION):
    """The primary header every file of one BasePhotometry object shares (light curve, TPF
    export): provenance, target and CCD, with SPOC's keywords.

    ``creator`` (CREATOR) decides how lightkurve reads the file: the TPF export gives
    "...TargetPixelExporter"; None leaves CREATOR out (the light curve, read by lightkurve's
    generic reader). ``filever`` is the FILEVER of that product.
    """
    target = phot.target
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    cards = [
        ("ORIGIN", "tessphot", "institution/software that created this file"),
        ("DATE", now, "file creation date (UTC)"),
        ("CREATOR", creator, "software that created this file"),
        ("TELESCOP", "TESS", "telescope"),
        ("INSTRUME", "TESS Photometer", "detector type"),
        ("FILTER", "TESS", "photometric bandpass"),
        ("FILEVER", filever, "file format version"),
        ("PROCVER", __version__, "photometry package version"),
        ("PHOTMET", phot.name, "photometry method"),
        ("METHVER", str(phot.version), "photometry method version"),
        ("SETHASH", settings_hash(phot.settings), "hash of the settings used"),
        ("DATASRC", phot.datasource, "data source: ffi (cache) or tpf"),
        ("DATA_REL", _card_value(getattr(phot.source, "data_rel", None)), "SPOC data release"),
        ("OBJECT", f"TIC {phot.starid}", "string version of target id"),
        ("TICID", phot.starid, "unique TESS target identifier"),
        ("SECTOR", phot.sector, "observing sector"),
        ("CAMERA", phot.camera, "camera number"),
        ("CCD", phot.ccd, "CCD chip number"),
        ("CADENCE", phot.cadence, "[s] cadence"),
        ("RADESYS", "ICRS", "reference frame of celestial coordinates"),
        ("EQUINOX", 2000.0, "equinox of celestial coordinate system"),
        ("RA_OBJ", _card_value(target.get("ra_J2000")), "[deg] right ascension (J2000)"),
        ("DEC_OBJ", _card_value(target.get("dec_J2000")), "[deg] declination (J2000)"),
        ("PMRA", _card_value(target.get("pmra")), "[mas/yr] RA proper motion"),
        ("PMDEC", _card_value(target.get("pmdec")), "[mas/yr] Dec proper motion"),
        ("TESSMAG", _card_value(target.get("tmag")), "[mag] TESS magnitude"),
        ("TEFF", _card_value(target.get("teff")), "[K] effective temperature"),
    ]
    header = fits.Header()
    for key, value, comment in cards:
        if key != "CREATOR" or value is not None:
            header[key] = (value, comment)
    # pixel uncertainties the input lacked and that were estimated from the pixels (noise
    # model): FFICache.errors_estimated (prepare), TPFSource.errors_estimated
    err_est = getattr(phot.source, "errors_estimated", None)
    if err_est is not None:
        header["ERR_EST"] = (round(float(err_est), 6), "fraction of pixel errors estimated")
    return header


def build_hdulist(phot):
    """The light-curve FITS file of a BasePhotometry object after :meth:`photometry`."""
    lc = phot.lightcurve

    primary = fits.PrimaryHDU(header=primary_header(phot))
    h = primary.header
    for key, (value, comment) in phot.additional_headers.items():
        h[key] = (_card_value(value), comment)
    add_check_cards(h, phot)

    n = len(lc)
    pos_c = np.asarray(lc["pos_centroid"], dtype=float).reshape(n, 2)
    pos_corr = np.asarray(lc["pos_corr"], dtype=float).reshape(n, 2)
    flux = np.asarray(lc["flux"], dtype=float)
    flux_err = np.asarray(lc["flux_err"], dtype=float)
    time = np.asarray(lc["time"], dtype=float)
    keep = np.isfinite(time)
    quality = phot.output_quality()
    columns = [
        fits.Column("TIME", "D", unit="BJD - 2457000, days", array=time),
        fits.Column("TIMECORR", "E", unit="d", array=np.asarray(lc["timecorr"], float)),
        fits.Column("CADENCENO", "J", array=np.asarray(lc["cadenceno"], np.int32)),
        fits.Column("FLUX_RAW", "D", unit="e-/s", array=flux),
        fits.Column("FLUX_RAW_ERR", "D", unit="e-/s", array=flux_err),
        fits.Column("FLUX_BKG", "D", unit="e-/s",
                    array=np.asarray(lc["flux_background"], dtype=float)),
        fits.Column("FLUX", "D", unit="e-/s", array=flux),
        fits.Column("FLUX_ERR", "D", unit="e-/s", array=flux_err),
        fits.Column("QUALITY", "J", array=quality.astype(np.int32)),
        fits.Column("PIXEL_QUALITY", "J", array=np.asarray(lc["quality"], np.int32)),
        fits.Column("MOM_CENTR1", "D", unit="pixel", array=pos_c[:, 0] + 1.0),
        fits.Column("MOM_CENTR2", "D", unit="pixel", array=pos_c[:, 1] + 1.0),
        fits.Column("POS_CORR1", "D", unit="pixel", array=pos_corr[:, 0]),
        fits.Column("POS_CORR2", "D", unit="pixel", array=pos_corr[:, 1]),
    ]
    table = fits.BinTableHDU.from_columns(columns, name="LIGHTCURVE")
    table.data = table.data[keep]
    th = table.header
    half = phot.cadence / 86400 / 2
    t_ok = time[keep]
    for key, value, comment in [
        ("INHERIT", True, "inherit the primary header"),
        *BTJD_TIME_CARDS,
        ("TSTART", float(t_ok[0] - half) if t_ok.size else None, "observation start (BTJD)"),
        ("TSTOP", float(t_ok[-1] + half) if t_ok.size else None, "observation stop (BTJD)"),
        ("TIMEPIXR", 0.5, "bin time beginning=0 middle=0.5 end=1"),
        ("TIMEDEL", phot.cadence / 86400, "[d] time resolution of data"),
        ("TELAPSE", float(t_ok[-1] - t_ok[0] + 2 * half) if t_ok.size else None,
         "[d] TSTOP - TSTART"),
    ]:
        th[key] = (value, comment)
    th["TTYPE9"] = ("QUALITY", "LightCurveQualityFlags bits")
    th["TTYPE10"] = ("PIXEL_QUALITY", "SPOC cadence quality")

    wcs_header = _stamp_wcs_header(phot)
    sumimg = fits.ImageHDU(np.asarray(phot.sumimage, dtype=np.float64), header=wcs_header,
                           name="SUMIMAGE")
    sumimg.header["INHERIT"] = True
    aperture = fits.ImageHDU(phot.aperture_bitmask().astype(np.int32), header=wcs_header,
                             name="APERTURE")
    aperture.header["INHERIT"] = True
    aperture.header["COMMENT"] = ("bits: 1 collected, 2 in mask, 4 background, 8 centroid, "
                                  "32/64/128/256 CCD output A/B/C/D")
    return fits.HDUList([primary, table, sumimg, aperture])


def add_check_cards(header, phot):
    """The core's result checks in the primary header: QCSTATUS, QCCODES and one QCTXTn card
    per reason (:func:`photometry.checks.header_cards`, docs/checks.md)."""
    from .checks import header_cards
    for key, value, comment in header_cards(phot.details.get("checks")):
        header[key] = (value, comment)


def write_lightcurve(phot, output_folder):
    """Write the light curve of ``phot`` under ``output_folder`` atomically; the path."""
    path = lightcurve_path(output_folder, phot.starid, phot.sector, phot.camera, phot.ccd,
                           phot.cadence, phot.name)
    return write_atomic(build_hdulist(phot), path)


class FitsLightCurveWriter:
    """The standard light-curve FITS file (DESIGN.md format), readable by ``lightkurve.read``."""

    name = "fits"
    version = "1.0"

    def write(self, phot, output_folder):
        return write_lightcurve(phot, output_folder)


@hookimpl(trylast=True)
def register_output_writers():
    return [FitsLightCurveWriter]
