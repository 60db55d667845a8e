"""Built-in linear PRF photometry plugin ("linpsf").

Three parts, registered through the ``photometry`` entry-point group like any third-party plugin
(``linpsf = "photometry_linpsf"`` in pyproject.toml):

* prepare stage ``linpsf_shape`` (:class:`photometry_linpsf.stage.LinPSFShapeModel`): the CCD's
  PRF shape as polar B-splines fitted to bright isolated stars of the sum image;
* algorithm ``linpsf`` (:class:`photometry_linpsf.linpsf.LinPSFPhotometry`): the target and its
  neighbours fitted simultaneously per cadence with that shape (or the configured PRF);
* prepare stage ``linpsf_scene`` (:class:`photometry_linpsf.scene.LinPSFScene`): every star of
  the CCD fitted at once, tile by tile; ``linpsf.mode = "scene"`` makes the algorithm read
  the target's light curve from it instead of fitting its stamp.

See ``docs/linpsf.md``.
"""
from photometry import hookimpl

__all__ = ["register_algorithms", "register_prepare_stages"]

__version__ = "1.1"


@hookimpl
def register_algorithms():
    from .linpsf import LinPSFPhotometry
    return [LinPSFPhotometry]


@hookimpl
def register_prepare_stages():
    from .scene import LinPSFScene
    from .stage import LinPSFShapeModel
    return [LinPSFShapeModel, LinPSFScene]
