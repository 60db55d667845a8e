"""The sky under a target's stamp: the data source's own (a TPF's FLUX_BKG or TESScut fit),
the configured ``photometry.background`` model evaluated on the stamp, or the local estimate
from the source-free pixels around it."""
import warnings

import numpy as np

from photometry.core.stamps import clip_stamp
from photometry.core.target_catalog import query_catalog
from photometry.data.sources import IMAGES, TPF_BACKGROUNDS, TPF_BACKGROUND_ERRORS
from photometry.hooks.errors import UnprocessableTarget
from photometry.hooks.quality import TESSQualityFlags

__all__ = ["local_background", "background_model", "backgrounds_cube", "backgrounds_err_cube",
           "background_pixels_used", "stamp_sumimage", "nanmean0"]


def nanmean0(values):
    """``np.nanmean(values, axis=0)``, the same numbers; ``np.mean`` when there is no NaN.

    Why: ``np.nanmean`` copies the cube to zero its NaNs and counts them; without NaNs it
    is the same sum over the same layout divided by the same count (issue 15: ~1 ms a cube
    of 1 282 cadences).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.shape[0] and not np.isnan(values).any():
        return np.mean(values, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=0)


def local_background(phot):
    """Fallback background: per-frame sigma-clipped median of source-free pixels.

    Why: without a CCD-wide background model the sky under a stamp is best estimated from
    the pixels around it that hold no star. The region is the stamp grown by
    ``photometry.local_background_margin`` pixels (one read); pixels are excluded if they
    lie within a Tmag-dependent radius of a catalog star or are bright in the sum image
    (above the sigma-clipped sum-image median by ``local_background_threshold`` sigma).
    Each frame's background is one number (flat over the stamp) with error
    ``1.253 * std / sqrt(n)`` (the error of a median).
    """
    from astropy.stats import sigma_clipped_stats

    margin = int(phot.psettings["local_background_margin"])
    r1, r2, c1, c2 = phot._stamp
    region = clip_stamp((r1 - margin, r2 + margin, c1 - margin, c2 + margin),
                        phot._limits())
    rs, cs = phot._slices(region)
    sumimg = np.asarray(phot.source.sumimage[rs, cs], dtype=float)
    mask = ~np.isfinite(sumimg)
    _, med, std = sigma_clipped_stats(sumimg[~mask], sigma=3.0, maxiters=5)
    thresh = float(phot.psettings["local_background_threshold"])
    mask |= sumimg > med + thresh * std
    # Stars: a disc whose radius grows with brightness (2 px at Tmag 12, +1 px / mag).
    rr, cc = np.mgrid[region[0]:region[1], region[2]:region[3]]
    stars = query_catalog(phot,
        '"row" >= ? AND "row" <= ? AND "column" >= ? AND "column" <= ?',
        (region[0] - 10, region[1] + 10, region[2] - 10, region[3] + 10))
    for star in stars:
        radius = float(np.clip(2.0 + (12.0 - float(star["tmag"])), 1.5, 20.0))
        mask |= (rr - float(star["row"])) ** 2 + (cc - float(star["column"])) ** 2 \
            <= radius ** 2
    if np.count_nonzero(~mask) < int(phot.psettings["local_background_min_pixels"]):
        raise UnprocessableTarget(
            f"TIC {phot.starid}: only {np.count_nonzero(~mask)} source-free pixels for "
            f"the local background (need {phot.psettings['local_background_min_pixels']})")
    cube = np.asarray(phot._read(IMAGES, region), dtype=float)
    pixels = cube[:, ~mask]  # (N, npix)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, med, std = sigma_clipped_stats(pixels, sigma=3.0, maxiters=5, axis=1)
    n = np.sum(np.isfinite(pixels), axis=1)
    err = 1.2533 * np.asarray(std) / np.sqrt(np.maximum(n, 1))
    used = np.zeros((r2 - r1, c2 - c1), dtype=bool)
    used[:] = ~mask[r1 - region[0]:r2 - region[0], c1 - region[2]:c2 - region[2]]
    phot.details["background"] = "local"
    return np.asarray(med, dtype=float), err, used


def background_model(phot):
    """(class, group) of the configured BackgroundModel if its state is in the cache.

    Looked up once per object (the HDF5 group and its attributes cost ~0.1 ms a look-up,
    and the cubes, the sum image and the APERTURE image each ask).
    """
    memo = phot.__dict__.get("_background_model_memo")
    if memo is not None:
        return memo[0]
    name = phot.psettings.get("background", "")
    model = None
    if name and phot.datasource != "tpf":
        group = phot.source.model_group(name) if hasattr(phot.source, "model_group") else None
        if group is not None:
            from photometry.data.stages import background_model_class
            model = background_model_class(name), group
    phot.__dict__["_background_model_memo"] = (model,)
    return model


def _full_cube(values, shape):
    """``values`` broadcast to ``shape`` as a float64 array of its own (no copy of an array
    that already has that shape and was made for this call)."""
    values = np.asarray(values)
    if values.shape == tuple(shape) and values.dtype == np.float64 and values.base is None \
            and values.flags.writeable and values.flags.c_contiguous:
        return values
    return np.broadcast_to(np.asarray(values, dtype=np.float64), shape).copy()


def backgrounds_cube(phot):
    """(N, r, c) sky background (e-/s) under each stamp pixel.

    TPF: the source's sky (SPOC's FLUX_BKG, or the TESScut sky fit of ``photometry.data.tpf``).
    Cache: the ``photometry.background`` model if its state is in the cache
    (``BackgroundModel.evaluate``), otherwise the local estimate (``_background_local``).
    """
    if phot.datasource == "tpf":
        phot.details["background"] = getattr(phot.source, "sky_source", "FLUX_BKG")
        return np.asarray(phot._read(TPF_BACKGROUNDS), dtype=np.float64)
    model = phot._background_model()
    shape = phot._raw_images.shape
    if model is not None:
        cls, group = model
        rs, cs = phot._slices()
        bkg = cls.evaluate(group, rs, cs, phot._frames)
        phot.details["background"] = cls.name
        return _full_cube(bkg, shape)
    level, _, _ = phot._background_local
    return np.broadcast_to(level[:, None, None], shape).copy()


def backgrounds_err_cube(phot):
    """(N, r, c) 1-sigma uncertainty of ``backgrounds_cube`` (e-/s)."""
    shape = phot._raw_images.shape
    if phot.datasource == "tpf":
        try:
            return np.asarray(phot._read(TPF_BACKGROUND_ERRORS), dtype=np.float64)
        except KeyError:
            return np.zeros(shape)
    model = phot._background_model()
    if model is not None:
        cls, group = model
        rs, cs = phot._slices()
        try:
            err = cls.evaluate_error(group, rs, cs, phot._frames)
        except NotImplementedError:
            return np.zeros(shape)
        return _full_cube(err, shape)
    _, err, _ = phot._background_local
    return np.broadcast_to(err[:, None, None], shape).copy()


def background_pixels_used(phot):
    """(r, c) bool: stamp pixels used to estimate the background (APERTURE bit 4)."""
    if phot.datasource == "tpf":
        used = getattr(phot.source, "background_pixels", None)
        return None if used is None else np.asarray(used)[phot._slices()]
    if phot._background_model() is not None:
        return None
    return phot._background_local[2]


def stamp_sumimage(phot):
    """(r, c) mean background-subtracted image over good frames.

    Cache: the cached sum image minus the mean background of the good frames (so it is
    on the same scale as ``images_cube``); TPF: the mean of ``images_cube`` over frames
    passing ``TESSQualityFlags.DEFAULT_BITMASK``.
    """
    good = TESSQualityFlags.filter(phot.quality)
    if not np.any(good):
        good = np.ones(phot.n_frames, dtype=bool)
    if phot.datasource == "tpf":
        return nanmean0(phot.images_cube[good])
    rs, cs = phot._slices()
    img = np.asarray(phot.source.sumimage[rs, cs], dtype=np.float64)
    return img - nanmean0(phot.backgrounds_cube[good])
