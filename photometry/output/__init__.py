"""What a run writes: light-curve and TPF files (the built-in output writers), the diagnostic
plots and the per-CCD summaries. Imports ``core``, ``data``, ``hooks``.
"""
