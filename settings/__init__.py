"""Default settings, installed as ``photometry._defaults`` (see photometry.hooks.settings)."""
