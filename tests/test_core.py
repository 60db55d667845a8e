"""Settings, quality flags, the plugin registry and the command-line contract."""
import subprocess
import sys

import pytest

from photometry.hooks import quality
from photometry.hooks import settings
from photometry.hooks.errors import ConfigurationError
from photometry.hooks.utilities import flux2mag, mag2flux


def test_mag2flux_zero_point():
    assert mag2flux(10) == pytest.approx(15000, rel=0.01)
    assert flux2mag(mag2flux(12.3)) == pytest.approx(12.3)


def test_quality_filter_uses_default_bitmask():
    q = [0, 32, 2048, 1 | 2048]
    assert quality.TESSQualityFlags.filter(q).tolist() == [True, False, True, False]
    assert quality.TESSQualityFlags.decode(33) == ["AttitudeTweak", "Desat"]


def test_settings_override_order(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[prepare]\ntime_chunk = 16\n")
    s = settings.load_settings([path], ["prepare.spatial_chunk=4"])
    assert s["prepare"]["time_chunk"] == 16
    assert s["prepare"]["spatial_chunk"] == 4
    assert settings.settings_hash(s) != settings.settings_hash(settings.default_settings())


@pytest.mark.parametrize("assignment", ["prepare.no_such_key=1", "nosection.x=1"])
def test_settings_unknown_key_is_an_error(assignment):
    with pytest.raises(ConfigurationError, match="unknown setting"):
        settings.load_settings(assignments=[assignment])


def test_cli_version():
    out = subprocess.run([sys.executable, "-m", "photometry.cli", "--version"],
                         capture_output=True, text=True, check=True)
    assert "tessphot" in out.stdout


def test_every_setting_is_documented():
    """Each key of settings/defaults.toml carries a comment on its line or the line above."""
    from importlib import resources
    lines = resources.files("photometry._defaults").joinpath("defaults.toml").read_text()
    lines = lines.splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        text = line.strip()
        if not text or text.startswith(("#", "[")) or "=" not in text:
            continue
        if "#" not in text and not lines[i - 1].strip().startswith("#"):
            undocumented.append(text)
    assert not undocumented, undocumented


def test_every_hook_is_documented():
    from photometry.hooks import hookspecs
    import inspect
    hooks = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(f, "photometry_spec")]
    assert {f.__name__ for f in hooks} >= {
        "register_algorithms", "register_prepare_stages", "register_corrections",
        "register_calibration_stages", "register_output_writers", "choose_method"}
    assert all(f.__doc__ and f.__doc__.strip() for f in hooks)
