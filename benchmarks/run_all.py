"""Run every benchmark in turn and print their figures (``make benchmarks``).

Each benchmark is its own script (see its docstring for options); this runs them with their
default settings, one after another so that they do not compete for the cores, and keeps
going when one fails. Record the figures in ``docs/benchmarks.md`` with the machine and date.
"""
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
#: script -> extra arguments (defaults of each script otherwise)
BENCHMARKS = {
    "bench_prepare.py": [],
    "bench_calibration.py": [],
    "bench_backdrop.py": [],
    "bench_scattered.py": ["--sim"],
    "bench_aperture.py": [],
    "bench_linpsf.py": [],
    "bench_psfmachine.py": [],
    "bench_scheduler.py": [],
    "bench_sector.py": [],          # ~16 min CPU: 40 + 200 full frames, 128 px to 11 800
    "bench_correct.py": [],
}


def main(names=None):
    failed = []
    for script, args in BENCHMARKS.items():
        if names and script not in names:
            continue
        print(f"\n===== {script} {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / script), *args])
        print(f"===== {script}: exit {code}, {time.perf_counter() - t0:.0f} s", flush=True)
        if code:
            failed.append(script)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
