"""tessphot plugin: PRF-weighted photometry (the hooks; the algorithm is in ``algorithm``).

Everything tessphot needs from a plugin package is here: an entry point in the ``photometry``
group pointing at this module (see pyproject.toml), and hook implementations marked with
``photometry.hookimpl``.
"""
from photometry import hookimpl

__version__ = "0.2.0"


@hookimpl
def register_algorithms():
    # import inside the hook: loading the plugin stays cheap for `tessphot plugins`
    from .algorithm import PRFWeightedPhotometry
    return [PRFWeightedPhotometry]
