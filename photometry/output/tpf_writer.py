"""The stamp of one target as a Target Pixel File in SPOC's layout (output writer "tpf").

``tessphot star STARID ... --tpf-out`` (or ``photometry.writers = ["fits", "tpf"]`` for a whole
run) writes, next to the light curve, ``tess{tic:011d}-s{sector:04d}-{camera}-{ccd}-
c{cadence:04d}-{method}_tp.fits``: the pixels the method measured, so that an astronomer can
redo or check the photometry with lightkurve:

>>> tpf = lightkurve.read(path)                       # a TessTargetPixelFile
>>> lc = tpf.to_lightcurve(aperture_mask="pipeline")  # our aperture, our pixels

Layout (``docs/coordinates_and_formats.md``, TPF export), as SPOC writes it:

- PRIMARY: the light curve's :func:`photometry.output.lightcurve_io.primary_header` (TELESCOP,
  OBJECT, TICID, SECTOR, CAMERA, CCD, RA_OBJ/DEC_OBJ J2000, PMRA, PMDEC, TESSMAG, TEFF,
  DATA_REL, our method and settings hash, ...) with CREATOR containing "TargetPixelExporter",
  which is how lightkurve recognises a TPF.
- PIXELS: TIME, TIMECORR, CADENCENO, RAW_CNTS (the file's for TPF input, else -1 = TNULL),
  FLUX (background-subtracted, e-/s), FLUX_ERR, FLUX_BKG, FLUX_BKG_ERR, QUALITY (SPOC's cadence
  bits as read), POS_CORR1/2; per image column the stamp WCS (``1CTYPn``...) and the physical
  WCS (``1CRVnP``/``2CRVnP`` = 1-based CCD column/row of pixel [0, 0]), n = 4..8.
- APERTURE: int32 with SPOC's bits (1 collected, 2 optimal aperture = our mask, 4 background,
  8 centroid, 32..256 CCD output A-D), the stamp WCS and ``CRVAL1P/CRVAL2P``.

FLUX is ``BasePhotometry.images_cube`` after the method ran, i.e. the pixels it summed: the sum
over bit 2 is the method's plain aperture sum. Light-curve level corrections (the aperture
method's motion and contamination corrections, PDC) are not pixel data and are not in it.
"""
import numpy as np
from astropy.io import fits

from photometry.hooks.hookspecs import hookimpl
from photometry.output.lightcurve_io import (_stamp_wcs_header, lightcurve_path, primary_header,
                                             write_atomic)
from photometry.hooks.utilities import BTJD_TIME_CARDS

__all__ = ["tpf_path", "build_tpf_hdulist", "write_tpf", "TargetPixelFileWriter"]

#: lightkurve's detect_filetype looks for "targetpixel" in CREATOR
CREATOR = "tessphot TargetPixelExporter"

#: FILEVER of the export (its own layout, independent of the light curve's)
FILE_VERSION = "1.0"

#: (column, TFORM letter, unit) of the image columns, in SPOC's order (RAW_CNTS is 4th)
_IMAGE_COLUMNS = (("RAW_CNTS", "J", "count"), ("FLUX", "E", "e-/s"),
                  ("FLUX_ERR", "E", "e-/s"), ("FLUX_BKG", "E", "e-/s"),
                  ("FLUX_BKG_ERR", "E", "e-/s"))


def tpf_path(phot, output_folder):
    """The light curve's path with ``_tp.fits`` for ``_lc.fits`` (same folder)."""
    path = lightcurve_path(output_folder, phot.starid, phot.sector, phot.camera, phot.ccd,
                           phot.cadence, phot.name)
    name = path.name
    name = name[:-len("_lc.fits")] + "_tp.fits" if name.endswith("_lc.fits") else name + "_tp"
    return path.with_name(name)


def _raw_counts(phot):
    """(N, r, c) int32 RAW_CNTS of the stamp: the TPF's own where the source has them, else -1."""
    shape = np.shape(phot.images_cube)
    raw = getattr(phot.source, "raw_counts", None)
    if raw is None:
        return np.full(shape, -1, dtype=np.int32)
    rs, cs = phot._slices()
    frames = np.arange(len(phot.source.time))[phot._frames]
    return np.asarray(raw, dtype=np.int32)[frames][:, rs, cs]


def _linear_wcs(phot):
    """The stamp WCS without distortion terms, as TPF table columns carry it (lightkurve reads
    these): the WCS itself when it has none, else a TAN WCS fitted over the stamp, as astrocut
    does for TESScut (the cache's SIP terms shift a stamp far from CRPIX by pixels, so they
    cannot simply be dropped; the APERTURE header keeps the exact WCS)."""
    wcs = phot.wcs
    if wcs is None or wcs.sip is None:
        return wcs
    from astropy.wcs.utils import fit_wcs_from_points
    nrow, ncol = np.shape(phot.images_cube)[1:]
    x, y = np.meshgrid(np.linspace(-0.5, ncol - 0.5, 5), np.linspace(-0.5, nrow - 0.5, 5))
    sky = wcs.pixel_to_world(x.ravel(), y.ravel())
    return fit_wcs_from_points((x.ravel(), y.ravel()), sky, proj_point="center",
                               projection="TAN")


def _column_wcs_cards(phot, n):
    """SPOC's per-column WCS keywords of image column ``n``: stamp WCS and physical WCS."""
    r1, _, c1, _ = phot.stamp
    cards = [(f"WCSN{n}P", "PHYSICAL", "table column WCS name"),
             (f"WCAX{n}P", 2, "table column physical WCS dimensions"),
             (f"1CTY{n}P", "RAWX", "table column physical WCS axis 1 type, CCD col"),
             (f"2CTY{n}P", "RAWY", "table column physical WCS axis 2 type, CCD row"),
             (f"1CUN{n}P", "PIXEL", "table column physical WCS axis 1 unit"),
             (f"2CUN{n}P", "PIXEL", "table column physical WCS axis 2 unit"),
             (f"1CRV{n}P", int(c1) + 1, "table column physical WCS ax 1 ref value"),
             (f"2CRV{n}P", int(r1) + 1, "table column physical WCS ax 2 ref value"),
             (f"1CDL{n}P", 1.0, "table column physical WCS a1 step"),
             (f"2CDL{n}P", 1.0, "table column physical WCS a2 step"),
             (f"1CRP{n}P", 1, "table column physical WCS a1 reference"),
             (f"2CRP{n}P", 1, "table column physical WCS a2 reference")]
    wcs = _linear_wcs(phot)
    if wcs is None:
        return cards
    w = wcs.wcs
    pc, cdelt = w.get_pc(), w.get_cdelt()      # also right for a CD matrix
    ctype = [t.replace("-SIP", "") for t in w.ctype]
    cards += [(f"WCAX{n}", 2, "number of WCS axes"),
              (f"1CTYP{n}", ctype[0], "right ascension coordinate type"),
              (f"2CTYP{n}", ctype[1], "declination coordinate type"),
              (f"1CRPX{n}", float(w.crpix[0]), "[pixel] reference pixel along image axis 1"),
              (f"2CRPX{n}", float(w.crpix[1]), "[pixel] reference pixel along image axis 2"),
              (f"1CRVL{n}", float(w.crval[0]), "[deg] right ascension at reference pixel"),
              (f"2CRVL{n}", float(w.crval[1]), "[deg] declination at reference pixel"),
              (f"1CUNI{n}", "deg", "physical unit in column dimension"),
              (f"2CUNI{n}", "deg", "physical unit in row dimension"),
              (f"1CDLT{n}", float(cdelt[0]), "[deg] pixel scale in RA dimension"),
              (f"2CDLT{n}", float(cdelt[1]), "[deg] pixel scale in DEC dimension"),
              (f"11PC{n}", float(pc[0, 0]), "linear transformation matrix element"),
              (f"12PC{n}", float(pc[0, 1]), "linear transformation matrix element"),
              (f"21PC{n}", float(pc[1, 0]), "linear transformation matrix element"),
              (f"22PC{n}", float(pc[1, 1]), "linear transformation matrix element")]
    return cards


def build_tpf_hdulist(phot):
    """The Target Pixel File of a BasePhotometry object after :meth:`photometry`."""
    primary = fits.PrimaryHDU(header=primary_header(phot, CREATOR, filever=FILE_VERSION))

    images = {"RAW_CNTS": _raw_counts(phot), "FLUX": phot.images_cube,
              "FLUX_ERR": phot.images_err_cube, "FLUX_BKG": phot.backgrounds_cube,
              "FLUX_BKG_ERR": phot.backgrounds_err_cube}
    nrow, ncol = np.shape(phot.images_cube)[1:]
    lc = phot.lightcurve
    pos_corr = np.asarray(lc["pos_corr"], dtype=float).reshape(-1, 2)
    columns = [fits.Column("TIME", "D", unit="BJD - 2457000, days", array=phot.time),
               fits.Column("TIMECORR", "E", unit="d", array=phot.timecorr),
               fits.Column("CADENCENO", "J", array=phot.cadenceno.astype(np.int32))]
    for name, form, unit in _IMAGE_COLUMNS:
        extra = {"null": -1} if form == "J" else {}
        columns.append(fits.Column(name, f"{nrow * ncol}{form}", unit=unit,
                                   dim=f"({ncol},{nrow})", array=np.asarray(images[name]),
                                   **extra))
    columns += [fits.Column("QUALITY", "J", array=phot.quality.astype(np.int32)),
                fits.Column("POS_CORR1", "E", unit="pixel", array=pos_corr[:, 0]),
                fits.Column("POS_CORR2", "E", unit="pixel", array=pos_corr[:, 1])]
    pixels = fits.BinTableHDU.from_columns(columns, name="PIXELS")
    header = pixels.header
    for n in range(4, 4 + len(_IMAGE_COLUMNS)):
        for key, value, comment in _column_wcs_cards(phot, n):
            header[key] = (value, comment)
    half = phot.cadence / 86400 / 2
    t = phot.time
    for key, value, comment in [
        ("INHERIT", True, "inherit the primary header"),
        *BTJD_TIME_CARDS,
        ("TSTART", float(t[0] - half), "observation start (BTJD)"),
        ("TSTOP", float(t[-1] + half), "observation stop (BTJD)"),
        ("TIMEPIXR", 0.5, "bin time beginning=0 middle=0.5 end=1"),
        ("TIMEDEL", phot.cadence / 86400, "[d] time resolution of data"),
        ("TELAPSE", float(t[-1] - t[0] + 2 * half), "[d] TSTOP - TSTART"),
        ("BACKAPP", True, "background is subtracted"),
        ("BKGSRC", str(phot.details.get("background", "")), "where FLUX_BKG comes from"),
    ]:
        header[key] = (value, comment)

    aperture = fits.ImageHDU(phot.aperture_bitmask().astype(np.int32),
                             header=_stamp_wcs_header(phot), name="APERTURE")
    mask = phot.final_phot_mask
    aperture.header["INHERIT"] = True
    aperture.header["NPIXSAP"] = (int(np.count_nonzero(mask)) if mask is not None else 0,
                                  "Number of pixels in optimal aperture")
    aperture.header["COMMENT"] = ("bits: 1 collected, 2 in optimal aperture (the method's "
                                  "mask), 4 background, 8 centroid, 32/64/128/256 CCD output "
                                  "A/B/C/D")
    return fits.HDUList([primary, pixels, aperture])


def write_tpf(phot, output_folder):
    """Write the TPF of ``phot`` under ``output_folder`` atomically; the path."""
    path = write_atomic(build_tpf_hdulist(phot), tpf_path(phot, output_folder))
    phot.details["filepath_tpf"] = str(path)
    return path


class TargetPixelFileWriter:
    """The stamp as a SPOC-layout Target Pixel File (``photometry.writers`` name "tpf")."""

    name = "tpf"
    version = FILE_VERSION

    def write(self, phot, output_folder):
        return write_tpf(phot, output_folder)


@hookimpl
def register_output_writers():
    return [TargetPixelFileWriter]
