"""photometry.data.stampcache.BlockCache: stamps served from whole cube blocks are the bytes a
direct read returns, neighbouring stamps share blocks, memory stays bounded (issue 15)."""
import numpy as np
import pytest

from photometry.data.cache import CacheWriter, FFICache
from photometry.hooks.settings import load_settings
from photometry.data.stampcache import BlockCache, _chunk_ranges

N, R, C = 23, 48, 64
META = dict(sector=3, camera=2, ccd=1, cadence=600.0, data_rel=9, procver="t", row_offset=0,
            column_offset=44)


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    rng = np.random.default_rng(3)
    images = rng.normal(100, 5, (N, R, C)).astype(np.float32)
    images[6, 2:5, 7] = 2e5                                  # saturated: pixel flags set
    images[4, 30, 40] = np.nan
    settings = load_settings(assignments=["prepare.time_chunk=5", "prepare.spatial_chunk=8"])
    path = tmp_path_factory.mktemp("stampcache") / "sector0003_camera2_ccd1.hdf5"
    w = CacheWriter(path, settings, ffi_files=[f"f{i:03d}_ffic.fits" for i in range(N)],
                    shape=(R, C), meta=META)
    for i in range(N):
        w.add_frame(images[i], images[i] * 0.01, time=2000 + i / 144,
                    time_start=2000 + (i - .5) / 144, time_stop=2000 + (i + .5) / 144,
                    timecorr=0.002, cadenceno=100 + i, quality=0, wcs_header="")
    w.finish_ingest(usable=np.ones(N, bool))
    w.close(complete=True)
    return path


def _stamps():
    """15 x 15 stamps along a band, as the position claim order gives them, and the edges."""
    out = [(slice(r, r + 15), slice(c, c + 15)) for r in (0, 3, 9) for c in range(0, 50, 4)]
    return out + [(slice(40, 48), slice(57, 64)), (slice(0, 1), slice(0, 64))]


def test_stamps_are_the_direct_bytes_and_neighbours_share_blocks(cache_path):
    direct = FFICache(cache_path)
    per_px = N * (4 + 4 + direct._file["pixel_flags"].dtype.itemsize)
    cached = BlockCache(FFICache(cache_path), max_bytes=10 ** 7, block_bytes=per_px * 16 * 16)
    assert cached.block == (16, 16)
    for name in ("images", "errors", "pixel_flags"):
        for rows, cols in _stamps():
            a, b = cached.stamp(name, rows, cols), direct.stamp(name, rows, cols)
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes(), (name, rows, cols)
    # the stamps lie in 2 x 4 blocks of rows 0-31 and the corner block (2, 3): each read
    # once per cube, every other use a hit
    assert cached.stats["blocks_read"] == 3 * 9
    assert cached.stats["hits"] > 5 * cached.stats["blocks_read"]
    assert cached.stats["direct"] == 0
    # anything else than whole-series slices goes to the file
    frames = np.arange(3, 9)
    assert cached.stamp("images", slice(2, 9), slice(4, 20), frames).tobytes() == \
        direct.stamp("images", slice(2, 9), slice(4, 20), frames).tobytes()
    assert cached.stats["direct"] == 1
    assert cached.row_offset == direct.row_offset          # the source's other attributes
    direct.close()
    cached.close()


def test_memory_bound_and_read_ahead(cache_path):
    direct = FFICache(cache_path)
    per_px = N * (4 + 4 + direct._file["pixel_flags"].dtype.itemsize)
    block = N * 16 * 16 * 4                                   # one images block
    cached = BlockCache(FFICache(cache_path), max_bytes=4 * block, block_bytes=per_px * 256)
    for rows, cols in _stamps():
        np.testing.assert_array_equal(cached.stamp("images", rows, cols),
                                      direct.stamp("images", rows, cols))
        assert cached._bytes <= 4 * block
    # a stamp larger than a quarter of the cache is read directly, not cached
    before = cached.stats["direct"]
    cached.stamp("images", slice(0, 48), slice(0, 64))
    assert cached.stats["direct"] == before + 1
    # read-ahead: the chunks of blocks not in memory are announced once, cached ones never
    fresh = BlockCache(FFICache(cache_path), max_bytes=10 ** 7, block_bytes=per_px * 256)
    f = direct._file
    t, cr, cc = f["images"].chunks
    per_block = -(-N // t) * (16 // cr) * (16 // cc)             # chunks of one block, one cube

    def flags(rows, cols):        # time blocks without any flag are not written (cache.py)
        return len(_chunk_ranges(f["pixel_flags"], rows, cols))
    n = fresh.prefetch(slice(20, 35), slice(20, 35))              # 2 x 2 blocks
    assert n == 2 * 4 * per_block + flags((16, 48), (16, 48))
    assert 0 < flags((16, 48), (16, 48)) < 4 * per_block
    assert fresh.prefetch(slice(20, 35), slice(20, 35)) == 0
    fresh.stamp("images", slice(0, 15), slice(0, 15))
    assert fresh.prefetch(slice(0, 15), slice(0, 15)) == per_block + flags((0, 16), (0, 16))
    for c in (direct, cached, fresh):
        c.close()
