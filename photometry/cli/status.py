"""``tessphot status CACHE_DIR``: where a run stands, from todo.sqlite alone.

Read-only (once the file has the current schema), so it can be run while ``tessphot run``
works on the same database (WAL mode lets readers through). Results are shown per method:
several methods' results of the same tasks live side by side.
"""
import datetime
import json
from pathlib import Path

from photometry.hooks.commandline import at_least
from photometry.hooks.errors import InputError
from photometry.data.taskstore import STATUS_NAMES, TODO_NAME, TaskStore

__all__ = ["add_arguments", "run", "status_report"]

#: the order statuses are listed in
ORDER = ("OK", "WARNING", "SKIPPED", "ERROR", "ABORT", "STARTED", "PENDING")


def add_arguments(parser):
    parser.add_argument("cache_dir", metavar="CACHE_DIR", help="folder with todo.sqlite")
    parser.add_argument("--failures", type=at_least(0), default=20, metavar="N",
                        help="list at most N failed results")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--output", "-o", default=None, metavar="LC_DIR",
                        help="the run's light-curve folder: also (re)write its per-CCD "
                             "summary tables and CDPP plots in LC_DIR/summary/")


def status_report(cache_dir, max_failures=20):
    """Counts by method and status, failed results with their messages, the last run."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise InputError(f"{cache_dir}: cache folder not found")
    with TaskStore(cache_dir / TODO_NAME) as store:
        total = store.count()
        by_method = store.results_by_method()
        no_result = store.count_without_results()
        n_failed, failed = store.failures(max_failures)
        mean = store.mean_elaptime()
        run = store.last_run()
    counts = {}
    for method_counts in by_method.values():
        for name, n in method_counts.items():
            counts[name] = counts.get(name, 0) + n
    failures = [{"priority": f["priority"], "starid": f["starid"], "method": f["method"],
                 "status": STATUS_NAMES.get(f["status"]), "attempts": f["attempts"],
                 "message": _last_line(f["error"] or f["errors"])} for f in failed]
    last_run = None
    if run:
        t0, t1, done = run["started_at"], run["finished_at"], run["tasks_done"]
        elapsed = (t1 - t0) if (t1 and t0) else None
        last_run = {"run_id": run["run_id"], "backend": run["backend"],
                    "workers": run["workers"], "started": _iso(t0), "finished": _iso(t1),
                    "tasks": done, "elapsed_s": elapsed, "interrupted": bool(run["interrupted"]),
                    "tasks_per_second": (done / elapsed) if elapsed else None,
                    "counts": json.loads(run["counts"]) if run["counts"] else {},
                    "output": run["output"], "method": run["method"]}
    return {"total": total, "counts": counts, "by_method": by_method, "no_result": no_result,
            "failed": n_failed, "failures": failures, "mean_elaptime": mean,
            "last_run": last_run}


def _last_line(text):
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


def _iso(t):
    if not t:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
        timespec="seconds")


def run(args):
    report = status_report(args.cache_dir, args.failures)
    if args.output is not None:
        from photometry.output.summary import write_summaries
        if not Path(args.output).is_dir():
            from photometry.hooks.errors import InputError
            raise InputError(f"{args.output}: light-curve folder not found")
        report["summaries"] = [str(p) for p in write_summaries(args.cache_dir, args.output)]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    methods = report["by_method"]
    print(f"{report['total']} tasks; results of {len(methods)} method"
          f"{'' if len(methods) == 1 else 's'}")
    for method, counts in methods.items():
        print(f"{method} ({sum(counts.values())} results):")
        for name in ORDER:
            if name in counts:
                print(f"  {name:<8} {counts[name]:>9}")
    if report["no_result"]:
        print(f"no result yet: {report['no_result']} tasks (run 'tessphot run')")
    if report["mean_elaptime"]:
        times = ", ".join(f"{m} {t:.3f} s" for m, t in report["mean_elaptime"].items()
                          if t is not None)
        print(f"mean time per finished result: {times}")
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
            print(f"  TIC {f['starid']} (task {f['priority']}, {f['method']}, {f['status']}, "
                  f"{f['attempts']} attempts): {f['message']}")
    for path in report.get("summaries", []):
        print(f"summary: {path}")
    return 0
