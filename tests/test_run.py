"""``tessphot run``: local workers, faults that really kill processes, kill -9 of the whole run
three times then resume, Ctrl-C, a full disk, results of several methods, order-independent
results, Dask.

The algorithm is a test plugin, ``tests/schedtest_plugin.py``, registered through
``TESSPHOT_EXTRA_PLUGINS=schedtest_plugin`` (``TESSPHOT_BLOCK_PLUGINS=*`` leaves the installed
science plugins out, so a worker starts quickly), whose behaviour per star comes from the
environment variable ``SCHEDTEST_RULES``
(JSON ``{starid: rule}``): "raise" (every time), "hang", "kill_once" (SIGKILL its own worker
process the first time, mid-task), "config" (a ConfigurationError), "skip:<starid>,...",
"sleep:<s>". Its light curve is a text file written atomically whose content is fixed by the
starid and method, so runs can be compared byte for byte. (``tests/test_determinism.py`` does
the same with the real aperture photometry.)

Speed (the suite runs on 2 shared cores): a process is started only where the scenario needs
one (SIGKILL / SIGINT of the whole run); everything else calls ``photometry.cli.main`` in this
process, and the subprocess imports only the ``run`` command (see ``cli``). The plain local run
is done once per module and shared by the tests that compare against it.
"""
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from photometry import cli as tessphot_cli
from photometry.scheduler.run import run_tasks
from photometry.hooks.settings import load_settings
from photometry.scheduler.todo import make_todo

from schedtest_plugin import lc_content, lc_name
from test_todo import make_fake_ccd

TESTS = Path(__file__).parent
#: holding chains of the shared scene: 1001's light curve holds 1002 (SKIPPED), 1002 would
#: hold 1005 but is skipped itself (1005 kept), 1009's aperture holds the brighter 1006
#: (1009 SKIPPED), 1011 holds 1012 and 1013
SKIP_RULES = {"1001": "skip:1002", "1002": "skip:1005", "1009": "skip:1006",
              "1011": "skip:1012,1013"}
SKIPPED_STARS = {1002, 1009, 1012, 1013}


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def plugin_env():
    """The test plugin alone, in this process, its workers and subprocesses (and Dask's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESSPHOT_EXTRA_PLUGINS", "schedtest_plugin")
        mp.setenv("TESSPHOT_BLOCK_PLUGINS", "*")
        mp.setenv("PYTHONPATH", os.pathsep.join(
            [str(TESTS)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        mp.setenv("SCHEDTEST_RULES", json.dumps(SKIP_RULES))
        mp.delenv("SCHEDTEST_SLEEP", raising=False)
        yield


def make_sector(cache, n=16):
    """A fake CCD with ``n`` targets (TIC 1000, 1001, ... brightest first), todo.sqlite built."""
    stars = [(1000 + i, 8.0 + 0.25 * i, 5.0 + (3 * i) % 60, 50.0 + (2 * i) % 60)
             for i in range(n)]
    make_fake_ccd(cache, stars=stars)
    make_todo(cache, faint_limit=30)
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


def db_rows(cache, method="schedtest"):
    con = sqlite3.connect(cache / "todo.sqlite")
    con.row_factory = sqlite3.Row
    rows = {r["starid"]: dict(r) for r in con.execute(
        "SELECT t.starid, t.tmag, r.*, d.lightcurve, d.errors, d.mean_flux FROM todolist t "
        "LEFT JOIN results r ON r.priority = t.priority AND r.method = ? "
        "LEFT JOIN diagnostics d ON d.priority = t.priority AND d.method = ?",
        (method, method))}
    con.close()
    return rows


def check_outputs(cache, output, method="schedtest"):
    """Every result final exactly once; each kept one has exactly one complete light curve,
    and there is no other file (nothing half-written, nothing of a skipped task)."""
    rows = db_rows(cache, method)
    assert all(r["status"] in (1, 2, 3, 4, 5) for r in rows.values()), \
        {s: r["status"] for s, r in rows.items()}
    files = sorted(p.name for p in output.glob(f"tess*-{method}_lc.txt"))
    ok = sorted(lc_name(s, method) for s, r in rows.items() if r["status"] == 1)
    assert files == ok
    for s, r in rows.items():
        if r["status"] == 1:
            assert (output / r["lightcurve"]).read_text() == lc_content(s, method)
            assert r["mean_flux"] == s
    assert not list(output.glob("*.tmp")) and not (output / ".tessphot-staging").exists()
    return rows


def outcome(cache, output):
    """What must not depend on how the run went: statuses and light-curve bytes."""
    rows = db_rows(cache)
    return ({s: r["status"] for s, r in rows.items()},
            {p.name: p.read_bytes() for p in sorted(output.glob("tess*_lc.txt"))})


#: ``tessphot`` in a new process (the CLI imports only the chosen sub-command's module)
LAUNCHER = "import sys, photometry.cli as c; sys.exit(c.main())"


#: the test plugin's light curves are text files: no co-trending after the run (the
#: installed correction plugin is blocked with the rest, and ``run`` refuses a blocked one)
NO_CORRECTION = ("--set", "photometry.lightcurve_correction=")


def cli_process(cache, output, *extra):
    """``tessphot run`` as a separate process (to be SIGKILLed or interrupted)."""
    cmd = [sys.executable, "-c", LAUNCHER, "run", str(cache), "--output", str(output),
           "--no-progress", *NO_CORRECTION, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli(*args):
    """``tessphot ARGS`` in this process: its exit code (output through capsys)."""
    if args and args[0] == "run":
        args = (*args, *NO_CORRECTION)
    return tessphot_cli.main([str(a) for a in args])


def count_status(cache, status=1):
    try:
        con = sqlite3.connect(cache / "todo.sqlite", timeout=10)
        done = con.execute("SELECT COUNT(*) FROM results WHERE status = ?",
                           (status,)).fetchone()[0]
        con.close()
    except sqlite3.OperationalError:
        done = 0
    return done


def wait_for_ok(cache, n, timeout=60):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        done = count_status(cache)
        if done >= n:
            return done
        time.sleep(0.02)
    raise AssertionError("run made no progress")


def children(pid):
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def snapshot(folder):
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


# --------------------------------------------------------------------------- tests
def test_local_run_dynamic_policy_and_summary(local_reference, tmp_path, capsys):
    ref_cache, ref_out, summary = local_reference
    assert summary["counts"] == {"OK": 12, "SKIPPED": summary["counts"]["SKIPPED"]}
    assert summary["status_all"] == {"OK": 12, "SKIPPED": 4} and summary["failed"] == 0
    rows = check_outputs(ref_cache, ref_out)
    assert {s for s, r in rows.items() if r["status"] == 5} == SKIPPED_STARS
    assert {r["attempts"] for r in rows.values()} == {0}
    on_disk = json.loads((ref_out / "summary.json").read_text())
    assert on_disk["status_all"] == {"OK": 12, "SKIPPED": 4}
    assert on_disk["finished"] and on_disk["tasks_per_second"] > 0
    assert (ref_out / "tessphot.log").is_file()
    # a second run has nothing to do and says why; --overwrite redoes this method's results
    cache, out = tmp_path / "cache", tmp_path / "lc"
    shutil.copytree(ref_cache, cache)
    shutil.copytree(ref_out, out)
    assert cli("run", cache, "--output", out, "--no-progress") == 0
    said = capsys.readouterr().out
    assert "all 16 results of schedtest are done (OK 12, SKIPPED 4)" in said
    assert "--overwrite" in said and "--method NAME adds" in said
    settings = load_settings(assignments=["scheduler.commit_every=3"])
    again = run_tasks(cache, out, settings=settings, workers=1, mode="all",
                      filters={"tmag_max": 9.0}, progress=False)
    assert again["tasks_run"] == 5 and again["reset_at_start"] == 5
    assert outcome(cache, out) == outcome(ref_cache, ref_out)


def test_methods_side_by_side(local_reference, tmp_path, capsys):
    """``run --method B`` after a default run adds B's results; ``--overwrite`` of B leaves
    the default method's results and files alone; status shows both."""
    ref_cache, ref_out, _ = local_reference
    cache, out = tmp_path / "cache", tmp_path / "lc"
    shutil.copytree(ref_cache, cache)
    shutil.copytree(ref_out, out)
    before = outcome(cache, out)
    assert cli("run", cache, "--output", out, "--no-progress", "--workers", "1",
               "--method", "schedtest_b") == 0
    assert "16 tasks" in capsys.readouterr().out
    check_outputs(cache, out, "schedtest_b")
    check_outputs(cache, out, "schedtest")
    assert cli("run", cache, "--output", out, "--no-progress", "--workers", "1",
               "--method", "schedtest_b", "--overwrite", "--starid", "1000") == 0
    assert "1 tasks" in capsys.readouterr().out
    rows = check_outputs(cache, out, "schedtest")
    assert {s: r["status"] for s, r in rows.items()} == before[0]
    assert cli("status", cache) == 0
    report = capsys.readouterr().out
    assert "results of 2 methods" in report and "schedtest_b (16 results)" in report


def test_same_results_whatever_workers_or_claim_order(local_reference, tmp_path,
                                                      monkeypatch):
    """1 worker, 2 workers (the reference) and 2 workers claiming faintest first (every held
    task runs before its holder): the same statuses and byte-identical light curves."""
    import photometry.data.taskstore as taskstore
    ref_cache, ref_out, _ = local_reference
    reference = outcome(ref_cache, ref_out)
    one = make_sector(tmp_path / "one")
    run_tasks(one, tmp_path / "lc_one", workers=1, progress=False)
    assert outcome(one, tmp_path / "lc_one") == reference
    monkeypatch.setattr(taskstore, "CLAIM_ORDER", "r.priority DESC")
    rev = make_sector(tmp_path / "rev")
    summary = run_tasks(rev, tmp_path / "lc_rev", workers=2, progress=False,
                        settings=load_settings(assignments=["scheduler.commit_every=1"]))
    assert summary["tasks_run"] >= 16     # all ran (1005 twice: withdrawn by 1002, then freed)
    assert outcome(rev, tmp_path / "lc_rev") == reference
    check_outputs(rev, tmp_path / "lc_rev")


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
    assert rows[1002]["attempts"] == 0                     # an algorithm error is not retried
    assert rows[1005]["status"] == 2 and "timed out after 1.5 s" in rows[1005]["error"]
    assert rows[1005]["attempts"] == 2
    assert rows[1007]["status"] == 1 and rows[1007]["attempts"] == 1  # retried after SIGKILL
    assert (tmp_path / "killed-1007").exists()
    assert rows[1010]["status"] == 5                       # held by 1009, whatever the order
    assert sorted(s for s, r in rows.items() if r["status"] == 1) == sorted(
        set(range(1000, 1016)) - {1002, 1005, 1010})
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ERROR"] == 2 and summary["last_error"]
    capsys.readouterr()
    assert cli("status", sector) == 0
    report = capsys.readouterr().out
    assert "boom 1002" in report and "timed out" in report


def test_worker_dying_at_start_up_charges_nothing(sector, tmp_path, monkeypatch, capsys):
    """A worker that dies while it starts (tasks already sent to it, none started): they go
    back to the queue uncharged and a new worker runs them; workers that always die stop the
    run (exit 2, one line) with every task pending and uncharged."""
    monkeypatch.setenv("SCHEDTEST_DIE_AT_START", str(tmp_path / "died-once"))
    out = tmp_path / "lc"
    assert cli("run", sector, "--output", out, "--no-progress", "--workers", "1") == 0
    assert (tmp_path / "died-once").exists()
    rows = check_outputs(sector, out)
    assert {r["attempts"] for r in rows.values()} == {0}
    assert {s for s, r in rows.items() if r["status"] == 5} == SKIPPED_STARS
    monkeypatch.setenv("SCHEDTEST_DIE_AT_START", "always")
    capsys.readouterr()
    assert cli("run", sector, "--output", out, "--no-progress", "--workers", "1",
               "--overwrite") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "worker processes die at start-up" in err[0], err
    rows = db_rows(sector)
    assert all(r["status"] is None and r["attempts"] == 0 for r in rows.values())


def test_three_kills_then_resume(tmp_path, monkeypatch):
    """``kill -9`` of ``run --workers 2`` three times in a row at random moments (during
    start-up, mid-run, between commits), then a plain resume: the workers die with their
    coordinator, nothing is written after its death, no task is charged an attempt, and the
    result is the uninterrupted run's: same statuses, byte-identical light curves, no ERROR."""
    ref_cache, ref_out = make_sector(tmp_path / "ref", n=40), tmp_path / "lc_ref"
    run_tasks(ref_cache, ref_out, workers=2, progress=False)
    monkeypatch.setenv("SCHEDTEST_SLEEP", "0.1")   # 2 s a run: killed before its end, under load too
    cache, out = make_sector(tmp_path / "cache", n=40), tmp_path / "lc"
    rng = random.Random(13)
    progress = []
    for kill in range(3):
        proc = cli_process(cache, out, "--workers", "2", "--set", "scheduler.commit_every=2",
                           "--set", "scheduler.commit_interval=0.05")
        try:
            target = count_status(cache) + rng.choice([0, 2, 4, 6])
            if target > count_status(cache):
                wait_for_ok(cache, target)
            time.sleep(rng.uniform(0.0, 0.3))
            workers = [c for c in children(proc.pid) if alive(c)]
        finally:
            proc.kill()                                      # SIGKILL the coordinator
            proc.communicate(timeout=30)
        killed_at = time.monotonic()
        while any(alive(w) for w in workers):                # they die with it, at once
            assert time.monotonic() - killed_at < 2.0, "orphaned workers survive"
            time.sleep(0.01)
        before = snapshot(out)
        time.sleep(0.6)                                      # > a task, > the watchdog
        assert snapshot(out) == before, "files written after the coordinator died"
        progress.append(count_status(cache))
    assert progress[-1] < 40, progress                       # it was really interrupted
    monkeypatch.delenv("SCHEDTEST_SLEEP")
    summary = run_tasks(cache, out, workers=2, progress=False)
    assert summary["failed"] == 0 and "ERROR" not in summary["status_all"]
    rows = check_outputs(cache, out)
    assert {r["attempts"] for r in rows.values()} == {0}
    assert max(r["interruptions"] for r in rows.values()) >= 1
    assert outcome(cache, out) == outcome(ref_cache, ref_out)


def test_ctrl_c_loses_nothing(sector, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCHEDTEST_SLEEP", "0.2")
    out = tmp_path / "lc"
    proc = cli_process(sector, out, "--workers", "1", "--set", "scheduler.commit_interval=0.1")
    try:
        wait_for_ok(sector, 3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        assert proc.stderr.read().strip().splitlines() == ["tessphot run: interrupted"]
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    rows = db_rows(sector)
    statuses = [r["status"] for r in rows.values()]
    assert 6 not in statuses and None in statuses            # in-flight tasks given back
    assert all(r["attempts"] == 0 for r in rows.values())
    monkeypatch.delenv("SCHEDTEST_SLEEP")
    assert cli("run", sector, "--output", out, "--no-progress", "--workers", "1") == 0, \
        capsys.readouterr().err
    assert {s for s, r in check_outputs(sector, out).items() if r["status"] == 5} \
        == SKIPPED_STARS


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


@pytest.fixture
def small_disk(tmp_path):
    """A 32 kB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode:
        pytest.skip("cannot mount a small file system here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_stops_cleanly(sector, small_disk, monkeypatch, capfd):
    """The output disk fills up mid-run: one line on stderr (none from the workers), exit 2,
    every result committed before is kept with its file, the rest pending, none charged."""
    out = small_disk / "lc"
    code = cli("run", sector, "--output", out, "--no-progress", "--workers", "2",
               "--set", "scheduler.commit_every=1")
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "no space left on device" in err[0], err
    assert "finished results are kept" in err[0]
    rows = db_rows(sector)
    kept = {s for s, r in rows.items() if r["status"] == 1}
    assert 0 < len(kept) < 12
    assert all(r["status"] in (None, 1, 5) and r["attempts"] == 0 for r in rows.values())
    for s in kept:
        assert (out / rows[s]["lightcurve"]).read_text() == lc_content(s)


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
    assert summary["backend"] == "dask" and summary["status_all"] == {"OK": 12, "SKIPPED": 4}
    assert outcome(cache, tmp_path / "lc_dask") == outcome(ref_cache, ref_out)
    check_outputs(cache, tmp_path / "lc_dask")
