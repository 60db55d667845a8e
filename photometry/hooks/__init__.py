"""The bottom room: hook specifications and markers, the one plugin manager, settings (defaults,
limits, plugin-owned sections), the command-line plumbing every command shares, error types,
flag registries and small helpers. Imports nothing else of ``photometry``.
"""
