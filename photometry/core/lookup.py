"""The plugins a target uses, looked up in this process's plugin manager: the stamp
corrections of ``photometry.corrections`` and the output writers of ``photometry.writers``."""
import numpy as np

from photometry.hooks.errors import ConfigurationError

__all__ = ["load_corrections", "apply_corrections", "save_lightcurve"]


def load_corrections(settings):
    """Instances of the stamp corrections named in ``photometry.corrections``."""
    from photometry.hooks.plugins import default_plugin_manager, lookup
    names = settings["photometry"].get("corrections", [])
    pm = default_plugin_manager()
    return [lookup(pm, "register_corrections", name)(settings) for name in names]


def apply_corrections(phot):
    """Run the configured stamp corrections on the current stamp's cubes.

    Why here: a correction changes the cubes of one stamp, so it runs again whenever the
    stamp changes (``_set_stamp``) once the photometry has started.
    """
    phot.correction_quality = np.zeros(phot.n_frames, dtype=np.int32)
    for correction in phot._corrections:
        if correction.available(phot):
            correction.apply(phot)
            phot.details.setdefault("corrections", [])
            if correction.name not in phot.details["corrections"]:
                phot.details["corrections"].append(correction.name)


def save_lightcurve(phot, output_folder):
    """Write the light curve with each writer of ``photometry.writers`` (atomically).

    Returns the path the first writer wrote (the FITS file by default). Called by the core.
    """
    from photometry.hooks.plugins import default_plugin_manager, lookup
    pm = default_plugin_manager()
    paths = [lookup(pm, "register_output_writers", name)().write(phot, output_folder)
             for name in phot.psettings.get("writers", ["fits"])]
    if not paths:
        raise ConfigurationError("settings photometry.writers: no output writer named")
    phot.details["filepath_lightcurve"] = str(paths[0])
    return paths[0]
