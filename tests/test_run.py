"""``tessphot run``: local workers, faults that really kill processes, Ctrl-C, Dask.

The algorithm is a test plugin, ``tests/schedtest_plugin.py``, registered through
``TESSPHOT_EXTRA_PLUGINS=schedtest_plugin`` (``TESSPHOT_BLOCK_PLUGINS=*`` leaves the installed
science plugins out, so a worker starts quickly), whose behaviour per star comes from the
environment variable ``SCHEDTEST_RULES``
(JSON ``{starid: rule}``): "raise" (every time), "hang", "kill_once" (SIGKILL its own worker
process the first time, mid-task), "config" (a ConfigurationError), "skip:<starid>",
"sleep:<s>". Its light curve is a text file written atomically whose content is fixed by the
starid, so runs on different backends can be compared byte for byte.

Speed (the suite runs on 2 shared cores): a process is started only where the scenario needs
one (SIGKILL / SIGINT of the whole run); everything else calls ``photometry.cli.main`` in this
process, and the subprocess imports only the ``run`` command (see ``cli``). The plain local run
is done once per module and shared by the tests that compare against it.
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

from photometry import cli as tessphot_cli
from photometry.run import run_tasks
from photometry.settings import load_settings
from photometry.todo import make_todo

from schedtest_plugin import lc_content
from test_todo import make_fake_ccd

TESTS = Path(__file__).parent


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def plugin_env():
    """The test plugin alone, in this process, its workers and subprocesses (and Dask's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESSPHOT_EXTRA_PLUGINS", "schedtest_plugin")
        mp.setenv("TESSPHOT_BLOCK_PLUGINS", "*")
        mp.setenv("PYTHONPATH", os.pathsep.join(
            [str(TESTS)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        mp.delenv("SCHEDTEST_RULES", raising=False)
        mp.delenv("SCHEDTEST_SLEEP", raising=False)
        yield


def make_sector(cache):
    """A fake CCD with 16 targets, todo.sqlite built."""
    stars = [(1000 + i, 8.0 + 0.25 * i, 5.0 + 3 * i, 50.0 + 2 * i) for i in range(16)]
    make_fake_ccd(cache, stars=stars)
    make_todo(cache, faint_limit=15)
    return cache


@pytest.fixture
def sector(tmp_path, monkeypatch):
    monkeypatch.setenv("SCHEDTEST_MARKERS", str(tmp_path))
    return make_sector(tmp_path / "cache")


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """One plain local run on 2 workers (tiny commit batches): (cache, output, summary)."""
    base = tmp_path_factory.mktemp("reference")
    cache, out = make_sector(base / "cache"), base / "lc"
    settings = load_settings(assignments=["scheduler.commit_every=3"])
    summary = run_tasks(cache, out, settings=settings, workers=2, progress=False)
    return cache, out, summary


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


#: ``tessphot`` in a new process (the CLI imports only the chosen sub-command's module)
LAUNCHER = "import sys, photometry.cli as c; sys.exit(c.main())"


def cli_process(cache, output, *extra):
    """``tessphot run`` as a separate process (to be SIGKILLed or interrupted)."""
    cmd = [sys.executable, "-c", LAUNCHER, "run", str(cache), "--output", str(output),
           "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli(*args):
    """``tessphot ARGS`` in this process: its exit code (output through capsys)."""
    return tessphot_cli.main([str(a) for a in args])


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
def test_local_run_dynamic_policy_and_summary(local_reference, tmp_path):
    ref_cache, ref_out, summary = local_reference
    assert summary["counts"] == {"OK": 16} and summary["failed"] == 0
    rows = check_outputs(ref_cache, ref_out)
    assert {r["attempts"] for r in rows.values()} == {1}
    on_disk = json.loads((ref_out / "summary.json").read_text())
    assert on_disk["tasks_run"] == 16 and on_disk["status_all"] == {"OK": 16}
    assert on_disk["finished"] and on_disk["tasks_per_second"] > 0
    # a second run has nothing to do; --overwrite-style mode "all" redoes everything
    cache, out = tmp_path / "cache", tmp_path / "lc"
    shutil.copytree(ref_cache, cache)
    shutil.copytree(ref_out, out)
    settings = load_settings(assignments=["scheduler.commit_every=3"])
    assert run_tasks(cache, out, settings=settings, workers=1, progress=False)["tasks_run"] == 0
    again = run_tasks(cache, out, settings=settings, workers=1, mode="all",
                      filters={"tmag_max": 9.0}, progress=False)
    assert again["tasks_run"] == 5 and again["counts"] == {"OK": 5}
    rows = check_outputs(cache, out)
    assert sorted(s for s, r in rows.items() if r["attempts"] == 1 and r["tmag"] <= 9.0) == \
        [1000, 1001, 1002, 1003, 1004]


def test_faults_raise_hang_and_killed_worker(sector, tmp_path, monkeypatch, capsys):
    """A task raising every time, one hanging past its timeout, one whose worker is SIGKILLed
    mid-task: the run finishes, each task final once, the right ones failed, exit code 1."""
    monkeypatch.setenv("SCHEDTEST_RULES", json.dumps(
        {"1002": "raise", "1005": "hang", "1007": "kill_once", "1009": "skip:1010"}))
    out = tmp_path / "lc"
    code = cli("run", sector, "--output", out, "--no-progress", "--workers", "2",
               "--timeout", "1.5", "--set", "scheduler.max_attempts=2")
    assert code == 1, capsys.readouterr().err
    rows = check_outputs(sector, out)
    assert rows[1002]["status"] == 2 and "RuntimeError: boom 1002" in rows[1002]["errors"]
    assert rows[1002]["attempts"] == 1                     # an algorithm error is not retried
    assert rows[1005]["status"] == 2 and "timed out after 1.5 s" in rows[1005]["error"]
    assert rows[1005]["attempts"] == 2
    assert rows[1007]["status"] == 1 and rows[1007]["attempts"] == 2  # retried after SIGKILL
    assert (tmp_path / "killed-1007").exists()
    assert rows[1010]["status"] in (1, 5)   # skipped unless it finished before 1009 reported
    ok = [s for s, r in rows.items() if r["status"] == 1]
    assert len(ok) >= 13
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ERROR"] == 2 and summary["last_error"]
    assert not list(out.glob("*.tmp"))
    capsys.readouterr()
    assert cli("status", sector) == 0
    report = capsys.readouterr().out
    assert "boom 1002" in report and "timed out" in report


def test_whole_run_sigkilled_then_restarted(sector, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCHEDTEST_SLEEP", "0.15")
    out = tmp_path / "lc"
    proc = cli_process(sector, out, "--workers", "2", "--set", "scheduler.commit_every=2",
                       "--set", "scheduler.commit_interval=0.1")
    try:
        wait_for_ok(sector, 4)
    finally:
        proc.kill()                                          # SIGKILL the coordinator
        proc.communicate(timeout=30)
    rows = db_rows(sector)
    assert any(r["status"] is None or r["status"] == 6 for r in rows.values())
    monkeypatch.delenv("SCHEDTEST_SLEEP")
    assert cli("run", sector, "--output", out, "--no-progress", "--workers", "1") == 0, \
        capsys.readouterr().err
    rows = check_outputs(sector, out)
    assert all(r["status"] == 1 for r in rows.values())
    assert not list(out.glob("*.tmp"))


def test_ctrl_c_loses_nothing(sector, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCHEDTEST_SLEEP", "0.2")
    out = tmp_path / "lc"
    proc = cli_process(sector, out, "--workers", "1", "--set", "scheduler.commit_interval=0.1")
    try:
        wait_for_ok(sector, 3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    rows = db_rows(sector)
    statuses = [r["status"] for r in rows.values()]
    assert 6 not in statuses and None in statuses            # in-flight tasks given back
    assert all(r["attempts"] == (1 if r["status"] else 0) for r in rows.values())
    monkeypatch.delenv("SCHEDTEST_SLEEP")
    assert cli("run", sector, "--output", out, "--no-progress", "--workers", "1") == 0, \
        capsys.readouterr().err
    assert all(r["status"] == 1 for r in check_outputs(sector, out).values())


def test_configuration_error_stops_the_run(sector, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCHEDTEST_RULES", json.dumps({"1003": "config"}))
    out = tmp_path / "lc"
    assert cli("run", sector, "--output", out, "--no-progress", "--workers", "1") == 2
    assert "bad configuration" in capsys.readouterr().err
    rows = db_rows(sector)
    assert rows[1003]["status"] is None and rows[1003]["attempts"] == 0
    assert all(r["status"] in (None, 1) for r in rows.values())
    assert cli("run", sector, "--output", out, "--method", "nosuchmethod") == 2
    assert "nosuchmethod" in capsys.readouterr().err


def test_dask_cluster_matches_local_run(local_reference, tmp_path):
    distributed = pytest.importorskip("distributed")
    ref_cache, ref_out, _ = local_reference
    cache = make_sector(tmp_path / "cache")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        summary = run_tasks(cache, tmp_path / "lc_dask", dask=cluster.scheduler_address,
                            progress=False)
        workers_used = len(cluster.scheduler_info["workers"])
    assert workers_used == 2
    assert summary["backend"] == "dask" and summary["counts"] == {"OK": 16}
    local, remote = db_rows(ref_cache), db_rows(cache)
    assert {s: (r["status"], r["lightcurve"], r["mean_flux"]) for s, r in local.items()} == \
        {s: (r["status"], r["lightcurve"], r["mean_flux"]) for s, r in remote.items()}
    for s, r in remote.items():
        assert (tmp_path / "lc_dask" / r["lightcurve"]).read_bytes() == \
            (ref_out / r["lightcurve"]).read_bytes()
