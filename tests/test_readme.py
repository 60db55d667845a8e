"""The README's quick start, run verbatim: every command of its "Quick start" block (parsed
from README.md, ``make`` lines aside) in a fresh folder through the installed ``tessphot``
console script, then the numbers of what it made checked against the simulator's truth."""
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.io import fits

from photometry.core.base import STATUS

README = Path(__file__).parent.parent / "README.md"


def quick_start_commands():
    """The command lines of the first code block after '## Quick start' (``make`` excluded)."""
    text = README.read_text()
    block = re.search(r"^## Quick start\s*\n+```\n(.*?)\n```", text, re.S | re.M)
    assert block, "README.md has no code block under '## Quick start'"
    return [line for line in block.group(1).splitlines()
            if line.strip() and not line.lstrip().startswith("make ")]


def test_quick_start_parses_into_the_documented_commands():
    commands = [line.split()[:2] for line in quick_start_commands()]
    assert [c[1] for c in commands] == ["simulate", "prepare", "todo", "run", "star"]
    assert all(c[0] == "tessphot" for c in commands)


@pytest.mark.slow
def test_readme_quick_start_runs_verbatim(tmp_path):
    """~25 s of CPU: the README's 128 x 128 px, 100-cadence scene is the demo's own."""
    bindir = Path(sys.executable).parent
    if not (bindir / "tessphot").exists():
        pytest.skip("the tessphot console script is not installed next to this Python")
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    outputs = []
    for line in quick_start_commands():
        out = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, f"README command failed: {line}\n{out.stderr[-2000:]}"
        outputs.append(out)
    # run: every OK/WARNING result has its FITS light curve
    with sqlite3.connect(tmp_path / "cache" / "todo.sqlite") as con:
        done = con.execute("SELECT count(*) FROM results WHERE status IN (?, ?)",
                           (int(STATUS.OK), int(STATUS.WARNING))).fetchone()[0]
    written = list((tmp_path / "lightcurves").rglob("*_lc.fits"))
    assert len(written) == done > 100
    # star: the named star is OK, with its light curve and pictures, and as good as ideal
    starid = int(quick_start_commands()[4].split()[2])
    assert f"TIC {starid}: OK" in outputs[4].stdout
    lc_file = next((tmp_path / "debug").rglob(f"tess{starid:011d}-*_lc.fits"))
    assert any((tmp_path / "debug").rglob("stamp.png"))
    with h5py.File(tmp_path / "sim" / "truth.h5", "r") as truth:
        index = int(np.flatnonzero(truth["stars/starid"][:] == starid)[0])
        true_flux = truth["flux"][index]
        ideal = truth["stars/ideal_noise"][index] / truth["stars/flux_mean"][index]
    data = fits.getdata(lc_file, 1)
    good = (data["QUALITY"] == 0) & np.isfinite(data["SAP_FLUX"])
    ratio = data["SAP_FLUX"][good] / true_flux[good]
    assert good.sum() > 80
    assert 0.85 < np.median(ratio) < 1.05                  # aperture keeps most of the PRF
    assert np.std(ratio / np.median(ratio)) < 2 * ideal    # measured 0.96 x ideal
