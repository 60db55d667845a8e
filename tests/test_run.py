"""``tessphot run``: local workers, faults that really kill processes, Ctrl-C, Dask.

The algorithm is a test plugin registered through ``TESSPHOT_EXTRA_PLUGINS=test_run`` (this
module), whose behaviour per star comes from the environment variable ``SCHEDTEST_RULES``
(JSON ``{starid: rule}``): "raise" (every time), "hang", "kill_once" (SIGKILL its own worker
process the first time, mid-task), "config" (a ConfigurationError), "skip:<starid>",
"sleep:<s>". Its light curve is a text file written atomically whose content is fixed by the
starid, so runs on different backends can be compared byte for byte.
"""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from photometry import hookimpl
from photometry.base import STATUS, BasePhotometry
from photometry.errors import ConfigurationError
from photometry.run import run_tasks
from photometry.settings import load_settings
from photometry.todo import make_todo

from test_todo import make_fake_ccd

TESTS = Path(__file__).parent


# --------------------------------------------------------------------------- test plugin
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
            self.report_details(skip_targets=[int(rule[5:])])
        if rule.startswith("sleep:"):
            time.sleep(float(rule[6:]))
        self.details["mean_flux"] = float(self.starid)
        self._status = STATUS.OK
        return STATUS.OK

    def save_lightcurve(self, output_folder):
        path = Path(output_folder) / f"tess{self.starid:011d}-schedtest_lc.txt"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(lc_content(self.starid))
        os.replace(tmp, path)
        return path


def lc_content(starid):
    return f"{starid}\n" + "x" * 2000 + "\nEND\n"


@hookimpl
def register_algorithms():
    return [SchedTestPhotometry]


@hookimpl
def choose_method(target, settings):
    return "schedtest"


# --------------------------------------------------------------------------- helpers
@pytest.fixture
def sector(tmp_path, monkeypatch):
    """A fake CCD with 16 targets, todo.sqlite built; env set for the test plugin."""
    cache = tmp_path / "cache"
    stars = [(1000 + i, 8.0 + 0.25 * i, 5.0 + 3 * i, 50.0 + 2 * i) for i in range(16)]
    make_fake_ccd(cache, stars=stars)
    make_todo(cache, faint_limit=15)
    monkeypatch.setenv("TESSPHOT_EXTRA_PLUGINS", "test_run")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(TESTS)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    monkeypatch.setenv("SCHEDTEST_MARKERS", str(tmp_path))
    monkeypatch.delenv("SCHEDTEST_RULES", raising=False)
    monkeypatch.delenv("SCHEDTEST_SLEEP", raising=False)
    return cache


def db_rows(cache):
    con = sqlite3.connect(cache / "todo.sqlite")
    con.row_factory = sqlite3.Row
    rows = {r["starid"]: dict(r) for r in con.execute(
        "SELECT t.*, d.lightcurve, d.errors, d.mean_flux FROM todolist t "
        "LEFT JOIN diagnostics d USING (priority)")}
    con.close()
    return rows


def check_outputs(cache, output):
    """Every task final exactly once; each OK one has exactly one complete light curve."""
    rows = db_rows(cache)
    assert all(r["status"] in (1, 2, 3, 4, 5) for r in rows.values()), \
        {s: r["status"] for s, r in rows.items()}
    files = sorted(p.name for p in output.glob("tess*"))
    ok = sorted(f"tess{s:011d}-schedtest_lc.txt" for s, r in rows.items() if r["status"] == 1)
    assert files == ok
    for s, r in rows.items():
        if r["status"] == 1:
            assert (output / r["lightcurve"]).read_text() == lc_content(s)
            assert r["mean_flux"] == s
    return rows


def cli(cache, output, *extra, wait=True):
    cmd = [sys.executable, "-m", "photometry.cli", "run", str(cache), "--output", str(output),
           "--no-progress", *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def wait_for_ok(cache, n, timeout=60):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            con = sqlite3.connect(cache / "todo.sqlite", timeout=10)
            done = con.execute("SELECT COUNT(*) FROM todolist WHERE status = 1").fetchone()[0]
            con.close()
        except sqlite3.OperationalError:
            done = 0
        if done >= n:
            return done
        time.sleep(0.05)
    raise AssertionError("run made no progress")


# --------------------------------------------------------------------------- tests
def test_local_run_dynamic_policy_and_summary(sector, tmp_path):
    out = tmp_path / "lc"
    settings = load_settings(assignments=["scheduler.commit_every=3"])
    summary = run_tasks(sector, out, settings=settings, workers=2, progress=False)
    assert summary["counts"] == {"OK": 16} and summary["failed"] == 0
    rows = check_outputs(sector, out)
    assert {r["attempts"] for r in rows.values()} == {1}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["tasks_run"] == 16 and on_disk["status_all"] == {"OK": 16}
    assert on_disk["finished"] and on_disk["tasks_per_second"] > 0
    # a second run has nothing to do; --overwrite-style mode "all" redoes everything
    assert run_tasks(sector, out, settings=settings, workers=1, progress=False)["tasks_run"] == 0
    again = run_tasks(sector, out, settings=settings, workers=1, mode="all",
                      filters={"tmag_max": 9.0}, progress=False)
    assert again["tasks_run"] == 5


def test_faults_raise_hang_and_killed_worker(sector, tmp_path, monkeypatch):
    """A task raising every time, one hanging past its timeout, one whose worker is SIGKILLed
    mid-task: the run finishes, each task final once, the right ones failed, exit code 1."""
    monkeypatch.setenv("SCHEDTEST_RULES", json.dumps(
        {"1002": "raise", "1005": "hang", "1007": "kill_once", "1009": "skip:1010"}))
    out = tmp_path / "lc"
    res = cli(sector, out, "--workers", "2", "--timeout", "2",
              "--set", "scheduler.max_attempts=2")
    assert res.returncode == 1, res.stderr
    rows = check_outputs(sector, out)
    assert rows[1002]["status"] == 2 and "RuntimeError: boom 1002" in rows[1002]["errors"]
    assert rows[1002]["attempts"] == 1                     # an algorithm error is not retried
    assert rows[1005]["status"] == 2 and "timed out after 2 s" in rows[1005]["error"]
    assert rows[1005]["attempts"] == 2
    assert rows[1007]["status"] == 1 and rows[1007]["attempts"] == 2  # retried after SIGKILL
    assert (tmp_path / "killed-1007").exists()
    assert rows[1010]["status"] in (1, 5)   # skipped unless it finished before 1009 reported
    ok = [s for s, r in rows.items() if r["status"] == 1]
    assert len(ok) >= 13
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ERROR"] == 2 and summary["last_error"]
    assert not list(out.glob("*.tmp"))
    status = subprocess.run([sys.executable, "-m", "photometry.cli", "status", str(sector)],
                            capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert "boom 1002" in status.stdout and "timed out" in status.stdout


def test_whole_run_sigkilled_then_restarted(sector, tmp_path, monkeypatch):
    monkeypatch.setenv("SCHEDTEST_SLEEP", "0.15")
    out = tmp_path / "lc"
    proc = cli(sector, out, "--workers", "2", "--set", "scheduler.commit_every=2",
               "--set", "scheduler.commit_interval=0.1", wait=False)
    try:
        wait_for_ok(sector, 4)
    finally:
        proc.kill()                                          # SIGKILL the coordinator
        proc.wait(30)
    rows = db_rows(sector)
    assert any(r["status"] is None or r["status"] == 6 for r in rows.values())
    res = cli(sector, out, "--workers", "2")
    assert res.returncode == 0, res.stderr
    rows = check_outputs(sector, out)
    assert all(r["status"] == 1 for r in rows.values())
    assert not list(out.glob("*.tmp"))


def test_ctrl_c_loses_nothing(sector, tmp_path, monkeypatch):
    monkeypatch.setenv("SCHEDTEST_SLEEP", "0.2")
    out = tmp_path / "lc"
    proc = cli(sector, out, "--workers", "1", "--set", "scheduler.commit_interval=0.1",
               wait=False)
    wait_for_ok(sector, 3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    rows = db_rows(sector)
    statuses = [r["status"] for r in rows.values()]
    assert 6 not in statuses and None in statuses            # in-flight tasks given back
    assert all(r["attempts"] == (1 if r["status"] else 0) for r in rows.values())
    res = cli(sector, out, "--workers", "1")
    assert res.returncode == 0, res.stderr
    assert all(r["status"] == 1 for r in check_outputs(sector, out).values())


def test_configuration_error_stops_the_run(sector, tmp_path, monkeypatch):
    monkeypatch.setenv("SCHEDTEST_RULES", json.dumps({"1003": "config"}))
    out = tmp_path / "lc"
    res = cli(sector, out, "--workers", "1")
    assert res.returncode == 2 and "bad configuration" in res.stderr
    rows = db_rows(sector)
    assert rows[1003]["status"] is None and rows[1003]["attempts"] == 0
    assert all(r["status"] in (None, 1) for r in rows.values())
    res = cli(sector, out, "--method", "nosuchmethod")
    assert res.returncode == 2 and "nosuchmethod" in res.stderr


def test_dask_cluster_matches_local_run(sector, tmp_path):
    distributed = pytest.importorskip("distributed")
    local_cache = tmp_path / "local_cache"
    shutil.copytree(sector, local_cache)
    run_tasks(local_cache, tmp_path / "lc_local", workers=2, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        summary = run_tasks(sector, tmp_path / "lc_dask", dask=cluster.scheduler_address,
                            progress=False)
        workers_used = len(cluster.scheduler_info["workers"])
    assert workers_used == 2
    assert summary["backend"] == "dask" and summary["counts"] == {"OK": 16}
    local, remote = db_rows(local_cache), db_rows(sector)
    assert {s: (r["status"], r["lightcurve"], r["mean_flux"]) for s, r in local.items()} == \
        {s: (r["status"], r["lightcurve"], r["mean_flux"]) for s, r in remote.items()}
    for s, r in remote.items():
        assert (tmp_path / "lc_dask" / r["lightcurve"]).read_bytes() == \
            (tmp_path / "lc_local" / r["lightcurve"]).read_bytes()
