"""Built-in aperture photometry plugin (masks from the sum image, catalog and PRF).

Registered through the ``photometry`` entry-point group exactly as a third-party plugin is
(``aperture = "photometry_aperture"`` in pyproject.toml). It provides the ``aperture``
algorithm and the built-in method policy (:func:`choose_method`, ``trylast``).
"""
from photometry import hookimpl

__all__ = ["register_algorithms", "choose_method"]

__version__ = "1.0"


@hookimpl
def register_algorithms():
    from .aperture import AperturePhotometry
    return [AperturePhotometry]


@hookimpl(trylast=True)
def choose_method(target, settings):
    """The default dynamic policy: aperture, unless the target is very bright or crowded.

    Rules, in order (settings section ``[aperture]``; the defaults switch both off, so every
    target gets "aperture"):

    1. ``tmag < policy_bright_tmag`` and ``policy_bright_method`` set: that method (e.g. a
       halo/TV-min algorithm for stars whose bleed columns outgrow any stamp).
    2. ``tmag < saturation_tmag``: "aperture", whose saturated path keeps every saturated
       pixel and the bleed columns (PRF fits decline saturated targets, docs/checks.md).
    3. ``target['crowding'] > policy_crowding_limit`` (the fraction of expected flux near the
       target coming from other stars, when the task list provides it) and
       ``policy_crowded_method`` set: that method (e.g. a PRF-fitting plugin).
    4. "aperture".

    Being ``trylast``, any other plugin's policy that returns a name takes precedence.
    """
    cfg = (settings or {}).get("aperture", {})
    tmag = target.get("tmag") if hasattr(target, "get") else None
    bright = cfg.get("policy_bright_method", "")
    if bright and tmag is not None and float(tmag) < float(cfg.get("policy_bright_tmag", 0.0)):
        return bright
    if tmag is not None and float(tmag) < float(cfg.get("saturation_tmag", 6.5)):
        return "aperture"
    crowded = cfg.get("policy_crowded_method", "")
    crowding = target.get("crowding") if hasattr(target, "get") else None
    if crowded and crowding is not None \
            and float(crowding) > float(cfg.get("policy_crowding_limit", 1.0)):
        return crowded
    return "aperture"
