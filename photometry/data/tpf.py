"""Target Pixel Files and TESScut cutouts as a data source for BasePhotometry (datasource "tpf").

A :class:`TPFSource` offers the same names as :class:`photometry.data.cache.FFICache` where they make
sense, so BasePhotometry treats both alike: ``time, timecorr, cadenceno, quality, n_frames,
sumimage, reference_wcs, row_offset, column_offset, movement_kernel,
stamp(name, row_slice, col_slice)``. As in the cache, ``stamp("images")`` holds the sky and
``stamp("backgrounds")`` the sky model that BasePhotometry subtracts
(``docs/coordinates_and_formats.md``, TPF / TESScut):

- **Sky.** A SPOC TPF's FLUX is background-subtracted and FLUX_BKG holds what SPOC subtracted,
  so the images are FLUX + FLUX_BKG and the background FLUX_BKG. TESScut (astrocut) FLUX still
  holds the sky (FLUX_BKG is 0): the sky is fitted jointly with the catalog stars' PRFs
  (:func:`photometry.data.cutout_sky.fit_sky`); where the stars outshine the sky in every pixel
  the level is not determined and :attr:`TPFSource.warnings` says so.
- **Sector, camera, CCD** from the header, else the file name (``tess-s0001-4-3_...``), else
  the caller's; a caller's value that contradicts the file is an InputError.
- **Cadence** from the median time step, rounded to the nominal 1800/600/200/120/20 s.
- **WCS** of the APERTURE extension; a singular one, one whose pixels are not TESS's 21",
  or one that places the file's own RA_OBJ/DEC_OBJ far off the stamp is refused. The CCD
  offset is the 1-based physical WCS (``CRVAL1P/CRVAL2P``, TESScut ``1CRV4P/2CRV4P``) minus 1.
- **Positions** moved by proper motion from J2000 to the reference cadence (the good cadence
  nearest the middle): the header's PMRA/PMDEC, or a catalog's.
- **Motion**: POS_CORR1/2 (when present and finite) as a translation re-zeroed at the
  reference cadence. Cadences with NaN TIME are dropped when the file is read.
- **Noise and errors**: ``noise`` is the CCDNoise of one cadence (the header's read noise,
  exposure = cadence x DEADC); FLUX_ERR the file lacks is estimated from the pixels with it.
- **Pixel flags**: Saturated where a frame exceeds ``prepare.saturation_level`` (with the
  bleed pad), as the cache flags them; NonFinite is added by BasePhotometry.
"""
import re
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.wcs import WCS, FITSFixedWarning

from photometry.hooks.errors import InputError
from photometry.hooks.quality import PixelQualityFlags, TESSQualityFlags
from photometry.hooks.utilities import mag2flux, open_fits

__all__ = ["TPFSource", "TranslationKernel", "NOMINAL_CADENCES", "nominal_cadence",
           "TESS_PIXEL_SCALE"]

#: TESS cadences (s): FFIs of sectors 1-26 / 27-55 / 56 on, 2-min and 20-s target pixels.
NOMINAL_CADENCES = (1800, 600, 200, 120, 20)

#: arcsec per TESS pixel; a WCS whose pixel is not within a factor 2 of it is refused
TESS_PIXEL_SCALE = 21.0

#: stamp() names -> PIXELS table columns read as they are
_COLUMNS = {"errors": "FLUX_ERR", "background_errors": "FLUX_BKG_ERR"}

#: file-name patterns giving (sector, camera, ccd): TESScut, tessphot exports, SPOC TPFs
_NAME_PATTERNS = (re.compile(r"tess-s(\d{4})-(\d)-(\d)[_-]"),
                  re.compile(r"-s(\d{4})-(\d)-(\d)-c\d{4}"),
                  re.compile(r"-s(\d{4})-\d{16}-"))


class TranslationKernel:
    """Movement as a pure translation per frame (from POS_CORR1/2), with the ``shift`` method
    of :class:`photometry.data.movement.MovementKernel`."""

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


def nominal_cadence(time, timedel=None, where="data"):
    """The TESS cadence (s) of a time axis: its median step rounded to a nominal cadence.

    Why the median step and not TIMEDEL or the raw value: early TESScut files have no TIMEDEL,
    and the measured step of 30-min FFIs is 1798.24 s (the 0.99 duty cycle of the 2-s frames
    is in TIMEDEL, not in the spacing), which must not name a folder ``c1798``.

    Raises
    ------
    InputError
        If the step is more than 5 % from every nominal cadence, or cannot be measured.
    """
    time = np.asarray(time, dtype=float)
    time = time[np.isfinite(time)]
    step = float(np.median(np.diff(time))) * 86400 if time.size > 1 else None
    if step is None and timedel:
        step = float(timedel) * 86400
    if not step or not np.isfinite(step) or step <= 0:
        raise InputError(f"{where}: cannot tell the cadence (one cadence and no TIMEDEL)")
    best = min(NOMINAL_CADENCES, key=lambda c: abs(np.log(step / c)))
    if abs(step / best - 1) > 0.05:
        raise InputError(f"{where}: time step {step:.1f} s is not a TESS cadence "
                         f"({'/'.join(map(str, NOMINAL_CADENCES))} s)")
    return int(best)


def _ids_from_name(path):
    """(sector, camera, ccd) from a TESS file name; None where it does not say."""
    for pattern in _NAME_PATTERNS:
        m = pattern.search(path.name)
        if m:
            values = [int(v) for v in m.groups()]
            return tuple(values + [None] * (3 - len(values)))
    return None, None, None


def _check_wcs(wcs, path):
    """Refuse a WCS that cannot place stars: singular, not finite, or not TESS-sized pixels."""
    try:
        scale = np.linalg.svd(wcs.pixel_scale_matrix, compute_uv=False) * 3600.0
    except (ValueError, np.linalg.LinAlgError):
        scale = np.array([np.nan])
    lo, hi = TESS_PIXEL_SCALE / 2, TESS_PIXEL_SCALE * 2
    if not (np.all(np.isfinite(scale)) and scale.min() >= lo and scale.max() <= hi):
        shown = " x ".join(f'{v:.3g}"' for v in scale)
        raise InputError(f"{path}: the WCS is singular or degenerate (pixels {shown}, TESS "
                         f"pixels are {TESS_PIXEL_SCALE:.0f}\"): cannot place stars on it")


class TPFSource:
    """A SPOC TPF or a TESScut cutout, read once into memory (they are small).

    Parameters
    ----------
    path : path
        ``.fits`` or ``.fits.gz``.
    starid, tmag : optional
        The target's TIC id and TESS magnitude when the file has none (TESScut) or to override.
    catalog : path, optional
        A star catalog in the project's format (:func:`photometry.data.catalog.read_catalog`:
        starid, ra, dec, tmag[, pmra, pmdec, teff]); its stars on and around the stamp become
        the neighbours, and the target's row, if there, gives its position and magnitude.
    sector, camera, ccd : int, optional
        Checked against the file; used where the file does not say.
    settings : dict, optional
        Full settings (default: the documented defaults): ``photometry.data.prf`` for the sky fit,
        ``prepare.saturation_level`` / ``saturation_bleed_pad`` for the pixel flags.

    Raises
    ------
    InputError
        A file that is not a TPF/TESScut, a sector/camera/CCD that contradicts it or that
        nothing gives, a cadence that is not TESS's, an unusable WCS, a target that cannot be
        identified.
    """

    datasource = "tpf"
    catalog_path = None

    def __init__(self, path, starid=None, tmag=None, catalog=None, sector=None, camera=None,
                 ccd=None, settings=None):
        if settings is None:
            from photometry.hooks.settings import default_settings
            settings = default_settings()
        self.path = Path(path)
        #: (reason code, text) of what this source could not do well; every result from it
        #: is then at best a WARNING (BasePhotometry)
        self.warnings = []
        self._read_file()
        self._set_ids(sector, camera, ccd)
        self.cadence = nominal_cadence(self.time, _header_value(self._pixhead, "TIMEDEL"),
                                       where=str(self.path))
        self._set_geometry()
        self._set_noise_and_errors()
        self._set_reference_and_motion()
        self._set_pixel_flags(settings["prepare"])

        from photometry.data.catalog import btjd_to_epoch
        self.epoch = float(btjd_to_epoch(self.time[self.ref_frame]))
        table = self._read_catalog(catalog)
        self.target = self._make_target(starid, tmag, table)
        self._catalog = self._make_catalog(table)
        self.sky_fit = None
        if self.has_sky_model:
            self.sky_source = "FLUX_BKG"
        else:
            self._fit_sky(settings["photometry"].get("prf", "analytic"))

    # ------------------------------------------------------------------ reading
    def _read_file(self):
        """Headers, time axis, cubes (images with the sky), RAW_CNTS, POS_CORR, APERTURE."""
        with open_fits(self.path) as hdul:
            names = [h.name for h in hdul]
            if "PIXELS" not in names or "APERTURE" not in names:
                raise InputError(f"{self.path}: not a TPF/TESScut (needs PIXELS and APERTURE "
                                 f"extensions, has {', '.join(names)})")
            self.header = hdul[0].header.copy()
            self._pixhead = hdul["PIXELS"].header.copy()
            self._aphead = hdul["APERTURE"].header.copy()
            data = hdul["PIXELS"].data
            columns = set(data.columns.names)
            missing = {"TIME", "FLUX", "QUALITY"} - columns
            if missing:
                raise InputError(f"{self.path}: PIXELS table lacks {', '.join(sorted(missing))}")
            time = np.asarray(data["TIME"], dtype=float)
            keep = np.isfinite(time)
            if not np.any(keep):
                raise InputError(f"{self.path}: no cadence has a finite TIME")
            self.time = time[keep]
            n = int(keep.sum())
            self.timecorr = (np.asarray(data["TIMECORR"], dtype=float)[keep]
                             if "TIMECORR" in columns else np.zeros(n))
            self.cadenceno = (np.asarray(data["CADENCENO"], dtype=np.int64)[keep]
                              if "CADENCENO" in columns else np.arange(n, dtype=np.int64))
            self.quality = np.asarray(data["QUALITY"], dtype=np.int64)[keep]
            flux = np.asarray(data["FLUX"], dtype=np.float64)[keep]
            if flux.ndim != 3:
                raise InputError(f"{self.path}: column FLUX is not an image column")
            self._cubes = {}
            for name, column in _COLUMNS.items():
                if column in columns:
                    self._cubes[name] = np.asarray(data[column], dtype=np.float64)[keep]
            bkg = (np.asarray(data["FLUX_BKG"], dtype=np.float64)[keep]
                   if "FLUX_BKG" in columns else None)
            #: RAW_CNTS (count) as in the file, or None; the TPF export copies it
            self.raw_counts = (np.asarray(data["RAW_CNTS"])[keep]
                               if "RAW_CNTS" in columns else None)
            self._pos = np.column_stack([
                np.asarray(data[c], dtype=float)[keep] if c in columns else np.full(n, np.nan)
                for c in ("POS_CORR1", "POS_CORR2")])
            self.aperture = np.asarray(hdul["APERTURE"].data, dtype=np.int32)
        self.n_frames = len(self.time)
        self.shape = flux.shape[1:]
        #: FLUX_BKG holds a sky model (SPOC TPFs); all-zero or absent means FLUX still holds
        #: the sky (TESScut, SPOC's early FFI cutouts)
        self.has_sky_model = bkg is not None and bool(np.any(np.nan_to_num(bkg) != 0))
        if self.has_sky_model:
            self._cubes["images"] = flux + np.nan_to_num(bkg)
            self._cubes["backgrounds"] = bkg
        else:
            self._cubes["images"] = flux
        self.data_rel = _header_value(self.header, "DATA_REL")

    def _set_ids(self, sector, camera, ccd):
        """Sector, camera, CCD: header, else file name, else the caller's; contradictions are
        InputErrors."""
        from_name = _ids_from_name(self.path)
        given = {"sector": sector, "camera": camera, "ccd": ccd}
        for (key, value), named in zip(given.items(), from_name):
            head = _header_value(self.header, key.upper())
            head = None if head is None else int(head)
            if head is not None and named is not None and head != named:
                raise InputError(f"{self.path}: the file name says {key} {named} but the "
                                 f"header says {key.upper()} {head}")
            have = head if head is not None else named
            if value is not None and have is not None and int(value) != have:
                raise InputError(f"{self.path}: --{key} {value} does not match the file "
                                 f"({key.upper()} {have})")
            final = have if have is not None else value
            if final is None:
                raise InputError(f"{self.path}: neither the header nor the file name gives "
                                 f"the {key}; give --{key}")
            setattr(self, key, int(final))

    def _set_geometry(self):
        """CCD offset from the physical WCS, and the (checked) celestial WCS of the stamp."""
        c1 = _header_value(self._aphead, "CRVAL1P")
        r1 = _header_value(self._aphead, "CRVAL2P")
        if c1 is None or r1 is None:
            for key in self._pixhead:
                if key.startswith("1CRV") and key.endswith("P"):
                    c1 = self._pixhead[key]
                    r1 = self._pixhead.get("2" + key[1:])
                    break
        if c1 is None or r1 is None:
            raise InputError(f"{self.path}: no physical WCS (CRVAL1P/CRVAL2P) for the CCD offset")
        self.column_offset = int(c1) - 1
        self.row_offset = int(r1) - 1
        from photometry.data.calibration import FRAME_COLS, FRAME_ROWS  # the full frame
        nrow, ncol = self.shape
        if (self.row_offset + nrow <= 0 or self.row_offset >= FRAME_ROWS
                or self.column_offset + ncol <= 0 or self.column_offset >= FRAME_COLS):
            raise InputError(
                f"{self.path}: the physical WCS puts the {nrow}x{ncol} stamp at CCD row "
                f"{self.row_offset}, column {self.column_offset} (0-based), off the "
                f"{FRAME_ROWS}x{FRAME_COLS} frame: the file's geometry is wrong")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                self.reference_wcs = WCS(self._aphead, relax=True, naxis=2)
        except Exception as exc:  # noqa: BLE001 - any WCS parse failure is bad input
            raise InputError(f"{self.path}: APERTURE WCS is not readable ({exc})") from None
        _check_wcs(self.reference_wcs, self.path)
        ra = _header_value(self.header, "RA_OBJ")
        dec = _header_value(self.header, "DEC_OBJ")
        if ra is not None and dec is not None:
            x, y = self.reference_wcs.all_world2pix([float(ra)], [float(dec)], 0)
            nrow, ncol = self.shape
            off = max(-0.5 - x[0], x[0] - ncol + 0.5, -0.5 - y[0], y[0] - nrow + 0.5)
            if not np.isfinite(off) or off > max(nrow, ncol):
                raise InputError(
                    f"{self.path}: the WCS places the file's own RA_OBJ/DEC_OBJ at stamp pixel "
                    f"(row {y[0]:.0f}, column {x[0]:.0f}), off the {nrow}x{ncol} stamp: the "
                    "WCS is wrong")

    def _set_noise_and_errors(self):
        """``noise`` (:class:`photometry.data.noise.CCDNoise` of one cadence) and FLUX_ERR where the
        file lacks it.

        The read noise and NREADOUT of the PIXELS header are per cadence, but a SPOC TPF's
        EXPOSURE is the whole sector's time on source (21.2 d in the real TPF), so the
        exposure is the cadence x DEADC. Pixel errors absent, NaN or not positive where FLUX
        is finite (TICA cutouts, hand-made files) are estimated as prepare estimates an FFI's
        (``photometry.data.ffi.estimate_missing_uncert``): photons of the pixel's flux, sky
        included, plus its output's read noise; ``errors_estimated`` is their fraction (the
        ERR_EST card).
        """
        from photometry.data.noise import CCDNoise
        header = self.header.copy()
        header.extend(self._pixhead, update=True)
        deadc = _header_value(header, "DEADC")
        if deadc is not None and float(deadc) > 0:
            header["EXPOSURE"] = self.cadence * float(deadc) / 86400.0
        else:
            header.remove("EXPOSURE", ignore_missing=True)
        self.noise = CCDNoise.from_header(header, self.cadence)
        images = self._cubes["images"]
        errors = self._cubes.get("errors")
        if errors is None:
            errors = np.full(images.shape, np.nan)
        finite = np.isfinite(images)
        with np.errstate(invalid="ignore"):
            missing = finite & ~(np.isfinite(errors) & (errors > 0))
        self.errors_estimated = float(np.count_nonzero(missing) / max(finite.sum(), 1))
        if missing.any():
            columns = self.column_offset + np.arange(self.shape[1])
            estimate = np.sqrt(self.noise.pixel_variance(images, columns[None, None, :]))
            errors = np.where(missing, estimate, errors)
        self._cubes["errors"] = errors

    def _set_reference_and_motion(self):
        """Reference cadence (as the cache chooses it; also the proper-motion epoch), the
        POS_CORR translation kernel re-zeroed there, and the sum image."""
        from photometry.data.cache import choose_reference_frame
        good = TESSQualityFlags.filter(self.quality)
        if not np.any(good):
            good = np.ones(self.n_frames, dtype=bool)
        pos = self._pos
        finite = np.all(np.isfinite(pos), axis=1)
        # pos_corr as in the file (NaN kept, it goes to POS_CORR1/2); the kernel has no NaN
        self.pos_corr = pos if np.isfinite(pos).any() else None
        self.ref_frame = choose_reference_frame(
            self.time, self.quality, usable=finite if self.pos_corr is not None else None)
        if self.pos_corr is not None:
            shift = np.nan_to_num(pos - pos[self.ref_frame], nan=0.0)
            self.movement_kernel = TranslationKernel(shift[:, 0], shift[:, 1])
        else:
            self.movement_kernel = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.sumimage = np.nanmean(self._cubes["images"][good], axis=0)
        self._good = good

    def _set_pixel_flags(self, prepare_settings):
        """Saturated (and bleed) pixels per frame, by the cache's rule and settings."""
        from photometry.data.cache import pixel_flags_for
        level = float(prepare_settings["saturation_level"])
        pad = int(prepare_settings["saturation_bleed_pad"])
        self._cubes["pixel_flags"] = np.stack(
            [pixel_flags_for(frame, level, pad) for frame in self._cubes["images"]])

    # ------------------------------------------------------------------ stars
    def _pixel_position(self, ra, dec):
        """0-based CCD (row, column) of sky positions through the stamp WCS."""
        x, y = self.reference_wcs.all_world2pix(np.atleast_1d(ra), np.atleast_1d(dec), 0)
        return y + self.row_offset, x + self.column_offset

    def _read_catalog(self, catalog):
        """The user's catalog (project format), positions moved to the reference epoch."""
        if catalog is None:
            return None
        from photometry.data.catalog import apply_proper_motion, read_catalog
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            table = read_catalog(catalog)
        table["ra_J2000"], table["dec_J2000"] = table["ra"], table["dec"]
        table["ra"], table["dec"] = apply_proper_motion(table["ra_J2000"], table["dec_J2000"],
                                                        table["pmra"], table["pmdec"], 2000.0,
                                                        self.epoch)
        table["row"], table["column"] = self._pixel_position(table["ra"], table["dec"])
        return table

    def _make_target(self, starid, tmag, table):
        """The target: the catalog's row if it has the star, else the file header's values.

        Precedence: ``tmag`` argument, then the catalog, then the header (TESScut has no
        TICID or TESSMAG: pass them). Proper motion from J2000 to the reference epoch.
        """
        from photometry.data.catalog import apply_proper_motion
        head = self.header
        ticid = _header_value(head, "TICID")
        if starid is None:
            if ticid is None:
                raise InputError(f"{self.path}: no TICID in the header (a TESScut?); "
                                 "give the starid")
            starid = int(ticid)
        starid = int(starid)
        row = None
        if table is not None:
            hit = np.flatnonzero(np.asarray(table["starid"]) == starid)
            row = table[int(hit[0])] if hit.size else None
        if row is not None:
            target = {k: float(row[k]) for k in ("ra", "dec", "ra_J2000", "dec_J2000", "tmag",
                                                  "pmra", "pmdec", "teff", "row", "column")}
        else:
            if ticid is not None and int(ticid) != starid:
                raise InputError(f"{self.path}: TIC {starid} is not this file's target "
                                 f"(TICID {int(ticid)})" + ("" if table is None else
                                                            " and not in the catalog"))
            # the primary header's J2000 position (SPOC's extension headers hold it moved
            # in RA only, by proper motion to the sector)
            ra = _header_value(head, "RA_OBJ")
            dec = _header_value(head, "DEC_OBJ")
            if ra is None or dec is None:
                raise InputError(f"{self.path}: no RA_OBJ/DEC_OBJ in the header")
            pmra = float(_header_value(head, "PMRA") or 0.0)
            pmdec = float(_header_value(head, "PMDEC") or 0.0)
            ra_now, dec_now = apply_proper_motion(float(ra), float(dec), pmra, pmdec, 2000.0,
                                                  self.epoch)
            r, c = self._pixel_position(ra_now, dec_now)
            teff = _header_value(head, "TEFF")
            target = {"ra": float(ra_now), "dec": float(dec_now), "ra_J2000": float(ra),
                      "dec_J2000": float(dec), "tmag": _header_value(head, "TESSMAG") or None,
                      "pmra": pmra, "pmdec": pmdec, "teff": float(teff) if teff else np.nan,
                      "row": float(r[0]), "column": float(c[0])}
        if tmag is not None:
            target["tmag"] = float(tmag)
        if not target["tmag"] or not np.isfinite(target["tmag"]):  # TESScut writes 0.0
            raise InputError(f"{self.path}: no TESSMAG in the header; give tmag (--tmag) "
                             "or a --catalog holding the star")
        target["tmag"] = float(target["tmag"])
        return {"starid": starid, **target}

    def _make_catalog(self, table):
        """The target first, then the catalog's stars within 20 px of the stamp."""
        keys = ("starid", "ra", "dec", "ra_J2000", "dec_J2000", "tmag", "pmra", "pmdec",
                "teff", "row", "column")
        out = Table(rows=[{k: self.target[k] for k in keys}])
        if table is None:
            return out
        r0, c0 = self.row_offset, self.column_offset
        nrow, ncol = self.shape
        margin = 20.0
        row, col = np.asarray(table["row"]), np.asarray(table["column"])
        near = ((row > r0 - margin) & (row < r0 + nrow + margin) & (col > c0 - margin)
                & (col < c0 + ncol + margin)
                & (np.asarray(table["starid"]) != self.target["starid"]))
        if not near.any():
            return out
        others = table[near][list(keys)]
        return vstack([out, others])

    def catalog_table(self):
        """All known stars (the target first): starid, ra, dec, tmag, row, column (CCD 0-based)."""
        return self._catalog.copy()

    # ------------------------------------------------------------------ sky
    def _fit_sky(self, prf_spec):
        """The TESScut sky: catalog stars' PRFs and a smooth sky fitted per cadence."""
        from photometry.data.cutout_sky import fit_sky
        from photometry.data.prf import load_prf

        prf = load_prf(prf_spec, self.camera, self.ccd)
        images = self._cubes["images"]
        errors = self._cubes.get("errors")
        cat = self._catalog
        sigma = np.nanmedian(errors) if errors is not None else 1.0
        size = int(prf.default_size())
        unit = []
        for k in range(len(cat)):
            img = prf.evaluate([cat["row"][k]], [cat["column"][k]], self.shape,
                               origin=(self.row_offset, self.column_offset), size=size)
            # the target always; a neighbour once its light on the stamp is measurable
            if k == 0 or mag2flux(cat["tmag"][k]) * img.max() > sigma:
                unit.append(img)
        flags = self._cubes["pixel_flags"]
        usable = ~np.any((flags & int(PixelQualityFlags.Saturated)) != 0, axis=0)
        fit = fit_sky(images, errors, np.array(unit).reshape(-1, *self.shape), usable,
                      good=self._good)
        self.sky_fit = fit
        self.sky_source = f"sky fit ({getattr(prf, 'name', 'prf')} PRF, "\
                          f"{'plane' if fit.order else 'constant'})"
        self._cubes["backgrounds"] = fit.sky
        self._cubes["background_errors"] = fit.sky_err
        if not fit.determined:
            nrow, ncol = self.shape
            self.warnings.append((
                "SKY_UNDETERMINED",
                f"{self.path.name}: the sky is not separable from the stars on this "
                f"{nrow}x{ncol} cutout ({fit.n_sky_pixels} sky-dominated pixels; fitted "
                f"{fit.level:.0f} e-/s per pixel, which includes starlight the PRF model "
                "lacks): the flux level is uncertain, use a larger cutout"))

    @property
    def background_pixels(self):
        """(r, c) bool: the pixels that set the sky (APERTURE bit 4), None for FLUX_BKG."""
        return None if self.sky_fit is None else self.sky_fit.sky_pixels

    @property
    def spoc_aperture(self):
        """(r, c) bool: SPOC's optimal photometric aperture (APERTURE bit 2)."""
        return (self.aperture & 2) != 0

    def stamp(self, name, row_slice, col_slice):
        """(N, r, c) slice of a cube: images (including the sky), errors, backgrounds,
        background_errors, pixel_flags.

        Raises KeyError for a cube the file does not have.
        """
        if name not in self._cubes:
            raise KeyError(f"{self.path.name}: no '{name}' cube")
        return self._cubes[name][:, row_slice, col_slice]

    def model_group(self, name):
        """TPFs carry no prepare-stage models."""
        return None
