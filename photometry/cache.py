"""The HDF5 FFI cache: :class:`CacheWriter` (used by prepare) and :class:`FFICache` (read-only).

Why one chunked cube per quantity instead of one dataset per frame (as TASOC did): a target
reads its stamp over all cadences with a single slice that touches a few chunks of shape
``(time_chunk, s, s)``, instead of opening N datasets; and frame order is the array order, so
nothing breaks past 9 999 frames. The layout and attributes are the contract in
``docs/architecture.md`` ("HDF5 cache").

Crash safety: the file is written as ``<name>.hdf5.partial``; a block of ``time_chunk``
frames is written by a background thread and ``frames_done`` is advanced only once its bytes
are written, so a resumed prepare re-writes at most two blocks. The rename to
``<name>.hdf5`` is the last step, so a cache that did not finish is never opened as complete.
"""
import concurrent.futures
import hashlib
import json
import logging
import mmap
import os
import struct
import warnings
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from . import __version__
from .errors import InputError
from .movement import MovementKernel, fit_centroids, fit_kernel
from .quality import PixelQualityFlags, TESSQualityFlags
from .settings import settings_hash

__all__ = ["SCHEMA_VERSION", "CacheWriter", "FFICache", "cache_filename", "catalog_filename",
           "pixel_flags_for", "choose_reference_frame"]

logger = logging.getLogger(__name__)

#: Bumped whenever the layout in docs/architecture.md changes incompatibly.
SCHEMA_VERSION = 1

#: Chunk cache of the reader: a 15x15 stamp over 10 000 frames touches at most
#: 6 x ceil(10000/32) chunks of 16 KB (float32, 32x8x16) = 31 MB; 64 MB holds one stamp's
#: chunks of one cube, so re-reading a stamp (resize, errors after images) is free.
READER_CACHE_BYTES = 64 * 1024 ** 2
READER_CACHE_SLOTS = 100_003

_CUBES = (("images", np.float32), ("errors", np.float32), ("pixel_flags", np.uint8))
#: [prepare] keys that only change how the cache is written, not its content.
_IO_KEYS = ("direct_io",)
#: Alignment of chunk addresses, buffers and sizes for O_DIRECT writes.
_DIRECT_ALIGN = 4096
_FILL = {"images": np.float32(np.nan), "errors": np.float32(np.nan), "pixel_flags": 0}
_SERIES = (("time", np.float64), ("time_start", np.float64), ("time_stop", np.float64),
           ("timecorr", np.float32), ("cadenceno", np.int32), ("quality", np.int32))


def cache_filename(sector, camera, ccd):
    """``sectorSSSS_cameraC_ccdD.hdf5`` (4-digit sector)."""
    return f"sector{int(sector):04d}_camera{int(camera)}_ccd{int(ccd)}.hdf5"


def catalog_filename(sector, camera, ccd):
    """``catalog_sectorSSSS_cameraC_ccdD.sqlite``."""
    return f"catalog_sector{int(sector):04d}_camera{int(camera)}_ccd{int(ccd)}.sqlite"


def pixel_flags_for(image, saturation_level, bleed_pad):
    """Per-pixel flags of one frame.

    NonFinite where the image is NaN/inf. Saturated where the image exceeds
    ``saturation_level`` (e-/s): the saturated core of a bright star *and* its bleed columns,
    since charge spilled along a column fills those pixels to the full well too. The
    ``bleed_pad`` pixels beyond each end of a saturated run along the column are flagged as
    well, because the last, partly filled pixel of a bleed trail is below the level but is not
    a faithful flux either.
    """
    image = np.asarray(image)
    flags = np.zeros(image.shape, dtype=np.uint8)
    # every rule is local to a column (bleeding runs along it), so only the columns with a
    # non-finite or saturated pixel are worked on: a few percent of a real frame
    with np.errstate(invalid="ignore"):
        bad = ~(image <= saturation_level)
    cols = np.flatnonzero(bad.any(axis=0))
    if not cols.size:
        return flags
    sub = image[:, cols]
    sub_flags = np.zeros(sub.shape, dtype=np.uint8)
    sub_flags[~np.isfinite(sub)] |= np.uint8(PixelQualityFlags.NonFinite)
    with np.errstate(invalid="ignore"):
        sat = sub > saturation_level
    if sat.any():
        if bleed_pad > 0:
            grown = sat.copy()
            for k in range(1, int(bleed_pad) + 1):
                grown[k:] |= sat[:-k]
                grown[:-k] |= sat[k:]
            sat = grown
        sub_flags[sat] |= np.uint8(PixelQualityFlags.Saturated)
    flags[:, cols] = sub_flags
    return flags


def choose_reference_frame(time, quality, usable=None):
    """Index of the reference frame: the good frame nearest the middle of the time span.

    Why the middle: the movement kernel is then smallest on average over the sector (the
    velocity-aberration drift grows from it both ways), so the catalog positions computed with
    the reference WCS are closest to every frame. "Good" = quality passes
    ``TESSQualityFlags.DEFAULT_BITMASK``, finite time, and ``usable`` (e.g. has a WCS and
    finite pixels). Falls back to any usable frame if none is good.
    """
    time = np.asarray(time, float)
    ok = np.isfinite(time)
    if usable is not None:
        ok &= np.asarray(usable, bool)
    good = ok & TESSQualityFlags.filter(quality)
    pool = good if good.any() else ok
    if not pool.any():
        raise InputError("no frame with a valid time to use as the reference frame")
    mid = 0.5 * (np.nanmin(time[pool]) + np.nanmax(time[pool]))
    candidates = np.flatnonzero(pool)
    return int(candidates[np.argmin(np.abs(time[candidates] - mid))])


def _lookup3(data):
    """Bob Jenkins' lookup3 ``hashlittle`` (init 0): the checksum HDF5 puts on its superblock."""
    mask = 0xFFFFFFFF

    def rot(v, k):
        return ((v << k) | (v >> (32 - k))) & mask

    n = len(data)
    a = b = c = (0xDEADBEEF + n) & mask
    i = 0
    while n - i > 12:
        x, y, z = struct.unpack_from("<3I", data, i)
        a, b, c = (a + x) & mask, (b + y) & mask, (c + z) & mask
        a = (a - c) & mask; a ^= rot(c, 4); c = (c + b) & mask  # noqa: E702
        b = (b - a) & mask; b ^= rot(a, 6); a = (a + c) & mask  # noqa: E702
        c = (c - b) & mask; c ^= rot(b, 8); b = (b + a) & mask  # noqa: E702
        a = (a - c) & mask; a ^= rot(c, 16); c = (c + b) & mask  # noqa: E702
        b = (b - a) & mask; b ^= rot(a, 19); a = (a + c) & mask  # noqa: E702
        c = (c - b) & mask; c ^= rot(b, 4); b = (b + a) & mask  # noqa: E702
        i += 12
    if n == i:
        return c
    x, y, z = struct.unpack("<3I", bytes(data[i:]) + bytes(12 - (n - i)))
    a, b, c = (a + x) & mask, (b + y) & mask, (c + z) & mask
    c ^= b; c = (c - rot(b, 14)) & mask  # noqa: E702
    a ^= c; a = (a - rot(c, 11)) & mask  # noqa: E702
    b ^= a; b = (b - rot(a, 25)) & mask  # noqa: E702
    c ^= b; c = (c - rot(b, 16)) & mask  # noqa: E702
    a ^= c; a = (a - rot(c, 4)) & mask  # noqa: E702
    b ^= a; b = (b - rot(a, 14)) & mask  # noqa: E702
    c ^= b; c = (c - rot(b, 24)) & mask  # noqa: E702
    return c


def clear_write_flag(path):
    """Make a cache file whose writer was killed openable again (what ``h5clear -s`` does).

    Why: the cache is written in the HDF5 1.10+ format (needed for the fixed-array chunk
    index), whose superblock (version 3) carries a "file open for writing" flag that a
    killed prepare leaves set; HDF5 then refuses to open the file at all. The flag byte is
    reset and the superblock checksum recomputed; the file is extended (sparse zeros) to the
    end-of-file address the superblock records if it is shorter. Returns whether anything
    was changed. Files in other formats are left alone.
    """
    with open(path, "r+b") as fh:
        sb = bytearray(fh.read(48))
        if len(sb) < 48 or sb[:8] != b"\x89HDF\r\n\x1a\n" or sb[8] not in (2, 3) or sb[9] != 8:
            return False
        if struct.unpack_from("<I", sb, 44)[0] != _lookup3(bytes(sb[:44])):
            return False
        changed = False
        eof = struct.unpack_from("<Q", sb, 28)[0]
        if os.fstat(fh.fileno()).st_size < eof:
            os.ftruncate(fh.fileno(), eof)
            changed = True
        if sb[11]:
            sb[11] = 0
            struct.pack_into("<I", sb, 44, _lookup3(bytes(sb[:44])))
            fh.seek(0)
            fh.write(sb)
            changed = True
        return changed


def _pwrite_all(fd, array, offset):
    """Write a contiguous array at ``offset`` (pwrite may write less than asked)."""
    view = memoryview(np.ascontiguousarray(array)).cast("B")
    while view.nbytes:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _aligned_zeros(shape, dtype):
    """Zeroed array on page-aligned memory (an anonymous map), as O_DIRECT writes need."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).reshape(shape)


def _input_hash(ffi_files, prepare_hash):
    names = [Path(p).name for p in ffi_files]
    text = json.dumps({"files": names, "settings": prepare_hash}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compression(settings):
    name = str(settings["prepare"]["compression"]).lower()
    if name == "none":
        return {}
    if name == "lzf":
        return {"compression": "lzf"}
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    raise InputError(f"prepare.compression: unknown filter '{name}' (lzf, gzip or none)")


class CacheWriter:
    """Builds (or resumes) one sector/camera/CCD cache, frame by frame.

    Usage::

        writer = CacheWriter(path, settings, ffi_files=paths, shape=(R, C), meta={...})
        if writer.state != "complete":
            writer.set_kernel_stars(...)          # only when writer.state == "new"
            for frame in frames[writer.frames_done:]:
                writer.add_frame(...)
            writer.finish_ingest()
            ... prepare stages (writer.iter_frame_blocks(), writer.stage_group(name)) ...
            writer.close(complete=True)           # renames .partial -> final

    Memory: two sets (one being filled, one being written by the writer thread) of three
    buffers of ``time_chunk`` frames (images, errors, flags: 2 x 9 bytes per pixel per frame;
    2.4 GB for 32 full 2048x2048 frames) and the sum-image accumulators; never the whole cube.

    Parameters
    ----------
    path : path
        Final cache path (``.../sectorSSSS_cameraC_ccdD.hdf5``).
    settings : dict
        Effective settings; the ``[prepare]`` section is hashed into the cache identity.
    ffi_files : list of path
        Input files in time order (their base names are part of the cache identity).
    shape : (int, int)
        Science-region rows and columns.
    meta : dict
        Root attributes: sector, camera, ccd, cadence, data_rel, procver, row_offset,
        column_offset (and anything else to record).
    overwrite : bool
        Replace a complete cache made with other inputs or settings instead of refusing.
    plugin_versions : dict, optional
        Name -> version of the plugins involved, recorded as JSON.
    """

    def __init__(self, path, settings, *, ffi_files, shape, meta, overwrite=False,
                 plugin_versions=None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.settings = settings
        self.pset = settings["prepare"]
        self.ffi_files = [str(p) for p in ffi_files]
        self.n_frames = len(self.ffi_files)
        if self.n_frames == 0:
            raise InputError(f"{self.path}: no frames to write")
        self.shape = tuple(int(v) for v in shape)
        self.meta = dict(meta)
        # how the bytes are written does not change them: not part of the cache identity
        self.prepare_hash = settings_hash(
            {"prepare": {k: v for k, v in settings["prepare"].items() if k not in _IO_KEYS}},
            "prepare")
        self.input_hash = _input_hash(self.ffi_files, self.prepare_hash)
        self.plugin_versions = plugin_versions or {}
        self.block = int(min(int(self.pset["time_chunk"]), self.n_frames))
        s = self.pset["spatial_chunk"]
        s_row, s_col = (int(s), int(s)) if np.ndim(s) == 0 else (int(s[0]), int(s[1]))
        self.chunks = (self.block, min(s_row, self.shape[0]), min(s_col, self.shape[1]))
        self.saturation_level = float(self.pset["saturation_level"])
        self.bleed_pad = int(self.pset["saturation_bleed_pad"])
        self.kernel_box = int(self.pset["kernel_box"])
        self.direct_io = bool(self.pset.get("direct_io", False))
        self._compression = _compression(settings)  # validated before any file is touched
        self._file = None
        self._buffer = None
        self._n_buffered = 0
        self._pool = None
        self._pending = None
        self.state = self._open(overwrite)

    # ------------------------------------------------------------------ opening
    def _open(self, overwrite):
        if self.path.exists():
            try:
                same, complete = self._identity(self.path)
            except OSError as exc:
                if not overwrite:
                    raise InputError(f"{self.path}: exists but is not a readable cache ({exc}); "
                                     "use --overwrite to replace it") from None
                same, complete = False, False
            if same and complete:
                logger.info("%s: complete cache with the same inputs and settings exists",
                            self.path)
                return "complete"
            if not overwrite:
                raise InputError(
                    f"{self.path}: a cache made from other input files or settings exists "
                    "(use --overwrite to replace it)")
            logger.warning("%s: replacing the existing cache (--overwrite)", self.path)
        if self.partial.exists():
            try:
                clear_write_flag(self.partial)  # left set if the last prepare was killed
                same, _ = self._identity(self.partial)
            except OSError as exc:
                logger.warning("%s: cannot be opened (%s); starting over", self.partial, exc)
                same = None
            if same:
                try:
                    self._file = h5py.File(self.partial, "r+", libver="latest")
                    self._layout()
                    self.frames_done = int(self._file.attrs["frames_done"])
                    # the block after frames_done may hold a killed run's bytes; later
                    # slabs were never written
                    self._fresh_from = self.frames_done + self.block
                    self._restore()
                    logger.warning("%s: resuming after %d of %d frames", self.partial,
                                   self.frames_done, self.n_frames)
                    return "resume"
                except Exception as exc:  # noqa: BLE001 - a damaged partial is rebuilt
                    logger.warning("%s: cannot be resumed (%s); starting over", self.partial, exc)
                    self._close_fd()
                    if self._file is not None:
                        try:
                            self._file.close()
                        except Exception:  # noqa: BLE001
                            pass
                        self._file = None
            elif same is False:
                logger.warning("%s: made from other inputs or settings; starting over",
                               self.partial)
            self.partial.unlink()
        self._create()
        return "new"

    def _identity(self, path):
        """(same inputs and settings?, complete?) of an existing cache file."""
        with h5py.File(path, "r") as f:
            same = (f.attrs.get("input_hash") == self.input_hash
                    and int(f.attrs.get("schema_version", -1)) == SCHEMA_VERSION)
            return bool(same), bool(f.attrs.get("complete", False))

    def _create(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # "latest" format: fixed-size chunked datasets then get a fixed-array chunk index
        # (O(1) lookup, no B-tree) and early allocation lays the chunks out back to back in
        # chunk order, which is what lets flush() write a whole block with one pwrite. The
        # superblock's "open for writing" flag a killed prepare leaves is reset on resume
        # by clear_write_flag.
        # chunks of >= 4 KiB start on 4 KiB boundaries: the block writes can then bypass the
        # page cache (O_DIRECT), which costs a tenth of the CPU of a buffered write
        f = h5py.File(self.partial, "w", libver="latest", alignment_threshold=_DIRECT_ALIGN,
                      alignment_interval=_DIRECT_ALIGN)
        n, (nrow, ncol) = self.n_frames, self.shape
        comp = self._compression
        for name, dtype in _CUBES:
            fill = np.nan if dtype == np.float32 else 0
            if comp and dtype == np.float32:
                f.create_dataset(name, shape=(n, nrow, ncol), dtype=dtype, chunks=self.chunks,
                                 fillvalue=fill, **comp)
                continue
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_chunk(self.chunks)
            dcpl.set_fill_value(np.array(fill, dtype))
            # all chunks allocated now (in chunk order) and never pre-filled: every chunk of
            # a complete cache is written exactly once, by flush()
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            space = h5py.h5s.create_simple((n, nrow, ncol), (n, nrow, ncol))
            h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)), space,
                            dcpl=dcpl).close()
        for name, dtype in _SERIES:
            fill = np.nan if np.issubdtype(dtype, np.floating) else 0
            f.create_dataset(name, shape=(n,), dtype=dtype, fillvalue=fill)
        str_dt = h5py.string_dtype()
        f.create_dataset("wcs", shape=(n,), dtype=str_dt)
        f.create_dataset("ffi_files", data=np.array([Path(p).name for p in self.ffi_files],
                                                    dtype=object), dtype=str_dt)
        attrs = f.attrs
        attrs["schema_version"] = SCHEMA_VERSION
        for key, value in self.meta.items():
            attrs[key] = value
        attrs["package_version"] = __version__
        attrs["plugin_versions"] = json.dumps(self.plugin_versions, sort_keys=True)
        attrs["settings_hash"] = self.prepare_hash
        attrs["settings"] = json.dumps(self.settings, sort_keys=True)
        attrs["input_hash"] = self.input_hash
        attrs["n_frames"] = n
        attrs["frames_done"] = 0
        attrs["ingest_complete"] = False
        attrs["ref_frame"] = -1
        attrs["complete"] = False
        attrs["time_chunk"] = self.chunks[0]
        attrs["spatial_chunk"] = self.chunks[1:]
        f.flush()
        self._file = f
        self._layout()
        self.frames_done = 0
        self._fresh_from = 0
        self._sum = np.zeros(self.shape, np.float64)
        self._count = np.zeros(self.shape, np.int32)
        self._stars = None

    def _restore(self):
        """Rebuild the in-memory state of a resumed partial from what it stores.

        The sum-image accumulators are recomputed from the stored cube (reading it also
        proves the stored blocks are intact: a damaged one raises and prepare starts over).
        """
        f = self._file
        if f.attrs["ingest_complete"]:
            self.frames_done = self.n_frames
        self._sum = np.zeros(self.shape, np.float64)
        self._count = np.zeros(self.shape, np.int32)
        acc = f.get("_accumulators")
        if f.attrs["ingest_complete"]:
            pass
        elif acc is not None and int(acc.attrs["frames"]) == self.frames_done:
            # the accumulators stored with the last complete block: no need to read the cube
            self._sum[...] = acc["sum"][()]
            self._count[...] = acc["count"][()]
        else:
            # killed between storing the accumulators and advancing frames_done: recompute
            quality = f["quality"][:self.frames_done]
            self._stars = None
            self._new_buffer()
            for start in range(0, self.frames_done, self.block):
                stop = min(start + self.block, self.frames_done)
                for j, frame in enumerate(self._read_block("images", start, stop)):
                    self._put("images", j, frame)
                self._accumulate(stop - start, quality[start:stop])
            self._buffer = None
        self._stars = None
        if "movement/centroids" in f:
            g = f["movement"]
            self._stars = {"starid": g["starid"][:], "column": g["column"][:],
                           "row": g["row"][:]}
            cen = g["centroids"][:self.frames_done]
            last = self._last_positions(cen)
            self._guess = last

    @staticmethod
    def _last_positions(centroids):
        """Last finite position of each star (NaN if never measured)."""
        n_stars = centroids.shape[1]
        out = np.full((n_stars, 2), np.nan)
        finite = np.all(np.isfinite(centroids), axis=2)
        for k in range(n_stars):
            idx = np.flatnonzero(finite[:, k])
            if idx.size:
                out[k] = centroids[idx[-1], k]
        return out

    # ------------------------------------------------------------------ ingest
    @property
    def kernel_stars(self):
        """Kernel stars (dict of starid, column, row arrays) or None."""
        return self._stars

    def set_kernel_stars(self, starid, column, row):
        """Declare the stars whose centroids measure the movement kernel (new caches only).

        ``column, row`` are first-guess cube-pixel positions (e.g. catalog through the first
        frame's WCS); each later frame starts from the star's previous measured position.
        """
        if self.frames_done:
            raise RuntimeError("kernel stars must be set before the first frame")
        f = self._file
        if "movement" in f:
            del f["movement"]
        g = f.create_group("movement")
        starid = np.asarray(starid, np.int64)
        g.create_dataset("starid", data=starid)
        g.create_dataset("column", data=np.asarray(column, float))
        g.create_dataset("row", data=np.asarray(row, float))
        n = starid.size
        g.create_dataset("centroids", shape=(self.n_frames, n, 2), dtype=np.float64,
                         fillvalue=np.nan, chunks=(self.block, n, 2) if n else None)
        g.create_dataset("sigma", shape=(self.n_frames, n), dtype=np.float64,
                         fillvalue=np.nan, chunks=(self.block, n) if n else None)
        self._stars = {"starid": starid, "column": np.asarray(column, float),
                       "row": np.asarray(row, float)}
        self._guess = np.column_stack([self._stars["column"], self._stars["row"]])

    # ------------------------------------------------------------------ block layout
    def _layout(self):
        """Where each cube's chunks are in the file, for the direct block writes.

        ``self._direct[name]`` is the byte offset of the cube's first chunk when its chunks
        are stored uncompressed, back to back in chunk order (what early allocation with a
        fixed-array index gives), else None: that cube is written through h5py (compressed
        float cubes, or an HDF5 that lays chunks out otherwise).
        """
        nrow, ncol = self.shape
        t, cr, cc = self.chunks
        self._grid = (-(-nrow // cr), -(-ncol // cc))
        n_chunks = -(-self.n_frames // t) * self._grid[0] * self._grid[1]
        self._direct = {}
        for name, dtype in _CUBES:
            ds = self._file[name]
            base = None
            if ds.compression is None and ds.chunks == self.chunks:
                chunk_bytes = t * cr * cc * np.dtype(dtype).itemsize
                try:
                    if ds.id.get_num_chunks() == n_chunks:
                        idx = sorted({0, min(1, n_chunks - 1), n_chunks // 2, n_chunks - 1})
                        offs = [ds.id.get_chunk_info(i).byte_offset for i in idx]
                        if all(o == offs[0] + i * chunk_bytes for i, o in zip(idx, offs)):
                            base = int(offs[0])
                except Exception:  # noqa: BLE001 - fall back to h5py writes
                    base = None
            if base is None:
                logger.info("%s: cube %s is written through h5py (slow path)", self.partial,
                            name)
            self._direct[name] = base
        self._close_fd()
        if any(v is not None for v in self._direct.values()):
            self._fd = os.open(self.partial, os.O_RDWR)
            # HDF5 allocates the chunks' addresses but extends the file lazily: extend it
            # (sparse) to the last chunk so the file always covers what the superblock says
            end = max(base + n_chunks * t * cr * cc * np.dtype(dtype).itemsize
                      for (name, dtype) in _CUBES
                      if (base := self._direct[name]) is not None)
            if os.fstat(self._fd).st_size < end:
                os.ftruncate(self._fd, end)

        self._dfd = None
        if self.direct_io and self._fd is not None and hasattr(os, "O_DIRECT") and any(
                base is not None and base % _DIRECT_ALIGN == 0 for base in self._direct.values()):
            try:
                self._dfd = os.open(self.partial, os.O_WRONLY | os.O_DIRECT)
            except OSError:  # e.g. tmpfs: buffered writes only
                self._dfd = None

    def _close_fd(self):
        for attr in ("_fd", "_dfd"):
            fd = getattr(self, attr, None)
            if fd is not None:
                os.close(fd)
            setattr(self, attr, None)

    def _write(self, array, offset):
        """pwrite a contiguous array at ``offset``: O_DIRECT when buffer, offset and size
        are 4 KiB-aligned (no copy into the page cache), else buffered."""
        if (self._dfd is not None and offset % _DIRECT_ALIGN == 0
                and array.nbytes % _DIRECT_ALIGN == 0
                and array.ctypes.data % _DIRECT_ALIGN == 0 and array.flags.c_contiguous):
            try:
                _pwrite_all(self._dfd, array, offset)
                return
            except OSError as exc:  # EINVAL: the file system refuses after all
                logger.info("%s: O_DIRECT write failed (%s); buffered writes", self.partial,
                            exc)
                os.close(self._dfd)
                self._dfd = None
        _pwrite_all(self._fd, array, offset)

    def _new_buffer(self):
        """Block buffers in chunk order: (chunk row, chunk column, frame, row, column).

        Why chunk order: a block of ``time_chunk`` frames then *is* the byte image of one
        time-slab of chunks in the file, written with one pwrite; copying each frame into its
        strided slot is the only rearrangement and replaces the buffer copy anyway. The
        buffers are allocated once and re-used (memory-mapping the slab instead was measured:
        page faults on fresh file pages cost 3x the pwrite).
        """
        nrow, ncol = self.shape
        t, cr, cc = self.chunks
        gr, gc = self._grid
        n_st = 0 if self._stars is None else self._stars["starid"].size
        self._buffer = {name: _aligned_zeros((gr, gc, t, cr, cc), dtype)
                        for name, dtype in _CUBES}
        # a second set (allocated at the first swap) is filled while this one is written
        self._spare = None
        self._mapped_sets = any(base is not None for base in self._direct.values())
        self._flags_dirty = False
        self._pad = None
        if (gr * cr, gc * cc) != (nrow, ncol):
            # frames that do not fill whole chunks go through a padded copy; the padding
            # is outside the dataset and never read back
            self._pad = {name: np.full((gr * cr, gc * cc), _FILL[name], dtype)
                         for name, dtype in _CUBES}
        self._buffer.update({
            "series": {name: np.empty(self.block, dtype) for name, dtype in _SERIES},
            "wcs": [], "centroids": np.full((self.block, n_st, 2), np.nan),
            "sigma": np.full((self.block, n_st), np.nan),
        })
        self._n_buffered = 0

    def _reset_buffer(self):
        """Re-use the block buffers (allocating them per block costs page faults)."""
        self._buffer["wcs"] = []
        self._buffer["centroids"][:] = np.nan
        self._buffer["sigma"][:] = np.nan
        if self._flags_dirty:
            self._buffer["pixel_flags"][...] = 0
        self._flags_dirty = False

    def _put(self, name, k, frame):
        """Copy one (R, C) frame into slot ``k`` of the chunk-ordered block buffer."""
        buf = self._buffer[name]
        gr, gc, _, cr, cc = buf.shape
        if self._pad is not None:
            pad = self._pad[name]
            pad[:self.shape[0], :self.shape[1]] = frame
            frame = pad
        frame = np.ascontiguousarray(frame, dtype=buf.dtype)
        # copy whole chunk-row runs (cc pixels) as single opaque items: numpy's strided copy
        # then moves 64-byte items instead of looping over 16 floats (5 vs 8 ms per frame)
        run = np.dtype((np.void, cc * buf.itemsize))
        dst = buf.view(run)[..., 0][:, :, k]          # (gr, gc, cr)
        np.copyto(dst.transpose(0, 2, 1), frame.view(run).reshape(gr, cr, gc))

    def _to_frames(self, block):
        """(gr, gc, k, cr, cc) chunk-ordered block -> (k, R, C) frames (a copy)."""
        gr, gc, k, cr, cc = block.shape
        out = block.transpose(2, 0, 3, 1, 4).reshape(k, gr * cr, gc * cc)
        return out[:, :self.shape[0], :self.shape[1]]

    def _to_image(self, plane):
        """(gr, gc, cr, cc) chunk-ordered plane -> (R, C) image."""
        gr, gc, cr, cc = plane.shape
        return plane.transpose(0, 2, 1, 3).reshape(gr * cr, gc * cc)[:self.shape[0],
                                                                     :self.shape[1]]

    def _read_block(self, name, start, stop):
        """(k, R, C) frames ``start:stop`` of a cube (``start`` on a block boundary)."""
        base = self._direct.get(name)
        if base is None:
            return self._file[name][start:stop]
        dtype = dict(_CUBES)[name]
        t, cr, cc = self.chunks
        gr, gc = self._grid
        slab = np.empty((gr, gc, t, cr, cc), dtype)
        view = memoryview(slab).cast("B")
        offset = base + (start // t) * slab.nbytes
        while view.nbytes:
            got = os.preadv(self._fd, [view], offset)
            if got <= 0:
                raise OSError(f"{self.partial}: short read of cube {name}")
            view, offset = view[got:], offset + got
        return np.ascontiguousarray(self._to_frames(slab[:, :, :stop - start]))

    def add_frame(self, image, errors, *, time, time_start, time_stop, timecorr, cadenceno,
                  quality, wcs_header=""):
        """Append the next frame (in time order). Written to disk every ``time_chunk`` frames.

        Parameters
        ----------
        image, errors : ndarray (R, C)
            Calibrated flux and its uncertainty (e-/s), science region.
        wcs_header : str
            FITS header text of the frame's WCS (science-region pixels), "" if none.
        """
        if self.frames_done + self._n_buffered >= self.n_frames:
            raise RuntimeError("more frames than declared")
        if image.shape != self.shape or errors.shape != self.shape:
            raise InputError(f"{self.ffi_files[self.frames_done + self._n_buffered]}: image "
                             f"shape {image.shape} differs from the first frame's {self.shape}")
        if self._buffer is None:
            self._new_buffer()
        elif self._n_buffered == 0:
            self._reset_buffer()
        k = self._n_buffered
        buf = self._buffer
        self._put("images", k, image)
        self._put("errors", k, errors)
        # one comparison finds both NaN and saturated pixels; most frames of most CCDs
        # have neither, and their flags slot is already zero
        with np.errstate(invalid="ignore"):
            clean = bool(np.less_equal(image, self.saturation_level).all())
        if not clean:
            self._put("pixel_flags", k, pixel_flags_for(image, self.saturation_level,
                                                         self.bleed_pad))
            self._flags_dirty = True
        for name, value in (("time", time), ("time_start", time_start), ("time_stop", time_stop),
                            ("timecorr", timecorr), ("cadenceno", cadenceno),
                            ("quality", quality)):
            buf["series"][name][k] = value
        buf["wcs"].append(wcs_header or "")
        if self._stars is not None and self._stars["starid"].size:
            x, y, sig = fit_centroids(image, self._guess[:, 0], self._guess[:, 1],
                                      box=self.kernel_box, errors=errors,
                                      saturation=self.saturation_level)
            buf["centroids"][k, :, 0] = x
            buf["centroids"][k, :, 1] = y
            buf["sigma"][k] = sig
            ok = np.isfinite(x) & np.isfinite(y)
            self._guess[ok, 0] = x[ok]
            self._guess[ok, 1] = y[ok]
        self._n_buffered += 1
        if self._n_buffered == self.block or self.frames_done + self._n_buffered == self.n_frames:
            self.flush()

    def _accumulate(self, k, quality):
        """Add the good frames of the buffered block to the sum-image accumulators.

        The block is summed along time in float64 in one pass (sequentially, in frame order),
        and only pixels whose block sum is not finite (a NaN or inf in some frame) are redone
        excluding the non-finite values. A resumed prepare puts the stored frames through the
        same buffer and the same sum, so it reproduces the accumulators bit for bit.
        """
        good = np.asarray(TESSQualityFlags.filter(quality), bool)
        n_good = int(good.sum())
        if not n_good:
            return
        block = self._buffer["images"][:, :, :k]
        if n_good == k:
            total = block.sum(axis=2, dtype=np.float64)
        else:
            total = block.sum(axis=2, dtype=np.float64, where=good[None, None, :, None, None])
        total = self._to_image(total)
        finite = np.isfinite(total)
        if finite.all():
            self._sum += total
            self._count += n_good
            return
        rows, cols = np.nonzero(~finite)
        _, cr, cc = self.chunks
        values = block[rows // cr, cols // cc, :, rows % cr, cols % cc][:, good]
        ok = np.isfinite(values)
        total[rows, cols] = np.where(ok, values, 0).astype(np.float64).sum(axis=1)
        count = np.full(self.shape, n_good, np.int32)
        count[rows, cols] = ok.sum(axis=1)
        self._sum += total
        self._count += count

    def flush(self):
        """Hand the buffered block (one time-slab of whole chunks) to the writer thread.

        The cube bytes are written by a background thread (pwrite releases the GIL) while
        the caller reads and buffers the next block into the other buffer set; the block's
        ``frames_done`` is committed only once its bytes are written (:meth:`_commit`, at
        the next flush or at the end), so a kill at any point costs at most re-writing the
        blocks not yet committed.
        """
        if not self._n_buffered:
            return
        f = self._file
        start, k = self.frames_done, self._n_buffered
        t = self.chunks[0]
        if start % t:
            raise RuntimeError("blocks must start on a time-chunk boundary")
        sl = slice(start, start + k)
        buf = self._buffer
        jobs = []
        for name, _ in _CUBES:
            block = buf[name]
            base = self._direct[name]
            if base is None:
                f[name][sl] = self._to_frames(block[:, :, :k])
                continue
            if k < t:  # chunk padding past the last frame: fixed bytes, never read back
                block[:, :, k:] = _FILL[name]
            offset = base + (start // t) * block.nbytes
            if name == "pixel_flags" and start >= self._fresh_from:
                # the slab is still a hole in the (sparse) file, which reads as zeros: write
                # only the runs of chunks holding a flag (a few saturated stars per CCD)
                gr, gc = self._grid
                per_chunk = block.nbytes // (gr * gc)
                nonzero = block.reshape(gr * gc, -1).any(axis=1)
                edges = np.flatnonzero(np.diff(np.r_[0, nonzero.view(np.int8), 0]))
                for a, b in zip(edges[::2], edges[1::2]):
                    jobs.append((block.reshape(gr * gc, -1)[a:b], offset + int(a) * per_chunk))
            else:
                jobs.append((block, offset))
        for name, _ in _SERIES:
            f[name][sl] = buf["series"][name][:k]
        f["wcs"][sl] = np.array(buf["wcs"], dtype=object)
        if self._stars is not None and self._stars["starid"].size:
            f["movement/centroids"][sl] = buf["centroids"][:k]
            f["movement/sigma"][sl] = buf["sigma"][:k]
        # the previous block is on disk before this one's frames enter the accumulators, so
        # the accumulators stored with the commit are exactly those of the committed frames
        self._commit()
        self._accumulate(k, buf["series"]["quality"][:k])
        if jobs:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="cache-writer")
            future = self._pool.submit(self._write_jobs, jobs)
        else:
            future = None
        self._pending = (future, start + k)
        self.frames_done = start + k
        self._n_buffered = 0
        self._swap_buffers()

    def _write_jobs(self, jobs):
        for array, offset in jobs:
            self._write(array, offset)

    def _commit(self):
        """Wait for the block being written, then record it (accumulators, frames_done)."""
        if self._pending is None:
            return
        future, frames = self._pending
        self._pending = None
        if future is not None:
            future.result()
        f = self._file
        # sum-image accumulators with the number of frames they include, so a resumed
        # prepare does not have to read the whole stored cube again
        acc = f.require_group("_accumulators")
        if "sum" not in acc:
            acc.create_dataset("sum", shape=self.shape, dtype=np.float64)
            acc.create_dataset("count", shape=self.shape, dtype=np.int32)
        acc["sum"][...] = self._sum
        acc["count"][...] = self._count
        acc.attrs["frames"] = frames
        f.flush()
        f.attrs["frames_done"] = frames
        f.flush()
        logger.info("%s: %d of %d frames stored", self.partial.name, frames, self.n_frames)

    def _swap_buffers(self):
        """Switch to the other set of cube buffers (the writer thread reads this one)."""
        if not self._mapped_sets:
            return
        current = {name: self._buffer[name] for name, _ in _CUBES}
        current["dirty"] = self._flags_dirty
        other = self._spare
        if other is None:
            other = {name: _aligned_zeros(self._buffer[name].shape, dtype)
                     for name, dtype in _CUBES}
            other["dirty"] = False
        self._spare = current
        for name, _ in _CUBES:
            self._buffer[name] = other[name]
        self._flags_dirty = other["dirty"]

    # ------------------------------------------------------------------ after ingest
    def finish_ingest(self, usable=None):
        """Sum image, reference frame and movement kernel, once every frame is stored.

        Parameters
        ----------
        usable : array of bool, optional
            Frames allowed as reference (default: those with a WCS string).
        """
        f = self._file
        if f.attrs["ingest_complete"]:
            return
        self.flush()
        self._commit()
        if self.frames_done != self.n_frames:
            raise RuntimeError(f"ingest stopped at {self.frames_done} of {self.n_frames} frames")
        with np.errstate(invalid="ignore", divide="ignore"):
            sumimage = np.where(self._count > 0, self._sum / np.maximum(self._count, 1), np.nan)
        if "_accumulators" in f:
            del f["_accumulators"]
        if "sumimage" in f:
            del f["sumimage"]
        f.create_dataset("sumimage", data=sumimage, dtype=np.float64)
        f["sumimage"].attrs["n_frames"] = self._count.max() if self._count.size else 0
        if usable is None:
            usable = np.array([bool(s) for s in f["wcs"].asstr()[:]])
        ref = choose_reference_frame(f["time"][:], f["quality"][:], usable)
        nrow, ncol = self.shape
        x0, y0 = (ncol - 1) / 2.0, (nrow - 1) / 2.0
        pset = self.pset
        if self._stars is not None and self._stars["starid"].size:
            kernel = fit_kernel(f["movement/centroids"][:], f["movement/sigma"][:], ref,
                                x0=x0, y0=y0, min_stars=int(pset["kernel_min_affine_stars"]),
                                clip=float(pset["kernel_clip"]))
            n_used = int(np.sum(np.all(np.isfinite(f["movement/centroids"][ref]), axis=1)))
        else:
            logger.warning("%s: no kernel stars; the movement kernel is zero", self.partial)
            kernel = np.zeros((self.n_frames, 6))
            n_used = 0
        if "movement_kernel" in f:
            del f["movement_kernel"]
        ds = f.create_dataset("movement_kernel", data=kernel)
        ds.attrs["n_stars"] = n_used
        f.attrs["kernel_x0"] = x0
        f.attrs["kernel_y0"] = y0
        f.attrs["ref_frame"] = ref
        f.attrs["ingest_complete"] = True
        f.flush()

    def iter_frame_blocks(self):
        """Yield ``(frame_slice, images, errors, pixel_flags)`` blocks of whole time chunks.

        For prepare stages: a block is one time-slab of whole chunks, read with one pread
        per cube (or through h5py for compressed cubes).
        """
        for start in range(0, self.frames_done, self.block):
            sl = slice(start, min(start + self.block, self.frames_done))
            yield sl, *(self._read_block(name, sl.start, sl.stop) for name, _ in _CUBES)

    @property
    def file(self):
        """The open h5py file (read/write) — for prepare stages that need the 1-D arrays."""
        return self._file

    def stage_complete(self, name):
        """Whether prepare stage ``name`` finished in this (possibly resumed) cache."""
        g = self._file.get(f"models/{name}")
        return g is not None and bool(g.attrs.get("complete", False))

    def stage_group(self, name, version):
        """A fresh ``models/<name>`` group (an unfinished one is discarded) for a stage."""
        models = self._file.require_group("models")
        if name in models:
            del models[name]
        g = models.create_group(name)
        g.attrs["version"] = str(version)
        g.attrs["complete"] = False
        return g

    def mark_stage_complete(self, name):
        g = self._file[f"models/{name}"]
        g.attrs["complete"] = True
        self._file.flush()

    def close(self, complete=False):
        """Close; with ``complete=True`` mark the cache complete and rename it into place."""
        try:
            if self._file is not None:
                self._commit()  # a block whose bytes are written is worth keeping
        except Exception as exc:  # noqa: BLE001 - the block is simply not committed
            logger.warning("%s: last block not written (%s)", self.partial, exc)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._close_fd()
        if self._file is None:
            return
        if complete:
            self._file.attrs["complete"] = True
            self._file.close()
            self._file = None
            os.replace(self.partial, self.path)
        else:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(complete=False)


class FFICache:
    """Read-only access to a complete cache, as BasePhotometry and the benchmarks need it.

    Cube pixel indices are science-region indices; add ``row_offset``/``column_offset`` for
    0-based CCD coordinates. 1-D arrays are read once and kept.

    Raises
    ------
    InputError
        For a ``.partial`` file, an incomplete cache, or a file that is not a cache.
    """

    datasource = "ffi"

    def __init__(self, path, rdcc_nbytes=READER_CACHE_BYTES):
        self.path = Path(path)
        if self.path.name.endswith(".partial"):
            raise InputError(f"{self.path}: an unfinished prepare (.partial); run prepare again")
        if not self.path.exists():
            raise InputError(f"{self.path}: cache not found")
        try:
            self._file = h5py.File(self.path, "r", rdcc_nbytes=rdcc_nbytes,
                                   rdcc_nslots=READER_CACHE_SLOTS)
        except OSError as exc:
            raise InputError(f"{self.path}: not a readable HDF5 cache ({exc})") from None
        attrs = self._file.attrs
        if "schema_version" not in attrs or "images" not in self._file:
            self.close()
            raise InputError(f"{self.path}: not a tessphot cache")
        if not bool(attrs.get("complete", False)):
            self.close()
            raise InputError(f"{self.path}: cache is incomplete (prepare did not finish)")
        self.schema_version = int(attrs["schema_version"])
        self.sector = int(attrs["sector"])
        self.camera = int(attrs["camera"])
        self.ccd = int(attrs["ccd"])
        self.cadence = int(attrs["cadence"])
        self.row_offset = int(attrs["row_offset"])
        self.column_offset = int(attrs["column_offset"])
        self.n_frames = int(attrs["n_frames"])
        self.ref_frame = int(attrs["ref_frame"])
        self.settings_hash = str(attrs["settings_hash"])
        self.shape = tuple(self._file["images"].shape[1:])

    # 1-D arrays ---------------------------------------------------------------
    def _series(self, name):
        return self._file[name][:]

    @cached_property
    def time(self):
        """(N,) BTJD mid-exposure times."""
        return self._series("time")

    @cached_property
    def time_start(self):
        """(N,) BTJD exposure starts."""
        return self._series("time_start")

    @cached_property
    def time_stop(self):
        """(N,) BTJD exposure ends."""
        return self._series("time_stop")

    @cached_property
    def timecorr(self):
        """(N,) barycentric correction applied by SPOC (d)."""
        return self._series("timecorr")

    @cached_property
    def cadenceno(self):
        """(N,) cadence numbers (FFIINDEX)."""
        return self._series("cadenceno")

    @cached_property
    def quality(self):
        """(N,) SPOC DQUALITY of each frame."""
        return self._series("quality")

    @cached_property
    def ffi_files(self):
        return list(self._file["ffi_files"].asstr()[:])

    @property
    def attrs(self):
        """Root attributes (a read-only mapping)."""
        return dict(self._file.attrs)

    @cached_property
    def settings(self):
        return json.loads(self._file.attrs["settings"])

    @cached_property
    def sumimage(self):
        """(R, C) mean of the good frames (float64)."""
        return self._file["sumimage"][:]

    def frame_wcs(self, index):
        """Astropy WCS of frame ``index`` (science-region pixels, 0-based), None if absent."""
        text = self._file["wcs"].asstr()[int(index)]
        if not text:
            return None
        header = fits.Header.fromstring(text, sep="\n")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            return WCS(header, relax=True)

    @cached_property
    def reference_wcs(self):
        """WCS of the reference frame (the one the catalog positions use)."""
        return self.frame_wcs(self.ref_frame)

    @cached_property
    def movement_kernel(self):
        """:class:`photometry.movement.MovementKernel` (cube pixel coordinates)."""
        attrs = self._file.attrs
        return MovementKernel(self._file["movement_kernel"][:], self.time,
                              attrs["kernel_x0"], attrs["kernel_y0"], self.ref_frame)

    def stamp(self, name, row_slice, col_slice, frames=slice(None)):
        """(N, r, c) cut of cube ``name`` (images, errors, pixel_flags): one HDF5 selection.

        Slices are clipped to the cube (as numpy does); rows/columns outside give a smaller
        array, so callers clip their stamps to ``shape`` first.
        """
        if name not in ("images", "errors", "pixel_flags"):
            raise KeyError(f"unknown cube '{name}'")
        return self._file[name][frames, row_slice, col_slice]

    def model_group(self, name):
        """The h5py group ``models/<name>`` written by a prepare stage, or None if absent or
        unfinished."""
        g = self._file.get(f"models/{name}")
        if g is None or not bool(g.attrs.get("complete", False)):
            return None
        return g

    @property
    def catalog_path(self):
        """The catalog SQLite next to the cache, or None if it does not exist."""
        p = self.path.with_name(catalog_filename(self.sector, self.camera, self.ccd))
        return p if p.exists() else None

    def close(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
