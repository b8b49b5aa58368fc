"""The job application: job files, running and resuming jobs, and reading what they recorded.

Called, this package lists the job registry: ``slimsearch.jobs()``.
"""

from __future__ import annotations

from slimsearch._package import callable_package


def jobs() -> list:
    """Every job in the job registry (``JobRecord`` values), oldest first."""
    from slimsearch.storage.registry import Registry

    return Registry().jobs()


callable_package(__name__, jobs)
