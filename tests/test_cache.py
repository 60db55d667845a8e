"""CacheWriter/FFICache on synthetic arrays, and the movement-kernel numerics."""
import h5py
import numpy as np
import pytest
from scipy.special import erf

from photometry.data.cache import (CacheWriter, FFICache, choose_reference_frame, pixel_flags_for)
from photometry.hooks.errors import InputError
from photometry.data.movement import (MovementKernel, _apply, fit_affine, fit_centroids,
                                      select_kernel_stars)
from photometry.hooks.quality import PixelQualityFlags
from photometry.hooks.settings import load_settings

META = dict(sector=3, camera=2, ccd=1, cadence=600.0, data_rel=9, procver="t", row_offset=0,
            column_offset=44)
N, R, C = 23, 20, 26


def _frames(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(100, 5, (N, R, C)).astype(np.float32)
    images[3, 4, 5] = np.nan
    images[6, 2:5, 7] = 2e5
    quality = np.zeros(N, int)
    quality[[1, 9]] = 32
    return images, (images * 0.01).astype(np.float32), quality


def _write(path, images, errors, quality, settings, stop=None):
    w = CacheWriter(path, settings, ffi_files=[f"f{i:03d}_ffic.fits" for i in range(N)],
                    shape=(R, C), meta=META)
    start = w.frames_done
    for i in range(start, N if stop is None else stop):
        w.add_frame(images[i], errors[i], time=2000 + i / 144, time_start=2000 + (i - .5) / 144,
                    time_stop=2000 + (i + .5) / 144, timecorr=0.002, cadenceno=100 + i,
                    quality=quality[i], wcs_header="")
    if stop is not None:
        w.close(complete=False)
        return w
    w.finish_ingest(usable=np.ones(N, bool))
    w.close(complete=True)
    return w


@pytest.fixture
def settings():
    # lossless: the stored cubes must equal the input bit for bit (the trim has its own test)
    return load_settings(assignments=["prepare.time_chunk=5", "prepare.spatial_chunk=8",
                                      "prepare.precision=0"])


def test_writer_layout_and_reader(tmp_path, settings):
    images, errors, quality = _frames()
    path = tmp_path / "sector0003_camera2_ccd1.hdf5"
    w = _write(path, images, errors, quality, settings)
    with h5py.File(path) as f:
        assert f["images"].chunks == (5, 8, 8) and f["pixel_flags"].dtype == np.uint8
        assert f["errors"].shape == (N, R, C)
        # every numeric dataset carries a checksum; the cubes are compressed (bitshuffle)
        unchecked = []
        f.visititems(lambda name, obj: unchecked.append(name) if isinstance(obj, h5py.Dataset)
                     and obj.shape and obj.dtype.kind != "O" and not obj.fletcher32 else None)
        assert unchecked == []
        assert "32008" in f["images"]._filters
    with FFICache(path) as cache:
        assert (cache.sector, cache.camera, cache.ccd, cache.cadence) == (3, 2, 1, 600)
        assert np.array_equal(cache.stamp("images", slice(None), slice(None)), images,
                              equal_nan=True)
        assert np.array_equal(cache.stamp("errors", slice(2, 9), slice(3, 18)),
                              errors[:, 2:9, 3:18], equal_nan=True)
        assert np.array_equal(cache.cadenceno, 100 + np.arange(N))
        good = quality == 0
        expected = np.nanmean(images[good].astype(float), axis=0)
        assert np.allclose(cache.sumimage, expected, rtol=1e-13, atol=0)
        flags = cache.stamp("pixel_flags", slice(None), slice(None))
        assert flags[3, 4, 5] == PixelQualityFlags.NonFinite
        # saturated run rows 2-4 in column 7, plus one pixel of bleed padding at each end
        assert np.array_equal(np.flatnonzero(flags[6, :, 7] & PixelQualityFlags.Saturated),
                              [1, 2, 3, 4, 5])
        assert cache.frame_wcs(0) is None
        assert np.all(cache.movement_kernel.kernel == 0)
        with pytest.raises(KeyError):
            cache.stamp("sumimage", slice(0, 2), slice(0, 2))


def test_reader_refuses_partial_and_incomplete(tmp_path, settings):
    images, errors, quality = _frames()
    path = tmp_path / "sector0003_camera2_ccd1.hdf5"
    _write(path, images, errors, quality, settings, stop=12)
    partial = tmp_path / (path.name + ".partial")
    assert partial.exists() and not path.exists()
    with pytest.raises(InputError, match="partial"):
        FFICache(partial)
    # the same content under the final name is still refused: complete is False
    partial.rename(path)
    with pytest.raises(InputError, match="incomplete"):
        FFICache(path)
    with pytest.raises(InputError, match="not found"):
        FFICache(tmp_path / "nope.hdf5")


def test_resume_equals_uninterrupted_and_damaged_partial_restarts(tmp_path, settings, caplog):
    images, errors, quality = _frames()
    a = tmp_path / "a" / "sector0003_camera2_ccd1.hdf5"
    b = tmp_path / "b" / "sector0003_camera2_ccd1.hdf5"
    _write(a, images, errors, quality, settings)
    w = _write(b, images, errors, quality, settings, stop=13)   # flushed at 10
    assert w.frames_done == 10
    w = _write(b, images, errors, quality, settings)
    assert w.state == "resume"
    # killed after storing the accumulators but before advancing frames_done: recomputed
    d = tmp_path / "d" / "sector0003_camera2_ccd1.hdf5"
    _write(d, images, errors, quality, settings, stop=13)
    with h5py.File(d.parent / (d.name + ".partial"), "r+") as f:
        f["_accumulators"].attrs["frames"] = 15
        f["_accumulators/sum"][...] = 0.0
    assert _write(d, images, errors, quality, settings).state == "resume"
    with h5py.File(a) as fa, h5py.File(b) as fb, h5py.File(d) as fd:
        assert "_accumulators" not in fa and "_accumulators" not in fb
        for name in ("images", "errors", "pixel_flags", "time", "quality", "sumimage",
                     "movement_kernel"):
            assert np.array_equal(fa[name][()], fb[name][()], equal_nan=True), name
            assert np.array_equal(fa[name][()], fd[name][()], equal_nan=True), name
    # a partial that cannot be opened (killed mid-write) is rebuilt from scratch
    c = tmp_path / "c" / "sector0003_camera2_ccd1.hdf5"
    c.parent.mkdir()
    (c.parent / (c.name + ".partial")).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    w = _write(c, images, errors, quality, settings)
    assert w.state == "new"
    assert "starting over" in caplog.text
    with FFICache(c) as cache:
        assert np.array_equal(cache.stamp("images", slice(None), slice(None)), images,
                              equal_nan=True)


def test_frames_read_into_the_block_buffers_give_the_same_cache(tmp_path, settings):
    """Frames written straight into ``next_frame_buffers`` (prepare's reader does) give the
    cache a copying writer gives, dataset for dataset, with kernel stars declared after the
    first slot was handed out and several blocks through both buffer sets."""
    images, errors, quality = _frames()
    star = dict(starid=[7], column=[12.0], row=[9.0])
    images[:, 8:11, 11:14] += 500.0
    paths = []
    for direct in (False, True):
        path = tmp_path / str(direct) / "sector0003_camera2_ccd1.hdf5"
        w = CacheWriter(path, settings, ffi_files=[f"f{i:03d}_ffic.fits" for i in range(N)],
                        shape=(R, C), meta=META)
        for i in range(N):
            image, error = images[i], errors[i]
            if direct:
                slot_image, slot_error = w.next_frame_buffers()
                slot_image[...], slot_error[...] = image, error
                image, error = slot_image, slot_error
            if i == 0:
                w.set_kernel_stars(star["starid"], star["column"], star["row"])
            w.add_frame(image, error, time=2000 + i / 144, time_start=2000, time_stop=2000,
                        timecorr=0.0, cadenceno=100 + i, quality=quality[i])
        w.finish_ingest(usable=np.ones(N, bool))
        w.close(complete=True)
        paths.append(path)
    with h5py.File(paths[0]) as fa, h5py.File(paths[1]) as fb:
        names = []
        fa.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert "movement/centroids" in names and np.isfinite(fa["movement/centroids"][()]).any()
        for name in names:
            assert np.array_equal(fa[name][()], fb[name][()],
                                  equal_nan=fa[name].dtype.kind == "f"), name
    with FFICache(paths[1]) as cache:
        assert np.array_equal(cache.stamp("images", slice(None), slice(None)), images,
                              equal_nan=True)


_KILLED_AFTER_STRINGS = """
import os, sys, numpy as np
from pathlib import Path
from photometry.data.cache import CacheWriter
from photometry.hooks.settings import load_settings
s = load_settings(assignments=["prepare.time_chunk=8", "prepare.spatial_chunk=8"])
w = CacheWriter(Path(sys.argv[1]), s, ffi_files=[f"f{i:03d}_ffic.fits" for i in range(30)],
                shape=(20, 26), meta=dict(sector=3, camera=2, ccd=1, cadence=600.0,
                data_rel=9, procver="t", row_offset=0, column_offset=44))
for i in range(24):   # the third flush commits block 2 and writes block 3's strings
    w.add_frame(100.0 + i + np.arange(520, dtype=np.float32).reshape(20, 26) / 16,
                np.ones((20, 26), np.float32), time=2000 + i / 144, time_start=2000, time_stop=2000, timecorr=0.0,
                cadenceno=100 + i, quality=0, wcs_header="CTYPE1 = 'RA---TAN'" + " " * 3000 + str(i))
os._exit(0)           # killed: nothing after the last commit is flushed
"""


def test_resume_after_a_kill_between_strings_and_commit(tmp_path, settings):
    """A kill after a block's WCS strings entered the file but before its commit: the resumed
    prepare rewrites those frames (it failed with "bad heap index" before the uncommitted
    strings were dropped on resume) and stores every frame's text."""
    import subprocess
    import sys
    from photometry.data.cache import clear_write_flag
    path = tmp_path / "sector0003_camera2_ccd1.hdf5"
    subprocess.run([sys.executable, "-c", _KILLED_AFTER_STRINGS, str(path)], check=True)
    partial = tmp_path / (path.name + ".partial")
    clear_write_flag(partial)
    with h5py.File(partial) as f:
        assert f.attrs["frames_done"] == 16
    s = load_settings(assignments=["prepare.time_chunk=8", "prepare.spatial_chunk=8"])
    w = CacheWriter(path, s, ffi_files=[f"f{i:03d}_ffic.fits" for i in range(30)],
                    shape=(20, 26), meta=META)
    assert w.state == "resume" and w.frames_done == 16
    text = ["CTYPE1 = 'RA---TAN'" + " " * 3000 + str(i) for i in range(30)]
    for i in range(16, 30):
        w.add_frame(100.0 + i + np.arange(520, dtype=np.float32).reshape(20, 26) / 16,
                    np.ones((20, 26), np.float32), time=2000 + i / 144, time_start=2000, time_stop=2000, timecorr=0.0,
                    cadenceno=100 + i, quality=0, wcs_header=text[i])
    w.finish_ingest(usable=np.ones(30, bool))
    w.close(complete=True)
    with h5py.File(path) as f:
        assert list(f["wcs"].asstr()[:]) == text
        assert np.array_equal(f["images"][:, 0, 0], 100.0 + np.arange(30))


def test_complete_cache_is_kept_or_overwritten(tmp_path, settings):
    images, errors, quality = _frames()
    path = tmp_path / "sector0003_camera2_ccd1.hdf5"
    _write(path, images, errors, quality, settings)
    w = CacheWriter(path, settings, ffi_files=[f"f{i:03d}_ffic.fits" for i in range(N)],
                    shape=(R, C), meta=META)
    assert w.state == "complete"
    other = load_settings(assignments=["prepare.time_chunk=4"])
    with pytest.raises(InputError, match="--overwrite"):
        CacheWriter(path, other, ffi_files=[f"f{i:03d}_ffic.fits" for i in range(N)],
                    shape=(R, C), meta=META)
    w = CacheWriter(path, other, ffi_files=[f"f{i:03d}_ffic.fits" for i in range(N)],
                    shape=(R, C), meta=META, overwrite=True)
    assert w.state == "new"
    w.close()


def test_reference_frame_choice():
    t = np.arange(11.0)
    q = np.zeros(11, int)
    assert choose_reference_frame(t, q) == 5
    q[5] = 32
    assert choose_reference_frame(t, q) in (4, 6)
    usable = np.ones(11, bool)
    usable[[4, 6]] = False
    assert choose_reference_frame(t, q, usable) in (3, 7)


def test_pixel_flags_for():
    img = np.full((10, 4), 10.0, np.float32)
    img[4:6, 1] = 1e6
    img[0, 0] = np.inf
    flags = pixel_flags_for(img, 9e4, 2)
    assert np.array_equal(np.flatnonzero(flags[:, 1]), [2, 3, 4, 5, 6, 7])
    assert flags[0, 0] & PixelQualityFlags.NonFinite
    # only the columns with a flagged pixel are processed: same as the rule applied per pixel
    rng = np.random.default_rng(5)
    img = rng.uniform(0, 1e5, (30, 25)).astype(np.float32)
    img[rng.random(img.shape) < 0.05] = np.nan
    flags = pixel_flags_for(img, 9.5e4, 1)
    sat = img > 9.5e4
    near = sat.copy()
    near[1:] |= sat[:-1]
    near[:-1] |= sat[1:]
    expected = (np.where(np.isfinite(img), 0, PixelQualityFlags.NonFinite)
                | np.where(near, PixelQualityFlags.Saturated, 0)).astype(np.uint8)
    assert np.array_equal(flags, expected)


# ---------------------------------------------------------------------------- movement
def _render(shape, xs, ys, flux, sigma=0.85, wing=2.2, wing_frac=0.15, sky=50.0):
    img = np.full(shape, sky)
    er = np.arange(shape[0] + 1) - 0.5
    ec = np.arange(shape[1] + 1) - 0.5
    for x, y, f in zip(xs, ys, flux):
        for s, w in ((sigma, 1 - wing_frac), (wing, wing_frac)):
            gx = np.diff(0.5 * erf((ec - x) / (np.sqrt(2) * s)))
            gy = np.diff(0.5 * erf((er - y) / (np.sqrt(2) * s)))
            img += f * w * np.outer(gy, gx)
    return img


def test_centroids_and_affine_recover_a_known_motion():
    rng = np.random.default_rng(4)
    shape = (80, 80)
    n = 30
    xs, ys = rng.uniform(6, 73, n), rng.uniform(6, 73, n)
    flux = rng.uniform(2e4, 1e5, n)
    x0 = y0 = 39.5
    truth = np.array([0.23, -0.31, 1.5e-3, -4e-4, 6e-4, -1.2e-3])
    dx, dy = _apply(truth, xs, ys, x0, y0)
    ref = _render(shape, xs, ys, flux)
    img = _render(shape, xs + dx, ys + dy, flux)
    err = np.sqrt(img / 500.0)
    img = img + rng.standard_normal(shape) * err
    keep = select_kernel_stars(xs, ys, np.full(n, 9.0), shape, isolation=5.0, contrast=4.0)
    assert 10 <= keep.size < n  # crowded pairs rejected
    ax, ay, asig = fit_centroids(ref, xs[keep], ys[keep])
    bx, by, bsig = fit_centroids(img, ax, ay, errors=err)
    # one star replaced by garbage (a cosmic ray, a variable blend): rejected by the clipping
    bx[0] += 0.8
    params, used = fit_affine(ax, ay, bx - ax, by - ay, bsig, x0=x0, y0=y0)
    assert not used[0] and used[1:].all()
    gx, gy = np.meshgrid(np.arange(0, 80, 5.0), np.arange(0, 80, 5.0))
    px, py = _apply(params, gx, gy, x0, y0)
    tx, ty = _apply(truth, gx, gy, x0, y0)
    assert max(np.abs(px - tx).max(), np.abs(py - ty).max()) < 0.01
    # too few stars: translation only
    params, _ = fit_affine(ax[:4], ay[:4], (bx - ax)[:4], (by - ay)[:4], x0=x0, y0=y0,
                           min_stars=8)
    assert np.all(params[2:] == 0) and np.isfinite(params[:2]).all()


def test_saturated_or_nan_star_is_not_measured():
    img = _render((30, 30), [10.0, 20.0], [10.0, 20.0], [2e6, 5e4])
    img[19, 21] = np.nan
    x, y, s = fit_centroids(img, [10.0, 20.0], [10.0, 20.0], saturation=9e4)
    assert np.isnan(x).all()


def test_movement_kernel_interpolation():
    kernel = np.zeros((5, 6))
    kernel[:, 0] = [0.0, 0.1, 0.2, np.nan, 0.4]
    kernel[:, 5] = [0.0, 1e-3, 2e-3, 3e-3, 4e-3]
    t = np.arange(5.0)
    mk = MovementKernel(kernel, t, x0=10.0, y0=20.0, ref_frame=0)
    dx, dy = mk.shift(np.array([10.0, 10.0]), np.array([20.0, 30.0]), 2)
    assert np.allclose(dx, 0.2) and np.allclose(dy, [0.0, 0.02])
    xn, yn = mk.apply(np.array([10.0]), np.array([30.0]), 4)
    assert np.allclose([xn[0], yn[0]], [10.4, 30.04])
    # NaN frame skipped by the time interpolation; slightly outside allowed, far outside not
    p = mk.params_at_time([2.5, 3.0, -0.5, 4.9])
    assert np.allclose(p[:, 0], [0.25, 0.3, 0.0, 0.4])
    with pytest.raises(ValueError):
        mk.params_at_time([6.5])
    xs, ys = mk.positions_at_time([1.5], [10.0], [30.0])
    assert np.allclose([xs[0, 0], ys[0, 0]], [10.15, 30.015])


def test_trim_in_tiles_is_the_per_pixel_rounding():
    """trim_precision works on tiles of TRIM_TILE pixels: every pixel must still be rounded
    to the nearest multiple of its own power-of-two step (true division), pixels without a
    usable step (NaN, zero, infinite, subnormal uncertainty) left alone, uncertainties to 8
    mantissa bits; frames with bad uncertainties in some tiles only, and a strided frame."""
    from photometry.data.cache import ERROR_KEEP_BITS, TRIM_TILE, trim_precision
    rng = np.random.default_rng(7)
    shape = (3, 2 * TRIM_TILE // 256 + 1, 256)       # > 2 tiles, the last one partial
    images = rng.normal(100, 40, shape).astype(np.float32)
    errors = np.abs(rng.normal(3, 2, shape)).astype(np.float32)
    errors[0, 5, 5], errors[0, 300, 9], errors[1, 7, 7] = np.nan, 0.0, np.inf
    errors[1, 500, 3] = 1e-42                          # subnormal: no usable step
    images[2, 10, 10] = np.nan
    fraction = 0.1
    bits = (errors * np.float32(fraction)).view(np.uint32) & np.uint32(0x7F800000)
    usable = (bits != 0) & (bits != 0x7F800000)
    step = bits.view(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = np.where(usable, np.rint(images / step) * step, images).astype(np.float32)
    drop = 23 - ERROR_KEEP_BITS
    want_err = ((errors.view(np.uint32) + np.uint32(1 << (drop - 1)))
                & np.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF)).view(np.float32)
    got, got_err = images.copy(), errors.copy()
    trim_precision(got, got_err, fraction)
    assert got.tobytes() == want.tobytes() and got_err.tobytes() == want_err.tobytes()
    ok = usable & np.isfinite(images)
    assert np.all(np.abs(got - images)[ok] <= 0.5 * fraction * errors[ok])
    assert np.any(got[ok] != images[ok])               # it did trim
    # a strided view (not tiled) gives the same per-pixel result
    got2, got2_err = images.copy(), errors.copy()
    trim_precision(got2[:, ::2], got2_err[:, ::2], fraction)
    assert got2[:, ::2].tobytes() == want[:, ::2].tobytes()
    assert got2[:, 1::2].tobytes() == images[:, 1::2].tobytes()


def test_block_write_with_a_pool_equals_hdf5_over_many_batches(tmp_path):
    """The chunk gather re-uses a ring of batch buffers while the encoder pool works ahead:
    a block of many batches (24 rows of 128 chunks, 4 chunk rows a batch) written with a
    pool stores exactly what HDF5's own filter pipeline stores."""
    import concurrent.futures

    import hdf5plugin

    from photometry.data.chunks import encoder_for, write_block
    rng = np.random.default_rng(3)
    shape = (32, 192, 2048)
    data = np.round(rng.normal(100, 3, shape) * 8).astype(np.float32) / 8
    kw = dict(shape=shape, dtype=np.float32, chunks=(32, 8, 16), fletcher32=True,
              fillvalue=np.nan, **hdf5plugin.Bitshuffle(cname="lz4"))
    with h5py.File(tmp_path / "a.h5", "w", libver="latest") as fa, \
            h5py.File(tmp_path / "b.h5", "w", libver="latest") as fb, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        fa.create_dataset("x", **kw)[...] = data
        ds = fb.create_dataset("x", **kw)
        write_block(ds, encoder_for(ds), data, 0, fill=np.nan, pool=pool)
    with h5py.File(tmp_path / "a.h5") as fa, h5py.File(tmp_path / "b.h5") as fb:
        assert fb["x"][()].tobytes() == data.tobytes()
        for r in range(0, shape[1], 8):
            for c in range(0, shape[2], 16 * 37):
                assert (fa["x"].id.read_direct_chunk((0, r, c))
                        == fb["x"].id.read_direct_chunk((0, r, c)))
