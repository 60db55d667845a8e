"""Issue 13, items 1, 2 and 9 (data layer): FFIs without uncertainties, unusable frames and
damaged caches give right answers or clear errors, never a wrong light curve marked OK."""
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from astropy.io import fits

from photometry.core.base import STATUS
from photometry.data.cache import FFICache
from photometry.hooks.errors import InputError
from photometry.sim.evaluation import score_lightcurve
from photometry.data.ffi import find_ffi_files
from photometry.output.lightcurve_io import build_hdulist
from photometry.data.movement import _apply
from photometry.scheduler.prepare import prepare
from photometry.hooks.quality import TESSQualityFlags
from photometry.hooks.settings import load_settings
from photometry.sim.simulate import simulate
from photometry_aperture.aperture import AperturePhotometry

N_FRAMES, SIZE = 40, 96


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    out = tmp_path_factory.mktemp("trust_scene")
    settings = load_settings(extra={"simulate": {"cadences": N_FRAMES, "rows": SIZE,
                                                 "cols": SIZE, "seed": 5, "n_variable": 0.3}})
    simulate(out, settings, progress=False)
    return out


def _copy_ffis(scene, dest, edit):
    """Copies of the scene's FFIs with ``edit(index, hdul)`` applied to each."""
    dest.mkdir(parents=True)
    for i, path in enumerate(find_ffi_files(scene / "ffi")):
        with fits.open(path) as hdul:
            edit(i, hdul)
            hdul.writeto(dest / path.name)
    return dest


def _strip_uncert(_i, hdul):
    del hdul[2]
    hdul[0].header["NEXTEND"] = 1


@pytest.fixture(scope="module")
def no_uncert_cache(scene, tmp_path_factory):
    root = tmp_path_factory.mktemp("no_uncert")
    ffi = _copy_ffis(scene, root / "ffi", _strip_uncert)
    path, _ = prepare(ffi, scene / "catalog.csv", root / "cache", load_settings(),
                      progress=False)
    return path


def test_no_uncertainty_hdu_gives_real_errors_kernel_and_ideal_noise(scene, no_uncert_cache):
    """Item 1: FFIs without an uncertainty HDU. Before: all-NaN errors, every kernel centroid
    failed, aperture light curves 35x the photon limit, STATUS OK."""
    with FFICache(no_uncert_cache) as cache:
        errors = cache.stamp("errors", slice(None), slice(None))
        images = cache.stamp("images", slice(None), slice(None))
        assert np.isfinite(errors[np.isfinite(images)]).all()
        assert cache.errors_estimated == 1.0
        # the movement kernel is measured and follows the simulator's true motion
        assert cache._file["movement_kernel"].attrs["n_stars"] >= 5
        kernel = cache.movement_kernel
        ref = cache.ref_frame
    with h5py.File(scene / "truth.h5") as t:
        shifts = t["shifts"][:]
        tx0, ty0 = t["shifts"].attrs["kernel_x0"], t["shifts"].attrs["kernel_y0"]
        stars = {k: t["stars"][k][()] for k in ("starid", "tmag", "ideal_noise", "isolated",
                                                "row", "column")}
        true_flux = t["flux"][()]
    gx, gy = np.meshgrid(np.linspace(0, SIZE - 1, 5), np.linspace(0, SIZE - 1, 5))
    gx, gy = gx.ravel(), gy.ravel()
    rdx, rdy = _apply(shifts[ref], gx, gy, tx0, ty0)
    worst = 0.0
    for i in range(N_FRAMES):
        dx, dy = _apply(shifts[i], gx, gy, tx0, ty0)
        mx, my = kernel.shift(gx + rdx, gy + rdy, i)
        worst = max(worst, np.abs(mx - (dx - rdx)).max(), np.abs(my - (dy - rdy)).max())
    assert worst < 0.03, worst
    # aperture photometry of the isolated 8-13 mag stars: within 1.15x of the photon limit
    settings = load_settings()
    ratios = []
    with FFICache(no_uncert_cache) as cache:
        inside = ((stars["row"] > 8) & (stars["row"] < SIZE - 8) & (stars["column"] > 52)
                  & (stars["column"] < 44 + SIZE - 8))
        pick = np.flatnonzero(stars["isolated"] & inside & (stars["tmag"] >= 8)
                              & (stars["tmag"] <= 13) & np.isfinite(stars["ideal_noise"]))
        assert pick.size >= 5
        header = None
        for k in pick:
            phot = AperturePhotometry(int(stars["starid"][k]), cache, settings=settings)
            assert phot.photometry() in (STATUS.OK, STATUS.WARNING)
            ratio, _ = score_lightcurve(phot.lightcurve, true_flux[k], stars["ideal_noise"][k])
            ratios.append(ratio)
            if header is None:
                header = build_hdulist(phot)[0].header
    print("noise / ideal without uncertainty HDUs:", np.round(ratios, 3))
    assert np.median(ratios) <= 1.15
    assert header["ERR_EST"] == 1.0  # the light curve says its errors were estimated


def _zero(_i, hdul):
    for hdu in hdul[1:]:
        hdu.data[...] = 0.0


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "photometry.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_all_zero_folder_is_refused_naming_the_files(scene, tmp_path):
    """Item 2: all-zero FFIs. Before: prepare, todo and run exit 0 with 89 light curves."""
    ffi = _copy_ffis(scene, tmp_path / "ffi", _zero)
    out = _cli("prepare", ffi, "--catalog", scene / "catalog.csv", "--cache",
               tmp_path / "cache", "--no-progress")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "unusable" in lines[0] and "all zero" in lines[0]
    assert find_ffi_files(ffi)[0].name in lines[0]
    assert not list((tmp_path / "cache").glob("*.hdf5"))


def test_one_all_nan_frame_is_flagged_and_left_out(scene, tmp_path, caplog):
    """Item 2: one all-NaN frame with DQUALITY 0. Before: the whole CCD's prepare failed,
    naming the backdrop stage, not the file."""
    bad = 7

    def nan_frame(i, hdul):
        if i == bad:
            hdul[1].data[...] = np.nan
    ffi = _copy_ffis(scene, tmp_path / "ffi", nan_frame)
    with caplog.at_level("WARNING"):
        path, _ = prepare(ffi, scene / "catalog.csv", tmp_path / "cache", load_settings(),
                          progress=False)
    name = find_ffi_files(ffi)[bad].name
    warned = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert len(warned) == 1 and name in warned[0] and "all NaN" in warned[0]
    with FFICache(path) as cache:
        i = cache.ffi_files.index(name)
        assert cache.quality[i] & TESSQualityFlags.UnusableFrame
        assert not TESSQualityFlags.filter(cache.quality[i:i + 1])[0]
        assert TESSQualityFlags.UnusableFrame > 2 ** 15
        assert cache.ref_frame != i
        assert np.isnan(cache.movement_kernel.kernel[i]).all()
        assert np.isfinite(cache.movement_kernel.kernel[cache.ref_frame]).all()
        images = cache.stamp("images", slice(None), slice(None))
        good = TESSQualityFlags.filter(cache.quality)
        np.testing.assert_allclose(cache.sumimage, images[good].astype(float).mean(axis=0),
                                   rtol=1e-10)
        backdrop = cache.model_group("backdrop")
        weights = backdrop["weights"][()]
        assert np.isnan(weights[i]).all() and np.isfinite(np.delete(weights, i, 0)).all()


def test_damaged_cache_bytes_are_detected(no_uncert_cache, tmp_path):
    """Item 9: bytes overwritten inside the cache. Before: exit 0, 9 light curves differed."""
    damaged = tmp_path / no_uncert_cache.name
    shutil.copy(no_uncert_cache, damaged)
    shutil.copy(no_uncert_cache.with_name("catalog_" + no_uncert_cache.stem + ".sqlite"),
                tmp_path)
    with h5py.File(damaged) as f:
        info = f["images"].id.get_chunk_info_by_coord((0, 40, 48))
    with open(damaged, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(b"\x5a\xa5\x5a\xa5")
    with FFICache(damaged) as cache:
        cache.stamp("images", slice(0, 8), slice(0, 8))  # other chunks still read
        with pytest.raises(InputError, match=r"dataset 'images' is damaged"):
            cache.stamp("images", slice(38, 50), slice(44, 60))


REAL = __import__("pathlib").Path(__file__).parent / "data" / \
    "tess2018206192942-s0001-1-4-0120-s_ffic.fits"


def test_real_ffi_stars_where_spoc_has_no_uncertainty_get_their_flux(tmp_path):
    """Item 3: the real sector-1 cutout's uncertainty HDU covers only its first 84 science
    columns. Before: stars in the other 45 got 1-pixel masks and 21-24 % of their flux, STATUS
    OK. A small cache from copies of the frame at shifted times, a catalog of the stars found
    in it, and the aperture flux against a large plain aperture."""
    from astropy.table import Table
    from scipy import ndimage

    from photometry.data.ffi import read_ffi

    ffi = tmp_path / "ffi"
    ffi.mkdir()
    for i in range(6):
        with fits.open(REAL) as hdul:
            for hdu in hdul[1:]:
                hdu.header["TSTART"] += i / 48
                hdu.header["TSTOP"] += i / 48
            hdul.writeto(ffi / f"tess2018206{i:02d}2942-s0001-1-4-0120-s_ffic.fits")
    frame = read_ffi(REAL)
    image = frame.image.astype(float)
    sky = np.median(image)
    peaks = (image == ndimage.maximum_filter(image, 7)) & (image > sky + 300)
    rows, cols = np.nonzero(peaks)
    keep = (rows >= 5) & (rows < image.shape[0] - 5) & (cols >= 5) & (cols < image.shape[1] - 5)
    rows, cols = rows[keep], cols[keep]
    box = np.array([image[r - 3:r + 4, c - 3:c + 4].sum() - 49 * sky for r, c in zip(rows, cols)])
    ra, dec = frame.wcs.all_pix2world(cols.astype(float), rows.astype(float), 0)
    tmag = 20.451 - 2.5 * np.log10(np.clip(box, 1, None))
    Table({"starid": np.arange(1, rows.size + 1), "ra": ra, "dec": dec,
           "tmag": tmag}).write(tmp_path / "catalog.csv")
    path, _ = prepare(ffi, tmp_path / "catalog.csv", tmp_path / "cache", load_settings(),
                      progress=False)
    uncovered = (cols >= 84 + 4) & (tmag < 12.5) & (box > 0)
    covered = (cols < 84 - 4) & (tmag < 12.5) & (box > 0)
    settings = load_settings(assignments=["aperture.contamination_correction=false"])
    ratios = {}
    with FFICache(path) as cache:
        assert 0.3 < cache.errors_estimated < 0.4  # 45 of 129 columns
        for k in np.flatnonzero(uncovered | covered):
            phot = AperturePhotometry(int(k + 1), cache, settings=settings)
            status = phot.photometry()
            flux = np.nanmedian(phot.lightcurve["flux"])
            mask = int(np.count_nonzero(phot.final_phot_mask))
            # large plain aperture on the same background-subtracted pixels: r = 4 px disc
            yy, xx = np.mgrid[:phot.images_cube.shape[1], :phot.images_cube.shape[2]]
            disc = np.hypot(yy - phot.target_pos_row_stamp,
                            xx - phot.target_pos_column_stamp) <= 4.0
            plain = np.nanmedian(np.nansum(phot.images_cube[:, disc], axis=1))
            ratios[k] = flux / plain
            print(f"star {k + 1} Tmag {tmag[k]:.1f} {'covered' if covered[k] else 'estimated'}:"
                  f" mask {mask} px, flux {flux:.0f} vs r=4 aperture {plain:.0f} "
                  f"({flux / plain:.3f}), {status.name}")
            if status == STATUS.ERROR:  # the core's checks refused a wrong flux, with its reason
                assert "FLUX_VS_REFERENCE" in phot.details["checks"]["codes"]
                del ratios[k]
                continue
            assert status in (STATUS.OK, STATUS.WARNING)
            if uncovered[k]:
                assert mask >= 4  # before: 1 px
    est = [ratios[k] for k in np.flatnonzero(uncovered) if k in ratios]
    ref = [ratios[k] for k in np.flatnonzero(covered) if k in ratios]
    assert len(est) >= 2 and len(ref) >= 2
    # the stars whose uncertainties were estimated now fare like those with SPOC's (before:
    # 21-24 % of their flux). Both groups keep only 0.6-0.7 of the r = 4 px aperture on this
    # crowded real frame with a catalog found in the image: that deficit is common to both
    # (aperture masks, not uncertainties). It is right: an in-mask (SAP-like) flux keeps the
    # PRF fraction of its 3-9 pixel mask (docs/checks.md, "Aperture against a plain r = 4 px
    # aperture"); the one wrong flux here (star 2, 4x its pixels) is ERROR FLUX_VS_REFERENCE.
    print("median flux / plain aperture: estimated", np.median(est), "SPOC", np.median(ref))
    assert np.median(est) > 0.5, est
    assert abs(np.median(est) - np.median(ref)) < 0.1, (est, ref)
