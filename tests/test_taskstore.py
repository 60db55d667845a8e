"""The task database: atomic claims under concurrency, leases, attempts, order-independent
skips, results per method, file publication, migrations."""
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from photometry.hooks.errors import InputError
from photometry.data.taskstore import (ABORT, ERROR, OK, SCHEMA_VERSION, SKIPPED, STARTED, WARNING,
                                       MIGRATIONS, TaskStore)


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
    s.plan(method="m")
    yield s
    s.close()


def status(store, method="m"):
    return dict(store.conn.execute("SELECT priority, status FROM results WHERE method = ?",
                                   (method,)))


def result(priority, status=OK, method="m", **extra):
    return {"priority": priority, "method": method, "status": status, "elaptime": 0.0,
            **extra}


#: one claiming process: opens the database, says it is ready, waits for the go file, then
#: claims 3 tasks at a time and saves their results until none is left; prints what it got.
#: A plain ``python -c`` (not multiprocessing from pytest) so that starting 8 of them costs
#: only the import of photometry.taskstore.
CLAIMER = """
import json, os, sys, time
from photometry.data.taskstore import OK, TaskStore
path, owner, ready, go = sys.argv[1:5]
store = TaskStore(path, busy_timeout=60)
store.plan(method="x")
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
        store.save_results([{"priority": t["priority"], "method": "x", "status": OK,
                             "elaptime": 0.0} for t in tasks], owner=owner)
        time.sleep(0.002)   # a worker works between claims: SQLite's busy wait lets one
                            # lock-holder starve the rest when claims come back to back
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
            "SELECT owner, COUNT(*) FROM results GROUP BY owner")}
    assert sum(owners.values()) == 600


def test_plan_filters_claim_order_and_cache_preference(tmp_path):
    s = TaskStore(tmp_path / "todo.sqlite", create=True)
    s.add_tasks(_rows(20))
    s.conn.execute("UPDATE todolist SET cache = 'other.hdf5', ccd = 2 WHERE priority <= 5")
    assert s.plan(method="m", filters={"tmag_min": 9.05}) == 10      # priorities 11..20
    assert s.plan(method="m") == 10                                   # the rest
    tasks = s.claim("me", n=3)
    assert [t["priority"] for t in tasks] == [1, 2, 3]                # brightest first
    assert all(t["status"] == STARTED and t["attempts"] == 0 and t["method"] == "m"
               for t in tasks)
    assert tasks[0]["starid"] == 101 and tasks[0]["cache"] == "other.hdf5"
    tasks = s.claim("me", n=2, prefer_cache="sector0001_camera1_ccd1.hdf5")
    assert [t["priority"] for t in tasks] == [6, 7]                   # same CCD first
    s.plan(method="m", filters={"ccd": 2})
    assert [t["priority"] for t in s.claim("me", n=5)] == [4, 5]      # only the plan's tasks
    s.plan(method="m", filters={"starid": [119, 120]})
    assert [t["starid"] for t in s.claim("me", n=5)] == [119, 120]
    s.plan(policy=lambda task: "even" if task["starid"] % 2 == 0 else "odd",
           filters={"priority": [1, 2]})
    assert sorted(s.wanted_methods().items()) == [("even", 1), ("odd", 1)]
    s.close()


def test_claim_order_is_one_setting(store, monkeypatch):
    import photometry.data.taskstore as taskstore
    monkeypatch.setattr(taskstore, "CLAIM_ORDER", "r.priority DESC")
    assert [t["priority"] for t in store.claim("me", n=3)] == [20, 19, 18]  # in that order


def test_release_attempts_and_limit(store):
    task, = store.claim("me", n=1)
    store.release([(1, "m")], attempt_used=False, owner="me")
    task, = store.claim("me", n=1)
    assert task["priority"] == 1 and task["attempts"] == 0  # claimed, never started: free
    store.release([(1, "m")], attempt_used=True, max_attempts=2, message="worker died",
                  owner="me")
    task, = store.claim("me", n=1)
    assert task["attempts"] == 1
    store.release([(1, "m")], attempt_used=True, max_attempts=2, message="worker died",
                  owner="me")
    row = store.conn.execute("SELECT status, error, attempts FROM results WHERE priority = 1"
                             ).fetchone()
    assert row[0] == ERROR and "worker died" in row[1] and "attempt limit 2" in row[1]
    assert row[2] == 2


def test_dead_coordinators_tasks_requeued_uncharged(store):
    host = socket.gethostname()
    store.claim(f"{host}:{os.getpid()}", n=1)                 # alive owner, valid lease
    store.claim(f"{host}:999999999", n=1)                      # dead pid on this host
    store.claim("elsewhere:1", n=1, lease=-1)                  # other host, lease expired
    store.claim("elsewhere:2", n=1, lease=600)                 # other host, lease valid
    for _ in range(5):                                         # killed again and again
        assert store.requeue_stale() == 2
        assert status(store)[2] is None and status(store)[3] is None
        store.claim(f"{host}:999999999", n=2)
    assert store.requeue_stale() == 2
    assert {p: s for p, s in status(store).items() if p < 5} == {1: STARTED, 2: None,
                                                                  3: None, 4: STARTED}
    rows = dict(store.conn.execute("SELECT priority, attempts FROM results WHERE priority<5"))
    assert rows == {1: 0, 2: 0, 3: 0, 4: 0}                    # nothing charged, never ERROR
    assert store.conn.execute("SELECT interruptions FROM results WHERE priority = 2"
                              ).fetchone()[0] == 6
    store.heartbeat("elsewhere:2", lease=-1)
    assert store.requeue_stale() == 1


def test_results_diagnostics_and_stale_result_dropped(store, tmp_path):
    a, b = store.claim("me", n=2, output=tmp_path / "out")
    store.release([(b["priority"], "m")], attempt_used=True, max_attempts=3, message="x",
                  owner="me")
    store.claim("other", n=1)  # b is now someone else's
    stage = tmp_path / "stage_b"
    stage.mkdir()
    (stage / "b.txt").write_text("b")
    accepted = store.save_results([
        result(a["priority"], elaptime=1.5, lightcurve="a_lc.fits",
               details={"mean_flux": 1000.0, "rms_hour": float("nan"),
                        "stamp": [0, 15, 40, 55], "errors": ["w1"], "background": "local"}),
        result(b["priority"], lightcurve="b.txt", files=["b.txt"], staging=str(stage)),
    ], owner="me")
    assert accepted == {(a["priority"], "m"): OK}
    d = dict(next(store.db.query("SELECT * FROM diagnostics WHERE priority = ?",
                                 [a["priority"]])))
    assert d["method"] == "m" and d["mean_flux"] == 1000.0 and d["rms_hour"] is None
    assert (d["stamp_height"], d["stamp_width"]) == (15, 15)
    assert d["errors"] == "w1" and '"background": "local"' in d["details"]
    assert store.status_counts(method="m")["OK"] == 1          # b's stale result dropped
    store.apply_file_ops()
    assert not stage.exists()                                  # and its files discarded


def test_files_published_only_after_the_commit(store, tmp_path):
    out = tmp_path / "out"
    t, = store.claim("me", n=1, output=out)
    stage = tmp_path / "stage" / "1-m"
    (stage / "c1800").mkdir(parents=True)
    (stage / "c1800" / "lc.fits").write_text("light curve")
    store.save_results([result(1, lightcurve="c1800/lc.fits", files=["c1800/lc.fits"],
                               staging=str(stage))], owner="me")
    assert not (out / "c1800" / "lc.fits").exists()            # committed, not yet moved
    with TaskStore(store.path) as other:                       # (say we died here) ...
        assert other.apply_file_ops() == 2                     # ... the next run does it
    assert (out / "c1800" / "lc.fits").read_text() == "light curve" and not stage.exists()
    assert store.apply_file_ops() == 0


# ----------------------------------------------------------------------------- skips
def sequential(tasks, outcomes):
    """The reference: one worker, brightest first; a task held by a kept light curve never
    runs. ``outcomes[p] = (status, listed priorities)``. Returns ({priority: final status},
    the held ones)."""
    order = sorted(tasks, key=lambda p: (tasks[p], p))
    kept, final, held = set(), {}, set()
    for p in order:
        if any(p in outcomes[k][1] for k in kept):
            final[p] = SKIPPED
            held.add(p)
            continue
        raw, listed = outcomes[p]
        brighter = [q for q in listed if (tasks[q], q) < (tasks[p], p)]
        final[p] = SKIPPED if raw in (OK, WARNING) and brighter else raw
        if final[p] in (OK, WARNING):
            kept.add(p)
    return final, held


def random_outcomes(rng, tasks):
    """Random results: mostly OK, some WARNING/ERROR/ABORT, each listing 0-3 other tasks
    (fainter mostly, sometimes brighter); chains and cycles of holding appear."""
    out = {}
    for p in tasks:
        raw = rng.choices([OK, WARNING, ERROR, ABORT], weights=[70, 15, 10, 5])[0]
        k = rng.choices([0, 1, 2, 3], weights=[40, 30, 20, 10])[0]
        listed = rng.sample([q for q in tasks if q != p], k) if raw in (OK, WARNING) else []
        out[p] = (raw, listed)
    return out


def drive(store, tasks, outcomes, rng, out):
    """Claim random batches, finish them in random order and random commits, let workers
    die now and then; every result has a staged file. Returns the number of results run."""
    inflight, runs = [], 0
    while True:
        if rng.random() < 0.6:
            inflight += store.claim("me", n=rng.randint(1, 6), output=out)
        if not inflight:
            inflight += store.claim("me", n=rng.randint(1, 6), output=out)
            if not inflight:
                return runs
        rng.shuffle(inflight)
        k = rng.randint(1, len(inflight))
        done, inflight = inflight[:k], inflight[k:]
        batch = []
        for task in done:
            p = task["priority"]
            if rng.random() < 0.05:                          # its worker died mid-task
                store.release([(p, "m")], attempt_used=True, max_attempts=99, owner="me")
                continue
            raw, listed = outcomes[p]
            stage = out.parent / "stage" / f"{p}-{runs}"
            stage.mkdir(parents=True)
            (stage / f"{p}.lc").write_text(str(p))
            batch.append(result(p, raw, lightcurve=f"{p}.lc", files=[f"{p}.lc"],
                                staging=str(stage),
                                details={"skip_targets": [100 + q for q in listed]}))
            runs += 1
        store.save_results(batch, owner="me")
        store.apply_file_ops()


@pytest.mark.parametrize("seed", range(12))
def test_skips_do_not_depend_on_order(tmp_path, seed):
    """Random holding relations, random claim batches, completion orders, commit batches and
    worker deaths: the final statuses equal those of one worker going brightest first, and
    the published files are exactly the kept results'."""
    rng = random.Random(seed)
    n = 40
    rows = _rows(n)
    rng.shuffle(rows)
    for r in rows:                                       # ties in Tmag: TIC decides
        r["tmag"] = round(rng.uniform(8, 12), 1)
    tasks = {r["priority"]: r["tmag"] for r in rows}   # starid = 100 + priority: same ties
    outcomes = random_outcomes(rng, tasks)
    expected, held = sequential(tasks, outcomes)
    s = TaskStore(tmp_path / "todo.sqlite", create=True)
    s.add_tasks(rows)
    s.plan(method="m")
    out = tmp_path / "out"
    ran = drive(s, tasks, outcomes, rng, out)
    final = status(s)
    assert final == expected, {p: (final[p], expected[p]) for p in final
                               if final[p] != expected[p]}
    kept = {p for p, st in final.items() if st in (OK, WARNING)}
    assert sorted(f.name for f in out.glob("*.lc")) == sorted(f"{p}.lc" for p in kept)
    assert not list((tmp_path / "stage").iterdir())
    n_diag = s.conn.execute("SELECT COUNT(*) FROM diagnostics").fetchone()[0]
    assert n_diag == n - len(held)                # a held task's result is as if never run
    assert len(held) >= 1 and ran >= n - len(held)
    s.close()


def test_skip_rules_examples(store, tmp_path):
    out = tmp_path / "out"
    # task 3 finished first (a fainter one raced ahead of 1)
    store.claim("me", n=3, output=out)
    store.save_results([result(3)], owner="me")
    store.release([(2, "m")], owner="me")                     # 2 pending again
    store.save_results([result(1, details={"skip_targets": [102, 103]})], owner="me")
    assert {p: s for p, s in status(store).items() if p < 4} == {1: OK, 2: SKIPPED,
                                                                 3: SKIPPED}
    assert sorted(store.conn.execute("SELECT priority, skipped_by, own_aperture FROM "
                                     "photometry_skipped")) == [(2, 1, 0), (3, 1, 0)]
    # 3's result was withdrawn; a fainter target that holds a brighter one skips itself
    assert store.conn.execute("SELECT COUNT(*) FROM diagnostics WHERE priority = 3"
                              ).fetchone()[0] == 0
    store.claim("me", n=2, output=out)                        # 4 and 5
    store.save_results([result(5, details={"skip_targets": [104, 107]})], owner="me")
    assert status(store)[5] == SKIPPED
    assert (5, 4, 1) in list(store.conn.execute("SELECT priority, skipped_by, own_aperture "
                                                "FROM photometry_skipped"))
    assert status(store)[7] is None                          # a skipped one holds nothing
    # 4 finishes and holds 6 (pending) ...
    store.save_results([result(4, details={"skip_targets": [106]})], owner="me")
    assert status(store)[6] == SKIPPED
    # ... then --overwrite of 4 gives 6 back: decided again when 4 is done again
    store.plan(method="m", filters={"priority": [4]})
    assert store.reset("all") == 1
    assert status(store)[4] is None and status(store)[6] is None


def test_methods_side_by_side(store):
    store.claim("me", n=20)
    store.save_results([result(p) for p in range(1, 21)], owner="me")
    assert store.plan(method="m") == 0 and store.wanted_counts() == {"OK": 20}
    assert store.plan(method="other") == 20
    assert store.wanted_counts() == {"PENDING": 20}
    assert len(store.claim("me", n=50)) == 20
    assert store.reset("all") == 20                           # other's only
    assert store.status_counts(method="m") == {"OK": 20}
    store.plan(method="m")
    assert store.reset("all") == 20 and store.status_counts(method="m") == {"PENDING": 20}


def test_reset_modes(store):
    store.claim("me", n=3)
    store.save_results([result(1), result(2, ERROR)], owner="me")
    assert store.reset("pending") == 0
    assert store.reset("failed") == 1
    assert store.status_counts(method="m")["OK"] == 1
    assert store.reset("all") == 2                            # OK and the STARTED one
    assert store.conn.execute("SELECT COUNT(*) FROM diagnostics").fetchone()[0] == 0
    assert store.wanted_counts() == {"PENDING": 20}


# ----------------------------------------------------------------------------- files
def test_schema_version_and_reopen(tmp_path):
    path = tmp_path / "todo.sqlite"
    TaskStore(path, create=True).close()
    with TaskStore(path) as s:
        assert s.conn.execute("SELECT version FROM schema_version").fetchone()[0] \
            == SCHEMA_VERSION
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        s.conn.execute("UPDATE schema_version SET version = 999")
    with pytest.raises(InputError, match="newer"):
        TaskStore(path)
    with pytest.raises(InputError, match="no task database"):
        TaskStore(tmp_path / "missing.sqlite")


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"), (b"not a database at all" * 10, "not an SQLite file"),
    (None, "without a task list")])
def test_not_a_task_database(tmp_path, content, message):
    path = tmp_path / "todo.sqlite"
    if content is None:
        sqlite3.connect(path).execute("CREATE TABLE other (x)").connection.close()
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        TaskStore(path)
    assert path.stat().st_size == (len(content) if content is not None else path.stat().st_size)


def test_migration_from_version_1(tmp_path):
    """A version-1 file with results, a skip relation of each kind and a dead run's task."""
    path = tmp_path / "todo.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    import sqlite_utils
    MIGRATIONS[0](sqlite_utils.Database(conn))
    conn.execute("CREATE TABLE schema_version (version INTEGER)")
    conn.execute("INSERT INTO schema_version VALUES (1)")
    for r in _rows(6):
        r["status"] = {1: OK, 2: SKIPPED, 3: WARNING, 4: SKIPPED, 5: STARTED, 6: None}[
            r["priority"]]
        r["attempts"] = 1
        conn.execute(f"INSERT INTO todolist ({', '.join(map(repr, r))}) VALUES "
                     f"({', '.join('?' * len(r))})", list(r.values()))
    for p, lc in ((1, "c1800/a_lc.fits"), (3, "c1800/c_lc.fits"), (4, None)):
        conn.execute("INSERT INTO diagnostics (priority, lightcurve, method_used, elaptime, "
                     "mean_flux) VALUES (?, ?, 'aperture', 0.5, 99.0)", (p, lc))
    conn.execute("INSERT INTO photometry_skipped VALUES (2, 1)")  # 1's light curve held 2
    conn.execute("INSERT INTO photometry_skipped VALUES (4, 3)")  # 4's aperture held 3
    conn.close()
    with TaskStore(path) as s:
        assert s.conn.execute("SELECT version FROM schema_version").fetchone()[0] \
            == len(MIGRATIONS)
        rows = {p: (m, st, json.loads(f) if f else None) for p, m, st, f in s.conn.execute(
            "SELECT priority, method, status, files FROM results")}
        assert rows == {1: ("aperture", OK, ["c1800/a_lc.fits"]), 2: ("aperture", SKIPPED, None),
                        3: ("aperture", WARNING, ["c1800/c_lc.fits"]),
                        4: ("aperture", SKIPPED, None)}
        assert sorted(s.conn.execute("SELECT * FROM skip_targets")) == [
            (1, "aperture", 2), (4, "aperture", 3)]
        assert sorted(s.conn.execute("SELECT * FROM photometry_skipped")) == [
            (2, "aperture", 1, 0), (4, "aperture", 3, 1)]
        d = s.conn.execute("SELECT method, mean_flux FROM diagnostics WHERE priority = 1"
                           ).fetchone()
        assert d == ("aperture", 99.0)
        diag_cols = {c[1] for c in s.conn.execute("PRAGMA table_info(diagnostics)")}
        assert {"qc_status", "qc_codes"} <= diag_cols       # _m003_check_codes after it
        cols = [c[1] for c in s.conn.execute("PRAGMA table_info(todolist)")]
        assert "status" not in cols and "attempts" not in cols and "cache" in cols
        assert "crowding" in cols   # migration 4: NULL for tasks made before it
        s.plan(method="aperture")
        assert s.wanted_counts() == {"OK": 1, "SKIPPED": 2, "WARNING": 1, "PENDING": 2}
