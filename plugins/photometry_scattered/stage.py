"""The ``scattered_light`` prepare stage: build the cube from the cached frames in one pass."""
import logging

import numpy as np
from tqdm import tqdm

from photometry import (BackgroundModel, cache_catalog, ConfigurationError, InputError,
                        PrepareStage)

from .cube import CubeBuilder, bin_time, column_gain, mask_layers, relax_mask, write_group

__all__ = ["ScatteredLightCube", "build_cube", "options"]

logger = logging.getLogger(__name__)

_POSITIVE = ("bin_size", "min_pixels", "star_nsigma", "saturation", "catalog_radius",
             "n_dark", "gap_factor", "strap_nsigma", "flag_level", "flag_rate", "flag_error")


def options(settings):
    """The ``[scattered_light]`` section, checked where it is given."""
    try:
        s = dict(settings["scattered_light"])
    except (KeyError, TypeError):
        raise ConfigurationError("settings: missing section [scattered_light]") from None
    for key in _POSITIVE:
        if not float(s[key]) > 0:
            raise ConfigurationError(f"scattered_light.{key}: must be > 0 (got {s[key]!r})")
    if float(s["time_bin"]) < 0:
        raise ConfigurationError("scattered_light.time_bin: must be >= 0 (0 = no binning)")
    if not float(s.get("catalog_max_radius", 40.0)) > 0:
        raise ConfigurationError("scattered_light.catalog_max_radius: must be > 0")
    if not float(s.get("relax_nsigma", 10.0)) > 0:
        raise ConfigurationError("scattered_light.relax_nsigma: must be > 0")
    if not float(s.get("catalog_nsigma", 1.0)) >= 0:
        raise ConfigurationError("scattered_light.catalog_nsigma: must be >= 0")
    if not 0 <= float(s.get("min_bin_fraction", 0.5)) <= 1:
        raise ConfigurationError("scattered_light.min_bin_fraction: must be in [0, 1]")
    if s.get("interpolation", "cubic") not in ("cubic", "linear"):
        raise ConfigurationError("scattered_light.interpolation: must be 'cubic' or 'linear'")
    return s


def resolve_reference(settings, s, f):
    """Name of the background model the cube is built on top of ("none" = total sky)."""
    ref = str(s["reference"])
    if ref == "none":
        return "none"
    if ref == "auto":
        ref = str(settings.get("photometry", {}).get("background", "") or "")
        if not ref:
            return "none"
        g = f.get(f"models/{ref}")
        if g is None or not bool(g.attrs.get("complete", False)):
            return "none"
    g = f.get(f"models/{ref}")
    if g is None or not bool(g.attrs.get("complete", False)):
        raise ConfigurationError(f"scattered_light.reference = '{ref}': that prepare stage "
                                 "has not run before scattered_light (order prepare.stages)")
    return ref


def build_cube(blocks, shape, time, settings, *, sumimage=None, catalog=None, ref_flags=None,
               row_offset=0, column_offset=44, cadenceno=None, quality=None, reference=None,
               ids=None, meta=None, progress=False):
    """Build an :class:`SLCube` from ``(frame_slice, images, errors, flags)`` blocks.

    The array entry point (tests, TPF/TESScut cubes, benchmarks); the prepare stage calls it
    with the cache's blocks. ``sumimage`` (default: the mean of the blocks, a second pass)
    gives the star mask and the column gains; ``reference(frame_slice)`` returns the model
    image block subtracted before binning; ``ids`` sets the cube's ``reference``, ``sector``,
    ``camera``, ``ccd``.
    """
    s = options(settings) if "scattered_light" in settings else settings
    n_frames = len(time)
    blocks = list(blocks) if sumimage is None else blocks
    if sumimage is None:
        total = np.zeros(shape)
        count = np.zeros(shape)
        for _, images, _, _ in blocks:
            ok = np.isfinite(images)
            total += np.where(ok, images, 0).sum(axis=0)
            count += ok.sum(axis=0)
        sumimage = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    b, need = int(s["bin_size"]), int(s["min_pixels"])
    top = float(s.get("relax_nsigma", 10.0))
    # the column gains first, from the (relaxed) mask without catalog discs: the discs'
    # low threshold would take the straps themselves; then the discs on the gain-corrected
    # sum image
    strict, hard, score = mask_layers(sumimage, s, None, ref_flags)
    mask, _ = relax_mask(strict, hard, score, b, need, top)
    gain, strap = column_gain(sumimage, mask, s)
    if catalog is not None:
        strict, hard, score = mask_layers(sumimage, s, catalog, ref_flags, gain)
    if bool(s["mask_straps"]) and strap.any():
        strict = strict | (np.convolve(strap.astype(int), np.ones(3), mode="same")[None, :] > 0)
    mask, relaxed = relax_mask(strict, hard, score, b, need, top)
    if mask.all() and hard.all():
        raise InputError("scattered-light cube: every pixel is non-finite, flagged bad or "
                         "saturated; nothing left to measure the sky")
    count = _bin_counts(mask, b)
    if not (count >= need).any():
        # a field that is all bright-star halo: use its faintest pixels whatever they are
        mask, relaxed = relax_mask(strict, hard, score, b, need, np.inf)
        count = _bin_counts(mask, b)
    if not (count >= need).any():
        # no bin can have min_pixels (tiny or mostly unusable field): the best one decides
        # (half of what the fullest bin has, or its strict count if more; its faintest pixels)
        low = int(max(_bin_counts(strict, b).max(), -(-count.max() // 2), 1))
        s = dict(s, min_pixels=low)
        mask, relaxed = relax_mask(strict, hard, score, b, low, np.inf)
        logger.warning("scattered light: no bin has %d usable pixels; min_pixels lowered to %d",
                       need, s["min_pixels"])
    if strict.mean() > 0.9 or relaxed.any():
        logger.info("scattered light: strict mask %.0f%% of the pixels; %d bins measured on "
                    "their faintest pixels instead", 100 * strict.mean(),
                    int((relaxed > 0).sum()))
    builder = CubeBuilder(shape, row_offset, column_offset, mask, gain, s)
    bar = tqdm(total=n_frames, desc="scattered light", unit="frame", leave=False,
               disable=not progress or None)
    sub = 8
    for sl, images, errors, flags in blocks:
        for k in range(0, sl.stop - sl.start, sub):
            part = slice(sl.start + k, min(sl.start + k + sub, sl.stop))
            local = slice(k, k + part.stop - part.start)
            refimg = reference(part) if reference is not None else None
            builder.add(images[local], None if flags is None else flags[local], refimg,
                        None if errors is None else errors[local])
            bar.update(part.stop - part.start)
    bar.close()
    meta = dict(meta or {})
    meta.update(mask_fraction=float(mask.mean()), strict_mask_fraction=float(strict.mean()),
                n_relaxed_bins=int((relaxed > 0).sum()), n_strap_columns=int(strap.sum()))
    cube = builder.finish(np.asarray(time, dtype=float), cadenceno=cadenceno, quality=quality,
                          meta=meta, **(ids or {}))
    return bin_time(cube, float(s["time_bin"]), float(s["gap_factor"]))


def _bin_counts(mask, b):
    """Usable pixels per bin under ``mask``."""
    from .cube import bin_statistics
    return bin_statistics(np.zeros((1,) + mask.shape, np.float32), mask, b, 0)[2][0]


class ScatteredLightCube(PrepareStage):
    """Prepare stage ``scattered_light``: the binned sky of every cadence (cache group
    ``models/scattered_light``, see :mod:`photometry_scattered.cube`)."""

    name = "scattered_light"
    version = "1.0"

    def __init__(self, settings):
        super().__init__(settings)
        self.options = options(settings)

    def run(self, cache, group):
        f = cache.file
        s = self.options
        n, R, C = f["images"].shape
        if n == 0:
            raise InputError(f"{f.filename}: scattered_light: the cache holds no frames")
        sumimage = f["sumimage"][()] if "sumimage" in f else None
        ref_frame = int(f.attrs.get("ref_frame", 0))
        ref_flags = f["pixel_flags"][ref_frame] if "pixel_flags" in f else None
        ref_name = resolve_reference(self.settings, s, f)
        if ref_name == "none":
            reference = None
        else:
            from photometry import background_model_class
            cls = background_model_class(ref_name)
            if not issubclass(cls, BackgroundModel):
                raise ConfigurationError(f"scattered_light.reference: '{ref_name}' is not a "
                                         "BackgroundModel")
            rgroup = f[f"models/{ref_name}"]

            def reference(part):
                return cls.evaluate(rgroup, slice(None), slice(None),
                                    np.arange(part.start, part.stop))
        logger.info("scattered light: cube on top of '%s'", ref_name)
        a = f.attrs
        ids = {"reference": ref_name, "sector": int(a.get("sector", 0)),
               "camera": int(a.get("camera", 0)), "ccd": int(a.get("ccd", 0))}
        cube = build_cube(
            cache.iter_frame_blocks(), (R, C), f["time"][()], self.settings, sumimage=sumimage,
            catalog=cache_catalog(f), ref_flags=ref_flags,
            row_offset=int(a.get("row_offset", 0)), column_offset=int(a.get("column_offset", 0)),
            cadenceno=f["cadenceno"][()] if "cadenceno" in f else None,
            quality=f["quality"][()] if "quality" in f else None, reference=reference,
            ids=ids, meta={"cache": str(f.filename)}, progress=bool(s.get("progress", True)))
        write_group(cube, group)
        return group
