"""Chunks encoded outside HDF5 (photometry.data.chunks): HDF5's own fletcher32, and a cache
written with write_direct_chunk read back through plain h5py, checksums verified, equal to
one written through HDF5's filter pipeline bit for bit."""
import h5py
import hdf5plugin
import numpy as np
import pytest

from photometry.data.cache import CacheWriter, FFICache
from photometry.data.chunks import encoder_for, fletcher32, fletcher32_many, write_block
from photometry.hooks.settings import load_settings


def _fletcher32_reference(data):
    """HDF5's H5_checksum_fletcher32 transcribed word by word (uint32 wrap-around)."""
    n, s1, s2, i = len(data) // 2, 0, 0, 0
    while n:
        t = min(n, 360)
        n -= t
        for _ in range(t):
            s1 = (s1 + ((data[i] << 8) | data[i + 1])) & 0xFFFFFFFF
            s2 = (s2 + s1) & 0xFFFFFFFF
            i += 2
        s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    if len(data) % 2:
        s1 = (s1 + (data[i] << 8)) & 0xFFFFFFFF
        s2 = (s2 + s1) & 0xFFFFFFFF
        s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    return ((s2 << 16) | s1) & 0xFFFFFFFF


@pytest.mark.parametrize("path", ["hdf5", "numpy"])
def test_fletcher32_is_hdf5s(monkeypatch, path):
    """Both ways of computing it: HDF5's own C function (found in the libhdf5 h5py loaded,
    on Linux) and the numpy fallback."""
    import sys

    from photometry.data import chunks
    fletcher32_many(np.zeros(2, np.uint8), [0], [2])   # resolves the C function
    if path == "numpy":
        monkeypatch.setattr(chunks, "_C_FLETCHER32", False)
    elif sys.platform.startswith("linux"):
        assert chunks._C_FLETCHER32, "HDF5's H5_checksum_fletcher32 not found"
    else:
        pytest.skip("HDF5's fletcher32 is looked up through /proc/self/maps (Linux)")
    rng = np.random.default_rng(1)
    # around the 360-word fold, odd lengths, and all-0xFF data (where sum2 wraps in uint32)
    for n in (1, 2, 3, 719, 720, 721, 1441, 5001):
        for data in (rng.integers(0, 256, n, dtype=np.uint8).tobytes(), b"\xff" * n):
            assert fletcher32(data) == _fletcher32_reference(data), n
    parts = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes()
             for n in rng.integers(1, 2000, 50)] + [b"\xff" * 7201]
    starts, buf = [], b""
    for p in parts:
        starts.append(len(buf))
        buf += p + b"\0" * (2 - len(p) % 2)   # even starts, a zero after each
    got = fletcher32_many(np.frombuffer(buf, np.uint8), starts, [len(p) for p in parts])
    assert [int(g) for g in got] == [_fletcher32_reference(p) for p in parts]
    # and the checksum HDF5 itself stored after a filtered chunk
    with h5py.File("mem.h5", "w", driver="core", backing_store=False) as f:
        ds = f.create_dataset("x", data=rng.normal(size=(8, 8, 16)).astype(np.float32),
                              chunks=(8, 8, 16), fletcher32=True, **hdf5plugin.Bitshuffle())
        raw = ds.id.read_direct_chunk((0, 0, 0))[1]
        assert fletcher32(raw[:-4]) == int.from_bytes(raw[-4:], "little")


@pytest.mark.parametrize("filters", [dict(hdf5plugin.Bitshuffle(cname="lz4")),
                                     dict(hdf5plugin.Bitshuffle(cname="zstd", clevel=1)), {}],
                         ids=["bitshuffle-lz4", "bitshuffle-zstd", "none"])
@pytest.mark.parametrize("dtype,chunks,frames", [
    (np.float32, (32, 8, 16), 32),   # whole chunks
    (np.float32, (32, 8, 16), 7),    # the last, partial time chunk of a sector
    (np.uint8, (32, 8, 16), 32),     # pixel flags (one bitshuffle block per chunk)
    (np.float32, (24, 8, 16), 24),   # blocks not on chunk boundaries: chunk by chunk
    (np.float32, (5, 3, 7), 5),      # odd edge chunks
])
def test_direct_chunks_equal_hdf5_pipeline(tmp_path, filters, dtype, chunks, frames):
    rng = np.random.default_rng(2)
    shape = (2 * chunks[0], 21, 37)   # edge chunks in both spatial axes
    if dtype == np.uint8:
        data = np.zeros(shape, np.uint8)
        data[3, 4:9, 5] = 3
    else:
        data = np.round(rng.normal(100, 3, shape) * 8).astype(np.float32) / 8
        data[1, 2, 3] = np.nan
    fill = 0 if dtype == np.uint8 else np.nan
    kw = dict(shape=shape, dtype=dtype, chunks=chunks, fletcher32=True, fillvalue=fill,
              **filters)
    with h5py.File(tmp_path / "a.h5", "w", libver="latest") as fa, \
            h5py.File(tmp_path / "b.h5", "w", libver="latest") as fb:
        fa.create_dataset("x", **kw)[:frames] = data[:frames]
        ds = fb.create_dataset("x", **kw)
        encoder = encoder_for(ds)
        assert encoder is not None
        write_block(ds, encoder, data[:frames], 0, fill=fill, skip_zero=dtype == np.uint8)
    with h5py.File(tmp_path / "a.h5") as fa, h5py.File(tmp_path / "b.h5") as fb:
        a, b = fa["x"][()], fb["x"][()]   # every chunk's checksum verified by HDF5
        assert a.tobytes() == b.tobytes()
        if encoder.codec != ("zstd", 1):  # zstd's bytes differ between zstd versions
            for t in range(0, frames, chunks[0]):
                for r in range(0, shape[1], chunks[1]):
                    for c in range(0, shape[2], chunks[2]):
                        if not fb["x"].id.get_chunk_info_by_coord((t, r, c)).size:
                            assert not data[t:t + chunks[0], r:r + chunks[1],
                                            c:c + chunks[2]].any()   # skipped zero chunk
                            continue
                        ra = fa["x"].id.read_direct_chunk((t, r, c))
                        assert ra == fb["x"].id.read_direct_chunk((t, r, c))


def test_unknown_pipeline_is_left_to_hdf5(tmp_path):
    with h5py.File(tmp_path / "c.h5", "w") as f:
        assert encoder_for(f.create_dataset("g", (4, 4), "f4", chunks=(2, 2), compression="gzip",
                                            fletcher32=True)) is None
        assert encoder_for(f.create_dataset("n", (4, 4), "f4", chunks=(2, 2))) is None


def test_cache_written_directly_equals_the_filter_pipeline(tmp_path, monkeypatch):
    """A whole CacheWriter cache, direct chunks vs HDF5's filters: the same stored bytes."""
    import photometry.data.cache as cache_module
    rng = np.random.default_rng(3)
    n, rows, cols = 11, 24, 40
    images = rng.normal(100, 5, (n, rows, cols)).astype(np.float32)
    images[4, 3:6, 9] = 2e5   # saturated: a flag chunk to write
    errors = np.full((n, rows, cols), 2.0, np.float32)
    settings = load_settings(assignments=["prepare.time_chunk=4"])
    meta = dict(sector=3, camera=2, ccd=1, cadence=600.0, data_rel=9, procver="t",
                row_offset=0, column_offset=44)
    out = {}
    for mode in ("direct", "hdf5"):
        if mode == "hdf5":
            monkeypatch.setattr(cache_module, "encoder_for", lambda ds: None)
        path = tmp_path / mode / "sector0003_camera2_ccd1.hdf5"
        w = CacheWriter(path, settings, ffi_files=[f"f{i}_ffic.fits" for i in range(n)],
                        shape=(rows, cols), meta=meta)
        for i in range(n):
            w.add_frame(images[i], errors[i], time=2000 + i / 144, time_start=2000,
                        time_stop=2000, timecorr=0.0, cadenceno=i, quality=0)
        w.finish_ingest(usable=np.ones(n, bool))
        w.close(complete=True)
        with FFICache(path) as cache:
            out[mode] = [cache.stamp(name, slice(None), slice(None))
                         for name in ("images", "errors", "pixel_flags")]
    for a, b in zip(out["direct"], out["hdf5"]):
        assert a.tobytes() == b.tobytes()
    assert out["direct"][2][4, 4, 9]   # the flag chunk is there
