"""The fault-injecting algorithm of ``tests/test_run.py``, registered in the scheduler's workers
through ``TESSPHOT_EXTRA_PLUGINS=schedtest_plugin``.

A module of its own, importing nothing but the photometry core: every worker process the
scheduler tests start imports it, and a test module would bring pytest and h5py along.

Behaviour per star from the environment variable ``SCHEDTEST_RULES`` (JSON
``{starid: rule}``): "raise" (every time), "hang", "kill_once" (SIGKILL its own worker process
the first time, mid-task; marker files in ``SCHEDTEST_MARKERS``), "config" (a
ConfigurationError), "skip:<starid>[,<starid>...]", "sleep:<s>"; ``SCHEDTEST_SLEEP``
seconds before every task. ``SCHEDTEST_DIE_AT_START``: a worker process SIGKILLs itself while
it loads this plugin (before it is ready): "always", or a marker file (only the first time). Its light curve is a text file written atomically whose content is
fixed by the starid and the method. A second algorithm, "schedtest_b", behaves the same (for
results of several methods side by side).
"""
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

from photometry import STATUS, BasePhotometry, ConfigurationError, hookimpl


def _die_at_start():
    rule = os.environ.get("SCHEDTEST_DIE_AT_START")
    if not rule or multiprocessing.parent_process() is None:  # workers only
        return
    if rule != "always":
        if Path(rule).exists():
            return
        Path(rule).touch()
    os.kill(os.getpid(), signal.SIGKILL)


_die_at_start()


class SchedTestPhotometry(BasePhotometry):
    """No photometry: behaves as ``SCHEDTEST_RULES`` says, then writes a fixed light curve."""

    name = "schedtest"
    version = "1"

    def __init__(self, starid, source, settings=None, plot=False, plot_folder=None):
        self.starid = int(starid)
        self.details = {"stamp": None, "stamp_resizes": 0, "errors": [], "skip_targets": []}
        self._status = STATUS.UNKNOWN

    def photometry(self):
        rule = json.loads(os.environ.get("SCHEDTEST_RULES", "{}")).get(str(self.starid), "")
        time.sleep(float(os.environ.get("SCHEDTEST_SLEEP", "0")))
        if rule == "raise":
            raise RuntimeError(f"boom {self.starid}")
        if rule == "hang":
            time.sleep(600)
        if rule == "config":
            raise ConfigurationError("schedtest: bad configuration")
        if rule == "kill_once":
            marker = Path(os.environ["SCHEDTEST_MARKERS"]) / f"killed-{self.starid}"
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        if rule.startswith("skip:"):
            self.report_details(skip_targets=[int(s) for s in rule[5:].split(",")])
        if rule.startswith("sleep:"):
            time.sleep(float(rule[6:]))
        self.details["mean_flux"] = float(self.starid)
        self._status = STATUS.OK
        return STATUS.OK

    def save_lightcurve(self, output_folder):
        path = Path(output_folder) / lc_name(self.starid, self.name)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(lc_content(self.starid, self.name))
        os.replace(tmp, path)
        return path


class SchedTestB(SchedTestPhotometry):
    name = "schedtest_b"


def lc_name(starid, method="schedtest"):
    return f"tess{starid:011d}-{method}_lc.txt"


def lc_content(starid, method="schedtest"):
    return f"{starid} {method}\n" + "x" * 2000 + "\nEND\n"


@hookimpl
def register_algorithms():
    return [SchedTestPhotometry, SchedTestB]


@hookimpl
def choose_method(target, settings):
    return "schedtest"
