"""Every file the pipeline reads or writes for its own use and the instrument's models: FFIs,
the HDF5 cache and its chunks, the catalog SQLite, the task list, TPF/TESScut and in-memory data
sources, calibration, the movement kernel, PRF and noise models, and the base classes of the
registered stages that work on the data. Imports only ``photometry.hooks``.
"""
