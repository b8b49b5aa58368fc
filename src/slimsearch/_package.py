"""Packages that are also the function of their name: ``slimsearch.jobs()`` lists the job
registry and ``slimsearch.search(...)`` runs a search, while ``slimsearch.jobs.query`` and
``slimsearch.search.pareto`` stay modules of those packages.

A package and a function cannot share one attribute of ``slimsearch`` (importing the
package would replace the function), so the package itself is made callable.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable


def callable_package(name: str, function: Callable[..., Any]) -> None:
    """Make the package ``name`` (already in ``sys.modules``) call ``function`` when called."""

    class CallablePackage(types.ModuleType):
        __call__ = staticmethod(function)

    CallablePackage.__name__ = f"CallablePackage[{name}]"
    sys.modules[name].__class__ = CallablePackage
