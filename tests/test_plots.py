"""Debugging pictures: the aperture outline follows pixel edges; each figure draws."""
from pathlib import Path

import numpy as np

from photometry.output.plots import mask_edges, plot_residuals, save_plots
from photometry.hooks.settings import load_settings
from photometry.data.tpf import TPFSource

from test_lightcurve_io import TPF, Whole


def test_mask_edges_are_pixel_edges():
    # an L of three pixels with its corner pixel at CCD (row 10, column 20)
    mask = np.array([[True, True], [True, False]])
    segs = mask_edges(mask, row0=10, col0=20)
    assert len(segs) == 8                      # the perimeter of an L of three unit squares
    xs = {x for seg in segs for x in seg[0]}
    ys = {y for seg in segs for y in seg[1]}
    assert xs == {19.5, 20.5, 21.5} and ys == {9.5, 10.5, 11.5}
    for (x0, x1), (y0, y1) in segs:           # unit length, axis-parallel
        assert abs(x1 - x0) + abs(y1 - y0) == 1.0
    assert mask_edges(np.zeros((3, 3), bool)) == []


def test_every_figure_of_one_target(tmp_path):
    phot = Whole(25155310, TPFSource(TPF), load_settings())
    phot.photometry()
    phot.save_lightcurve(tmp_path)
    assert plot_residuals(phot) is None                 # no pixel model: no residuals
    phot.model_cube = phot.images_cube * 0.98           # a method with a pixel model
    paths = save_plots(phot, tmp_path / "plots")
    names = sorted(Path(p).name for p in paths)
    assert names == ["background.png", "lightcurve.png", "motion.png", "pixels.png",
                     "residuals.png", "stamp.png"]
    assert all(Path(p).stat().st_size > 5000 for p in paths)
