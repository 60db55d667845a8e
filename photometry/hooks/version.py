"""The package version (one place: ``tessphot --version``, file headers, cache attributes)."""

__version__ = "0.1.0"
