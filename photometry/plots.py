"""Diagnostic pictures of one target: what an astronomer looks at to trust (or not) a light curve.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot state, safe in
worker processes) and written as PNG through a temporary name and a rename.
"""
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .quality import TESSQualityFlags

__all__ = ["save_plots", "plot_stamp", "plot_background", "plot_motion", "plot_lightcurve"]


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=90, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def _extent(phot):
    r1, r2, c1, c2 = phot.stamp
    return (c1 - 0.5, c2 - 0.5, r1 - 0.5, r2 - 0.5)


def plot_stamp(phot):
    """Sum image (log scale, CCD coordinates) with the final mask and the catalog stars."""
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    img = np.asarray(phot.sumimage, dtype=float)
    finite = img[np.isfinite(img)]
    floor = np.percentile(finite, 5) if finite.size else 0
    shown = np.log10(np.clip(img - floor, 1, None))
    im = ax.imshow(shown, origin="lower", extent=_extent(phot), cmap="viridis",
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, label="log10(flux - p5) [e-/s]")
    if phot.final_phot_mask is not None:
        cols, rows = phot.get_pixel_grid()
        ax.contour(cols, rows, np.asarray(phot.final_phot_mask, dtype=float), levels=[0.5],
                   colors="red", linewidths=1.5)
    cat = phot.catalog
    if len(cat):
        sizes = np.clip(80 - 5 * (np.asarray(cat["tmag"]) - 8), 5, 120)
        ax.scatter(cat["column"], cat["row"], s=sizes, facecolors="none", edgecolors="white")
    ax.plot(phot.target_pos_column, phot.target_pos_row, "r+", ms=12)
    ax.set_xlabel("CCD column (0-based)")
    ax.set_ylabel("CCD row (0-based)")
    ax.set_title(f"TIC {phot.starid} {phot.name}: sum image, mask, catalog")
    return fig


def plot_background(phot):
    """Mean background image of the stamp and the stamp-median background against time."""
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    bkg = phot.backgrounds_cube
    im = ax1.imshow(np.nanmean(bkg, axis=0), origin="lower", extent=_extent(phot),
                    interpolation="nearest")
    fig.colorbar(im, ax=ax1, label="e-/s")
    ax1.set_title("mean background")
    ax2.plot(phot.time, np.nanmedian(bkg, axis=(1, 2)), ".", ms=3)
    ax2.set_xlabel("time [BTJD]")
    ax2.set_ylabel("median background [e-/s per pixel]")
    source = phot.details.get("background", phot.datasource)
    ax2.set_title(f"background ({source})")
    return fig


def plot_motion(phot):
    """Centroid (the algorithm's) and pos_corr (the movement kernel's) against time."""
    fig = Figure(figsize=(8, 5))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    lc = phot.lightcurve
    cen = np.asarray(lc["pos_centroid"], dtype=float)
    corr = np.asarray(lc["pos_corr"], dtype=float)
    for ax, k, label in ((ax1, 0, "column"), (ax2, 1, "row")):
        if np.any(np.isfinite(cen[:, k])):
            ax.plot(phot.time, cen[:, k] - np.nanmedian(cen[:, k]), ".", ms=3,
                    label="centroid")
        ax.plot(phot.time, corr[:, k], "-", lw=1, label="pos_corr (kernel)")
        ax.set_ylabel(f"d{label} [px]")
        ax.legend(loc="best", fontsize=8)
    ax2.set_xlabel("time [BTJD]")
    return fig


def plot_lightcurve(phot):
    """Raw flux with good and flagged cadences marked, and the background flux."""
    fig = Figure(figsize=(10, 5))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    lc = phot.lightcurve
    good = TESSQualityFlags.filter(phot.quality)
    flux = np.asarray(lc["flux"], dtype=float)
    ax1.plot(phot.time[good], flux[good], "k.", ms=3, label="good")
    ax1.plot(phot.time[~good], flux[~good], "r.", ms=3, label="flagged")
    ax1.set_ylabel("flux [e-/s]")
    ax1.legend(loc="best", fontsize=8)
    ax1.set_title(f"TIC {phot.starid} {phot.name}: light curve")
    ax2.plot(phot.time, np.asarray(lc["flux_background"], dtype=float), "b.", ms=3)
    ax2.set_ylabel("background in mask [e-/s]")
    ax2.set_xlabel("time [BTJD]")
    return fig


def save_plots(phot, folder):
    """Write stamp.png, background.png, motion.png and lightcurve.png; return their paths."""
    folder = Path(folder)
    paths = []
    for name, func in (("stamp", plot_stamp), ("background", plot_background),
                       ("motion", plot_motion), ("lightcurve", plot_lightcurve)):
        paths.append(_save(func(phot), folder / f"{name}.png"))
    return paths
