"""Built-in linear PRF photometry plugin ("linpsf").

Two parts, registered through the ``photometry`` entry-point group like any third-party plugin
(``linpsf = "photometry_linpsf"`` in pyproject.toml):

* prepare stage ``linpsf_shape`` (:class:`photometry_linpsf.stage.LinPSFShapeModel`): the CCD's
  PRF shape as polar B-splines fitted to bright isolated stars of the sum image;
* algorithm ``linpsf`` (:class:`photometry_linpsf.linpsf.LinPSFPhotometry`): the target and its
  neighbours fitted simultaneously per cadence with that shape (or the configured PRF).

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
    from .stage import LinPSFShapeModel
    return [LinPSFShapeModel]
