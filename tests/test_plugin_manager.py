"""One plugin manager per process (issue 17): ``TESSPHOT_BLOCK_PLUGINS`` and
``TESSPHOT_EXTRA_PLUGINS`` apply to every hook kind and every command; an installed plugin
that fails to import is reported once and skipped; a third-party plugin owns its settings
section (tests/box_plugin.py) through ``--settings``, ``--set`` and ``tessphot plugins``."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from photometry import hookimpl
from photometry.core import base, lookup
from photometry.data import calibration, stages
from photometry import cli
from photometry.hooks import plugins
from photometry.scheduler import prepare
from photometry.hooks.errors import ConfigurationError
from photometry.hooks.plugins import (BLOCK_PLUGINS_ENV, EXTRA_PLUGINS_ENV, default_plugin_manager,
                                      get_plugin_manager)
from photometry.hooks.settings import plugin_settings
from photometry.hooks.settings import default_settings, load_settings
from scenes import prepared_sector

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A small simulated sector, prepared (no prepare stages) with its task list."""
    root = tmp_path_factory.mktemp("pm")
    prepared_sector(root, ["simulate.cadences=8", "simulate.rows=40", "simulate.cols=40",
                           "simulate.seed=5", "prepare.stages=[]"], faint_limit=14)
    with sqlite3.connect(root / "cache" / "todo.sqlite") as con:
        star = con.execute("SELECT starid FROM todolist WHERE tmag BETWEEN 9 AND 12 "
                           "ORDER BY priority LIMIT 1").fetchone()[0]
    return SimpleNamespace(root=root, cache=root / "cache", star=star)


def _star(w, out, *extra):
    return cli.main(["star", w.star, "--cache", w.cache, "--output", out, *extra])


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("INFO")]
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------- blocking, every kind
def test_blocking_the_fits_writer_stops_fits_writing(w, tmp_path, monkeypatch, capsys):
    assert _star(w, tmp_path / "control") == 0              # the control writes its FITS file
    assert list((tmp_path / "control").rglob("*_lc.fits"))
    monkeypatch.setenv(BLOCK_PLUGINS_ENV, "fits_writer")
    capsys.readouterr()
    assert _star(w, tmp_path / "blocked") == 2
    line = _one_error_line(capsys)
    assert "unknown output_writer 'fits' (known: tpf)" in line
    assert not list((tmp_path / "blocked").rglob("*.fits"))
    # another writer still works while FITS is blocked
    assert _star(w, tmp_path / "tpf", "--set", 'photometry.writers=["tpf"]') == 0
    written = [p.name for p in (tmp_path / "tpf").rglob("*.fits")]
    assert written and all(name.endswith("_tp.fits") for name in written)


def test_star_and_plugins_honour_the_block_list(w, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(BLOCK_PLUGINS_ENV, "aperture")
    capsys.readouterr()
    assert _star(w, tmp_path) == 2                            # the policy was aperture's
    assert "no method chosen" in _one_error_line(capsys)
    assert _star(w, tmp_path, "--method", "aperture") == 2
    line = _one_error_line(capsys)
    assert "unknown algorithm 'aperture'" in line and "linpsf" in line
    assert cli.main(["plugins", "--json"]) == 0
    names = {row["name"] for row in json.loads(capsys.readouterr().out)}
    assert "aperture" not in names and {"linpsf", "fits_writer", "backdrop"} <= names


@pytest.mark.parametrize("blocked, use", [
    ("backdrop", lambda: stages.background_model_class("backdrop")),
    ("scattered_light", lambda: lookup.load_corrections(
        dict(default_settings(), photometry={"corrections": ["scattered_light"]}))),
    ("linpsf", lambda: prepare._stage_classes({"prepare": {"stages": ["linpsf_shape"]}}, None)),
    ("calibration", lambda: calibration.load_stages({"calibration": {"stages": ["gain"]}})),
])
def test_each_hook_kind_honours_the_block_list(blocked, use, monkeypatch):
    use()                                                     # known without the block
    monkeypatch.setenv(BLOCK_PLUGINS_ENV, blocked)
    with pytest.raises(ConfigurationError, match="unknown"):
        use()


def test_one_manager_per_configuration(monkeypatch):
    monkeypatch.delenv(BLOCK_PLUGINS_ENV, raising=False)
    monkeypatch.delenv(EXTRA_PLUGINS_ENV, raising=False)
    assert default_plugin_manager() is default_plugin_manager()
    monkeypatch.setenv(BLOCK_PLUGINS_ENV, "linpsf")
    assert default_plugin_manager().get_plugin("linpsf") is None
    monkeypatch.setenv(BLOCK_PLUGINS_ENV, "*")
    monkeypatch.setenv(EXTRA_PLUGINS_ENV, "box_plugin")
    pm = default_plugin_manager()
    assert pm.get_plugin("aperture") is None and pm.get_plugin("box_plugin") is not None


# ---------------------------------------------------------------- a broken installed plugin
def _broken_site(root):
    """A folder for PYTHONPATH holding an installed distribution whose entry point raises."""
    site = root / "site"
    dist = site / "tessphot_broken-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tessphot-broken\n"
                                   "Version: 0.1\n")
    (dist / "entry_points.txt").write_text("[photometry]\nbroken_thing = tessphot_broken\n")
    (site / "tessphot_broken.py").write_text(
        "raise ImportError('No module named numpy_from_the_future')\n")
    return site


def test_a_plugin_that_fails_to_import_is_reported_once_and_skipped(w, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(_broken_site(tmp_path))] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop(BLOCK_PLUGINS_ENV, None)
    tessphot = [sys.executable, "-m", "photometry.cli"]
    out = subprocess.run(tessphot + ["plugins"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    warned = [ln for ln in out.stderr.splitlines() if "'broken_thing'" in ln]
    assert len(warned) == 1 and "failed to import" in warned[0]
    assert "numpy_from_the_future" in warned[0]
    assert "aperture" in out.stdout and "broken_thing" not in out.stdout
    # a run with two workers: one warning in all, and the light curves are made
    cache = tmp_path / "cache"
    shutil.copytree(w.cache, cache)
    out = subprocess.run(tessphot + ["run", cache, "--output", tmp_path / "lc", "--workers",
                                     "2"], capture_output=True, text=True, env=env)
    assert out.returncode in (0, 1), out.stderr
    assert sum("'broken_thing'" in ln for ln in out.stderr.splitlines()) == 1, out.stderr
    assert len(list((tmp_path / "lc").rglob("*_lc.fits"))) >= 5
    # blocking it by name silences it
    env[BLOCK_PLUGINS_ENV] = "broken_thing"
    out = subprocess.run(tessphot + ["plugins"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "broken_thing" not in out.stderr


# ---------------------------------------------------------------- plugin-owned settings
def test_third_party_settings_through_settings_file_and_set(w, tmp_path, monkeypatch, capsys):
    mine = tmp_path / "box.toml"
    mine.write_text("[box]\nhalf_width = 3\n")
    capsys.readouterr()
    assert _star(w, tmp_path / "a", "--settings", mine) == 2          # no such plugin yet
    assert _one_error_line(capsys).endswith(f"{mine}: unknown setting 'box'")
    monkeypatch.setenv(EXTRA_PLUGINS_ENV, "box_plugin")
    for extra, pixels in [(["--settings", mine], 49), (["--set", "box.half_width=1"], 9),
                          ([], 25)]:
        assert _star(w, tmp_path / "b", "--method", "box", "--json", *extra) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["status"] == "OK" and report["details"]["mask_size"] == pixels
    for bad, message in [("box.half_width=0", "box.half_width = 0 must be >= 1"),
                         ("box.half_width=wide", "box.half_width = 'wide' is not an integer"),
                         ("box.halfwidth=2", "unknown setting 'box.halfwidth'")]:
        assert _star(w, tmp_path / "c", "--method", "box", "--set", bad) == 2
        assert message in _one_error_line(capsys)


def test_plugins_command_shows_registered_names_and_settings(monkeypatch, capsys):
    monkeypatch.setenv(EXTRA_PLUGINS_ENV, "box_plugin")
    assert cli.main(["plugins"]) == 0
    text = capsys.readouterr().out
    block = text[text.index("box_plugin"):]
    assert "algorithms:          box" in block
    assert "[box]" in block and "half_width = 2    # >= 1" in block
    assert "min_pixels = 4    # in [1, 10000]" in block
    aperture = text[text.index("aperture"):text.index("backdrop")]
    assert "algorithms:          aperture" in aperture
    assert "backgrounds:         backdrop" in text
    assert cli.main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["box_plugin"]["settings"] == {"box": {"half_width": 2, "min_pixels": 4}}
    assert rows["scattered_light"]["registers"] == {"prepare_stages": ["scattered_light"],
                                                    "corrections": ["scattered_light"]}


def test_a_plugin_cannot_take_a_core_or_another_plugins_section():
    def grab(section):
        return type(f"grab_{section}", (), {"register_settings": staticmethod(
            hookimpl(lambda: {section: {"x": 1}}))})
    with pytest.raises(ConfigurationError, match="section 'photometry' is already defined "
                                                 "by the core"):
        plugin_settings(get_plugin_manager(blocked="*", extra_plugins=[grab("photometry")]))
    import box_plugin
    with pytest.raises(ConfigurationError, match="section 'box' is already defined by"):
        plugin_settings(get_plugin_manager(blocked="*", extra_plugins=[box_plugin,
                                                                         grab("box")]))


def test_a_plugin_default_outside_its_limit_names_the_plugin(monkeypatch):
    from photometry.hooks.settings import at_least
    plugin = type("wide_box", (), {
        "register_settings": staticmethod(hookimpl(lambda: {"wide": {"width": 0}})),
        "register_setting_limits": staticmethod(hookimpl(lambda: {"wide.width": at_least(1)}))})
    monkeypatch.setattr("photometry.hooks.plugins._cached_plugin_manager",
                        lambda blocked, extra: get_plugin_manager("*", [plugin]))
    with pytest.raises(ConfigurationError, match=r"^plugin '.*wide_box.*' defaults: "
                                                 r"wide.width = 0 must be >= 1$"):
        load_settings()
    assert load_settings(assignments=["wide.width=2"])["wide"] == {"width": 2}
