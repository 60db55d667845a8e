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
import math
import os
import struct
import warnings
import zlib
from functools import cached_property
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers the compression filters for writers and readers
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from photometry.hooks.version import __version__
from photometry.data.chunks import encoder_for, write_block
from photometry.hooks.errors import InputError
from photometry.data.movement import MovementKernel, fit_centroids, fit_kernel
from photometry.hooks.quality import PixelQualityFlags, TESSQualityFlags
from photometry.hooks.settings import settings_hash

__all__ = ["SCHEMA_VERSION", "CacheWriter", "FFICache", "cache_filename", "catalog_filename",
           "pixel_flags_for", "choose_reference_frame"]

logger = logging.getLogger(__name__)

#: Bumped whenever the layout in docs/architecture.md changes incompatibly (2: filtered and
#: checksummed cubes, frame checks, estimated-uncertainty records).
SCHEMA_VERSION = 2

#: Chunk cache of the reader: a 15x15 stamp over 10 000 frames touches at most
#: 6 x ceil(10000/32) chunks of 16 KB (float32, 32x8x16) = 31 MB; 64 MB holds one stamp's
#: chunks of one cube, so re-reading a stamp (resize, errors after images) is free.
READER_CACHE_BYTES = 64 * 1024 ** 2
READER_CACHE_SLOTS = 100_003

_CUBES = (("images", np.float32), ("errors", np.float32), ("pixel_flags", np.uint8))
_FILL = {"images": np.float32(np.nan), "errors": np.float32(np.nan), "pixel_flags": 0}
_SERIES = (("time", np.float64), ("time_start", np.float64), ("time_stop", np.float64),
           ("timecorr", np.float32), ("cadenceno", np.int32), ("quality", np.int32),
           ("errors_estimated", np.float32), ("frame_check", np.uint8))


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


def _input_hash(ffi_files, prepare_hash):
    names = [Path(p).name for p in ffi_files]
    text = json.dumps({"files": names, "settings": prepare_hash}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: ``prepare.compression`` -> HDF5 filter of the cubes (hdf5plugin registers them for every
#: reader that imports this module). Every cube also gets fletcher32 after the filter.
_FILTERS = {"none": lambda: {},
            "bitshuffle-lz4": lambda: dict(hdf5plugin.Bitshuffle(cname="lz4")),
            "bitshuffle-zstd": lambda: dict(hdf5plugin.Bitshuffle(cname="zstd", clevel=1))}


def _compression(settings):
    name = str(settings["prepare"]["compression"]).lower()
    if name not in _FILTERS:
        raise InputError(f"prepare.compression: unknown filter '{name}' "
                         f"({', '.join(_FILTERS)})")
    return _FILTERS[name]()


#: Uncertainties keep this many mantissa bits when ``prepare.precision`` > 0 (relative
#: rounding error <= 2^-9 = 0.2 %, far below the uncertainty's own uncertainty).
ERROR_KEEP_BITS = 8


#: Pixels trimmed at a time (256 KiB per float32 array): the ten passes of the trim then run
#: in the core's cache instead of streaming each 17 MB frame through memory ten times.
TRIM_TILE = 1 << 16

_EXPONENT = np.uint32(0x7F800000)
#: Largest step exponent field whose reciprocal is a normal float (2^(127 - e), e <= 253).
_TOP = np.uint32(254 << 23)


def trim_precision(images, errors, fraction, error_bits=ERROR_KEEP_BITS):
    """Noise-aware precision trim, in place: the low bits that hold only noise become zero.

    Each image pixel is rounded to the nearest multiple of the largest power of two not above
    ``fraction`` x its own uncertainty (the rounding adds at most ``fraction^2 / 12`` of the
    pixel's variance, on average about half that; fpack-style quantisation, but exact in float
    and per pixel); each uncertainty keeps ``error_bits`` mantissa bits. Pixels without a
    finite positive uncertainty are left alone. Zeroed low bits are what the compression
    filter then removes. Every pixel's result depends on that pixel alone, so the frames are
    worked on in tiles of ``TRIM_TILE`` pixels (contiguous frames) with the same result.
    """
    if fraction <= 0:
        return
    drop = 23 - int(error_bits)
    fraction = np.float32(fraction)
    scratch = None
    for image, error in zip(images, errors):
        if image.flags.c_contiguous and error.flags.c_contiguous and image.size > TRIM_TILE:
            if scratch is None:
                scratch = (np.empty(TRIM_TILE, np.uint32), np.empty(TRIM_TILE, np.float32))
            flat_image, flat_error = image.reshape(-1), error.reshape(-1)
            for a in range(0, flat_image.size, TRIM_TILE):
                b = min(a + TRIM_TILE, flat_image.size)
                _trim_part(flat_image[a:b], flat_error[a:b], fraction, drop,
                           scratch[0][:b - a], scratch[1][:b - a])
        else:
            _trim_part(image, error, fraction, drop, np.empty(image.shape, np.uint32),
                       np.empty(image.shape, np.float32))


def _trim_part(image, error, fraction, drop, bits, inv):
    """:func:`trim_precision` of one array pair in place (``bits``, ``inv``: scratch)."""
    np.multiply(error, fraction, out=bits.view(np.float32))
    bits &= _EXPONENT                          # exponent only: a power of two <= the product
    if bits.min() > 0 and bits.max() < _TOP:
        # every step a normal power of two with a normal reciprocal: x / step is x times the
        # exact reciprocal (exponent 254 - e), the same correctly rounded value, without
        # masked ufuncs
        np.subtract(_TOP, bits, out=inv.view(np.uint32))
        np.multiply(image, inv, out=inv)
        np.rint(inv, out=inv)
        np.multiply(inv, bits.view(np.float32), out=image)
    else:   # zero, subnormal, NaN or infinite uncertainties: those pixels stay as they are
        ok = (bits != 0) & (bits != _EXPONENT)
        step = bits.view(np.float32)
        q = np.divide(image, step, where=ok, out=np.zeros_like(image))
        np.rint(q, out=q)
        np.multiply(q, step, out=image, where=ok)
    if drop > 0:
        u = error.view(np.uint32)
        u += np.uint32(1 << (drop - 1))
        u &= np.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF)


#: Frame-check codes stored per frame in the cache's ``frame_check`` (0 = usable).
FRAME_PROBLEMS = {1: "all NaN", 2: "all zero", 3: "constant", 4: "mostly non-finite",
                  5: "absurd level"}
#: A calibrated frame's median outside this range (e-/s) is "absurd": below it cannot be
#: sky, above it is past the full well of every pixel (~1e5 e-/s).
ABSURD_LEVEL = (-100.0, 2.0e5)


def _extrema(image):
    """(min, max) of an image as floats (NaN if any pixel is NaN)."""
    return float(np.min(image)), float(np.max(image))


def check_frame(image, extrema=None):
    """Frame-check code of one calibrated image (0 = usable; see ``FRAME_PROBLEMS``).

    Unusable: no finite pixel, every finite pixel zero, one constant value, fewer than half
    the pixels finite, or a median level outside ``ABSURD_LEVEL``. Two passes (min, max) for
    an ordinary frame, none when the caller has them (``extrema``).
    """
    lo, hi = extrema if extrema is not None else _extrema(image)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = np.isfinite(image)
        n = int(np.count_nonzero(finite))
        if n == 0:
            return 1
        values = image[finite]
        lo, hi = float(values.min()), float(values.max())
        if lo == hi:
            return 2 if lo == 0 else 3
        if n < 0.5 * image.size:
            return 4
    elif lo == hi:
        return 2 if lo == 0 else 3
    sample = image[::7, ::7]
    level = float(np.nanmedian(sample)) if sample.size else lo
    if not ABSURD_LEVEL[0] <= level <= ABSURD_LEVEL[1]:
        return 5
    return 0


def _crc32_text(text):
    return zlib.crc32(text.encode()) & 0xFFFFFFFF


class SumImage:
    """The sum-image accumulators of an ingest: float64 sum and int32 count per pixel of the
    good frames (quality passes ``TESSQualityFlags.DEFAULT_BITMASK``), finite values only."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.sum = np.zeros(self.shape, np.float64)
        self.count = np.zeros(self.shape, np.int32)

    def add(self, block, quality):
        """Add the good frames of a (k, R, C) block.

        The block is summed along time in float64 in one pass (in frame order), and only
        pixels whose block sum is not finite (a NaN or inf in some frame) are redone without
        the non-finite values. A resumed prepare reads the stored frames back through the
        same sum, so it reproduces the accumulators bit for bit.
        """
        good = np.asarray(TESSQualityFlags.filter(quality), bool)
        n_good = int(good.sum())
        if not n_good:
            return
        block = block[good] if n_good < len(good) else block
        total = block.sum(axis=0, dtype=np.float64)
        finite = np.isfinite(total)
        if finite.all():
            self.sum += total
            self.count += n_good
            return
        rows, cols = np.nonzero(~finite)
        values = block[:, rows, cols]
        ok = np.isfinite(values)
        total[rows, cols] = np.where(ok, values, 0).astype(np.float64).sum(axis=0)
        count = np.full(self.shape, n_good, np.int32)
        count[rows, cols] = ok.sum(axis=0)
        self.sum += total
        self.count += count

    def mean(self):
        """(R, C) mean of the good frames, NaN where no frame had a finite value."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.sum / np.maximum(self.count, 1), np.nan)


class CubeWriter:
    """Stores blocks of the three cubes from a background thread (:meth:`submit`).

    Known filter pipelines (``photometry.data.chunks.encoder_for``: bitshuffle + LZ4/zstd +
    fletcher32, or fletcher32 alone) are encoded outside HDF5 in a small thread pool, with
    the GIL released, and stored with ``write_direct_chunk``: the same bytes HDF5 would
    write, without holding the GIL for the compression. All-zero flag chunks are never
    written (they read as the fill value 0).
    """

    def __init__(self, file):
        self._file = file
        self._pool = None
        self._encode_pool = None
        self._encoders = {}

    def submit(self, buf, sl):
        """Start writing frames ``sl`` of the cubes from the buffer set ``buf``; it must not
        change until the returned future is done."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="cache-writer")
        return self._pool.submit(self._write, buf, sl)

    def _write(self, buf, sl):
        """Write one block of the three cubes (the writer thread's job)."""
        k = sl.stop - sl.start
        if self._encode_pool is None:
            self._encode_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="cache-encode")
        for name, _ in _CUBES:
            if name == "pixel_flags" and not buf["flags_dirty"]:
                continue  # all-zero flags: unwritten chunks read as the fill value, 0
            ds = self._file[name]
            if name not in self._encoders:
                self._encoders[name] = encoder_for(ds)
            encoder = self._encoders[name]
            if encoder is None:
                ds[sl] = buf[name][:k]  # a pipeline we do not reproduce: HDF5's filters
            else:
                write_block(ds, encoder, buf[name][:k], sl.start, fill=_FILL[name],
                            skip_zero=name == "pixel_flags", pool=self._encode_pool)

    def shutdown(self):
        """Wait for the threads and stop them."""
        for pool in (self._pool, self._encode_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._encode_pool = None


class CacheWriter:
    """Builds (or resumes) one sector/camera/CCD cache, block by block.

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
    frame-ordered block buffers of ``time_chunk`` frames (images, errors, flags: 2 x 9 bytes
    per pixel per frame; 2.4 GB for 32 full 2048x2048 frames) and the sum-image accumulators;
    never the whole cube, whatever the number of frames.

    Every frame is checked (:func:`check_frame`): an unusable one gets the private quality bit
    ``TESSQualityFlags.UnusableFrame`` and no kernel centroids, so the sum image, the reference
    frame, the movement kernel and the prepare stages leave it out; when more than half of all
    frames are unusable, :meth:`add_frame` raises ``InputError`` naming them.

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
        self.prepare_hash = settings_hash({"prepare": dict(settings["prepare"])}, "prepare")
        self.input_hash = _input_hash(self.ffi_files, self.prepare_hash)
        self.plugin_versions = plugin_versions or {}
        self.block = int(min(int(self.pset["time_chunk"]), self.n_frames))
        s = self.pset["spatial_chunk"]
        s_row, s_col = (int(s), int(s)) if np.ndim(s) == 0 else (int(s[0]), int(s[1]))
        self.chunks = (self.block, min(s_row, self.shape[0]), min(s_col, self.shape[1]))
        self.saturation_level = float(self.pset["saturation_level"])
        self.bleed_pad = int(self.pset["saturation_bleed_pad"])
        self.kernel_box = int(self.pset["kernel_box"])
        self.precision = float(self.pset["precision"])
        if not 0 <= self.precision <= 1:
            raise InputError(f"prepare.precision: must be in [0, 1] (got {self.precision})")
        self._compression = _compression(settings)  # validated before any file is touched
        self._file = None
        self._buffer = None
        self._spare = None
        self._n_buffered = 0
        self._cubes = None
        self._pending = None
        self._consumers = []
        self._noise_defaulted = set()
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
                    f"{self.path}: a cache made from other input files, settings or an older "
                    "tessphot exists (use --overwrite to replace it)")
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
                    self.frames_done = int(self._file.attrs["frames_done"])
                    self._restore()
                    logger.warning("%s: resuming after %d of %d frames", self.partial,
                                   self.frames_done, self.n_frames)
                    return "resume"
                except Exception as exc:  # noqa: BLE001 - a damaged partial is rebuilt
                    logger.warning("%s: cannot be resumed (%s); starting over", self.partial, exc)
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
        # "latest" format: every metadata block (object headers, the fixed-array chunk index)
        # carries a checksum; with fletcher32 on every dataset, damage anywhere is detected.
        # Its superblock flags a file open for writing, which a killed prepare leaves set;
        # clear_write_flag resets it on resume.
        f = h5py.File(self.partial, "w", libver="latest")
        n, (nrow, ncol) = self.n_frames, self.shape
        for name, dtype in _CUBES:
            f.create_dataset(name, shape=(n, nrow, ncol), dtype=dtype, chunks=self.chunks,
                             fillvalue=_FILL[name], fletcher32=True, **self._compression)
        for name, dtype in _SERIES:
            fill = np.nan if np.issubdtype(dtype, np.floating) else 0
            f.create_dataset(name, shape=(n,), dtype=dtype, fillvalue=fill, fletcher32=True,
                             chunks=(min(n, 4096),))
        str_dt = h5py.string_dtype()
        # variable-length strings cannot be filtered: a CRC32 of each string beside them
        f.create_dataset("wcs", shape=(n,), dtype=str_dt)
        f.create_dataset("wcs_crc32", shape=(n,), dtype=np.uint32, fletcher32=True,
                         chunks=(min(n, 4096),))
        names = [Path(p).name for p in self.ffi_files]
        f.create_dataset("ffi_files", data=np.array(names, dtype=object), dtype=str_dt)
        f["ffi_files"].attrs["crc32"] = _crc32_text("\n".join(names))
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
        attrs["compression"] = str(self.pset["compression"]).lower()
        attrs["precision"] = self.precision
        attrs["noise_defaulted"] = ""
        f.flush()
        self._file = f
        self.frames_done = 0
        self._sums = SumImage(self.shape)
        self._stars = None

    def _restore(self):
        """Rebuild the in-memory state of a resumed partial from what it stores.

        The sum-image accumulators are recomputed from the stored cube (reading it also
        proves the stored blocks are intact: a damaged one raises and prepare starts over).
        """
        f = self._file
        if f.attrs["ingest_complete"]:
            self.frames_done = self.n_frames
        self._noise_defaulted = {k for k in str(f.attrs.get("noise_defaulted", "")).split(",")
                                 if k}
        self._sums = SumImage(self.shape)
        acc = f.get("_accumulators")
        if f.attrs["ingest_complete"]:
            pass
        elif acc is not None and int(acc.attrs["frames"]) == self.frames_done:
            # the accumulators stored with the last complete block: no need to read the cube
            self._sums.sum[...] = acc["sum"][()]
            self._sums.count[...] = acc["count"][()]
        else:
            # killed between storing the accumulators and advancing frames_done: recompute
            quality = f["quality"][:self.frames_done]
            for start in range(0, self.frames_done, self.block):
                stop = min(start + self.block, self.frames_done)
                self._sums.add(f["images"][start:stop], quality[start:stop])
        if not f.attrs["ingest_complete"]:
            self._drop_uncommitted_wcs()
        self._stars = None
        if "movement/centroids" in f:
            g = f["movement"]
            self._stars = {"starid": g["starid"][:], "column": g["column"][:],
                           "row": g["row"][:]}
            cen = g["centroids"][:self.frames_done]
            self._guess = self._last_positions(cen)

    def _drop_uncommitted_wcs(self):
        """Re-create the ``wcs`` strings with only the committed frames' values.

        Why: a block's strings enter the file before its commit; a kill then can leave
        entries past ``frames_done`` pointing into a global-heap collection beyond the file's
        recorded end, and overwriting a variable-length string first frees the old one, so
        the resumed write failed ("address of object past end of allocation"). A fresh
        dataset has no old strings to free.
        """
        f = self._file
        kept = f["wcs"][:self.frames_done]
        del f["wcs"]
        f.create_dataset("wcs", shape=(self.n_frames,), dtype=h5py.string_dtype())
        if self.frames_done:
            f["wcs"][:self.frames_done] = kept

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
        usable frame's WCS); each later frame starts from the star's previous measured
        position.
        """
        if self.frames_done or self._n_buffered:
            raise RuntimeError("kernel stars must be set before the first frame")
        f = self._file
        if "movement" in f:
            del f["movement"]
        g = f.create_group("movement")
        starid = np.asarray(starid, np.int64)
        n = starid.size
        kw = dict(fletcher32=True) if n else {}
        g.create_dataset("starid", data=starid, **kw)
        g.create_dataset("column", data=np.asarray(column, float), **kw)
        g.create_dataset("row", data=np.asarray(row, float), **kw)
        g.create_dataset("centroids", shape=(self.n_frames, n, 2), dtype=np.float64,
                         fillvalue=np.nan, chunks=(self.block, n, 2) if n else None, **kw)
        g.create_dataset("sigma", shape=(self.n_frames, n), dtype=np.float64,
                         fillvalue=np.nan, chunks=(self.block, n) if n else None, **kw)
        self._stars = {"starid": starid, "column": np.asarray(column, float),
                       "row": np.asarray(row, float)}
        self._guess = np.column_stack([self._stars["column"], self._stars["row"]])
        for buf in (self._buffer, self._spare):  # allocated by next_frame_buffers already
            if buf is not None:
                buf["centroids"] = np.full((self.block, n, 2), np.nan)
                buf["sigma"] = np.full((self.block, n), np.nan)

    def _new_buffer(self):
        """One set of frame-ordered block buffers (allocated once and re-used: a fresh
        17 MB array costs a page fault per 4 KiB on every frame)."""
        n_st = 0 if self._stars is None else self._stars["starid"].size
        buf = {name: np.zeros((self.block,) + self.shape, dtype) for name, dtype in _CUBES}
        buf.update({
            "series": {name: np.zeros(self.block, dtype) for name, dtype in _SERIES},
            "wcs": [], "centroids": np.full((self.block, n_st, 2), np.nan),
            "sigma": np.full((self.block, n_st), np.nan), "flags_dirty": False,
        })
        return buf

    def next_frame_buffers(self):
        """(image, errors): the block-buffer slots the next :meth:`add_frame` fills. A reader
        that writes the frame straight into them (``read_ffi(..., out=...)``) saves the copy;
        they are re-used once the block is written, so nothing may keep them."""
        if self._buffer is None:
            self._buffer = self._new_buffer()
        k = self._n_buffered
        return self._buffer["images"][k], self._buffer["errors"][k]

    def add_frame(self, image, errors, *, time, time_start, time_stop, timecorr, cadenceno,
                  quality, wcs_header="", errors_estimated=0.0, noise_defaulted=()):
        """Append the next frame (in time order). Written to disk every ``time_chunk`` frames.

        Parameters
        ----------
        image, errors : ndarray (R, C)
            Calibrated flux and its uncertainty (e-/s), science region.
        wcs_header : str
            FITS header text of the frame's WCS (science-region pixels), "" if none.
        errors_estimated : float
            Fraction of the frame's finite pixels whose uncertainty was estimated
            (``FFIFrame.uncert_estimated``); ``noise_defaulted`` the header keywords the
            estimate took defaults for.
        """
        index = self.frames_done + self._n_buffered
        if index >= self.n_frames:
            raise RuntimeError("more frames than declared")
        if image.shape != self.shape or errors.shape != self.shape:
            raise InputError(f"{self.ffi_files[index]}: image shape {image.shape} differs "
                             f"from the first frame's {self.shape}")
        if self._buffer is None:
            self._buffer = self._new_buffer()
        elif self._n_buffered == 0:
            self._reset_buffer()
        k = self._n_buffered
        buf = self._buffer
        for name, array in (("images", image), ("errors", errors)):
            slot = buf[name][k]
            if array.__array_interface__["data"][0] != slot.__array_interface__["data"][0]:
                np.copyto(slot, array)   # not read into the slot (next_frame_buffers)
        image = buf["images"][k]
        extrema = _extrema(image)
        problem = check_frame(image, extrema)
        if problem:
            quality = int(quality) | int(TESSQualityFlags.UnusableFrame)
        # the maximum finds both NaN (it propagates) and saturated pixels; most frames of
        # most CCDs have neither, and their flags slot is already zero
        clean = extrema[1] <= self.saturation_level
        if not clean:
            buf["pixel_flags"][k] = pixel_flags_for(image, self.saturation_level,
                                                    self.bleed_pad)
            buf["flags_dirty"] = True
        for name, value in (("time", time), ("time_start", time_start), ("time_stop", time_stop),
                            ("timecorr", timecorr), ("cadenceno", cadenceno),
                            ("quality", quality), ("errors_estimated", errors_estimated),
                            ("frame_check", problem)):
            buf["series"][name][k] = value
        if errors_estimated:
            self._noise_defaulted.update(noise_defaulted)
        buf["wcs"].append(wcs_header or "")
        if self._stars is not None and self._stars["starid"].size and not problem:
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
        if problem:
            self._refuse_if_mostly_unusable()
        if self._n_buffered == self.block or self.frames_done + self._n_buffered == self.n_frames:
            self.flush()

    def _reset_buffer(self):
        buf = self._buffer
        buf["wcs"] = []
        buf["centroids"][:] = np.nan
        buf["sigma"][:] = np.nan
        if buf["flags_dirty"]:
            buf["pixel_flags"][...] = 0
        buf["flags_dirty"] = False

    def unusable_frames(self):
        """{frame index: problem text} of the frames stored or buffered so far."""
        codes = np.zeros(self.n_frames, np.uint8)
        if self.frames_done:
            codes[:self.frames_done] = self._file["frame_check"][:self.frames_done]
        if self._buffer is not None and self._n_buffered:
            codes[self.frames_done:self.frames_done + self._n_buffered] = \
                self._buffer["series"]["frame_check"][:self._n_buffered]
        return {int(i): FRAME_PROBLEMS.get(int(codes[i]), "unusable")
                for i in np.flatnonzero(codes)}

    def _describe_frames(self, bad, limit=5):
        """'all zero: a.fits, b.fits; all NaN: c.fits' (at most ``limit`` names)."""
        by_problem = {}
        for i, problem in bad.items():
            by_problem.setdefault(problem, []).append(Path(self.ffi_files[i]).name)
        parts, shown = [], 0
        for problem, names in by_problem.items():
            take = names[:max(limit - shown, 1)]
            shown += len(take)
            more = f" and {len(names) - len(take)} more" if len(names) > len(take) else ""
            parts.append(f"{problem}: {', '.join(take)}{more}")
        return "; ".join(parts)

    def _refuse_if_mostly_unusable(self):
        bad = self.unusable_frames()
        if len(bad) > self.n_frames / 2:
            raise InputError(
                f"{Path(self.ffi_files[0]).parent}: {len(bad)} of {self.n_frames} frames are "
                f"unusable ({self._describe_frames(bad)}); refusing to build a cache from them")

    def flush(self):
        """Hand the buffered block (one time-slab of whole chunks) to the writer thread.

        The precision trim (``prepare.precision``) is applied first, so the sum image and the
        prepare stages see exactly the stored values. The cube bytes are compressed and
        written by a background thread while the caller reads the next block into the other
        buffer set; the block's ``frames_done`` is committed only once its bytes are written
        (:meth:`_commit`, at the next flush or at the end), so a kill at any point costs at
        most re-writing the blocks not yet committed.
        """
        if not self._n_buffered:
            return
        f = self._file
        start, k = self.frames_done, self._n_buffered
        if start % self.block:
            raise RuntimeError("blocks must start on a time-chunk boundary")
        sl = slice(start, start + k)
        buf = self._buffer
        trim_precision(buf["images"][:k], buf["errors"][:k], self.precision)
        # the previous block is on disk before this one's series and frames enter the file
        # and the accumulators, so the accumulators stored with a commit are exactly those
        # of the committed frames
        self._commit()
        for name, _ in _SERIES:
            f[name][sl] = buf["series"][name][:k]
        f["wcs"][sl] = np.array(buf["wcs"], dtype=object)
        f["wcs_crc32"][sl] = np.array([_crc32_text(t) for t in buf["wcs"]], np.uint32)
        if self._stars is not None and self._stars["starid"].size:
            f["movement/centroids"][sl] = buf["centroids"][:k]
            f["movement/sigma"][sl] = buf["sigma"][:k]
        f.attrs["noise_defaulted"] = ",".join(sorted(self._noise_defaulted))
        self._sums.add(buf["images"][:k], buf["series"]["quality"][:k])
        if self._cubes is None:
            self._cubes = CubeWriter(f)
        future = self._cubes.submit(buf, sl)
        self._pending = (future, start + k)
        if self._consumers:
            # streaming prepare stages fit the block while the writer thread stores it
            usable = buf["series"]["frame_check"][:k] == 0
            for consume in self._consumers:
                consume(sl, buf["images"][:k], buf["errors"][:k], buf["pixel_flags"][:k],
                        usable)
        self.frames_done = start + k
        self._n_buffered = 0
        # the other buffer set is filled while the writer thread writes this one
        self._buffer, self._spare = self._spare, buf

    def add_block_consumer(self, consume):
        """Call ``consume(frames, images, errors, pixel_flags, usable)`` with every block
        from now on, as stored (trimmed), before its buffers are re-used (streaming prepare
        stages; :class:`photometry.data.stages.StreamingStage`)."""
        self._consumers.append(consume)

    def replay_blocks(self, consume):
        """Feed the blocks already stored (a resumed prepare) to ``consume``, as
        :meth:`add_block_consumer` would have."""
        usable = self.usable_frames
        for sl, images, errors, flags in self.iter_frame_blocks():
            consume(sl, images, errors, flags, usable[sl])

    def _commit(self):
        """Wait for the block being written, then record it (accumulators, frames_done)."""
        if self._pending is None:
            return
        future, frames = self._pending
        self._pending = None
        future.result()
        f = self._file
        # sum-image accumulators with the number of frames they include, so a resumed
        # prepare does not have to read the whole stored cube again
        acc = f.require_group("_accumulators")
        if "sum" not in acc:
            acc.create_dataset("sum", shape=self.shape, dtype=np.float64)
            acc.create_dataset("count", shape=self.shape, dtype=np.int32)
        acc["sum"][...] = self._sums.sum
        acc["count"][...] = self._sums.count
        acc.attrs["frames"] = frames
        f.flush()
        f.attrs["frames_done"] = frames
        f.flush()
        logger.info("%s: %d of %d frames stored", self.partial.name, frames, self.n_frames)

    # ------------------------------------------------------------------ after ingest
    def finish_ingest(self, usable=None):
        """Sum image, reference frame and movement kernel, once every frame is stored.

        Unusable frames (frame checks) are named in one warning; they are already out of the
        sum image, and here out of the reference-frame choice and the kernel (NaN rows).

        Parameters
        ----------
        usable : array of bool, optional
            Frames allowed as reference (default: those with a WCS string and passing the
            frame checks).
        """
        f = self._file
        if f.attrs["ingest_complete"]:
            return
        self.flush()
        self._commit()
        if self.frames_done != self.n_frames:
            raise RuntimeError(f"ingest stopped at {self.frames_done} of {self.n_frames} frames")
        bad = self.unusable_frames()
        if len(bad) > self.n_frames / 2:
            self._refuse_if_mostly_unusable()
        if bad:
            logger.warning("%s: %d of %d frames unusable (%s): flagged with quality bit "
                           "2^30 (UnusableFrame) and left out of the sum image, the movement "
                           "kernel and the prepare-stage models", self.partial.name, len(bad),
                           self.n_frames, self._describe_frames(bad, limit=20))
        sumimage = self._sums.mean()
        if "_accumulators" in f:
            del f["_accumulators"]
        if "sumimage" in f:
            del f["sumimage"]
        f.create_dataset("sumimage", data=sumimage, dtype=np.float64, fletcher32=True,
                         chunks=True)
        count = self._sums.count
        f["sumimage"].attrs["n_frames"] = count.max() if count.size else 0
        checked = f["frame_check"][:] == 0
        if usable is None:
            usable = np.array([bool(s) for s in f["wcs"].asstr()[:]])
        usable = np.asarray(usable, bool) & checked
        ref = choose_reference_frame(f["time"][:], f["quality"][:], usable)
        estimated = f["errors_estimated"][:]
        f.attrs["errors_estimated"] = float(np.mean(estimated[checked])) if checked.any() \
            else float(np.mean(estimated))
        if f.attrs["errors_estimated"] > 0:
            logger.warning("%s: %.1f%% of the pixel uncertainties estimated from the pixels "
                           "(the FFIs lack them)%s", self.partial.name,
                           100 * f.attrs["errors_estimated"],
                           f"; defaults for {f.attrs['noise_defaulted']}"
                           if f.attrs["noise_defaulted"] else "")
        nrow, ncol = self.shape
        x0, y0 = (ncol - 1) / 2.0, (nrow - 1) / 2.0
        pset = self.pset
        if self._stars is not None and self._stars["starid"].size:
            kernel = fit_kernel(f["movement/centroids"][:], f["movement/sigma"][:], ref,
                                x0=x0, y0=y0, min_stars=int(pset["kernel_min_affine_stars"]),
                                clip=float(pset["kernel_clip"]))
            kernel[~checked] = np.nan
            n_used = int(np.sum(np.all(np.isfinite(f["movement/centroids"][ref]), axis=1)))
        else:
            logger.warning("%s: no kernel stars; the movement kernel is zero", self.partial)
            kernel = np.zeros((self.n_frames, 6))
            n_used = 0
        if "movement_kernel" in f:
            del f["movement_kernel"]
        ds = f.create_dataset("movement_kernel", data=kernel, fletcher32=True, chunks=True)
        ds.attrs["n_stars"] = n_used
        f.attrs["kernel_x0"] = x0
        f.attrs["kernel_y0"] = y0
        f.attrs["ref_frame"] = ref
        f.attrs["ingest_complete"] = True
        f.flush()

    def iter_frame_blocks(self):
        """Yield ``(frame_slice, images, errors, pixel_flags)`` blocks of whole time chunks.

        For prepare stages; frames that failed the frame checks are in the blocks (so the
        indices stay those of the cache) but flagged in ``usable_frames``.
        """
        for start in range(0, self.frames_done, self.block):
            sl = slice(start, min(start + self.block, self.frames_done))
            yield sl, *(self._file[name][sl] for name, _ in _CUBES)

    @property
    def usable_frames(self):
        """(N,) bool: frames that passed the frame checks (prepare stages fit only these)."""
        return self._file["frame_check"][:] == 0

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
        """Checksum the stage's datasets (:func:`checksum_group`) and mark it complete."""
        g = self._file[f"models/{name}"]
        checksum_group(g)
        g.attrs["complete"] = True
        self._file.flush()

    def close(self, complete=False):
        """Close; with ``complete=True`` mark the cache complete and rename it into place."""
        try:
            if self._file is not None:
                self._commit()  # a block whose bytes are written is worth keeping
        except Exception as exc:  # noqa: BLE001 - the block is simply not committed
            logger.warning("%s: last block not written (%s)", self.partial, exc)
        if self._cubes is not None:
            self._cubes.shutdown()
            self._cubes = None
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


def checksum_group(group):
    """Give every numeric dataset under ``group`` a fletcher32 checksum, in place.

    Why here: prepare stages are plugins that create their datasets with plain h5py calls;
    rather than asking each to pass ``fletcher32=True``, the finished group's datasets are
    re-created with it (same data, chunks, attributes). Scalar, empty and variable-length
    datasets cannot be filtered in HDF5 and are left as they are.
    """
    items = []
    group.visititems(lambda name, obj: items.append(name) if isinstance(obj, h5py.Dataset)
                     else None)
    for name in items:
        ds = group[name]
        if ds.fletcher32 or ds.shape in ((), None) or ds.size == 0 or ds.dtype.kind == "O" \
                or h5py.check_vlen_dtype(ds.dtype) is not None:
            continue
        data, attrs = ds[()], dict(ds.attrs)
        chunks, filters = ds.chunks, {}
        if ds.compression:
            filters = {"compression": ds.compression, "compression_opts": ds.compression_opts}
        fill = ds.fillvalue
        del group[name]
        new = group.create_dataset(name, data=data, chunks=chunks or True, fletcher32=True,
                                   fillvalue=fill, **filters)
        for key, value in attrs.items():
            new.attrs[key] = value


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
        if int(attrs["schema_version"]) != SCHEMA_VERSION:
            version = int(attrs["schema_version"])
            self.close()
            raise InputError(f"{self.path}: cache schema {version}, this tessphot reads "
                             f"{SCHEMA_VERSION}; run prepare again with --overwrite")
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

    def _read(self, name, selection=()):
        """``self._file[name][selection]``; damage (a failed checksum or filter) raises
        ``InputError`` naming the file and the dataset."""
        try:
            return self._file[name][selection]
        except OSError as exc:
            raise InputError(f"{self.path}: dataset '{name}' is damaged (checksum or "
                             f"decompression failed: {' '.join(str(exc).split())})") from None

    # 1-D arrays ---------------------------------------------------------------
    def _series(self, name):
        return self._read(name)

    @cached_property
    def errors_estimated(self):
        """Fraction of the pixel uncertainties estimated from the pixels (0: all from the
        FFIs), over the usable frames; the light-curve header's ERR_EST."""
        return float(self._file.attrs.get("errors_estimated", 0.0))

    @cached_property
    def noise_defaulted(self):
        """Header keywords the uncertainty estimate took documented defaults for."""
        return tuple(k for k in str(self._file.attrs.get("noise_defaulted", "")).split(",")
                     if k)

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
        names = list(self._file["ffi_files"].asstr()[:])
        if _crc32_text("\n".join(names)) != int(self._file["ffi_files"].attrs["crc32"]):
            raise InputError(f"{self.path}: dataset 'ffi_files' is damaged (CRC32 mismatch)")
        return names

    @property
    def attrs(self):
        """Root attributes (a read-only mapping)."""
        # read once: h5py reads every attribute from the file on each access (~1 ms for the
        # ~30 root attributes), and the light-curve writer asks several times per target
        cached = self.__dict__.get("_root_attrs")
        if cached is None:
            cached = self.__dict__["_root_attrs"] = dict(self._file.attrs)
        return dict(cached)

    @cached_property
    def settings(self):
        return json.loads(self._file.attrs["settings"])

    @cached_property
    def sumimage(self):
        """(R, C) mean of the good frames (float64)."""
        return self._read("sumimage")

    def frame_wcs(self, index):
        """Astropy WCS of frame ``index`` (science-region pixels, 0-based), None if absent."""
        index = int(index)
        text = self._file["wcs"].asstr()[index]
        if _crc32_text(text) != int(self._read("wcs_crc32", index)):
            raise InputError(f"{self.path}: dataset 'wcs' is damaged at frame {index} "
                             "(CRC32 mismatch)")
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
        """:class:`photometry.data.movement.MovementKernel` (cube pixel coordinates)."""
        attrs = self._file.attrs
        return MovementKernel(self._read("movement_kernel"), self.time,
                              attrs["kernel_x0"], attrs["kernel_y0"], self.ref_frame)

    def stamp(self, name, row_slice, col_slice, frames=slice(None)):
        """(N, r, c) cut of cube ``name`` (images, errors, pixel_flags): one HDF5 selection.

        Slices are clipped to the cube (as numpy does); rows/columns outside give a smaller
        array, so callers clip their stamps to ``shape`` first.
        """
        if name not in ("images", "errors", "pixel_flags"):
            raise KeyError(f"unknown cube '{name}'")
        return self._read(name, (frames, row_slice, col_slice))

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
