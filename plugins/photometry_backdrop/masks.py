"""Which pixels the backdrop fit may use: star, saturation-bleed and bad-pixel masks.

Built once per CCD from the sum image (everything that stands above a smooth background in
the time-averaged image, so faint stars too) and the catalog (generous circles around bright
stars, whose PRF wings reach far below the sum-image threshold).
"""
import numpy as np
from scipy import ndimage

from photometry import disc_mask

from .fit import nanquantile_columns

__all__ = ["build_mask", "star_pixels", "read_catalog", "smooth_background"]


def read_catalog(cache_file):
    """(row, column, tmag) arrays in cube pixel indices, or None when there is no catalog."""
    from photometry import cache_catalog
    return cache_catalog(cache_file)


def smooth_background(image, exclude, box):
    """Smooth background of ``image`` from the median of usable pixels in ``box``-pixel cells,
    interpolated bilinearly between cell centres (cells without usable pixels are filled from
    their neighbours)."""
    R, C = image.shape
    nr, nc = -(-R // box), -(-C // box)
    work = np.full((nr * box, nc * box), np.nan)
    work[:R, :C] = np.where(exclude, np.nan, image)
    cells = work.reshape(nr, box, nc, box).transpose(1, 3, 0, 2).reshape(box * box, nr * nc)
    coarse = nanquantile_columns(cells, 0.5).reshape(nr, nc)
    empty = ~np.isfinite(coarse)
    if empty.all():
        return np.full(image.shape, np.nanmedian(image))
    if empty.any():
        idx = ndimage.distance_transform_edt(empty, return_distances=False, return_indices=True)
        coarse = coarse[tuple(idx)]
    rr = (np.arange(R) + 0.5) / box - 0.5
    cc = (np.arange(C) + 0.5) / box - 0.5
    out = ndimage.map_coordinates(coarse, np.meshgrid(rr, cc, indexing="ij"), order=1,
                                  mode="nearest")
    return out


def build_mask(sumimage, settings, catalog=None):
    """Pixels usable by the background fit, and the saturated/bleed pixels.

    Parameters
    ----------
    sumimage : (R, C) array
        Time-averaged image (e-/s).
    settings : dict
        The ``[backdrop]`` settings section.
    catalog : tuple of arrays, optional
        (row, column, tmag) in cube pixel indices.

    Returns
    -------
    usable, saturated, exclude : (R, C) bool arrays
        ``exclude`` is what is masked regardless of the sum-image residual (bad, saturated,
        catalog circles); the stage refines the rest with the full model.
    """
    s = settings
    img = np.asarray(sumimage, dtype=float)
    bad = ~np.isfinite(img)
    img = np.where(bad, np.nanmedian(img) if not bad.all() else 0.0, img)
    sat = img > float(s["saturation"])
    if sat.any():
        m = int(s["bleed_margin"])
        sat = ndimage.binary_dilation(sat, structure=np.ones((2 * m + 1, 5), dtype=bool))
    exclude = bad | sat
    if catalog is not None and len(catalog[0]):
        rows, cols, tmag = catalog
        bright = tmag <= float(s["catalog_tmag"])
        radii = float(s["catalog_radius"]) * 10 ** (0.2 * (float(s["catalog_tmag"]) - tmag[bright]))
        exclude |= disc_mask(img.shape, rows[bright], cols[bright], radii)
    stars = np.zeros_like(exclude)
    for _ in range(3):
        skip = exclude | stars
        res = img - smooth_background(img, skip, int(s["mask_box"]))
        offs = nanquantile_columns(np.where(skip, np.nan, res), 0.5)
        res -= np.nan_to_num(offs)
        vals = res[~skip]
        sigma = 1.4826 * np.median(np.abs(vals - np.median(vals))) if vals.size else 0.0
        if sigma <= 0:
            break
        new = star_pixels(res, sigma, s)
        if np.array_equal(new, stars):
            break
        stars = new
    return ~(exclude | stars), sat, exclude


def star_pixels(res, sigma, settings):
    """Pixels of sources in a background-subtracted sum image, grown by ``mask_dilate``.

    The threshold is ``mask_nsigma`` robust sigma but never below ``mask_level`` e-/s: the sum
    of a long sector is so deep that a pure sigma cut would mask nearly every pixel in the
    wings of the many faint stars. Stars are positive: the threshold is one-sided (a smooth-model misfit below the data
    must not mask a whole region); strongly negative pixels (dead or badly calibrated) are
    masked at three times the threshold.
    """
    k = max(float(settings["mask_nsigma"]) * sigma, float(settings["mask_level"]))
    new = (res > k) | (res < -3 * k)
    cross = ndimage.generate_binary_structure(2, 1)
    grow = int(settings["mask_dilate"])
    if grow > 0:
        # bright sources spread faint wings farther: pixels 100x above the threshold grow a
        # three times wider margin (a catalog-free stand-in for the catalog circles)
        bright = res > 100 * k
        new = ndimage.binary_dilation(new, structure=cross, iterations=grow)
        if bright.any():
            new |= ndimage.binary_dilation(bright, structure=cross, iterations=3 * grow)
    return new
