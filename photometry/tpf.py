"""Target Pixel Files and TESScut cutouts as a data source for BasePhotometry (datasource "tpf").

A :class:`TPFSource` offers the same names as :class:`photometry.cache.FFICache` where they make
sense, so BasePhotometry treats both alike: ``time, timecorr, cadenceno, quality, n_frames,
sumimage, reference_wcs, row_offset, column_offset, movement_kernel,
stamp(name, row_slice, col_slice)``. Differences, and why:

- SPOC TPF ``FLUX`` is already background-subtracted, so ``stamp("images")`` is FLUX and
  ``stamp("backgrounds")`` is FLUX_BKG (what SPOC subtracted); there are no pixel flags.
- The WCS is the APERTURE extension's (stamp pixels); its 1-based physical WCS
  (``CRVAL1P/CRVAL2P``, or TESScut's ``1CRV4P/2CRV4P`` in the PIXELS header) minus 1 gives the
  CCD position of the stamp's first pixel.
- Cadences with NaN TIME are dropped when the file is read.
- Motion: POS_CORR1/2 (when present and finite) as a pure translation, re-zeroed at the frame
  nearest the middle of the good cadences, which is taken as the reference frame.
- The catalog is the target alone, or the stars of a catalog file (``catalog=``) placed on the
  stamp with the WCS. TESScut headers have no TIC id or Tmag: pass ``starid`` and ``tmag``.
"""
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

from .errors import InputError
from .quality import TESSQualityFlags
from .utilities import open_fits

__all__ = ["TPFSource", "TranslationKernel"]

#: stamp() names -> PIXELS table columns
_COLUMNS = {"images": "FLUX", "errors": "FLUX_ERR", "backgrounds": "FLUX_BKG",
            "background_errors": "FLUX_BKG_ERR"}


class TranslationKernel:
    """Movement as a pure translation per frame (from POS_CORR1/2), with the ``shift`` method
    of :class:`photometry.movement.MovementKernel`."""

    def __init__(self, dcol, drow):
        self.dcol = np.asarray(dcol, dtype=float)
        self.drow = np.asarray(drow, dtype=float)

    def __len__(self):
        return self.dcol.size

    def shift(self, x, y, frame_index):
        """(dx, dy) of reference positions in frame(s) ``frame_index``: shaped like ``x`` for
        one frame, (n_frames, n_positions) for an array of frames."""
        x = np.asarray(x, dtype=float)
        if np.ndim(frame_index):
            x = np.atleast_1d(x)
            shape = (np.size(frame_index), x.size)
            return (np.broadcast_to(self.dcol[frame_index][:, None], shape).copy(),
                    np.broadcast_to(self.drow[frame_index][:, None], shape).copy())
        return (np.full(x.shape, self.dcol[frame_index]),
                np.full(x.shape, self.drow[frame_index]))


def _header_value(header, key):
    value = header.get(key)
    if value is None or isinstance(value, fits.card.Undefined) or value == "":
        return None
    return value


class TPFSource:
    """A SPOC TPF or a TESScut cutout, read once into memory (they are small).

    Parameters
    ----------
    path : path
        ``.fits`` or ``.fits.gz``.
    starid, tmag : optional
        Override or supply the target's TIC id and TESS magnitude (TESScut has neither).
    catalog : path, optional
        CSV/ECSV/FITS table with ``starid, ra, dec, tmag`` of stars to place on the stamp.

    Raises
    ------
    InputError
        For a file that is not a TPF/TESScut, or a target that cannot be identified.
    """

    datasource = "tpf"
    catalog_path = None

    def __init__(self, path, starid=None, tmag=None, catalog=None):
        self.path = Path(path)
        with open_fits(self.path) as hdul:
            names = [h.name for h in hdul]
            if "PIXELS" not in names or "APERTURE" not in names:
                raise InputError(f"{self.path}: not a TPF/TESScut (needs PIXELS and APERTURE "
                                 f"extensions, has {', '.join(names)})")
            self.header = hdul[0].header.copy()
            pixhead = hdul["PIXELS"].header.copy()
            aphead = hdul["APERTURE"].header.copy()
            data = hdul["PIXELS"].data
            missing = {"TIME", "FLUX", "QUALITY"} - set(data.columns.names)
            if missing:
                raise InputError(f"{self.path}: PIXELS table lacks {', '.join(sorted(missing))}")
            time = np.asarray(data["TIME"], dtype=float)
            keep = np.isfinite(time)
            if not np.any(keep):
                raise InputError(f"{self.path}: no cadence has a finite TIME")
            self.time = time[keep]
            self.timecorr = (np.asarray(data["TIMECORR"], dtype=float)[keep]
                             if "TIMECORR" in data.columns.names else np.zeros(keep.sum()))
            self.cadenceno = (np.asarray(data["CADENCENO"], dtype=np.int64)[keep]
                              if "CADENCENO" in data.columns.names
                              else np.arange(keep.sum(), dtype=np.int64))
            self.quality = np.asarray(data["QUALITY"], dtype=np.int64)[keep]
            self._cubes = {}
            for name, column in _COLUMNS.items():
                if column in data.columns.names:
                    cube = np.asarray(data[column], dtype=np.float64)[keep]
                    if cube.ndim != 3:
                        raise InputError(f"{self.path}: column {column} is not an image column")
                    self._cubes[name] = cube
            pos = []
            for column in ("POS_CORR1", "POS_CORR2"):
                pos.append(np.asarray(data[column], dtype=float)[keep]
                           if column in data.columns.names else np.full(keep.sum(), np.nan))
            self.aperture = np.asarray(hdul["APERTURE"].data, dtype=np.int32)

        self.n_frames = len(self.time)
        self.sector = int(self._need(self.header, "SECTOR"))
        self.camera = int(self._need(self.header, "CAMERA"))
        self.ccd = int(self._need(self.header, "CCD"))
        timedel = _header_value(pixhead, "TIMEDEL")
        if timedel is None and self.n_frames > 1:
            timedel = float(np.median(np.diff(self.time)))
        self.cadence = int(round(float(timedel or 0) * 86400)) if timedel else 0
        if self.cadence == 0:
            raise InputError(f"{self.path}: cannot tell the cadence (no TIMEDEL)")

        # CCD offset of the stamp's first pixel from the 1-based physical WCS.
        c1 = _header_value(aphead, "CRVAL1P")
        r1 = _header_value(aphead, "CRVAL2P")
        if c1 is None or r1 is None:
            for key in pixhead:
                if key.startswith("1CRV") and key.endswith("P"):
                    c1 = pixhead[key]
                    r1 = pixhead.get("2" + key[1:])
                    break
        if c1 is None or r1 is None:
            raise InputError(f"{self.path}: no physical WCS (CRVAL1P/CRVAL2P) for the CCD offset")
        self.column_offset = int(c1) - 1
        self.row_offset = int(r1) - 1
        try:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                self.reference_wcs = WCS(aphead, relax=True, naxis=2)
        except Exception as exc:  # noqa: BLE001 - any WCS parse failure is bad input
            raise InputError(f"{self.path}: APERTURE WCS is not readable ({exc})") from None

        images = self._cubes["images"]
        self.shape = images.shape[1:]
        good = TESSQualityFlags.filter(self.quality)
        if not np.any(good):
            good = np.ones(self.n_frames, dtype=bool)
        with np.errstate(invalid="ignore"):
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self.sumimage = np.nanmean(images[good], axis=0)

        pos = np.column_stack(pos)
        # pos_corr as in the file (NaN kept, it goes to POS_CORR1/2); the kernel has no NaN.
        self.pos_corr = pos if np.isfinite(pos).any() else None
        if self.pos_corr is not None:
            finite = np.all(np.isfinite(pos), axis=1)
            cand = np.flatnonzero(good & finite)
            if cand.size == 0:
                cand = np.flatnonzero(finite)
            ref = cand[np.argmin(np.abs(self.time[cand] - np.median(self.time[cand])))]
            self.ref_frame = int(ref)
            shift = np.nan_to_num(pos - pos[ref], nan=0.0)
            self.movement_kernel = TranslationKernel(shift[:, 0], shift[:, 1])
        else:
            self.ref_frame = 0
            self.movement_kernel = None

        self.target = self._make_target(starid, tmag, aphead)
        self._catalog = self._make_catalog(catalog)

    def _need(self, header, key):
        value = _header_value(header, key)
        if value is None:
            raise InputError(f"{self.path}: primary header has no {key}")
        return value

    @property
    def spoc_aperture(self):
        """(r, c) bool: SPOC's optimal photometric aperture (APERTURE bit 2)."""
        return (self.aperture & 2) != 0

    def _pixel_position(self, ra, dec):
        """0-based CCD (row, column) of sky positions through the stamp WCS."""
        x, y = self.reference_wcs.all_world2pix(np.atleast_1d(ra), np.atleast_1d(dec), 0)
        return y + self.row_offset, x + self.column_offset

    def _make_target(self, starid, tmag, aphead):
        head = self.header
        ticid = _header_value(head, "TICID")
        if starid is None:
            if ticid is None:
                raise InputError(f"{self.path}: no TICID in the header (a TESScut?); "
                                 "give the starid")
            starid = int(ticid)
        ra = _header_value(aphead, "RA_OBJ") or _header_value(head, "RA_OBJ")
        dec = _header_value(aphead, "DEC_OBJ") or _header_value(head, "DEC_OBJ")
        if ra is None or dec is None:
            raise InputError(f"{self.path}: no RA_OBJ/DEC_OBJ in the header")
        if tmag is None:
            tmag = _header_value(head, "TESSMAG")
            if not tmag:  # TESScut writes 0.0 for unknown
                raise InputError(f"{self.path}: no TESSMAG in the header; give tmag")
        row, col = self._pixel_position(ra, dec)
        return {
            "starid": int(starid), "ra": float(ra), "dec": float(dec),
            "ra_J2000": float(_header_value(head, "RA_OBJ") or ra),
            "dec_J2000": float(_header_value(head, "DEC_OBJ") or dec),
            "tmag": float(tmag),
            "pmra": float(_header_value(head, "PMRA") or 0.0),
            "pmdec": float(_header_value(head, "PMDEC") or 0.0),
            "teff": (float(_header_value(head, "TEFF")) if _header_value(head, "TEFF")
                     else np.nan),
            "row": float(row[0]), "column": float(col[0]),
        }

    def _make_catalog(self, catalog):
        t = self.target
        rows = [{k: t[k] for k in ("starid", "ra", "dec", "ra_J2000", "dec_J2000", "tmag",
                                   "pmra", "pmdec", "teff", "row", "column")}]
        table = Table(rows=rows)
        if catalog is None:
            return table
        try:
            other = Table.read(catalog)
        except Exception as exc:  # noqa: BLE001 - any read failure is bad input
            raise InputError(f"{catalog}: cannot read the catalog ({exc})") from None
        need = {"starid", "ra", "dec", "tmag"} - set(other.colnames)
        if need:
            raise InputError(f"{catalog}: catalog lacks column(s) {', '.join(sorted(need))}")
        other = other[np.asarray(other["starid"]) != t["starid"]]
        if len(other):
            row, col = self._pixel_position(np.asarray(other["ra"], float),
                                            np.asarray(other["dec"], float))
            extra = Table()
            extra["starid"] = np.asarray(other["starid"], dtype=np.int64)
            for key in ("ra", "dec", "tmag"):
                extra[key] = np.asarray(other[key], dtype=float)
            extra["ra_J2000"], extra["dec_J2000"] = extra["ra"], extra["dec"]
            for key in ("pmra", "pmdec", "teff"):
                extra[key] = (np.asarray(other[key], dtype=float) if key in other.colnames
                              else np.full(len(other), np.nan))
            extra["row"], extra["column"] = row, col
            from astropy.table import vstack
            table = vstack([table, extra])
        return table

    def catalog_table(self):
        """All known stars (the target first): starid, ra, dec, tmag, row, column (CCD 0-based)."""
        return self._catalog.copy()

    def stamp(self, name, row_slice, col_slice):
        """(N, r, c) slice of a cube: images (FLUX), errors, backgrounds, background_errors.

        Raises KeyError for a cube the file does not have (pixel flags, for instance).
        """
        if name not in self._cubes:
            raise KeyError(f"{self.path.name}: no '{name}' cube")
        return self._cubes[name][:, row_slice, col_slice]

    def model_group(self, name):
        """TPFs carry no prepare-stage models."""
        return None
