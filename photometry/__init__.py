"""photometry: a plugin-based photometry framework for NASA TESS full-frame images.

The ``hookimpl`` marker is what a plugin package uses to implement the hooks
declared in :mod:`photometry.hookspecs`.
"""
import pluggy

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl", "PROJECT_NAME"]

PROJECT_NAME = "photometry"
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
