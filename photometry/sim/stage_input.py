"""Simulated sectors as the backdrop stage sees them, for tests, benchmarks and plots.

``tessphot simulate`` writes SPOC-format FFIs plus ``truth.h5``; :func:`load_simulation`
reads them back (through the project's FFI reader) together with the true background, and
:func:`write_stage_input` writes the subset of the cache layout the backdrop stage reads
(cubes, sum image, time, attributes, catalog SQLite), so the stage can be exercised and timed
on its own. Moved here from ``photometry_backdrop.scene`` (issue 17: plugins do no file I/O).
"""
import os
import sqlite3
from pathlib import Path

import h5py
import numpy as np

from photometry.data.cache import pixel_flags_for
from photometry.data.ffi import find_ffi_files, read_ffi

__all__ = ["load_simulation", "write_stage_input"]


def load_simulation(outdir, saturation_level=90000.0, bleed_pad=1, with_background=True):
    """Frames, errors, pixel flags, true background and star list of a simulated sector."""
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
