"""``tessphot run CACHE_DIR --output DIR``: run photometry on every pending task of todo.sqlite.

One coordinator (this process) owns the database: it claims tasks in batches, hands them to
workers, writes results back in batches and renews its leases. Workers never touch the
database, so the same coordinator drives local worker processes (default) or a Dask
distributed cluster (``--dask ADDRESS``), and the SQLite file only needs to be on the
coordinator's disk (caches and the output folder must be visible to every worker).

Failure semantics (LSST-style, decided by :func:`photometry.base.run_target`): SkipTarget ->
SKIPPED, UnprocessableTarget -> ABORT, AlgorithmFailure or an unexpected exception -> ERROR, a
ConfigurationError stops the whole run. On top of that the scheduler handles what the target
code cannot: a worker that dies (segfault, SIGKILL, out of memory) or a task that hangs past
``scheduler.task_timeout`` costs the task one attempt; it is retried until
``scheduler.max_attempts`` and then stored as ERROR with the reason. A dead worker is replaced.

Ctrl-C (or SIGTERM, as sent by SLURM at the time limit) stops cleanly: finished results are
committed, tasks in flight go back to pending with their attempt given back.

``TESSPHOT_EXTRA_PLUGINS=module.a,module.b`` registers extra plugin modules in the coordinator
and every worker, without an entry point; ``TESSPHOT_BLOCK_PLUGINS=name,name`` (``*`` = all)
leaves out installed entry-point plugins. Debugging and testing aids: the fault tests run their
own algorithm alone, so a worker does not import the whole science stack to start.
"""
import collections
import contextlib
import importlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .cli import add_settings_arguments
from .errors import ConfigurationError, InputError
from .settings import load_settings
from .taskstore import ERROR, FAILED, STATUS_NAMES, TODO_NAME, TaskStore, owner_id

__all__ = ["add_arguments", "run", "run_tasks", "WorkerContext", "execute_task",
           "plugin_manager", "EXTRA_PLUGINS_ENV", "BLOCK_PLUGINS_ENV"]

logger = logging.getLogger(__name__)
EXTRA_PLUGINS_ENV = "TESSPHOT_EXTRA_PLUGINS"
BLOCK_PLUGINS_ENV = "TESSPHOT_BLOCK_PLUGINS"
DEFAULT_TASK_FUNCTION = "photometry.run:execute_task"


# =========================================================================== worker side
def _extra_plugin_names(value=None, env=EXTRA_PLUGINS_ENV):
    value = os.environ.get(env, "") if value is None else value
    return [name.strip() for name in value.split(",") if name.strip()]


def plugin_manager(extra_plugins=None, blocked_plugins=None):
    """The plugin manager with the modules named in ``TESSPHOT_EXTRA_PLUGINS`` added and the
    entry-point plugins named in ``TESSPHOT_BLOCK_PLUGINS`` left out (arguments override the
    environment: workers get the coordinator's values, Dask workers have their own env)."""
    from .plugins import ENTRY_POINT_GROUP, get_plugin_manager
    modules = []
    for name in _extra_plugin_names(extra_plugins):
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:
            raise ConfigurationError(f"{EXTRA_PLUGINS_ENV}: cannot import '{name}' ({exc})")
    blocked = _extra_plugin_names(blocked_plugins, BLOCK_PLUGINS_ENV)
    if "*" in blocked:
        from importlib import metadata
        blocked = [ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]
    return get_plugin_manager(blocked=blocked, extra_plugins=modules)


def _resolve(path):
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class _LazySource:
    """A cache opened with :func:`photometry.base.open_source` on first attribute access."""

    def __init__(self, path):
        self._path = path
        self._source = None

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if self._source is None:
            from .base import open_source
            self._source = open_source(self._path)
        return getattr(self._source, name)

    def close(self):
        if self._source is not None and hasattr(self._source, "close"):
            self._source.close()
        self._source = None


class WorkerContext:
    """What a worker process keeps across tasks: plugins, settings and its open caches.

    Why: opening a cache parses the WCS of every frame and reads the sum image, so a worker
    keeps the last ``keep_sources`` caches open (tasks are grouped by CCD, so usually one).
    One context per process, never shared between processes.
    """

    def __init__(self, config, keep_sources=2):
        self.config = config
        self.cache_dir = Path(config["cache_dir"])
        self.output = Path(config["output"])
        self.settings = config["settings"]
        self.plot = bool(config.get("plot"))
        self.keep_sources = keep_sources
        self._pm = None
        self._classes = {}
        self._sources = collections.OrderedDict()
        self._lock = threading.Lock()

    @property
    def pm(self):
        if self._pm is None:
            self._pm = plugin_manager(self.config.get("extra_plugins", ""),
                                      self.config.get("blocked_plugins", ""))
        return self._pm

    def method_class(self, name):
        if name not in self._classes:
            from .plugins import lookup
            self._classes[name] = lookup(self.pm, "register_algorithms", name)
        return self._classes[name]

    def choose_method(self, task):
        if task.get("method"):
            return task["method"]
        name = self.pm.hook.choose_method(target=dict(task), settings=self.settings)
        if not name:
            raise ConfigurationError(
                f"TIC {task['starid']}: no plugin chose a method (choose_method hook returned "
                "None); install the aperture plugin or use --method NAME")
        return name

    def source(self, cache_name):
        """The open cache ``cache_name`` (opened on first use by the algorithm, so an
        unreadable cache becomes the target's ABORT inside ``run_target``)."""
        with self._lock:
            if cache_name in self._sources:
                self._sources.move_to_end(cache_name)
                return self._sources[cache_name]
            src = _LazySource(self.cache_dir / cache_name)
            self._sources[cache_name] = src
            while len(self._sources) > self.keep_sources:
                _, old = self._sources.popitem(last=False)
                old.close()
            return src

    def close(self):
        for src in self._sources.values():
            src.close()
        self._sources.clear()


def execute_task(context, task):
    """Run one task in a worker: choose the method, open the CCD's cache, ``run_target``.

    Returns the result dict the coordinator stores (see :meth:`TaskStore.save_results`).
    Raises ConfigurationError (stops the run); every other failure is a status.
    """
    from .base import run_target
    method = context.choose_method(task)
    cls = context.method_class(method)
    source = context.source(task["cache"])
    res = run_target(cls, task["starid"], source, context.settings, context.output,
                     plot=context.plot)
    lightcurve = res.get("lightcurve")
    if lightcurve:
        try:
            lightcurve = str(Path(lightcurve).resolve().relative_to(context.output.resolve()))
        except ValueError:
            lightcurve = str(lightcurve)
    return {"priority": task["priority"], "starid": task["starid"],
            "status": int(res["status"]),
            "method_used": res.get("method") or method, "elaptime": res.get("elapsed"),
            "lightcurve": lightcurve, "details": res.get("details") or {},
            "error": res.get("error")}


def _worker_log_level():
    """Workers print errors only, unless the run is verbose (-v): each target's warnings are
    kept in todo.sqlite (``tessphot status``) and would otherwise scroll over the progress bar."""
    level = logging.getLogger().getEffectiveLevel()
    return logging.ERROR if level == logging.WARNING else level


def _worker_main(conn, config):
    """Local worker process: receive batches of tasks, send one result per task."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides what Ctrl-C does
    logging.basicConfig(level=config.get("log_level", logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        context = WorkerContext(config)
        function = _resolve(config.get("task_function") or DEFAULT_TASK_FUNCTION)
        if config.get("task_function") in (None, DEFAULT_TASK_FUNCTION):
            # load plugins and the photometry core now: a plugin error is reported before any
            # task, and the task timeout (counted from "ready") does not include the imports
            context.pm
            from . import base  # noqa: F401
    except ConfigurationError as exc:
        conn.send(("fatal", None, str(exc)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        t_wait = time.perf_counter()
        try:
            batch = conn.recv()
        except EOFError:
            break
        wait = time.perf_counter() - t_wait
        if batch is None:
            break
        for task in batch:
            try:
                result = function(context, task)
            except ConfigurationError as exc:
                conn.send(("fatal", task["priority"], str(exc)))
                return
            except Exception as exc:  # noqa: BLE001 - outside run_target: still a status
                logger.exception("task %s failed outside the algorithm", task["priority"])
                message = f"{type(exc).__name__}: {exc}"
                result = {"priority": task["priority"], "starid": task["starid"],
                          "status": ERROR,
                          "method_used": task.get("method") or "unknown", "elaptime": 0.0,
                          "lightcurve": None, "details": {"errors": [message]},
                          "error": message}
            result["worker_wait_time"] = wait
            wait = 0.0
            conn.send(("result", result))
    context.close()


# =========================================================================== backends
#: environment variables that cap the threads of numerical libraries in a worker process
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                     "NUMEXPR_NUM_THREADS")


@contextlib.contextmanager
def _worker_environment(threads):
    """Spawned workers inherit ``os.environ``: cap their BLAS/OpenMP threads while starting one.

    Why: each target's linear algebra would otherwise use every core, so N workers fight
    over the cores and a second worker gains nothing. ``threads`` <= 0 leaves them as they are.
    """
    if threads <= 0:
        yield
        return
    saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    os.environ.update({name: str(threads) for name in _THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _LocalWorker:
    def __init__(self, mp, config, index):
        parent, child = mp.Pipe()
        self.proc = mp.Process(target=_worker_main, args=(child, config),
                               name=f"tessphot-worker-{index}", daemon=True)
        threads = int(config["settings"]["scheduler"].get("worker_threads", 1))
        with _worker_environment(threads):
            self.proc.start()
        child.close()
        self.conn = parent
        self.index = index
        self.inflight = collections.deque()
        self.ready = False
        self.head_started = None
        self.cache = None


class LocalBackend:
    """Worker processes (spawn) fed through pipes; hung or dead workers are replaced."""

    name = "local"

    def __init__(self, config, workers, prefetch, timeout):
        self.mp = multiprocessing.get_context("spawn")
        self.config = config
        self.n = workers
        self.prefetch = prefetch
        self.timeout = timeout
        self.workers = []
        self._count = 0
        self._startup_deaths = 0
        for _ in range(workers):
            self._spawn()

    def _spawn(self):
        self._count += 1
        worker = _LocalWorker(self.mp, self.config, self._count)
        self.workers.append(worker)
        return worker

    def capacity(self):
        """Per idle slot, the cache the worker has open (to keep it on its CCD)."""
        slots = []
        for w in self.workers:
            slots.extend([w] * max(0, 1 + self.prefetch - len(w.inflight)))
        return slots

    def submit(self, worker, tasks):
        if not worker.inflight and worker.ready:
            worker.head_started = time.monotonic()
        worker.inflight.extend(tasks)
        worker.cache = tasks[-1].get("cache")
        worker.conn.send(tasks)

    def inflight(self):
        return [t for w in self.workers for t in w.inflight]

    def _retire(self, worker, reason, attempt_used=True):
        """Worker gone: events for its running task (attempt used) and queued ones."""
        events = []
        if worker.inflight:
            head = worker.inflight.popleft()
            events.append(("failed", head, reason, attempt_used))
            events.extend(("requeue", t) for t in worker.inflight)
            worker.inflight.clear()
        try:
            worker.conn.close()
        except OSError:
            pass
        self.workers.remove(worker)
        if not worker.ready:
            self._startup_deaths += 1
            if self._startup_deaths > 3:
                raise ConfigurationError("worker processes die at start-up "
                                         f"(last exit code {worker.proc.exitcode})")
        return events

    def _drain(self, worker, events):
        while True:
            try:
                if not worker.conn.poll():
                    return True
                msg = worker.conn.recv()
            except (EOFError, OSError):
                return False
            kind = msg[0]
            if kind == "ready":
                worker.ready = True
                self._startup_deaths = 0
                if worker.inflight:
                    worker.head_started = time.monotonic()
            elif kind == "result":
                result = msg[1]
                if worker.inflight and worker.inflight[0]["priority"] == result["priority"]:
                    worker.inflight.popleft()
                worker.head_started = time.monotonic() if worker.inflight else None
                events.append(("result", result))
            elif kind == "fatal":
                task = None
                if worker.inflight and worker.inflight[0]["priority"] == msg[1]:
                    task = worker.inflight.popleft()
                events.append(("fatal", task, msg[2]))
                events.extend(("requeue", t) for t in worker.inflight)
                worker.inflight.clear()
                return False

    def poll(self, timeout):
        events = []
        handles = [w.conn for w in self.workers] + [w.proc.sentinel for w in self.workers]
        multiprocessing.connection.wait(handles, timeout=timeout)
        for worker in list(self.workers):
            alive_pipe = self._drain(worker, events)
            if any(e[0] == "fatal" for e in events):
                return events
            if not alive_pipe or not worker.proc.is_alive():
                worker.proc.join(1)
                code = worker.proc.exitcode
                events.extend(self._retire(
                    worker, f"worker process died (exit code {code}) while running the task"))
                self._spawn()
                continue
            if (worker.inflight and worker.head_started is not None
                    and time.monotonic() - worker.head_started > self.timeout):
                task = worker.inflight[0]
                logger.warning("task %s (TIC %s) timed out after %.0f s; worker killed",
                               task["priority"], task["starid"], self.timeout)
                worker.proc.kill()
                worker.proc.join(5)
                self._drain(worker, events)
                if worker.inflight and worker.inflight[0] is task:
                    worker.ready = True  # do not count a timeout as a start-up death
                    events.extend(self._retire(
                        worker, f"timed out after {self.timeout:g} s (worker killed)"))
                else:
                    events.extend(self._retire(worker, "worker killed"))
                self._spawn()
        return events

    def stop(self, graceful=True):
        for w in self.workers:
            try:
                if graceful:
                    w.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + (5 if graceful else 0)
        for w in self.workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(5)
            try:
                w.conn.close()
            except OSError:
                pass
        self.workers = []


# --- Dask: one WorkerContext per worker process, built on first use
_DASK_CONTEXTS = {}
_DASK_LOCK = threading.Lock()


def _dask_execute(config, task):
    """Run one task on a Dask worker (the context is cached per process and run config)."""
    key = config["run_key"]
    with _DASK_LOCK:
        context = _DASK_CONTEXTS.get(key)
        if context is None:
            _DASK_CONTEXTS.clear()  # an older run's caches
            context = _DASK_CONTEXTS[key] = WorkerContext(config)
    function = _resolve(config.get("task_function") or DEFAULT_TASK_FUNCTION)
    t0 = time.perf_counter()
    result = function(context, task)
    result.setdefault("worker_wait_time", 0.0)
    result["elaptime"] = result.get("elaptime") or (time.perf_counter() - t0)
    return result


class DaskBackend:
    """Tasks as Dask futures on an existing cluster (``dask scheduler`` / ``dask worker``).

    A task whose worker dies is re-run by Dask on another worker; after Dask's own
    ``allowed-failures`` it raises KilledWorker, which costs the task one attempt here.
    A hung task is cancelled after its timeout and marked; Dask cannot interrupt the thread,
    so that worker thread stays busy until the worker is restarted.
    """

    name = "dask"

    def __init__(self, address, config, inflight_per_thread, timeout):
        try:
            import distributed
        except ImportError:
            raise ConfigurationError("--dask needs the 'distributed' package "
                                     "(pip install 'photometry[dask]')") from None
        self.distributed = distributed
        try:
            self.client = distributed.Client(address, timeout=30)
        except (OSError, TimeoutError) as exc:
            raise InputError(f"--dask {address}: cannot connect to the scheduler ({exc})") \
                from None
        self.config = config
        self.timeout = timeout
        self.per_thread = inflight_per_thread
        self.futures = {}  # future -> (task, deadline)
        self.n = max(1, sum(self.client.nthreads().values()))
        self._config_future = self.client.scatter(config, broadcast=True, hash=False)

    def capacity(self):
        threads = max(1, sum(self.client.nthreads().values()))
        self.n = threads
        return [self] * max(0, threads * self.per_thread - len(self.futures))

    def submit(self, slot, tasks):
        for task in tasks:
            fut = self.client.submit(_dask_execute, self._config_future, task, pure=False,
                                     key=f"tessphot-{self.config['run_key']}-{task['priority']}"
                                         f"-{task['attempts']}")
            # the deadline allows for the queue in front of the task on its worker thread
            self.futures[fut] = (task, time.monotonic() + self.timeout * (1 + self.per_thread))

    def inflight(self):
        return [task for task, _ in self.futures.values()]

    def poll(self, timeout):
        events = []
        if not self.futures:
            time.sleep(min(timeout, 0.2))
            return events
        try:
            done, _ = self.distributed.wait(list(self.futures), timeout=timeout,
                                            return_when="FIRST_COMPLETED")
        except self.distributed.TimeoutError:
            done = set()
        except TimeoutError:
            done = set()
        for fut in done:
            task, _ = self.futures.pop(fut)
            if fut.status == "finished":
                events.append(("result", fut.result()))
                continue
            exc = fut.exception()
            if isinstance(exc, ConfigurationError):
                events.append(("fatal", task, str(exc)))
            else:
                events.append(("failed", task, f"{type(exc).__name__}: {exc}", True))
        now = time.monotonic()
        for fut, (task, deadline) in list(self.futures.items()):
            if now > deadline:
                fut.cancel()
                self.futures.pop(fut)
                events.append(("failed", task, f"timed out after {self.timeout:g} s "
                                                "(Dask future cancelled)", True))
        return events

    def stop(self, graceful=True):
        for fut in list(self.futures):
            fut.cancel()
        self.futures.clear()
        self.client.close()


# =========================================================================== coordinator
class _Interrupted(Exception):
    pass


def _atomic_json(path, data):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def run_tasks(cache_dir, output, settings=None, workers=None, method=None, dask=None,
              filters=None, limit=None, mode="pending", plot=False, task_function=None,
              progress=True, command=""):
    """Run the pending tasks of ``cache_dir/todo.sqlite``; returns the summary dict.

    ``mode``: "pending" (skip finished tasks), "failed" (also redo ERROR/ABORT) or "all"
    (``--overwrite``). ``task_function`` ("module:function") replaces :func:`execute_task`
    in the workers (the scheduler benchmark uses a no-op one).

    Raises
    ------
    ConfigurationError
        From the plugins or the settings: the run stops, nothing is lost.
    KeyboardInterrupt
        After a clean stop (results committed, tasks in flight back to pending).
    """
    settings = settings or load_settings()
    sched = settings["scheduler"]
    cache_dir, output = Path(cache_dir), Path(output)
    todo_path = cache_dir / TODO_NAME
    store = TaskStore(todo_path, busy_timeout=sched["busy_timeout"])
    output.mkdir(parents=True, exist_ok=True)
    filters = {k: v for k, v in (filters or {}).items() if v is not None}
    owner = owner_id()
    extra = ",".join(_extra_plugin_names())
    blocked = ",".join(_extra_plugin_names(env=BLOCK_PLUGINS_ENV))
    if task_function in (None, DEFAULT_TASK_FUNCTION) and method:
        from .plugins import lookup
        lookup(plugin_manager(extra, blocked), "register_algorithms", method)  # fail fast
    n_workers = workers or sched["workers"] or os.cpu_count() or 1
    max_attempts = int(sched["max_attempts"])
    timeout = float(sched["task_timeout"])
    lease = float(sched["lease"])

    requeued = store.requeue_stale(max_attempts)
    reset = store.reset(mode, filters)
    if requeued:
        logger.warning("%d tasks of a dead run put back in the queue", requeued)
    total = store.count(filters, pending_only=True)
    if limit is not None:
        total = min(total, int(limit))
    config = {"cache_dir": str(cache_dir.resolve()), "output": str(output.resolve()),
              "settings": settings, "plot": plot, "extra_plugins": extra,
              "blocked_plugins": blocked,
              "task_function": task_function, "run_key": f"{owner}-{time.time():.0f}",
              "log_level": _worker_log_level()}

    backend_name = "dask" if dask else "local"
    run_id = store.start_run(owner, backend_name, n_workers if not dask else 0, command)
    summary = {"run_id": run_id, "backend": backend_name, "todo": str(todo_path),
               "numtasks": store.count(filters), "tasks_to_run": total, "tasks_run": 0,
               "requeued_at_start": requeued, "reset_at_start": reset,
               "counts": {}, "retried": 0, "last_error": None, "mean_elaptime": None,
               "elapsed": 0.0, "tasks_per_second": 0.0, "interrupted": False}
    summary_path = output / "summary.json"
    claimed_total = 0
    buffered, local = [], collections.deque()
    prefer = None
    t_start = time.monotonic()
    t_commit = t_beat = t_summary = t_start
    exhausted = False
    interrupted = False
    backend = None
    bar = None

    def on_sigterm(signum, frame):
        raise _Interrupted()

    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, on_sigterm)

    def flush():
        nonlocal t_commit
        if buffered:
            orphans = store.save_results(buffered, owner=owner)
            for rel in orphans:
                (output / rel).unlink(missing_ok=True)
            buffered.clear()
        t_commit = time.monotonic()

    def write_summary(final=False):
        nonlocal t_summary
        elapsed = time.monotonic() - t_start
        summary["elapsed"] = round(elapsed, 3)
        summary["tasks_per_second"] = round(summary["tasks_run"] / elapsed, 3) if elapsed else 0
        summary["status_all"] = store.status_counts(filters)
        summary["finished"] = final
        _atomic_json(summary_path, summary)
        t_summary = time.monotonic()

    try:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="task", disable=not progress, dynamic_ncols=True,
                   mininterval=0.5, smoothing=0.05, desc="tessphot run")
        if total == 0:
            logger.info("%s: no pending task matches; no workers started", todo_path)
        elif dask:
            backend = DaskBackend(dask, config, int(sched["dask_inflight"]), timeout)
        else:
            backend = LocalBackend(config, n_workers, int(sched["prefetch"]), timeout)
        while backend is not None:
            # ---------------------------------------------------------------- dispatch
            slots = backend.capacity()
            if slots and not exhausted and len(local) < len(slots):
                want = max(int(sched["claim_batch"]), len(slots))
                if limit is not None:
                    want = min(want, int(limit) - claimed_total)
                got = store.claim(owner, n=want, lease=lease, filters=filters,
                                  prefer_cache=prefer, method=method) if want > 0 else []
                claimed_total += len(got)
                if got:
                    prefer = got[-1]["cache"]
                local.extend(got)
                if not got:
                    exhausted = True
            free = collections.Counter(slots)  # one message per worker, several tasks
            for slot, n_free in free.items():
                batch = []
                cache = getattr(slot, "cache", None)
                while local and len(batch) < n_free:
                    if local[0]["cache"] == cache or cache is None:
                        batch.append(local.popleft())
                        continue
                    pick = next((i for i, t in enumerate(local) if t["cache"] == cache), 0)
                    batch.append(local[pick])
                    del local[pick]
                    cache = batch[-1]["cache"]
                if batch:
                    backend.submit(slot, batch)
            if exhausted and not local and not backend.inflight():
                break
            # ---------------------------------------------------------------- collect
            fatal = None
            for event in backend.poll(0.2):
                kind = event[0]
                if kind == "result":
                    result = event[1]
                    buffered.append(result)
                    summary["tasks_run"] += 1
                    name = STATUS_NAMES.get(int(result["status"]), str(result["status"]))
                    summary["counts"][name] = summary["counts"].get(name, 0) + 1
                    if int(result["status"]) in FAILED and result.get("error"):
                        summary["last_error"] = f"TIC {result.get('starid')}: {result['error']}"
                    el = result.get("elaptime")
                    if el is not None:
                        m = summary["mean_elaptime"]
                        summary["mean_elaptime"] = el if m is None else 0.9 * m + 0.1 * el
                    bar.update(1)
                elif kind == "requeue":  # queued on a worker that died: still ours
                    local.appendleft(event[1])
                elif kind == "failed":
                    task, reason = event[1], event[2]
                    store.release([task["priority"]], attempt_used=True,
                                  max_attempts=max_attempts, message=reason, owner=owner)
                    summary["last_error"] = f"TIC {task['starid']}: {reason}"
                    logger.warning("task %s (TIC %s): %s", task["priority"], task["starid"],
                                   reason)
                    if task["attempts"] >= max_attempts:
                        summary["tasks_run"] += 1
                        summary["counts"]["ERROR"] = summary["counts"].get("ERROR", 0) + 1
                        bar.update(1)
                    else:
                        summary["retried"] += 1
                        exhausted = False
                elif kind == "fatal":
                    task, message = event[1], event[2]
                    if task is not None:
                        local.appendleft(task)
                    fatal = message
            if fatal:
                raise ConfigurationError(fatal)
            now = time.monotonic()
            if len(buffered) >= int(sched["commit_every"]) or (
                    buffered and now - t_commit > float(sched["commit_interval"])):
                flush()
                bar.set_postfix({k: v for k, v in summary["counts"].items()}, refresh=False)
            if now - t_beat > float(sched["heartbeat"]):
                store.heartbeat(owner, lease)
                t_beat = now
            if now - t_summary > float(sched["summary_interval"]):
                write_summary()
    except (KeyboardInterrupt, _Interrupted):
        interrupted = True
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        # Collect what already finished, then give everything else back.
        if backend is not None:
            try:
                if interrupted:
                    for event in backend.poll(0):
                        if event[0] == "result":
                            buffered.append(event[1])
                            summary["tasks_run"] += 1
                leftover = backend.inflight()
                backend.stop(graceful=not interrupted)
            except Exception:  # noqa: BLE001 - still give the tasks back below
                logger.exception("stopping the workers failed")
                leftover = backend.inflight() if backend else []
        else:
            leftover = []
        try:
            flush()
        finally:
            store.release([t["priority"] for t in list(local) + list(leftover)],
                          attempt_used=False, owner=owner)
            summary["interrupted"] = interrupted
            store.finish_run(run_id, summary["tasks_run"], summary["counts"], interrupted)
            write_summary(final=True)
            if bar is not None:
                bar.close()
            failed = store.count_status(FAILED, filters)
            summary["failed"] = int(failed or 0)
            store.close()
    if interrupted:
        raise KeyboardInterrupt
    return summary


# =========================================================================== command line
def add_arguments(parser):
    parser.add_argument("cache_dir", metavar="CACHE_DIR", help="folder with todo.sqlite and "
                        "the caches")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="folder for the light curves and summary.json")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="local worker processes (default: one per core)")
    parser.add_argument("--method", default=None, metavar="NAME",
                        help="force this algorithm for every target (default: dynamic policy)")
    parser.add_argument("--dask", default=None, metavar="ADDRESS",
                        help="run on this Dask scheduler (tcp://host:8786) instead of local "
                             "processes")
    parser.add_argument("--starid", type=int, action="append", default=None,
                        help="only this TIC (repeatable)")
    parser.add_argument("--tmag-min", type=float, default=None, help="only Tmag >= this")
    parser.add_argument("--tmag-max", type=float, default=None, help="only Tmag <= this")
    parser.add_argument("--camera", type=int, default=None, choices=[1, 2, 3, 4])
    parser.add_argument("--ccd", type=int, default=None, choices=[1, 2, 3, 4])
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="run at most N tasks")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true",
                       help="redo every matching task, finished or not (results replaced)")
    group.add_argument("--retry-failed", action="store_true",
                       help="also redo tasks that ended ERROR or ABORT")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="per-task timeout in seconds (default: scheduler.task_timeout)")
    parser.add_argument("--plot", action="store_true", help="also write diagnostic plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_settings_arguments(parser)


def run(args):
    extra = {}
    if args.timeout is not None:
        extra["scheduler"] = {"task_timeout": args.timeout}
    settings = load_settings(args.settings, args.assignments, extra=extra)
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers {args.workers}: must be at least 1")
    filters = {"starid": args.starid, "tmag_min": args.tmag_min, "tmag_max": args.tmag_max,
               "camera": args.camera, "ccd": args.ccd}
    mode = "all" if args.overwrite else ("failed" if args.retry_failed else "pending")
    summary = run_tasks(args.cache_dir, args.output, settings=settings, workers=args.workers,
                        method=args.method, dask=args.dask, filters=filters, limit=args.limit,
                        mode=mode, plot=args.plot, progress=not args.no_progress,
                        command=" ".join(sys.argv))
    from .correct import finish_run
    finish_run(args.cache_dir, args.output, settings)   # co-trending and the CCD summaries
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary["counts"].items())) or "nothing"
    print(f"{summary['tasks_run']} tasks in {summary['elapsed']:.1f} s "
          f"({summary['tasks_per_second']:.1f}/s): {counts}")
    if summary["last_error"]:
        print(f"last error: {summary['last_error']}")
    return 1 if summary["failed"] else 0
