"""Oracles for linpsf's excess noise on a foreign scene (issue 16, docs/linpsf.md "Session 6").

Each variant replaces one part of what linpsf learns by the truth (or fits the basis to the
noiseless truth) on a :mod:`bench_linpsf_prf` scene and prints the median noise / ideal of the
isolated constant 8-13 mag stars, overall and per magnitude bin:

* ``true``: the true PRF (the solver's floor); ``frozen``: the true PRF at the cutout centre
  for every star (no change across the cutout);
* ``learned``: the ``linpsf_shape`` fit (defaults); ``key=value[,key=value]``: the same with
  ``[linpsf]`` overrides, e.g. ``linpsf.time_degree=0`` (no time model);
* ``fit0[:key=value...]``: the stage's basis fitted noiselessly (weighted least squares, a
  Tmag 9 star's weights) to 400 unit stamps of the frozen truth at random phases;
  ``fit96``: of the truth at random positions over 96 px.

Families: those of :mod:`bench_linpsf_prf`, and ``spoc_taper`` (the SPOC models tapered to 0
over the outer 1.5 px of their box, each phase lattice renormalised: no step at the box edge)
and ``spoc_smooth1`` (smoothed by one sample, 0.11 px).

Usage::

    SCENE='{"size": 96}' python benchmarks/bench_linpsf_oracles.py spoc 1 true frozen learned \
        linpsf.time_degree=0 fit0 fit96 fit0:linpsf.cart_step=0.25
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_linpsf_prf as B  # noqa: E402
from photometry.sim.evaluation import score_lightcurve
from photometry.sim.foreign_scene import make_foreign_scene, smooth_prf
from photometry.data.memory_source import MemorySource
from photometry.data.prf import PRFModel
from photometry_linpsf.linpsf import LinPSFPhotometry
from photometry_linpsf.stage import fit_source_shape


class Frozen(PRFModel):
    """The true PRF, evaluated at one CCD position for every star (translation-invariant)."""
    name = "frozen"

    def __init__(self, prf, r, c):
        self.p, self.r, self.c = prf, r, c

    def default_size(self, flux=None):
        return self.p.default_size(flux)

    def stamps(self, row, col, size):
        row = np.atleast_1d(np.asarray(row, float))
        col = np.atleast_1d(np.asarray(col, float))
        fr, fc = row - np.round(row), col - np.round(col)
        v, r0, c0 = self.p.stamps(self.r + fr, self.c + fc, size)
        dr = (np.round(row) - np.round(self.r + fr)).astype(np.int64)
        dc = (np.round(col) - np.round(self.c + fc)).astype(np.int64)
        return v, r0 + dr, c0 + dc


def main(family, seed, variants, size=96, n=80, sets=()):
    prf = B.FAMILIES[family]()
    kw = json.loads(os.environ.get('SCENE', '{}'))
    size = kw.pop('size', size)
    src, tr = make_foreign_scene(prf, seed=seed, shape=(size, size), n=n, **kw)
    print('stars', len(tr['tmag']), 'iso', int(tr['isolated'].sum()), flush=True)
    s = B.settings(sets)
    o = tr["origin"]
    inner = (tr["rows"] >= o[0] + 7) & (tr["rows"] <= o[0] + size - 8) \
        & (tr["cols"] >= o[1] + 7) & (tr["cols"] <= o[1] + size - 8)
    iso = np.flatnonzero(tr["isolated"] & inner & (tr["tmag"] >= 8) & (tr["tmag"] <= 13))
    bare = MemorySource(src._cubes, src._catalog, src.time, src.quality,
                        row_offset=src.row_offset, column_offset=src.column_offset,
                        movement_kernel=src.movement_kernel)
    out = {}
    for v in variants:
        t0 = time.process_time()
        if v == "true":
            cls = type("T", (LinPSFPhotometry,), {"prf": prf}); use = bare
        elif v.startswith("fit"):
            spread = float(v[3:].split(":")[0])
            ov = list(sets) + [x for x in v.split(":")[1:] if x]
            m = basis_fit(Frozen(prf, o[0] + size / 2, o[1] + size / 2) if spread == 0 else prf,
                          o[0] + size / 2, o[1] + size / 2, max(spread, 1.0), B.settings(ov)["linpsf"])
            cls = type("T", (LinPSFPhotometry,), {"prf": m}); use = bare
        elif v == "frozen":
            cls = type("T", (LinPSFPhotometry,), {"prf": Frozen(prf, o[0] + size / 2, o[1] + size / 2)}); use = bare
        else:   # learned with overrides "key=val,key=val"
            ov = [x for x in v.split(",") if x] if v != "learned" else []
            s2 = B.settings(list(sets) + ov)
            g, res = fit_source_shape(src, s2)
            use = MemorySource(src._cubes, src._catalog, src.time, src.quality,
                               row_offset=src.row_offset, column_offset=src.column_offset,
                               movement_kernel=src.movement_kernel)
            use.models["linpsf_shape"] = g
            cls = LinPSFPhotometry
            print(v, "basis", g.attrs.get("basis"), "time", g.attrs.get("time_use"),
                  {k: round(float(res[k]), 4) for k in ("n_stars", "shape_residual")}, flush=True)
        sc = []
        for k in iso:
            ph = cls(int(k) + 1, use, settings=s); ph.photometry()
            sc.append((tr["tmag"][k], score_lightcurve(ph.lightcurve, tr["flux"][k], tr["ideal_noise"][k])[0]))
        sc = np.array(sc)
        bins = [np.median(sc[(sc[:, 0] >= b) & (sc[:, 0] < b + 1), 1]) for b in range(8, 13)]
        out[v] = float(np.median(sc[:, 1]))
        print(f"{family} seed {seed} {v}: all {np.median(sc[:,1]):.3f} bins " +
              " ".join(f"{x:.2f}" for x in bins) + f"  ({time.process_time()-t0:.0f} s)", flush=True)
    return out


def basis_fit(prf, r, c, spread, cfg, n=400, seed=0, bflux=0.004):
    """Noiseless weighted LSQ of the stage's basis to unit stamps of ``prf`` at n random
    positions within +-spread/2 px of (r, c): the basis's capacity."""
    from photometry_linpsf.stage import _basis
    from photometry_linpsf.model import fit_weights, normalise, SplinePRF
    rng = np.random.default_rng(seed)
    basis = _basis(dict(cfg, basis="cartesian" if cfg["basis"] == "auto" else cfg["basis"]))
    h = int(np.ceil(cfg["rmax"]))
    size = 2 * h + 1
    rr = r + rng.uniform(-spread / 2, spread / 2, n); cc = c + rng.uniform(-spread / 2, spread / 2, n)
    v, r0, c0 = prf.stamps(rr, cc, size)
    k = np.arange(size)
    dr = (r0[:, None, None] + k[None, :, None] - rr[:, None, None]) + 0 * k[None, None, :]
    dc = (c0[:, None, None] + k[None, None, :] - cc[:, None, None]) + 0 * k[None, :, None]
    vals = v.ravel()
    w = fit_weights(basis, dr.ravel(), dc.ravel(), vals, 1.0 / (np.clip(vals, 0, None) + bflux),
                    prior_sigma=float(cfg["prior_sigma"]))
    w = normalise(basis, w)
    model = SplinePRF(basis, w, [r], [c])
    mv, _, _ = model.stamps(rr, cc, size)
    res = mv - v
    core = (dr ** 2 + dc ** 2) < 4
    print(f"basis fit spread {spread}: core rms {np.sqrt(np.mean(res[core]**2)):.2e} all {np.sqrt(np.mean(res**2)):.2e}", flush=True)
    return model


def tapered_spoc(width=1.5):
    """SPOC models times a cos^2 taper over the outer ``width`` px of the box, each sub-pixel
    phase lattice renormalised to 1 (the oracle of a truth without the box-edge step)."""
    from photometry.data.prf import SampledPRF
    p = B.FAMILIES["spoc"]()
    ns, (cr, cc) = p.nsamp, p.center
    ny, nx = p.models.shape[2:]
    y = (np.arange(ny) - cr) / ns; x = (np.arange(nx) - cc) / ns
    edge = (ny - 1 - cr) / ns + 0.5 / ns
    def taper(u):
        d = np.clip((edge - np.abs(u)) / width, 0, 1)
        return np.sin(0.5 * np.pi * d) ** 2
    win = taper(y)[:, None] * taper(x)[None, :]
    m = p.models * win
    for a in range(ns):
        for b in range(ns):
            s = m[:, :, a::ns, b::ns].sum(axis=(2, 3))
            m[:, :, a::ns, b::ns] /= s[:, :, None, None]
    return SampledPRF(m, p.grid_rows, p.grid_cols, ns, p.center)


B.FAMILIES["spoc_taper"] = tapered_spoc
B.FAMILIES["spoc_smooth1"] = lambda: smooth_prf(B.FAMILIES["spoc"](), 1.0 / 9.0)


if __name__ == "__main__":
    fam, seed = sys.argv[1], int(sys.argv[2])
    main(fam, seed, sys.argv[3:])
