"""Test scenes of the backdrop stage: frame blocks and scores against the true background.

The simulated sectors themselves are read and written by the core
(``photometry.sim.stage_input``: ``load_simulation``, ``write_stage_input``);
:class:`BlockReader` yields frame blocks exactly like ``CacheWriter.iter_frame_blocks``.
"""
import numpy as np

__all__ = ["BlockReader", "background_metrics", "star_sets"]


class BlockReader:
    """``iter_frame_blocks`` over an open file, like ``CacheWriter`` (time_chunk frames)."""

    def __init__(self, h5file, block=32):
        self.file = h5file
        self.block = int(block)

    def iter_frame_blocks(self):
        f = self.file
        n = f["images"].shape[0]
        for start in range(0, n, self.block):
            sl = slice(start, min(n, start + self.block))
            yield sl, f["images"][sl], f["errors"][sl], f["pixel_flags"][sl]


def star_sets(shape, stars, row_offset, column_offset, bright_tmag=10.0, radius=3.0,
              star_free_tmag=16.5):
    """(near_bright, star_free) pixel masks: within ``radius`` px of a star brighter than
    ``bright_tmag``, and farther than ``radius`` from every star brighter than
    ``star_free_tmag``."""
    R, C = shape
    rows = np.asarray(stars["row"]) - row_offset
    cols = np.asarray(stars["column"]) - column_offset
    tmag = np.asarray(stars["tmag"])
    near_bright = np.zeros((R, C), bool)
    near_any = np.zeros((R, C), bool)
    for r0, c0, m in zip(rows, cols, tmag):
        if not (-radius <= r0 < R + radius and -radius <= c0 < C + radius):
            continue
        r1, r2 = max(0, int(r0 - radius)), min(R, int(r0 + radius) + 2)
        c1, c2 = max(0, int(c0 - radius)), min(C, int(c0 + radius) + 2)
        yy, xx = np.ogrid[r1:r2, c1:c2]
        disk = np.hypot(yy - r0, xx - c0) <= radius
        if m <= star_free_tmag:
            near_any[r1:r2, c1:c2] |= disk
        if m <= bright_tmag:
            near_bright[r1:r2, c1:c2] |= disk
    return near_bright, ~near_any


def background_metrics(model, truth, stars, row_offset, column_offset, bright_tmag=10.0,
                       radius=3.0, star_free_tmag=16.5, region=(slice(None), slice(None)),
                       remove_constant=False):
    """Scores of a background model against the true background, frame by frame.

    ``model`` and ``truth`` are indexable by frame (arrays, h5py datasets or anything whose
    ``[i]`` gives one (R, C) frame); ``region`` restricts both to the same pixels. Returns a
    dict: ``rms_star_free`` (model - truth over pixels farther than ``radius`` px from every
    star brighter than ``star_free_tmag``, all frames), ``bias_bright`` (mean of model - truth
    within ``radius`` px of stars brighter than ``bright_tmag``), the pixel counts and
    ``rms_all``. With ``remove_constant`` each frame's median difference over the star-free
    pixels is removed first (to compare with models defined up to a per-frame constant).
    """
    n = len(truth)
    shape = np.asarray(truth[0])[region].shape
    near_bright, free = star_sets(np.asarray(truth[0]).shape, stars, row_offset, column_offset,
                                  bright_tmag, radius, star_free_tmag)
    near_bright, free = near_bright[region], free[region]
    ss_free = ss_all = s_bright = 0.0
    for i in range(n):
        d = np.asarray(model[i], dtype=np.float64)[region] - np.asarray(truth[i])[region]
        if remove_constant:
            d = d - np.median(d[free])
        ss_free += float(np.sum(d[free] ** 2))
        ss_all += float(np.sum(d ** 2))
        s_bright += float(np.sum(d[near_bright]))
    return {
        "rms_star_free": float(np.sqrt(ss_free / (n * free.sum()))),
        "n_star_free": int(free.sum()),
        "bias_bright": s_bright / (n * near_bright.sum()) if near_bright.any() else float("nan"),
        "n_bright": int(near_bright.sum()),
        "rms_all": float(np.sqrt(ss_all / (n * shape[0] * shape[1]))),
    }
