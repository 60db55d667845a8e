"""Scheduler benchmarks: todo for a 200 000-star CCD, scheduler overhead, aperture speed-up.

    python benchmarks/bench_scheduler.py [--tasks 5000] [--skip-aperture | --only-aperture]

Prints one line per figure; the latest results are recorded in docs/benchmarks.md.

- todo: ``make_todo`` on one CCD whose catalog has 200 000 stars (fake cache attributes).
- plan: ``TaskStore.plan`` over that CCD (once per run: which (task, method) results it wants).
- overhead: tasks/s of ``run_tasks`` with 2 local workers and a task function that does
  nothing, so what is measured is claiming, dispatch, result batching and commits. Reported
  both over the whole run (with worker start-up) and in steady state (from the per-task
  ``finished_at`` stamps), with the CPU time of the coordinator (the serial part) per task.
- aperture: a simulated sector run with ``--method aperture`` on 1 and on 2 workers.
"""
import argparse
import os
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))


def noop_task(context, task):
    """The scheduler benchmark's task: no photometry, an OK result with one metric."""
    return {"priority": task["priority"], "starid": task["starid"], "status": 1,
            "method_used": "noop", "elaptime": 0.0, "lightcurve": None,
            "details": {"mean_flux": float(task["tmag"])}}


def bench_todo(tmp):
    from test_todo import make_large_fake_ccd
    from photometry.scheduler.todo import make_todo
    n = 200_000
    make_large_fake_ccd(tmp, n=n)
    t0, c0 = time.perf_counter(), time.process_time()
    _, count = make_todo(tmp, faint_limit=20)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"todo: {n} catalog stars -> {count} tasks in {dt:.2f} s ({count / dt:,.0f} tasks/s; "
          f"CPU {cpu:.2f} s; load average {os.getloadavg()[0]:.1f})")
    return tmp


def _steady_rate(cache):
    con = sqlite3.connect(cache / "todo.sqlite")
    t = np.array([r[0] for r in con.execute(
        "SELECT finished_at FROM results WHERE finished_at IS NOT NULL ORDER BY 1")])
    con.close()
    lo, hi = np.searchsorted(t, [t[0] + 0.0, t[-1]])  # whole span between first/last commit
    return (hi - lo) / (t[-1] - t[0]) if t[-1] > t[0] else float("nan")


def bench_plan(cache):
    """Planning a run over the whole CCD: results rows made pending (first run), then again
    (a resumed run), with one method and with the choose_method policy of the plugins."""
    import functools
    from photometry.hooks.plugins import get_plugin_manager
    from photometry.scheduler.run import _choose_method
    from photometry.hooks.settings import load_settings
    from photometry.data.taskstore import TaskStore
    policy = functools.partial(_choose_method, get_plugin_manager(), load_settings())
    times = []
    with TaskStore(cache / "todo.sqlite") as store:
        n = store.count()
        for kwargs in ({"method": "noop"}, {"method": "noop"}, {"policy": policy}):
            c0 = time.process_time()
            store.plan(output=cache / "out", **kwargs)
            times.append(time.process_time() - c0)
        store.conn.execute("DELETE FROM results")
    print(f"plan: {n} tasks: first run {times[0]:.2f} s CPU, resumed run {times[1]:.2f} s, "
          f"with the choose_method policy {times[2]:.2f} s ({1e6 * times[2] / n:.1f} us/task)")


def bench_overhead(cache, n_tasks, workers=2):
    from photometry.scheduler.run import run_tasks
    from photometry.hooks.settings import load_settings
    con = sqlite3.connect(cache / "todo.sqlite")
    con.execute("DELETE FROM diagnostics")
    con.execute("DELETE FROM results")
    con.commit()
    con.close()
    settings = load_settings(assignments=["scheduler.prefetch=16", "scheduler.claim_batch=256",
                                          "scheduler.commit_every=500"])
    import resource
    c0, w0 = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = run_tasks(cache, cache / "out", settings=settings, workers=workers,
                        limit=n_tasks, task_function="bench_scheduler:noop_task",
                        method="noop", progress=False)
    cpu, w1 = time.process_time() - c0, resource.getrusage(resource.RUSAGE_CHILDREN)
    wcpu = (w1.ru_utime - w0.ru_utime) + (w1.ru_stime - w0.ru_stime)
    rate = _steady_rate(cache)
    n = summary["tasks_run"]
    print(f"overhead: {n} no-op tasks on {workers} workers: "
          f"{summary['tasks_per_second']:,.0f} tasks/s with start-up, "
          f"{rate:,.0f} tasks/s steady state; CPU: coordinator {cpu:.2f} s "
          f"({1e6 * cpu / n:.0f} us/task), workers {wcpu:.2f} s with their start-up; "
          f"load average {os.getloadavg()[0]:.1f}")
    return rate


def bench_aperture(tmp, cadences=60, size=128):
    import subprocess
    from photometry.scheduler.run import run_tasks
    from photometry.scheduler.todo import make_todo
    exe = [sys.executable, "-m", "photometry.cli"]
    sim, cache = tmp / "sim", tmp / "cache"
    subprocess.run(exe + ["simulate", str(sim), "--cadences", str(cadences), "--size",
                          str(size), str(size), "--seed", "3"], check=True,
                   capture_output=True)
    subprocess.run(exe + ["prepare", str(sim / "ffi"), "--catalog", str(sim / "catalog.csv"),
                          "--cache", str(cache)], check=True, capture_output=True)
    make_todo(cache, faint_limit=15, overwrite=True)
    import resource
    times = {}
    for workers in (1, 2):
        load0 = os.getloadavg()[0]
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        summary = run_tasks(cache, tmp / f"lc{workers}", workers=workers, method="aperture",
                            mode="all", progress=False)
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        con = sqlite3.connect(cache / "todo.sqlite")
        t = [r[0] for r in con.execute("SELECT finished_at FROM results ORDER BY 1")]
        elapsed = sum(r[0] for r in con.execute("SELECT elaptime FROM diagnostics"))
        con.close()
        times[workers] = summary["elapsed"]
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        print(f"aperture: {summary['tasks_run']} targets ({summary['counts']}) on {workers} "
              f"worker(s): {summary['elapsed']:.1f} s, {summary['tasks_per_second']:.2f} "
              f"targets/s (commit span {t[-1] - t[0]:.1f} s; workers' CPU {cpu:.1f} s, "
              f"sum of per-target times {elapsed:.1f} s; load average {load0:.1f} -> "
              f"{os.getloadavg()[0]:.1f})")
    print(f"aperture speed-up 1 -> 2 workers: {times[1] / times[2]:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--skip-aperture", action="store_true")
    parser.add_argument("--only-aperture", action="store_true")
    args = parser.parse_args()
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as d:
        if not args.only_aperture:
            cache = bench_todo(Path(d) / "todo")
            bench_plan(cache)
            bench_overhead(cache, args.tasks)
        if not args.skip_aperture:
            bench_aperture(Path(d) / "aperture")


if __name__ == "__main__":
    main()
