"""The profiles shipped with slimsearch, and loading any profile by name or file."""

from __future__ import annotations

import os
from pathlib import Path
from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles._profile import HardwareProfile
from slimsearch.hardware_profiles._schema import _FILE_SUFFIXES, _parse_text

def _shipped_dir():  # -> importlib.resources.abc.Traversable
    from importlib.resources import files

    return files("slimsearch.hardware_profiles") / "profiles"


def list_profiles() -> list[str]:
    """Names of the profiles shipped with slimsearch, sorted."""
    return sorted(entry.name[: -len(".yaml")] for entry in _shipped_dir().iterdir()
                  if entry.name.endswith(".yaml"))


def load_profile(name_or_path: str | os.PathLike[str] | HardwareProfile) -> HardwareProfile:
    """Load a shipped profile by name, or any profile file by path (.yaml, .yml or .json).

    A :class:`HardwareProfile` passed in is returned as it is, so callers can accept either.

    Raises:
        ConfigError: Unknown name (the message lists the shipped names), missing file, or
            a file that does not validate.
    """
    if isinstance(name_or_path, HardwareProfile):
        return name_or_path
    text_arg = os.fspath(name_or_path)
    looks_like_path = (
        not isinstance(name_or_path, str)
        or text_arg.endswith(_FILE_SUFFIXES)
        or os.sep in text_arg
        or "/" in text_arg
    )
    if looks_like_path:
        path = Path(text_arg)
        if not path.is_file():
            raise ConfigError(f"hardware profile file {str(path)!r} does not exist")
        suffix = path.suffix.lower()
        if suffix not in _FILE_SUFFIXES:
            raise ConfigError(f"hardware profile file {str(path)!r} must end with one of "
                              f"{list(_FILE_SUFFIXES)}")
        origin = str(path)
        data = _parse_text(path.read_text(encoding="utf-8"), origin=origin, suffix=suffix)
        return HardwareProfile.from_dict(data, origin=origin)

    names = list_profiles()
    if text_arg not in names:
        raise ConfigError(f"unknown hardware profile {text_arg!r}; must be one of {names} "
                          "or a path to a .yaml or .json profile file")
    entry = _shipped_dir() / f"{text_arg}.yaml"
    origin = str(entry)
    data = _parse_text(entry.read_text(encoding="utf-8"), origin=origin, suffix=".yaml")
    profile = HardwareProfile.from_dict(data, origin=origin)
    if profile.name != text_arg:
        raise ConfigError(f"{origin}: name: is {profile.name!r} but must equal the file name "
                          f"{text_arg!r}")
    return profile
