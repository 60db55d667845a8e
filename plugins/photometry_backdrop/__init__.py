"""Built-in backdrop background model: per-frame CCD-wide linear background fit at prepare.

Prepare runs :class:`Backdrop` over all frames of a CCD (``prepare.stages = ["backdrop"]``);
it stores a few thousand numbers per frame in ``models/backdrop``. BasePhotometry then calls
``Backdrop.evaluate(group, row_slice, col_slice, frames)`` for a stamp's background (selected
by ``photometry.background = "backdrop"``). See ``docs/backdrop.md``.
"""
import photometry

from .model import Backdrop

__all__ = ["Backdrop"]


@photometry.hookimpl
def register_prepare_stages():
    return [Backdrop]
