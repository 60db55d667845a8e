"""The task database ``todo.sqlite``: schema, migrations, atomic claims, leases and results.

Why a database and not a queue: the task list must survive any crash of any process, be shared
by several coordinators (two ``tessphot run`` on one machine, or one per cluster node) and be
queried afterwards (``tessphot status``, downstream corrections). SQLite in WAL mode with a busy
timeout gives that with one file: readers never block, writers queue behind one another.

Tables (``docs/scheduler.md`` has every column): ``todolist`` holds the targets (one row per
star and CCD, built by ``tessphot todo``); ``results`` one row per (task, method), so several
methods' results live side by side; ``diagnostics`` the TASOC metrics of each result;
``skip_targets`` which tasks each kept light curve (or a skipped target's own aperture) holds;
``file_ops`` the output files still to be published or deleted; ``runs`` one row per run.

Concurrency rules:

- Every write runs in ``BEGIN IMMEDIATE`` (:meth:`TaskStore.transaction`), which takes the write
  lock up front and waits for it through the busy handler. A deferred transaction that upgrades
  from read to write can fail at once with "database is locked" (SQLITE_BUSY_SNAPSHOT) instead of
  waiting, so we never use one for writing.
- A claim is one ``UPDATE ... RETURNING`` inside such a transaction: a result row goes from
  pending (status NULL) to STARTED with an owner and a lease; two claimers never get the same.
- Attempts count what the scheduler saw happen to the task: its worker died while running it,
  or it ran past its timeout (:meth:`TaskStore.release`). A task that was only claimed, or
  whose coordinator died (:meth:`TaskStore.requeue_stale`), is put back uncharged: that says
  nothing about the task (``interruptions`` counts it).
- Skips are decided so that the final set of light curves does not depend on the worker count
  or the order results arrive (:meth:`TaskStore.save_results`, "Skips" in the docs).

Status codes are the TASOC ones (``photometry.core.base.STATUS``): NULL = pending, 1 OK, 2 ERROR,
3 WARNING, 4 ABORT, 5 SKIPPED, 6 STARTED.
"""
import collections
import contextlib
import json
import logging
import os
import shutil
import socket
import sqlite3
import time
from pathlib import Path

from photometry.hooks.errors import InputError

__all__ = ["TaskStore", "TaskQueries", "STATUS_NAMES", "status_name", "FINAL", "FAILED", "KEPT",
           "owner_id", "DIAGNOSTIC_COLUMNS", "TODO_NAME", "CLAIM_ORDER", "MIGRATIONS"]

#: file name of the task database in the cache folder
TODO_NAME = "todo.sqlite"

logger = logging.getLogger(__name__)

#: status code -> name (the values of ``photometry.core.base.STATUS``; repeated here so that the
#: task store can be used and inspected without importing the photometry core)
STATUS_NAMES = {0: "UNKNOWN", 1: "OK", 2: "ERROR", 3: "WARNING", 4: "ABORT", 5: "SKIPPED",
                6: "STARTED"}
STATUS_CODES = {name: code for code, name in STATUS_NAMES.items()}


def status_name(code):
    """The name of a result's status code; "PENDING" for a result not yet run (NULL)."""
    return "PENDING" if code is None else STATUS_NAMES.get(code, str(code))

OK, ERROR, WARNING, ABORT, SKIPPED, STARTED = 1, 2, 3, 4, 5, 6
#: statuses that end a task
FINAL = (OK, ERROR, WARNING, ABORT, SKIPPED)
#: final statuses that count as a failure for the exit code
FAILED = (ERROR, ABORT)
#: statuses whose light curve is kept (and whose skip_targets skip fainter tasks)
KEPT = (OK, WARNING)

#: Height in CCD rows of the bands of :data:`CLAIM_ORDER`.
CLAIM_BAND_ROWS = 32

#: The order in which pending tasks are claimed: an SQL ORDER BY expression over the
#: ``results`` row ``r`` and its ``todolist`` row ``t``. The one place it is defined (the
#: results do not depend on it; the tests change it to prove that). By position: bands of
#: :data:`CLAIM_BAND_ROWS` rows, by column within a band (then brightest first), so the
#: targets a worker gets one after the other share the blocks of its stamp cache
#: (:mod:`photometry.data.stampcache`); brightest first (``r.priority``) read every stamp's
#: chunks anew from anywhere on the CCD.
CLAIM_ORDER = (f'CAST(t."row" / {CLAIM_BAND_ROWS} AS INTEGER), t."column", r.priority')

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

#: columns of todolist that say which tasks may skip one another (one CCD, cadence, source)
_GROUP = ("sector", "camera", "ccd", "cadence", "datasource")


def owner_id():
    """``host:pid``: who holds a lease; the pid lets a restarted run on the same host see at
    once that the owner of a STARTED task is dead instead of waiting for the lease to expire."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner):
    """False only if ``owner`` (``host:pid``) is a process of this host that no longer exists."""
    host, _, pid = (owner or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another host: only its lease can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped: common for orphans in containers) is dead
        with open(f"/proc/{int(pid)}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


# --------------------------------------------------------------------------- migrations
# An ordered list of functions; ``schema_version`` holds how many were applied. A migration is
# never edited once released: changes are new entries at the end (several engineers may add
# one in the same release: keep the list ordered, each migration self-contained).

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


def _m002_results_per_method(db):
    """Results keyed by (task, method), so that several methods' results live side by side.

    Version 1 kept one status per task in ``todolist``: ``run --method linpsf`` after an
    aperture run had nothing to do, and ``--overwrite`` replaced aperture's results. Here the
    scheduler state moves to ``results`` (priority, method), ``diagnostics`` is keyed the same
    way (its ``method_used`` becomes ``method``, every other column kept, including columns a
    later migration added), the skip relations become ``skip_targets`` (what each light curve
    holds; ``photometry_skipped`` is now a view derived from it) and ``file_ops`` makes output
    files follow the database (published after the commit that accepts their result).

    Version-1 results keep their status and diagnostics under the method that produced them;
    tasks STARTED by a dead run become pending; a SKIPPED task takes its skipper's method.
    Their output folder was not recorded, so a later decision about them cannot delete their
    old file (``results.output`` is NULL).
    """
    ex = db.execute
    ex("""CREATE TABLE results (
            priority INTEGER NOT NULL REFERENCES todolist(priority),
            method TEXT NOT NULL,
            status INTEGER,
            attempts INTEGER NOT NULL DEFAULT 0,
            interruptions INTEGER NOT NULL DEFAULT 0,
            owner TEXT, worker TEXT, lease_expires REAL, claimed_at REAL, finished_at REAL,
            error TEXT, output TEXT, files TEXT,
            PRIMARY KEY (priority, method))""")
    ex("CREATE INDEX results_status_idx ON results (status, priority)")
    # v1 diagnostics -> method of each finished result
    ex("""INSERT INTO results (priority, method, status, attempts, owner, worker,
                                claimed_at, finished_at, error, files)
          SELECT t.priority, COALESCE(d.method_used, t.method), t.status, t.attempts, t.owner,
                 t.worker, t.started_at, t.finished_at, t.error,
                 CASE WHEN d.lightcurve IS NULL THEN NULL ELSE json_array(d.lightcurve) END
          FROM todolist t LEFT JOIN diagnostics d USING (priority)
          WHERE t.status IN (1, 2, 3, 4, 5) AND COALESCE(d.method_used, t.method) IS NOT NULL""")
    ex("""INSERT OR IGNORE INTO results (priority, method, status, attempts, finished_at)
          SELECT t.priority, d.method_used, t.status, t.attempts, t.finished_at
          FROM todolist t JOIN photometry_skipped s USING (priority)
          JOIN diagnostics d ON d.priority = s.skipped_by
          WHERE t.status = 5 AND NOT EXISTS (SELECT 1 FROM diagnostics x
                                              WHERE x.priority = t.priority)""")
    # skip relations: a row (a, b) of v1 means "a was skipped by b" (b the brighter); a had no
    # diagnostics if b's light curve held it, a had its own if a's aperture held b
    ex("""CREATE TABLE skip_targets (priority INTEGER NOT NULL, method TEXT NOT NULL,
                                     target INTEGER NOT NULL,
                                     PRIMARY KEY (priority, method, target))""")
    ex("CREATE INDEX skip_targets_target_idx ON skip_targets (target, method)")
    ex("""INSERT OR IGNORE INTO skip_targets
          SELECT CASE WHEN own.priority IS NULL THEN s.skipped_by ELSE s.priority END,
                 r.method,
                 CASE WHEN own.priority IS NULL THEN s.priority ELSE s.skipped_by END
          FROM photometry_skipped s JOIN results r ON r.priority = s.priority
          LEFT JOIN diagnostics own ON own.priority = s.priority""")
    # diagnostics keyed by (priority, method), all other columns kept
    cols = [row[1] for row in ex("PRAGMA table_info(diagnostics)").fetchall()]
    keep = [c for c in cols if c not in ("priority", "method_used")]
    decl = {row[1]: row[2] for row in ex("PRAGMA table_info(diagnostics)").fetchall()}
    body = ", ".join(f'"{c}" {decl[c]}' for c in keep)
    ex(f"""CREATE TABLE diagnostics_v2 (priority INTEGER NOT NULL, method TEXT NOT NULL,
                                        {body}, PRIMARY KEY (priority, method),
                                        FOREIGN KEY (priority, method)
                                        REFERENCES results (priority, method))""")
    quoted = ", ".join(f'"{c}"' for c in keep)
    ex(f"""INSERT INTO diagnostics_v2 (priority, method, {quoted})
           SELECT d.priority, d.method_used, {', '.join(f'd."{c}"' for c in keep)}
           FROM diagnostics d JOIN results r
           ON r.priority = d.priority AND r.method = d.method_used""")
    ex("DROP TABLE diagnostics")
    ex("ALTER TABLE diagnostics_v2 RENAME TO diagnostics")
    ex("CREATE INDEX diagnostics_lc_idx ON diagnostics (lightcurve)")
    ex("DROP TABLE photometry_skipped")
    ex("""CREATE VIEW photometry_skipped AS
          SELECT v.priority, v.method, s.priority AS skipped_by, 0 AS own_aperture
          FROM results v JOIN skip_targets s ON s.target = v.priority AND s.method = v.method
          JOIN results k ON k.priority = s.priority AND k.method = s.method
          WHERE v.status = 5 AND k.status IN (1, 3)
          UNION ALL
          SELECT v.priority, v.method, s.target, 1
          FROM results v JOIN skip_targets s ON s.priority = v.priority AND s.method = v.method
          JOIN todolist a ON a.priority = v.priority JOIN todolist b ON b.priority = s.target
          WHERE v.status = 5 AND (b.tmag < a.tmag OR (b.tmag = a.tmag AND b.starid < a.starid))""")
    ex("""CREATE TABLE file_ops (id INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL,
                                 src TEXT, dst TEXT, priority INTEGER, method TEXT)""")
    # todolist keeps the targets only
    ex("DROP INDEX IF EXISTS status_idx")
    ex("DROP INDEX IF EXISTS status_cache_idx")
    for column in ("status", "attempts", "owner", "worker", "lease_expires", "started_at",
                   "finished_at", "error"):
        ex(f'ALTER TABLE todolist DROP COLUMN "{column}"')
    ex("ALTER TABLE runs ADD COLUMN output TEXT")
    ex("ALTER TABLE runs ADD COLUMN method TEXT")


def _m003_check_codes(db):
    """``diagnostics.qc_status`` / ``qc_codes``: the core's result checks (docs/checks.md),
    so that ``WHERE qc_codes LIKE '%NOISE_EXCESS%'`` finds them without parsing JSON."""
    db["diagnostics"].add_column("qc_status", str)
    db["diagnostics"].add_column("qc_codes", str)


def _m004_crowding(db):
    """Per-target crowding (photometry/crowding.py) for the method policy (issue 16)."""
    db["todolist"].add_column("crowding", float)


MIGRATIONS = [_m001_initial, _m002_results_per_method, _m003_check_codes, _m004_crowding]
SCHEMA_VERSION = len(MIGRATIONS)


class TaskQueries:
    """The read-only queries of the task list, by name (the status report, the run's
    progress, the summary table and the light-curve corrections ask these; no other module
    runs SQL on the connection). Needs ``conn`` and the planned flag of :class:`TaskStore`,
    which adds everything that writes: filling, planning, claims, results, output files.
    """

    # ------------------------------------------------------------------ filters
    @staticmethod
    def where(starid=None, tmag_min=None, tmag_max=None, camera=None, ccd=None, sector=None,
              cache=None, priority=None):
        """SQL condition on todolist ``t`` and its parameters for the run filters (None = no
        constraint)."""
        clauses, params = [], []
        for column, value in (("starid", starid), ("camera", camera), ("ccd", ccd),
                              ("sector", sector), ("cache", cache), ("priority", priority)):
            if value is None:
                continue
            values = list(value) if isinstance(value, (list, tuple, set)) else [value]
            clauses.append(f"t.{column} IN ({', '.join('?' * len(values))})")
            params.extend(values)
        if tmag_min is not None:
            clauses.append("t.tmag >= ?")
            params.append(tmag_min)
        if tmag_max is not None:
            clauses.append("t.tmag <= ?")
            params.append(tmag_max)
        return (" AND ".join(clauses) or "1"), params

    def _check_planned(self):
        if not self._wanted:
            raise RuntimeError("TaskStore.plan() must choose the run's results first")

    # ------------------------------------------------------------------ queries
    def count(self, filters=None):
        """Tasks (targets) matching ``filters``."""
        cond, params = self.where(**(filters or {}))
        return self.conn.execute(f"SELECT COUNT(*) FROM todolist t WHERE {cond}",
                                 params).fetchone()[0]

    def wanted_counts(self):
        """``{status name: count}`` of the planned results (pending under "PENDING")."""
        self._check_planned()
        out = collections.Counter()
        for status, n in self.conn.execute(
                "SELECT r.status, COUNT(*) FROM wanted w CROSS JOIN results r "
                "ON r.rowid = w.rid GROUP BY r.status"):
            out[status_name(status)] += n
        return dict(out)

    def counts_since(self, owner, since):
        """``{status name: count}`` of the results ``owner`` claimed since ``since`` (unix
        time) and still holds or finished: what one run did, as it stands now (a result
        withdrawn after it was saved counts as SKIPPED)."""
        return {STATUS_NAMES.get(status, str(status)): n for status, n in self.conn.execute(
            "SELECT status, COUNT(*) FROM results WHERE owner = ? AND claimed_at >= ? AND "
            "status IS NOT NULL GROUP BY status", (owner, since))}

    def wanted_methods(self):
        """``{method: number of planned results}``."""
        self._check_planned()
        return dict(self.conn.execute(
            "SELECT r.method, COUNT(*) FROM wanted w CROSS JOIN results r ON r.rowid = w.rid "
            "GROUP BY 1"))

    def status_counts(self, filters=None, method=None):
        """``{status name: count}`` over every result (of ``method``) of the tasks matching
        ``filters``; tasks without any result count as "PENDING"."""
        cond, params = self.where(**(filters or {}))
        mcond = "" if method is None else " AND r.method = ?"
        out = collections.Counter()
        for status, n in self.conn.execute(
                f"SELECT r.status, COUNT(*) FROM results r JOIN todolist t USING (priority) "
                f"WHERE {cond}{mcond} GROUP BY r.status",
                params + ([] if method is None else [method])):
            out[status_name(status)] += n
        if method is None:
            untouched = self.count_without_results(filters)
            if untouched:
                out["PENDING"] += untouched
        return dict(out)

    def results_by_method(self):
        """``{method: {status name: count}}`` of every result (pending under "PENDING")."""
        out = {}
        for method, status, n in self.conn.execute(
                "SELECT method, status, COUNT(*) FROM results GROUP BY 1, 2 ORDER BY 1, 2"):
            out.setdefault(method, {})[status_name(status)] = n
        return out

    def count_without_results(self, filters=None):
        """Tasks (matching ``filters``) with no result of any method (never planned)."""
        cond, params = self.where(**(filters or {}))
        return self.conn.execute(
            f"SELECT COUNT(*) FROM todolist t WHERE {cond} AND NOT EXISTS "
            "(SELECT 1 FROM results r WHERE r.priority = t.priority)", params).fetchone()[0]

    def failures(self, limit):
        """(number of failed results (ERROR, ABORT), the first ``limit`` of them by priority
        and method as dicts: priority, starid, method, status (code), attempts, error, errors
        (the diagnostics' messages))."""
        marks = ", ".join("?" * len(FAILED))
        names = ("priority", "starid", "method", "status", "attempts", "error", "errors")
        rows = self.conn.execute(
            "SELECT r.priority, t.starid, r.method, r.status, r.attempts, r.error, "
            "d.errors FROM results r JOIN todolist t USING (priority) "
            "LEFT JOIN diagnostics d USING (priority, method) "
            f"WHERE r.status IN ({marks}) ORDER BY r.priority, r.method LIMIT ?",
            list(FAILED) + [limit]).fetchall()
        n = self.conn.execute(f"SELECT COUNT(*) FROM results WHERE status IN ({marks})",
                              FAILED).fetchone()[0]
        return n, [dict(zip(names, r)) for r in rows]

    def mean_elaptime(self):
        """``{method: mean seconds per target}`` of the diagnostics."""
        return dict(self.conn.execute("SELECT method, AVG(elaptime) FROM diagnostics "
                                      "GROUP BY 1"))

    def last_run(self):
        """The last row of ``runs`` as a dict (counts still JSON text), or None."""
        cur = self.conn.execute("SELECT run_id, backend, workers, started_at, finished_at, "
                                "tasks_done, counts, interrupted, output, method FROM runs "
                                "ORDER BY run_id DESC LIMIT 1")
        row = cur.fetchone()
        return None if row is None else dict(zip((d[0] for d in cur.description), row))

    #: the columns of :meth:`output_results`
    OUTPUT_COLUMNS = ("sector", "camera", "ccd", "cadence", "starid", "tmag", "row", "column",
                      "method", "status", "reason", "variability", "contamination",
                      "lightcurve")
    _OUTPUT_ORDER = {"tmag": "t.tmag, t.starid, r.method", "method": "r.method, t.starid"}

    def output_results(self, output, kept=False, order="tmag"):
        """The results of the run into the folder ``output``: one dict (:attr:`OUTPUT_COLUMNS`)
        per (task, method), so several methods' results of a star stand side by side.

        A result of another folder is left out; one with no folder recorded (planned, or
        migrated from before folders were recorded) counts as this one's. With ``kept`` only
        the kept results (OK, WARNING) with a light-curve file, else also one row per task
        without any result (``status`` None, ``method`` its todolist method or ''). Sorted by
        CCD (sector, camera, ccd, cadence), then by ``order``: "tmag" (Tmag, TIC, method) or
        "method" (method, TIC). ``reason`` is the error or the diagnostics' messages.
        """
        join = "JOIN" if kept else "LEFT JOIN"
        where = (f"WHERE r.status IN ({', '.join('?' * len(KEPT))}) "
                 "AND d.lightcurve IS NOT NULL ") if kept else ""
        rows = self.conn.execute(
            'SELECT t.sector, t.camera, t.ccd, t.cadence, t.starid, t.tmag, t."row", t."column", '
            "COALESCE(r.method, t.method, ''), r.status, "
            "COALESCE(r.error, d.errors, ''), d.variability, d.contamination, d.lightcurve "
            f"FROM todolist t {join} results r ON r.priority = t.priority "
            "AND (r.output = ? OR r.output IS NULL) "
            f"{join} diagnostics d ON d.priority = r.priority AND d.method = r.method {where}"
            "ORDER BY t.sector, t.camera, t.ccd, t.cadence, " + self._OUTPUT_ORDER[order],
            (str(Path(output).resolve()), *(KEPT if kept else ()))).fetchall()
        return [dict(zip(self.OUTPUT_COLUMNS, r)) for r in rows]


class TaskStore(TaskQueries):
    """One connection to ``todo.sqlite``; every method is safe to call from many processes.
    The writes are here, the read-only queries in :class:`TaskQueries`.

    Parameters
    ----------
    path : path-like
        The database file; created (with the current schema) if missing and ``create``.
    busy_timeout : float
        Seconds a writer waits for the lock before "database is locked"; generous because a
        waiting writer costs nothing and a failing one loses a result.
    create : bool
        Allow creating a new file (``tessphot todo``); other commands need an existing task
        database (an empty or foreign file is refused, not silently given a schema).
    """

    def __init__(self, path, busy_timeout=60.0, create=False):
        self.path = Path(path)
        if not create:
            self._check_existing()
        try:
            conn = sqlite3.connect(str(self.path), timeout=busy_timeout, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise InputError(f"{self.path}: cannot open the task database ({exc})") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            if not create and not conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE name = 'todolist'").fetchone():
                raise InputError(f"{self.path}: an SQLite file without a task list (not made "
                                 "by 'tessphot todo')")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise InputError(f"{self.path}: not a task database ({exc})") from None
        except InputError:
            conn.close()
            raise
        self.conn = conn
        self._db = None
        self._wanted = False
        #: the output folder of this connection's run (:meth:`plan`): files of withdrawn
        #: results are deleted only inside it, never in another run's folder
        self.output = None
        #: pending results SKIPPED without running minus SKIPPED ones made pending again, since
        #: this connection was opened (the run's progress bar follows it without a query)
        self.pending_skipped = 0
        #: SKIPPED results made pending again (their holder was withdrawn): work that a run
        #: which found nothing left to claim must go back for
        self.unskipped = 0
        self.migrate()

    def _check_existing(self):
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a folder, not a task database")
        if not self.path.is_file():
            raise InputError(f"{self.path}: no task database (run 'tessphot todo' first)")
        if self.path.stat().st_size == 0:
            raise InputError(f"{self.path}: empty file, not a task database (delete it and "
                             "run 'tessphot todo' again)")
        with open(self.path, "rb") as fh:
            if fh.read(16) != b"SQLite format 3\x00":
                raise InputError(f"{self.path}: not a task database (not an SQLite file)")

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
        the B-trees row by row (``tessphot todo`` on a full CCD).
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

    def scratch_mode(self):
        """For a file that is a scratch copy until renamed (``tessphot todo``): no fsyncs and
        a big page cache for the index builds."""
        self.conn.execute("PRAGMA synchronous = OFF")
        self.conn.execute("PRAGMA cache_size = -262144")

    def make_self_contained(self):
        """Fold the write-ahead log into the file and leave WAL mode: one file to rename."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.execute("PRAGMA journal_mode = DELETE")

    # ------------------------------------------------------------------ planning
    def plan(self, method=None, policy=None, filters=None, output=None):
        """Choose the (task, method) results a run wants and make the missing ones pending.

        ``method``: one algorithm for every task (``run --method``); else the task's own
        ``method`` column, else ``policy(task dict) -> name`` (the ``choose_method`` hook).
        The wanted results are kept in a temporary table of this connection, as ``results``
        rowids (what :meth:`claim`, :meth:`reset` and :meth:`wanted_counts` work on: an
        integer key makes counting a 200 000-task plan 5x faster than (priority, method)
        pairs; ``results`` rows are never deleted, so their rowids hold). New pending results
        that a kept light curve already holds become SKIPPED at once. ``output``: the run's
        output folder (the only place whose files the run may delete).

        Returns the number of new (pending) results.
        """
        cond, params = self.where(**(filters or {}))
        pairs = []
        if not method:  # the policy, in Python, for the tasks without a method of their own
            cur = self.conn.execute(f"SELECT * FROM todolist t WHERE {cond} AND t.method IS "
                                    "NULL", params)
            names = [d[0] for d in cur.description]
            for row in cur:
                task = dict(zip(names, row))
                name = policy(task) if policy else None
                if not name:
                    raise InputError(f"TIC {task['starid']}: no method chosen (no plugin's "
                                     "choose_method policy named one); use --method NAME")
                pairs.append((task["priority"], name))
        with self.transaction():
            self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS wanted_pairs (priority "
                              "INTEGER, method TEXT, PRIMARY KEY (priority, method))")
            self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (rid INTEGER PRIMARY KEY)")
            self.conn.execute("DELETE FROM wanted_pairs")
            self.conn.execute("DELETE FROM wanted")
            if method:
                self.conn.execute(f"INSERT INTO wanted_pairs SELECT t.priority, ? FROM "
                                  f"todolist t WHERE {cond}", [method] + params)
            else:
                self.conn.execute(f"INSERT INTO wanted_pairs SELECT t.priority, t.method FROM "
                                  f"todolist t WHERE {cond} AND t.method IS NOT NULL", params)
                self.conn.executemany("INSERT OR IGNORE INTO wanted_pairs VALUES (?, ?)", pairs)
            before = self.conn.total_changes
            self.conn.execute("INSERT OR IGNORE INTO results (priority, method) "
                              "SELECT priority, method FROM wanted_pairs")
            new = self.conn.total_changes - before
            self.conn.execute("INSERT INTO wanted SELECT r.rowid FROM wanted_pairs p CROSS JOIN "
                              "results r ON r.priority = p.priority AND r.method = p.method")
            self.conn.execute("DELETE FROM wanted_pairs")
            self._skip_listed_pending()
        self._wanted = True
        self.output = None if output is None else str(Path(output).resolve())
        return new

    def _wanted_join(self):
        self._check_planned()
        return "JOIN wanted w ON w.rid = r.rowid"

    # ------------------------------------------------------------------ run start
    def reset(self, mode="pending"):
        """Put the planned results back to pending before a run; returns how many.

        ``mode``: "pending" (nothing), "failed" (ERROR and ABORT again), "all" (every planned
        result, the ``--overwrite`` mode: its diagnostics, skip relations and files go, and
        the tasks it skipped are re-decided). Other methods' results are never touched.
        """
        if mode == "pending":
            return 0
        statuses = {"failed": FAILED, "all": FINAL + (STARTED,)}[mode]
        marks = ", ".join(map(str, statuses))
        now = time.time()
        with self.transaction():
            rows = self.conn.execute(
                f"SELECT r.priority, r.method, r.status, r.output, r.files FROM results r "
                f"{self._wanted_join()} WHERE r.status IN ({marks})").fetchall()
            for priority, method, status, output, files in rows:
                key = (priority, method)
                self._delete_files(key, output, files)
                self.conn.execute("DELETE FROM diagnostics WHERE priority = ? AND method = ?",
                                  key)
                victims = self._listed(key)
                self.conn.execute("DELETE FROM skip_targets WHERE priority = ? AND method = ?",
                                  key)
                self.conn.execute(
                    "UPDATE results SET status = NULL, attempts = 0, owner = NULL, "
                    "worker = NULL, lease_expires = NULL, claimed_at = NULL, finished_at = NULL,"
                    " error = NULL, files = NULL WHERE priority = ? AND method = ?", key)
                if status in KEPT:
                    self._unskip(victims, method, now)
            self._skip_listed_pending()
        return len(rows)

    def requeue_stale(self, now=None):
        """Results STARTED by an owner that is gone (lease expired, or a dead pid on this host)
        go back to pending, uncharged (``interruptions`` + 1): a coordinator's death says
        nothing about its tasks. Returns the count."""
        now = time.time() if now is None else now
        rows = self.conn.execute(
            "SELECT priority, method, owner, lease_expires FROM results "
            "WHERE status = ?", (STARTED,)).fetchall()
        stale = [(p, m) for p, m, owner, lease in rows
                 if (lease is not None and lease < now) or not owner_alive(owner)]
        if stale:
            with self.transaction():
                self.conn.executemany(
                    "UPDATE results SET status = NULL, owner = NULL, worker = NULL, "
                    "lease_expires = NULL, interruptions = interruptions + 1 "
                    "WHERE priority = ? AND method = ? AND status = 6", stale)
                self._skip_listed_pending(stale)
        return len(stale)

    # ------------------------------------------------------------------ claims
    def claim(self, owner, n=1, lease=600.0, prefer_cache=None, worker=None, output=None):
        """Atomically take up to ``n`` pending planned results (in :data:`CLAIM_ORDER`) for
        ``owner``; returns task dicts (todolist columns, ``method``, ``attempts``), in that
        order.

        ``prefer_cache`` keeps a worker on the CCD whose cache it has open: tasks of that cache
        come first, the rest of the list only when it has none left. ``output``: the run's
        output folder, recorded with each result (its files are relative to it).
        """
        now = time.time()
        output = str(Path(output).resolve()) if output is not None else None
        taken = 0
        with self.transaction():
            self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS claimed (rid INTEGER PRIMARY "
                              "KEY, pass INTEGER)")
            self.conn.execute("DELETE FROM claimed")
            passes = ([("t.cache = ?", [prefer_cache])] if prefer_cache else []) + [("1", [])]
            for number, (extra, extra_params) in enumerate(passes):
                need = n - taken
                if need <= 0:
                    break
                rowids = self.conn.execute(
                    "UPDATE results SET status = 6, owner = ?, worker = ?, lease_expires = ?, "
                    "claimed_at = ?, output = ? WHERE rowid IN ("
                    f"SELECT r.rowid FROM results r {self._wanted_join()} "
                    "JOIN todolist t ON t.priority = r.priority "
                    f"WHERE r.status IS NULL AND {extra} ORDER BY {CLAIM_ORDER} LIMIT ?) "
                    "RETURNING rowid",
                    [owner, worker, now + lease, now, output] + extra_params + [need]
                ).fetchall()
                self.conn.executemany("INSERT INTO claimed VALUES (?, ?)",
                                      [(rid, number) for rid, in rowids])
                taken += len(rowids)
            # RETURNING has no order: read the claimed rows back in the claim order
            cur = self.conn.execute(
                "SELECT r.method, r.attempts, t.* FROM claimed c CROSS JOIN results r "
                "ON r.rowid = c.rid CROSS JOIN todolist t ON t.priority = r.priority "
                f"ORDER BY c.pass, {CLAIM_ORDER}")
            names = [d[0] for d in cur.description][2:]
            # the result's method replaces the task's own ``method`` column (NULL = policy)
            claimed = [dict(zip(names, row[2:]), method=row[0], attempts=row[1],
                            status=STARTED) for row in cur]
        return claimed

    def heartbeat(self, owner, lease=600.0):
        """Extend the leases of the owner's running results."""
        with self.transaction():
            return self.conn.execute(
                "UPDATE results SET lease_expires = ? WHERE status = 6 AND owner = ?",
                (time.time() + lease, owner)).rowcount

    def release(self, keys, attempt_used=False, max_attempts=None, message=None, owner=None):
        """Give (priority, method) results back: pending again, or ERROR with ``message`` once
        out of attempts.

        ``attempt_used=False`` is for results that were claimed but never started (nothing is
        charged); ``True`` for one that was running when its worker died or timed out (one
        attempt charged, ERROR at ``max_attempts``). Only STARTED results (of ``owner``)
        change.
        """
        keys = [tuple(k) for k in keys]
        if not keys:
            return
        now = time.time()
        cond = "priority = ? AND method = ? AND status = 6"
        extra = []
        if owner is not None:
            cond += " AND owner = ?"
            extra = [owner]
        with self.transaction():
            if attempt_used:
                self.conn.executemany(f"UPDATE results SET attempts = attempts + 1 WHERE {cond}",
                                      [list(k) + extra for k in keys])
                if max_attempts is not None:
                    self.conn.executemany(
                        "UPDATE results SET status = 2, finished_at = ?, lease_expires = NULL, "
                        f"error = ? WHERE {cond} AND attempts >= ?",
                        [[now, f"{message} (attempt limit {max_attempts} reached)"] + list(k)
                         + extra + [max_attempts] for k in keys])
            self.conn.executemany(
                "UPDATE results SET status = NULL, owner = NULL, worker = NULL, "
                f"lease_expires = NULL, error = ? WHERE {cond}",
                [[message] + list(k) + extra for k in keys])
            self._skip_listed_pending(keys)

    # ------------------------------------------------------------------ results
    def save_results(self, results, owner=None):
        """Write a batch of results in one transaction; returns ``{key: final status}`` of the
        results accepted ((priority, method) keys).

        Each result: ``priority``, ``method``, ``status`` (int), ``elaptime``,
        ``worker_wait_time``, ``lightcurve`` (path relative to the output folder, or None),
        ``files`` (every file the task wrote, relative), ``staging`` (the folder they are in
        until published), ``details`` (dict with optional ``errors``, ``skip_targets``,
        ``metrics``, ``stamp``...). A result for a result row that is no longer STARTED by
        ``owner`` (re-queued after a lost lease, or finished by someone else) is dropped and
        its files discarded. Accepted files are published by :meth:`apply_file_ops` after the
        commit: output files follow the database, never the other way round.

        Skips (TASOC's rules, made independent of the order results arrive): a result whose
        own light curve holds a brighter task is SKIPPED (its file is not published); a task
        held by a kept (OK/WARNING) light curve of a brighter one is SKIPPED whenever that is
        known: before it runs, when its result arrives, or afterwards (its result is then
        withdrawn and its files deleted, and the tasks *it* held are decided again). The
        final state is the one a single worker going brightest-first would reach.
        """
        results = list(results)
        if not results:
            return {}
        now = time.time()
        accepted = {}
        with self.transaction():
            rows = self._result_rows({int(r["priority"]) for r in results})
            for res in results:
                key = (int(res["priority"]), res["method"])
                row = rows.get(key)
                if (row is None or row["status"] != STARTED or key in accepted
                        or (owner is not None and row["owner"] != owner)):
                    logger.warning("task %s (%s): result dropped (no longer ours)", *key)
                    self._discard(res)
                    continue
                accepted[key] = self._save_one(key, row, res, now)
        return accepted

    def _result_rows(self, priorities):
        names = ("status", "owner", "output", "starid", "tmag") + _GROUP
        out = {}
        for chunk in _chunks(sorted(priorities), 500):
            for row in self.conn.execute(
                    f"SELECT r.priority, r.method, r.status, r.owner, r.output, t.starid, "
                    f"t.tmag, {', '.join('t.' + g for g in _GROUP)} FROM results r "
                    f"JOIN todolist t ON t.priority = r.priority "
                    f"WHERE r.priority IN ({', '.join('?' * len(chunk))})", chunk):
                out[(row[0], row[1])] = dict(zip(names, row[2:]))
        return out

    def _save_one(self, key, row, res, now):
        priority, method = key
        status = int(res["status"])
        details = dict(res.get("details") or {})
        errors = list(details.get("errors") or [])
        listed = self._resolve(row, details.get("skip_targets") or [])
        me = (row["tmag"], row["starid"])
        brighter = [t for t in listed if (t[1], t[2]) < me]
        fainter = [t[0] for t in listed if (t[1], t[2]) > me]
        held_by = self._kept_holders(key)
        files = [str(f) for f in res.get("files") or []]
        if held_by:
            # a kept brighter light curve holds this target: as if it had never run
            final, message = SKIPPED, None
            self._discard(res)
        else:
            final = SKIPPED if (status in KEPT and brighter) else status
            lightcurve = res.get("lightcurve") if final in KEPT else None
            self.conn.execute(_DIAGNOSTICS_SQL, _diagnostics_row(key, res, details, errors,
                                                                 lightcurve))
            if final in KEPT:
                self._publish(key, row["output"], res)
            else:
                self._discard(res)
                files = []
            if status in KEPT:
                self.conn.executemany("INSERT OR IGNORE INTO skip_targets VALUES (?, ?, ?)",
                                      [(priority, method, t[0]) for t in listed])
            if final in KEPT:
                for victim in fainter:
                    self._hold(victim, method, now)
            message = errors[-1] if (errors and final in FAILED) else None
        self.conn.execute(
            "UPDATE results SET status = ?, finished_at = ?, lease_expires = NULL, error = ?, "
            "files = ? WHERE priority = ? AND method = ?",
            (final, now, message, json.dumps(files) if files else None, priority, method))
        return final

    def _resolve(self, row, starids):
        """(priority, tmag, starid) of the listed stars that are tasks of the same CCD."""
        starids = sorted({int(s) for s in starids} - {row["starid"]})
        if not starids:
            return []
        marks = ", ".join("?" * len(starids))
        return self.conn.execute(
            f"SELECT priority, tmag, starid FROM todolist WHERE starid IN ({marks}) AND "
            + " AND ".join(f"{g} = ?" for g in _GROUP),
            starids + [row[g] for g in _GROUP]).fetchall()

    def _kept_holders(self, key):
        return [p for p, in self.conn.execute(
            "SELECT s.priority FROM skip_targets s JOIN results k ON k.priority = s.priority "
            "AND k.method = s.method WHERE s.target = ? AND s.method = ? AND k.status IN (1, 3)",
            key)]

    def _listed(self, key):
        return [t for t, in self.conn.execute(
            "SELECT target FROM skip_targets WHERE priority = ? AND method = ?", key)]

    def _hold(self, victim, method, now):
        """A kept light curve holds the fainter task ``victim``: SKIPPED unless it is running
        (its result will be checked when it arrives); a result it had is withdrawn."""
        found = self.conn.execute(
            "SELECT status, output, files FROM results WHERE priority = ? AND method = ?",
            (victim, method)).fetchone()
        if found is None:
            return  # not planned yet: plan() checks it when it is
        status, output, files = found
        key = (victim, method)
        if status == STARTED or (status == SKIPPED and not self._listed(key)):
            return  # running (decided when its result arrives), or held already
        if status is not None:  # a result (even a self-skipped one): as if it had never run
            self._delete_files(key, output, files)
            self.conn.execute("DELETE FROM diagnostics WHERE priority = ? AND method = ?", key)
            victims = self._listed(key)
            self.conn.execute("DELETE FROM skip_targets WHERE priority = ? AND method = ?", key)
        if status is None:
            self.pending_skipped += 1
        self.conn.execute("UPDATE results SET status = 5, finished_at = ?, error = NULL, "
                          "files = NULL WHERE priority = ? AND method = ?", (now,) + key)
        if status in KEPT:
            self._unskip(victims, method, now)

    def _unskip(self, victims, method, now):
        """Tasks a light curve held that is no longer kept: pending again unless another kept
        light curve holds them or their own aperture holds a brighter task."""
        for victim in victims:
            key = (victim, method)
            found = self.conn.execute("SELECT status FROM results WHERE priority = ? AND "
                                      "method = ?", key).fetchone()
            if not found or found[0] != SKIPPED or self._kept_holders(key) \
                    or self._listed(key):
                continue  # own skip_targets rows exist only for a self-skipped result
            self.conn.execute("UPDATE results SET status = NULL, finished_at = NULL, "
                              "owner = NULL WHERE priority = ? AND method = ?", key)
            self.pending_skipped -= 1
            self.unskipped += 1

    def _skip_listed_pending(self, keys=None):
        """Pending results that a kept light curve holds: SKIPPED (they need not run). Only
        the (priority, method) ``keys`` if given (the ones just made pending: checking every
        pending result of a 200 000-task list costs a third of a second)."""
        now = time.time()
        if keys is None:  # driven by the (few) skip relations, not the (many) pending rows
            cur = self.conn.execute(
                "UPDATE results SET status = 5, finished_at = ? WHERE rowid IN ("
                "SELECT v.rowid FROM skip_targets s CROSS JOIN results k ON k.priority = "
                "s.priority AND k.method = s.method CROSS JOIN results v ON v.priority = "
                "s.target AND v.method = s.method WHERE k.status IN (1, 3) AND "
                "v.status IS NULL)", (now,))
        else:
            cur = self.conn.executemany(
                "UPDATE results SET status = 5, finished_at = ? WHERE priority = ? AND "
                "method = ? AND status IS NULL AND EXISTS (SELECT 1 FROM skip_targets s JOIN "
                "results k ON k.priority = s.priority AND k.method = s.method WHERE "
                "s.target = results.priority AND s.method = results.method AND "
                "k.status IN (1, 3))", [(now,) + tuple(k) for k in keys])
        self.pending_skipped += max(cur.rowcount, 0)

    # ------------------------------------------------------------------ output files
    def _publish(self, key, output, res):
        staging = res.get("staging")
        if not staging or output is None:
            return
        for rel in res.get("files") or []:
            self.conn.execute("INSERT INTO file_ops (op, src, dst, priority, method) "
                              "VALUES ('move', ?, ?, ?, ?)",
                              (str(Path(staging) / rel), str(Path(output) / rel)) + key)
        self.conn.execute("INSERT INTO file_ops (op, src) VALUES ('discard', ?)", (staging,))

    def _discard(self, res):
        if res.get("staging"):
            self.conn.execute("INSERT INTO file_ops (op, src) VALUES ('discard', ?)",
                              (res["staging"],))

    def _delete_files(self, key, output, files):
        if output is None or not files:
            return
        if self.output is not None and output != self.output:
            logger.info("task %s (%s): its files are in %s, another run's output folder: not "
                        "deleted", key[0], key[1], output)
            return
        for rel in json.loads(files):
            self.conn.execute("INSERT INTO file_ops (op, dst, priority, method) "
                              "VALUES ('delete', ?, ?, ?)", (str(Path(output) / rel),) + key)

    def apply_file_ops(self):
        """Carry out the file operations committed so far, in order: move a kept result's
        files from its staging folder into the output folder, delete the files of results
        withdrawn or reset, remove staging folders. Idempotent (a move whose source is gone,
        a delete of a missing file do nothing), so it runs after every commit and at the start
        of a run: a coordinator that died between its commit and these leaves them to the
        next one. Returns the number done.

        Raises
        ------
        OSError
            From the file system (a full disk): the operations not done are kept.
        """
        ops = self.conn.execute("SELECT id, op, src, dst FROM file_ops ORDER BY id").fetchall()
        done, failure = [], None
        for op_id, op, src, dst in ops:
            try:
                if op == "move":
                    if os.path.exists(src):
                        os.makedirs(os.path.dirname(dst), exist_ok=True)
                        os.replace(src, dst)
                elif op == "delete":
                    Path(dst).unlink(missing_ok=True)
                elif op == "discard":
                    shutil.rmtree(src, ignore_errors=True)
            except OSError as exc:
                failure = exc
                break
            done.append(op_id)
        if done:
            with self.transaction():
                for chunk in _chunks(done, 500):
                    self.conn.execute(f"DELETE FROM file_ops WHERE id IN "
                                      f"({', '.join('?' * len(chunk))})", chunk)
        if failure is not None:
            raise failure
        return len(done)

    # ------------------------------------------------------------------ runs
    def start_run(self, owner, backend, workers, command, output=None, method=None):
        with self.transaction():
            cur = self.conn.execute(
                "INSERT INTO runs (owner, backend, workers, command, started_at, tasks_done, "
                "interrupted, output, method) VALUES (?, ?, ?, ?, ?, 0, 0, ?, ?)",
                (owner, backend, workers, command, time.time(),
                 None if output is None else str(output), method))
            return cur.lastrowid

    def finish_run(self, run_id, tasks_done, counts, interrupted=False):
        with self.transaction():
            self.conn.execute(
                "UPDATE runs SET finished_at = ?, tasks_done = ?, counts = ?, interrupted = ? "
                "WHERE run_id = ?",
                (time.time(), tasks_done, json.dumps(counts), int(interrupted), run_id))


def _q(name):
    return f'"{name}"'


_DIAGNOSTICS_COLUMNS = ["priority", "method", "lightcurve", "elaptime", "worker_wait_time",
                        *DIAGNOSTIC_COLUMNS, "errors", "details", "qc_status", "qc_codes"]
_DIAGNOSTICS_SQL = (f"INSERT OR REPLACE INTO diagnostics "
                    f"({', '.join(map(_q, _DIAGNOSTICS_COLUMNS))}) "
                    f"VALUES ({', '.join('?' * len(_DIAGNOSTICS_COLUMNS))})")
_DETAILS_NOT_EXTRA = frozenset(("errors", "metrics", "skip_targets", "stamp",
                                "filepath_lightcurve"))


def _diagnostics_row(result_key, res, details, errors, lightcurve):
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
    return (*result_key, lightcurve, float(res.get("elaptime") or 0.0), res.get("worker_wait_time"),
            *values.values(), "\n".join(str(e) for e in errors) or None,
            json.dumps(extra, default=_json_default) if extra else None,
            *_check_columns(details.get("checks")))


def _check_columns(checks):
    """(qc_status, qc_codes) of ``details['checks']`` (codes comma-separated), or Nones."""
    if not checks:
        return None, None
    return checks.get("status"), ",".join(checks.get("codes") or []) or None


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
