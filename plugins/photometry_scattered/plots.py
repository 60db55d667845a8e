"""Diagnostic PNGs: a frame grid of the cube, and the correction applied to one stamp."""
import numpy as np

from photometry import save_figure

__all__ = ["plot_cube_grid", "plot_stamp_correction"]


def plot_cube_grid(cube, path, n_frames=12, relative=True):
    """A grid of ``n_frames`` evenly spaced cube frames (values minus the dark level).

    Why relative: the static sky dominates the colour scale otherwise; the time-varying glow
    is what the cube exists for. One colour scale for all panels, so frames compare.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nt = cube.shape[0]
    idx = np.unique(np.linspace(0, nt - 1, min(n_frames, nt)).round().astype(int))
    data = cube.values[idx] - (cube.static[None] if relative else 0.0)
    vmin, vmax = np.nanpercentile(data, [1, 99])
    ncol = min(4, idx.size)
    nrow = -(-idx.size // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.0 * ncol, 2.8 * nrow), squeeze=False)
    extent = [cube.bin_cols[0] - cube.bin_size / 2, cube.bin_cols[-1] + cube.bin_size / 2,
              cube.bin_rows[0] - cube.bin_size / 2, cube.bin_rows[-1] + cube.bin_size / 2]
    im = None
    for ax, k, img in zip(axes.flat, idx, data):
        im = ax.imshow(img, origin="lower", vmin=vmin, vmax=vmax, extent=extent,
                       cmap="viridis")
        ax.set_title(f"t = {cube.time[k]:.3f}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[idx.size:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8,
                 label="scattered light - dark level (e-/s)" if relative else "sky (e-/s)")
    fig.suptitle(f"scattered-light cube S{cube.sector} C{cube.camera} CCD{cube.ccd}, "
                 f"{cube.bin_size}px bins, reference '{cube.reference}'", fontsize=9)
    path = save_figure(fig, path, bbox_inches=None)
    plt.close(fig)
    return path


def plot_stamp_correction(time, before, model, after, path, title=""):
    """Stamp-median flux before, the model, and after correction, plus one frame each.

    ``before``/``after`` are (N, r, c) stamps (flux with the old / new background
    subtracted), ``model`` the subtracted scattered light.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = int(np.nanargmax(np.nanmedian(model, axis=(1, 2))))
    fig = plt.figure(figsize=(10, 6))
    ax = fig.add_subplot(2, 1, 1)
    ax.plot(time, np.nanmedian(before, axis=(1, 2)), ".", ms=3, label="before (stamp median)")
    ax.plot(time, np.nanmedian(model, axis=(1, 2)), "-", lw=1, label="scattered-light model")
    ax.plot(time, np.nanmedian(after, axis=(1, 2)), ".", ms=3, label="after (stamp median)")
    ax.set_xlabel("time (BTJD)")
    ax.set_ylabel("e-/s")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    for j, (img, name) in enumerate(((before[k], "before"), (model[k], "model"),
                                     (after[k], "after"))):
        a = fig.add_subplot(2, 3, 4 + j)
        lo, hi = np.nanpercentile(img, [2, 98])
        im = a.imshow(img, origin="lower", vmin=lo, vmax=hi)
        a.set_title(f"{name}, frame {k}", fontsize=8)
        fig.colorbar(im, ax=a, shrink=0.8)
    fig.tight_layout()
    path = save_figure(fig, path, bbox_inches=None)
    plt.close(fig)
    return path
