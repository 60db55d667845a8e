"""`tessphot prepare` on simulated scenes: the cache reproduces the input FFIs exactly, the
movement kernel recovers the simulator's true shifts, a killed prepare resumes to the same
cache, prepare stages run and resume, and bad inputs give one line and exit code 2."""
import os
import shutil
import signal
import subprocess
import sys
import warnings

import h5py
import numpy as np
import pytest

from photometry import hookimpl
from photometry.data.cache import FFICache, clear_write_flag
from photometry.hooks.errors import InputError
from photometry.data.ffi import find_ffi_files, read_ffi
from photometry.data.movement import _apply
from photometry.hooks.plugins import get_plugin_manager
from photometry.scheduler.prepare import prepare
from photometry.hooks.quality import PixelQualityFlags, TESSQualityFlags
from photometry.hooks.settings import load_settings
from photometry.sim.simulate import simulate

N_FRAMES = 30
SIZE = 96


def _sim_settings(**extra):
    sim = {"cadences": N_FRAMES, "rows": SIZE, "cols": SIZE, "seed": 11}
    sim.update(extra)
    return load_settings(extra={"simulate": sim})


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    out = tmp_path_factory.mktemp("scene")
    simulate(out, _sim_settings(), progress=False)
    return out


@pytest.fixture(scope="module")
def prepared(scene, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache")
    path, state = prepare(scene / "ffi", scene / "catalog.csv", cache_dir, load_settings(),
                          progress=False)
    assert state == "new"
    return path


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "photometry.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cube_times_and_wcs_equal_the_input_ffis(scene, prepared):
    frames = [read_ffi(p) for p in find_ffi_files(scene / "ffi")]
    frames.sort(key=lambda f: f.time)
    with FFICache(prepared) as cache:
        images = cache.stamp("images", slice(None), slice(None))
        errors = cache.stamp("errors", slice(None), slice(None))
        flags = cache.stamp("pixel_flags", slice(None), slice(None))
        assert images.shape == (N_FRAMES, SIZE, SIZE)
        assert cache.row_offset == frames[0].row_offset
        assert cache.column_offset == frames[0].column_offset
        precision = load_settings()["prepare"]["precision"]
        assert precision > 0  # the default trim: within its documented bound of the input
        for i, fr in enumerate(frames):
            assert np.all(np.abs(images[i] - fr.image) <= 0.5 * precision * fr.uncert)
            assert np.array_equal(np.isnan(images[i]), np.isnan(fr.image))
            np.testing.assert_allclose(errors[i], fr.uncert, rtol=2.0 ** -9, atol=0)
            assert cache.time[i] == fr.time
            assert cache.time_start[i] == fr.tstart and cache.time_stop[i] == fr.tstop
            assert cache.timecorr[i] == np.float32(fr.timecorr)
            assert cache.cadenceno[i] == fr.cadenceno and cache.quality[i] == fr.quality
            assert cache.ffi_files[i] == fr.path.name
            w = cache.frame_wcs(i)
            assert w.to_header(relax=True) == fr.wcs.to_header(relax=True)
            px = np.array([[0.0, 0.0], [SIZE - 1.0, 17.3], [40.2, SIZE - 1.0]])
            assert np.allclose(w.all_pix2world(px, 0), fr.wcs.all_pix2world(px, 0),
                               rtol=0, atol=1e-12)
        # pixel flags: NonFinite exactly where the image is not finite, Saturated at the level
        level = load_settings()["prepare"]["saturation_level"]
        assert np.array_equal((flags & PixelQualityFlags.NonFinite) > 0, ~np.isfinite(images))
        sat = (flags & PixelQualityFlags.Saturated) > 0
        assert np.all(sat[images > level])
        # sum image: mean of the frames passing the default bitmask, NaN-aware
        good = TESSQualityFlags.filter(cache.quality)
        assert 0 < good.sum() < N_FRAMES  # the simulator flags some cadences
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            expected = np.nanmean(images[good].astype(np.float64), axis=0)
        assert np.allclose(cache.sumimage, expected, rtol=1e-12, atol=0, equal_nan=True)
        # reference frame: good quality, nearest the middle of the time span
        ref = cache.ref_frame
        assert good[ref]
        mid = 0.5 * (cache.time[0] + cache.time[-1])
        assert abs(cache.time[ref] - mid) <= np.min(np.abs(cache.time[good] - mid)) + 1e-9
        assert cache.reference_wcs.to_header(relax=True) == cache.frame_wcs(ref).to_header(relax=True)
        attrs = cache.attrs
        for key in ("schema_version", "package_version", "plugin_versions", "settings_hash",
                    "settings", "sector", "camera", "ccd", "cadence", "data_rel", "procver"):
            assert key in attrs
        assert attrs["complete"] and attrs["frames_done"] == N_FRAMES
        assert cache.catalog_path is not None and cache.catalog_path.exists()


def test_movement_kernel_recovers_true_shifts(scene, prepared):
    with h5py.File(scene / "truth.h5") as t:
        shifts = t["shifts"][:]
        tx0, ty0 = t["shifts"].attrs["kernel_x0"], t["shifts"].attrs["kernel_y0"]
    with FFICache(prepared) as cache:
        kernel = cache.movement_kernel
        ref = cache.ref_frame
        n_stars = cache._file["movement_kernel"].attrs["n_stars"]
    assert n_stars >= 5
    gx, gy = np.meshgrid(np.linspace(0, SIZE - 1, 10), np.linspace(0, SIZE - 1, 10))
    gx, gy = gx.ravel(), gy.ravel()
    # truth: nominal p -> frame i at p + S_i(p); our kernel maps the reference-frame position
    # q = p + S_ref(p) to frame i, so it must equal S_i(p) - S_ref(p)
    rdx, rdy = _apply(shifts[ref], gx, gy, tx0, ty0)
    qx, qy = gx + rdx, gy + rdy
    assert np.ptp(shifts[:, 0]) > 0.05  # the scene really moves
    worst = 0.0
    for i in range(N_FRAMES):
        dx, dy = _apply(shifts[i], gx, gy, tx0, ty0)
        mx, my = kernel.shift(qx, qy, i)
        worst = max(worst, np.abs(mx - (dx - rdx)).max(), np.abs(my - (dy - rdy)).max())
    assert worst < 0.02, worst
    # positions_at / apply agree with shift
    px, py = kernel.positions_at([0, 5], qx[:3], qy[:3])
    sx, sy = kernel.shift(qx[:3], qy[:3], 5)
    assert np.allclose(px[1], qx[:3] + sx) and np.allclose(py[1], qy[:3] + sy)


def test_rerun_is_a_no_op_and_other_settings_need_overwrite(scene, prepared, tmp_path):
    cache_dir = prepared.parent
    mtime = prepared.stat().st_mtime_ns
    out = _cli("prepare", scene / "ffi", "--catalog", scene / "catalog.csv", "--cache", cache_dir,
               "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "nothing to do" in out.stdout
    assert prepared.stat().st_mtime_ns == mtime
    other = load_settings(assignments=["prepare.kernel_clip=4.0"])
    with pytest.raises(InputError, match="--overwrite"):
        prepare(scene / "ffi", scene / "catalog.csv", cache_dir, other, progress=False)
    assert prepared.stat().st_mtime_ns == mtime


def _datasets(path):
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
        f.visititems(visit)
        attrs = dict(f.attrs)
    return out, attrs


def test_killed_prepare_resumes_to_the_same_cache(scene, prepared, tmp_path):
    opts = ["--set", "prepare.time_chunk=8", "--no-progress"]
    args = ["-v", "prepare", scene / "ffi", "--catalog", scene / "catalog.csv"]
    settings = load_settings(assignments=["prepare.time_chunk=8"])
    # uninterrupted reference with the same settings
    ref_dir = tmp_path / "ref"
    prepare(scene / "ffi", scene / "catalog.csv", ref_dir, settings, progress=False)
    # slowed down so that it can be killed after 16 of 30 frames
    env = dict(os.environ, TESSPHOT_PREPARE_FRAME_DELAY="0.2")
    kill_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "photometry.cli", *map(str, args), "--cache",
                             str(kill_dir), *opts], stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "16 of 30 frames stored" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    partial = kill_dir / (prepared.name + ".partial")
    assert partial.exists() and not (kill_dir / prepared.name).exists()
    # a killed writer leaves the superblock's "open for writing" flag set; plain HDF5 refuses
    # such a file until it is cleared (prepare does this itself when it resumes)
    with pytest.raises(OSError):
        h5py.File(partial, "r")
    assert clear_write_flag(partial)
    with h5py.File(partial) as f:
        assert 0 < f.attrs["frames_done"] < N_FRAMES
    with pytest.raises(InputError, match="partial"):
        FFICache(partial)
    path, state = prepare(scene / "ffi", scene / "catalog.csv", kill_dir, settings,
                          progress=False)
    assert state == "resume"
    data_a, attrs_a = _datasets(ref_dir / prepared.name)
    data_b, attrs_b = _datasets(kill_dir / prepared.name)
    assert sorted(data_a) == sorted(data_b)
    for name in data_a:
        a, b = data_a[name], data_b[name]
        if a.dtype.kind in "fc":
            assert np.array_equal(a, b, equal_nan=True), name
        else:
            assert np.array_equal(a, b), name
    assert attrs_a.keys() == attrs_b.keys()
    for key in attrs_a:
        assert np.array_equal(attrs_a[key], attrs_b[key]), key


# ---------------------------------------------------------------------------- prepare stages
class MedianStage:
    """Test stage: the per-frame median of the images, read through iter_frame_blocks."""

    calls = 0
    fail = False

    @staticmethod
    def make(base):
        class _Median(base):
            name = "test_median"
            version = "3"

            def run(self, cache, group):
                MedianStage.calls += 1
                medians = np.full(cache.n_frames, np.nan)
                for sl, images, errors, flags in cache.iter_frame_blocks():
                    assert images.shape == errors.shape == flags.shape
                    medians[sl] = np.nanmedian(images, axis=(1, 2))
                group.create_dataset("median", data=medians)
        return _Median


class FailingStage:
    fail = True
    calls = 0

    @staticmethod
    def make(base):
        class _Failing(base):
            name = "test_failing"
            version = "1"

            def run(self, cache, group):
                FailingStage.calls += 1
                if FailingStage.fail:
                    raise RuntimeError("stage crashed")
                group.attrs["ok"] = 1
        return _Failing


class _StagePlugin:
    def __init__(self, classes):
        self.classes = classes

    @hookimpl
    def register_prepare_stages(self):
        return self.classes


def test_prepare_stages_run_and_resume(scene, tmp_path):
    from photometry.data.stages import PrepareStage
    median_cls, failing_cls = MedianStage.make(PrepareStage), FailingStage.make(PrepareStage)
    pm = get_plugin_manager(extra_plugins=[_StagePlugin([median_cls, failing_cls])])
    settings = load_settings(assignments=['prepare.stages=["test_median", "test_failing"]'])
    MedianStage.calls = FailingStage.calls = 0
    FailingStage.fail = True
    with pytest.raises(RuntimeError, match="stage crashed"):
        prepare(scene / "ffi", scene / "catalog.csv", tmp_path, settings, progress=False, pm=pm)
    assert MedianStage.calls == 1 and FailingStage.calls == 1
    partial = next(tmp_path.glob("*.hdf5.partial"))
    with h5py.File(partial) as f:
        assert f["models/test_median"].attrs["complete"]
        assert not f["models/test_failing"].attrs["complete"]
    FailingStage.fail = False
    path, state = prepare(scene / "ffi", scene / "catalog.csv", tmp_path, settings,
                          progress=False, pm=pm)
    assert state == "resume"
    assert MedianStage.calls == 1 and FailingStage.calls == 2  # only the unfinished stage reran
    with FFICache(path) as cache:
        g = cache.model_group("test_median")
        assert g.attrs["version"] == "3" and g.attrs["complete"]
        images = cache.stamp("images", slice(None), slice(None))
        assert np.array_equal(g["median"][:], np.nanmedian(images, axis=(1, 2)))
        assert cache.model_group("test_failing").attrs["ok"] == 1
        assert cache.model_group("no_such_stage") is None
        assert '"test_median": "3"' in cache.attrs["plugin_versions"]


class RecordingStream:
    """Test streaming stage: records the context and every block it is fed."""

    seen = []

    @staticmethod
    def make(base):
        class _Stream(base):
            name = "test_stream"
            version = "1"

            def begin(self, context, group):
                RecordingStream.seen = [("begin", context)]
                self.group = group

            def add_block(self, frames, images, errors, pixel_flags, usable):
                RecordingStream.seen.append((frames, images.copy(), errors.copy(),
                                             pixel_flags.copy(), usable.copy()))

            def finish(self, cache, group):
                RecordingStream.seen.append(("finish", cache.file["time"][()]))
                group.create_dataset("blocks", data=[len(RecordingStream.seen) - 2])
        return _Stream


def test_streaming_stage_sees_every_block_once_as_stored(scene, tmp_path):
    """One pass: a StreamingStage gets every frame once, in order, exactly as stored (trimmed),
    before the two-pass stages run; its preview is a mean of frames spread over the sector."""
    from photometry.data.stages import PrepareStage, StreamingStage
    stream_cls, median_cls = RecordingStream.make(StreamingStage), MedianStage.make(PrepareStage)
    pm = get_plugin_manager(extra_plugins=[_StagePlugin([stream_cls, median_cls])])
    settings = load_settings(assignments=['prepare.stages=["test_median", "test_stream"]',
                                          "prepare.time_chunk=8", "prepare.preview_frames=7"])
    path, _ = prepare(scene / "ffi", scene / "catalog.csv", tmp_path, settings, progress=False,
                      pm=pm)
    seen = RecordingStream.seen
    assert seen[0][0] == "begin" and seen[-1][0] == "finish"
    context, blocks = seen[0][1], seen[1:-1]
    assert context.n_frames == N_FRAMES and context.n_preview == 7
    assert context.preview_image.shape == (SIZE, SIZE) and context.catalog is not None
    assert [b[0] for b in blocks] == [slice(a, min(a + 8, N_FRAMES)) for a in range(0, 30, 8)]
    with FFICache(path) as cache:
        for name, k in (("images", 1), ("errors", 2), ("pixel_flags", 3)):
            stored = cache.stamp(name, slice(None), slice(None))
            fed = np.concatenate([b[k] for b in blocks])
            assert fed.tobytes() == stored.tobytes(), name
        assert np.all(np.concatenate([b[4] for b in blocks]))
        assert np.array_equal(seen[-1][1], cache.time)
        assert cache.model_group("test_stream")["blocks"][0] == 4
        assert cache.model_group("test_median") is not None
        # the preview: the mean of 7 frames spread over the 30, as stored
        pick = np.unique(np.round(np.linspace(0, N_FRAMES - 1, 7)).astype(int))
        images = cache.stamp("images", slice(None), slice(None))
        assert np.allclose(context.preview_image, np.nanmean(images[pick], axis=0), atol=1e-4)
        # exactly: float64 sums of the finite values in frame order, over their counts
        errors = cache.stamp("errors", slice(None), slice(None))
        for got, cube in ((context.preview_image, images), (context.preview_errors, errors)):
            total, count = np.zeros((SIZE, SIZE)), np.zeros((SIZE, SIZE), np.int32)
            for i in pick:
                ok = np.isfinite(cube[i])
                total[ok] += cube[i][ok]
                count += ok
            with np.errstate(invalid="ignore", divide="ignore"):
                expect = np.where(count > 0, total / np.maximum(count, 1), np.nan)
            assert np.array_equal(got, expect, equal_nan=True)


# ---------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def other_ccd_frame(tmp_path_factory):
    out = tmp_path_factory.mktemp("other")
    simulate(out, _sim_settings(cadences=2, rows=32, cols=32, ccd=3), progress=False)
    return sorted((out / "ffi").glob("*_ffic.fits"))[0]


def _case(kind, scene, root, other_ccd_frame):
    ffi = root / "ffi"
    ffi.mkdir()
    catalog = scene / "catalog.csv"
    files = sorted((scene / "ffi").glob("*_ffic.fits"))[:3]
    if kind != "empty":
        for p in files:
            shutil.copy(p, ffi / p.name)
    if kind == "not_fits":
        (ffi / "tess2018206999999-s0001-1-4-0120-s_ffic.fits").write_text("hello, not FITS\n")
    elif kind == "truncated":
        data = files[1].read_bytes()
        (ffi / files[1].name).write_bytes(data[:len(data) // 2])
    elif kind == "mixed_ccd":
        shutil.copy(other_ccd_frame, ffi / other_ccd_frame.name.replace("-1-3-", "-1-3x-"))
    elif kind == "missing_column":
        catalog = root / "catalog.csv"
        lines = (scene / "catalog.csv").read_text().splitlines()
        header = lines[0].split(",")
        idx = header.index("tmag")
        catalog.write_text("\n".join(",".join(v for j, v in enumerate(line.split(","))
                                              if j != idx) for line in lines) + "\n")
    elif kind == "out_of_order":
        # a second copy of a frame under another name: two frames with the same time
        shutil.copy(files[1], ffi / files[1].name.replace("-s_ffic", "-a_ffic"))
    return ffi, catalog


BAD_INPUTS = [
    ("empty", "no calibrated"),
    ("not_fits", "not a FITS"),
    ("truncated", "truncated"),
    ("mixed_ccd", "CCD"),
    ("missing_column", "tmag"),
    ("out_of_order", "order"),
]


@pytest.fixture(scope="module")
def bad_input_runs(scene, other_ccd_frame, tmp_path_factory):
    """Every bad-input case through the real CLI, the subprocesses run side by side (their
    start-up, mostly imports, dominates)."""
    procs = {}
    for kind, _ in BAD_INPUTS:
        root = tmp_path_factory.mktemp(kind)
        ffi, catalog = _case(kind, scene, root, other_ccd_frame)
        cmd = [sys.executable, "-m", "photometry.cli", "prepare", str(ffi), "--catalog",
               str(catalog), "--cache", str(root / "cache"), "--no-progress"]
        procs[kind] = (root, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True))
    results = {}
    for kind, (root, proc) in procs.items():
        out, err = proc.communicate(timeout=300)
        results[kind] = (root, proc.returncode, out, err)
    return results


@pytest.mark.parametrize("kind, message", BAD_INPUTS)
def test_bad_input_one_line_exit_2(kind, message, bad_input_runs):
    root, code, out, err = bad_input_runs[kind]
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tessphot prepare: error:")
    assert message.lower() in lines[0].lower(), lines[0]
    # (a truncated file is found only when its pixels are read: a .partial may remain)
    assert not list((root / "cache").glob("*.hdf5"))
