"""What BasePhotometry needs from a data source (:class:`DataSource`), and opening one by its
file: the HDF5 cache of ``prepare`` or a TPF/TESScut file."""
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

from photometry.hooks.errors import InputError

__all__ = ["DataSource", "open_source", "IMAGES", "ERRORS", "FLAGS", "TPF_BACKGROUNDS",
           "TPF_BACKGROUND_ERRORS"]

#: Cube names of the data sources (cache datasets / TPF columns behind them), for
#: ``source.stamp(name, rows, columns)``.
IMAGES, ERRORS, FLAGS = "images", "errors", "pixel_flags"
TPF_BACKGROUNDS, TPF_BACKGROUND_ERRORS = "backgrounds", "background_errors"


def open_source(path, **kwargs):
    """The data source behind ``path``: an HDF5 cache (FFICache) or a TPF/TESScut file
    (``kwargs`` go to :class:`photometry.data.tpf.TPFSource`)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".fits", ".fits.gz", ".fit", ".fits.fz")):
        from photometry.data.tpf import TPFSource
        return TPFSource(path, **kwargs)
    if name.endswith((".hdf5", ".h5")):
        from photometry.data.cache import FFICache
        return FFICache(path)
    raise InputError(f"{path}: not a cache (.hdf5) or a TPF/TESScut file (.fits)")


@runtime_checkable
class DataSource(Protocol):
    """The part of a data source BasePhotometry reads: the contract of the cache
    (:class:`photometry.data.cache.FFICache`, "ffi"), TPF/TESScut files
    (:class:`photometry.data.tpf.TPFSource`, "tpf") and arrays
    (:class:`photometry.data.memory_source.MemorySource`, the fake source of
    :mod:`photometry.testing`). A new source (another mission's cutouts, a database) that has
    these members can be handed to any algorithm.

    Coordinates are 0-based CCD (row, column); cube pixel ``[.., i, j]`` is CCD pixel
    ``(row_offset + i, column_offset + j)``. Arrays of the frames are (N,) or (N, rows, cols).

    The catalog: ``catalog_path`` is the catalog SQLite (docs/architecture.md), which the core
    queries; a source without one (None) has ``catalog_table()``, an astropy Table with its
    columns (starid, ra, dec, tmag, row, column, ...). Read when present, not required:
    ``warnings`` ((code, text) of what the source could not do well: results at best WARNING),
    ``shape``, ``pos_corr``, ``noise``, ``attrs``, ``header``, ``settings``.
    """

    datasource: str              # "ffi" or "tpf" (a TPF's sky is its own, not a model's)
    sector: int
    camera: int
    ccd: int
    cadence: int                 # seconds
    n_frames: int
    time: Any                    # (N,) BTJD mid-exposure; NaN frames are dropped by the core
    timecorr: Any                # (N,) barycentric correction applied, days
    cadenceno: Any               # (N,) int
    quality: Any                 # (N,) TESSQualityFlags
    row_offset: int
    column_offset: int
    sumimage: Any                # (rows, cols) mean of the good frames
    reference_wcs: Any           # astropy WCS of the reference frame, or None
    movement_kernel: Any         # MovementKernel (per-frame shift), or None
    catalog_path: Optional[Path]

    def stamp(self, name, row_slice, col_slice):
        """(N, r, c) cut of cube ``name`` (IMAGES, ERRORS, FLAGS, TPF_BACKGROUNDS, ...);
        KeyError for a cube the source does not have."""

    def model_group(self, name):
        """The finished state of prepare stage ``name`` (an h5py group or stand-in), or None."""
