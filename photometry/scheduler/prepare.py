"""``tessphot prepare FFI_DIR --catalog CATALOG --cache CACHE_DIR``: build one CCD's cache.

Steps: discover the FFIs (calibrated ``*_ffic``, or raw ``*_ffir`` calibrated on the fly with
``--calibration-models``), check their headers form one series, stream every frame into the
HDF5 cache (measuring the movement-kernel stars on the way), fit the movement kernel, run the
prepare-stage plugins named in ``prepare.stages``, import the catalog into the per-CCD SQLite,
and rename the cache into place. Killed at any point, the same command resumes.

Set the environment variable ``TESSPHOT_PREPARE_FRAME_DELAY`` (seconds) to slow ingest down
per frame: the crash-and-resume test uses it to kill prepare half-way.
"""
import logging
import os
import time as _time
from pathlib import Path

import numpy as np

from photometry.data.cache import CacheWriter, FFICache, cache_filename, catalog_filename
from photometry.hooks.errors import InputError
from photometry.hooks.settings import load_settings

__all__ = ["add_arguments", "run", "prepare", "kernel_star_candidates", "catalog_pixels",
           "preview_context"]

logger = logging.getLogger(__name__)


def add_arguments(parser):
    from photometry.hooks.commandline import add_settings_arguments
    parser.add_argument("ffi_dir", metavar="FFI_DIR", help="folder with the FFIs of one CCD")
    parser.add_argument("--catalog", required=True, metavar="CATALOG",
                        help="CSV, ECSV or FITS table: starid, ra, dec, tmag[, pmra, pmdec, teff]")
    parser.add_argument("--cache", required=True, metavar="CACHE_DIR",
                        help="folder for the HDF5 cache and the catalog SQLite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a complete cache made from other inputs or settings")
    parser.add_argument("--calibration-models", metavar="DIR", default=None,
                        help="calibration model files, needed when FFI_DIR holds raw *_ffir frames")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_settings_arguments(parser)


def run(args):
    settings = load_settings(args.settings, args.assignments)
    path, state = prepare(args.ffi_dir, args.catalog, args.cache, settings,
                          overwrite=args.overwrite, calibration_models=args.calibration_models,
                          progress=not args.no_progress)
    if state == "complete":
        print(f"{path}: already complete with the same inputs and settings; nothing to do")
    elif state == "resume":
        print(f"{path}: written (resumed an interrupted prepare)")
    else:
        print(f"{path}: written")
    return 0


def _discover(ffi_dir, calibration_models):
    """(paths, raw?) of the FFIs in ``ffi_dir``."""
    from photometry.data.ffi import find_ffi_files
    try:
        return find_ffi_files(ffi_dir), False
    except InputError as calibrated_error:
        try:
            paths = find_ffi_files(ffi_dir, raw=True)
        except InputError:
            raise calibrated_error from None
    if calibration_models is None:
        raise InputError(f"{ffi_dir}: holds raw *_ffir FFIs; give --calibration-models DIR")
    return paths, True


def catalog_pixels(catalog, wcs, time_btjd, shape):
    """(column, row) cube pixels of every catalog star through a frame's WCS, proper motion
    applied to the frame's epoch; NaN for stars far off the frame."""
    from photometry.data.catalog import apply_proper_motion, btjd_to_epoch
    ra = np.asarray(catalog["ra"], float)
    dec = np.asarray(catalog["dec"], float)
    pmra = np.nan_to_num(np.asarray(catalog["pmra"], float)) if "pmra" in catalog.colnames \
        else np.zeros_like(ra)
    pmdec = np.nan_to_num(np.asarray(catalog["pmdec"], float)) if "pmdec" in catalog.colnames \
        else np.zeros_like(ra)
    ra, dec = apply_proper_motion(ra, dec, pmra, pmdec, from_epoch=2000.0,
                                  to_epoch=btjd_to_epoch(time_btjd))
    # cheap pre-filter: stars within the frame's radius (plus margin) of its centre
    nrow, ncol = shape
    centre = wcs.pixel_to_world_values((ncol - 1) / 2.0, (nrow - 1) / 2.0)
    corner = wcs.pixel_to_world_values(-10.0, -10.0)
    radius = _sep(centre[0], centre[1], corner[0], corner[1]) * 1.2
    near = _sep(centre[0], centre[1], ra, dec) < radius
    col = np.full(ra.size, np.nan)
    row = np.full(ra.size, np.nan)
    if near.any():
        c, r = wcs.all_world2pix(ra[near], dec[near], 0)
        col[near], row[near] = c, r
    return col, row


def kernel_star_candidates(catalog, wcs, time_btjd, shape, pset, image=None):
    """Kernel stars of a frame: (starid, column, row) in cube pixels of that frame's WCS.

    Catalog positions are moved by proper motion to the frame's epoch, projected with the
    frame's WCS (:func:`catalog_pixels`) and filtered by
    :func:`photometry.data.movement.select_kernel_stars`.
    """
    from photometry.data.movement import select_kernel_stars
    col, row = catalog_pixels(catalog, wcs, time_btjd, shape)
    tmag = np.asarray(catalog["tmag"], float)
    pick = select_kernel_stars(
        col, row, tmag, shape, n_max=int(pset["kernel_stars"]),
        tmag_min=float(pset["kernel_tmag_min"]), tmag_max=float(pset["kernel_tmag_max"]),
        box=int(pset["kernel_box"]), isolation=float(pset["kernel_isolation"]),
        contrast=float(pset["kernel_contrast"]), image=image,
        saturation=float(pset["saturation_level"]))
    return np.asarray(catalog["starid"], np.int64)[pick], col[pick], row[pick]


def _sep(ra1, dec1, ra2, dec2):
    """Angular separation in degrees (haversine, vectorised)."""
    r1, d1, r2, d2 = (np.radians(np.asarray(v, float)) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1))))


def _kernel_stars(frame, later_paths, catalog, shape, pset):
    """(starid, column, row) of the movement-kernel stars, picked on the first usable frame.

    The first frame is normally it; when it fails the frame checks (or has no WCS), the
    following files are read one by one until one passes (a calibrated folder only), but
    not past half of the folder: a folder with more unusable frames is refused anyway.
    """
    from photometry.data.cache import check_frame
    from photometry.data.ffi import read_ffi
    later_paths = later_paths[:(len(later_paths) + 1) // 2]
    for candidate in _chain_frames([frame], later_paths, read_ffi):
        if candidate.wcs is not None and not check_frame(candidate.image):
            starid, col, row = kernel_star_candidates(catalog, candidate.wcs, candidate.time,
                                                      shape, pset, image=candidate.image)
            logger.info("movement kernel: %d stars (picked on %s)", starid.size,
                        candidate.path.name)
            return starid, col, row
    logger.info("%s: no usable frame with a WCS among the first; the movement kernel is not "
                "measured", frame.path.parent)
    return np.empty(0, np.int64), np.empty(0), np.empty(0)


def preview_context(paths, catalog, shape, settings, time, *, raw=False,
                    calibration_models=None):
    """:class:`photometry.data.stages.StreamContext` for streaming prepare stages.

    The full-sector sum image exists only after ingest; streaming stages get instead the
    mean of up to ``prepare.preview_frames`` frames spread evenly over the sector (those
    passing the frame checks and ``TESSQualityFlags.DEFAULT_BITMASK``, as the sum image;
    any usable one if none passes), trimmed exactly as the cache stores them, the mean of
    their uncertainties, the pixel flags of the one nearest the middle of the sector and
    the catalog through that frame's WCS. Deterministic, so a resumed prepare gets the same.
    None when no preview frame is usable (ingest then refuses a mostly unusable folder, or
    the streaming stages run as a second pass).
    """
    from photometry.data.cache import check_frame, pixel_flags_for, trim_precision
    from photometry.data.ffi import read_ffi
    from photometry.hooks.quality import TESSQualityFlags
    from photometry.data.stages import StreamContext
    pset = settings["prepare"]
    n = len(paths)
    m = max(1, min(int(pset["preview_frames"]), n))
    pick = np.unique(np.round(np.linspace(0, n - 1, m)).astype(int))
    if raw:
        from photometry.data.calibration import calibrate_frames
        frames = calibrate_frames([paths[i] for i in pick], calibration_models, settings)
    else:
        frames = (read_ffi(paths[i]) for i in pick)
    sums = {True: [np.zeros(shape), np.zeros(shape, np.int32)],
            False: [np.zeros(shape), np.zeros(shape, np.int32)]}
    err_sum, err_count = np.zeros(shape), np.zeros(shape, np.int32)
    middle, best, used = None, np.inf, 0
    mid_time = 0.5 * (float(np.nanmin(time)) + float(np.nanmax(time)))
    for frame in frames:
        if check_frame(frame.image):
            continue
        image = np.array(frame.image, np.float32)
        errors = np.array(frame.uncert, np.float32)
        trim_precision(image[None], errors[None], float(pset["precision"]))
        good = bool(TESSQualityFlags.filter(np.array([frame.quality]))[0])
        # masked in place (``where=``): the same float64 sums as ``total[ok] += image[ok]``
        # without its gathers and scatters (17 -> 7.6 ms per sum of a full frame)
        ok = np.isfinite(image)
        total, count = sums[good]
        np.add(total, image, out=total, where=ok)
        count += ok
        ok = np.isfinite(errors)
        np.add(err_sum, errors, out=err_sum, where=ok)
        err_count += ok
        used += 1
        if frame.wcs is not None and abs(frame.time - mid_time) < best:
            best = abs(frame.time - mid_time)
            flags = pixel_flags_for(image, float(pset["saturation_level"]),
                                    int(pset["saturation_bleed_pad"]))
            middle = (frame.wcs, frame.time, flags)
    if not used:
        return None
    total, count = sums[True] if sums[True][1].any() else sums[False]
    with np.errstate(invalid="ignore", divide="ignore"):
        image = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        errors = np.where(err_count > 0, err_sum / np.maximum(err_count, 1), np.nan)
    stars, flags = None, np.zeros(shape, np.uint8)
    if middle is not None:
        wcs, t_mid, flags = middle
        col, row = catalog_pixels(catalog, wcs, t_mid, shape)
        keep = np.isfinite(col) & np.isfinite(row)
        stars = (row[keep], col[keep], np.asarray(catalog["tmag"], float)[keep])
    return StreamContext(shape=tuple(shape), n_frames=n, time=np.asarray(time, float),
                         preview_image=image, preview_errors=errors, preview_flags=flags,
                         n_preview=used, catalog=stars, filename=str(paths[0]),
                         time_chunk=int(pset["time_chunk"]))


def _chain_frames(first, later_paths, read_ffi):
    yield from first
    for path in later_paths:
        try:
            yield read_ffi(path)
        except InputError:
            continue


def _wcs_text(wcs):
    if wcs is None:
        return ""
    return wcs.to_header(relax=True).tostring(sep="\n")


def _write_catalog(catalog, cache_dir, meta, reference_wcs, reference_time, shape, pset):
    from photometry.data.catalog import write_catalog_sqlite
    path = Path(cache_dir) / catalog_filename(meta["sector"], meta["camera"], meta["ccd"])
    write_catalog_sqlite(catalog, path, reference_wcs, meta["row_offset"],
                         meta["column_offset"], shape, meta["sector"], meta["camera"],
                         meta["ccd"], reference_time, float(pset["catalog_margin"]))
    return path


def _stage_classes(settings, pm):
    names = list(settings["prepare"]["stages"])
    if not names:
        return {}
    from photometry.hooks.plugins import default_plugin_manager, lookup
    pm = pm or default_plugin_manager()
    return {name: lookup(pm, "register_prepare_stages", name) for name in names}


def prepare(ffi_dir, catalog_path, cache_dir, settings=None, *, overwrite=False,
            calibration_models=None, progress=True, pm=None):
    """Build (or resume, or confirm) the cache of the CCD whose FFIs are in ``ffi_dir``.

    Returns
    -------
    path : Path
        The complete cache.
    state : str
        "new", "resume" (an interrupted prepare was continued) or "complete" (nothing to do).

    Raises
    ------
    InputError
        Bad folder, FFIs, catalog, calibration models, or a conflicting existing cache.
    """
    from tqdm import tqdm

    from photometry.data.catalog import read_catalog
    from photometry.data.ffi import read_ffi, scan_ffi_headers

    settings = settings if settings is not None else load_settings()
    pset = settings["prepare"]
    paths, raw = _discover(ffi_dir, calibration_models)
    catalog = read_catalog(catalog_path)
    stages = _stage_classes(settings, pm)
    headers = scan_ffi_headers(paths, progress=progress)
    paths = [h.path for h in headers]
    first = headers[0]
    meta = {"sector": first.sector, "camera": first.camera, "ccd": first.ccd,
            "cadence": float(first.cadence_s), "data_rel": first.data_rel,
            "procver": first.procver, "row_offset": first.row_offset,
            "column_offset": first.column_offset, "raw_input": bool(raw)}
    shape = first.shape
    cache_dir = Path(cache_dir)
    path = cache_dir / cache_filename(first.sector, first.camera, first.ccd)
    versions = {name: str(cls.version) for name, cls in stages.items()}
    writer = CacheWriter(path, settings, ffi_files=paths, shape=shape, meta=meta,
                         overwrite=overwrite, plugin_versions=versions)
    if writer.state == "complete":
        cat_path = cache_dir / catalog_filename(first.sector, first.camera, first.ccd)
        if not cat_path.exists():
            with FFICache(path) as cache:
                _write_catalog(catalog, cache_dir, meta, cache.reference_wcs,
                               float(cache.time[cache.ref_frame]), shape, pset)
        return path, "complete"

    state = writer.state
    try:
        pending = [(name, cls(settings)) for name, cls in stages.items()
                   if not (writer.stage_complete(name) and writer.file[f"models/{name}"]
                           .attrs.get("version") == str(cls.version))]
        streaming = [(name, stage) for name, stage in pending if stage.streaming]
        if streaming:
            # one pass: these stages fit every block while ingest has it in memory (a
            # resumed prepare replays the blocks already stored)
            context = preview_context(paths, catalog, shape, settings,
                                      [h.time for h in headers], raw=raw,
                                      calibration_models=calibration_models)
            if context is None:
                logger.info("%s: no usable frame among the preview frames; the streaming "
                            "stages run as a second pass after ingest", ffi_dir)
                streaming = []
            for name, stage in streaming:
                logger.info("prepare stage %s (streaming, preview of %d frames)", name,
                            context.n_preview)
                stage.begin(context, writer.stage_group(name, stage.version))
                writer.replay_blocks(stage.add_block)
                writer.add_block_consumer(stage.add_block)
        done = writer.frames_done
        todo = paths[done:]
        if raw:
            from photometry.data.calibration import calibrate_frames
            frames = calibrate_frames(todo, calibration_models, settings)
        else:
            # each frame read straight into the cache writer's block buffer
            frames = (read_ffi(p, out=writer.next_frame_buffers()) for p in todo)
        delay = float(os.environ.get("TESSPHOT_PREPARE_FRAME_DELAY", 0) or 0)
        bar = tqdm(total=len(paths), initial=done, desc="prepare", unit="frame",
                   disable=not progress or None)
        for index, frame in enumerate(frames, start=done):
            expected = headers[index]
            if frame.time != expected.time or frame.shape != shape:
                raise InputError(f"{frame.path}: changed while prepare was reading the folder")
            if writer.kernel_stars is None:
                later = [] if raw else paths[index + 1:]
                writer.set_kernel_stars(*_kernel_stars(frame, later, catalog, shape, pset))
            writer.add_frame(frame.image, frame.uncert, time=frame.time,
                             time_start=frame.tstart, time_stop=frame.tstop,
                             timecorr=frame.timecorr, cadenceno=frame.cadenceno,
                             quality=frame.quality, wcs_header=_wcs_text(frame.wcs),
                             errors_estimated=frame.uncert_estimated,
                             noise_defaulted=frame.noise_defaulted)
            bar.update(1)
            if delay:
                _time.sleep(delay)
        bar.close()
        writer.finish_ingest()

        # the catalog SQLite first: prepare stages (e.g. backdrop's star mask) read it
        f = writer.file
        ref = int(f.attrs["ref_frame"])
        from astropy.io import fits
        from astropy.wcs import WCS
        text = f["wcs"].asstr()[ref]
        ref_wcs = WCS(fits.Header.fromstring(text, sep="\n"), relax=True) if text else None
        if ref_wcs is None:
            raise InputError(f"{paths[ref]}: the reference frame has no WCS")
        _write_catalog(catalog, cache_dir, meta, ref_wcs, float(f["time"][ref]), shape, pset)

        for name, stage in streaming:
            stage.finish(writer, writer.file[f"models/{name}"])
            writer.mark_stage_complete(name)
        streamed = {name for name, _ in streaming}
        for name, stage in pending:
            if name in streamed:
                continue
            logger.info("prepare stage %s", name)
            group = writer.stage_group(name, stage.version)
            stage.run(writer, group)
            writer.mark_stage_complete(name)

        writer.close(complete=True)
    finally:
        writer.close(complete=False)
    return path, state
