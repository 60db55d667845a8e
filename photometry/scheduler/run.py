"""``tessphot run CACHE_DIR --output DIR``: run photometry on every pending task of todo.sqlite.

One coordinator (this process) owns the database: it plans which (task, method) results the
run wants, claims them in batches, hands them to workers, writes results back in batches and
renews its leases. Workers never touch the database, so the same coordinator drives local
worker processes (default) or a Dask distributed cluster (``--dask ADDRESS``), and the SQLite
file only needs to be on the coordinator's disk (caches and the output folder must be visible
to every worker).

Failure semantics (LSST-style, decided by :func:`photometry.scheduler.target.run_target`): SkipTarget ->
SKIPPED, UnprocessableTarget -> ABORT, AlgorithmFailure or an unexpected exception -> ERROR, a
ConfigurationError stops the whole run, a full disk stops it too. On top of that the scheduler
handles what the target code cannot: a worker that dies (segfault, SIGKILL, out of memory) or a
task that hangs past ``scheduler.task_timeout`` costs the task one attempt; it is retried until
``scheduler.max_attempts`` and then stored as ERROR with the reason. A dead worker is replaced.
A task that was only claimed, or whose coordinator died, costs nothing.

Output files follow the database: a worker writes its files into its own staging folder
(``OUTPUT/.tessphot-staging/HOST-PID/``); the coordinator moves them into OUTPUT only after
the commit that accepted the result (:meth:`TaskStore.apply_file_ops`), and discards the files
of results it drops. Local workers die with their coordinator (Linux: ``PR_SET_PDEATHSIG``;
elsewhere a watchdog thread polls the parent), so a killed run leaves no process writing.

Ctrl-C (or SIGTERM, as sent by SLURM at the time limit) stops cleanly: finished results are
committed, tasks in flight go back to pending uncharged.

``TESSPHOT_EXTRA_PLUGINS`` and ``TESSPHOT_BLOCK_PLUGINS`` (:mod:`photometry.hooks.plugins`) apply
in the coordinator and every worker, Dask workers included: the workers get the coordinator's
values. Debugging and testing aids: the fault tests run their own algorithm alone, so a
worker does not import the whole science stack to start.
"""
import collections
import contextlib
import functools
import importlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from photometry.hooks.commandline import (add_settings_arguments, at_least, finite_float, one_line,
                                          output_folder, tic_id, use_log_file)
from photometry.hooks.errors import ConfigurationError, InputError, disk_full
from photometry.hooks.settings import load_settings
from photometry.data.taskstore import (ERROR, FAILED, STATUS_NAMES, TODO_NAME, TaskStore, owner_alive,
                                       owner_id)

__all__ = ["add_arguments", "run", "run_tasks", "WorkerContext", "execute_task"]

logger = logging.getLogger(__name__)
DEFAULT_TASK_FUNCTION = "photometry.scheduler.run:execute_task"
#: workers' private folder inside OUTPUT for files not yet accepted by the coordinator
STAGING = ".tessphot-staging"
#: seconds between the worker watchdog's checks that its coordinator is alive
WATCHDOG_INTERVAL = 0.5


# =========================================================================== worker side
def _resolve(path):
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class _LazySource:
    """A cache opened with :func:`photometry.data.sources.open_source` on first attribute access,
    its stamps served by a :class:`photometry.data.stampcache.BlockCache` of ``cache_bytes``
    (0: none)."""

    def __init__(self, path, cache_bytes=0):
        self._path = path
        self._source = None
        self._cache_bytes = int(cache_bytes)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if self._source is None:
            from photometry.data.sources import open_source
            source = open_source(self._path)
            if self._cache_bytes > 0 and getattr(source, "datasource", None) == "ffi":
                from photometry.data.stampcache import BlockCache
                source = BlockCache(source, self._cache_bytes)
            self._source = source
        return getattr(self._source, name)

    def prefetch(self, task):
        """Announce the default stamp of a coming task (only if this cache is open)."""
        source = self._source
        if source is None or not hasattr(source, "prefetch"):
            return
        try:
            r = int(round(float(task["row"]))) - int(source.row_offset)
            c = int(round(float(task["column"]))) - int(source.column_offset)
            h, w = int(task["stamp_rows"]) // 2, int(task["stamp_cols"]) // 2
        except (KeyError, TypeError, ValueError):
            return
        source.prefetch(slice(max(0, r - h), r + h + 1), slice(max(0, c - w), c + w + 1))

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
        self.staging = Path(config["staging"]) if config.get("staging") else None
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
            from photometry.hooks.plugins import default_plugin_manager, plugin_names, use_plugins
            names = (self.config.get("blocked_plugins", ""), self.config.get("extra_plugins", ""))
            if tuple(",".join(n) for n in plugin_names()) != names:
                use_plugins(*names)  # e.g. a Dask worker: the coordinator's plugins
            self._pm = default_plugin_manager()
        return self._pm

    def method_class(self, name):
        if name not in self._classes:
            from photometry.hooks.plugins import lookup
            self._classes[name] = lookup(self.pm, "register_algorithms", name)
        return self._classes[name]

    def task_folder(self, task):
        """An empty folder of this process for one task's files (its staging folder), or the
        output folder itself when the run has no staging."""
        if self.staging is None:
            return self.output
        folder = (self.staging / f"{socket.gethostname()}-{os.getpid()}"
                  / f"{task['priority']}-{task['method']}")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def source(self, cache_name):
        """The open cache ``cache_name`` (opened on first use by the algorithm, so an
        unreadable cache becomes the target's ABORT inside ``run_target``)."""
        with self._lock:
            if cache_name in self._sources:
                self._sources.move_to_end(cache_name)
                return self._sources[cache_name]
            mb = float(self.settings.get("scheduler", {}).get("stamp_cache_mb", 0) or 0)
            src = _LazySource(self.cache_dir / cache_name, cache_bytes=mb * 1024 ** 2)
            self._sources[cache_name] = src
            while len(self._sources) > self.keep_sources:
                _, old = self._sources.popitem(last=False)
                old.close()
            return src

    def prefetch(self, task):
        """Let the open cache of ``task`` start reading its stamp (a hint, never an error)."""
        src = self._sources.get(task.get("cache"))
        if src is not None:
            try:
                src.prefetch(task)
            except Exception:  # noqa: BLE001 - a failed hint costs nothing but the hint
                logger.debug("prefetch of task %s failed", task.get("priority"), exc_info=True)

    def close(self):
        for src in self._sources.values():
            src.close()
        self._sources.clear()


def execute_task(context, task):
    """Run one task in a worker: open the CCD's cache, ``run_target`` with the task's method.

    The files go to the task's staging folder (:meth:`WorkerContext.task_folder`); the result
    lists them (``files``, relative) for the coordinator to publish once it accepts it.
    Returns the result dict the coordinator stores (see :meth:`TaskStore.save_results`).
    Raises ConfigurationError (stops the run) or a disk-full OSError; every other failure is
    a status.
    """
    from photometry.scheduler.target import run_target
    method = task["method"]
    cls = context.method_class(method)
    source = context.source(task["cache"])
    folder = context.task_folder(task)
    res = run_target(cls, task["starid"], source, context.settings, folder,
                     plot=context.plot)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) \
        if folder != context.output else []
    lightcurve = res.get("lightcurve")
    if lightcurve:
        try:
            lightcurve = str(Path(lightcurve).resolve().relative_to(folder.resolve()))
        except ValueError:
            lightcurve = str(lightcurve)
    return {"priority": task["priority"], "method": method, "starid": task["starid"],
            "status": int(res["status"]), "method_used": res.get("method") or method,
            "elaptime": res.get("elapsed"), "lightcurve": lightcurve, "files": files,
            "staging": str(folder) if folder != context.output else None,
            "details": res.get("details") or {}, "error": res.get("error")}


def _die_with_parent(parent_pid):
    """Make this worker process end when its coordinator does: the kernel's parent-death
    signal on Linux (immediate), and a watchdog thread everywhere (within
    :data:`WATCHDOG_INTERVAL`). A worker must not go on computing, or writing, for a
    coordinator that is gone."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # it died before the signal was armed
        os._exit(1)

    def watch():
        while True:
            time.sleep(WATCHDOG_INTERVAL)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="tessphot-watchdog", daemon=True).start()


def _worker_log_level():
    """Workers print errors only, unless the run is verbose (-v): each target's warnings are
    kept in todo.sqlite (``tessphot status``) and would otherwise scroll over the progress bar."""
    from photometry.hooks.commandline import stderr_level
    level = stderr_level()
    return logging.ERROR if level >= logging.WARNING else level


def _worker_main(conn, config):
    """Local worker process: receive batches of tasks, send one result per task."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides what Ctrl-C does
    if config.get("coordinator_pid"):
        _die_with_parent(config["coordinator_pid"])
    from photometry.hooks.commandline import configure_logging
    configure_logging(config.get("log_level", logging.WARNING), config.get("log_file"),
                      rotate=False)
    try:
        context = WorkerContext(config)
        function = _resolve(config.get("task_function") or DEFAULT_TASK_FUNCTION)
        if config.get("task_function") in (None, DEFAULT_TASK_FUNCTION):
            from photometry.scheduler.target import setup_worker
            setup_worker(context.settings)
            # load plugins and the photometry core now: a plugin error is reported before any
            # task, and the task timeout (counted from "ready") does not include the imports
            context.pm
            from photometry.core import base  # noqa: F401
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
        for k, task in enumerate(batch):
            if k + 1 < len(batch):
                context.prefetch(batch[k + 1])
            try:
                result = function(context, task)
            except ConfigurationError as exc:
                conn.send(("fatal", task["priority"], str(exc)))
                return
            except Exception as exc:  # noqa: BLE001 - outside run_target: still a status
                if disk_full(exc):
                    conn.send(("fatal", task["priority"],
                               _disk_full_message(exc, context.output)))
                    return
                logger.exception("task %s failed outside the algorithm", task["priority"])
                message = f"{type(exc).__name__}: {exc}"
                result = {"priority": task["priority"], "starid": task["starid"],
                          "status": ERROR, "method_used": task.get("method") or "unknown",
                          "elaptime": 0.0, "lightcurve": None,
                          "details": {"errors": [message]}, "error": message}
            result["method"] = task["method"]
            result["worker_wait_time"] = wait
            wait = 0.0
            conn.send(("result", result))
    context.close()


def _disk_full_message(exc, folder=None):
    where = exc.filename or folder
    where = f"{where}: " if where else ""
    return f"{where}no space left on device; run stopped, finished results are kept"


# =========================================================================== backends
@contextlib.contextmanager
def _worker_environment(threads):
    """Spawned workers inherit ``os.environ``: cap their BLAS/OpenMP threads while starting one.

    Why: each target's linear algebra would otherwise use every core, so N workers fight
    over the cores and a second worker gains nothing. ``threads`` <= 0 leaves them as they are.
    In-process paths use :func:`photometry.scheduler.target.limit_threads` (the same count);
    every worker also calls :func:`photometry.scheduler.target.setup_worker` when it starts.
    """
    from photometry.scheduler.target import THREAD_VARIABLES
    if threads <= 0:
        yield
        return
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update({name: str(threads) for name in THREAD_VARIABLES})
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

    def _retire(self, worker, reason):
        """Worker gone: its running task failed (one attempt charged, ``reason``); the tasks
        only queued on it go back to the queue uncharged, and so do all of them if it died
        before it was ready (none had started)."""
        events = []
        if worker.inflight and worker.ready:
            events.append(("failed", worker.inflight.popleft(), reason))
        events.extend(("requeue", t) for t in worker.inflight)
        worker.inflight.clear()
        try:
            worker.conn.close()
        except OSError:
            pass
        self.workers.remove(worker)
        if not worker.ready:
            self._startup_deaths += 1
            if self._startup_deaths > 3:  # after the requeues: the run stops, nothing charged
                events.append(("fatal", None, "worker processes die at start-up (last exit "
                                              f"code {worker.proc.exitcode})"))
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
                if any(e[0] == "fatal" for e in events):
                    return events
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
            from photometry.scheduler.target import setup_worker
            setup_worker(context.settings)
    function = _resolve(config.get("task_function") or DEFAULT_TASK_FUNCTION)
    t0 = time.perf_counter()
    result = function(context, task)
    result["method"] = task["method"]
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
        self._submitted = 0
        self.n = max(1, sum(self.client.nthreads().values()))
        self._config_future = self.client.scatter(config, broadcast=True, hash=False)

    def capacity(self):
        threads = max(1, sum(self.client.nthreads().values()))
        self.n = threads
        return [self] * max(0, threads * self.per_thread - len(self.futures))

    def submit(self, slot, tasks):
        for task in tasks:
            self._submitted += 1
            fut = self.client.submit(_dask_execute, self._config_future, task, pure=False,
                                     key=f"tessphot-{self.config['run_key']}-{task['priority']}"
                                         f"-{task['method']}-{self._submitted}")
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
            elif disk_full(exc):
                events.append(("fatal", task, _disk_full_message(exc, self.config["output"])))
            else:
                events.append(("failed", task, f"{type(exc).__name__}: {exc}"))
        now = time.monotonic()
        for fut, (task, deadline) in list(self.futures.items()):
            if now > deadline:
                fut.cancel()
                self.futures.pop(fut)
                events.append(("failed", task, f"timed out after {self.timeout:g} s "
                                                "(Dask future cancelled)"))
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


def _choose_method(pm, settings, task):
    return pm.hook.choose_method(target=dict(task), settings=settings)


def _clean_staging(root, lease, remove_root=False):
    """Remove staging folders of workers that are gone: dead processes of this host, and of
    other hosts (Dask) folders untouched for two leases. With ``remove_root`` (the end of a
    run) also the empty folders of live workers and the staging folder itself if empty."""
    if not root.is_dir():
        return
    host = socket.gethostname()
    for folder in root.iterdir():
        name, _, pid = folder.name.rpartition("-")
        if name == host:
            gone = not owner_alive(f"{host}:{pid}")
        else:
            try:
                gone = time.time() - folder.stat().st_mtime > 2 * lease
            except OSError:
                continue
        if gone:
            shutil.rmtree(folder, ignore_errors=True)
        elif remove_root:  # at the end of a run: a live worker's folder if it is empty
            with contextlib.suppress(OSError):
                folder.rmdir()
    if remove_root:
        with contextlib.suppress(OSError):
            root.rmdir()


def nothing_to_do_message(counts, methods, mode):
    """Why a run has nothing to do, and which option would give it something."""
    if not methods:
        return "no task matches the filters"
    names = ", ".join(sorted(methods))
    done = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    hints = ["--overwrite redoes them"]
    if any(k in counts for k in ("ERROR", "ABORT")) and mode != "failed":
        hints.append("--retry-failed redoes the ERROR/ABORT ones")
    hints.append("--method NAME adds another method's results beside them")
    started = counts.get("STARTED", 0)
    if started:
        return (f"nothing pending for {names}: {done}; {started} are being run by another "
                "coordinator (or one whose lease has not expired yet)")
    return f"all {sum(counts.values())} results of {names} are done ({done}); " \
           + "; ".join(hints)


class _Coordinator:
    """One run: plan, claim, dispatch, collect, commit, stop. State of :func:`run_tasks`."""

    def __init__(self, store, settings, output, limit, progress):
        self.store, self.settings, self.output = store, settings, output
        self.sched = settings["scheduler"]
        self.limit, self.progress = limit, progress
        self.owner = owner_id()
        self.max_attempts = int(self.sched["max_attempts"])
        self.lease = float(self.sched["lease"])
        self.buffered, self.local = [], collections.deque()
        self.claimed = 0
        self.seen_skipped = store.pending_skipped  # those of planning are not in the total
        self.seen_unskipped = store.unskipped
        self.prefer = None
        self.exhausted = False
        self.backend = None
        self.bar = None
        self.summary = None
        self.t_start = self.t_commit = self.t_beat = self.t_summary = time.monotonic()
        self.t_wall = time.time()

    # ---------------------------------------------------------------- commits
    def flush(self):
        if self.buffered:
            finals = self.store.save_results(self.buffered, owner=self.owner)
            self.buffered.clear()
            for status in finals.values():
                name = STATUS_NAMES.get(status, str(status))
                self.summary["counts"][name] = self.summary["counts"].get(name, 0) + 1
            self.store.apply_file_ops()
            if self.store.unskipped != self.seen_unskipped:  # pending again: claim them
                self.seen_unskipped = self.store.unskipped
                self.exhausted = False
            skipped = self.store.pending_skipped - self.seen_skipped
            if skipped and self.limit is None and self.bar is not None:
                # tasks a kept light curve holds are SKIPPED without running: less to do
                self.seen_skipped = self.store.pending_skipped
                self.bar.total -= skipped
                self.bar.refresh()
        self.t_commit = time.monotonic()

    def write_summary(self, final=False):
        elapsed = time.monotonic() - self.t_start
        s = self.summary
        s["elapsed"] = round(elapsed, 3)
        s["tasks_per_second"] = round(s["tasks_run"] / elapsed, 3) if elapsed else 0
        s["status_all"] = self.store.wanted_counts()
        s["finished"] = final
        _atomic_json(self.output / "summary.json", s)
        self.t_summary = time.monotonic()

    # ---------------------------------------------------------------- dispatch
    def dispatch(self):
        slots = self.backend.capacity()
        if slots and not self.exhausted and len(self.local) < len(slots):
            want = max(int(self.sched["claim_batch"]), len(slots))
            if self.limit is not None:
                want = min(want, int(self.limit) - self.claimed)
            got = self.store.claim(self.owner, n=want, lease=self.lease,
                                   prefer_cache=self.prefer,
                                   output=self.output) if want > 0 else []
            self.claimed += len(got)
            if got:
                self.prefer = got[-1]["cache"]
            self.local.extend(got)
            if not got:
                self.exhausted = True
        for slot, n_free in collections.Counter(slots).items():  # one message per worker
            batch = []
            cache = getattr(slot, "cache", None)
            while self.local and len(batch) < n_free:
                if self.local[0]["cache"] == cache or cache is None:
                    batch.append(self.local.popleft())
                    continue
                pick = next((i for i, t in enumerate(self.local) if t["cache"] == cache), 0)
                batch.append(self.local[pick])
                del self.local[pick]
                cache = batch[-1]["cache"]
            if batch:
                self.backend.submit(slot, batch)
        done = self.exhausted and not self.local and not self.backend.inflight()
        if done and self.buffered:  # the last results may give work back (see flush)
            self.flush()
            done = self.exhausted
        return not done

    # ---------------------------------------------------------------- collect
    def collect(self, events):
        s = self.summary
        fatal = None
        for event in events:
            kind = event[0]
            if kind == "result":
                result = event[1]
                self.buffered.append(result)
                s["tasks_run"] += 1
                if int(result["status"]) in FAILED and result.get("error"):
                    s["last_error"] = f"TIC {result.get('starid')}: {result['error']}"
                el = result.get("elaptime")
                if el is not None:
                    m = s["mean_elaptime"]
                    s["mean_elaptime"] = el if m is None else 0.9 * m + 0.1 * el
                self.bar.update(1)
            elif kind == "requeue":  # not started on a worker that died: still ours, uncharged
                self.local.appendleft(event[1])
            elif kind == "failed":
                task, reason = event[1], event[2]
                self.store.release([(task["priority"], task["method"])], attempt_used=True,
                                   max_attempts=self.max_attempts, message=reason,
                                   owner=self.owner)
                s["last_error"] = f"TIC {task['starid']}: {reason}"
                logger.warning("task %s (TIC %s, %s): %s", task["priority"], task["starid"],
                               task["method"], reason)
                if task["attempts"] + 1 >= self.max_attempts:
                    s["tasks_run"] += 1
                    s["counts"]["ERROR"] = s["counts"].get("ERROR", 0) + 1
                    self.bar.update(1)
                else:
                    s["retried"] += 1
                    self.exhausted = False
            elif kind == "fatal":  # raised once the other events are taken in
                task, fatal = event[1], event[2]
                if task is not None:
                    self.local.appendleft(task)
        if fatal:
            raise ConfigurationError(fatal)

    def tick(self):
        now = time.monotonic()
        if len(self.buffered) >= int(self.sched["commit_every"]) or (
                self.buffered and now - self.t_commit > float(self.sched["commit_interval"])):
            self.flush()
            self.bar.set_postfix(dict(self.summary["counts"]), refresh=False)
        if now - self.t_beat > float(self.sched["heartbeat"]):
            self.store.heartbeat(self.owner, self.lease)
            self.t_beat = now
        if now - self.t_summary > float(self.sched["summary_interval"]):
            self.write_summary()

    # ---------------------------------------------------------------- stop
    def shutdown(self, interrupted):
        """Collect what finished, commit it, give the rest back uncharged. Each step runs even
        if an earlier one failed (a full disk fails many); the first failure is re-raised
        unless another exception is already on its way."""
        failures = []

        def step(function, *args):
            try:
                return function(*args)
            except Exception as exc:  # noqa: BLE001 - logged; the other steps still run
                logger.info("stopping the run: %s failed", function.__name__, exc_info=True,
                            extra={"stderr": False})
                failures.append(exc)
                return None

        leftover = []
        if self.backend is not None:
            if interrupted:
                for event in step(self.backend.poll, 0) or []:
                    if event[0] == "result":
                        self.buffered.append(event[1])
                        self.summary["tasks_run"] += 1
            leftover = list(self.backend.inflight())
            step(self.backend.stop, not interrupted)
        step(self.flush)
        step(self.store.release,
             [(t["priority"], t["method"]) for t in list(self.local) + leftover], False,
             None, None, self.owner)
        self.summary["interrupted"] = interrupted
        counts = step(self.store.wanted_counts) or {}
        self.summary["status_all"] = counts
        self.summary["failed"] = sum(counts.get(STATUS_NAMES[c], 0) for c in FAILED)
        done = step(self.store.counts_since, self.owner, self.t_wall)
        if done is not None:
            self.summary["counts"] = done
        step(self.store.finish_run, self.summary["run_id"], self.summary["tasks_run"],
             self.summary["counts"], interrupted)
        step(self.write_summary, True)
        step(_clean_staging, self.output / STAGING, self.lease, True)
        if self.bar is not None:
            self.bar.close()
        return failures[0] if failures else None


def run_tasks(cache_dir, output, settings=None, workers=None, method=None, dask=None,
              filters=None, limit=None, mode="pending", plot=False, task_function=None,
              progress=True, command=""):
    """Run the planned results of ``cache_dir/todo.sqlite``; returns the summary dict.

    ``method``: one algorithm for every task (results of other methods are kept beside);
    None: each task's ``method`` column, else the ``choose_method`` policy. ``mode``:
    "pending" (skip finished results), "failed" (also redo ERROR/ABORT) or "all"
    (``--overwrite``: redo this run's results; other methods' stay). ``task_function``
    ("module:function") replaces :func:`execute_task` in the workers (the scheduler
    benchmark uses a no-op one).

    Raises
    ------
    InputError, ConfigurationError
        Bad task list, output folder, plugins or settings (before any work), or a full disk:
        the run stops, nothing finished is lost.
    KeyboardInterrupt
        After a clean stop (results committed, tasks in flight back to pending).
    """
    settings = settings or load_settings()
    sched = settings["scheduler"]
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise InputError(f"{cache_dir}: cache folder not found")
    store = TaskStore(cache_dir / TODO_NAME, busy_timeout=sched["busy_timeout"])
    try:
        return _run(store, cache_dir, Path(output), settings, workers, method, dask, filters,
                    limit, mode, plot, task_function, progress, command)
    finally:
        store.close()


def _run(store, cache_dir, output, settings, workers, method, dask, filters, limit, mode, plot,
         task_function, progress, command):
    sched = settings["scheduler"]
    output = output_folder(output)
    log_file = use_log_file(output / "tessphot.log")
    filters = {k: v for k, v in (filters or {}).items() if v is not None}
    from photometry.hooks.plugins import default_plugin_manager, plugin_names
    pm = default_plugin_manager()
    blocked, extra = plugin_names()
    # the workers skip what failed to import here instead of each reporting it again
    blocked = ",".join(dict.fromkeys(blocked + tuple(pm.tessphot_broken)))
    extra = ",".join(extra)
    policy = None
    if method is None or task_function in (None, DEFAULT_TASK_FUNCTION):
        if method and task_function in (None, DEFAULT_TASK_FUNCTION):
            from photometry.hooks.plugins import lookup
            lookup(pm, "register_algorithms", method)  # fail fast
        else:
            # the method of each task without one is chosen here, once: the result rows are
            # keyed by it, so the coordinator (not the worker) applies the policy
            policy = functools.partial(_choose_method, pm, settings)

    n_workers = workers or sched["workers"] or os.cpu_count() or 1
    staging = output / STAGING
    store.apply_file_ops()  # what a coordinator that died after its commit left undone
    _clean_staging(staging, float(sched["lease"]))
    requeued = store.requeue_stale()
    if requeued:
        logger.warning("%d tasks of a dead run put back in the queue", requeued)
    new = store.plan(method=method, policy=policy, filters=filters, output=output)
    reset = store.reset(mode)
    counts = store.wanted_counts()
    total = counts.get("PENDING", 0)
    if limit is not None:
        total = min(total, int(limit))
    config = {"cache_dir": str(cache_dir.resolve()), "output": str(output.resolve()),
              "staging": str(staging.resolve()), "settings": settings, "plot": plot,
              "extra_plugins": extra, "blocked_plugins": blocked,
              "task_function": task_function, "coordinator_pid": os.getpid(),
              "log_level": _worker_log_level(), "log_file": str(log_file)}
    owner = owner_id()
    config["run_key"] = f"{owner}-{time.time():.0f}"
    backend_name = "dask" if dask else "local"
    run_id = store.start_run(owner, backend_name, n_workers if not dask else 0, command,
                             output=output.resolve(), method=method)
    run = _Coordinator(store, settings, output, limit, progress)
    run.summary = {
        "run_id": run_id, "backend": backend_name, "todo": str(store.path),
        "numtasks": store.count(filters), "methods": store.wanted_methods(),
        "tasks_to_run": total, "tasks_run": 0, "new_results": new,
        "requeued_at_start": requeued, "reset_at_start": reset, "counts": {}, "retried": 0,
        "last_error": None, "mean_elaptime": None, "elapsed": 0.0, "tasks_per_second": 0.0,
        "interrupted": False, "message": None, "log": str(log_file)}
    if total == 0:
        run.summary["message"] = nothing_to_do_message(counts, run.summary["methods"], mode)
        logger.info("%s: %s", store.path, run.summary["message"])

    def on_sigterm(signum, frame):
        raise _Interrupted()

    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, on_sigterm)
    interrupted = False
    try:
        from tqdm import tqdm
        run.bar = tqdm(total=total, unit="task", disable=not progress, dynamic_ncols=True,
                       mininterval=0.5, smoothing=0.05, desc="tessphot run")
        if total and dask:
            run.backend = DaskBackend(dask, config, int(sched["dask_inflight"]),
                                      float(sched["task_timeout"]))
        elif total:
            run.backend = LocalBackend(config, n_workers, int(sched["prefetch"]),
                                       float(sched["task_timeout"]))
        while run.backend is not None and run.dispatch():
            run.collect(run.backend.poll(0.2))
            run.tick()
    except (KeyboardInterrupt, _Interrupted):
        interrupted = True
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        failure = run.shutdown(interrupted)
    if interrupted:
        raise KeyboardInterrupt
    if failure is not None:
        raise failure
    return run.summary


# =========================================================================== command line
def add_arguments(parser):
    parser.add_argument("cache_dir", metavar="CACHE_DIR", help="folder with todo.sqlite and "
                        "the caches")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="folder for the light curves, summary.json and tessphot.log")
    parser.add_argument("--workers", type=at_least(1), default=None, metavar="N",
                        help="local worker processes (setting 0: one per core)")
    parser.add_argument("--method", default=None, metavar="NAME",
                        help="this algorithm for every target; its results are added beside "
                             "other methods' (default: each task's method, else the "
                             "choose_method policy)")
    parser.add_argument("--dask", default=None, metavar="ADDRESS",
                        help="run on this Dask scheduler (tcp://host:8786) instead of local "
                             "processes")
    parser.add_argument("--starid", type=tic_id, action="append", default=None,
                        metavar="TIC", help="only this TIC (repeatable)")
    parser.add_argument("--tmag-min", type=finite_float, default=None, metavar="MAG",
                        help="only Tmag >= this")
    parser.add_argument("--tmag-max", type=finite_float, default=None, metavar="MAG",
                        help="only Tmag <= this")
    parser.add_argument("--camera", type=int, default=None, choices=[1, 2, 3, 4])
    parser.add_argument("--ccd", type=int, default=None, choices=[1, 2, 3, 4])
    parser.add_argument("--limit", type=at_least(1), default=None, metavar="N",
                        help="run at most N tasks")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true",
                       help="redo this run's results (this method's), finished or not; other "
                            "methods' results are kept")
    group.add_argument("--retry-failed", action="store_true",
                       help="also redo results that ended ERROR or ABORT")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        dest="task_timeout", help="per-task timeout in seconds")
    parser.add_argument("--plot", action="store_true", help="also write diagnostic plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_settings_arguments(parser)


def run(args):
    extra = {}
    if args.task_timeout is not None:
        extra["scheduler"] = {"task_timeout": args.task_timeout}
    settings = load_settings(args.settings, args.assignments, extra=extra,
                             extra_origin="--timeout")
    filters = {"starid": args.starid, "tmag_min": args.tmag_min, "tmag_max": args.tmag_max,
               "camera": args.camera, "ccd": args.ccd}
    mode = "all" if args.overwrite else ("failed" if args.retry_failed else "pending")
    from photometry.scheduler.correct import correction_class, finish_run
    correction_class(settings)   # an unknown or blocked correction is refused before the run
    summary = run_tasks(args.cache_dir, args.output, settings=settings, workers=args.workers,
                        method=args.method, dask=args.dask, filters=filters, limit=args.limit,
                        mode=mode, plot=args.plot, progress=not args.no_progress,
                        command=" ".join(sys.argv))
    if summary["message"]:
        print(f"nothing to do: {summary['message']}")
    else:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(summary["counts"].items())) or "nothing"
        print(f"{summary['tasks_run']} tasks in {summary['elapsed']:.1f} s "
              f"({summary['tasks_per_second']:.1f}/s): {counts}")
        if summary["status_all"] != summary["counts"]:  # earlier runs, or skipped without running
            every = ", ".join(f"{k} {v}" for k, v in sorted(summary["status_all"].items()))
            print(f"all results of {', '.join(sorted(summary['methods']))}: {every}")
        if summary["last_error"]:
            print(f"last error: {one_line(summary['last_error'])}")
    # co-trending and the CCD summaries, also after a run with nothing to do: a correction
    # an earlier run did not finish is finished, and one already done is left as it is
    finish_run(args.cache_dir, args.output, settings)
    return 1 if summary["failed"] else 0
