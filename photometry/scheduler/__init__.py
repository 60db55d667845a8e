"""The pipeline's steps over a whole CCD: ``prepare`` (the cache), ``todo`` (the task list),
``run`` (local processes or Dask) and ``correct`` (light-curve corrections). Imports
``output``, ``core``, ``data``, ``hooks``.
"""
