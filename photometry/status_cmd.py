"""``tessphot status CACHE_DIR``: where a run stands, from todo.sqlite alone.

Read-only, so it can be run while ``tessphot run`` works on the same database (WAL mode lets
readers through).
"""
import datetime
import json
from pathlib import Path

from .taskstore import FAILED, STATUS_NAMES, TODO_NAME, TaskStore

__all__ = ["add_arguments", "run", "status_report"]


def add_arguments(parser):
    parser.add_argument("cache_dir", metavar="CACHE_DIR", help="folder with todo.sqlite")
    parser.add_argument("--failures", type=int, default=20, metavar="N",
                        help="list at most N failed tasks (default 20)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--output", "-o", default=None, metavar="LC_DIR",
                        help="the run's light-curve folder: also (re)write its per-CCD "
                             "summary tables and CDPP plots in LC_DIR/summary/")


def status_report(cache_dir, max_failures=20):
    """Counts by status and by method, failed tasks with their messages, the last run."""
    with TaskStore(Path(cache_dir) / TODO_NAME) as store:
        conn = store.conn
        total = conn.execute("SELECT COUNT(*) FROM todolist").fetchone()[0]
        counts = store.status_counts()
        by_method = {}
        for method, status, n in conn.execute(
                "SELECT COALESCE(d.method_used, t.method, '(dynamic)'), t.status, COUNT(*) "
                "FROM todolist t LEFT JOIN diagnostics d USING (priority) "
                "GROUP BY 1, 2 ORDER BY 1, 2"):
            name = "PENDING" if status is None else STATUS_NAMES.get(status, str(status))
            by_method.setdefault(method, {})[name] = n
        marks = ", ".join("?" * len(FAILED))
        failures = [
            {"priority": p, "starid": s, "status": STATUS_NAMES.get(st), "attempts": a,
             "message": (e or d or "").strip().splitlines()[-1] if (e or d) else ""}
            for p, s, st, a, e, d in conn.execute(
                "SELECT t.priority, t.starid, t.status, t.attempts, t.error, d.errors "
                f"FROM todolist t LEFT JOIN diagnostics d USING (priority) "
                f"WHERE t.status IN ({marks}) ORDER BY t.priority LIMIT ?",
                list(FAILED) + [max_failures])]
        n_failed = store.count_status(FAILED)
        run = conn.execute("SELECT run_id, backend, workers, started_at, finished_at, "
                           "tasks_done, counts, interrupted FROM runs "
                           "ORDER BY run_id DESC LIMIT 1").fetchone()
        last_run = None
        if run:
            run_id, backend, workers, t0, t1, done, run_counts, interrupted = run
            elapsed = (t1 - t0) if (t1 and t0) else None
            last_run = {"run_id": run_id, "backend": backend, "workers": workers,
                        "started": _iso(t0), "finished": _iso(t1), "tasks": done,
                        "elapsed_s": elapsed, "interrupted": bool(interrupted),
                        "tasks_per_second": (done / elapsed) if elapsed else None,
                        "counts": json.loads(run_counts) if run_counts else {}}
        mean = conn.execute("SELECT AVG(elaptime) FROM diagnostics").fetchone()[0]
    return {"total": total, "counts": counts, "by_method": by_method, "failed": n_failed,
            "failures": failures, "mean_elaptime": mean, "last_run": last_run}


def _iso(t):
    if not t:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
        timespec="seconds")


def run(args):
    report = status_report(args.cache_dir, args.failures)
    if args.output is not None:
        from .summary import write_summaries
        if not Path(args.output).is_dir():
            from .errors import InputError
            raise InputError(f"{args.output}: light-curve folder not found")
        report["summaries"] = [str(p) for p in write_summaries(args.cache_dir, args.output)]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['total']} tasks")
    for name in ("OK", "WARNING", "SKIPPED", "ERROR", "ABORT", "STARTED", "PENDING"):
        if name in report["counts"]:
            print(f"  {name:<8} {report['counts'][name]:>9}")
    print("by method:")
    for method, counts in report["by_method"].items():
        text = ", ".join(f"{k} {v}" for k, v in counts.items())
        print(f"  {method}: {text}")
    if report["mean_elaptime"] is not None:
        print(f"mean time per finished task: {report['mean_elaptime']:.3f} s")
    run_info = report["last_run"]
    if run_info:
        rate = run_info["tasks_per_second"]
        rate = f"{rate:.2f} tasks/s" if rate else "still running or no task"
        state = " (interrupted)" if run_info["interrupted"] else ""
        print(f"last run #{run_info['run_id']} ({run_info['backend']}, started "
              f"{run_info['started']}): {run_info['tasks']} tasks, {rate}{state}")
    if report["failures"]:
        print(f"failures ({report['failed']}, first {len(report['failures'])}):")
        for f in report["failures"]:
            print(f"  TIC {f['starid']} (task {f['priority']}, {f['status']}, "
                  f"{f['attempts']} attempts): {f['message']}")
    for path in report.get("summaries", []):
        print(f"summary: {path}")
    return 0
