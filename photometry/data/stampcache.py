"""A worker's stamp cache: whole blocks of a cache's cubes kept in memory, shared by the
neighbouring targets that follow each other in the claim order.

Why: a 15 x 15 stamp over N frames touches 2-3 x 1-2 spatial chunks of (32, 8, 16) in each
of three cubes, ``3 x 6 x N / 32`` chunk reads of 16 kB (555 at 1 282 frames) that are
decompressed for 3.4 x the pixels the stamp needs, and once the cache no longer fits in the
page cache, random disk reads. Tasks are claimed in position order
(``taskstore.CLAIM_ORDER``: bands of 32 rows, by column), so the next targets lie in the
same blocks; a block of whole chunks (all frames, about ``block_bytes`` for its three
cubes) is read and decompressed once and every stamp inside it is a copy. The
next task's blocks are announced to the kernel (``posix_fadvise(WILLNEED)`` on their chunks'
byte ranges) while the current one runs, so its disk reads overlap the computation without
a thread competing for the GIL.

A stamp is exactly what a direct read returns (the same bytes, copied), so light curves do
not depend on the cache (tested). Requests for some frames only, or larger than a quarter of
the cache, go straight to the source.
"""
import collections
import logging
import os

import numpy as np

__all__ = ["BlockCache", "DEFAULT_BLOCK_BYTES"]

logger = logging.getLogger(__name__)

#: bytes of one block (three cubes, all frames): 48 x 48 px at 1 282 frames, 16 x 16 at
#: 11 800 (chunks of 8 x 16 px)
DEFAULT_BLOCK_BYTES = 24 * 1024 ** 2
_CUBES = ("images", "errors", "pixel_flags")


class BlockCache:
    """Wraps an open :class:`photometry.data.cache.FFICache`; ``stamp`` is served from blocks.

    Every other attribute is the source's. ``max_bytes`` bounds the blocks kept (least
    recently used go first); ``prefetch(row_slice, col_slice)`` announces a coming stamp.
    """

    def __init__(self, source, max_bytes, block_bytes=DEFAULT_BLOCK_BYTES):
        self.source = source
        self.max_bytes = int(max_bytes)
        f = source._file
        ds = f["images"]
        n, self._R, self._C = ds.shape
        chunk = ds.chunks or (n, self._R, self._C)
        per_px = max(1, n) * sum(f[c].dtype.itemsize for c in _CUBES if c in f)
        # whole chunks, about square, about block_bytes
        side = max(1.0, np.sqrt(block_bytes / per_px))
        self.block = (int(max(1, round(side / chunk[1]))) * chunk[1],
                      int(max(1, round(side / chunk[2]))) * chunk[2])
        self._chunk = chunk
        self._nbytes = {}   # bytes of one block of each cube (an HDF5 look-up per stamp otherwise)
        self._blocks = collections.OrderedDict()
        self._bytes = 0
        self._advised = set()
        self.stats = {"hits": 0, "blocks_read": 0, "direct": 0, "bytes_read": 0}

    def __getattr__(self, name):
        return getattr(self.source, name)

    # ---------------------------------------------------------------- stamps
    def _span(self, sel, n):
        start, stop, step = sel.indices(n)
        return (start, stop) if step == 1 else None

    def _block_range(self, lo, hi, size):
        return range(lo // size, (hi - 1) // size + 1) if hi > lo else range(0)

    def stamp(self, name, row_slice, col_slice, frames=slice(None)):
        """(N, r, c) cut of cube ``name``, as :meth:`FFICache.stamp`."""
        rows = self._span(row_slice, self._R) if isinstance(row_slice, slice) else None
        cols = self._span(col_slice, self._C) if isinstance(col_slice, slice) else None
        whole = isinstance(frames, slice) and frames == slice(None)
        if name not in _CUBES or rows is None or cols is None or not whole \
                or self.max_bytes <= 0:
            self.stats["direct"] += 1
            return self.source.stamp(name, row_slice, col_slice, frames)
        (r0, r1), (c0, c1) = rows, cols
        bh, bw = self.block
        keys = [(name, i, j) for i in self._block_range(r0, r1, bh)
                for j in self._block_range(c0, c1, bw)]
        if len(keys) * self._block_nbytes(name) > self.max_bytes // 4 or not keys:
            self.stats["direct"] += 1
            return self.source.stamp(name, row_slice, col_slice, frames)
        parts = [(key, self._get(key)) for key in keys]
        out = np.empty((parts[0][1].shape[0], r1 - r0, c1 - c0), dtype=parts[0][1].dtype)
        for (_, i, j), data in parts:
            br, bc = i * bh, j * bw
            a, b = max(r0, br), min(r1, br + data.shape[1])
            c, d = max(c0, bc), min(c1, bc + data.shape[2])
            out[:, a - r0:b - r0, c - c0:d - c0] = data[:, a - br:b - br, c - bc:d - bc]
        return out

    def _block_nbytes(self, name):
        if name not in self._nbytes:
            ds = self.source._file[name]
            self._nbytes[name] = ds.shape[0] * self.block[0] * self.block[1] * ds.dtype.itemsize
        return self._nbytes[name]

    def _get(self, key):
        data = self._blocks.get(key)
        if data is not None:
            self._blocks.move_to_end(key)
            self.stats["hits"] += 1
            return data
        name, i, j = key
        bh, bw = self.block
        data = self.source.stamp(name, slice(i * bh, min(self._R, (i + 1) * bh)),
                                 slice(j * bw, min(self._C, (j + 1) * bw)))
        self._blocks[key] = data
        self._bytes += data.nbytes
        self.stats["blocks_read"] += 1
        self.stats["bytes_read"] += data.nbytes
        while self._bytes > self.max_bytes and len(self._blocks) > 1:
            _, old = self._blocks.popitem(last=False)
            self._bytes -= old.nbytes
        return data

    # ---------------------------------------------------------------- prefetch
    def prefetch(self, row_slice, col_slice):
        """Ask the kernel to read the chunks of a coming stamp's blocks that are not in
        memory (asynchronous; no effect where ``posix_fadvise`` does not exist)."""
        if not hasattr(os, "posix_fadvise") or self.max_bytes <= 0:
            return 0
        rows = self._span(row_slice, self._R)
        cols = self._span(col_slice, self._C)
        if rows is None or cols is None:
            return 0
        bh, bw = self.block
        ranges = []
        f = self.source._file
        for name in _CUBES:
            if name not in f:
                continue
            ds = f[name]
            if ds.chunks is None:
                continue
            for i in self._block_range(*rows, bh):
                for j in self._block_range(*cols, bw):
                    key = (name, i, j)
                    if key in self._blocks or key in self._advised:
                        continue
                    self._advised.add(key)
                    ranges.extend(_chunk_ranges(ds, (i * bh, min(self._R, (i + 1) * bh)),
                                                (j * bw, min(self._C, (j + 1) * bw))))
        if len(self._advised) > 4096:
            self._advised.clear()
        if not ranges:
            return 0
        try:
            fd = os.open(self.source.path, os.O_RDONLY)
        except OSError:
            return 0
        try:
            for start, length in _merge(ranges):
                os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
        return len(ranges)


def _chunk_ranges(ds, rows, cols):
    """(byte offset, size) in the file of the chunks of ``ds`` covering rows x cols."""
    t, cr, cc = ds.chunks
    out = []
    info = ds.id.get_chunk_info_by_coord
    for k in range(0, ds.shape[0], t):
        for r in range(rows[0] - rows[0] % cr, rows[1], cr):
            for c in range(cols[0] - cols[0] % cc, cols[1], cc):
                try:
                    chunk = info((k, r, c))
                except (KeyError, ValueError, RuntimeError):
                    continue
                if chunk.byte_offset is not None and chunk.size:
                    out.append((int(chunk.byte_offset), int(chunk.size)))
    return out


def _merge(ranges, gap=65536):
    """Byte ranges sorted and merged where they are closer than ``gap`` bytes."""
    ranges = sorted(ranges)
    merged = [list(ranges[0])]
    for start, size in ranges[1:]:
        last = merged[-1]
        if start <= last[0] + last[1] + gap:
            last[1] = max(last[1], start + size - last[0])
        else:
            merged.append([start, size])
    return merged
