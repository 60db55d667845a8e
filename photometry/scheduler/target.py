"""Running one target: the ONE place where exceptions become a STATUS, and where a finished
result's light curve (the output writers) and plots are written."""
import ctypes
import ctypes.util
import logging
import os
import time as _time
from pathlib import Path

from photometry.core.base import STATUS
from photometry.data.sources import open_source
from photometry.hooks.errors import (AlgorithmFailure, ConfigurationError, InputError, SkipTarget,
                                     UnprocessableTarget, disk_full)

__all__ = ["run_target", "setup_worker", "limit_threads", "tune_malloc"]

logger = logging.getLogger(__name__)


#: environment variables that cap the threads of numerical libraries (read when one loads)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMEXPR_NUM_THREADS")


def limit_threads(threads):
    """Cap this process's BLAS/OpenMP threads at ``threads`` (``scheduler.worker_threads``).

    Why: the thread count changes the last bits of BLAS sums, so every process that computes
    light curves (run workers, Dask workers, ``tessphot star``) uses the same count, and gives
    the same bytes. The variables reach libraries loaded later (and spawned workers),
    threadpoolctl the ones already loaded. For the whole process, not undone: threadpoolctl's
    limits are process-wide, so a context around each task would race between Dask threads.
    ``threads`` <= 0 leaves them as they are.
    """
    threads = int(threads)
    if threads <= 0:
        return
    os.environ.update({name: str(threads) for name in THREAD_VARIABLES})
    from threadpoolctl import threadpool_limits
    threadpool_limits(threads)


def tune_malloc(mmap_threshold=256 << 20, trim_threshold=1 << 30, top_pad=64 << 20):
    """glibc's ``mallopt`` for a worker: cube-sized blocks from the heap, freed ones kept.

    Why (issue 15): each target allocates a few dozen fresh cubes of 2-20 MB (frames x stamp
    pixels x 8 bytes). By default glibc maps each one from the kernel and unmaps it when it
    is freed, so every cube costs its page faults again (the kernel zeroes each page): 5-15 %
    of a worker's CPU per aperture target at 1 282 cadences, 15-25 % at 4 000
    (``bench_aperture.py --timing --malloc-tuned``, docs/benchmarks.md). With blocks up to
    ``mmap_threshold`` taken from the heap and up to ``trim_threshold`` of free heap kept,
    the next target reuses the pages; the peak RSS is the same. The arithmetic is not
    touched: the same bytes. Process-wide, so for worker processes only (called by
    :func:`setup_worker`). True if applied; False without glibc. The
    values are C ints (bytes, 0 <= value < 2**31; ctypes would silently mask larger ones).
    """
    values = (mmap_threshold, trim_threshold, top_pad)
    if not all(0 <= int(v) < 2 ** 31 for v in values):
        raise ValueError(f"tune_malloc: byte counts must be in [0, 2**31), got {values}")
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3      # <malloc.h>
    return all(mallopt(key, int(value)) == 1 for key, value in (
        (m_mmap_threshold, mmap_threshold), (m_trim_threshold, trim_threshold),
        (m_top_pad, top_pad)))


def setup_worker(settings):
    """What every process that computes light curves sets once, before its first target:
    the BLAS thread cap (:func:`limit_threads` at ``scheduler.worker_threads``, the same bits
    everywhere) and glibc's allocator (:func:`tune_malloc`, the same bits, less CPU). Run
    workers, Dask workers and ``tessphot star`` call it with their settings."""
    limit_threads(settings["scheduler"].get("worker_threads", 1))
    tune_malloc()


def run_target(method_cls, starid, source, settings, output_folder, plot=False):
    """Run one target: the ONE place where exceptions become a STATUS.

    Parameters
    ----------
    method_cls : type
        A BasePhotometry subclass.
    starid : int
    source : FFICache or TPFSource (or a path, opened with :func:`open_source`)
    settings : dict
    output_folder : path
        Light curves go under it (see ``photometry.output.lightcurve_io.lightcurve_path``).
    plot : bool
        Also write the diagnostic plots next to the light curve (``plots/<starid>/``).

    Returns
    -------
    dict
        ``starid, method, method_version, status (STATUS), details (dict), elapsed (s),
        lightcurve (path or None), error (one-line message or None)``.

    Raises
    ------
    ConfigurationError
        Re-raised: a settings or plugin problem must stop the whole run.
    OSError
        Re-raised when the disk is full (ENOSPC, EDQUOT): not the target's fault, and every
        target after it would fail the same way; the scheduler stops the run.
    """
    t0 = _time.perf_counter()
    result = {"starid": int(starid), "method": getattr(method_cls, "name", None),
              "method_version": getattr(method_cls, "version", None),
              "status": STATUS.UNKNOWN, "details": {}, "elapsed": 0.0, "lightcurve": None,
              "error": None}
    phot = None
    try:
        if isinstance(source, (str, os.PathLike)):
            source = open_source(source, starid=starid, settings=settings)
        phot = method_cls(starid, source, settings=settings, plot=plot)
        status = phot.photometry()
        if status in (STATUS.OK, STATUS.WARNING):
            path = phot.save_lightcurve(output_folder)
            result["lightcurve"] = str(path)
            if plot:
                try:
                    from photometry.output.plots import save_plots
                    save_plots(phot, Path(path).parent / "plots" / f"{int(starid):011d}")
                except Exception as exc:  # noqa: BLE001 - a plot must not lose the result
                    logger.warning("TIC %d: plots failed: %s", starid, exc)
                    phot.report_details(error=f"plots failed: {exc}")
        result["status"] = status
        if status == STATUS.ERROR:
            result["error"] = phot.failure_reason()
    except ConfigurationError:
        raise
    except SkipTarget as exc:
        result["status"], result["error"] = STATUS.SKIPPED, str(exc)
    except UnprocessableTarget as exc:
        result["status"], result["error"] = STATUS.ABORT, str(exc)
    except AlgorithmFailure as exc:
        result["status"], result["error"] = STATUS.ERROR, str(exc)
    except InputError as exc:
        result["status"], result["error"] = STATUS.ABORT, str(exc)
    except OSError as exc:
        if disk_full(exc):
            raise
        logger.exception("TIC %s: %s failed", starid, result["method"])
        result["status"], result["error"] = STATUS.ERROR, f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - the worker must survive any algorithm bug
        logger.exception("TIC %s: %s failed", starid, result["method"])
        result["status"] = STATUS.ERROR
        result["error"] = f"{type(exc).__name__}: {exc}"
    if phot is not None:
        result["details"] = dict(phot.details)
    if result["error"]:
        result["details"].setdefault("errors", []).append(result["error"])
    if result["status"] == STATUS.ERROR and not (result["details"].get("checks") or {}).get("codes"):
        # an algorithm that failed without a reason code: every ERROR carries one
        from photometry.core.checks import CheckReport, Flag
        result["details"]["checks"] = CheckReport(
            [Flag("METHOD_ERROR", "ERROR", result["error"])]).to_details()
    result["elapsed"] = _time.perf_counter() - t0
    return result
