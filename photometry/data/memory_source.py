"""An in-memory data source: the part of the cache API BasePhotometry reads, from arrays.

Why: algorithm tests (ours and a plugin author's) need scenes whose truth they control
without writing FITS files and a cache; this gives BasePhotometry exactly what
:class:`photometry.data.cache.FFICache` would.
"""
import numpy as np

__all__ = ["MemorySource", "MemoryGroup"]


class MemorySource:
    """Cubes (N, rows, cols) by cache name, a catalog Table, a time axis (datasource "ffi").

    Parameters
    ----------
    cubes : dict
        ``"images"``, ``"errors"`` and optionally ``"pixel_flags"`` arrays (N, rows, cols).
    catalog : astropy.table.Table
        starid, ra, dec, tmag, row, column (0-based CCD coordinates).
    time, quality : array (N,)
    row_offset, column_offset : int
        0-based CCD position of cube pixel [.., 0, 0].
    movement_kernel : object, optional
        Anything with the movement-kernel interface BasePhotometry calls.
    models : dict, optional
        Prepare-stage state by stage name (h5py groups or stand-ins).
    """

    datasource = "ffi"
    catalog_path = None
    reference_wcs = None
    sector, camera, ccd, cadence = 1, 1, 1, 1800

    def __init__(self, cubes, catalog, time, quality, row_offset=0, column_offset=44,
                 movement_kernel=None, models=None):
        self._cubes = cubes
        self._catalog = catalog
        self.time = np.asarray(time)
        self.timecorr = np.zeros_like(self.time)
        self.cadenceno = np.arange(len(self.time))
        self.quality = np.asarray(quality)
        self.n_frames = len(self.time)
        self.row_offset, self.column_offset = row_offset, column_offset
        self.movement_kernel = movement_kernel
        self.models = dict(models or {})
        self.sumimage = np.mean(cubes["images"][self.quality == 0], axis=0)

    def catalog_table(self):
        return self._catalog.copy()

    def stamp(self, name, row_slice, col_slice):
        if name not in self._cubes:
            raise KeyError(name)
        return self._cubes[name][:, row_slice, col_slice]

    def model_group(self, name):
        return self.models.get(name)


class MemoryGroup(dict):
    """Stands in for an h5py group of prepare-stage state (``attrs``, ``[name][()]``, ``in``,
    ``create_dataset``), so a stage's results can live in a :class:`MemorySource`."""

    def __init__(self, data=None, attrs=None):
        super().__init__(data or {})
        self.attrs = dict(attrs or {})

    def create_dataset(self, name, data):
        self[name] = np.asarray(data)
