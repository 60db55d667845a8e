"""The task database ``todo.sqlite``: schema, migrations, atomic claims, leases and results.

Why a database and not a queue: the task list must survive any crash of any process, be shared
by several coordinators (two ``tessphot run`` on one machine, or one per cluster node) and be
queried afterwards (``tessphot status``, downstream corrections). SQLite in WAL mode with a busy
timeout gives that with one file: readers never block, writers queue behind one another.

Concurrency rules (see ``docs/scheduler.md``):

- Every write runs in ``BEGIN IMMEDIATE`` (:meth:`TaskStore.transaction`), which takes the write
  lock up front and waits for it through the busy handler. A deferred transaction that upgrades
  from read to write can fail at once with "database is locked" (SQLITE_BUSY_SNAPSHOT) instead of
  waiting, so we never use one for writing.
- A claim is one ``UPDATE ... RETURNING`` inside such a transaction: a task goes from pending
  (status NULL) to STARTED with an owner and a lease; two claimers can never get the same task.
- The owner renews its leases (:meth:`TaskStore.heartbeat`). A task whose lease expired, or whose
  owner process on this host no longer exists, is put back to pending by
  :meth:`TaskStore.requeue_stale`; its attempt counter says how often it was tried.
- A finished status (OK, ERROR, WARNING, ABORT, SKIPPED) is written once; a later skip from
  another target never overwrites it.

Status codes are the TASOC ones (``photometry.base.STATUS``): NULL = pending, 1 OK, 2 ERROR,
3 WARNING, 4 ABORT, 5 SKIPPED, 6 STARTED.
"""
import contextlib
import json
import logging
import os
import socket
import sqlite3
import time
from pathlib import Path

from .errors import InputError

__all__ = ["TaskStore", "STATUS_NAMES", "FINAL", "FAILED", "owner_id", "DIAGNOSTIC_COLUMNS",
           "TODO_NAME"]

#: file name of the task database in the cache folder
TODO_NAME = "todo.sqlite"

logger = logging.getLogger(__name__)

#: status code -> name (the values of ``photometry.base.STATUS``; repeated here so that the
#: task store can be used and inspected without importing the photometry core)
STATUS_NAMES = {0: "UNKNOWN", 1: "OK", 2: "ERROR", 3: "WARNING", 4: "ABORT", 5: "SKIPPED",
                6: "STARTED"}
STATUS_CODES = {name: code for code, name in STATUS_NAMES.items()}
OK, ERROR, WARNING, ABORT, SKIPPED, STARTED = 1, 2, 3, 4, 5, 6
#: statuses that end a task
FINAL = (OK, ERROR, WARNING, ABORT, SKIPPED)
#: final statuses that count as a failure for the exit code
FAILED = (ERROR, ABORT)

#: numeric per-task metrics stored as columns of ``diagnostics`` (TASOC names); any other key of
#: ``details['metrics']`` goes to its ``details`` JSON column
DIAGNOSTIC_COLUMNS = {
    "mean_flux": float, "variance": float, "variability": float, "rms_hour": float,
    "ptp": float, "pos_row": float, "pos_column": float, "contamination": float,
    "mask_size": int, "edge_flux": float, "stamp_width": int, "stamp_height": int,
    "stamp_resizes": int,
}

#: task columns added by migrations after the first (optional in :meth:`TaskStore.add_tasks`)
LATER_COLUMNS = ("crowding",)

TODO_COLUMNS = ["priority", "starid", "sector", "camera", "ccd", "cadence", "datasource", "tmag",
                "method", "row", "column", "edge_distance", "stamp_rows", "stamp_cols", "cache",
                "crowding"]


def owner_id():
    """``host:pid``: who holds a lease; the pid lets a restarted run on the same host see at
    once that the owner of a STARTED task is dead instead of waiting for the lease to expire."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner):
    host, _, pid = (owner or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another host: only its lease can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- migrations
# An ordered list of functions; ``schema_version`` holds how many were applied. A migration is
# never edited once released: changes are new entries at the end.

def _m001_initial(db):
    db["todolist"].create({
        "priority": int, "starid": int, "sector": int, "camera": int, "ccd": int,
        "cadence": int, "datasource": str, "tmag": float, "method": str, "status": int,
        "row": float, "column": float, "edge_distance": float, "stamp_rows": int,
        "stamp_cols": int, "cache": str,
        # scheduler state
        "attempts": int, "owner": str, "worker": str, "lease_expires": float,
        "started_at": float, "finished_at": float, "error": str,
    }, pk="priority", not_null={"starid", "sector", "camera", "ccd", "cadence", "datasource",
                                "tmag", "attempts"},
        defaults={"datasource": "ffi", "attempts": 0})
    db["todolist"].create_index(["starid", "datasource", "sector", "camera", "ccd", "cadence"],
                                unique=True, index_name="todolist_unique_idx")
    db["todolist"].create_index(["status", "priority"], index_name="status_idx")
    db["todolist"].create_index(["status", "cache", "priority"], index_name="status_cache_idx")
    db["todolist"].create_index(["starid"], index_name="starid_idx")
    db["diagnostics"].create({
        "priority": int, "lightcurve": str, "method_used": str, "elaptime": float,
        "worker_wait_time": float, **DIAGNOSTIC_COLUMNS, "errors": str, "details": str,
    }, pk="priority", not_null={"method_used", "elaptime"},
        foreign_keys=[("priority", "todolist", "priority")])
    db["diagnostics"].create_index(["lightcurve"], unique=True, index_name="diagnostics_lc_idx")
    db["photometry_skipped"].create({"priority": int, "skipped_by": int},
                                    pk=("priority", "skipped_by"),
                                    foreign_keys=[("priority", "todolist", "priority"),
                                                  ("skipped_by", "todolist", "priority")])
    db["photometry_skipped"].create_index(["skipped_by"])
    db["runs"].create({
        "run_id": int, "owner": str, "backend": str, "workers": int, "command": str,
        "started_at": float, "finished_at": float, "tasks_done": int, "counts": str,
        "interrupted": int,
    }, pk="run_id")


def _m002_crowding(db):
    """Per-target crowding (photometry/crowding.py) for the method policy (issue 16)."""
    db["todolist"].add_column("crowding", float)


MIGRATIONS = [_m001_initial, _m002_crowding]
SCHEMA_VERSION = len(MIGRATIONS)


class TaskStore:
    """One connection to ``todo.sqlite``; every method is safe to call from many processes.

    Parameters
    ----------
    path : path-like
        The database file; created (with the current schema) if missing and ``create``.
    busy_timeout : float
        Seconds a writer waits for the lock before "database is locked"; generous because a
        waiting writer costs nothing and a failing one loses a result.
    create : bool
        Allow creating a new file (``tessphot todo``); other commands need an existing one.
    """

    def __init__(self, path, busy_timeout=60.0, create=False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise InputError(f"{self.path}: no task database (run 'tessphot todo' first)")
        conn = sqlite3.connect(str(self.path), timeout=busy_timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise InputError(f"{self.path}: not a task database ({exc})") from None
        self.conn = conn
        self._db = None
        self.migrate()

    @property
    def db(self):
        """A ``sqlite_utils.Database`` on the same connection, made on first use: importing
        sqlite_utils pulls in pandas (about a second per process), which every worker and
        ``status`` would pay for nothing."""
        if self._db is None:
            import sqlite_utils
            self._db = sqlite_utils.Database(self.conn)
        return self._db

    # ------------------------------------------------------------------ basics
    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def transaction(self):
        """``BEGIN IMMEDIATE`` ... ``COMMIT``: the write lock is taken first, waiting for it."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def migrate(self):
        """Apply the migrations not yet applied, all in one transaction."""
        with self.transaction():
            self.conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
            row = self.conn.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise InputError(f"{self.path}: schema version {version} is newer than this "
                                 f"tessphot ({SCHEMA_VERSION}); upgrade tessphot")
            for migration in MIGRATIONS[version:]:
                logger.info("%s: applying migration %s", self.path, migration.__name__)
                migration(self.db)
            if row is None:
                self.conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif version != SCHEMA_VERSION:
                self.conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    # ------------------------------------------------------------------ filling
    def add_tasks(self, rows, as_tuples=False, bulk=False, constants=None):
        """Insert task rows (dicts with :data:`TODO_COLUMNS`, or tuples in that order if
        ``as_tuples``) in one transaction; ``constants`` and ``bulk`` as in
        :meth:`add_task_groups`."""
        constants = dict(constants or {})
        if not as_tuples:
            columns = [c for c in TODO_COLUMNS if c not in constants]
            # a column added by a later migration may be absent (NULL)
            rows = ([r[c] if c not in LATER_COLUMNS else r.get(c) for c in columns]
                    for r in rows)
        self.add_task_groups([(constants, rows)], bulk=bulk)

    def add_task_groups(self, groups, bulk=False):
        """Insert groups of task tuples in one transaction.

        ``groups``: ``(constants, rows)`` pairs. ``constants`` is ``{column: value}`` for the
        columns that are the same for the whole group (a CCD's sector, camera, cache...); the
        tuples of ``rows`` hold the remaining :data:`TODO_COLUMNS` in their order. Constants
        are written as SQL literals: binding a parameter costs about as much per value as
        everything else, so this halves the time of a 200 000-row insert.
        ``bulk``: drop the todolist indexes for the insert and rebuild them afterwards (same
        transaction, same definitions): sorting once is several times faster than updating
        four B-trees row by row (``tessphot todo`` on a full CCD).
        """
        with self.transaction():
            indexes = []
            if bulk:
                indexes = self.conn.execute(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND "
                    "tbl_name = 'todolist' AND sql IS NOT NULL").fetchall()
                for name, _ in indexes:
                    self.conn.execute(f"DROP INDEX {_q(name)}")
            for constants, rows in groups:
                columns = [c for c in TODO_COLUMNS if c not in constants]
                values = ["?"] * len(columns) + [_literal(v) for v in constants.values()]
                self.conn.executemany(
                    f"INSERT INTO todolist ({', '.join(map(_q, columns + list(constants)))}) "
                    f"VALUES ({', '.join(values)})", rows)
            for _, create in indexes:
                self.conn.execute(create)

    # ------------------------------------------------------------------ filters
    @staticmethod
    def where(starid=None, tmag_min=None, tmag_max=None, camera=None, ccd=None, sector=None,
              cache=None, priority=None):
        """SQL condition and parameters for the run filters (None = no constraint)."""
        clauses, params = [], []
        for column, value in (("starid", starid), ("camera", camera), ("ccd", ccd),
                              ("sector", sector), ("cache", cache), ("priority", priority)):
            if value is None:
                continue
            values = list(value) if isinstance(value, (list, tuple, set)) else [value]
            clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
            params.extend(values)
        if tmag_min is not None:
            clauses.append("tmag >= ?")
            params.append(tmag_min)
        if tmag_max is not None:
            clauses.append("tmag <= ?")
            params.append(tmag_max)
        return (" AND ".join(clauses) or "1"), params

    # ------------------------------------------------------------------ run start
    def reset(self, mode="pending", filters=None):
        """Put tasks back to pending before a run; returns how many.

        ``mode``: "pending" (nothing), "failed" (ERROR and ABORT again), "all" (every task
        matching the filters: the ``--overwrite`` mode; their results and skip records go).
        """
        cond, params = self.where(**(filters or {}))
        if mode == "pending":
            return 0
        statuses = {"failed": FAILED, "all": FINAL + (STARTED,)}[mode]
        sel = (f"status IN ({', '.join(map(str, statuses))}) AND ({cond})")
        with self.transaction():
            ids = f"SELECT priority FROM todolist WHERE {sel}"
            self.conn.execute(f"DELETE FROM diagnostics WHERE priority IN ({ids})", params)
            self.conn.execute(f"DELETE FROM photometry_skipped WHERE priority IN ({ids}) "
                              f"OR skipped_by IN ({ids})", params + params)
            cur = self.conn.execute(
                f"UPDATE todolist SET status = NULL, attempts = 0, owner = NULL, worker = NULL, "
                f"lease_expires = NULL, started_at = NULL, finished_at = NULL, error = NULL "
                f"WHERE {sel}", params)
        return cur.rowcount

    def requeue_stale(self, max_attempts, now=None):
        """Tasks STARTED by an owner that is gone (lease expired, or a dead pid on this host)
        go back to pending, or to ERROR once they used ``max_attempts``. Returns the count."""
        now = time.time() if now is None else now
        rows = self.conn.execute(
            "SELECT priority, owner, lease_expires, attempts FROM todolist "
            "WHERE status = ?", (STARTED,)).fetchall()
        stale = [(p, a) for p, owner, lease, a in rows
                 if (lease is not None and lease < now) or not _owner_alive(owner)]
        if stale:
            self.release([p for p, _ in stale], attempt_used=True, max_attempts=max_attempts,
                         message="owner process died or lost its lease", only_started=True)
        return len(stale)

    # ------------------------------------------------------------------ claims
    def claim(self, owner, n=1, lease=600.0, filters=None, prefer_cache=None, method=None,
              worker=None):
        """Atomically take up to ``n`` pending tasks (brightest first) for ``owner``.

        ``prefer_cache`` keeps a worker on the CCD whose cache it has open: tasks of that cache
        come first, the rest of the list only when it has none left.
        """
        cond, params = self.where(**(filters or {}))
        now = time.time()
        claimed = []
        with self.transaction():
            for extra, extra_params in ((("cache = ?", [prefer_cache]),) if prefer_cache
                                        else ()) + (("1", []),):
                need = n - len(claimed)
                if need <= 0:
                    break
                cur = self.conn.execute(
                    "UPDATE todolist SET status = ?, owner = ?, worker = ?, lease_expires = ?, "
                    "started_at = ?, attempts = attempts + 1 WHERE priority IN ("
                    f"SELECT priority FROM todolist WHERE status IS NULL AND ({cond}) "
                    f"AND {extra} ORDER BY priority LIMIT ?) RETURNING *",
                    [STARTED, owner, worker, now + lease, now] + params + extra_params + [need])
                cols = [d[0] for d in cur.description]
                claimed.extend(dict(zip(cols, row)) for row in cur.fetchall())
        claimed.sort(key=lambda t: (t["cache"] or "", t["priority"]))
        if method:
            for task in claimed:
                task["method"] = method
        return claimed

    def heartbeat(self, owner, lease=600.0, priorities=None):
        """Extend the leases of the owner's running tasks (all of them, or ``priorities``)."""
        sql = "UPDATE todolist SET lease_expires = ? WHERE status = ? AND owner = ?"
        params = [time.time() + lease, STARTED, owner]
        if priorities is not None:
            if not priorities:
                return 0
            sql += f" AND priority IN ({', '.join('?' * len(priorities))})"
            params += list(priorities)
        with self.transaction():
            return self.conn.execute(sql, params).rowcount

    def release(self, priorities, attempt_used=False, max_attempts=None, message=None,
                owner=None, only_started=True):
        """Give tasks back: pending again, or ERROR with ``message`` once out of attempts.

        ``attempt_used=False`` is for tasks that were claimed but never started (their attempt
        is given back); ``True`` for a task that was running when its worker died or timed out.
        """
        if not priorities:
            return
        now = time.time()
        with self.transaction():
            for chunk in _chunks(list(priorities), 500):
                marks = ", ".join("?" * len(chunk))
                cond = f"priority IN ({marks})"
                params = list(chunk)
                if only_started:
                    cond += f" AND status = {STARTED}"
                if owner is not None:
                    cond += " AND owner = ?"
                    params.append(owner)
                if not attempt_used:
                    self.conn.execute(
                        "UPDATE todolist SET status = NULL, owner = NULL, worker = NULL, "
                        "lease_expires = NULL, attempts = MAX(attempts - 1, 0) "
                        f"WHERE {cond}", params)
                    continue
                if max_attempts is not None:
                    self.conn.execute(
                        "UPDATE todolist SET status = ?, finished_at = ?, lease_expires = NULL, "
                        f"error = ? WHERE {cond} AND attempts >= ?",
                        [ERROR, now, f"{message} (attempt limit {max_attempts} reached)"]
                        + params + [max_attempts])
                self.conn.execute(
                    "UPDATE todolist SET status = NULL, owner = NULL, worker = NULL, "
                    f"lease_expires = NULL, error = ? WHERE {cond}", [message] + params)

    # ------------------------------------------------------------------ results
    def save_results(self, results, owner=None):
        """Write a batch of results in one transaction; returns the light-curve files that
        must be deleted (tasks that ended SKIPPED).

        Each result: ``priority``, ``status`` (int), ``method_used``, ``elaptime``,
        ``worker_wait_time``, ``lightcurve`` (path relative to the output folder or None),
        ``details`` (dict with optional ``errors``, ``skip_targets``, ``metrics``,
        ``stamp``...). A result for a task that is no longer STARTED by ``owner`` (it was
        re-queued after a lease expiry and finished by someone else) is dropped.

        Why batched statements: the coordinator is the one serial part of a run, and three
        statements per result were most of its time; now a batch costs one ``SELECT`` per
        500 tasks and two ``executemany`` (the skip rules, rare, still go row by row).
        """
        results = list(results)
        orphans = []
        if not results:
            return orphans
        now = time.time()
        names = ("status", "owner", "starid", "sector", "camera", "ccd", "cadence",
                 "datasource", "tmag")
        diagnostics, updates, seen = [], [], set()
        with self.transaction():
            tasks = {}
            for chunk in _chunks(sorted({int(r["priority"]) for r in results}), 500):
                for row in self.conn.execute(
                        f"SELECT priority, {', '.join(names)} FROM todolist WHERE priority "
                        f"IN ({', '.join('?' * len(chunk))})", chunk):
                    tasks[row[0]] = dict(zip(names, row[1:]))
            for res in results:
                priority = int(res["priority"])
                task = tasks.get(priority)
                if (task is None or task["status"] != STARTED or priority in seen
                        or (owner is not None and task["owner"] != owner)):
                    logger.warning("task %s: result dropped (task no longer ours)", priority)
                    if res.get("lightcurve") and task is not None and task["status"] == SKIPPED:
                        orphans.append(res["lightcurve"])
                    continue
                seen.add(priority)
                status = int(res["status"])
                details = dict(res.get("details") or {})
                errors = list(details.get("errors") or [])
                if details.get("skip_targets"):
                    status, skip_errors = self._apply_skips(priority, task, status,
                                                            details["skip_targets"])
                    errors.extend(skip_errors)
                lightcurve = res.get("lightcurve")
                if status == SKIPPED and lightcurve:
                    orphans.append(lightcurve)
                    lightcurve = None
                diagnostics.append(_diagnostics_row(priority, res, details, errors, lightcurve))
                message = errors[-1] if (errors and status in FAILED) else None
                updates.append((status, now, message, priority))
            self.conn.executemany(_DIAGNOSTICS_SQL, diagnostics)
            self.conn.executemany(
                "UPDATE todolist SET status = ?, finished_at = ?, lease_expires = NULL, "
                "error = ? WHERE priority = ?", updates)
        return orphans

    def _apply_skips(self, priority, task, status, skip_targets):
        """TASOC skip rules: the brightest of a blended group is kept, the others are SKIPPED.
        Only pending tasks are skipped by another target; a finished one is never changed."""
        starids = sorted({int(s) for s in skip_targets} - {task["starid"]})
        if not starids:
            return status, []
        marks = ", ".join("?" * len(starids))
        others = self.conn.execute(
            f"SELECT priority, tmag, status FROM todolist WHERE starid IN ({marks}) AND "
            "sector = ? AND camera = ? AND ccd = ? AND cadence = ? AND datasource = ?",
            starids + [task["sector"], task["camera"], task["ccd"], task["cadence"],
                       task["datasource"]]).fetchall()
        if not others:
            return status, [f"skip_targets {starids}: not in the task list"]
        if all(task["tmag"] < tmag for _, tmag, _ in others):
            self.conn.execute("DELETE FROM photometry_skipped WHERE skipped_by = ?", (priority,))
            for other, _, other_status in others:
                if other_status is None:
                    self.conn.execute("UPDATE todolist SET status = ?, finished_at = ? "
                                      "WHERE priority = ? AND status IS NULL",
                                      (SKIPPED, time.time(), other))
                    self.conn.execute("INSERT OR IGNORE INTO photometry_skipped VALUES (?, ?)",
                                      (other, priority))
            return status, []
        brightest = min(others, key=lambda o: (o[1], o[0]))[0]
        self.conn.execute("INSERT OR IGNORE INTO photometry_skipped VALUES (?, ?)",
                          (priority, brightest))
        return SKIPPED, []

    # ------------------------------------------------------------------ runs
    def start_run(self, owner, backend, workers, command):
        with self.transaction():
            cur = self.conn.execute(
                "INSERT INTO runs (owner, backend, workers, command, started_at, tasks_done, "
                "interrupted) VALUES (?, ?, ?, ?, ?, 0, 0)",
                (owner, backend, workers, command, time.time()))
            return cur.lastrowid

    def finish_run(self, run_id, tasks_done, counts, interrupted=False):
        with self.transaction():
            self.conn.execute(
                "UPDATE runs SET finished_at = ?, tasks_done = ?, counts = ?, interrupted = ? "
                "WHERE run_id = ?",
                (time.time(), tasks_done, json.dumps(counts), int(interrupted), run_id))

    # ------------------------------------------------------------------ queries
    def count(self, filters=None, pending_only=False):
        cond, params = self.where(**(filters or {}))
        if pending_only:
            cond += " AND status IS NULL"
        return self.conn.execute(f"SELECT COUNT(*) FROM todolist WHERE {cond}",
                                 params).fetchone()[0]

    def count_status(self, statuses, filters=None):
        """How many tasks matching ``filters`` have one of ``statuses``."""
        cond, params = self.where(**(filters or {}))
        marks = ", ".join("?" * len(statuses))
        return self.conn.execute(f"SELECT COUNT(*) FROM todolist WHERE status IN ({marks}) "
                                 f"AND ({cond})", list(statuses) + params).fetchone()[0]

    def status_counts(self, filters=None):
        """``{status name: count}``, pending tasks under "PENDING"."""
        cond, params = self.where(**(filters or {}))
        out = {}
        for status, n in self.conn.execute(
                f"SELECT status, COUNT(*) FROM todolist WHERE {cond} GROUP BY status", params):
            out["PENDING" if status is None else STATUS_NAMES.get(status, str(status))] = n
        return out


def _q(name):
    return f'"{name}"'


_DIAGNOSTICS_COLUMNS = ["priority", "lightcurve", "method_used", "elaptime", "worker_wait_time",
                        *DIAGNOSTIC_COLUMNS, "errors", "details"]
_DIAGNOSTICS_SQL = (f"INSERT OR REPLACE INTO diagnostics "
                    f"({', '.join(map(_q, _DIAGNOSTICS_COLUMNS))}) "
                    f"VALUES ({', '.join('?' * len(_DIAGNOSTICS_COLUMNS))})")
_DETAILS_NOT_EXTRA = frozenset(("errors", "metrics", "skip_targets", "stamp",
                                "filepath_lightcurve"))


def _diagnostics_row(priority, res, details, errors, lightcurve):
    """One ``diagnostics`` row (tuple in :data:`_DIAGNOSTICS_COLUMNS` order): the TASOC
    metric columns from ``details`` and ``details['metrics']``, anything else as JSON."""
    metrics = {k: v for k, v in details.items() if k in DIAGNOSTIC_COLUMNS}
    metrics.update(details.get("metrics") or {})
    stamp = details.get("stamp")
    if stamp and len(stamp) == 4:
        metrics.setdefault("stamp_height", int(stamp[1]) - int(stamp[0]))
        metrics.setdefault("stamp_width", int(stamp[3]) - int(stamp[2]))
    if "stamp_resizes" in details:
        metrics.setdefault("stamp_resizes", details["stamp_resizes"])
    extra = {}
    values = dict.fromkeys(DIAGNOSTIC_COLUMNS)
    for key, value in metrics.items():
        if key in DIAGNOSTIC_COLUMNS:
            values[key] = _number(value, DIAGNOSTIC_COLUMNS[key])
        else:
            extra[key] = value
    for key, value in details.items():
        if key not in DIAGNOSTIC_COLUMNS and key not in _DETAILS_NOT_EXTRA:
            extra[key] = value
    return (priority, lightcurve, res.get("method_used") or "unknown",
            float(res.get("elaptime") or 0.0), res.get("worker_wait_time"),
            *values.values(), "\n".join(str(e) for e in errors) or None,
            json.dumps(extra, default=_json_default) if extra else None)


def _literal(value):
    """An SQL literal for :meth:`TaskStore.add_tasks` constants (never user SQL)."""
    if value is None:
        return "NULL"
    if isinstance(value, (bool, int)):
        return str(int(value))
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else "NULL"
    if hasattr(value, "item"):  # numpy scalar
        return _literal(value.item())
    return "'" + str(value).replace("'", "''") + "'"


def _chunks(seq, size):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def _number(value, kind):
    try:
        value = kind(value)
    except (TypeError, ValueError):
        return None
    return None if value != value else value  # NaN -> NULL


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "name"):
        return value.name
    return str(value)
