"""The sector benchmark's fast FFI writer and its projection arithmetic."""
import filecmp
import importlib.util
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("photometry.sim.simulate")
    spec = importlib.util.spec_from_file_location(
        "bench_sector", Path(__file__).parents[1] / "benchmarks" / "bench_sector.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fast_writer_writes_the_simulators_bytes(bench, tmp_path):
    """Every file of the fast renderer equals the simulator's writer's, byte for byte."""
    n = [bench.render(tmp_path / kind, 6, 64, progress=False, fast=kind == "fast")
         for kind in ("fast", "slow")]
    assert n[0] == n[1] > 0
    fast = sorted((tmp_path / "fast" / "ffi").glob("*_ffic.fits"))
    slow = sorted((tmp_path / "slow" / "ffi").glob("*_ffic.fits"))
    assert len(fast) == len(slow) == 6
    assert [p.name for p in fast] == [p.name for p in slow]
    assert all(filecmp.cmp(a, b, shallow=False) for a, b in zip(fast, slow))


def test_growth_is_exact_at_measured_points(bench):
    pts = [(200, 1.0), (1282, 2.0), (11800, 10.0)]
    assert bench._growth(pts, 1282, 200) == pytest.approx(1.0)
    assert bench._growth(pts, 11800, 200) == pytest.approx(9.0)
    assert bench._growth(pts, 741, 200) == pytest.approx(0.5)
    # beyond the last point: the last segment's slope
    assert bench._growth(pts[:2], 11800, 200) == pytest.approx((11800 - 200) / 1082)
    assert bench._growth(pts[:1], 11800, 200) == 0.0


def _sector(frames, cpu, rss, prep_cpu=None, prep_rss=100.0, label="s"):
    run = {"cpu_per_target": cpu, "maxrss_mb": rss}
    return {"label": label, "frames": frames, "size": 2048,
            "correct": {"cpu_per_lc": cpu / 10, "maxrss_mb": rss},
            "prepare": {"cpu": prep_cpu or 0.0, "wall": 0.0, "maxrss_mb": prep_rss},
            "cache_bytes": 3.0 * 2048 ** 2 * frames, "ffi_bytes": 36e6 * frames,
            "todo": {"cpu": 20.0}, "runs": {"aperture_2w": run, "linpsf_2w": dict(run)}}


def test_projection_adds_the_measured_growth_to_the_full_frame_cost(bench):
    full = [_sector(40, 0.05, 300.0, prep_cpu=10 + 0.5 * 40),
            _sector(200, 0.06, 400.0, prep_cpu=10 + 0.5 * 200, prep_rss=3000.0)]
    small = [_sector(200, 0.02, 150.0, prep_rss=200.0),
             _sector(1282, 0.10, 350.0, prep_rss=210.0),
             _sector(11800, 1.00, 1350.0, prep_rss=400.0)]
    proj = bench.project(full, small, targets=1000, cores=2)
    s = proj["sectors"][1282]
    assert s["measured_small"]
    assert s["aperture_2w_per_target_ms"] == pytest.approx(1000 * (0.06 + 0.08))
    assert s["aperture_2w_run_h"] == pytest.approx(1000 * 0.14 / 2 / 3600)
    assert s["aperture_2w_rss_mb"] == pytest.approx(400 + 200)
    assert s["prepare_h"] == pytest.approx((10 + 0.5 * 1282) / 3600)
    assert s["prepare_rss_mb"] == pytest.approx(3010.0)
    assert s["cache_gb"] == pytest.approx(3.0 * 2048 ** 2 * 1282 / 1e9)
    s = proj["sectors"][11800]
    assert s["aperture_2w_per_target_ms"] == pytest.approx(1000 * (0.06 + 0.98))
    assert s["prepare_rss_mb"] == pytest.approx(3200.0)
    assert s["correct_per_lc_ms"] == pytest.approx(100 * (0.06 + 0.98))
    assert s["correct_h"] == pytest.approx(1000 * 0.104 / 3600)
    assert s["total_aperture_h"] == pytest.approx(
        s["prepare_h"] + 20 / 3600 + s["aperture_2w_run_h"] + s["correct_h"])
    assert np.isfinite(list(proj["laws"]["aperture_2w_cpu"])).all()
