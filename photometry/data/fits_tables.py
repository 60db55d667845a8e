"""FITS table files read whole into memory, for plugins that take tables and do no I/O.

Why: a light-curve correction needs files it does not write (SPOC's CBVs) and its own
products of an earlier fit (``LC_DIR/cbv/``); the core opens them here and hands the plugin
headers and arrays (``LightCurveCorrection.inputs`` and ``restore``, docs/writing_plugins.md).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from photometry.hooks.errors import ConfigurationError

__all__ = ["FitsTables", "read_fits_tables", "find_input_file", "ProductFolder"]


@dataclass(frozen=True)
class FitsTables:
    """A FITS file in memory: its primary ``header``, and ``tables`` {EXTNAME (upper case):
    {column name: array}} with ``headers`` {EXTNAME: header} of its table extensions.

    ``path`` names the file (for messages); nothing reads it again.
    """

    path: Path
    header: object
    tables: dict
    headers: dict

    def __contains__(self, extname):
        return str(extname).upper() in self.tables

    def table(self, extname):
        """{column name: array} of extension ``extname`` (any case); KeyError if absent."""
        return self.tables[str(extname).upper()]


def read_fits_tables(path):
    """Every table extension of a FITS file, its columns as arrays (what ``data[column]`` of
    astropy gives: logical columns as bool, vector columns as (rows, n))."""
    from astropy.io import fits
    path = Path(path)
    tables, headers = {}, {}
    with fits.open(path, memmap=False) as hdul:
        primary = hdul[0].header.copy()
        for hdu in hdul[1:]:
            if not isinstance(hdu, fits.BinTableHDU):
                continue
            name = hdu.name.upper()
            data = hdu.data
            names = [] if data is None else data.columns.names
            tables[name] = {c: np.array(data[c]) for c in names}
            headers[name] = hdu.header.copy()
    return FitsTables(path, primary, tables, headers)


def find_input_file(spec):
    """The file an :class:`photometry.data.stages.InputFile` names: the first (sorted) of
    its folder's files matching its pattern, or None. A folder that does not exist is a
    ConfigurationError naming the setting (a mistyped setting must not fall back silently)."""
    folder = Path(spec.folder)
    if not folder.is_dir():
        name = f"{spec.setting} = {str(spec.folder)!r}" if spec.setting else str(folder)
        raise ConfigurationError(f"{name}: no such folder")
    found = sorted(folder.glob(spec.pattern))
    return found[0] if found else None


class ProductFolder:
    """The folder of a correction's CCD-level products (``LC_DIR/cbv/``), read by name."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def get(self, name):
        """:class:`FitsTables` of product ``name``, or None if there is no such file."""
        path = self.folder / name
        return read_fits_tables(path) if path.is_file() else None
