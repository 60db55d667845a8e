"""Opening a data source by its file: the HDF5 cache of ``prepare`` or a TPF/TESScut file."""
from pathlib import Path

from photometry.hooks.errors import InputError

__all__ = ["open_source", "IMAGES", "ERRORS", "FLAGS", "TPF_BACKGROUNDS", "TPF_BACKGROUND_ERRORS"]

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
