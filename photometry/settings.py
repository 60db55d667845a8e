"""Settings: documented defaults in ``settings/defaults.toml``, overridable per run, hashed.

Why a hash: the cache and every light curve record which settings produced them, so a
resumed prepare with other settings is refused instead of silently mixing products.
"""
import copy
import hashlib
import json
import tomllib
from importlib import resources
from pathlib import Path

from .errors import ConfigurationError

__all__ = ["load_settings", "settings_hash", "parse_assignment", "default_settings"]


def default_settings():
    """The documented defaults, as a nested dict."""
    text = resources.files("photometry._defaults").joinpath("defaults.toml").read_text()
    return tomllib.loads(text)


def _merge(base, update, origin, prefix=""):
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in base:
            raise ConfigurationError(f"{origin}: unknown setting '{name}'")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigurationError(f"{origin}: setting '{name}' is a section, not a value")
            _merge(base[key], value, origin, prefix=name + ".")
        else:
            base[key] = value


def parse_assignment(text):
    """Turn ``"section.key=value"`` (value in TOML syntax, bare words as strings) into a dict."""
    if "=" not in text:
        raise ConfigurationError(f"--set {text!r}: expected section.key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    nested = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def load_settings(files=(), assignments=(), extra=None):
    """Defaults, then each TOML file, then ``section.key=value`` assignments, then ``extra``.

    Raises
    ------
    ConfigurationError
        For a missing or malformed file or an unknown key, naming where it came from.
    """
    settings = default_settings()
    for path in files:
        path = Path(path)
        try:
            update = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigurationError(f"{path}: settings file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{path}: not a valid TOML settings file ({exc})") from None
        _merge(settings, update, str(path))
    for text in assignments:
        _merge(settings, parse_assignment(text), f"--set {text}")
    if extra:
        _merge(settings, copy.deepcopy(extra), "options")
    return settings


def settings_hash(settings, section=None):
    """Short stable hash of the settings (or of one section of them)."""
    data = settings if section is None else settings[section]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
