"""The task database: atomic claims under concurrency, leases, attempts, skips, results."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from photometry.taskstore import (ERROR, OK, SKIPPED, STARTED, SCHEMA_VERSION, TaskStore)


def _rows(n, tmag0=8.0):
    return [{"priority": i, "starid": 100 + i, "sector": 1, "camera": 1, "ccd": 1,
             "cadence": 1800, "datasource": "ffi", "tmag": tmag0 + 0.1 * i, "method": None,
             "row": 10.0, "column": 50.0, "edge_distance": 5.0, "stamp_rows": 15,
             "stamp_cols": 15, "cache": "sector0001_camera1_ccd1.hdf5"}
            for i in range(1, n + 1)]


@pytest.fixture
def store(tmp_path):
    s = TaskStore(tmp_path / "todo.sqlite", create=True)
    s.add_tasks(_rows(20))
    yield s
    s.close()


#: one claiming process: opens the database, says it is ready, waits for the go file, then
#: claims 3 tasks at a time and saves their results until none is left; prints what it got.
#: A plain ``python -c`` (not multiprocessing from pytest) so that starting 8 of them costs
#: only the import of photometry.taskstore.
CLAIMER = """
import json, os, sys, time
from photometry.taskstore import OK, TaskStore
path, owner, ready, go = sys.argv[1:5]
store = TaskStore(path, busy_timeout=60)
open(ready, "w").close()
t0 = time.monotonic()
while not os.path.exists(go) and time.monotonic() - t0 < 120:
    time.sleep(0.005)
got, errors = [], []
while True:
    try:
        tasks = store.claim(owner, n=3)
        if not tasks:
            break
        got.extend(t["priority"] for t in tasks)
        store.save_results([{"priority": t["priority"], "status": OK, "method_used": "x",
                             "elaptime": 0.0} for t in tasks], owner=owner)
    except Exception as exc:
        errors.append(repr(exc))
        break
store.close()
print(json.dumps({"owner": owner, "got": got, "errors": errors}))
"""


def test_eight_processes_never_double_claim(tmp_path):
    path = tmp_path / "todo.sqlite"
    with TaskStore(path, create=True) as s:
        s.add_tasks(_rows(600))
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(path), f"owner{i}",
                               str(tmp_path / f"ready{i}"), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(8)]
    try:
        t0 = time.monotonic()
        while not all((tmp_path / f"ready{i}").exists() for i in range(8)):
            assert time.monotonic() - t0 < 120, "claimer processes did not start"
            assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
            time.sleep(0.01)
        go.touch()                       # every process has the database open: go together
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * 8, [err for _, err in outputs]
    results = [json.loads(out) for out, _ in outputs]
    claimed = [p for r in results for p in r["got"]]
    assert [r["errors"] for r in results if r["errors"]] == []  # never "database is locked"
    assert sorted(claimed) == list(range(1, 601))          # each task exactly once
    assert sum(1 for r in results if r["got"]) >= 2        # they really competed
    with TaskStore(path) as s:
        assert s.status_counts() == {"OK": 600}
        owners = {o: n for o, n in s.conn.execute(
            "SELECT owner, COUNT(*) FROM todolist GROUP BY owner")}
    assert sum(owners.values()) == 600


def test_claim_order_filters_and_cache_preference(store):
    store.conn.execute("UPDATE todolist SET cache = 'other.hdf5', ccd = 2 WHERE priority <= 5")
    tasks = store.claim("me", n=3)
    assert [t["priority"] for t in tasks] == [1, 2, 3]      # brightest first
    assert all(t["status"] == STARTED and t["attempts"] == 1 for t in tasks)
    tasks = store.claim("me", n=2, prefer_cache="sector0001_camera1_ccd1.hdf5")
    assert [t["priority"] for t in tasks] == [6, 7]         # same CCD first
    tasks = store.claim("me", n=5, filters={"ccd": 2})
    assert [t["priority"] for t in tasks] == [4, 5]
    tasks = store.claim("me", n=5, filters={"tmag_min": 9.85, "tmag_max": 10.05})
    assert [t["starid"] for t in tasks] == [119, 120]
    assert store.claim("me", n=1, filters={"starid": [101]}) == []


def test_release_attempts_and_limit(store):
    task, = store.claim("me", n=1)
    store.release([task["priority"]], attempt_used=False, owner="me")
    task, = store.claim("me", n=1)
    assert task["priority"] == 1 and task["attempts"] == 1  # an unused attempt is given back
    store.release([1], attempt_used=True, max_attempts=2, message="worker died", owner="me")
    task, = store.claim("me", n=1)
    assert task["attempts"] == 2
    store.release([1], attempt_used=True, max_attempts=2, message="worker died", owner="me")
    row = store.conn.execute("SELECT status, error FROM todolist WHERE priority = 1").fetchone()
    assert row[0] == ERROR and "worker died" in row[1] and "attempt limit 2" in row[1]


def test_stale_leases_and_dead_owners_are_requeued(store):
    host = socket.gethostname()
    store.claim(f"{host}:{os.getpid()}", n=1)                 # alive owner, valid lease
    store.claim(f"{host}:999999999", n=1)                      # dead pid on this host
    store.claim("elsewhere:1", n=1, lease=-1)                  # other host, lease expired
    store.claim("elsewhere:2", n=1, lease=600)                 # other host, lease valid
    assert store.requeue_stale(max_attempts=3) == 2
    status = dict(store.conn.execute("SELECT priority, status FROM todolist WHERE priority<5"))
    assert status == {1: STARTED, 2: None, 3: None, 4: STARTED}
    store.heartbeat("elsewhere:2", lease=-1)
    assert store.requeue_stale(max_attempts=3) == 1


def test_results_diagnostics_and_stale_result_dropped(store):
    a, b = store.claim("me", n=2)
    store.release([b["priority"]], attempt_used=True, max_attempts=3, message="x", owner="me")
    store.claim("other", n=1)  # b is now someone else's
    store.save_results([
        {"priority": a["priority"], "status": OK, "method_used": "aperture", "elaptime": 1.5,
         "lightcurve": "a_lc.fits", "details": {"mean_flux": 1000.0, "rms_hour": float("nan"),
                                                 "stamp": [0, 15, 40, 55], "errors": ["w1"],
                                                 "background": "local"}},
        {"priority": b["priority"], "status": OK, "method_used": "aperture", "elaptime": 1.0},
    ], owner="me")
    d = dict(next(store.db.query("SELECT * FROM diagnostics WHERE priority = ?",
                                 [a["priority"]])))
    assert d["mean_flux"] == 1000.0 and d["rms_hour"] is None
    assert (d["stamp_height"], d["stamp_width"]) == (15, 15)
    assert d["errors"] == "w1" and '"background": "local"' in d["details"]
    assert store.count_status([OK]) == 1                      # b's stale result was dropped


def test_skip_rules(store):
    # task 1 (brightest) finds 2 and 3 in its light curve; 3 finished already (kept)
    t1, t2, t3 = store.claim("me", n=3)
    store.save_results([{"priority": 3, "status": OK, "method_used": "m", "elaptime": 0}],
                       owner="me")
    store.release([2], attempt_used=False, owner="me")       # 2 pending again
    orphans = store.save_results([{"priority": 1, "status": OK, "method_used": "m",
                                   "elaptime": 0, "lightcurve": "1.fits",
                                   "details": {"skip_targets": [102, 103]}}], owner="me")
    assert orphans == []
    status = dict(store.conn.execute("SELECT priority, status FROM todolist WHERE priority<4"))
    assert status == {1: OK, 2: SKIPPED, 3: OK}               # finished result not overwritten
    assert list(store.conn.execute("SELECT * FROM photometry_skipped")) == [(2, 1)]
    # a fainter target that lists a brighter one is skipped itself, its light curve dropped
    t5, = store.claim("me", n=1, filters={"priority": 5})
    orphans = store.save_results([{"priority": 5, "status": OK, "method_used": "m",
                                   "elaptime": 0, "lightcurve": "5.fits",
                                   "details": {"skip_targets": [101]}}], owner="me")
    assert orphans == ["5.fits"]
    assert store.conn.execute("SELECT status FROM todolist WHERE priority=5").fetchone()[0] \
        == SKIPPED
    assert (5, 1) in list(store.conn.execute("SELECT * FROM photometry_skipped"))


def test_reset_modes(store):
    tasks = store.claim("me", n=3)
    store.save_results([{"priority": 1, "status": OK, "method_used": "m", "elaptime": 0},
                        {"priority": 2, "status": ERROR, "method_used": "m", "elaptime": 0}],
                       owner="me")
    assert store.reset("pending") == 0
    assert store.reset("failed") == 1
    assert store.count_status([OK]) == 1
    assert store.reset("all") == 2                            # OK and the STARTED one
    assert store.conn.execute("SELECT COUNT(*) FROM diagnostics").fetchone()[0] == 0
    assert store.count(pending_only=True) == 20
    del tasks


def test_schema_version_and_reopen(tmp_path):
    path = tmp_path / "todo.sqlite"
    TaskStore(path, create=True).close()
    with TaskStore(path) as s:
        assert s.conn.execute("SELECT version FROM schema_version").fetchone()[0] \
            == SCHEMA_VERSION
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        s.conn.execute("UPDATE schema_version SET version = 999")
    from photometry.errors import InputError
    with pytest.raises(InputError, match="newer"):
        TaskStore(path)
    with pytest.raises(InputError, match="no task database"):
        TaskStore(tmp_path / "missing.sqlite")
