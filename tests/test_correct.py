"""Light-curve correction "cbv": injection-recovery and systematics removal on synthetic CCD
ensembles (known truth), SPOC CBV files, determinism, and the pieces of the method."""
import numpy as np
import pytest

from photometry.data.fits_tables import read_fits_tables
from photometry.hooks.errors import ConfigurationError
from photometry.scheduler.correct import correct_ensemble
from photometry.sim.lcsim import (inject_sinusoid, inject_transit, sinusoid_amplitude,
                                  synthetic_ensemble, systematic_rms, transit_depth)
from photometry.hooks.settings import load_settings
from photometry_cbv import CBVCorrection, cbv_hdulist, read_cbvs, vectors_on
from photometry_cbv.basis import map_fit, red_noise_edge, red_noise_factors

PERIODS = (0.5, 1.0, 2.0, 5.0, 10.0)
DEPTHS = (1e-3, 3e-3, 1e-2)


def _inject(ens, truth, seed=99):
    """Sinusoids (1 %, 0.5-10 d) into 20 quiet stars and box transits (1-10 mmag, 3 h) into 18;
    returns {index: spec}. Transit hosts are bright enough (Tmag < 11) that the depth of a
    1-mmag transit is measured to a few per cent."""
    rng = np.random.default_rng(seed)
    quiet = np.flatnonzero(~truth["variable"] & (ens.tmag < 12.5))
    chosen = rng.choice(quiet, 20, replace=False)
    bright = np.setdiff1d(np.flatnonzero(~truth["variable"] & (ens.tmag < 11.0)), chosen)
    hosts = rng.choice(bright, 18, replace=False)
    specs = {}
    for j, i in enumerate(chosen):
        period = PERIODS[j % 5]
        ens.flux[i] = inject_sinusoid(ens.flux[i], ens.time, period, 0.01, phase=j)
        specs[int(i)] = ("sinusoid", period, 0.01)
    for j, i in enumerate(hosts):
        depth, period = DEPTHS[j % 3], 3.1 + 0.37 * j
        epoch, duration = ens.time[0] + 0.5 + 0.13 * j, 0.125
        ens.flux[i] = inject_transit(ens.flux[i], ens.time, period, epoch, duration, depth)
        specs[int(i)] = ("transit", period, epoch, duration, depth)
    return specs


def _recovered(ens, truth, specs, results):
    """Per injected star: (kind, size, recovered / the same measured without systematics)."""
    out = []
    for i, spec in specs.items():
        g = ens.good[i]
        rel = results[i].flux / np.median(results[i].flux[g]) - 1
        ideal = ens.flux[i] / np.median(ens.flux[i][g]) / (1 + truth["systematic"][i]) - 1
        if spec[0] == "sinusoid":
            a = sinusoid_amplitude(ens.time, rel, spec[1], g)
            b = sinusoid_amplitude(ens.time, ideal, spec[1], g)
            out.append(("sinusoid", spec[1], a / b, a / spec[2]))
        else:
            a = transit_depth(ens.time, rel, *spec[1:4], g)
            b = transit_depth(ens.time, ideal, *spec[1:4], g)
            out.append(("transit", spec[4], a / b, a / spec[4]))
    return out


def _reduction(ens, truth, results, specs, min_snr=3.0):
    """Systematic rms before / after for the quiet stars whose systematic is at least
    ``min_snr`` times their noise per cadence."""
    before, after = [], []
    for i in range(len(ens.starid)):
        if truth["variable"][i] or i in specs:
            continue
        g = ens.good[i]
        if np.std(truth["systematic"][i][g]) < min_snr * truth["sigma"][i]:
            continue
        # constant stars: all that varies beyond the noise is systematic
        before.append(systematic_rms(ens.time, ens.flux[i] / np.median(ens.flux[i][g]) - 1, g))
        after.append(systematic_rms(ens.time, results[i].flux / np.median(results[i].flux[g])
                                    - 1, g))
    return np.array(before), np.array(after)


@pytest.mark.parametrize("seed,scale,scatter,systematics", [
    (0, 1.0, 0.1, "orbit"), (3, 2.0, 0.05, "orbit"),
    # systematics of 3x: the 5-10 d sinusoids rest on the prior (0.973-1.022 with a local
    # linear prior; 0.990-1.012 with the quadratic one)
    (11, 3.0, 0.1, "orbit"),
    # other shapes: a sector-long focus ramp, pointing steps at the dumps, a 1.7-d thermal
    # oscillation (measured on seeds 0, 3, 7, 11: sinusoids 0.981-1.009, transits 0.986-1.010)
    (7, 1.0, 0.2, "steps")])
def test_injected_signals_kept_and_common_systematics_removed(seed, scale, scatter, systematics):
    ens, truth = synthetic_ensemble(n_stars=400, n_cadences=1000, seed=seed, scale=scale,
                                    scatter=scatter, systematics=systematics)
    specs = _inject(ens, truth)
    corr = CBVCorrection(load_settings())
    results = correct_ensemble(corr, ens)
    # three systematics injected: three vectors above the noise
    assert corr.vectors.shape[0] == 3, corr.notes
    assert all(r.method == "cbvMAP" for r in results)
    rec = _recovered(ens, truth, specs, results)
    # against the same light curve without systematics (same noise): the mean of each group
    # (4 stars each) within 1 % (measured on seeds 0, 3, 7, 11: 0.996-1.003) ...
    for kind, size in [("sinusoid", p) for p in PERIODS] + [("transit", d) for d in DEPTHS]:
        ratios = [r for k, s, r, _ in rec if (k, s) == (kind, size)]
        assert abs(np.mean(ratios) - 1) < 0.01, (kind, size, ratios)
    # ... and every star within 2 %, the goal (measured on orbit seeds 0, 3, 7, 11:
    # sinusoids 0.990-1.015, transits 0.988-1.008; before the per-star fit's clipping
    # converged and the systematic was divided out, 1-mmag transits kept 0.975)
    for kind, size, ratio, _ in rec:
        assert abs(ratio - 1) < 0.02, (kind, size, ratio)
    # ... while the systematics (3-30x the noise of these stars) go down at least 5x: the
    # binned residual systematic after the correction, noise taken out (measured: 10th
    # percentile of the reduction 40x)
    before, after = _reduction(ens, truth, results, specs)
    assert before.size > 40
    assert np.percentile(before / np.maximum(after, 1e-12), 10) > 5.0


def test_least_squares_alone_eats_slow_signals():
    """The prior is what protects a 10-d rotation: without it (plain least squares on the same
    vectors, what a RegressionCorrector does) the amplitude is not kept."""
    ens, truth = synthetic_ensemble(n_stars=400, n_cadences=1000, seed=0)
    specs = _inject(ens, truth)
    corr = CBVCorrection(load_settings())
    correct_ensemble(corr, ens)
    losses = []
    for i, spec in specs.items():
        if spec[0] == "sinusoid" and spec[1] == 10.0:
            y = ens.flux[i] / np.median(ens.flux[i][ens.good[i]]) - 1
            fit = map_fit(y, corr.vectors, ens.good[i], time=ens.time)
            a = sinusoid_amplitude(ens.time, y - fit.systematic, 10.0, ens.good[i])
            losses.append(a / spec[2])
    assert min(losses) < 0.9          # measured 0.71-0.88


def test_pure_noise_gives_no_vectors():
    ens, _ = synthetic_ensemble(n_stars=200, n_cadences=600, seed=1, scale=0.0,
                                variable_fraction=0.0)
    corr = CBVCorrection(load_settings())
    results = correct_ensemble(corr, ens)
    assert corr.vectors.shape[0] == 0 and "no vector above the noise" in corr.notes
    assert all(r.method == "none" for r in results)
    np.testing.assert_array_equal(results[5].flux, ens.flux[5])


def test_deterministic_whatever_the_order():
    ens, _ = synthetic_ensemble(n_stars=300, n_cadences=600, seed=2)
    a = CBVCorrection(load_settings())
    ra = correct_ensemble(a, ens)
    order = np.random.default_rng(0).permutation(len(ens.starid))
    b = CBVCorrection(load_settings())
    # the core sorts by TIC; a shuffled ensemble sorted back gives the very same result
    shuffled = ens.subset(order)
    back = shuffled.subset(np.argsort(shuffled.starid))
    rb = correct_ensemble(b, back)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    np.testing.assert_array_equal(ra[17].flux, rb[17].flux)


def test_red_noise_factors():
    rng = np.random.default_rng(4)
    t = np.arange(1000) / 48.0
    use = np.ones(t.size, bool)
    ramp = (t - t.mean()) / np.linalg.norm(t - t.mean())
    fast = np.sin(2 * np.pi * t / 0.1)
    design = np.array([ramp, fast / np.linalg.norm(fast)])
    white = rng.standard_normal(t.size)
    assert np.all(red_noise_factors(design, white, use) < 1.6)
    slow = white + 3 * np.sin(2 * np.pi * t / 10.0)
    beta2 = red_noise_factors(design, slow, use)
    # the 10-d signal projects on the ramp, hardly on a 2.4-h sinusoid
    assert beta2[0] > 50 and beta2[1] < 3


def test_one_star_with_a_slow_signal_of_its_own_does_not_raise_the_noise_edge():
    """The red-noise edge is what a common vector must stand above. One basis star with a
    strong slow signal of its own is a singular value of its own (about its norm, whatever
    the random lags), which the carrier test would never keep as a vector: counted, it set
    the edge of the benchmark's pixel scene (seed 8: 66 where the others' noise gave 39) and
    three real pointing and focus vectors fell below it."""
    rng = np.random.default_rng(6)
    t = 1325.3 + np.arange(988) / 48.0
    resid = rng.standard_normal((59, t.size))
    mp = np.sqrt(59) + np.sqrt(t.size)                     # white noise: Marchenko-Pastur
    assert abs(red_noise_edge(resid) / mp - 1) < 0.05
    resid[22] += 2.6 * np.sin(2 * np.pi * (t - t[0]) / 7.0)   # norm 66, as on the scene
    assert abs(red_noise_edge(resid) / mp - 1) < 0.05      # measured 0.998 (before: 1.72)
    # a slow signal that many stars share in their own residual is still red noise
    resid[:30] += 1.5 * np.sin(2 * np.pi * (t - t[0]) / 5.0)
    assert red_noise_edge(resid) > 1.3 * mp


def test_spoc_cbv_file(tmp_path):
    """SPOC-format CBVs (sampled at 10 min, three times finer than the light curves) are
    found by sector/camera/CCD, averaged over each exposure and fitted; lightkurve reads the
    same file with its own reader."""
    ens, truth = synthetic_ensemble(n_stars=300, n_cadences=800, seed=5, variable_fraction=0)
    # the true systematic shapes on a 10-min grid, as SPOC would provide them
    fine_t = np.arange(ens.time[0] - 0.01, ens.time[-1] + 0.02, 600 / 86400)
    shapes = np.linalg.svd(truth["systematic"], full_matrices=False)[2][:3]
    fine = np.array([np.interp(fine_t, ens.time, v) for v in shapes])
    gap = (fine_t > ens.time[399] + 0.03) & (fine_t < ens.time[400] - 0.03)
    hdul = cbv_hdulist(fine, fine_t, np.arange(fine_t.size) + 100, gap, 1, 1, 1)
    path = tmp_path / "tess2018206045859-s0001-1-1-0120-s_cbv.fits"
    hdul.writeto(path)
    t, cad, g, vec = read_cbvs(read_fits_tables(path), 1, 1, 1)
    assert vec.shape == (3, fine_t.size) and g.sum() == gap.sum()
    with pytest.raises(ValueError, match="sector"):
        read_cbvs(read_fits_tables(path), 2, 1, 1)
    on = vectors_on(ens.time, ens.cadence, t, g, vec)
    assert np.allclose(np.linalg.norm(on, axis=1), 1)

    import lightkurve as lk
    cbvs = lk.correctors.load_tess_cbvs(cbv_dir=str(tmp_path), sector=1, camera=1, ccd=1,
                                        cbv_type="SingleScale")
    np.testing.assert_allclose(np.asarray(cbvs["VECTOR_2"]), fine[1], rtol=1e-6)

    settings = load_settings(assignments=[f'cbv.spoc_cbv_dir="{tmp_path}"'])
    corr = CBVCorrection(settings)
    results = correct_ensemble(corr, ens)
    assert {r.method for r in results} == {"spocCBV"}
    before, after = _reduction(ens, truth, results, {})
    assert np.percentile(before / np.maximum(after, 1e-12), 10) > 5.0
    # no file for this CCD: our own vectors, and a note saying so
    other = CBVCorrection(load_settings(assignments=[f'cbv.spoc_cbv_dir="{tmp_path / "x"}"']))
    with pytest.raises(ConfigurationError, match="cbv.spoc_cbv_dir = .*no such folder"):
        correct_ensemble(other, ens)        # a mistyped folder is no silent fallback
    (tmp_path / "x").mkdir()
    other = CBVCorrection(other.settings)
    assert correct_ensemble(other, ens)[0].method == "cbvMAP"
    assert "no SPOC CBV file" in other.notes[0]


def test_a_vector_few_stars_carry_is_no_systematic():
    """Three variables whose slow signals look alike (no systematic common to the CCD) made a
    vector before: none held half of its weight. A vector must rest on many stars."""
    from photometry_cbv.basis import build_basis
    rng = np.random.default_rng(8)
    n_star, n = 30, 100
    t = 1325.3 + np.arange(n) / 48.0
    z = rng.standard_normal((n_star, n))
    slow = np.sin(2 * np.pi * (t - t[0]) / 6.0)
    z[3] += 6 * slow
    z[17] += 5.5 * slow + 0.5 * rng.standard_normal(n)
    z[25] += 5 * np.sin(2 * np.pi * (t - t[0]) / 5.0)
    basis = build_basis(z, np.ones(n_star), np.ones(n, bool), t, ids=np.arange(n_star) + 100)
    assert basis.vectors.shape[0] == 0, basis.notes
    # what is left out is the variables and nothing else, then nothing common is left: the
    # noise edge counts only singular vectors many stars carry, so the variables' own
    # signals no longer lift it (before, they did, and the note was this one alone)
    left_out = {int(note.split()[1]) for note in basis.notes[:-1]}
    assert left_out and left_out <= {103, 117, 125}, basis.notes
    assert basis.notes[-1] == "no vector above the noise"
    # the same slow signal in every star is a systematic, and is found
    common = build_basis(z + 3 * slow, np.ones(n_star), np.ones(n, bool), t)
    assert common.vectors.shape[0] == 1
    assert abs(np.corrcoef(common.vectors[0], slow)[0, 1]) > 0.95   # measured 0.98


def test_a_correction_that_adds_noise_is_not_applied():
    ens, _ = synthetic_ensemble(n_stars=300, n_cadences=400, seed=2)
    # no correction can meet this: every star keeps SAP_FLUX and says why
    corr = CBVCorrection(load_settings(assignments=["cbv.min_noise_goodness=1.01"]))
    results = correct_ensemble(corr, ens)
    assert corr.vectors.shape[0] >= 1
    assert {r.method for r in results} == {"none"}
    np.testing.assert_array_equal(results[3].flux, ens.flux[3])
    note = dict((k, v) for k, v, _ in results[3].cards)["PDC_NOTE"]
    assert note.startswith("correction adds noise (PDC_NOI")


def test_a_clipped_transit_stays_out_of_the_fit():
    """A 1-mmag transit just before a momentum dump, where the pointing vector jumps: it is
    clipped, and the coefficients that make the correction are those fitted without it. (The
    clipping judged only the cadences still fitted, so the clipped transit came back at the
    next pass; the fit alternated and the final one held the transit.)"""
    from photometry.sim.lcsim import transit_model
    rng = np.random.default_rng(12)
    n = 1000
    t = 1325.3 + np.arange(n) / 48.0
    saw = ((t - t[0]) % 2.5) / 2.5 - 0.5          # pointing drift, reset at each dump
    ramp = (t - t.mean()) / np.ptp(t)
    vectors = np.array([saw - saw.mean(), ramp])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    good = np.ones(n, bool)
    good[np.flatnonzero(np.diff(np.floor((t - t[0]) / 2.5)) > 0) + 1] = False
    y = 0.006 * vectors[0] - 0.01 * vectors[1] + 1.5e-4 * rng.standard_normal(n)
    transit = transit_model(t, 8.65, t[0] + 2.45, 0.125, 1e-3) - 1
    inj = map_fit(y + transit, vectors, good, time=t)
    plain = map_fit(y, vectors, good, time=t)
    assert inj.n_clipped >= 12                    # both transits (6 cadences each) and wings
    kept = transit_depth(t, (y + transit - inj.systematic) - (y - plain.systematic),
                         8.65, t[0] + 2.45, 0.125, good) / 1e-3
    assert abs(kept - 1) < 0.015, kept            # measured 0.992 (0.978 before)


def test_a_transit_whose_edge_falls_on_a_cadence_is_measured_exactly():
    """The 3-h box of the benchmark's sixth host (period 4.95 d) is centred on a 30-min
    cadence, so its edges fall on cadences: injection and measurement must put them on the
    same side. (The measurement decided it on its own and counted an in-transit cadence as
    baseline: that transit came out at 0.972 and the star's depth at 0.994 with no
    correction at all, the "0.6 % loss of every 10-mmag transit".)"""
    from photometry.sim.lcsim import _time_axis, in_transit, transit_model
    time, _ = _time_axis(1000, 1800)
    good = np.ones(time.size, bool)
    epoch = time[0] + 0.5 + 0.13 * 5
    rel = transit_model(time, 4.95, epoch, 0.125, 0.01) - 1
    assert np.count_nonzero(in_transit(time, 4.95, epoch, 0.125)) == 24     # 4 x 6 cadences
    assert transit_depth(time, rel, 4.95, epoch, 0.125, good) == pytest.approx(0.01, rel=1e-9)


def test_the_prior_follows_the_coefficients_over_the_ccd():
    """A star's prior (from its neighbours, itself left out) against its true coefficients
    on our vectors, for the quiet stars of a scale-3 ensemble: the error is about the stars'
    own scatter about the smooth CCD dependence (the floor: no neighbour knows it), and the
    stated widths match the errors. The focus-like systematic grows with the distance from
    the CCD centre; a local linear regression missed that curvature by 2.6x the scatter."""
    ens, truth = synthetic_ensemble(n_stars=400, n_cadences=1000, seed=11, scale=3.0)
    corr = CBVCorrection(load_settings())
    correct_ensemble(corr, ens)
    common = np.mean(ens.good, axis=0) >= 0.9
    vc = corr.vectors[:, common]

    def on_vectors(systematic):
        return np.linalg.lstsq(vc.T, systematic[common] - systematic[common].mean(),
                               rcond=None)[0]

    err, z, own = [], [], []
    for i in np.flatnonzero(~truth["variable"] & (ens.tmag < 12.5)):
        mean, var = corr.prior_model.prior(ens.row[i], ens.column[i], ens.tmag[i],
                                           ens.starid[i], ens.flux_fraction[i])
        true = on_vectors(truth["systematic"][i])
        err.append(mean - true)
        z.append((mean - true) / np.sqrt(var))
        own.append(true - on_vectors(truth["coeff_mean"][i] @ truth["shapes"]))
    err, z, own = np.array(err), np.array(z), np.array(own)
    ratio = np.sqrt(np.sum(err ** 2) / np.sum(own ** 2))
    assert ratio < 1.5, ratio       # measured 1.04 (basis stars alone 1.12; linear 2.56)
    assert np.all((np.sqrt(np.mean(z ** 2, axis=0)) > 0.6)
                  & (np.sqrt(np.mean(z ** 2, axis=0)) < 1.6)), np.sqrt(np.mean(z ** 2, axis=0))


def test_the_prior_is_not_biased_by_the_choice_of_basis_stars():
    """Where coefficients scatter widely from star to star (60 % here, as the apertures of a
    pixel-level scene do), the SVD's basis, the most correlated half of the quiet stars, holds
    the stars with the largest coefficients for their noise; a prior from them alone overstates
    every other star's coefficients (measured: the focus-like vector's prior off by -1.59 of its
    own width on average for the quiet stars outside the basis). The prior from all quiet
    stars, each weighted by its own red-noise-inflated variance, is not (-0.35)."""
    ens, truth = synthetic_ensemble(n_stars=400, n_cadences=1000, seed=0, scatter=0.6)
    mean_z = {}
    for mode in ("quiet", "basis"):
        corr = CBVCorrection(load_settings(assignments=[f"cbv.prior_stars={mode}"]))
        correct_ensemble(corr, ens)
        common = np.mean(ens.good, axis=0) >= 0.9
        vc = corr.vectors[:, common]
        basis = set(corr._ensemble.starid[corr._basis.basis_index])   # the fitted candidates
        z = []
        for i in np.flatnonzero(~truth["variable"] & (ens.tmag < 13.5)):
            if ens.starid[i] in basis:
                continue
            mean, var = corr.prior_model.prior(ens.row[i], ens.column[i], ens.tmag[i],
                                               ens.starid[i], ens.flux_fraction[i])
            s = truth["systematic"][i][common]
            true = np.linalg.lstsq(vc.T, s - s.mean(), rcond=None)[0]
            z.append((mean - true) / np.sqrt(var))
        assert len(z) > 100
        mean_z[mode] = np.mean(z, axis=0)
    assert np.all(np.abs(mean_z["quiet"]) < 0.6), mean_z       # measured -0.35, 0.08, -0.26
    assert mean_z["basis"][0] < -1.0, mean_z                    # measured -1.59 (the bias)


def test_a_restored_fit_corrects_a_star_as_the_ensemble_fit_did(tmp_path):
    """``tessphot star`` corrects one star from the stored products (vectors and the prior's
    stars, their coefficients and their variances): the same PDCSAP_FLUX as the CCD's run."""
    from photometry.data.fits_tables import ProductFolder
    ens, _ = synthetic_ensemble(n_stars=200, n_cadences=600, seed=2)
    ens.flux_fraction[:] = np.linspace(0.6, 0.95, len(ens.starid))
    corr = CBVCorrection(load_settings())
    results = correct_ensemble(corr, ens)
    for name, hdul in corr.products().items():
        hdul.writeto(tmp_path / name)
    again = CBVCorrection(load_settings())
    key = (ens.sector, ens.camera, ens.ccd, ens.cadence, ens.method)
    assert again.restore(ProductFolder(tmp_path), key)
    assert again.prior_model.coeff_var is not None
    for i in (0, 57, 199):
        assert results[i].method == "cbvMAP"
        # (the stored vectors round-trip to 1e-10)
        np.testing.assert_allclose(again.correct(ens.star(i)).flux, results[i].flux, rtol=1e-9)


def test_warning_light_curves_are_corrected_but_never_basis_or_prior_stars():
    """A WARNING light curve (here: the 20 quiet stars nearest a corner, whose apertures lose
    twice the focus and pointing flux, as a too-small mask does) is not learned from: taken
    as OK, 10 of them were basis stars, 14 prior stars, and they made a third vector."""
    from photometry import STATUS
    ens, truth = synthetic_ensemble(n_stars=300, n_cadences=400, seed=5)
    quiet = np.flatnonzero(~truth["variable"] & (ens.tmag < 12.5))
    w = np.sort(quiet[np.argsort(np.hypot(ens.row[quiet], ens.column[quiet]))[:20]])
    sysw = truth["systematic"][w]
    ens.flux[w] *= (1 + 2 * sysw) / (1 + sysw)
    learned = []
    for status in (STATUS.OK, STATUS.WARNING):
        ens.status[w] = int(status)
        corr = CBVCorrection(load_settings())
        results = correct_ensemble(corr, ens)
        fitted = corr._ensemble.starid
        learned.append((np.isin(ens.starid[w], fitted[corr._basis.basis_index]).sum(),
                        np.isin(ens.starid[w], corr.prior_model.starid).sum(),
                        corr.vectors.shape[0]))
    assert learned[0][0] >= 5 and learned[0][1] >= 5 and learned[0][2] == 3, learned
    assert learned[1] == (0, 0, 2), learned
    assert not np.isin(ens.starid[w], fitted).any()
    # still corrected, from the OK stars' vectors and prior (19 of the 20; one keeps SAP)
    assert len(results) == len(ens.starid)
    methods = [results[i].method for i in w]
    assert methods.count("cbvMAP") >= 15, methods
    i = w[methods.index("cbvMAP")]
    assert not np.allclose(results[i].flux, ens.flux[i])
    # the Table the pipeline's candidates see carries the status; none: all OK
    table = ens.table()
    assert list(table["status"][w]) == [int(STATUS.WARNING)] * 20
    assert not corr.candidates(table)[w].any()
    table.remove_column("status")
    assert corr.candidates(table)[w].any()


def test_the_ensemble_keeps_no_read_light_curve(monkeypatch):
    """``_read_ensemble`` holds only the columns it needs: each read result (with its two
    astropy headers) is gone before the next file is read, and the ensemble
    carries each star's values on the union of the cadence axes."""
    import weakref

    from astropy.table import Table

    import photometry.scheduler.correct as correct

    class Read(dict):  # a dict that a weakref can follow
        pass

    alive, n = [], 6

    def fake_read(path):
        assert all(ref() is None for ref in alive), "an earlier read light curve is still held"
        i = int(path)
        cad = np.arange(100 + i, 110 + i)    # shifted axes: union 100..114
        out = Read(cadenceno=cad, time=1000.0 + cad / 48.0, sap_flux=i * 1e3 + cad,
                   sap_flux_err=np.full(10, 1.0 + i), quality=(cad % 7 == 0).astype(int),
                   pdcsap_flux=cad * 0.0, pdcsap_flux_err=cad * 0.0,
                   primary={}, header={"FLFRCSAP": 0.5 + 0.1 * i})
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(correct, "read_lightcurve", fake_read)
    stars = Table({"path": [str(i) for i in range(n)], "starid": np.arange(n) + 1,
                   "tmag": np.full(n, 10.0), "row": np.zeros(n), "column": np.zeros(n)})
    ens = correct._read_ensemble((1, 1, 1, 1800, "aperture"), stars)
    assert all(ref() is None for ref in alive)
    assert np.array_equal(ens.cadenceno, np.arange(100, 115))
    assert np.allclose(ens.time, 1000.0 + ens.cadenceno / 48.0, rtol=0, atol=1e-12)
    for i in range(n):
        on = (ens.cadenceno >= 100 + i) & (ens.cadenceno < 110 + i)
        assert np.array_equal(ens.flux[i][on], i * 1e3 + ens.cadenceno[on])
        assert np.all(np.isnan(ens.flux[i][~on]))
        assert np.array_equal(ens.quality[i][on], (ens.cadenceno[on] % 7 == 0).astype(int))
    assert np.allclose(ens.flux_fraction, 0.5 + 0.1 * np.arange(n))
