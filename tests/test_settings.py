"""Settings typed from their defaults and range-checked when loaded; the command-line doors:
defaults in --help, -v after every command."""
import argparse
import re
from pathlib import Path

import pytest

from photometry import cli
from photometry.hooks import commandline
from photometry.hooks import settings
from photometry.hooks.errors import ConfigurationError

DOC = Path(__file__).parent.parent / "docs" / "settings.md"


def test_defaults_pass_their_own_limits():
    defaults = settings.default_settings()
    assert settings.load_settings() == settings.load_settings()
    for name in settings.LIMITS:                       # every limit names a real key
        node = defaults
        for part in name.split("."):
            node = node[part]
        assert not isinstance(node, dict), name


@pytest.mark.parametrize("assignment, message", [
    ("scheduler.workers=abc", "scheduler.workers = 'abc' is not an integer"),
    ("scheduler.workers=2.5", "is not an integer"),
    ("scheduler.workers=-1", "must be >= 0"),
    ("scheduler.task_timeout=soon", "is not a number"),
    ("scheduler.task_timeout=-5", "must be > 0"),
    ("scheduler.task_timeout=0", "must be > 0"),
    ("scheduler.lease=inf", "is not a finite number"),
    ("aperture.policy_bright_tmag=abc", "aperture.policy_bright_tmag = 'abc' is not a number"),
    ("aperture.motion_correction=1", "is not true or false"),
    ("aperture.seed_dominance=1.5", "must be in [0.0, 1.0]"),
    ("photometry.writers=fits", "is not a list"),
    ('photometry.writers=["fits", 2]', "element 2 is not a string"),
    ("prepare.spatial_chunk=[8]", "must be a list of 2 values"),
    ("prepare.spatial_chunk=0", "must be >= 1"),
    ("simulate.sky_gradient=[0.1, nan]", "is not a finite number"),
    ("linpsf.mode=scenery", "must be one of 'target', 'scene'"),
])
def test_bad_values_name_key_and_origin(assignment, message):
    with pytest.raises(ConfigurationError) as info:
        settings.load_settings(assignments=[assignment])
    text = str(info.value)
    assert text.startswith(f"--set {assignment}: ") and message in text
    assert "\n" not in text


def test_good_values_are_normalised():
    s = settings.load_settings(assignments=["scheduler.task_timeout=600",
                                            "scheduler.task_timeout=inf",
                                            "prepare.spatial_chunk=4",
                                            "simulate.sky_gradient=[1, 0]"])
    assert s["scheduler"]["task_timeout"] == float("inf")
    assert s["prepare"]["spatial_chunk"] == 4
    assert s["simulate"]["sky_gradient"] == [1.0, 0.0]
    assert isinstance(s["simulate"]["sky_gradient"][0], float)
    a = settings.load_settings(assignments=["scheduler.faint_limit=15"])
    assert settings.settings_hash(a) == settings.settings_hash(settings.load_settings())


def test_file_origin_and_new_keys_typed_from_their_default(tmp_path, monkeypatch):
    path = tmp_path / "mine.toml"
    path.write_text('[scheduler]\nworkers = "two"\n')
    with pytest.raises(ConfigurationError, match=r"mine.toml: scheduler.workers = 'two'"):
        settings.load_settings([path])
    # a key another engineer adds to defaults.toml is typed with no more code
    original = settings.default_settings

    def with_new_key():
        d = original()
        d["scheduler"]["new_knob"] = 3
        return d
    monkeypatch.setattr(settings, "default_settings", with_new_key)
    assert settings.load_settings(assignments=["scheduler.new_knob=4"])["scheduler"][
        "new_knob"] == 4
    with pytest.raises(ConfigurationError, match="scheduler.new_knob = 'x' is not an integer"):
        settings.load_settings(assignments=["scheduler.new_knob=x"])


def test_compression_choices_are_the_cache_filters():
    """The names the settings accept are the filters ``photometry.data.cache`` can write."""
    from photometry.data import cache
    limit = settings.LIMITS["prepare.compression"]
    assert all(limit.test(name) for name in cache._FILTERS)
    assert limit.text == "one of " + ", ".join(repr(name) for name in cache._FILTERS)


def test_limits_table_is_documented():
    rows = dict(re.findall(r"^\| `([a-z0-9_.]+)` \| ([^|]+) \|", DOC.read_text(), flags=re.M))
    assert {k: v.strip() for k, v in rows.items()} == \
        {k: v.text for k, v in settings.LIMITS.items()}


def test_help_shows_defaults(capsys):
    for argv, expected in ((["run", "--help"], "(default: 0, setting scheduler.workers)"),
                           (["todo", "--help"], "(default: 15.0, setting scheduler.faint_limit)"),
                           (["status", "--help"], "(default: 20)"),
                           (["simulate", "--help"], "(default: 100, setting simulate.cadences)")):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert expected in " ".join(capsys.readouterr().out.split()), argv


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_verbose_after_every_command(command):
    """-v is accepted after every command (also ones added later), and before it."""
    parser = cli.build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "-v" in sub.choices[command]._option_string_actions
    required = {"run": ["cache", "--output", "o"], "star": ["1", "--cache", "c", "--output", "o"],
                "status": ["cache"], "plugins": []}.get(command)
    if required is None:
        return
    argv = [command, *required, "-vv"]
    assert cli.build_parser(argv).parse_args(argv).verbose == 2
    argv = ["-v", command, *required]
    assert cli.build_parser(argv).parse_args(argv).verbose == 1


def test_star_logs_info_without_v(monkeypatch, capsys):
    """``star`` (debugging one star) shows INFO on stderr; other commands WARNING and up."""
    seen = {}
    for argv in (["star", "1", "--cache", "nowhere", "--output", "o"], ["status", "nowhere"],
                 ["star", "-v", "1", "--cache", "nowhere", "--output", "o"]):
        monkeypatch.setattr(cli, "configure_logging", lambda level: seen.setdefault(
            " ".join(argv), level))
        assert cli.main(argv) == 2
    assert list(seen.values()) == [20, 30, 10]


def test_tic_id_type():
    assert commandline.tic_id("25155310") == 25155310
    for bad in ("0", "-3", str(2 ** 63), "TIC 1", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            commandline.tic_id(bad)
