"""Diagnostic figures of a fitted backdrop model (matplotlib, Agg; the core's ``save_figure``
writes them).

``python -m photometry_backdrop.plots CACHE.hdf5 OUTDIR [--frame N]`` writes them for a cache.
"""
import argparse
from pathlib import Path

import numpy as np

from photometry import FFICache, InputError, save_figure

__all__ = ["plot_diagnostics", "main"]


def _save(fig, path):
    save_figure(fig, path, bbox_inches=None)


def plot_diagnostics(group, outdir, frame=None):
    """Write ``backdrop_model.png`` (model at one cadence), ``backdrop_residual.png`` (image
    minus model, star-masked pixels greyed), ``backdrop_weights.png`` (weights and noise vs
    time) for the model in ``group`` (``models/backdrop`` of a cache).

    Returns
    -------
    list of Path
        The files written.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .model import Backdrop

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    f = group.file
    n = group["weights"].shape[0]
    if frame is None:
        frame = int(f.attrs.get("ref_frame", n // 2))
    frame = int(frame) % n
    C = int(group.attrs["n_cols"])
    model = Backdrop.evaluate(group, slice(None), slice(None), [frame])[0]
    usable = np.unpackbits(group["usable_mask"][()], axis=1)[:, :C].astype(bool)
    time = f["time"][()] if "time" in f else np.arange(n, dtype=float)
    out = []

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(model, origin="lower", cmap="viridis")
    fig.colorbar(im, ax=ax, label="background (e-/s)")
    ax.set(title=f"backdrop model, frame {frame}", xlabel="column (cube)", ylabel="row (cube)")
    path = outdir / "backdrop_model.png"
    _save(fig, path)
    plt.close(fig)
    out.append(path)

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    if "images" in f:
        resid = f["images"][frame].astype(np.float64) - model
        shown = np.ma.masked_array(resid, ~usable)
        noise = float(group["noise"][frame]) or 1.0
        cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.7")
        im = ax.imshow(shown, origin="lower", cmap=cmap, vmin=-4 * noise, vmax=4 * noise)
        fig.colorbar(im, ax=ax, label="image - model (e-/s)")
        ax.set(title=f"residual, frame {frame} (grey: masked)", xlabel="column", ylabel="row")
    else:
        ax.imshow(usable, origin="lower", cmap="gray")
        ax.set(title="pixels used by the fit (no images in this file)")
    path = outdir / "backdrop_residual.png"
    _save(fig, path)
    plt.close(fig)
    out.append(path)

    w = group["weights"][()]
    strap = group["strap"][()]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    axes[0].plot(time, w[:, 0], ".-", ms=3, label="constant term")
    axes[0].set_ylabel("e-/s")
    axes[0].legend(loc="best")
    k = min(6, w.shape[1])
    axes[1].plot(time, w[:, 1:k] - np.median(w[:, 1:k], axis=0), ".-", ms=2)
    axes[1].set_ylabel("poly weights - median")
    axes[2].plot(time, group["noise"][()], ".-", ms=3, label="pixel noise")
    axes[2].plot(time, strap.std(axis=1), ".-", ms=3, label="strap offsets std")
    axes[2].set(ylabel="e-/s", xlabel="time (BTJD)" if "time" in f else "frame")
    axes[2].legend(loc="best")
    fig.suptitle("backdrop weights vs time")
    path = outdir / "backdrop_weights.png"
    _save(fig, path)
    plt.close(fig)
    out.append(path)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m photometry_backdrop.plots",
                                description="Diagnostic figures of a cache's backdrop model")
    p.add_argument("cache", help="HDF5 cache with a models/backdrop group")
    p.add_argument("outdir")
    p.add_argument("--frame", type=int, default=None)
    args = p.parse_args(argv)
    try:
        cache = FFICache(args.cache)
    except InputError as exc:
        p.exit(2, f"{exc}\n")
    with cache:
        group = cache.model_group("backdrop")
        if group is None:
            p.exit(2, f"{args.cache}: no models/backdrop group (run prepare with "
                      f"prepare.stages = [\"backdrop\"])\n")
        for path in plot_diagnostics(group, args.outdir, args.frame):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
