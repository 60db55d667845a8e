"""Small simulated sectors that several test modules build the same way."""
from photometry.scheduler.prepare import prepare
from photometry.hooks.settings import load_settings
from photometry.sim.simulate import simulate
from photometry.scheduler.todo import make_todo


def prepared_sector(base, assignments, faint_limit=None):
    """``tessphot simulate`` into ``base/sim``, ``prepare`` into ``base/cache`` and, with a
    ``faint_limit``, ``todo``; returns the settings made from ``assignments``."""
    settings = load_settings(assignments=assignments)
    simulate(base / "sim", settings, progress=False)
    prepare(base / "sim" / "ffi", base / "sim" / "catalog.csv", base / "cache", settings,
            progress=False)
    if faint_limit is not None:
        make_todo(base / "cache", faint_limit=faint_limit)
    return settings
