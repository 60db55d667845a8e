"""Filtered HDF5 chunks encoded outside HDF5: bitshuffle + LZ4 (or zstd) and fletcher32.

Why: through h5py the filter pipeline (bitshuffle, LZ4, fletcher32) runs inside HDF5 while
h5py holds the GIL, so the cache writer thread could not overlap with the frame reading,
and HDF5 filters one chunk at a time on one core. Here a whole row of chunks is gathered
into chunk order and compressed by one ``bitshuffle`` call (C, GIL released, OpenMP over
its blocks), the fletcher32 checksums by HDF5's own C function (numpy where it cannot be
found), and HDF5 only stores the finished bytes (``H5Dwrite_chunk``). The result is byte
for byte what HDF5's own pipeline writes for LZ4 (tests compare the raw chunks; zstd bodies
may differ between zstd versions but decode to the same values), and every reader (plain
h5py with ``hdf5plugin``) verifies the checksums as usual.

Chunk format of the bitshuffle filter (HDF5 filter 32008, as ``hdf5plugin`` writes it):
8-byte big-endian uncompressed size, 4-byte big-endian block size in bytes, then per block
a 4-byte big-endian compressed size and the compressed bitshuffled block. The fletcher32
filter appends HDF5's Fletcher checksum of the filtered bytes, little-endian.
"""
import struct

import numpy as np

__all__ = ["fletcher32", "fletcher32_many", "ChunkEncoder", "encoder_for", "write_block"]

_MASK32 = np.uint64(0xFFFFFFFF)
_BITSHUFFLE = 32008
_FLETCHER32 = 3
_BSHUF_TARGET_BLOCK_BYTES = 8192


def _reduce(x):
    return (x & np.uint64(0xFFFF)) + (x >> np.uint64(16))


def _hdf5_fletcher32():
    """HDF5's own ``H5_checksum_fletcher32`` from the libhdf5 h5py runs on, or None.

    Why: HDF5's C loop is ~2.6x faster than the numpy prefix sums below (1.5 vs 3.8 ms per
    batch of 512 chunks), and ctypes releases the GIL during the call. Found through the
    process's memory map (Linux); None elsewhere, when the symbol is not exported, or when
    it does not reproduce :func:`_fletcher32_numpy` on a test buffer.
    """
    import ctypes

    import h5py  # noqa: F401 - loads libhdf5
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps
                            if "libhdf5" in line and "libhdf5_hl" not in line})
    except OSError:
        return None
    probe = np.frombuffer(bytes(range(256)) * 9 + b"\x7f\0", np.uint8)
    lengths = np.array([1, 2, 719, 720, 721, 2305])
    for path in paths:
        if not path.startswith("/"):
            continue
        try:
            fn = ctypes.CDLL(path).H5_checksum_fletcher32
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_uint32
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        want = [int(_fletcher32_numpy(np.append(probe[:n], np.uint8(0)), [0], [n])[0])
                for n in lengths]   # the numpy version wants a 0 after an odd range
        if [fn(probe.ctypes.data, int(n)) for n in lengths] == want:
            return fn
    return None


_C_FLETCHER32 = None   # resolved on first use (h5py must be imported)


def fletcher32_many(buf, starts, lengths):
    """HDF5's fletcher32 of many byte ranges of one buffer (see :func:`_fletcher32_numpy`
    for the conditions on the ranges): HDF5's own C function when available, else numpy."""
    global _C_FLETCHER32
    if _C_FLETCHER32 is None:
        _C_FLETCHER32 = _hdf5_fletcher32() or False
    starts = np.asarray(starts, np.int64)
    lengths = np.asarray(lengths, np.int64)
    if (not _C_FLETCHER32 or buf.dtype != np.uint8 or not buf.flags.c_contiguous
            or np.any(starts % 2) or np.any(lengths < 1)
            or (starts.size and int((starts + lengths).max()) > buf.size)):
        return _fletcher32_numpy(buf, starts, lengths)
    base, fn = buf.ctypes.data, _C_FLETCHER32
    return np.array([fn(base + s, n) for s, n in zip(starts.tolist(), lengths.tolist())],
                    np.uint32)


def _fletcher32_numpy(buf, starts, lengths):
    """HDF5's fletcher32 of many byte ranges of one buffer at once, exactly as HDF5 has it.

    HDF5 (``H5_checksum_fletcher32``) reads big-endian 16-bit words, adds them to ``sum1``
    and ``sum1`` to ``sum2`` in uint32 arithmetic, folds both (``(s & 0xffff) + (s >> 16)``)
    after every 360 words, treats a trailing odd byte as one more word ``byte << 8`` with
    its own fold, folds once more and returns ``sum2 << 16 | sum1``. Per block of ``t``
    words, ``sum1 += A`` and ``sum2 += t * sum1 + B`` with ``A`` the sum of the words and
    ``B = sum (t - j + 1) w_j``: both come from two prefix sums of the whole buffer (uint32,
    wrapping exactly as C does), so only the fold between blocks is a loop, over the block
    index and vectorised over the ranges.

    Parameters
    ----------
    buf : 1-D uint8 array
        Holds every range; each range must start at an even offset, and the byte after an
        odd-length range must be 0 (it stands in for the odd byte's zero low half).
    starts, lengths : int arrays
        Byte offset (even) and length (>= 1) of each range.

    Returns
    -------
    (K,) uint32 checksums.
    """
    starts = np.asarray(starts, np.int64)
    lengths = np.asarray(lengths, np.int64)
    if np.any(starts % 2) or np.any(lengths < 1):
        raise ValueError("ranges must start at even offsets and be non-empty")
    data = buf if buf.size % 2 == 0 else np.concatenate([buf, np.zeros(1, np.uint8)])
    words = data.view(">u2")
    pz = np.zeros(words.size + 1, np.uint32)
    np.cumsum(words, dtype=np.uint32, out=pz[1:])
    rz = np.zeros(words.size + 1, np.uint32)
    np.cumsum(pz[1:], dtype=np.uint32, out=rz[1:])
    w0 = starts // 2
    full = lengths // 2
    odd = lengths % 2
    nfull = -(-full // 360)
    nblocks = nfull + odd
    k = starts.size
    first = np.zeros(k + 1, np.int64)
    np.cumsum(nblocks, out=first[1:])
    total = int(first[-1])
    chunk = np.repeat(np.arange(k), nblocks)
    j = np.arange(total) - first[chunk]
    is_odd = j >= nfull[chunk]
    s = w0[chunk] + np.minimum(j, nfull[chunk]) * 360
    s = np.where(is_odd, w0[chunk] + full[chunk], s)
    e = np.where(is_odd, s + 1, np.minimum(s + 360, w0[chunk] + full[chunk]))
    t = (e - s).astype(np.uint64)
    a = (pz[e] - pz[s]).astype(np.uint64)
    b = ((rz[e] - rz[s]) - (t.astype(np.uint32) * pz[s])).astype(np.uint64)
    m = int(nblocks.max()) if k else 0
    s1 = np.zeros(k, np.uint64)
    s2 = np.zeros(k, np.uint64)
    for step in range(m):
        live = nblocks > step
        idx = first[:-1][live] + step
        c1, c2 = s1[live], s2[live]
        c2 = _reduce((c2 + t[idx] * c1 + b[idx]) & _MASK32)
        c1 = _reduce(c1 + a[idx])
        s1[live], s2[live] = c1, c2
    s1, s2 = _reduce(s1), _reduce(s2)
    return ((s2 << np.uint64(16)) | s1).astype(np.uint32)


def fletcher32(data):
    """HDF5's fletcher32 of one bytes-like object (see :func:`fletcher32_many`)."""
    arr = np.frombuffer(bytes(data) + b"\0", np.uint8)
    return int(fletcher32_many(arr, [0], [len(arr) - 1])[0])


def _bshuf_block(itemsize):
    """bitshuffle's default block size in elements (must match its C code exactly)."""
    return max((_BSHUF_TARGET_BLOCK_BYTES // itemsize) // 8 * 8, 128)


class ChunkEncoder:
    """Encodes whole chunks of one dataset into the bytes its filter pipeline would store.

    ``encode(chunks)`` takes a (K, *chunk_shape) C-contiguous array and returns the buffer
    and the (offset, length) of each finished chunk in it, ready for ``write_direct_chunk``.
    Built by :func:`encoder_for`, which returns None for a pipeline it does not know.
    """

    def __init__(self, dtype, chunk_shape, codec):
        self.dtype = np.dtype(dtype)
        self.chunk_shape = tuple(int(v) for v in chunk_shape)
        self.codec = codec  # "none", "lz4" or ("zstd", level)
        self.elements = int(np.prod(self.chunk_shape))
        self.block = _bshuf_block(self.dtype.itemsize)
        self.header = b""
        if codec != "none":
            self.header = struct.pack(">QI", self.elements * self.dtype.itemsize,
                                      self.block * self.dtype.itemsize)

    def _compress(self, arr, block_size):
        import bitshuffle
        if self.codec == "lz4":
            return bitshuffle.compress_lz4(arr, block_size)
        return bitshuffle.compress_zstd(arr, block_size, int(self.codec[1]))

    def _bodies(self, chunks):
        """(buffer, offsets, lengths) of the compressed body of each chunk."""
        k = chunks.shape[0]
        flat = chunks.reshape(k, self.elements)
        if self.codec == "none":
            n = self.elements * self.dtype.itemsize
            return flat.view(np.uint8).reshape(-1), np.arange(k) * n, np.full(k, n)
        e, d = self.elements, self.block
        if e % d == 0 or (e < d and e % 8 == 0):
            # block boundaries fall on chunk boundaries: one call for all chunks, then the
            # stream of (size, data) blocks is cut every blocks-per-chunk blocks
            per = e // d if e % d == 0 else 1
            out = self._compress(flat, d if e % d == 0 else e)
            raw = memoryview(out)   # parsed in place: no bytes copy of the stream
            unpack = struct.Struct(">I").unpack_from
            ends = []
            pos = 0
            for _ in range(k):
                for _ in range(per):
                    pos += 4 + unpack(raw, pos)[0]
                ends.append(pos)
            if pos != out.size:
                raise RuntimeError("bitshuffle output does not split into chunks")
            lengths = np.diff(np.array([0] + ends, np.int64))
            offsets = np.array([0] + ends[:-1], np.int64)
            return out, offsets, lengths
        parts = [self._compress(np.ascontiguousarray(flat[i]), 0) for i in range(k)]
        lengths = np.array([p.size for p in parts], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return np.concatenate(parts), offsets, lengths

    def encode(self, chunks):
        """Filtered, checksummed bytes of each chunk: (buffer, offsets, lengths)."""
        if chunks.dtype != self.dtype or chunks.shape[1:] != self.chunk_shape:
            raise ValueError("chunks of the wrong type or shape")
        chunks = np.ascontiguousarray(chunks)
        body, boff, blen = self._bodies(chunks)
        h = len(self.header)
        size = h + blen                        # checksummed bytes of each chunk
        span = size + 4 + (size + 4) % 2       # + checksum, padded to keep starts even
        start = np.zeros(blen.size, np.int64)
        np.cumsum(span[:-1], out=start[1:])
        out = np.zeros(int(span.sum()), np.uint8)
        if h:
            hdr = np.frombuffer(self.header, np.uint8)
            out[(start[:, None] + np.arange(h)).ravel()] = np.tile(hdr, blen.size)
        if np.all(np.diff(boff) == blen[:-1]) and np.all(blen == blen[0]) and not h:
            out.reshape(blen.size, -1)[:, :blen[0]] = body.reshape(blen.size, -1)
        else:
            dst, src = memoryview(out), memoryview(body)   # slice copies without numpy
            for a, b, n in zip((start + h).tolist(), boff.tolist(), blen.tolist()):
                dst[a:a + n] = src[b:b + n]
        crc = fletcher32_many(out, start, size)
        pos = start + size
        out[(pos[:, None] + np.arange(4)).ravel()] = crc.astype("<u4").view(np.uint8)
        return out, start, size + 4


def encoder_for(dataset):
    """A :class:`ChunkEncoder` reproducing ``dataset``'s filter pipeline, or None.

    Known pipelines: fletcher32 alone, and bitshuffle (LZ4 or zstd, default block size)
    followed by fletcher32.
    """
    dcpl = dataset.id.get_create_plist()
    filters = [dcpl.get_filter(i) for i in range(dcpl.get_nfilters())]
    ids = [f[0] for f in filters]
    if dataset.chunks is None or not ids or ids[-1] != _FLETCHER32:
        return None
    if ids == [_FLETCHER32]:
        return ChunkEncoder(dataset.dtype, dataset.chunks, "none")
    if ids != [_BITSHUFFLE, _FLETCHER32]:
        return None
    values = tuple(filters[0][2])
    # (filter version, bitshuffle version, item size, block size, codec[, level])
    if len(values) < 5 or values[3] != 0 or values[2] != dataset.dtype.itemsize:
        return None
    if values[4] == 2:
        return ChunkEncoder(dataset.dtype, dataset.chunks, "lz4")
    if values[4] == 3:
        level = values[5] if len(values) > 5 else 3
        return ChunkEncoder(dataset.dtype, dataset.chunks, ("zstd", level))
    return None


#: Target bytes of one batch of chunks encoded at once (a few rows of chunks of a frame
#: block): large enough that the per-call overheads vanish, small enough to stay in cache.
BATCH_BYTES = 8 << 20


def _chunk_batches(block, chunk_shape, fill, batch_bytes=BATCH_BYTES, buffers=1):
    """Yield ``(row0, chunks, ncc)``: the frame block (T, R, C) cut into whole chunks, a few
    rows of chunks at a time, in chunk order (K, ct, sr, sc); edges padded with ``fill`` as
    HDF5 pads them (the part outside the dataset is never read). The chunks are written
    into a ring of ``buffers`` re-used arrays: a batch is overwritten ``buffers`` batches
    later, so at most that many may be in use at once."""
    t, nrow, ncol = block.shape
    ct, sr, sc = chunk_shape
    ncc = -(-ncol // sc)
    row_bytes = ncc * ct * sr * sc * block.dtype.itemsize
    step = max(1, batch_bytes // max(row_bytes, 1)) * sr
    # one chunk row of one frame is sc-element runs: moved as single void items (one
    # memcpy each), frame by frame, into a buffer re-used for every batch; 3-5x faster than
    # numpy's copy of the whole 5-D transpose, whose inner loop is sc elements long
    run = np.dtype((np.void, sc * block.dtype.itemsize))
    ring = []
    for i, r0 in enumerate(range(0, nrow, step)):
        r1 = min(r0 + step, nrow)
        nrc = -(-(r1 - r0) // sr)
        sub = block[:, r0:r1, :]
        if t != ct or (r1 - r0) % sr or ncol % sc or sub.strides[-1] != sub.itemsize:
            padded = np.full((ct, nrc * sr, ncc * sc), fill, block.dtype)
            padded[:t, :r1 - r0, :ncol] = sub
            sub = padded
        if len(ring) < buffers:
            ring.append(np.empty((nrc * ncc, ct, sr, sc), block.dtype))
        out = ring[i % buffers]
        if out.shape[0] != nrc * ncc:   # the last, shorter batch
            out = ring[i % buffers] = np.empty((nrc * ncc, ct, sr, sc), block.dtype)
        dest = out.view(run).reshape(nrc, ncc, ct, sr)
        for k in range(ct):
            np.copyto(dest[:, :, k], sub[k].view(run).reshape(nrc, sr, ncc).transpose(0, 2, 1))
        yield r0, out, ncc


def write_block(dataset, encoder, block, t0, *, fill=0, skip_zero=False, pool=None):
    """Write frames ``t0 .. t0 + len(block)`` (a whole time chunk) of ``dataset`` directly.

    The chunks of a few chunk rows are gathered and encoded (in ``pool``'s threads when
    given, the GIL released in bitshuffle) while the previous batch's bytes go to HDF5 with
    ``write_direct_chunk``. ``skip_zero`` leaves all-zero chunks unwritten (they read as a
    fill value of 0). ``t0`` must be a multiple of the chunk's time size.
    """
    ct, sr, sc = encoder.chunk_shape
    if t0 % ct or len(block) > ct:
        raise ValueError("a direct write covers exactly one time chunk")

    def encode(item):
        r0, chunks, ncc = item
        index = np.arange(chunks.shape[0])
        if skip_zero:
            index = np.flatnonzero(chunks.reshape(chunks.shape[0], -1).any(axis=1))
            if not index.size:
                return r0, ncc, index, None
            chunks = chunks[index]
        return r0, ncc, index, encoder.encode(chunks)

    ahead = 0 if pool is None else 2
    # a batch is in use from its creation until its encode returns: ahead + 1 being
    # encoded, plus the one the generator makes next
    batches = _chunk_batches(np.asarray(block), encoder.chunk_shape, fill,
                             buffers=ahead + 2)
    if pool is None:
        results = map(encode, batches)
    else:
        results = _ordered(pool, encode, batches, ahead=ahead)
    dsid = dataset.id
    for r0, ncc, index, encoded in results:
        if encoded is None:
            continue
        buf, starts, lengths = encoded
        for i, s, n in zip(index.tolist(), starts.tolist(), lengths.tolist()):
            dsid.write_direct_chunk((t0, r0 + (i // ncc) * sr, (i % ncc) * sc), buf[s:s + n])


def _ordered(pool, fn, items, ahead):
    """``map(fn, items)`` in order, at most ``ahead`` items being computed ahead in ``pool``."""
    pending = []
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            yield pending.pop(0).result()
    for fut in pending:
        yield fut.result()
