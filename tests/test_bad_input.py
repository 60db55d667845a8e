"""The bad-input suite (issue 13): every command, given a bad file, target or setting, exits
with code 2 and exactly one line on stderr that names the file, target or key, before any
work, and never a traceback. Listed in ``docs/bad_input.md`` (a test keeps it complete).

Most cases call ``photometry.cli.main`` (the console script's function) in this process; a
few run the installed ``tessphot`` script as a process (broken pipe, full disk, the entry
point itself).
"""
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from photometry import cli
from scenes import prepared_sector

DOC = Path(__file__).parent.parent / "docs" / "bad_input.md"
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A small simulated sector (prepared, task list built) and a set of bad files."""
    base = tmp_path_factory.mktemp("bad")
    prepared_sector(base, ["simulate.cadences=6", "simulate.rows=32", "simulate.cols=32",
                           "simulate.seed=3", "prepare.stages=[]"], faint_limit=15)
    ns = SimpleNamespace(base=base, ffi=base / "sim" / "ffi", catalog=base / "sim" / "catalog.csv",
                         cache=base / "cache")
    con = sqlite3.connect(ns.cache / "todo.sqlite")
    ns.star = con.execute("SELECT starid FROM todolist ORDER BY priority LIMIT 1").fetchone()[0]
    con.close()

    def folder(name, files=()):
        path = base / name
        path.mkdir()
        for fname, content in files:
            (path / fname).write_bytes(content)
        return path

    ns.file = base / "a_file"
    ns.file.write_text("not a folder")
    ns.nonutf = base / "latin1.toml"
    ns.nonutf.write_bytes("[scheduler]\nworkers = 1  # caf\xe9\n".encode("latin-1"))
    ns.badtoml = base / "broken.toml"
    ns.badtoml.write_text("[scheduler\nworkers = 1\n")
    ns.wrongtype = base / "wrongtype.toml"
    ns.wrongtype.write_text('[scheduler]\nworkers = "two"\n')
    ns.unknown = base / "unknown.toml"
    ns.unknown.write_text("[scheduler]\nworkerz = 2\n")
    ns.nocache = folder("nocache")
    ns.empty_db = folder("emptydb", [("todo.sqlite", b"")])
    ns.garbage_db = folder("garbagedb", [("todo.sqlite", b"this is no database\n" * 20)])
    ns.other_db = folder("otherdb")
    sqlite3.connect(ns.other_db / "todo.sqlite").execute("CREATE TABLE t (x)").connection.close()
    ns.newer_db = folder("newerdb")
    shutil.copy(ns.cache / "todo.sqlite", ns.newer_db / "todo.sqlite")
    con = sqlite3.connect(ns.newer_db / "todo.sqlite")
    con.execute("UPDATE schema_version SET version = 999")
    con.commit()
    con.close()
    ns.bad_hdf5 = folder("badhdf5", [("sector0001_camera1_ccd4.hdf5", b"\x89HDF garbage" * 50)])
    ns.bad_fits = folder("badfits", [("tess2018206192942-s0001-1-4-0120-s_ffic.fits",
                                      b"SIMPLE  = junk" * 300)])
    ns.no_columns = base / "cols.csv"
    ns.no_columns.write_text("id,brightness\n1,10\n")
    ns.text_cat = base / "catalog.txt"
    ns.text_cat.write_text("starid ra dec tmag\n")
    # a folder nobody may write in: root ignores permissions, but not those of sysfs
    if ROOT:
        ns.readonly = Path("/sys/kernel")
    else:
        ns.readonly = folder("readonly")
        ns.readonly.chmod(0o555)
    ns.out = base / "out"
    return ns


def star_args(w, *extra):
    return ["star", w.star, "--cache", w.cache, "--output", w.out / "star", *extra]


def run_args(w, *extra):
    return ["run", w.cache, "--output", w.out / "run", "--no-progress", *extra]


BIG = str(2 ** 64)

#: (id, command, what is wrong, argv(w), text the message must contain (formatted with w))
CASES = [
    # ---- the command line itself
    ("no-command", "(none)", "no command", lambda w: [], "COMMAND"),
    ("bad-command", "(none)", "unknown command", lambda w: ["photometer"], "photometer"),
    ("bad-option", "(none)", "unknown option", lambda w: ["plugins", "--colour"], "--colour"),
    # ---- simulate
    ("simulate-cadences-text", "simulate", "--cadences not a number",
     lambda w: ["simulate", w.out / "s", "--cadences", "many"], "--cadences"),
    ("simulate-cadences-zero", "simulate", "--cadences 0",
     lambda w: ["simulate", w.out / "s", "--cadences", "0"], "simulate.cadences"),
    ("simulate-camera", "simulate", "--camera 5",
     lambda w: ["simulate", w.out / "s", "--camera", "5"], "simulate.camera"),
    ("simulate-cadence-choice", "simulate", "--cadence 300",
     lambda w: ["simulate", w.out / "s", "--cadence", "300"], "--cadence"),
    ("simulate-set-type", "simulate", "setting of the wrong type",
     lambda w: ["simulate", w.out / "s", "--set", "simulate.sky_level=bright"],
     "simulate.sky_level"),
    ("simulate-set-range", "simulate", "fraction above 1",
     lambda w: ["simulate", w.out / "s", "--set", "simulate.n_variable=1.5"],
     "simulate.n_variable"),
    ("simulate-out-file", "simulate", "output folder is a file",
     lambda w: ["simulate", w.file, "--cadences", "2", "--size", "16", "16"], "{file}"),
    ("simulate-out-readonly", "simulate", "output folder not writable",
     lambda w: ["simulate", w.readonly / "sim", "--cadences", "2", "--size", "16", "16"],
     "{readonly}"),
    ("simulate-prf", "simulate", "PRF folder missing",
     lambda w: ["simulate", w.out / "s", "--prf", w.base / "noprf", "--cadences", "2"],
     "noprf"),
    # ---- prepare
    ("prepare-no-folder", "prepare", "FFI folder missing",
     lambda w: ["prepare", w.base / "nowhere", "--catalog", w.catalog, "--cache", w.out / "c"],
     "nowhere"),
    ("prepare-no-ffi", "prepare", "folder without FFIs",
     lambda w: ["prepare", w.nocache, "--catalog", w.catalog, "--cache", w.out / "c"],
     "{nocache}"),
    ("prepare-bad-fits", "prepare", "an FFI that is not FITS",
     lambda w: ["prepare", w.bad_fits, "--catalog", w.catalog, "--cache", w.out / "c"],
     "_ffic.fits"),
    ("prepare-no-catalog", "prepare", "catalog missing",
     lambda w: ["prepare", w.ffi, "--catalog", w.base / "nocat.csv", "--cache", w.out / "c"],
     "nocat.csv"),
    ("prepare-catalog-columns", "prepare", "catalog without the needed columns",
     lambda w: ["prepare", w.ffi, "--catalog", w.no_columns, "--cache", w.out / "c"],
     "{no_columns}"),
    ("prepare-catalog-format", "prepare", "catalog of unknown format",
     lambda w: ["prepare", w.ffi, "--catalog", w.text_cat, "--cache", w.out / "c"],
     "{text_cat}"),
    ("prepare-cache-file", "prepare", "--cache is a file",
     lambda w: ["prepare", w.ffi, "--catalog", w.catalog, "--cache", w.file], "{file}"),
    ("prepare-set-range", "prepare", "time_chunk 0",
     lambda w: ["prepare", w.ffi, "--catalog", w.catalog, "--cache", w.out / "c",
                "--set", "prepare.time_chunk=0"], "prepare.time_chunk"),
    ("prepare-set-choice", "prepare", "unknown compression",
     lambda w: ["prepare", w.ffi, "--catalog", w.catalog, "--cache", w.out / "c",
                "--set", "prepare.compression=zip"], "prepare.compression"),
    ("prepare-set-chunk-shape", "prepare", "chunk shape of 3 numbers",
     lambda w: ["prepare", w.ffi, "--catalog", w.catalog, "--cache", w.out / "c",
                "--set", "prepare.spatial_chunk=[8, 8, 8]"], "prepare.spatial_chunk"),
    # ---- todo
    ("todo-no-folder", "todo", "cache folder missing", lambda w: ["todo", w.base / "nowhere"],
     "nowhere"),
    ("todo-file", "todo", "cache folder is a file", lambda w: ["todo", w.file], "{file}"),
    ("todo-no-cache", "todo", "folder without caches", lambda w: ["todo", w.nocache],
     "{nocache}"),
    ("todo-bad-hdf5", "todo", "damaged cache file", lambda w: ["todo", w.bad_hdf5],
     "sector0001_camera1_ccd4.hdf5"),
    ("todo-exists", "todo", "task list exists already", lambda w: ["todo", w.cache],
     "todo.sqlite"),
    ("todo-faint-text", "todo", "--faint-limit not a number",
     lambda w: ["todo", w.cache, "--overwrite", "--faint-limit", "faint"], "--faint-limit"),
    ("todo-faint-nan", "todo", "--faint-limit nan",
     lambda w: ["todo", w.cache, "--overwrite", "--faint-limit", "nan"],
     "scheduler.faint_limit"),
    ("todo-set-type", "todo", "faint_limit not a number",
     lambda w: ["todo", w.cache, "--overwrite", "--set", "scheduler.faint_limit=deep"],
     "scheduler.faint_limit"),
    ("todo-settings-missing", "todo", "settings file missing",
     lambda w: ["todo", w.cache, "--settings", w.base / "none.toml"], "none.toml"),
    # ---- run: the task list
    ("run-no-folder", "run", "cache folder missing",
     lambda w: ["run", w.base / "nowhere", "--output", w.out / "r"], "nowhere"),
    ("run-no-todo", "run", "no todo.sqlite", lambda w: ["run", w.nocache, "--output", w.out],
     "todo.sqlite"),
    ("run-empty-todo", "run", "zero-byte todo.sqlite",
     lambda w: ["run", w.empty_db, "--output", w.out / "r"], "{empty_db}"),
    ("run-garbage-todo", "run", "todo.sqlite not SQLite",
     lambda w: ["run", w.garbage_db, "--output", w.out / "r"], "{garbage_db}"),
    ("run-other-sqlite", "run", "an SQLite file without a task list",
     lambda w: ["run", w.other_db, "--output", w.out / "r"], "{other_db}"),
    ("run-newer-schema", "run", "task list of a newer tessphot",
     lambda w: ["run", w.newer_db, "--output", w.out / "r"], "{newer_db}"),
    # ---- run: options
    ("run-workers-text", "run", "--workers abc", lambda w: run_args(w, "--workers", "abc"),
     "--workers"),
    ("run-workers-zero", "run", "--workers 0", lambda w: run_args(w, "--workers", "0"),
     "--workers"),
    ("run-timeout-negative", "run", "--timeout -5", lambda w: run_args(w, "--timeout", "-5"),
     "scheduler.task_timeout"),
    ("run-starid-huge", "run", "--starid past 2^63", lambda w: run_args(w, "--starid", BIG),
     BIG),
    ("run-starid-text", "run", "--starid not a number",
     lambda w: run_args(w, "--starid", "Pi Men"), "--starid"),
    ("run-camera", "run", "--camera 7", lambda w: run_args(w, "--camera", "7"), "--camera"),
    ("run-limit", "run", "--limit 0", lambda w: run_args(w, "--limit", "0"), "--limit"),
    ("run-tmag", "run", "--tmag-max inf", lambda w: run_args(w, "--tmag-max", "inf"),
     "--tmag-max"),
    ("run-method", "run", "unknown --method", lambda w: run_args(w, "--method", "psf9000"),
     "psf9000"),
    ("run-no-output", "run", "--output missing", lambda w: ["run", w.cache], "--output"),
    ("run-both-modes", "run", "--overwrite with --retry-failed",
     lambda w: run_args(w, "--overwrite", "--retry-failed"), "--retry-failed"),
    # ---- run: the output folder
    ("run-output-file", "run", "--output is a file",
     lambda w: ["run", w.cache, "--output", w.file], "{file}"),
    ("run-output-under-file", "run", "--output inside a file",
     lambda w: ["run", w.cache, "--output", w.file / "lc"], "{file}"),
    ("run-output-readonly", "run", "--output not writable",
     lambda w: ["run", w.cache, "--output", w.readonly], "{readonly}"),
    # ---- run: settings (checked when loaded, whatever is pending)
    ("run-set-workers-text", "run", "scheduler.workers=abc",
     lambda w: run_args(w, "--set", "scheduler.workers=abc"), "scheduler.workers"),
    ("run-set-workers-float", "run", "scheduler.workers=1.5",
     lambda w: run_args(w, "--set", "scheduler.workers=1.5"), "scheduler.workers"),
    ("run-set-timeout-text", "run", "task_timeout=soon",
     lambda w: run_args(w, "--set", "scheduler.task_timeout=soon"), "scheduler.task_timeout"),
    ("run-set-timeout-negative", "run", "task_timeout=-5",
     lambda w: run_args(w, "--set", "scheduler.task_timeout=-5"), "scheduler.task_timeout"),
    ("run-set-attempts", "run", "max_attempts=0",
     lambda w: run_args(w, "--set", "scheduler.max_attempts=0"), "scheduler.max_attempts"),
    ("run-set-nan", "run", "lease=nan",
     lambda w: run_args(w, "--set", "scheduler.lease=nan"), "scheduler.lease"),
    ("run-set-policy", "run", "aperture.policy_bright_tmag=abc",
     lambda w: run_args(w, "--set", "aperture.policy_bright_tmag=abc"),
     "aperture.policy_bright_tmag"),
    ("run-set-bool", "run", "a yes/no setting given a number",
     lambda w: run_args(w, "--set", "aperture.motion_correction=2"),
     "aperture.motion_correction"),
    ("run-set-list", "run", "a list setting given a number",
     lambda w: run_args(w, "--set", "photometry.writers=3"), "photometry.writers"),
    ("run-set-unknown", "run", "unknown key",
     lambda w: run_args(w, "--set", "scheduler.wrokers=2"), "scheduler.wrokers"),
    ("run-set-unknown-section", "run", "unknown section",
     lambda w: run_args(w, "--set", "box.size=2"), "box.size"),
    ("run-set-section", "run", "a section given a value",
     lambda w: run_args(w, "--set", "scheduler=3"), "scheduler"),
    ("run-set-no-equals", "run", "--set without =",
     lambda w: run_args(w, "--set", "scheduler.workers"), "scheduler.workers"),
    ("run-set-nothing-pending", "run", "bad value when no task matches",
     lambda w: run_args(w, "--starid", "1", "--set", "scheduler.workers=abc"),
     "scheduler.workers"),
    ("run-settings-nonutf8", "run", "settings file not UTF-8",
     lambda w: run_args(w, "--settings", w.nonutf), "{nonutf}"),
    ("run-settings-broken", "run", "settings file not TOML",
     lambda w: run_args(w, "--settings", w.badtoml), "{badtoml}"),
    ("run-settings-type", "run", "wrong type in a settings file",
     lambda w: run_args(w, "--settings", w.wrongtype), "scheduler.workers"),
    ("run-settings-unknown", "run", "unknown key in a settings file",
     lambda w: run_args(w, "--settings", w.unknown), "scheduler.workerz"),
    ("run-settings-folder", "run", "settings path is a folder",
     lambda w: run_args(w, "--settings", w.nocache), "{nocache}"),
    ("run-settings-missing", "run", "settings file missing",
     lambda w: run_args(w, "--settings", w.base / "none.toml"), "none.toml"),
    # ---- star
    ("star-id-huge", "star", "TIC id past 2^63",
     lambda w: ["star", BIG, "--cache", w.cache, "--output", w.out / "star"], BIG),
    ("star-id-text", "star", "TIC id not a number",
     lambda w: ["star", "PiMen", "--cache", w.cache, "--output", w.out / "star"], "PiMen"),
    ("star-id-zero", "star", "TIC id 0",
     lambda w: ["star", "0", "--cache", w.cache, "--output", w.out / "star"], "TIC id 0"),
    ("star-not-in-catalog", "star", "star in no cache",
     lambda w: ["star", "123", "--cache", w.cache, "--output", w.out / "star"], "TIC 123"),
    ("star-no-cache", "star", "cache folder missing",
     lambda w: ["star", "123", "--cache", w.base / "nowhere", "--output", w.out / "star"],
     "nowhere"),
    ("star-tpf-missing", "star", "TPF file missing",
     lambda w: ["star", "123", "--tpf", w.base / "no.fits", "--output", w.out / "star"],
     "no.fits"),
    ("star-tpf-not-fits", "star", "TPF not a FITS file",
     lambda w: ["star", "123", "--tpf", w.file, "--output", w.out / "star"], "{file}"),
    ("star-output-file", "star", "--output is a file",
     lambda w: ["star", w.star, "--cache", w.cache, "--output", w.file], "{file}"),
    ("star-method", "star", "unknown --method",
     lambda w: star_args(w, "--method", "psf9000"), "psf9000"),
    ("star-verbose-method", "star", "unknown --method, with -v after the command",
     lambda w: star_args(w, "-v", "--method", "psf9000"), "psf9000"),
    ("star-set-range", "star", "stamp_min_size=-3",
     lambda w: star_args(w, "--set", "photometry.stamp_min_size=-3"),
     "photometry.stamp_min_size"),
    ("star-no-source", "star", "neither --cache nor --tpf",
     lambda w: ["star", "123", "--output", w.out / "star"], "--cache"),
    # ---- status
    ("status-no-folder", "status", "cache folder missing",
     lambda w: ["status", w.base / "nowhere"], "nowhere"),
    ("status-no-todo", "status", "no todo.sqlite", lambda w: ["status", w.nocache],
     "todo.sqlite"),
    ("status-empty-todo", "status", "zero-byte todo.sqlite", lambda w: ["status", w.empty_db],
     "{empty_db}"),
    ("status-garbage-todo", "status", "todo.sqlite not SQLite",
     lambda w: ["status", w.garbage_db], "{garbage_db}"),
    ("status-failures-text", "status", "--failures abc",
     lambda w: ["status", w.cache, "--failures", "abc"], "--failures"),
    ("status-failures-negative", "status", "--failures -1",
     lambda w: ["status", w.cache, "--failures", "-1"], "--failures"),
    # ---- plugins
    ("plugins-extra-argument", "plugins", "an argument it does not take",
     lambda w: ["plugins", "aperture"], "aperture"),
    ("plugins-bad-option", "plugins", "unknown option", lambda w: ["plugins", "--all"],
     "--all"),
]


def run_in_process(argv, capsys):
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err


#: case id -> its stderr line, with the module's folder as ``DIR`` (for the docs table)
SEEN = {}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(w, case, capsys):
    _, command, _, argv, needle = case
    if case[0].endswith("readonly") and not ROOT and sys.platform == "win32":
        pytest.skip("no read-only folder")
    code, err = run_in_process(argv(w), capsys)
    lines = err.strip().splitlines()
    SEEN[case[0]] = err.strip().replace(str(w.base), "DIR")
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle.format(**{k: str(v) for k, v in vars(w).items()}) in lines[0], lines[0]
    if command not in ("(none)", "plugins"):
        assert lines[0].startswith(f"tessphot {command}: error:"), lines[0]


def test_no_work_was_done(w):
    """The cases stop before any work: no output folder appeared, the task list unchanged."""
    assert not list(w.out.rglob("*.fits"))
    con = sqlite3.connect(w.cache / "todo.sqlite")
    assert con.execute("SELECT COUNT(*) FROM results WHERE status IS NOT NULL").fetchone()[0] == 0
    con.close()


# --------------------------------------------------------------------------- processes
def tessphot():
    script = Path(sys.executable).with_name("tessphot")
    return [str(script)] if script.exists() else [sys.executable, "-m", "photometry.cli"]


@pytest.mark.parametrize("what, argv, needle", [
    ("zero-byte todo.sqlite", lambda w: ["status", w.empty_db], "empty file"),
    ("non-UTF-8 settings", lambda w: ["todo", w.cache, "--settings", w.nonutf], "UTF-8"),
    ("huge TIC id", lambda w: ["star", BIG, "--cache", w.cache, "--output", w.out], BIG),
])
def test_bad_input_through_the_console_script(w, what, argv, needle):
    done = subprocess.run(tessphot() + [str(a) for a in argv(w)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and needle in done.stderr, done.stderr


def test_status_into_a_closed_pipe(w):
    """``tessphot status | head -1``: no BrokenPipeError traceback."""
    proc = subprocess.Popen(tessphot() + ["status", str(w.cache), "--failures", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(5)
    proc.stdout.close()                                   # the reader went away
    err = proc.stderr.read().decode()
    proc.wait(60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode in (0, 141)


def test_star_json_is_one_document_and_shows_info(w, capsys, tmp_path):
    """``tessphot star ... --json > star.json`` is valid JSON (make demo's debug_star.json);
    the plugins' INFO messages reach stderr without -v."""
    import json
    capsys.readouterr()
    code = cli.main(["star", str(w.star), "--cache", str(w.cache), "--output",
                     str(tmp_path / "star"), "--json"])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert code == (0 if report["status"] in ("OK", "WARNING") else 1)
    assert report["starid"] == w.star and report["method"] == "aperture"
    assert report["lightcurve"] and Path(report["lightcurve"]).is_file()
    assert f"INFO photometry.cli.star: TIC {w.star}: method aperture" in err


def test_full_disk_is_one_line(w, tmp_path):
    """A real run of the aperture photometry onto a 300 kB file system: one line, exit 2,
    the light curves written before it filled up are kept and recorded."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here")
    try:
        cache = tmp_path / "cache"
        shutil.copytree(w.cache, cache)
        done = subprocess.run(tessphot() + ["run", str(cache), "--output", str(mount / "lc"),
                                            "--no-progress", "--workers", "2", "--set",
                                            "scheduler.commit_every=1"],
                              capture_output=True, text=True, timeout=300)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert "no space left on device" in lines[0] and str(mount) in lines[0]
        con = sqlite3.connect(cache / "todo.sqlite")
        kept = con.execute("SELECT d.lightcurve FROM results r JOIN diagnostics d "
                           "USING (priority, method) WHERE r.status IN (1, 3)").fetchall()
        total = con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        charged = con.execute("SELECT SUM(attempts) FROM results").fetchone()[0]
        con.close()
        assert 0 < len(kept) < total and charged == 0
        assert all((mount / "lc" / lc).is_file() for lc, in kept)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_internal_error_names_the_log(w, capsys, monkeypatch, tmp_path):
    """An unexpected exception (a bug) is one line naming the log file, exit 70; the
    traceback is in the log."""
    log = tmp_path / "tessphot.log"
    monkeypatch.setenv("TESSPHOT_LOG", str(log))
    import photometry.cli.status as status_cmd
    monkeypatch.setattr(status_cmd, "status_report",
                        lambda *a, **k: (_ for _ in ()).throw(ZeroDivisionError("oops")))
    code, err = run_in_process(["status", w.cache], capsys)
    assert code == 70 and len(err.strip().splitlines()) == 1
    assert f"traceback in {log}" in err and "ZeroDivisionError: oops" in err
    assert "Traceback (most recent call last)" in log.read_text()


def test_every_case_is_documented():
    """The docs table lists exactly these cases. Its message column is what the cases
    printed when it was last written: ``TESSPHOT_WRITE_BAD_INPUT_DOC=1 pytest -p no:xdist
    tests/test_bad_input.py`` rewrites it (messages are examples; the ids are checked)."""
    text = DOC.read_text()
    listed = set(re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.M))
    assert listed == {c[0] for c in CASES}
    assert len(CASES) >= 60
    if os.environ.get("TESSPHOT_WRITE_BAD_INPUT_DOC") and SEEN:
        def row(match):
            cells = match.group(0).split(" | ")
            case = cells[0][3:-1]
            if case in SEEN:
                cells[-1] = SEEN[case].replace("|", "\\|") + " |"
            return " | ".join(cells)
        DOC.write_text(re.sub(r"^\| `[a-z0-9-]+` \|.*\|$", row, text, flags=re.M))


def test_disk_full_seen_through_a_library_reraise():
    """astropy's FITS writer re-raises ENOSPC as a bare OSError("Not enough space on disk ..."):
    it must still stop the run rather than mark each later target ERROR."""
    import errno

    from photometry.hooks.errors import disk_full

    def reraise(inner):
        try:
            raise inner
        except OSError as exc:
            raise OSError("Not enough space on disk: requested 1440, available 0. " + str(exc))

    # what astropy really raises: numpy's short write under it has no errno either
    for inner in (OSError("40000 requested and 7832 written"),
                  OSError(errno.ENOSPC, "No space left on device")):
        with pytest.raises(OSError) as info:
            reraise(inner)
        assert info.value.errno is None and disk_full(info.value)
    try:                                   # a library's wrapper around a real ENOSPC
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("write failed") from exc
    except RuntimeError as wrapped:
        assert disk_full(wrapped)
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk_full(ValueError("No space"))
