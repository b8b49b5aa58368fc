"""Files read and written one safe way: YAML that cannot run code, writes that are whole or absent.

:func:`safe_load` reads job files and hardware-profile files alike. PyYAML's SafeLoader builds only plain mappings, lists, strings, numbers and booleans, so
a file cannot make Python run code (``!!python/object`` tags are refused). On top of it,
a key given twice in one mapping is refused (PyYAML would silently keep the last one),
and every error is one line naming the file and the line.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Union

from slimsearch.exceptions import ConfigError


def safe_load(text: str, origin: str) -> Any:
    """``text`` (read from ``origin``, named in errors) parsed by a SafeLoader."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, str) and key in seen:
                    raise ConfigError(f"{origin}: line {key_node.start_mark.line + 1}: key {key!r} appears twice "
                                      "in one mapping; allowed: each key once")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    loader = Loader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        if isinstance(exc, yaml.constructor.ConstructorError) and "python/" in problem:
            raise ConfigError(f"{origin}: tag {problem.split()[-1]}{where} is not allowed; files are read with "
                              "safe loading: allowed are plain mappings, lists, strings, numbers and booleans") from None
        raise ConfigError(f"{origin}: not valid YAML{where}: {problem}") from None
    finally:
        loader.dispose()


@contextlib.contextmanager
def atomic_path(path: Union[str, "os.PathLike[str]"], *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` when the block ends
    without an error, and is removed when it raises. A reader never sees half a file, and
    two processes writing the same file at once each write their own temporary one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{suffix}")
    tmp.unlink(missing_ok=True)  # a crashed writer's leftover (a symlink is removed, not followed)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # gone already; or a folder that cannot be written
            tmp.unlink(missing_ok=True)


def atomic_write(path: Union[str, "os.PathLike[str]"], data: Union[bytes, str], *, mode: int = 0o666) -> None:
    """Write ``data`` (text as UTF-8) to ``path``, whole or not at all (:func:`atomic_path`); a new
    file gets permission bits ``mode`` (less the umask)."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
