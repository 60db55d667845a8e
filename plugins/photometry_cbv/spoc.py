"""SPOC co-trending basis vector (CBV) files: reading them, and writing ours in their format.

SPOC's layout (``tess2019085135100-s0010-2-4-0140-s_cbv.fits``, lightkurve's test data, and
lightkurve's ``TessCotrendingBasisVectors.from_hdu``): a primary header with TELESCOP 'TESS' and
SECTOR; extensions ``CBV.single-scale.{camera}.{ccd}``, ``CBV.multiscale-band-{b}.{camera}.{ccd}``
and ``CBV.spike.{camera}.{ccd}``, each a table TIME (BTJD), CADENCENO, GAP (bool),
VECTOR_1..VECTOR_n, with CAMERA and CCD in the extension header. We read the single-scale
vectors; we write ours as a single-scale extension, so that lightkurve's
``load_tess_cbvs(cbv_dir=..., cbv_type="SingleScale")`` reads them.
"""
import numpy as np
from astropy.io import fits

from photometry import InputFile

__all__ = ["cbv_input", "read_cbvs", "cbv_hdulist", "vectors_on"]


def _extname(camera, ccd):
    return f"CBV.single-scale.{int(camera)}.{int(ccd)}"


def cbv_input(folder, sector, camera, ccd):
    """The CBV file of a CCD in ``folder`` (name containing ``-s{sector:04d}-{camera}-{ccd}-``,
    as SPOC's and lightkurve's), as the :class:`photometry.InputFile` the core finds and reads
    (a ``folder`` that does not exist is a ConfigurationError naming ``cbv.spoc_cbv_dir``)."""
    return InputFile(str(folder), f"*s{int(sector):04d}-{int(camera)}-{int(ccd)}-*.fits*",
                     "cbv.spoc_cbv_dir")


def read_cbvs(cbv, sector, camera, ccd):
    """(time, cadenceno, gap, vectors (k, M)) of the single-scale CBVs of a CBV file read by
    the core (a :class:`photometry.FitsTables`).

    Raises
    ------
    ValueError
        If the file is not a TESS CBV file of that sector, camera and CCD.
    """
    path, head = cbv.path, cbv.header
    if str(head.get("TELESCOP", "")).strip() != "TESS":
        raise ValueError(f"{path}: not a TESS file (TELESCOP {head.get('TELESCOP')!r})")
    if int(head.get("SECTOR", -1)) != int(sector):
        raise ValueError(f"{path}: sector {head.get('SECTOR')}, not {sector}")
    name = _extname(camera, ccd)
    if name not in cbv:
        raise ValueError(f"{path}: no extension {name}")
    data = cbv.table(name)
    cols = [c for c in data if c.upper().startswith("VECTOR_")]
    cols.sort(key=lambda c: int(c.split("_")[1]))
    vectors = np.array([np.asarray(data[c], dtype=float) for c in cols])
    n = len(data["TIME"])
    gap = np.asarray(data["GAP"], dtype=bool) if "GAP" in data else np.zeros(n, bool)
    return (np.asarray(data["TIME"], dtype=float), np.asarray(data["CADENCENO"], int),
            gap, vectors)


def vectors_on(time, cadence_s, cbv_time, cbv_gap, vectors):
    """CBVs averaged over each of our exposures (``time`` mid-times, ``cadence_s`` long).

    SPOC's CBVs are sampled at their own cadence (2 min, 20 s, or an FFI cadence); a 30-min
    exposure sees the mean of the samples inside it. Exposures with no sample get the linear
    interpolation. Returns (k, N), each vector normalised to unit length.
    """
    ok = np.isfinite(cbv_time) & ~np.asarray(cbv_gap, bool) & np.all(np.isfinite(vectors), 0)
    t, v = cbv_time[ok], vectors[:, ok]
    half = cadence_s / 86400.0 / 2.0
    lo = np.searchsorted(t, time - half)
    hi = np.searchsorted(t, time + half)
    c = np.concatenate([np.zeros((v.shape[0], 1)), np.cumsum(v, axis=1)], axis=1)
    count = hi - lo
    out = np.empty((v.shape[0], time.size))
    has = count > 0
    out[:, has] = (c[:, hi[has]] - c[:, lo[has]]) / count[has]
    for k in range(v.shape[0]):
        out[k, ~has] = np.interp(time[~has], t, v[k])
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norm > 0, norm, 1.0)


def cbv_hdulist(vectors, time, cadenceno, gap, sector, camera, ccd, meta=()):
    """Our vectors (k, N) as a SPOC-format CBV file (single-scale extension)."""
    primary = fits.PrimaryHDU()
    for key, value, comment in [("ORIGIN", "tessphot", "institution responsible for this file"),
                                ("CREATOR", "tessphot CbvExporter", "program used"),
                                ("TELESCOP", "TESS", "telescope"),
                                ("INSTRUME", "TESS Photometer", "detector type"),
                                ("SECTOR", int(sector), "Observing sector"), *meta]:
        primary.header[key] = (value, comment)
    cols = [fits.Column("TIME", "D", unit="BJD - 2457000, days", array=time),
            fits.Column("CADENCENO", "J", array=np.asarray(cadenceno, np.int32)),
            fits.Column("GAP", "L", array=np.asarray(gap, bool))]
    cols += [fits.Column(f"VECTOR_{k + 1}", "E", array=vectors[k])
             for k in range(vectors.shape[0])]
    table = fits.BinTableHDU.from_columns(cols, name=_extname(camera, ccd))
    for key, value, comment in [("INHERIT", True, "inherit the primary header"),
                                ("CAMERA", int(camera), "Camera number"),
                                ("CCD", int(ccd), "CCD chip number"),
                                ("CBVVALID", 1, "nonzero if basis vectors are valid"),
                                ("TIMESYS", "TDB", "time system"),
                                ("BJDREFI", 2457000, "integer part of BTJD reference date"),
                                ("BJDREFF", 0.0, "fraction of the day in reference date")]:
        table.header[key] = (value, comment)
    return fits.HDUList([primary, table])
