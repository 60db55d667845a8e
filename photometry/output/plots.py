"""Diagnostic pictures of one target: what an astronomer looks at to trust (or not) a light curve.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot state, safe in
worker processes) and written as PNG through a temporary name and a rename.
"""
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from photometry.hooks.quality import TESSQualityFlags

__all__ = ["save_plots", "save_figure", "plot_stamp", "plot_pixels", "plot_background",
           "plot_motion", "plot_lightcurve_file", "plot_residuals", "plot_cdpp_summary",
           "mask_edges"]


def save_figure(fig, path, bbox_inches="tight"):
    """Write ``fig`` as PNG at ``path`` through a temporary name and a rename; the path.

    The one place figures are written: a plugin draws a matplotlib Figure and hands it here
    (``photometry.save_figure``), it never saves files itself."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=90, bbox_inches=bbox_inches)
    os.replace(tmp, path)
    return path


def _extent(phot):
    r1, r2, c1, c2 = phot.stamp
    return (c1 - 0.5, c2 - 0.5, r1 - 0.5, r2 - 0.5)


def mask_edges(mask, row0=0, col0=0):
    """Line segments ``[(x0, x1), (y0, y1)]`` along the pixel edges that bound ``mask``.

    CCD coordinates (pixel centres at integers, so edges at half-integers) of a mask whose
    pixel [0, 0] is CCD (row0, col0): the aperture drawn pixel-exact, not a contour through
    pixel centres.
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    segs = []
    # horizontal edges: between rows i-1 and i where membership changes
    for i, j in zip(*np.nonzero(m[1:, 1:-1] != m[:-1, 1:-1])):
        y = row0 + i - 0.5
        segs.append(((col0 + j - 0.5, col0 + j + 0.5), (y, y)))
    for i, j in zip(*np.nonzero(m[1:-1, 1:] != m[1:-1, :-1])):
        x = col0 + j - 0.5
        segs.append(((x, x), (row0 + i - 0.5, row0 + i + 0.5)))
    return segs


def _draw_mask(ax, mask, row0, col0, color="red", lw=1.8, label=None):
    for k, (xs, ys) in enumerate(mask_edges(mask, row0, col0)):
        ax.plot(xs, ys, "-", color=color, lw=lw, solid_capstyle="projecting",
                label=label if k == 0 else None)


def _draw_background_pixels(ax, phot):
    """Background pixels (APERTURE bit 4) as small squares; False if there are none."""
    used = phot.background_pixels_used
    if used is None or not np.any(used):
        return False
    cols, rows = phot.get_pixel_grid()
    ax.plot(cols[used], rows[used], "s", ms=3, mfc="none", mec="orange", mew=0.8,
            label="background pixels")
    return True


def _label_stars(ax, phot, max_labels=15):
    """Catalog stars in the stamp as circles sized by brightness, the brightest labelled."""
    cat = phot.catalog
    r1, r2, c1, c2 = phot.stamp
    inside = ((np.asarray(cat["row"]) > r1 - 0.5) & (np.asarray(cat["row"]) < r2 - 0.5)
              & (np.asarray(cat["column"]) > c1 - 0.5) & (np.asarray(cat["column"]) < c2 - 0.5))
    cat = cat[inside]
    if len(cat) == 0:
        return
    tmag = np.asarray(cat["tmag"], dtype=float)
    sizes = np.clip(120 - 10 * (tmag - phot.target["tmag"]), 10, 160)
    ax.scatter(cat["column"], cat["row"], s=sizes, facecolors="none", edgecolors="white",
               linewidths=0.9)
    for k in range(min(max_labels, len(cat))):          # catalog is sorted by Tmag
        is_target = int(cat["starid"][k]) == phot.starid
        ax.annotate(f"{tmag[k]:.1f}", (cat["column"][k], cat["row"][k]),
                    xytext=(9, 9) if is_target else (4, 4), textcoords="offset points",
                    fontsize=8,
                    color="yellow" if is_target else "white", fontweight="bold")


def plot_stamp(phot):
    """Sum image (log scale, CCD coordinates, e-/s) with the aperture drawn along its pixel
    edges, the background pixels and the catalog stars labelled with their Tmag."""
    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot()
    img = np.asarray(phot.sumimage, dtype=float)
    finite = img[np.isfinite(img)]
    floor = max(np.percentile(finite, 5), 1e-3) if finite.size else 1.0
    shown = np.log10(np.clip(img, floor, None))
    im = ax.imshow(shown, origin="lower", extent=_extent(phot), cmap="viridis",
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, label="log10 mean flux [e-/s per pixel], background subtracted")
    r1, _, c1, _ = phot.stamp
    if phot.final_phot_mask is not None:
        _draw_mask(ax, phot.final_phot_mask, r1, c1, label="aperture")
    _draw_background_pixels(ax, phot)
    _label_stars(ax, phot)
    ax.plot(phot.target_pos_column, phot.target_pos_row, "+", color="red", ms=14, mew=1.5)
    ax.set_xlabel("CCD column (0-based)")
    ax.set_ylabel("CCD row (0-based)")
    ax.set_title(f"TIC {phot.starid} ({phot.name}), Tmag {phot.target['tmag']:.2f}: sum image,"
                 f"\naperture ({int(np.count_nonzero(phot.final_phot_mask))} px), catalog Tmag")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8, framealpha=0.6)
    return fig


def plot_pixels(phot, max_size=15):
    """Per-pixel light curves on the stamp grid (CCD coordinates), aperture pixels in red.

    Each pixel's background-subtracted flux is drawn inside its own cell, scaled to that
    pixel's 1st-99th percentile range (the printed number is that range in e-/s), so the
    shape of each pixel's light curve shows: a signal that lives only outside the aperture,
    or a pixel that jumps at a momentum dump. Stamps larger than ``max_size`` are cropped
    around the target.
    """
    cube = np.asarray(phot.images_cube, dtype=float)
    mask = (np.zeros(cube.shape[1:], bool) if phot.final_phot_mask is None
            else np.asarray(phot.final_phot_mask, bool))
    r1, r2, c1, c2 = phot.stamp
    tr = int(round(phot.target_pos_row)) - r1
    tc = int(round(phot.target_pos_column)) - c1
    i0 = int(np.clip(tr - max_size // 2, 0, max(cube.shape[1] - max_size, 0)))
    j0 = int(np.clip(tc - max_size // 2, 0, max(cube.shape[2] - max_size, 0)))
    sub = cube[:, i0:i0 + max_size, j0:j0 + max_size]
    submask = mask[i0:i0 + max_size, j0:j0 + max_size]
    good = TESSQualityFlags.filter(phot.quality)
    t = phot.time
    x = (t - t.min()) / max(np.ptp(t), 1e-9)
    nr, nc = sub.shape[1:]
    size = 0.5 + 0.55 * max(nr, nc)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    for i in range(nr):
        for j in range(nc):
            f = sub[:, i, j]
            ok = good & np.isfinite(f)
            if not np.any(ok):
                continue
            lo, hi = np.percentile(f[ok], [1, 99])
            span = hi - lo if hi > lo else 1.0
            yy = np.clip((f - lo) / span, -0.1, 1.1)
            col, row = c1 + j0 + j, r1 + i0 + i
            ax.plot(col - 0.45 + 0.9 * x[ok], row - 0.45 + 0.9 * yy[ok], "-",
                    lw=0.5, color="red" if submask[i, j] else "black")
            ax.text(col + 0.45, row + 0.45, f"{span:.3g}", fontsize=5, ha="right", va="top",
                    color="0.4")
    ax.set_xlim(c1 + j0 - 0.5, c1 + j0 + nc - 0.5)
    ax.set_ylim(r1 + i0 - 0.5, r1 + i0 + nr - 0.5)
    ax.set_xticks(np.arange(c1 + j0, c1 + j0 + nc), minor=False)
    ax.set_yticks(np.arange(r1 + i0, r1 + i0 + nr), minor=False)
    ax.set_xticks(np.arange(c1 + j0, c1 + j0 + nc + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(r1 + i0, r1 + i0 + nr + 1) - 0.5, minor=True)
    ax.tick_params(labelsize=6)
    ax.grid(True, which="minor", color="0.85", lw=0.5)
    ax.set_aspect("equal")
    ax.set_xlabel("CCD column (0-based)")
    ax.set_ylabel("CCD row (0-based)")
    ax.set_title(f"TIC {phot.starid} ({phot.name}): light curve of each pixel (red: aperture; "
                 f"number: 1-99 % range in e-/s)", fontsize=9)
    return fig


def plot_background(phot):
    """Mean background image of the stamp (CCD coordinates) and the stamp-median background
    against time."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    bkg = phot.backgrounds_cube
    im = ax1.imshow(np.nanmean(bkg, axis=0), origin="lower", extent=_extent(phot),
                    interpolation="nearest")
    fig.colorbar(im, ax=ax1, label="mean background [e-/s per pixel]")
    r1, _, c1, _ = phot.stamp
    if phot.final_phot_mask is not None:
        _draw_mask(ax1, phot.final_phot_mask, r1, c1, color="white", lw=1.2)
    if _draw_background_pixels(ax1, phot):
        ax1.legend(loc="upper right", fontsize=7)
    ax1.set_xlabel("CCD column (0-based)")
    ax1.set_ylabel("CCD row (0-based)")
    source = phot.details.get("background", phot.datasource)
    ax1.set_title(f"TIC {phot.starid}: background ({source})")
    good = TESSQualityFlags.filter(phot.quality)
    med = np.nanmedian(bkg, axis=(1, 2))
    ax2.plot(phot.time[good], med[good], ".", ms=3, color="k", label="good")
    ax2.plot(phot.time[~good], med[~good], "x", ms=4, color="red", label="flagged")
    ax2.set_xlabel("time [BTJD]")
    ax2.set_ylabel("median background [e-/s per pixel]")
    ax2.legend(loc="best", fontsize=8)
    return fig


def plot_motion(phot):
    """Centroid (the algorithm's) and pos_corr (the movement kernel's) against time."""
    fig = Figure(figsize=(9, 5))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    lc = phot.lightcurve
    cen = np.asarray(lc["pos_centroid"], dtype=float)
    corr = np.asarray(lc["pos_corr"], dtype=float)
    good = TESSQualityFlags.filter(phot.quality)
    for ax, k, label in ((ax1, 0, "column"), (ax2, 1, "row")):
        if np.any(np.isfinite(cen[good, k])):
            ax.plot(phot.time[good], cen[good, k] - np.nanmedian(cen[good, k]), ".", ms=3,
                    color="k", label="centroid - median")
            ax.plot(phot.time[~good], cen[~good, k] - np.nanmedian(cen[good, k]), "x", ms=4,
                    color="red", label="centroid, flagged cadence")
        ax.plot(phot.time, corr[:, k], "-", lw=1, color="tab:blue", label="pos_corr (kernel)")
        ax.set_ylabel(f"d{label} [px]")
        ax.legend(loc="best", fontsize=7)
    ax1.set_title(f"TIC {phot.starid} ({phot.name}): motion of the target")
    ax2.set_xlabel("time [BTJD]")
    return fig


def plot_lightcurve_file(path):
    """Normalised SAP_FLUX and PDCSAP_FLUX of a light-curve file, flagged cadences marked.

    Reads the file, so it shows what was written (PDCSAP_FLUX appears once a correction ran:
    ``PDCMETHD`` other than 'none'); the bottom panel is the background in the aperture.
    """
    from astropy.io import fits
    with fits.open(path) as hdul:
        d = hdul["LIGHTCURVE"].data
        h = hdul["LIGHTCURVE"].header
        p = hdul[0].header
        t = np.asarray(d["TIME"], float)
        sap = np.asarray(d["SAP_FLUX"], float)
        pdc = np.asarray(d["PDCSAP_FLUX"], float)
        bkg = np.asarray(d["SAP_BKG"], float)
        quality = np.asarray(d["QUALITY"], np.int64)
    from photometry.hooks.quality import fit_cadences
    good = fit_cadences(quality, sap)
    method = str(h.get("PDCMETHD", "none"))
    fig = Figure(figsize=(11, 6.5))
    ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [2, 2, 1]})

    def norm(f):
        m = np.nanmedian(f[good]) if np.any(good) else np.nanmedian(f)
        return f / m

    cdpp = {k: h.get(k) for k in ("CDPPSAP", "CDPP1_0", "CDPPEXP")}

    def fmt(v):
        return f"{v:.0f}" if isinstance(v, (int, float)) else "-"

    ax1.plot(t[good], norm(sap)[good], ".", ms=2.5, color="k", label="SAP_FLUX")
    ax1.plot(t[~good], norm(sap)[~good], "x", ms=4, color="red", label="flagged cadence")
    ax1.set_ylabel("SAP / median")
    ax1.legend(loc="best", fontsize=8)
    ax1.set_title(f"TIC {p.get('TICID')} ({p.get('PHOTMET')}), sector {p.get('SECTOR')}: "
                  f"1-h CDPP SAP {fmt(cdpp['CDPPSAP'])} ppm, PDCSAP {fmt(cdpp['CDPP1_0'])} ppm,"
                  f" expected {fmt(cdpp['CDPPEXP'])} ppm")
    if method != "none":
        ax2.plot(t[good], norm(pdc)[good], ".", ms=2.5, color="tab:blue",
                 label=f"PDCSAP_FLUX ({method}, {h.get('PDC_NCBV')} vectors, "
                       f"goodness {h.get('PDC_TOT', float('nan')):.2f})")
        ax2.plot(t[~good], norm(pdc)[~good], "x", ms=4, color="red")
    else:
        note = str(h.get("PDC_NOTE") or "").strip()
        why = (f"not corrected: {note}" if note else "no correction yet: it is made over the "
               "whole CCD by `tessphot run` / `tessphot correct`")
        ax2.text(0.5, 0.5, f"PDCSAP_FLUX = SAP_FLUX (PDCMETHD 'none')\n{why}",
                 transform=ax2.transAxes, ha="center", va="center", fontsize=9)
    ax2.set_ylabel("PDCSAP / median")
    if method != "none":
        ax2.legend(loc="best", fontsize=8)
    ax3.plot(t, bkg, ".", ms=2, color="0.4")
    ax3.set_ylabel("SAP_BKG [e-/s]")
    ax3.set_xlabel("time [BTJD]")
    return fig


def plot_residuals(phot):
    """Median data, model and residual images of a method with a pixel model, in CCD
    coordinates and e-/s, the aperture drawn; None without one.

    A method that fits the pixels (PRF fitting) sets ``model_cube`` (N, r, c) in e-/s and, if
    its data are not ``images_cube`` itself (e.g. fixed neighbours taken out), its own
    ``residuals_cube``.
    """
    model = getattr(phot, "model_cube", None)
    if model is None:
        return None
    good = TESSQualityFlags.filter(phot.quality)
    good = good if np.any(good) else np.ones(phot.n_frames, bool)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mod = np.nanmedian(np.asarray(model)[good], axis=0)
        resid_cube = getattr(phot, "residuals_cube", None)
        if resid_cube is None:
            resid_cube = np.asarray(phot.images_cube) - np.asarray(model)
        resid = np.nanmedian(np.asarray(resid_cube)[good], axis=0)
    data = mod + resid
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    r1, _, c1, _ = phot.stamp
    vmax = np.nanpercentile(data, 99.5)
    lim = np.nanpercentile(np.abs(resid), 99)
    for ax, img, title, kw in ((axes[0], data, "data (median cadence)",
                                {"vmin": 0, "vmax": vmax}),
                               (axes[1], mod, "model", {"vmin": 0, "vmax": vmax}),
                               (axes[2], resid, "data - model",
                                {"vmin": -lim, "vmax": lim, "cmap": "RdBu_r"})):
        im = ax.imshow(img, origin="lower", extent=_extent(phot), interpolation="nearest",
                       **kw)
        fig.colorbar(im, ax=ax, label="e-/s per pixel", shrink=0.85)
        if phot.final_phot_mask is not None:
            _draw_mask(ax, phot.final_phot_mask, r1, c1, color="k", lw=1.0)
        ax.set_title(title)
        ax.set_xlabel("CCD column (0-based)")
    axes[0].set_ylabel("CCD row (0-based)")
    fig.suptitle(f"TIC {phot.starid} ({phot.name}): pixel model residuals")
    return fig


def save_plots(phot, folder):
    """Write stamp.png, pixels.png, background.png, motion.png, lightcurve.png (from the
    written light-curve file) and, for methods with a pixel model, residuals.png."""
    folder = Path(folder)
    paths = []
    for name, func in (("stamp", plot_stamp), ("pixels", plot_pixels),
                       ("background", plot_background), ("motion", plot_motion),
                       ("residuals", plot_residuals)):
        fig = func(phot)
        if fig is not None:
            paths.append(save_figure(fig, folder / f"{name}.png"))
    path = phot.details.get("filepath_lightcurve")
    if path:
        paths.append(save_figure(plot_lightcurve_file(path), folder / "lightcurve.png"))
    return paths


def plot_cdpp_summary(table, key):
    """1-hour CDPP against Tmag of one CCD: measured (PDCSAP, SAP), expected per star, the
    binned expectation, the 60 ppm/h systematic floor and expectation (+) floor.

    ``table`` is a :func:`photometry.output.summary.summary_table`; ``key`` (sector, camera, ccd,
    cadence).
    """
    from photometry.data.noise import SYSTEMATIC_FLOOR_PPM
    fig = Figure(figsize=(8, 5.5))
    ax = fig.add_subplot()
    tmag = np.asarray(table["tmag"], dtype=float)
    exp = np.asarray(table["cdpp_expected"], dtype=float)
    sap = np.asarray(table["cdpp_sap"], dtype=float)
    pdc = np.asarray(table["cdpp_pdcsap"], dtype=float)
    methods = np.asarray(table["method"]).astype(str)
    names = sorted(set(methods[np.isfinite(pdc)]))
    ax.plot(tmag, sap, ".", color="0.6", ms=4, label="measured SAP_FLUX")
    for name, marker in zip(names, ".xs^v<>"):  # several methods' results side by side
        sel = methods == name
        ax.plot(tmag[sel], pdc[sel], marker, color="k", ms=5 if marker == "." else 4,
                mfc="k" if marker == "." else "none",
                label=f"measured PDCSAP_FLUX ({name})" if len(names) > 1
                else "measured PDCSAP_FLUX")
    ax.plot(tmag, exp, "+", color="tab:blue", ms=5, alpha=0.7,
            label="expected (each star's aperture)")
    ok = np.isfinite(exp) & np.isfinite(tmag)
    if np.count_nonzero(ok) >= 3:
        edges = np.arange(np.floor(tmag[ok].min()), np.ceil(tmag[ok].max()) + 0.5, 0.5)
        mid, med = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = ok & (tmag >= lo) & (tmag < hi)
            if sel.any():
                mid.append(0.5 * (lo + hi))
                med.append(np.median(exp[sel]))
        mid, med = np.array(mid), np.array(med)
        ax.plot(mid, med, "-", color="tab:blue", lw=2, label="expected, median per 0.5 mag")
        ax.plot(mid, np.hypot(med, SYSTEMATIC_FLOOR_PPM), "--", color="tab:blue", lw=1.5,
                label=f"expected (+) {SYSTEMATIC_FLOOR_PPM:.0f} ppm/h floor")
    ax.axhline(SYSTEMATIC_FLOOR_PPM, color="tab:red", ls=":", lw=1.5,
               label=f"{SYSTEMATIC_FLOOR_PPM:.0f} ppm/h systematic floor")
    ax.set_yscale("log")
    ax.set_xlabel("TESS magnitude")
    ax.set_ylabel("1-hour CDPP [ppm]")
    ratio = np.asarray(table["ratio_pdcsap"], dtype=float)
    medians = [(name, np.median(ratio[(methods == name) & np.isfinite(ratio)]))
               for name in names if np.any((methods == name) & np.isfinite(ratio))]
    text = ""
    if medians:
        text = ", median measured/expected " + ", ".join(
            f"{v:.2f}" if len(names) == 1 else f"{name} {v:.2f}" for name, v in medians)
    stars = len(set(np.asarray(table["starid"])[np.isfinite(pdc)]))
    ax.set_title("Sector {} camera {} CCD {} ({} s): {} stars{}".format(*key, stars, text))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return fig
