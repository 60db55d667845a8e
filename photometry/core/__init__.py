"""The per-target core: ``BasePhotometry`` (stamps, cubes, catalog, motion, STATUS), default
stamps, the result checks and crowding. Imports ``photometry.data`` and ``photometry.hooks``.
"""
