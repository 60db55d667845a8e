"""Built-in scattered-light cube (prepare stage) and stamp corrector.

Registered through the ``photometry`` entry-point group like any third-party plugin
(``scattered_light = "photometry_scattered"``). ``prepare.stages = [..., "scattered_light"]``
builds the cube into the cache (``models/scattered_light``); the ``scattered_light`` stamp
correction subtracts it from a target's stamp. :func:`evaluate` works on a bare cube.
See ``docs/scattered_light.md``.
"""
import photometry

from .correct import ScatteredLightCorrection, evaluate
from .cube import SLCube, read_fits, read_group, write_fits, write_group
from .stage import ScatteredLightCube, build_cube

__all__ = ["ScatteredLightCube", "ScatteredLightCorrection", "SLCube", "evaluate",
           "build_cube", "read_fits", "write_fits", "read_group", "write_group"]

__version__ = "1.0"


@photometry.hookimpl
def register_prepare_stages():
    return [ScatteredLightCube]


@photometry.hookimpl
def register_corrections():
    return [ScatteredLightCorrection]
