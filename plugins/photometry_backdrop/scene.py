"""Simulated sectors as the backdrop stage sees them, for tests, benchmarks and plots.

``tessphot simulate`` writes SPOC-format FFIs plus ``truth.h5``; :func:`load_simulation`
reads them back (through the project's FFI reader) together with the true background, and
:func:`write_stage_input` writes the subset of the cache layout the stage reads (cubes, sum
image, time, attributes, catalog SQLite), so the stage can be exercised and timed on its own.
:class:`BlockReader` yields frame blocks exactly like ``CacheWriter.iter_frame_blocks``.
"""
import os
import sqlite3
from pathlib import Path

import h5py
import numpy as np

__all__ = ["load_simulation", "write_stage_input", "BlockReader", "background_metrics",
           "star_sets"]


def load_simulation(outdir, saturation_level=90000.0, bleed_pad=1, with_background=True):
    """Frames, errors, pixel flags, true background and star list of a simulated sector."""
    from photometry import pixel_flags_for
    from photometry import find_ffi_files, read_ffi

    outdir = Path(outdir)
    paths = sorted(find_ffi_files(outdir / "ffi"))
    frames = [read_ffi(p, wcs=False) for p in paths]
    images = np.stack([fr.image for fr in frames]).astype(np.float32)
    errors = np.stack([fr.uncert for fr in frames]).astype(np.float32)
    flags = np.stack([pixel_flags_for(im, saturation_level, bleed_pad) for im in images])
    with h5py.File(outdir / "truth.h5", "r") as h5:
        a = dict(h5.attrs)
        bg = h5["background"][()] if with_background and "background" in h5 else None
        st = h5["stars"]
        stars = {k: st[k][()] for k in ("row", "column", "tmag", "starid")}
        time = h5["time"][()]
    return {
        "images": images, "errors": errors, "pixel_flags": flags, "background": bg,
        "time": time, "stars": stars, "quality": np.array([fr.quality for fr in frames]),
        "row_offset": int(frames[0].row_offset), "column_offset": int(frames[0].column_offset),
        "sector": int(a["sector"]), "camera": int(a["camera"]), "ccd": int(a["ccd"]),
    }


def write_stage_input(path, sim):
    """Write the cache subset the backdrop stage reads, plus the catalog SQLite beside it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    images = sim["images"]
    with h5py.File(tmp, "w") as f:
        f.create_dataset("images", data=images, chunks=(min(32, len(images)),) + images.shape[1:])
        f.create_dataset("errors", data=sim["errors"])
        f.create_dataset("pixel_flags", data=sim["pixel_flags"])
        with np.errstate(invalid="ignore"):
            f.create_dataset("sumimage", data=np.nanmean(images, axis=0).astype(np.float64))
        f.create_dataset("time", data=sim["time"])
        for key in ("sector", "camera", "ccd", "row_offset", "column_offset"):
            f.attrs[key] = sim[key]
        f.attrs["ref_frame"] = len(images) // 2
    os.replace(tmp, path)
    cat = path.with_name(f"catalog_sector{sim['sector']:04d}_camera{sim['camera']}"
                         f"_ccd{sim['ccd']}.sqlite")
    if cat.exists():
        cat.unlink()
    st = sim["stars"]
    with sqlite3.connect(cat) as con:
        con.execute('CREATE TABLE catalog (starid INTEGER PRIMARY KEY, "row" REAL, '
                    '"column" REAL, tmag REAL)')
        con.executemany("INSERT INTO catalog VALUES (?, ?, ?, ?)",
                        zip(st["starid"].tolist(), st["row"].tolist(), st["column"].tolist(),
                            st["tmag"].tolist()))
    return path


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
