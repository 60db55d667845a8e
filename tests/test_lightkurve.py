"""Acceptance: light curves of a simulated run behave like TESS light curves in lightkurve.

One small simulated sector goes through ``simulate``, ``prepare``, ``todo`` and two ``run``s
(the bright stars first, the faint ones later) on the command line, exactly as a user runs it:
every file must be co-trended (the faint ones too), read by lightkurve's SPOC reader with the
usual arguments, and look like the real TESS-SPOC file of ``tests/data`` to lightkurve.
"""
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

DATA = Path(__file__).parent / "data"
TESS_SPOC = DATA / "hlsp_tess-spoc_tess_phot_0000000188589164-s0024_tess_v1_lc.fits"
SPOC_2MIN = (Path(__file__).parents[2] / "shared" / "data" / "real" / "lightcurves"
             / "tess2018206045859-s0001-0000000025155310-0120-s_lc.fits")

lk = pytest.importorskip("lightkurve")
#: one worker builds the module's run (``make test`` distributes with ``--dist loadgroup``)
pytestmark = pytest.mark.xdist_group("lightkurve_run")


def tessphot(*args):
    res = subprocess.run([sys.executable, "-m", "photometry.cli", *map(str, args)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lkrun")
    # a 5 % PRF-width ramp (focus): the aperture loses up to 0.3 % of the flux, a slow
    # common-mode systematic, 10-30x the noise of the brighter stars
    tessphot("simulate", root / "sim", "--cadences", 150, "--size", 128, 128, "--seed", 3,
             "--focus-change", 0.05, "--no-progress")
    tessphot("prepare", root / "sim" / "ffi", "--catalog", root / "sim" / "catalog.csv",
             "--cache", root / "cache", "--set", "backdrop.progress=false")
    tessphot("todo", root / "cache")
    first = tessphot("run", root / "cache", "--output", root / "lc", "--workers", 2,
                     "--tmag-max", 13.0, "--no-progress")
    later = tessphot("run", root / "cache", "--output", root / "lc", "--workers", 2,
                     "--no-progress")
    files = sorted((root / "lc").rglob("*_lc.fits"))
    return {"root": root, "files": files, "first": first, "later": later,
            "truth": root / "sim" / "truth.h5"}


def _bright_file(run, tmag=(9.5, 11.0)):
    for f in run["files"]:
        h = fits.getheader(f)
        if tmag[0] < h["TESSMAG"] < tmag[1]:
            return f
    raise AssertionError("no star in that range")


def test_every_file_is_corrected_also_the_stars_added_later(run):
    assert "correction s0001-1-4-c1800-aperture" in run["first"]
    # the last step of run, after the photometry
    assert run["first"].index(" tasks in ") < run["first"].index("correction s0001")
    assert "summary: " in run["later"]
    assert len(run["files"]) > 100
    faint_done = declined = 0
    for f in run["files"]:
        with fits.open(f) as hdul:
            h, d = hdul["LIGHTCURVE"].header, hdul["LIGHTCURVE"].data
            assert hdul[0].header["FILEVER"] == "2.0"
            if h["PDCMETHD"] == "none":   # declined: a correction that would add noise
                assert "adds noise" in h["PDC_NOTE"], (f.name, h["PDC_NOTE"])
                declined += 1
                continue
            assert h["PDCMETHD"] == "cbvMAP", (f.name, h.get("PDC_NOTE"))
            assert h["PDC_NCBV"] >= 1 and 0 <= h["PDC_TOT"] <= 1
            if hdul[0].header["TESSMAG"] > 13.0:          # corrected by the second run
                faint_done += 1
                assert not np.array_equal(d["PDCSAP_FLUX"], d["SAP_FLUX"])
    assert faint_done > 20 and declined <= 0.03 * len(run["files"])
    assert (run["root"] / "lc" / "cbv" / "tessphot-s0001-1-4-c1800-aperture_cbv.fits").exists()


def test_focus_systematic_removed_in_the_pixels_made_light_curves(run):
    """The focus ramp made in the pixels, measured against the true flux of each constant
    star: at least 5x smaller in PDCSAP_FLUX than in SAP_FLUX where it is 3x the noise."""
    from photometry.sim.lcsim import systematic_rms
    with h5py.File(run["truth"]) as tr:
        ids = tr["stars/starid"][()]
        constant = ~tr["stars/variable"][()]
        true = tr["flux"][()]
    ratios = []
    for f in run["files"]:
        i = np.flatnonzero(ids == fits.getheader(f)["TICID"])[0]
        if not constant[i]:
            continue
        d = fits.getdata(f, "LIGHTCURVE")
        g = ((d["QUALITY"] & 17087) == 0) & np.isfinite(d["SAP_FLUX"])
        t = d["TIME"]
        sap = d["SAP_FLUX"] / true[i] / np.median(d["SAP_FLUX"][g] / true[i][g]) - 1
        pdc = d["PDCSAP_FLUX"] / true[i] / np.median(d["PDCSAP_FLUX"][g] / true[i][g]) - 1
        before, after = systematic_rms(t, sap, g, 0.25), systematic_rms(t, pdc, g, 0.25)
        white = 1.4826 * np.median(np.abs(np.diff(sap[g]))) / np.sqrt(2)
        if before > 3 * white:
            ratios.append(before / max(after, 1e-9))
    assert len(ratios) >= 10
    # measured (70 stars): 10th percentile 21x, the worst 2.6x; most are left below the noise
    assert np.percentile(ratios, 10) > 5


def test_lightkurve_reads_it_as_a_spoc_light_curve(run):
    path = str(_bright_file(run))
    with fits.open(path) as hdul:
        d = hdul["LIGHTCURVE"].data
        quality = np.asarray(d["QUALITY"])
        pdc, sap = np.asarray(d["PDCSAP_FLUX"]), np.asarray(d["SAP_FLUX"])
    lc = lk.read(path)
    assert isinstance(lc, lk.TessLightCurve)
    assert lc.meta["FLUX_ORIGIN"] == "pdcsap_flux"
    default = (quality & lk.utils.TessQualityFlags.DEFAULT_BITMASK) == 0
    assert 0 < np.count_nonzero(~default) < 20          # dumps, coarse point, manual exclude
    np.testing.assert_allclose(lc.flux.value, pdc[default])
    counts = {q: len(lk.read(path, quality_bitmask=q))
              for q in ("none", "default", "hard", "hardest", 32)}
    assert counts["none"] == quality.size
    assert counts["default"] == np.count_nonzero(default)
    assert counts["hardest"] == np.count_nonzero((quality & 65535) == 0) <= counts["hard"]
    assert counts[32] == np.count_nonzero((quality & 32) == 0) < quality.size
    s = lk.read(path, flux_column="sap_flux", quality_bitmask="none")
    assert s.meta["FLUX_ORIGIN"] == "sap_flux"
    np.testing.assert_allclose(s.flux.value, sap)
    for key in ("TICID", "SECTOR", "CAMERA", "CCD", "ORIGIN", "AUTHOR", "CROWDSAP",
                "FLFRCSAP", "CDPP1_0", "PDCMETHD", "TESSMAG"):
        assert lc.meta.get(key) is not None, key
    assert lc.meta["ORIGIN"] == "tessphot" and lc.meta["SECTOR"] == 1
    assert np.isfinite(lc.estimate_cdpp(transit_duration=2, savgol_window=49).value)
    flat = lc.flatten(window_length=49)
    assert len(flat) == len(lc) and abs(np.nanmedian(flat.flux.value) - 1) < 1e-3
    assert lc.to_periodogram().max_power.value > 0


def test_periodogram_finds_a_simulated_rotation(run):
    """A star the simulator made vary (in the pixels) shows its period in lightkurve."""
    with h5py.File(run["truth"]) as tr:
        v = tr["variability"]
        kinds = [k.decode() if isinstance(k, bytes) else k for k in v["type"][()]]
        stars = tr["stars/starid"][()][v["index"][()]]
        cands = [(int(s), float(p), float(a)) for s, k, p, a in
                 zip(stars, kinds, v["period"][()], v["amplitude"][()])
                 if k == "sinusoid" and p < 1.5 and a > 0.01]
    by_tic = {int(fits.getheader(f)["TICID"]): f for f in run["files"]}
    found = [(s, p) for s, p, _ in cands if s in by_tic]
    assert found
    sid, period = found[0]
    lc = lk.read(str(by_tic[sid]))
    pg = lc.normalize().to_periodogram(minimum_period=0.2, maximum_period=2.0)
    assert abs(pg.period_at_max_power.value / period - 1) < 0.05


def test_real_tess_spoc_file_gives_the_same_kinds_of_objects(run):
    ours = lk.read(str(_bright_file(run)))
    for real_path in [TESS_SPOC] + ([SPOC_2MIN] if SPOC_2MIN.exists() else []):
        real = lk.read(str(real_path))
        assert type(real) is type(ours)
        assert type(real.time) is type(ours.time) and real.time.format == ours.time.format
        assert real.flux.unit == ours.flux.unit
        for key in ("TICID", "SECTOR", "CAMERA", "CCD", "AUTHOR", "ORIGIN", "FLUX_ORIGIN",
                    "TELESCOP", "OBJECT", "RA_OBJ", "DEC_OBJ", "TESSMAG", "TEFF", "PMRA",
                    "PMDEC", "CROWDSAP", "FLFRCSAP", "CDPP0_5", "CDPP1_0", "CDPP2_0",
                    "PDCMETHD", "DATA_REL", "PROCVER", "DATE-OBS", "DATE-END", "CREATOR",
                    "TIMEDEL", "BJDREFI", "QUALITY_BITMASK"):
            assert key in real.meta and key in ours.meta, key
        for col in ("flux", "flux_err", "quality", "timecorr", "centroid_col", "centroid_row",
                    "cadenceno", "sap_flux", "sap_flux_err", "sap_bkg", "sap_bkg_err",
                    "pdcsap_flux", "pdcsap_flux_err", "mom_centr1", "mom_centr2",
                    "pos_corr1", "pos_corr2"):
            assert col in real.colnames and col in ours.colnames, col
        assert len(lk.read(str(real_path), quality_bitmask="hard")) > 0


def test_noise_model_against_measured_and_ideal(run):
    """Per star: the measured 1-h CDPP of SAP_FLUX against the expected one of its aperture
    (constant, isolated stars), and the expected noise never below the simulator's ideal
    (optimally weighted PRF) noise."""
    table = Table.read(run["root"] / "lc" / "summary" / "s0001-1-4-c1800_summary.fits")
    with h5py.File(run["truth"]) as tr:
        ids = tr["stars/starid"][()]
        quiet = set(ids[~tr["stars/variable"][()] & (tr["stars/kind"][()] == 1)].tolist())
        ideal = dict(zip(ids.tolist(), tr["stars/ideal_noise"][()] / tr["stars/flux_mean"][()]))
    sel = np.array([s in quiet for s in table["starid"]]) & (table["status"] == "OK")
    assert sel.sum() >= 8
    ratio = np.asarray(table["ratio_sap"])[sel]
    assert 0.8 < np.median(ratio) < 1.25, ratio       # measured: median 1.03
    for row in table[sel]:
        with fits.open(run["root"] / "lc" / row["lightcurve"]) as hdul:
            expected = hdul["LIGHTCURVE"].header["NOI_TOT"] * 1e-6
        assert expected > 0.97 * ideal[int(row["starid"])]


def test_summary_written_by_run_and_status(run):
    folder = run["root"] / "lc" / "summary"
    fits_path = folder / "s0001-1-4-c1800_summary.fits"
    for p in (fits_path, folder / "s0001-1-4-c1800_summary.csv", folder / "s0001-1-4-c1800_cdpp.png"):
        assert p.exists() and p.stat().st_size > 1000
    table = Table.read(fits_path)
    assert {"starid", "tmag", "method", "status", "reason", "cdpp_pdcsap", "cdpp_expected",
            "contamination", "flux_fraction"} <= set(table.colnames)
    csv = Table.read(folder / "s0001-1-4-c1800_summary.csv", format="ascii.csv")
    assert len(csv) == len(table) == int(tessphot("status", run["root"] / "cache", "--json")
                                         .split('"total": ')[1].split(",")[0])
    fits_path.unlink()
    out = tessphot("status", run["root"] / "cache", "--output", run["root"] / "lc")
    assert "s0001-1-4-c1800_summary.fits" in out and fits_path.exists()


def test_correct_twice_gives_the_same_files(run):
    def digest():
        return {f: hashlib.md5(f.read_bytes()).hexdigest() for f in run["files"]}
    before = digest()
    out = tessphot("correct", run["root"] / "cache", "--output", run["root"] / "lc")
    assert f"0 rewritten, {len(run['files'])} unchanged" in out
    assert digest() == before


def test_star_plots_and_correction_of_one_star(run):
    path = _bright_file(run)
    sid = int(fits.getheader(path)["TICID"])
    out = tessphot("star", sid, "--cache", run["root"] / "cache", "--output",
                   run["root"] / "lc", "--plot")
    assert "(PDCSAP_FLUX: cbvMAP)" in out
    plots = path.parent / "plots" / f"{sid:011d}"
    for name in ("stamp", "pixels", "background", "motion", "lightcurve"):
        assert (plots / f"{name}.png").stat().st_size > 10000, name
    assert fits.getheader(path, "LIGHTCURVE")["PDCMETHD"] == "cbvMAP"


def test_hlsp_file_names(run, tmp_path):
    path = _bright_file(run)
    sid = int(fits.getheader(path)["TICID"])
    tessphot("star", sid, "--cache", run["root"] / "cache", "--output", tmp_path,
             "--set", 'photometry.file_names="hlsp"', "--set", 'photometry.hlsp_project="demo"')
    found = list(tmp_path.rglob("hlsp_*"))
    assert [p.name for p in found] == [
        f"hlsp_demo_tess_ffi_s0001-{sid:016d}-1-4-c1800-aperture_tess_v2.0_lc.fits"]
    assert isinstance(lk.read(str(found[0])), lk.TessLightCurve)


def test_several_methods_side_by_side(run):
    """A later run of another method on the same output: its light curves are corrected as
    their own CCD group, the first method's files are left as they were, and the summary
    holds one row per (task, method). Last in the module: it adds files to the run."""
    def digest():
        return {f: hashlib.md5(f.read_bytes()).hexdigest() for f in run["files"]}
    # an earlier test re-ran one star with `tessphot star`, whose PDCSAP comes from the stored
    # vectors (float32 in the CBV file) and its own position: a refit of the CCD rewrites it once
    tessphot("correct", run["root"] / "cache", "--output", run["root"] / "lc")
    before = digest()
    res = subprocess.run([sys.executable, "-m", "photometry.cli", "run", str(run["root"] / "cache"),
                          "--output", str(run["root"] / "lc"), "--workers", "2", "--method",
                          "linpsf", "--tmag-max", "11.5", "--no-progress"],
                         capture_output=True, text=True)
    assert res.returncode in (0, 1), res.stderr[-2000:]   # 1: a linpsf fit the checks refused
    out = res.stdout
    n = len(run["files"])
    assert re.search(rf"correction s0001-1-4-c1800-aperture: {n} light curves \(cbvMAP \d+"
                     rf"(, none \d+)?\), 0 rewritten, {n} unchanged", out), out
    line = next(x for x in out.splitlines() if "correction s0001-1-4-c1800-linpsf" in x)
    done = int(line.split(": ")[1].split()[0])
    assert done >= 10 and f"{done} rewritten" in line and "(cbvMAP" in line
    assert digest() == before
    linpsf = sorted((run["root"] / "lc").rglob("*-linpsf_lc.fits"))
    assert len(linpsf) == done
    for f in linpsf:
        h = fits.getheader(f, "LIGHTCURVE")
        assert h["PDCMETHD"] in ("cbvMAP", "none") and h["PDC_NOTE"] is not None
    assert (run["root"] / "lc" / "cbv" / "tessphot-s0001-1-4-c1800-linpsf_cbv.fits").exists()
    table = Table.read(run["root"] / "lc" / "summary" / "s0001-1-4-c1800_summary.fits")
    methods = np.asarray(table["method"]).astype(str)
    finished = np.isin(np.asarray(table["status"]).astype(str), ["OK", "WARNING"])
    assert np.count_nonzero((methods == "linpsf") & finished) == done
    assert np.count_nonzero(methods == "aperture") == n + np.count_nonzero(
        np.asarray(table["status"]).astype(str) == "SKIPPED")
    both = set(table["starid"][(methods == "linpsf") & finished]) & \
        set(table["starid"][methods == "aperture"])
    assert len(both) == done
